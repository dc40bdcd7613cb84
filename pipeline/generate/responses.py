"""Modes without seed tasks: `responses` (the teacher answers instructions you bring, best-of-n) and
`magpie` (the teacher writes the user's request itself from its chat template's user-turn opening)."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import CurateConfig, GenerateConfig
from pipeline.errors import ConfigError, InputFileError
from pipeline.generate.parse import parse_magpie_query
from pipeline.generate.prompts import render, template_hash
from pipeline.generate.self_instruct import screen, seed_pool
from pipeline.progress import Progress
from pipeline.records import Record
from pipeline.teachers.base import CachedTeacher, Request

# The opening of a user turn, after an optional system turn, per chat template family; and its end-of-turn.
MAGPIE_TEMPLATES = {
    "chatml": ("<|im_start|>system\n{system}<|im_end|>\n", "<|im_start|>user\n", "<|im_end|>"),
    "llama3": ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
               "<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"),
    "gemma": ("", "<start_of_turn>user\n", "<end_of_turn>"),  # Gemma has no system turn
}


def load_user_instructions(path: Path) -> list[dict[str, str]]:
    """Instructions from JSONL/JSON/CSV/Parquet or a `datasets` folder: [{'id','instruction','input'}]."""
    import datasets

    path = Path(path)
    if not path.exists():
        raise InputFileError(f"generate.responses_from: {path} does not exist. Point it at a JSONL, CSV or Parquet "
                             f"file or a folder written by Dataset.save_to_disk.")
    if path.is_dir():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[next(iter(ds))]
    else:
        kind = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(path.suffix.lower())
        if kind is None:
            raise InputFileError(f"generate.responses_from: {path} has suffix {path.suffix!r}; use .jsonl, .json, "
                                 f".csv or .parquet, or a folder written by Dataset.save_to_disk.")
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    column = next((c for c in ("instruction", "prompt") if c in ds.column_names), None)
    if column is None:
        raise InputFileError(f"generate.responses_from: {path} has columns {ds.column_names}; it needs an "
                             f"'instruction' (or 'prompt') column, and optionally 'input'.")
    rows = []
    for i, row in enumerate(ds):
        text = (row[column] or "").strip()
        if text:
            rows.append({"id": str(row.get("id") or f"row_{i}"), "instruction": text,
                         "input": str(row.get("input") or "").strip()})
    if not rows:
        raise InputFileError(f"generate.responses_from: {path} holds no non-empty instructions.")
    return rows


def choose(texts: list[str], rule: str) -> int:
    """Index of the answer a choice rule keeps among n samples (ties: the earliest)."""
    if rule == "longest":
        return max(range(len(texts)), key=lambda i: (len(texts[i].strip()), -i))
    return 0


def respond(teacher: CachedTeacher, rows: list[dict[str, str]], cfg: GenerateConfig, run_id: str,
            template: str = "response", base_params: dict | None = None) -> list[Record]:
    """Answer each row `responses_n` times and keep one by `responses_choice`; failures are rejects."""
    n = cfg.responses_n
    if n > 1 and cfg.response_temperature == 0:
        raise ConfigError("generate.responses_n > 1 with generate.response_temperature 0 samples the same answer n "
                          "times. Set generate.response_temperature (e.g. 0.7) or responses_n to 1.")
    reqs = [Request(kind="chat", messages=[{"role": "user", "content": render(template, instruction=r["instruction"],
                                                                               input=r["input"])}],
                    max_tokens=cfg.response_max_tokens, temperature=cfg.response_temperature, top_p=cfg.top_p if n > 1 else 1.0,
                    logprobs=cfg.response_logprobs, sample_index=k, stage="generate")
            for r in rows for k in range(n)]
    with Progress(len(reqs), "generate: answers", key="generate-answers") as bar:
        replies = teacher.generate(reqs, on_done=bar.update)
    samples = [[c for c in replies[j * n:(j + 1) * n] if c.ok] for j in range(len(rows))]
    judged = judge_best(teacher, rows, samples) if cfg.responses_choice == "judge-best" else None
    records = []
    for j, row in enumerate(rows):
        got = replies[j * n:(j + 1) * n]
        params = {**(base_params or {}), "answer_template": template, "answer_template_hash": template_hash(template),
                  "answer_params": reqs[j * n].params(), "n": n, "choice": cfg.responses_choice, "source_row": row["id"]}
        rec = Record(instruction=row["instruction"], input=row["input"], run_id=run_id,
                     teacher=f"{teacher.backend}:{teacher.model}", template=template,
                     template_hash=template_hash(template), gen_params=json.dumps(params))
        ok = samples[j]
        if not ok:
            records.append(rec.reject("teacher_error", got[0].error))
            continue
        best = ok[judged[j] if judged else choose([c.text for c in ok], cfg.responses_choice)]
        records.append(Record(**{**rec.model_dump(exclude={"id"}), "output": best.text.strip(),
                                 "finish_reason": best.finish_reason, "teacher_logprobs": best.logprobs,
                                 "raw_reply": json.dumps([c.text for c in ok], ensure_ascii=False) if n > 1 else best.text}))
    return records


def judge_best(teacher: CachedTeacher, rows: list[dict[str, str]], samples: list[list]) -> list[int]:
    """Index of the best sample per row by a knockout of pairwise judgements (the evaluation's judge prompt,
    asked in both orders so position bias cancels); the current best is replaced only on a strict win."""
    from pipeline.evaluate.evalsets import EvalItem
    from pipeline.evaluate.judge import item_preference, judge_request, parse_verdict

    best = [0] * len(rows)
    items = [EvalItem(id=r["id"], instruction=r["instruction"], input=r["input"]) for r in rows]
    for k in range(1, max((len(s) for s in samples), default=0)):
        todo = [j for j, s in enumerate(samples) if len(s) > k]
        reqs = []
        for j in todo:
            champion, challenger = samples[j][best[j]].text, samples[j][k].text
            reqs += [judge_request(items[j], challenger, champion), judge_request(items[j], champion, challenger)]
        verdicts = [parse_verdict(c.text) if c.ok else None for c in teacher.generate(reqs)]
        for i, j in enumerate(todo):
            if item_preference(verdicts[2 * i], verdicts[2 * i + 1]) > 0.5:
                best[j] = k
    return best


def responses_generate(teacher: CachedTeacher, cfg: GenerateConfig, run_id: str) -> tuple[list[Record], dict]:
    """The `responses` mode: your instructions in, the teacher's (best-of-n) answers out."""
    if cfg.responses_from is None:
        raise ConfigError("generate.mode 'responses' needs generate.responses_from: a JSONL/CSV/Parquet file or a "
                          "datasets folder with an 'instruction' column.")
    rows = load_user_instructions(cfg.responses_from)
    records = respond(teacher, rows, cfg, run_id, base_params={"mode": "responses", "source": str(cfg.responses_from)})
    return records, {"prompts": len(rows) * cfg.responses_n, "candidates": len(rows), "kept_instructions": len(rows)}


