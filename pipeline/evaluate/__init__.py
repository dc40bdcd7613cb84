"""Evaluate: teacher, raw student and distilled student answer the same held-out items, then get scored."""

from __future__ import annotations

from typing import Any

from pipeline.evaluate.evalsets import EvalItem, load_eval_set
from pipeline.evaluate.metrics import bootstrap_ci, rouge_l

__all__ = ["EvalItem", "load_eval_set", "score_contender"]


def score_contender(items: list[EvalItem], answers: list[str], samples: int = 1000) -> dict[str, Any]:
    """Per-item ROUGE-L and its mean with a bootstrap interval."""
    per_item = [rouge_l(a, it.reference) for a, it in zip(answers, items)]
    mean, lo, hi = bootstrap_ci(per_item, samples)
    return {"rouge_l": mean, "rouge_l_ci": [lo, hi], "per_item": per_item}
