"""Alpaca's single-shot variant: each prompt shows 3 seed tasks with their instances and asks for up to 20
instruction/input/output triples at once; no bootstrap, no separate answer step."""

from __future__ import annotations

import json
import random

from pipeline.config import CurateConfig, GenerateConfig
from pipeline.generate.instances import as_request
from pipeline.generate.parse import parse_alpaca_triples
from pipeline.generate.prompts import render, template_hash
from pipeline.generate.seeds import SeedTask
from pipeline.generate.self_instruct import screen, seed_pool
from pipeline.progress import Progress
from pipeline.records import Record
from pipeline.teachers.base import CachedTeacher

TEMPLATE = "alpaca"


def alpaca_examples(shown: list[SeedTask]) -> list[dict]:
    """Seed tasks as Alpaca shows them: instruction, first instance's input (or none) and output."""
    return [{"instruction": s.instruction, "input": s.instances[0].input if s.instances else "",
             "output": s.instances[0].output if s.instances else ""} for s in shown]


def alpaca_generate(teacher: CachedTeacher, seeds: list[SeedTask], cfg: GenerateConfig, curate_cfg: CurateConfig,
                    run_id: str) -> tuple[list[Record], dict]:
    """Prompts in batches of `prompts_per_round` until `target_instructions` triples are kept or `max_prompts` spent."""
    rng = random.Random(cfg.random_seed)
    usable = [s for s in seeds if s.instances] or seeds
    pool = seed_pool([s.instruction for s in seeds], curate_cfg)
    n = cfg.alpaca_tasks_per_prompt
    params = dict(max_tokens=cfg.alpaca_max_tokens, temperature=cfg.temperature, top_p=cfg.top_p)
    # Alpaca stopped at the number after the last wanted task, so a reply never runs past the list.
    stop = [f"\n{n + 1}.", f"{n + 1}. Instruction"] if cfg.prompt_style == "completion" else []
    records: list[Record] = []
    kept = prompts_sent = 0
    with Progress(cfg.target_instructions, "generate: alpaca triples kept", key="generate-alpaca") as bar:
        while kept < cfg.target_instructions and prompts_sent < cfg.max_prompts:
            batch = []
            for _ in range(min(cfg.prompts_per_round, cfg.max_prompts - prompts_sent)):
                shown = rng.sample(usable, min(cfg.alpaca_seed_examples, len(usable)))
                text = render(TEMPLATE, examples=alpaca_examples(shown), num_tasks=n)
                req = as_request(cfg.prompt_style, text, **params, stop=stop, sample_index=prompts_sent, stage="generate")
                batch.append((req, shown))
                prompts_sent += 1
            replies = teacher.generate([b[0] for b in batch])
            for (req, shown), reply in zip(batch, replies):
                prov = dict(run_id=run_id, teacher=f"{teacher.backend}:{teacher.model}", template=TEMPLATE,
                            template_hash=template_hash(TEMPLATE), prompt_seed_ids=[s.id for s in shown],
                            raw_reply=reply.text,
                            gen_params=json.dumps({**params, "stop": stop, "seed": cfg.random_seed, "mode": "alpaca",
                                                   "prompt_index": req.sample_index, "style": cfg.prompt_style}))
                if not reply.ok:
                    records.append(Record(instruction="", **prov).reject("teacher_error", reply.error))
                    continue
                triples = parse_alpaca_triples(reply.text, reply.finish_reason == "length")
                if not triples:
                    records.append(Record(instruction="", **prov).reject("unparseable_reply", reply.text[:500]))
                    continue
                for instruction, inp, out in triples:
                    rec = screen(Record(instruction=instruction, input=inp, output=out, finish_reason="stop", **prov),
                                 pool, curate_cfg)
                    records.append(rec)
                    if rec.status == "pending":
                        kept += 1
                        bar.update(1)
    stats = {"prompts": prompts_sent, "candidates": sum(1 for r in records if r.instruction), "kept_instructions": kept}
    return records, stats
