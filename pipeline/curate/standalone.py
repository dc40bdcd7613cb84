"""`distill dedupe IN OUT`: Alpaca's near-duplicate filter for people who only need the filter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.curate.dedupe import NearDuplicateIndex
from pipeline.errors import InputFileError
from pipeline.store import atomic_write_text


def read_rows(path: Path) -> list[dict[str, Any]]:
    """JSONL, a JSON list, or Parquet -> list of dicts; errors name the file and line."""
    path = Path(path)
    if not path.exists():
        raise InputFileError(f"{path} does not exist.")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        return pq.read_table(path).to_pylist()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputFileError(f"{path}: invalid UTF-8 at byte {e.start}. Re-save the file as UTF-8.") from None
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputFileError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}).") from None
        if not isinstance(rows, list):
            raise InputFileError(f"{path}: expected a JSON list of records.")
        return rows
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise InputFileError(f"{path}, line {n}: not valid JSON ({e.msg}). Fix or remove that line.") from None
    return rows


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        from pipeline.store import atomic_dir  # noqa: F401  (parquet written via temp file below)
        tmp = path.with_name(f".{path.name}.tmp")
        pq.write_table(pa.Table.from_pylist(rows), tmp)
        tmp.replace(path)
    elif path.suffix == ".json":
        atomic_write_text(path, json.dumps(rows, ensure_ascii=False, indent=1))
    else:
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def dedupe_file(src: Path, dst: Path, field: str = "instruction", threshold: float = 0.7,
                seeds: Path | None = None, seed_field: str = "instruction") -> dict[str, Any]:
    """Keep/drop every record of `src` in input order; dropped ones name their nearest kept match."""
    rows = read_rows(src)
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not isinstance(row.get(field), str):
            raise InputFileError(f"{src}, record {n}: needs a string field {field!r} (use --field to pick another).")
    seed_texts = [r[seed_field] for r in read_rows(seeds)] if seeds else []
    index = NearDuplicateIndex(threshold, vocabulary_hint=seed_texts + [r[field] for r in rows])
    for s in seed_texts:
        index.add(s)
    kept, dropped = [], []
    for row in rows:
        v = index.check_and_add(row[field])
        if v.kept:
            kept.append(row)
        else:
            dropped.append({**row, "nearest": index.texts[v.nearest], "rouge_l": v.score})
    dst = Path(dst)
    write_rows(dst, kept)
    dropped_path = dst.with_name(f"{dst.stem}.dropped{dst.suffix}")
    write_rows(dropped_path, dropped)
    return {"input": len(rows), "kept": len(kept), "dropped": len(dropped), "output": str(dst), "dropped_file": str(dropped_path)}
