"""Drop training records that overlap the evaluation sets, so benchmark numbers stay honest."""

from __future__ import annotations

from pipeline.curate.dedupe import rouge_tokens
from pipeline.curate.filters import normalise


def _ngrams(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


class EvalOverlap:
    """n-gram index of the evaluation items' instruction+input."""

    def __init__(self, eval_texts: list[str], n: int = 8, threshold: float = 0.5):
        self.n, self.threshold = n, threshold
        self.exact = {normalise(t) for t in eval_texts}
        self.grams: set[tuple[str, ...]] = set()
        for t in eval_texts:
            self.grams |= _ngrams(rouge_tokens(t), n)

    def overlap(self, text: str) -> float:
        """Fraction of the text's n-grams found in an eval item (1.0 for an exact match)."""
        if normalise(text) in self.exact:
            return 1.0
        grams = _ngrams(rouge_tokens(text), self.n)
        if not grams:
            return 0.0
        return len(grams & self.grams) / len(grams)

    def is_contaminated(self, text: str) -> bool:
        return self.overlap(text) >= self.threshold
