"""Reading Self-Instruct seed tasks, with errors that name the file, line and field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.errors import InputFileError

MAX_SEED_FILE_BYTES = 50 * 1024 * 1024


class Instance(BaseModel):
    input: str = ""
    output: str


class SeedTask(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str
    name: str = ""
    instruction: str = Field(min_length=1)
    instances: list[Instance] = Field(default_factory=list)
    is_classification: bool = False


def load_seed_tasks(path: Path) -> list[SeedTask]:
    """Parse a seed JSONL file; any bad line stops the run before work starts, naming the line and fix."""
    path = Path(path)
    if not path.exists():
        raise InputFileError(f"Seed file {path} does not exist. Set generate.seed_tasks to a JSONL file of seed tasks.")
    if path.stat().st_size > MAX_SEED_FILE_BYTES:
        raise InputFileError(f"Seed file {path} is {path.stat().st_size // 2**20} MB; seed files are small "
                             f"(Self-Instruct's has 175 tasks). Pass a smaller curated file.")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise InputFileError(f"Seed file {path}, line {line}: invalid UTF-8 at byte {e.start}. Re-save the file as UTF-8.") from None
    tasks: list[SeedTask] = []
    seen: set[str] = set()
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputFileError(f"Seed file {path}, line {lineno}: not valid JSON ({e.msg} at column {e.colno}). "
                                 f"Each line must be one JSON object with at least an 'instruction'.") from None
        if not isinstance(obj, dict):
            raise InputFileError(f"Seed file {path}, line {lineno}: expected a JSON object, got {type(obj).__name__}.")
        obj.setdefault("id", f"seed_task_{lineno}")
        try:
            task = SeedTask.model_validate(obj)
        except ValidationError as e:
            problems = "; ".join(f"field '{'.'.join(map(str, x['loc']))}': {x['msg']}" for x in e.errors())
            raise InputFileError(f"Seed file {path}, line {lineno}: {problems}. Fix that field on that line.") from None
        if task.id in seen:
            raise InputFileError(f"Seed file {path}, line {lineno}: duplicate id {task.id!r}. Seed ids must be unique.")
        seen.add(task.id)
        tasks.append(task)
    if not tasks:
        raise InputFileError(f"Seed file {path} holds no tasks. Add at least one JSON line with an 'instruction'.")
    return tasks


def without_heldout(tasks: list[SeedTask], heldout_instructions: Iterable[str]) -> list[SeedTask]:
    """The seed pool the generator may show the teacher: every task whose instruction is an eval item's is removed.

    An eval set cut from the seed tasks (the default second held-out set) would otherwise be shown to the teacher as
    few-shot examples and come back, paraphrased, in the training data. Matching uses curate's exact-duplicate key
    (case, whitespace and punctuation ignored).
    """
    from pipeline.curate.filters import normalise

    held = {normalise(t) for t in heldout_instructions}
    kept = [t for t in tasks if normalise(t.instruction) not in held]
    if not kept:
        raise InputFileError("Every seed task is also an eval item, so the generator has no seeds left. Point "
                             "generate.seed_tasks and evaluate.eval_sets at different tasks.")
    return kept
