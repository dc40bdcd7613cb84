"""Pairwise LLM judge, AlpacaEval-style: each contender's answer against a baseline answer (the reference or the
teacher's), asked in both orders so the judge's position bias cancels; win rate with a bootstrap interval and a
length-controlled win rate."""

from __future__ import annotations

import re
from typing import Any, Literal

import numpy as np

from pipeline.evaluate.evalsets import EvalItem
from pipeline.evaluate.metrics import bootstrap_ci, bootstrap_stat, length_controlled_win_rate
from pipeline.generate.prompts import render
from pipeline.progress import Progress
from pipeline.teachers.base import CachedTeacher, Request

Verdict = Literal["a", "b"]

# Explicit forms first ("Output (b)", "(b)", "[[B]]", "Output B"); a bare "a" is an article, so it only
# counts when it is the whole reply.
_EXPLICIT = re.compile(r"output\s*\(?\s*([ab])\s*\)?(?![a-z])|\(\s*([ab])\s*\)|\[\[\s*([ab])\s*\]\]", re.IGNORECASE)
_BARE = re.compile(r"^\W*([ab])\W*$", re.IGNORECASE)


def parse_verdict(reply: str) -> Verdict | None:
    """'a' or 'b' from a judge's reply (the first explicit mention wins); None when it names neither."""
    m = _EXPLICIT.search(reply or "")
    if m:
        return next(g for g in m.groups() if g).lower()  # type: ignore[return-value]
    m = _BARE.match((reply or "").strip())
    return m.group(1).lower() if m else None  # type: ignore[return-value]


def judge_request(item: EvalItem, output_a: str, output_b: str, max_tokens: int = 16) -> Request:
    """The judge prompt (prompts/judge_pairwise.j2) as a greedy chat request."""
    content = render("judge_pairwise", instruction=item.instruction, input=item.input, output_a=output_a, output_b=output_b)
    return Request(kind="chat", messages=[{"role": "user", "content": content}], max_tokens=max_tokens,
                   temperature=0.0, stage="judge")


def item_preference(first: Verdict | None, swapped: Verdict | None) -> float:
    """The contender's score on one item from both orders: contender shown as (a), then as (b).

    A win counts 1, a loss 0 and an unparseable verdict 0.5 per order; the item scores the mean of the two.
    """
    s1 = {"a": 1.0, "b": 0.0, None: 0.5}[first]
    s2 = {"a": 0.0, "b": 1.0, None: 0.5}[swapped]
    return (s1 + s2) / 2


def win_rate(prefs: list[float], len_contender: list[int], len_baseline: list[int], samples: int = 1000) -> dict[str, Any]:
    """Win rate and length-controlled win rate, each with a 95% bootstrap interval over items."""
    y = np.asarray(prefs, dtype=float)
    wr, lo, hi = bootstrap_ci(list(y), samples)
    lc_c, lc_b = np.asarray(len_contender), np.asarray(len_baseline)
    lc = length_controlled_win_rate(list(y), list(lc_c), list(lc_b))
    lc_lo, lc_hi = bootstrap_stat(len(y), lambda idx: length_controlled_win_rate(list(y[idx]), list(lc_c[idx]), list(lc_b[idx])),
                                  samples=min(samples, 300))
    return {"win_rate": wr, "win_rate_ci": [lo, hi], "lc_win_rate": lc, "lc_win_rate_ci": [lc_lo, lc_hi]}


def judge_pairs(judge: CachedTeacher, items: list[EvalItem], answers: list[str], baseline: list[str],
                label: str = "contender", samples: int = 1000) -> dict[str, Any]:
    """Ask the judge about every (answer, baseline) pair in both orders; items without a baseline are skipped."""
    idx = [i for i, b in enumerate(baseline) if b.strip()]
    requests = []
    for i in idx:
        requests.append(judge_request(items[i], answers[i], baseline[i]))  # contender as (a)
        requests.append(judge_request(items[i], baseline[i], answers[i]))  # contender as (b)
    with Progress(len(requests), f"judge: {label}", key=f"judge-{label.replace(' ', '-').replace('_', '-')}") as bar:
        replies = judge.generate(requests, on_done=bar.update)
    verdicts = [parse_verdict(r.text) if r.ok else None for r in replies]
    prefs: list[float] = [float("nan")] * len(items)
    for k, i in enumerate(idx):
        prefs[i] = item_preference(verdicts[2 * k], verdicts[2 * k + 1])
    first_wins = sum(1 for v in verdicts if v == "a")
    scored = [prefs[i] for i in idx]
    out = win_rate(scored, [len(answers[i]) for i in idx], [len(baseline[i]) for i in idx], samples)
    return {**out, "per_item": prefs, "judged_items": len(idx), "judge_unparsed": sum(1 for v in verdicts if v is None),
            "judge_errors": sum(1 for r in replies if not r.ok),
            # How often the judge picked whichever answer came first: 0.5 is unbiased, 1.0 is pure position.
            "judge_first_position_rate": first_wins / max(1, sum(1 for v in verdicts if v))}
