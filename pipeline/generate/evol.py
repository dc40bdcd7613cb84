"""Evol-Instruct (WizardLM): rewrite kept instructions to be deeper (constraints, deepening, concretising,
more reasoning steps) or broader (a new, rarer task in the same domain), answer them, and eliminate failed
evolutions by the paper's rules. Works on any mode's kept records, for `evol_rounds` rounds."""

from __future__ import annotations

import json
import random
import re

from pipeline.config import CurateConfig, GenerateConfig
from pipeline.curate.fastdedupe import rouge_l
from pipeline.generate.prompts import render, template_hash
from pipeline.generate.self_instruct import answer_instructions, screen, seed_pool
from pipeline.records import Record
from pipeline.teachers.base import CachedTeacher, Request

DEEPEN = {
    "constraints": "Add one more constraint or requirement to the prompt.",
    "deepening": "If the prompt asks about a specific issue, ask about it in more depth and breadth.",
    "concretizing": "Replace a general concept in the prompt with a more specific one.",
    "reasoning": "If the prompt can be solved with a few simple steps, rewrite it to explicitly ask for several steps of reasoning.",
}
_LEAKS = ("given prompt", "rewritten prompt", "created prompt", "#rewritten", "#created", "#given")
_STOP_WORDS = {"a", "an", "the", "and", "or", "of", "to", "in", "is", "it", "i", "you", "that", "this", "for", "on"}


def parse_evolved(reply: str) -> str:
    """The rewritten prompt: the reply without a repeated '#Rewritten Prompt#:' header or wrapping quotes."""
    text = re.sub(r"^\s*#?\s*(Rewritten|Created) Prompt\s*#?\s*:?", "", reply.strip(), flags=re.IGNORECASE)
    return text.strip().strip('"').strip()


def elimination_reason(original: str, evolved: str, answer: str | None = None) -> str | None:
    """WizardLM's rules for a failed evolution; None when the evolution is kept.

    1. no information gain: the rewrite is (nearly) the original (ROUGE-L > 0.9 here, where the paper asked ChatGPT);
    2. the answer is an apology ('sorry') and short (< 80 words): the evolved task is too hard or ill-posed;
    3. the answer is only punctuation and stop words;
    4. the rewrite copies words from the evolving prompt ('given prompt', 'rewritten prompt').
    """
    if not evolved:
        return "evol_empty"
    if any(leak in evolved.lower() for leak in _LEAKS):
        return "evol_copied_prompt"
    if rouge_l(original, evolved) > 0.9:
        return "evol_no_gain"
    if answer is not None:
        words = answer.split()
        if "sorry" in answer.lower() and len(words) < 80:
            return "evol_answer_apology"
        if all(w.strip(".,;:!?\"'()[]-").lower() in _STOP_WORDS | {""} for w in words):
            return "evol_answer_empty"
    return None


def evolve(teacher: CachedTeacher, records: list[Record], cfg: GenerateConfig, curate_cfg: CurateConfig,
           run_id: str, seed_instructions: list[str] = ()) -> tuple[list[Record], dict]:
    """Run `evol_rounds` rounds over the kept records; returns all records (originals, evolutions, rejects)."""
    rng = random.Random(cfg.random_seed + 1)
    kept = [r for r in records if r.status == "pending"]
    pool = seed_pool(list(seed_instructions) + [r.instruction for r in kept], curate_cfg)
    out, evolved_total = list(records), 0
    current = kept
    for round_no in range(1, cfg.evol_rounds + 1):
        plans = []
        for r in current:
            method = rng.choice([*DEEPEN, "breadth"])
            name = "evol_broaden" if method == "breadth" else "evol_deepen"
            prompt = f"{r.instruction}\n\n{r.input}".strip()
            text = render(name, instruction=prompt, method=DEEPEN.get(method, ""))
            plans.append((r, method, name, Request(kind="chat", messages=[{"role": "user", "content": text}],
                                                  max_tokens=cfg.max_tokens, temperature=cfg.temperature,
                                                  top_p=cfg.top_p, stage="generate")))
        replies = teacher.generate([p[3] for p in plans])
        candidates = []
        for (parent, method, name, req), reply in zip(plans, replies):
            params = {"mode": "evol", "round": round_no, "method": method, "parent_id": parent.id,
                      "parent_instruction": parent.instruction, "params": req.params(), "seed": cfg.random_seed}
            rec = Record(instruction=parse_evolved(reply.text) if reply.ok else "", run_id=run_id, raw_reply=reply.text,
                         teacher=f"{teacher.backend}:{teacher.model}", template=name, template_hash=template_hash(name),
                         prompt_seed_ids=parent.prompt_seed_ids, gen_params=json.dumps(params))
            reason = "teacher_error" if not reply.ok else elimination_reason(parent.instruction, rec.instruction)
            if reason:
                out.append(rec.reject(reason, reply.error or reply.text[:500]))
                continue
            rec = screen(rec, pool, curate_cfg)
            (candidates if rec.status == "pending" else out).append(rec)
        answered = answer_instructions(teacher, candidates, cfg)
        current = []
        for rec in answered:
            reason = None if rec.status == "rejected" else elimination_reason(
                json.loads(rec.gen_params)["parent_instruction"], rec.instruction, rec.output)
            out.append(rec.reject(reason) if reason else rec)
            if not reason and rec.status == "pending":
                current.append(rec)
                evolved_total += 1
    return out, {"evolved_kept": evolved_total}
