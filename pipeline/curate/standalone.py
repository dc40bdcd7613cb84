"""`distill dedupe IN OUT`: Alpaca's near-duplicate filter for people who only need the filter.

Reads JSONL, a JSON list or Parquet; keeps every record whose instruction is not a near-duplicate (ROUGE-L
F above the threshold) of an earlier kept one or of a seed; writes the kept records to OUT (format from
its extension) and the dropped ones beside it as <name>.dropped.<ext>, in input order, each with a
`dedupe` object: reason, nearest kept text, its ROUGE-L, and the record's position in the input.
Every record is checked before anything is written, so a bad record never leaves half an output.

It streams: a first pass reads and checks every record and keeps only its instruction's token ids (a few
bytes a token), a second pass copies each record to its output. So ten million records need memory for
the index, not for the records (JSONL and Parquet stream; a JSON list is one document and is read whole).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import orjson  # several times faster than json for the ten million small documents a big input has

from pipeline.curate.fastdedupe import Encoded, dedupe_encoded, encode
from pipeline.errors import InputFileError

_CHUNK = 65536  # records tokenized at a time


class _Bad:
    """A line that could not be read as a record; kept so `on_bad='reject'` can report it in place."""

    def __init__(self, reason: str, detail: str):
        self.reason, self.detail = reason, detail


def iter_rows(path: Path) -> Iterator[tuple[Any, bytes | None]]:
    """(row, raw JSONL line or None) for each record of a JSONL, JSON list or Parquet file, in order;
    unreadable JSONL lines come back as `_Bad`."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"{path} does not exist (or is not a file).")
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        try:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=_CHUNK):
                for row in batch.to_pylist():
                    yield row, None
        except (pa.ArrowException, OSError) as e:
            raise InputFileError(f"{path}: not a readable Parquet file ({e}).") from None
        return
    if path.suffix == ".json":
        for row in read_rows(path):
            yield row, None
        return
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                yield orjson.loads(raw), raw
            except orjson.JSONDecodeError:
                yield _bad_line(path, n, raw), None


def _bad_line(path: Path, n: int, raw: bytes) -> _Bad:
    try:
        json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        return _Bad("invalid_utf8", f"{path}, line {n}: invalid UTF-8 at byte {e.start} of the line. "
                                    f"Re-save the file as UTF-8.")
    except json.JSONDecodeError as e:
        return _Bad("invalid_json", f"{path}, line {n}: not valid JSON ({e.msg}). Fix or remove that line.")
    return _Bad("invalid_json", f"{path}, line {n}: not valid JSON. Fix or remove that line.")


def read_rows(path: Path) -> list[Any]:
    """JSONL, a JSON list, or Parquet -> list of rows; unreadable JSONL lines come back as `_Bad`."""
    path = Path(path)
    if path.suffix != ".json":
        return [row for row, _ in iter_rows(path)]
    if not path.is_file():
        raise InputFileError(f"{path} does not exist (or is not a file).")
    data = path.read_bytes()
    try:
        rows = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise InputFileError(f"{path}: invalid UTF-8 at byte {e.start}. Re-save the file as UTF-8.") from None
    except json.JSONDecodeError as e:
        raise InputFileError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}).") from None
    if not isinstance(rows, list):
        raise InputFileError(f"{path}: expected a JSON list of records (or use .jsonl for one record per line).")
    return rows


def _problem(row: Any, field: str) -> tuple[str, str] | None:
    if isinstance(row, _Bad):
        return row.reason, row.detail
    if not isinstance(row, dict):
        return "not_an_object", f"is a {type(row).__name__}, not an object with a {field!r} field"
    if field not in row:
        return "missing_field", f"has no {field!r} field (use --field to pick another; it has {sorted(row)[:8]})"
    if not isinstance(row[field], str):
        return "wrong_type", f"field {field!r} is a {type(row[field]).__name__}, not a string"
    return None


def dropped_path(dst: Path) -> Path:
    """Where the dropped records of output `dst` go: beside it as <name>.dropped.<ext>."""
    dst = Path(dst)
    return dst.with_name(f"{dst.stem}.dropped{dst.suffix or '.jsonl'}")