def magpie_prefix(cfg: GenerateConfig) -> tuple[str, str]:
    """(raw completion prompt, end-of-turn stop string) for the configured chat template."""
    system_part, user_open, end = MAGPIE_TEMPLATES[cfg.magpie_template]
    system = system_part.format(system=cfg.magpie_system) if cfg.magpie_system and system_part else ""
    if cfg.magpie_template == "llama3" and not system:
        system = "<|begin_of_text|>"
    return system + user_open, end


def magpie_generate(teacher: CachedTeacher, cfg: GenerateConfig, curate_cfg: CurateConfig, run_id: str,
                    seed_instructions: list[str] = ()) -> tuple[list[Record], dict]:
    """Sample user requests from the bare user-turn opening until `target_instructions` pass the filters and
    the ROUGE-L pool, or `max_prompts` are spent. Answers come later, from the normal answer path."""
    prompt, end = magpie_prefix(cfg)
    pool = seed_pool(list(seed_instructions), curate_cfg)
    params = dict(max_tokens=cfg.magpie_max_tokens, temperature=cfg.magpie_temperature, top_p=cfg.top_p)
    records: list[Record] = []
    kept = sent = 0
    with Progress(cfg.target_instructions, "generate: magpie requests kept", key="generate-magpie") as bar:
        while kept < cfg.target_instructions and sent < cfg.max_prompts:
            k = min(cfg.prompts_per_round, cfg.max_prompts - sent)
            # Same prompt every time: the sample index makes each a distinct cached sample with its own seed.
            reqs = [Request(kind="completion", prompt=prompt, stop=[end], sample_index=sent + i, stage="generate", **params)
                    for i in range(k)]
            sent += k
            for req, reply in zip(reqs, teacher.generate(reqs)):
                prov = dict(run_id=run_id, teacher=f"{teacher.backend}:{teacher.model}", template=f"magpie:{cfg.magpie_template}",
                            template_hash=template_hash_of(prompt), raw_reply=reply.text,
                            gen_params=json.dumps({**params, "stop": [end], "mode": "magpie", "prompt_index": req.sample_index,
                                                   "seed": cfg.random_seed}))
                if not reply.ok:
                    records.append(Record(instruction="", **prov).reject("teacher_error", reply.error))
                    continue
                query = parse_magpie_query(reply.text, reply.finish_reason == "length")
                if query is None:
                    reason = "truncated_request" if reply.text.strip() else "unparseable_reply"
                    records.append(Record(instruction="", **prov).reject(reason, reply.text[:500]))
                    continue
                rec = screen(Record(instruction=query, **prov), pool, curate_cfg)
                records.append(rec)
                if rec.status == "pending":
                    kept += 1
                    bar.update(1)
    return records, {"prompts": sent, "candidates": sum(1 for r in records if r.instruction), "kept_instructions": kept}


def template_hash_of(text: str) -> str:
    """Hash of an inline prompt (magpie's prefix is built from config, not a template file)."""
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:12]
