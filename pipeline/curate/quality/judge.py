"""The judge (AlpaGasus): a teacher rates (instruction, input, output) 1-5 with a short reason, through the run's
cache, ledger and budget."""

from __future__ import annotations

import re

from pipeline.config import JudgeScorerConfig
from pipeline.errors import BudgetExceeded
from pipeline.generate.prompts import render, template_hash
from pipeline.progress import Progress
from pipeline.records import Record
from pipeline.curate.quality.common import QualityContext, keep_top_fraction

_SCORE = re.compile(r"(?:score|rating)\s*(?:\(1-5\))?\s*[:=]?\s*\**\s*([0-9]+(?:\.[0-9]+)?)\s*(?:/\s*5)?", re.IGNORECASE)
_LEADING = re.compile(r"^\W*([0-9]+(?:\.[0-9]+)?)\s*(?:/\s*5)?(?![0-9])")
_REASON = re.compile(r"reason\s*[:=]\s*(.+)", re.IGNORECASE | re.DOTALL)


def parse_rating(reply: str) -> tuple[float, str] | None:
    """(score in 1-5, short reason) from a judge's reply; None when no score in range is stated.

    Accepts "Score: 4", "Rating: 4/5", "**Score:** 4.5" or a reply that starts with the number (AlpaGasus's
    format: the score on the first line, the explanation after)."""
    text = (reply or "").strip()
    m = _SCORE.search(text) or _LEADING.match(text)
    if not m:
        return None
    score = float(m.group(1))
    if not 1.0 <= score <= 5.0:
        return None
    r = _REASON.search(text)
    reason = (r.group(1) if r else text[m.end():]).strip().strip("*").strip()
    return score, " ".join(reason.split())[:300]


def judge_rating_request(record: Record, max_tokens: int = 96):
    """The rating prompt (prompts/judge_rating.j2) as a greedy chat request, booked under the ledger's judge stage."""
    from pipeline.teachers import Request

    content = render("judge_rating", instruction=record.instruction, input=record.input, output=record.output)
    return Request(kind="chat", messages=[{"role": "user", "content": content}], max_tokens=max_tokens,
                   temperature=0.0, stage="curate_judge")


def score_judge(records: list[Record], cfg: JudgeScorerConfig, ctx: QualityContext) -> tuple[list[Record], list[Record]]:
    from pipeline.teachers import make_teacher

    judge = make_teacher(cfg.teacher or ctx.teacher, ctx.cache_path, ctx.ledger)
    try:
        with Progress(len(records), "curate: judge", key="curate-judge") as bar:
            replies = judge.generate([judge_rating_request(r, cfg.max_tokens) for r in records], on_done=bar.update)
    finally:
        judge.close()
    if any(not c.ok and (c.error or "").startswith("not attempted: budget") for c in replies):
        # Ratings already paid for are in the cache; a re-run with a larger budget pays only for the rest.
        raise BudgetExceeded("The teacher budget ran out while the judge rated records (curate.quality judge); every "
                             "rating paid for is cached. Raise teacher.budget_usd / budget_tokens and resume the run.")
    scored, rejected = [], []
    prompt_tag = f"judge_rating.j2 {template_hash('judge_rating')}"
    for r, c in zip(records, replies):
        if not c.ok:
            rejected.append(r.reject("judge_failed", f"the judge's call failed after retries: {c.error}"))
            continue
        parsed = parse_rating(c.text)
        if parsed is None:
            rejected.append(r.model_copy(update={"judge_reason": c.text.strip()[:300]}).reject(
                "judge_unparsed", f"no 1-5 score in the judge's reply ({prompt_tag}): {c.text.strip()[:200]!r}"))
            continue
        score, reason = parsed
        r = r.model_copy(update={"judge_score": score, "judge_reason": reason})
        if cfg.min_score is not None and score < cfg.min_score:
            rejected.append(r.reject("low_judge_score", f"rated {score:g} < {cfg.min_score:g}: {reason}"))
        else:
            scored.append(r)
    kept, low = keep_top_fraction(scored, "judge", cfg.keep_fraction)
    return kept, rejected + low
