"""Scores and their uncertainty: ROUGE-L against the reference, bootstrap confidence intervals."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from rouge_score import rouge_scorer

_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F of a prediction against its reference (rouge_score, stemmed)."""
    if not reference.strip():
        return float("nan")
    return _SCORER.score(reference, prediction)["rougeL"].fmeasure


def hit_limit_share(tokens: list[int | None], limit: int) -> float | None:
    """Share of answers that used every one of `limit` new tokens: they ran into the cap instead of stopping
    (answers whose length is unknown, e.g. failed teacher calls, are left out)."""
    known = [t for t in tokens if t is not None]
    return sum(1 for t in known if t >= limit) / len(known) if known else None


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


@dataclass(frozen=True)
class PairedDifference:
    """Mean per-item difference A - B on the items both answered, with its paired bootstrap interval."""

    a: str
    b: str
    n: int
    mean: float
    lo: float
    hi: float
    sd: float
    level: float
    n_needed: int | None  # items needed to separate A from B at the observed effect and spread (80% power)

    @property
    def verdict(self) -> str:
        """'better', 'worse' or 'not distinguishable': only an interval that excludes 0 decides."""
        if self.n == 0 or self.lo != self.lo:
            return "not distinguishable"
        if self.lo > 0:
            return "better"
        if self.hi < 0:
            return "worse"
        return "not distinguishable"

    def sentence(self, metric: str = "ROUGE-L", digits: int = 3) -> str:
        """One line a reader can check: the difference, its interval and what it means."""
        diff = (f"{self.a} - {self.b} = {self.mean:+.{digits}f} {metric} "
                f"[{self.lo:+.{digits}f}, {self.hi:+.{digits}f}], paired {self.level:.0%} bootstrap over {self.n} items")
        if self.verdict == "better":
            return f"{self.a} beats {self.b}: {diff}."
        if self.verdict == "worse":
            return f"{self.a} is worse than {self.b}: {diff}."
        need = (f"; about {self.n_needed} items would be needed to separate them at this effect and spread"
                if self.n_needed else "; the observed difference is 0")
        return f"{self.a} and {self.b} are not distinguishable on {self.n} items: {diff}{need}."

    def as_dict(self) -> dict:
        return {"a": self.a, "b": self.b, "n": self.n, "mean": self.mean, "lo": self.lo, "hi": self.hi, "sd": self.sd,
                "level": self.level, "verdict": self.verdict, "n_needed": self.n_needed}


def items_needed(mean: float, sd: float, level: float = 0.95, power: float = 0.8) -> int | None:
    """Sample size of a two-sided paired test that detects `mean` with the given power (normal approximation)."""
    from statistics import NormalDist

    if not mean or mean != mean or sd != sd:
        return None
    z = NormalDist().inv_cdf(1 - (1 - level) / 2) + NormalDist().inv_cdf(power)
    return max(2, math.ceil((z * sd / abs(mean)) ** 2))


def paired_difference(a: list[float], b: list[float], names: tuple[str, str] = ("A", "B"), samples: int = 1000,
                      level: float = 0.95, seed: int = 0) -> PairedDifference:
    """Paired percentile bootstrap of mean(a_i - b_i) over the items where both scores exist.

    The same items answered by two contenders: resampling the per-item differences keeps each item's difficulty
    out of the comparison, which separate per-contender intervals do not (they can overlap while every item moves
    the same way).
    """
    if len(a) != len(b):
        raise ValueError(f"paired scores need the same items: {len(a)} vs {len(b)} values")
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    d = (x - y)[~(np.isnan(x) | np.isnan(y))]
    if d.size == 0:
        nan = float("nan")
        return PairedDifference(names[0], names[1], 0, nan, nan, nan, nan, level, None)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(samples, d.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    sd = float(d.std(ddof=1)) if d.size > 1 else 0.0
    mean = float(d.mean())
    return PairedDifference(names[0], names[1], int(d.size), mean, float(lo), float(hi), sd, level,
                            items_needed(mean, sd, level))


def paired_ratio(a: list[float], b: list[float], samples: int = 1000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float, float, int]:
    """mean(a) / mean(b) over the items both scored, with a paired percentile bootstrap interval.

    "How much of the teacher does the student keep": each resample draws the same items for both, exactly as
    `paired_difference` does (same seed, same draws), so item difficulty cancels in the ratio too.
    Returns (ratio, lo, hi, n); NaNs where b's mean is 0 or nothing is shared.
    """
    if len(a) != len(b):
        raise ValueError(f"paired scores need the same items: {len(a)} vs {len(b)} values")
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    nan = float("nan")
    if x.size == 0 or y.mean() == 0:
        return nan, nan, nan, int(x.size)
    idx = np.random.default_rng(seed).integers(0, x.size, size=(samples, x.size))
    den = y[idx].mean(axis=1)
    ratios = np.where(den > 0, x[idx].mean(axis=1) / np.where(den > 0, den, 1.0), np.nan)
    lo, hi = np.nanquantile(ratios, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(x.mean() / y.mean()), float(lo), float(hi), int(x.size)
