"""Drop training records that overlap the evaluation sets, so benchmark numbers stay honest."""

from __future__ import annotations

from collections import Counter

from pipeline.curate.fastdedupe import rouge_token_list
from pipeline.curate.filters import normalise


def _ngrams(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


class EvalOverlap:
    """n-gram index of the evaluation items' instruction+input."""

    def __init__(self, eval_texts: list[str], n: int = 8, threshold: float = 0.5):
        self.n, self.threshold = n, threshold
        self.texts = list(eval_texts)
        self.exact = {normalise(t): i for i, t in enumerate(self.texts)}
        self.grams: dict[tuple[str, ...], int] = {}  # n-gram -> first eval item that has it
        for i, t in enumerate(self.texts):
            for g in _ngrams(rouge_token_list(t), n):
                self.grams.setdefault(g, i)

    def overlap(self, text: str) -> float:
        """Fraction of the text's n-grams found in an eval item (1.0 for an exact match)."""
        if normalise(text) in self.exact:
            return 1.0
        grams = _ngrams(rouge_token_list(text), self.n)
        if not grams:
            return 0.0
        return sum(g in self.grams for g in grams) / len(grams)

    def nearest(self, text: str) -> str:
        """The eval item sharing the most n-grams with `text` (for the contamination report)."""
        hit = self.exact.get(normalise(text))
        if hit is None:
            votes = Counter(self.grams[g] for g in _ngrams(rouge_token_list(text), self.n) if g in self.grams)
            if not votes:
                return ""
            hit = votes.most_common(1)[0][0]
        return self.texts[hit]

    def is_contaminated(self, text: str) -> bool:
        return self.overlap(text) >= self.threshold

    def reject(self, record):
        """The record rejected as contaminated (with its match), or None when it is clean. One rule for curated
        data and for the gold training data alike."""
        text = record.instruction + " " + record.input
        ov = self.overlap(text)
        if ov < self.threshold:
            return None
        return record.reject("contaminated", f"{ov:.2f} of its {self.n}-grams are in an eval item: {self.nearest(text)}")
