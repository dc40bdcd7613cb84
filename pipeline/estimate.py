"""What a run can cost before it spends anything: the most teacher requests each stage will make, their worst-case
tokens and dollars at the configured prices, and the time at the rate measured by earlier runs of the same teacher.

The counts are upper bounds read off the loops' limits (max_prompts, target_instructions, the eval limit...); a
prompt's tokens are bounded by its UTF-8 bytes (the bound the ledger enforces, see `worst_case_tokens`), with
the parts the teacher writes itself (machine instructions, answers under judgement) counted at their max_tokens.
Cached replies make a re-run cheaper than this; the budget is still enforced request by request at run time."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig, TeacherConfig
from pipeline.teachers.base import Request
from pipeline.teachers.ledger import worst_case_tokens


@dataclass
class StageEstimate:
    stage: str
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usd: float = 0.0
    parts: list[str] = field(default_factory=list)
    seconds: float | None = None

    def add(self, label: str, count: int, proto: Request, prices: TeacherConfig, extra_prompt_tokens: int = 0) -> None:
        t_in, t_out = worst_case_tokens(proto)
        t_in += extra_prompt_tokens
        self.requests += count
        self.prompt_tokens += count * t_in
        self.completion_tokens += count * t_out
        self.usd += count * (t_in * prices.price_per_1m_input + t_out * prices.price_per_1m_output) / 1e6
        self.parts.append(f"{count} {label}")


def _chat_or_completion(style: str, text: str, max_tokens: int) -> Request:
    if style == "completion":
        return Request(kind="completion", prompt=text, max_tokens=max_tokens)
    return Request(kind="chat", messages=[{"role": "user", "content": text}], max_tokens=max_tokens)


def _generate(cfg: RunConfig) -> StageEstimate:
    from pipeline.generate.prompts import render
    from pipeline.generate.seeds import load_seed_tasks

    g, t, est = cfg.generate, cfg.teacher, StageEstimate("generate")
    seeds = load_seed_tasks(g.seed_tasks)
    longest = sorted((s.instruction for s in seeds), key=len, reverse=True)
    answer = lambda n, extra: est.add("answers", n, Request(messages=[{"role": "user", "content": render(  # noqa: E731
        "response", instruction="", input="")}], max_tokens=g.response_max_tokens), t, extra)
    # Each kept instruction takes at least min_words tokens of a reply: the most one reply can yield.
    per_reply = max(1, g.max_tokens // max(1, cfg.curate.min_words))
    if g.mode == "responses":
        from pipeline.generate.responses import load_user_instructions

        rows = load_user_instructions(g.responses_from) if g.responses_from else []
        extra = max((len((r["instruction"] + r["input"]).encode()) for r in rows), default=0)
        answer(len(rows) * g.responses_n, extra)
        if g.responses_choice == "judge-best" and g.responses_n > 1:
            est.add("best-of-n judgements", len(rows) * 2 * (g.responses_n - 1),
                    Request(messages=[{"role": "user", "content": render("judge_pairwise", instruction="", input="",
                                                                           output_a="", output_b="")}], max_tokens=16),
                    t, extra + 2 * g.response_max_tokens)
        kept = len(rows)
    elif g.mode == "alpaca":
        from pipeline.generate.alpaca import TEMPLATE, alpaca_examples

        shown = sorted(seeds, key=lambda s: len(json.dumps(alpaca_examples([s]))), reverse=True)[:g.alpaca_seed_examples]
        text = render(TEMPLATE, examples=alpaca_examples(shown), num_tasks=g.alpaca_tasks_per_prompt)
        est.add("instruction prompts", g.max_prompts, _chat_or_completion(g.prompt_style, text, g.alpaca_max_tokens), t)
        kept = g.max_prompts * g.alpaca_tasks_per_prompt
    elif g.mode == "magpie":
        est.add("user-request prompts", g.max_prompts, Request(kind="completion", prompt=g.magpie_system + " " * 64,
                                                              max_tokens=g.magpie_max_tokens), t)
        kept = min(g.max_prompts, g.target_instructions - 1 + g.prompts_per_round)
        answer(kept, g.magpie_max_tokens)
    else:
        from pipeline.generate.self_instruct import build_prompt

        _, proto = build_prompt(g.prompt_style, longest[:g.seed_examples + g.machine_examples])
        est.add("instruction prompts", g.max_prompts, proto.model_copy(update={"max_tokens": g.max_tokens}), t)
        kept = min(g.max_prompts * per_reply, g.target_instructions - 1 + g.prompts_per_round * per_reply)
        if g.instances in ("paper", "paper-or-answer"):
            from pipeline.generate.instances import classification_examples

            clf = render("is_classification", examples=classification_examples(seeds, g.classification_examples),
                         instruction="")
            est.add("classification questions", kept, _chat_or_completion(g.prompt_style, clf, 3), t, g.max_tokens)
            from pipeline.generate.instances import instance_examples

            inst = ""
            for kind, name in ((True, "instance_output_first"), (False, "instance_input_first")):
                pool = sorted((s for s in seeds if s.is_classification == kind and s.instances),
                              key=lambda s: len(s.model_dump_json()), reverse=True)[:g.instance_examples]
                text = render(name, examples=instance_examples(pool, kind, g.instance_examples, "", 0), instruction="")
                inst = max(inst, text, key=len)  # the longer of the two kinds of prompt, with the longest seeds
            est.add("instance prompts", kept, _chat_or_completion(g.prompt_style, inst, g.instance_max_tokens), t,
                    g.max_tokens)
        if g.instances != "paper":
            answer(kept, g.max_tokens)
    for _ in range(g.evol_rounds):
        est.add("evolutions", kept, Request(messages=[{"role": "user", "content": " " * 1024}], max_tokens=g.max_tokens),
                t, g.max_tokens)
        answer(kept, g.max_tokens)
    return est


def _evaluate(cfg: RunConfig) -> StageEstimate:
    from pipeline.evaluate import load_eval_set
    from pipeline.evaluate.contenders import user_message
    from pipeline.evaluate.judge import judge_request

    ev, est = cfg.evaluate, StageEstimate("evaluate")
    items = load_eval_set(ev.eval_set, ev.limit)
    for it in items:
        est.add("teacher answers", 1, Request(messages=user_message(it), max_tokens=ev.max_new_tokens), cfg.teacher)
    est.parts = [f"{len(items)} teacher answers"]
    if ev.judge is not None:
        judged = 3 + int(ev.gold_student) - int(ev.judge_baseline == "teacher")
        for it in items:
            # Both answers shown to the judge are at most max_new_tokens long (a reference is shown as it is).
            proto = judge_request(it, "", it.reference if ev.judge_baseline == "reference" else "")
            extra = ev.max_new_tokens * (1 if ev.judge_baseline == "reference" else 2)
            est.add("judge", 2 * judged, proto, ev.judge, extra)
        est.parts = [est.parts[0], f"{2 * judged * len(items)} judge calls ({judged} contenders x {len(items)} items x "
                                   f"2 orders)"]
    return est


def measured_seconds_per_request(runs_dir: Path, teacher: TeacherConfig) -> float | None:
    """Mean teacher latency per paid request over earlier runs of the same backend and model in runs_dir."""
    import yaml

    latency, requests = 0.0, 0
    for ledger in Path(runs_dir).glob("*/ledger.sqlite"):
        try:
            t = (yaml.safe_load((ledger.parent / "config.yaml").read_text()) or {}).get("teacher") or {}
            if (t.get("backend"), t.get("model")) != (teacher.backend, teacher.model):
                continue
            with sqlite3.connect(ledger, timeout=5) as c:
                row = c.execute("SELECT SUM(latency_s), SUM(requests) FROM stages WHERE stage IN ('generate', "
                                "'evaluate')").fetchone()
        except (OSError, sqlite3.Error, yaml.YAMLError):
            continue
        if row and row[1]:
            latency, requests = latency + (row[0] or 0.0), requests + row[1]
    return latency / requests if requests else None


def estimate(cfg: RunConfig, stages: str = "full") -> dict[str, Any]:
    """Per-stage upper bounds on requests, tokens and dollars, and the time at the measured rate where known."""
    parts = [_generate(cfg)] if stages != "retrain" else []
    if stages != "data":
        parts.append(_evaluate(cfg))
    rate = measured_seconds_per_request(cfg.runs_dir, cfg.teacher)
    in_flight = 1 if cfg.teacher.backend in ("llamacpp", "vllm") else cfg.teacher.max_concurrency
    for p in parts:
        p.seconds = p.requests * rate / in_flight if rate is not None else None
    return {"stages": parts, "seconds_per_request": rate, "in_flight": in_flight,
            "requests": sum(p.requests for p in parts), "usd": sum(p.usd for p in parts),
            "prompt_tokens": sum(p.prompt_tokens for p in parts),
            "completion_tokens": sum(p.completion_tokens for p in parts)}


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def format_estimate(cfg: RunConfig, est: dict[str, Any], spent_usd: float | None = None) -> str:
    """The dry run's table, with the budget beside the worst case."""
    t = cfg.teacher
    lines = [f"Dry run: no teacher call was made. Worst case for teacher {t.backend}:{t.model} at "
             f"${t.price_per_1m_input:g} / ${t.price_per_1m_output:g} per 1M prompt / completion tokens"
             + (f" (judge {cfg.evaluate.judge.backend}:{cfg.evaluate.judge.model} at its own prices)"
                if cfg.evaluate.judge else "") + ":",
             f"{'stage':<10} {'requests':>10} {'prompt tokens':>15} {'completion tokens':>18} {'dollars':>11} {'time':>10}"]
    for p in est["stages"]:
        lines.append(f"{p.stage:<10} {p.requests:>10,} {p.prompt_tokens:>15,} {p.completion_tokens:>18,} "
                     f"{'$' + format(p.usd, ',.4f'):>11} {_duration(p.seconds):>10}   ({'; '.join(p.parts)})")
    total_s = sum(p.seconds for p in est["stages"]) if est["seconds_per_request"] is not None else None
    lines.append(f"{'total':<10} {est['requests']:>10,} {est['prompt_tokens']:>15,} {est['completion_tokens']:>18,} "
                 f"{'$' + format(est['usd'], ',.4f'):>11} {_duration(total_s):>10}")
    if est["seconds_per_request"] is None:
        lines.append("time: unknown, no earlier run of this teacher in runs_dir to measure its rate.")
    else:
        lines.append(f"time: at {est['seconds_per_request']:.2f} s per request measured by earlier runs of this teacher, "
                     f"{est['in_flight']} in flight.")
    if t.budget_usd is not None:
        left = t.budget_usd - (spent_usd or 0.0)
        verdict = ("the worst case fits" if est["usd"] <= left else
                   "the worst case could cross it: the run stops cleanly when the next request would, and resumes "
                   "with a bigger budget")
        lines.append(f"budget: teacher.budget_usd=${t.budget_usd:g}" + (f", ${spent_usd:.4f} already spent by this run"
                                                                        if spent_usd else "") + f"; {verdict}.")
    lines.append("Counts are upper bounds from the config's limits; cached replies cost nothing.")
    return "\n".join(lines)
