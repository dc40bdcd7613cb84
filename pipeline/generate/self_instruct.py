"""Self-Instruct's bootstrap loop: prompts mix human seeds with kept machine instructions, and every
kept instruction joins the pool that later prompts draw from."""

from __future__ import annotations

import json
import random

from pipeline.config import CurateConfig, GenerateConfig
from pipeline.curate.fastdedupe import NearDuplicateIndex
from pipeline.curate.filters import INSTRUCTION_FILTERS, first_failure
from pipeline.generate.parse import parse_completion_tasks, parse_numbered_list
from pipeline.generate.prompts import render, template_hash
from pipeline.generate.seeds import SeedTask
from pipeline.progress import Progress
from pipeline.records import Record
from pipeline.teachers.base import CachedTeacher, Request

NEW_PER_CHAT_PROMPT = 10


def build_prompt(style: str, examples: list[str]) -> tuple[str, Request]:
    """Render the instruction-generation prompt; returns (template name, request without params)."""
    if style == "completion":
        name = "self_instruct_completion"
        return name, Request(kind="completion", prompt=render(name, examples=examples))
    name = "self_instruct_chat"
    text = render(name, examples=examples, num_new=NEW_PER_CHAT_PROMPT)
    return name, Request(kind="chat", messages=[{"role": "user", "content": text}])


def parse_reply(style: str, text: str, n_examples: int, truncated: bool) -> list[str]:
    if style == "completion":
        return parse_completion_tasks(text, n_examples + 1, truncated)
    return parse_numbered_list(text, truncated)


def screen(rec: Record, pool: NearDuplicateIndex, curate_cfg: CurateConfig) -> Record:
    """Alpaca's instruction filters, then ROUGE-L against the pool; a kept instruction joins the pool."""
    reason = first_failure(rec, curate_cfg, INSTRUCTION_FILTERS)
    if reason:
        return rec.reject(reason)
    verdict = pool.check_and_add(rec.instruction)
    if not verdict.kept:
        return rec.reject("near_duplicate", f"ROUGE-L {verdict.score:.3f} to: {pool.texts[verdict.nearest]}")
    return rec


def seed_pool(seeds: list[str], curate_cfg: CurateConfig) -> NearDuplicateIndex:
    """The near-duplicate index a generation loop starts from: the seed instructions count as kept."""
    pool = NearDuplicateIndex(curate_cfg.rouge_threshold, vocabulary_hint=seeds)
    for s in seeds:
        pool.add(s)
    return pool


def bootstrap_instructions(teacher: CachedTeacher, seeds: list[SeedTask], cfg: GenerateConfig,
                           curate_cfg: CurateConfig, run_id: str) -> tuple[list[Record], dict]:
    """Run the loop until `target_instructions` new ones are kept or `max_prompts` are spent.

    Returns every candidate (kept ones `pending`, the rest `rejected` with reason) and loop stats.
    Deterministic for a fixed seed and teacher cache, so a resumed run rebuilds the identical pool.
    """
    rng = random.Random(cfg.random_seed)
    seed_texts = [s.instruction for s in seeds]
    pool = seed_pool(seed_texts, curate_cfg)
    machine: list[str] = []
    records: list[Record] = []
    prompts_sent = 0
    params = dict(max_tokens=cfg.max_tokens, temperature=cfg.temperature, top_p=cfg.top_p)
    stop = ["\n\n"] if cfg.prompt_style == "completion" else []

    with Progress(cfg.target_instructions, "generate: instructions kept", key="generate-instructions") as bar:
        while len(machine) < cfg.target_instructions and prompts_sent < cfg.max_prompts:
            batch = []
            for _ in range(min(cfg.prompts_per_round, cfg.max_prompts - prompts_sent)):
                shown_seeds = rng.sample(seeds, min(cfg.seed_examples, len(seeds)))
                shown_machine = rng.sample(machine, min(cfg.machine_examples, len(machine)))
                # Fill the slots machine instructions cannot fill yet with more seeds, as the paper did.
                extra = cfg.machine_examples - len(shown_machine)
                if extra > 0:
                    rest = [s for s in seeds if s not in shown_seeds]
                    shown_seeds += rng.sample(rest, min(extra, len(rest)))
                examples = [s.instruction for s in shown_seeds] + shown_machine
                name, req = build_prompt(cfg.prompt_style, examples)
                req = req.model_copy(update={**params, "stop": stop, "sample_index": prompts_sent, "stage": "generate"})
                batch.append((name, req, shown_seeds, shown_machine, examples))
                prompts_sent += 1
            replies = teacher.generate([b[1] for b in batch])
            for (name, req, shown_seeds, shown_machine, examples), reply in zip(batch, replies):
                prov = dict(run_id=run_id, teacher=f"{teacher.backend}:{teacher.model}", template=name,
                            template_hash=template_hash(name), prompt_seed_ids=[s.id for s in shown_seeds],
                            prompt_machine_instructions=shown_machine, raw_reply=reply.text,
                            gen_params=json.dumps({**params, "stop": stop, "seed": cfg.random_seed, "prompt_index": req.sample_index,
                                                   "mode": "self-instruct"}),
                            finish_reason="")
                if not reply.ok:
                    records.append(Record(instruction="", **prov).reject("teacher_error", reply.error))
                    continue
                items = parse_reply(cfg.prompt_style, reply.text, len(examples), reply.finish_reason == "length")
                if not items:
                    records.append(Record(instruction="", **prov).reject("unparseable_reply", reply.text[:500]))
                    continue
                for text in items:
                    rec = screen(Record(instruction=text, **prov), pool, curate_cfg)
                    records.append(rec)
                    if rec.status == "pending":
                        machine.append(text)
                        bar.update(1)
    stats = {"prompts": prompts_sent, "candidates": sum(1 for r in records if r.instruction),
             "kept_instructions": len(machine)}
    return records, stats


def answer_instructions(teacher: CachedTeacher, records: list[Record], cfg: GenerateConfig) -> list[Record]:
    """Ask the teacher to answer each pending instruction; failures become rejects with the error."""
    pending = [r for r in records if r.status == "pending" and not r.output]
    requests = [Request(kind="chat", messages=[{"role": "user", "content": render("response", instruction=r.instruction, input=r.input)}],
                        max_tokens=cfg.response_max_tokens, temperature=cfg.response_temperature,
                        logprobs=cfg.response_logprobs, stage="generate")
                for r in pending]
    with Progress(len(requests), "generate: answers", key="generate-answers") as bar:
        replies = teacher.generate(requests, on_done=bar.update)
    answered = {}
    for r, req, reply in zip(pending, requests, replies):
        if not reply.ok:
            answered[id(r)] = r.reject("teacher_error", reply.error)
        else:
            params = {**json.loads(r.gen_params or "{}"), "answer_template": "response",
                      "answer_template_hash": template_hash("response"), "answer_params": req.params()}
            answered[id(r)] = Record(**{**r.model_dump(exclude={"id"}), "output": reply.text.strip(),
                                        "finish_reason": reply.finish_reason, "gen_params": json.dumps(params),
                                        "teacher_logprobs": reply.logprobs})
    return [answered.get(id(r), r) for r in records]
