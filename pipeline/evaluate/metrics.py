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


def bootstrap_stat(n: int, stat, samples: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of any statistic of n items; `stat` takes an index array."""
    if n == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    values = np.array([stat(rng.integers(0, n, size=n)) for _ in range(samples)], dtype=float)
    lo, hi = np.nanquantile(values, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def fit_logistic(x: np.ndarray, y: np.ndarray, ridge: float = 1e-3, iters: int = 50) -> np.ndarray:
    """Logistic regression of soft labels y in [0, 1] on features x (intercept added), by Newton's method.

    A small ridge keeps the fit finite when one side wins every time (the intercept is not penalised).
    """
    X = np.column_stack([np.ones(len(y)), np.asarray(x, dtype=float).reshape(len(y), -1)])
    y = np.asarray(y, dtype=float)
    beta = np.zeros(X.shape[1])
    penalty = np.full(X.shape[1], ridge)
    penalty[0] = ridge * 1e-3
    for _ in range(iters):
        p = _sigmoid(X @ beta)
        grad = X.T @ (p - y) + penalty * beta
        hess = (X * (p * (1 - p))[:, None]).T @ X + np.diag(penalty)
        step = np.linalg.solve(hess, grad)
        beta -= step
        if np.max(np.abs(step)) < 1e-10:
            break
    return beta


def length_controlled_win_rate(prefs: list[float], len_contender: list[int], len_baseline: list[int]) -> float:
    """AlpacaEval 2's idea: fit P(win) = sigmoid(b0 + b1·tanh(Δlen / sd(Δlen))) and report sigmoid(b0),
    the win rate predicted when both answers have the same length.

    (AlpacaEval 2 also fits a per-instruction difficulty term across many models; with one contender
    and one baseline that term is not identifiable, so it is left out.)
    """
    y = np.asarray(prefs, dtype=float)
    keep = ~np.isnan(y)
    if not keep.any():
        return float("nan")
    diff = (np.asarray(len_contender, dtype=float) - np.asarray(len_baseline, dtype=float))[keep]
    sd = diff.std()
    x = np.tanh(diff / sd) if sd > 0 else np.zeros_like(diff)
    return float(_sigmoid(fit_logistic(x, y[keep])[0]))
