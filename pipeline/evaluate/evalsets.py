"""Evaluation sets: Alpaca JSON/JSONL (instruction, input, output) or Self-Instruct (instances)."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from pipeline.errors import InputFileError


class EvalItem(BaseModel):
    id: str
    instruction: str
    input: str = ""
    reference: str = ""
    category: str = ""


def _rows(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputFileError(f"Eval file {path}: not valid JSON ({e.msg}, line {e.lineno}).") from None
        if not isinstance(data, list):
            raise InputFileError(f"Eval file {path}: expected a JSON list of records.")
        return data
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise InputFileError(f"Eval file {path}, line {n}: not valid JSON ({e.msg}).") from None
        return rows
    raise InputFileError(f"Eval file {path}: unknown format {path.suffix!r}. Use Alpaca .json/.jsonl "
                         f"(instruction, input, output) or Self-Instruct .jsonl (instruction, instances).")


def load_eval_set(path: Path, limit: int | None = None) -> list[EvalItem]:
    """Read an eval set in either supported format; errors name the file, line and field."""
    path = Path(path)
    if not path.exists():
        raise InputFileError(f"Eval file {path} does not exist. Set evaluate.eval_set to an existing file.")
    items = []
    for n, row in enumerate(_rows(path), 1):
        if not isinstance(row, dict) or not isinstance(row.get("instruction"), str):
            raise InputFileError(f"Eval file {path}, record {n}: needs a string 'instruction' field.")
        if "instances" in row:  # Self-Instruct: one item per instance
            for k, inst in enumerate(row["instances"] or [{}]):
                items.append(EvalItem(id=f"{row.get('id', n)}-{k}", instruction=row["instruction"],
                                      input=inst.get("input", ""), reference=inst.get("output", ""),
                                      category=row.get("category", "")))
        else:
            items.append(EvalItem(id=str(row.get("id", n)), instruction=row["instruction"], input=row.get("input", "") or "",
                                  reference=row.get("output", "") or "", category=row.get("category", "") or ""))
        if limit and len(items) >= limit:
            break
    return items[:limit] if limit else items
