"""`distill dedupe IN OUT`: Alpaca's near-duplicate filter for people who only need the filter.

Reads JSONL, a JSON list or Parquet; keeps every record whose instruction is not a near-duplicate (ROUGE-L
F above the threshold) of an earlier kept one or of a seed; writes the kept records to OUT (format from
its extension) and the dropped ones beside it as <name>.dropped.<ext>, in input order, each with a
`dedupe` object: reason, nearest kept text, its ROUGE-L, and the record's position in the input.
Every record is checked before anything is written, so a bad record never leaves half an output.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.curate.fastdedupe import dedupe_texts
from pipeline.errors import InputFileError
from pipeline.store import atomic_write_bytes, atomic_write_text


class _Bad:
    """A line that could not be read as a record; kept so `on_bad='reject'` can report it in place."""

    def __init__(self, reason: str, detail: str):
        self.reason, self.detail = reason, detail


def read_rows(path: Path) -> list[Any]:
    """JSONL, a JSON list, or Parquet -> list of rows; unreadable JSONL lines come back as `_Bad`."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"{path} does not exist (or is not a file).")
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        try:
            return pq.read_table(path).to_pylist()
        except (pa.ArrowException, OSError) as e:
            raise InputFileError(f"{path}: not a readable Parquet file ({e}).") from None
    data = path.read_bytes()
    if path.suffix == ".json":
        try:
            rows = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise InputFileError(f"{path}: invalid UTF-8 at byte {e.start}. Re-save the file as UTF-8.") from None
        except json.JSONDecodeError as e:
            raise InputFileError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}).") from None
        if not isinstance(rows, list):
            raise InputFileError(f"{path}: expected a JSON list of records (or use .jsonl for one record per line).")
        return rows
    rows: list[Any] = []
    for n, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            rows.append(json.loads(raw.decode("utf-8")))
        except UnicodeDecodeError as e:
            rows.append(_Bad("invalid_utf8", f"{path}, line {n}: invalid UTF-8 at byte {e.start} of the line. "
                                              f"Re-save the file as UTF-8."))
        except json.JSONDecodeError as e:
            rows.append(_Bad("invalid_json", f"{path}, line {n}: not valid JSON ({e.msg}). Fix or remove that line."))
    return rows


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write rows in the format of `path`'s extension (.parquet, .json, else JSONL), atomically."""
    path = Path(path)
    if path.suffix == ".parquet":
        import io

        import pyarrow as pa
        import pyarrow.parquet as pq
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), buf)
        atomic_write_bytes(path, buf.getvalue())
    elif path.suffix == ".json":
        atomic_write_text(path, json.dumps(rows, ensure_ascii=False, indent=1))
    else:
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


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
    rows = read_rows(src)
    problems = {n: p for n, row in enumerate(rows) if (p := _problem(row, field))}
    if problems and on_bad == "error":
        n, (reason, detail) = next(iter(problems.items()))
        raise InputFileError(f"{src}, record {n + 1}: {detail}. Nothing was written ({len(problems)} bad "
                             f"record(s) in all; pass on_bad='reject' to drop them with a reason instead).")
    seed_texts: list[str] = []
    if seeds:
        seed_rows = read_rows(Path(seeds))
        for n, row in enumerate(seed_rows):
            if p := _problem(row, seed_field):
                raise InputFileError(f"{seeds}, record {n + 1}: {p[1]} (use --seed-field to pick another).")
        seed_texts = [r[seed_field] for r in seed_rows]

    good = [n for n in range(len(rows)) if n not in problems]
    result = dedupe_texts([rows[n][field] for n in good], seed_texts, threshold)
    pool = seed_texts + [rows[n][field] for n in good]
    verdict: dict[int, dict[str, Any]] = {}
    for j, n in enumerate(good):
        at = len(seed_texts) + j
        if not result.kept[at]:
            verdict[n] = {"reason": "near_duplicate", "nearest": pool[int(result.nearest[at])],
                          "nearest_is_seed": bool(result.nearest[at] < len(seed_texts)),
                          "rouge_l": float(result.score[at]), "index": n}
    for n, (reason, detail) in problems.items():
        verdict[n] = {"reason": reason, "detail": detail, "index": n}

    kept, dropped = [], []
    for n, row in enumerate(rows):
        if n not in verdict:
            kept.append(row)
        else:
            record = row if isinstance(row, dict) else {"value": None if isinstance(row, _Bad) else row}
            dropped.append({**record, "dedupe": verdict[n]})
    drop_file = dropped_path(dst)
    write_rows(drop_file, dropped)
    write_rows(dst, kept)
    return {"input": len(rows), "kept": len(kept), "dropped": len(dropped),
            "near_duplicates": sum(v["reason"] == "near_duplicate" for v in verdict.values()),
            "bad_records": len(problems), "seeds": len(seed_texts), "threshold": threshold,
            "output": str(dst), "dropped_file": str(drop_file)}