class _Output:
    """One output file written as records arrive, under a temp name until `commit` (atomic as a whole)."""

    def __init__(self, path: Path, parquet_schema=None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.tmp-")
        os.close(fd)
        self.tmp = Path(tmp)
        self.kind = {".parquet": "parquet", ".json": "json"}.get(self.path.suffix, "jsonl")
        self.count = 0
        self._rows: list[dict] = []
        self._schema = parquet_schema  # known (Parquet in): stream row groups; else rows are collected
        self._writer = None
        self._f = open(self.tmp, "wb") if self.kind != "parquet" else None
        if self.kind == "json":
            self._f.write(b"[")

    def write(self, row: dict, raw: bytes | None = None) -> None:
        """Append one record; `raw` is its JSONL line, copied as it is when the output is JSONL too."""
        self.count += 1
        if self.kind == "parquet":
            self._rows.append(row)
            if self._schema is not None and len(self._rows) >= _CHUNK:
                self._flush_parquet()
            return
        if self.kind == "jsonl" and raw is not None:
            self._f.write(raw if raw.endswith(b"\n") else raw + b"\n")
            return
        try:
            data = orjson.dumps(row)
        except TypeError:  # what orjson refuses (huge ints, non-string keys), json writes
            data = json.dumps(row, ensure_ascii=False).encode("utf-8")
        if self.kind == "json":
            self._f.write((b"\n" if self.count == 1 else b",\n") + data)
        else:
            self._f.write(data + b"\n")

    def _flush_parquet(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq
        table = pa.Table.from_pylist(self._rows, schema=self._schema)
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.tmp, table.schema)
        self._writer.write_table(table)
        self._rows = []

    def commit(self) -> None:
        if self.kind == "parquet":
            if self._rows or self._writer is None:
                self._flush_parquet()
            self._writer.close()
        else:
            if self.kind == "json":
                self._f.write(b"\n]" if self.count else b"]")
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        if self._f is not None and not self._f.closed:
            self._f.close()
        if self._writer is not None:
            self._writer.close()
        self.tmp.unlink(missing_ok=True)


def _parquet_schemas(src: Path, dst: Path):
    """Schemas to stream Parquet out with: the input's for kept rows, plus the `dedupe` column for dropped
    ones. Only when the input is Parquet too; otherwise rows may differ in shape and are collected."""
    if src.suffix != ".parquet" or dst.suffix != ".parquet":
        return None, None
    import pyarrow as pa
    import pyarrow.parquet as pq
    schema = pq.read_schema(src)
    dedupe = pa.struct([("reason", pa.string()), ("nearest", pa.string()), ("nearest_is_seed", pa.bool_()),
                        ("rouge_l", pa.float64()), ("index", pa.int64()), ("detail", pa.string())])
    return schema, schema.append(pa.field("dedupe", dedupe))


def dedupe_file(src: Path, dst: Path, field: str = "instruction", threshold: float = 0.7,
                seeds: Path | None = None, seed_field: str = "instruction", on_bad: str = "error") -> dict[str, Any]:
    """Keep/drop every record of `src` in input order; dropped ones name their nearest kept match.

    on_bad="error" (default): a record without a string `field` (or an unreadable line) stops everything
    with a message naming it, before anything is written. on_bad="reject": it goes to the dropped file
    with its reason instead.
    """
    if on_bad not in ("error", "reject"):
        raise InputFileError(f"on_bad must be 'error' or 'reject', not {on_bad!r}.")
    if not 0 < threshold <= 1:
        raise InputFileError(f"--threshold must be in (0, 1], got {threshold}.")
    src, dst = Path(src), Path(dst)
    seed_texts: list[str] = []
    if seeds:
        for n, row in enumerate(read_rows(Path(seeds))):
            if p := _problem(row, seed_field):
                raise InputFileError(f"{seeds}, record {n + 1}: {p[1]} (use --seed-field to pick another).")
            seed_texts.append(row[seed_field])

    # Pass 1: check every record and keep only the token ids of its instruction.
    vocab: dict[str, int] = {}
    seed_enc = encode(seed_texts, vocab)
    token_chunks, length_chunks = [seed_enc.tokens], [np.diff(seed_enc.offsets)]
    problems: dict[int, tuple[str, str]] = {}
    chunk: list[str] = []

    def flush() -> None:
        enc = encode(chunk, vocab)
        token_chunks.append(enc.tokens)
        length_chunks.append(np.diff(enc.offsets))
        chunk.clear()

    n_rows = 0
    for n, (row, _) in enumerate(iter_rows(src)):
        n_rows += 1
        if p := _problem(row, field):
            problems[n] = p
            continue
        chunk.append(row[field])
        if len(chunk) >= _CHUNK:
            flush()
    flush()
    if problems and on_bad == "error":
        n, (reason, detail) = next(iter(problems.items()))
        raise InputFileError(f"{src}, record {n + 1}: {detail}. Nothing was written ({len(problems)} bad "
                             f"record(s) in all; pass on_bad='reject' to drop them with a reason instead).")
    lengths = np.concatenate(length_chunks)
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.concatenate(token_chunks).astype(np.int32, copy=False)
    del token_chunks, length_chunks
    n_seeds = len(seed_texts)
    result = dedupe_encoded(Encoded(tokens, offsets, vocab), n_seeds, threshold)
    del tokens

    # The nearest kept text of each dropped record is read back in pass 2 (it always comes earlier), and held
    # only until the last dropped record that names it.
    dropped_at = np.flatnonzero(~result.kept)
    last_use = np.full(len(result.kept), -1, np.int64)
    np.maximum.at(last_use, result.nearest[dropped_at].astype(np.int64), dropped_at)
    held: dict[int, str] = {i: t for i, t in enumerate(seed_texts) if last_use[i] >= 0}

    # Pass 2: each record to its output, in input order.
    kept_schema, dropped_schema = _parquet_schemas(src, dst)
    drop_file = dropped_path(dst)
    kept_out, dropped_out = _Output(dst, kept_schema), _Output(drop_file, dropped_schema)
    near_dups = 0
    try:
        at = n_seeds
        for n, (row, raw) in enumerate(iter_rows(src)):
            if n in problems:
                reason, detail = problems[n]
                record = row if isinstance(row, dict) else {"value": None if isinstance(row, _Bad) else row}
                dropped_out.write({**record, "dedupe": {"reason": reason, "detail": detail, "index": n}})
                continue
            if last_use[at] >= 0:
                held[at] = row[field]
            if result.kept[at]:
                kept_out.write(row, raw)
            else:
                c = int(result.nearest[at])
                near_dups += 1
                dropped_out.write({**row, "dedupe": {"reason": "near_duplicate", "nearest": held[c],
                                                     "nearest_is_seed": c < n_seeds,
                                                     "rouge_l": float(result.score[at]), "index": n}})
                if last_use[c] == at:
                    del held[c]
            at += 1
        dropped_out.commit()
        kept_out.commit()
    except BaseException:
        kept_out.discard()
        dropped_out.discard()
        raise
    return {"input": n_rows, "kept": kept_out.count, "dropped": dropped_out.count,
            "near_duplicates": near_dups, "bad_records": len(problems), "seeds": n_seeds, "threshold": threshold,
            "output": str(dst), "dropped_file": str(drop_file)}
