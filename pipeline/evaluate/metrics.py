"""Scores and their uncertainty: ROUGE-L against the reference, bootstrap confidence intervals."""

from __future__ import annotations

import numpy as np
from rouge_score import rouge_scorer

_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F of a prediction against its reference (rouge_score, stemmed)."""
    if not reference.strip():
        return float("nan")
    return _SCORER.score(reference, prediction)["rougeL"].fmeasure


def bootstrap_ci(values: list[float], samples: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Mean and percentile bootstrap interval of the mean (NaNs ignored)."""
    arr = np.asarray([v for v in values if v == v], dtype=float)
    if arr.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = arr[rng.integers(0, arr.size, size=(samples, arr.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(arr.mean()), float(lo), float(hi)
