"""Model-based quality: score the records that passed the rules, reject the weak ones, keep the best.

Three scorers, picked by name from `curate.quality` and applied in order, each to the records still accepted:
- judge (AlpaGasus): a teacher rates (instruction, input, output) 1-5 with a short reason (prompts/judge_rating.j2),
  through the same cache, ledger and budget as generation.
- ifd (Cherry LLM, "From Quantity to Quality"): IFD = loss(answer | instruction) / loss(answer alone) under a small
  local model. Near 1 the instruction does not help predict the answer; low values are answers the model finds
  easy given the prompt. The highest IFD below 1 marks the examples worth training on.
- reward: a local reward model's score of (prompt, answer).
Then `select` keeps the top records by a combined score within leading-verb buckets, so selection by score never
wipes out a whole kind of instruction (DEITA pairs its score ranking with a diversity filter for the same reason).
Every record keeps its scores; every drop is a reject with a reason and detail.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Callable, Sequence

import numpy as np

from pipeline.config import CurateConfig
from pipeline.records import Record
from pipeline.curate import QUALITY_REASONS, SELECT_REASON
from pipeline.curate.quality.common import LOW_REASON, SCORE_FIELD, QualityContext, keep_top_fraction
from pipeline.curate.quality.ifd import ifd_scores, ifd_token_ids, score_ifd
from pipeline.curate.quality.judge import judge_rating_request, parse_rating, score_judge
from pipeline.curate.quality.manifest import plot_scores, score_distribution
from pipeline.curate.quality.reward import load_reward_model, require_reward_model, reward_scores, score_reward
from pipeline.curate.quality.select import buckets, select

__all__ = ["LOW_REASON", "QUALITY_REASONS", "SCORE_FIELD", "SCORERS", "SELECT_REASON", "QualityContext", "apply_quality",
           "buckets", "combine_scores", "ifd_scores", "ifd_token_ids", "judge_rating_request", "keep_top_fraction",
           "load_reward_model", "parse_rating", "percentile_ranks", "plot_scores", "require_reward_model",
           "reward_scores", "score_distribution", "score_ifd", "score_judge", "score_reward", "select"]

log = logging.getLogger(__name__)

SCORERS: dict[str, Callable[[list[Record], Any, QualityContext], tuple[list[Record], list[Record]]]] = {
    "judge": score_judge, "ifd": score_ifd, "reward": score_reward}


def percentile_ranks(values: Sequence[float]) -> np.ndarray:
    """Each value's rank among all as a fraction in [0, 1] (ties share their mean rank; a single value gets 1)."""
    x = np.asarray(values, dtype=float)
    if x.size <= 1:
        return np.ones_like(x)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(x.size)
    ranks[order] = np.arange(x.size, dtype=float)
    for v in np.unique(x):  # average tied ranks, so equal scores always get equal percentiles
        tied = x == v
        ranks[tied] = ranks[tied].mean()
    return ranks / (x.size - 1)


def combine_scores(records: list[Record], scorers: Sequence[str]) -> list[Record]:
    """quality_score = mean percentile rank over the scorers that ran: scales differ (1-5, a loss ratio, logits),
    ranks do not, and no one scorer dominates by its units."""
    if not records or not scorers:
        return records
    ranks = [percentile_ranks([getattr(r, SCORE_FIELD[s]) for r in records]) for s in scorers]
    combined = np.mean(ranks, axis=0)
    return [r.model_copy(update={"quality_score": round(float(q), 6)}) for r, q in zip(records, combined)]


def apply_quality(accepted: list[Record], cfg: CurateConfig, ctx: QualityContext) -> tuple[list[Record], list[Record], dict]:
    """Run `cfg.quality` in order, then `cfg.select`; returns (kept, rejected, report for the manifest)."""
    kept, rejected = list(accepted), []
    steps: list[dict[str, Any]] = []
    for sc in cfg.quality:
        before = len(kept)
        kept, dropped = SCORERS[sc.scorer](kept, sc, ctx) if kept else (kept, [])  # nothing left: load no model
        rejected += dropped
        steps.append({"scorer": sc.scorer, "scored": before, "rejected": len(dropped),
                      "reasons": dict(Counter(r.reject_reason for r in dropped)), "kept": len(kept)})
        log.info("curate quality %s: %d scored, %d rejected", sc.scorer, before, len(dropped))
    names = list(dict.fromkeys(sc.scorer for sc in cfg.quality))
    kept = combine_scores(kept, names)
    if cfg.select is not None:
        kept, dropped = select(kept, cfg.select)
        rejected += dropped
        steps.append({"scorer": "select", "by": cfg.select.by, "scored": len(kept) + len(dropped),
                      "rejected": len(dropped), "kept": len(kept)})
    return kept, rejected, {"steps": steps, "scorers": names}
