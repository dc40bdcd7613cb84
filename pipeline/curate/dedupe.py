"""Alpaca's near-duplicate rule, exactly: drop an instruction whose ROUGE-L F against any already-kept
instruction is above the threshold. Alpaca scores every pair (quadratic); we only score pairs that can
pass, found through a prefix-filter index, and take the same decisions bit for bit.

Why the index is exact: ROUGE-L F = 2·LCS/(|a|+|b|) and LCS <= the tokens two texts share, so F > t needs
more than |a|·t/(2-t) shared tokens. With tokens in one global order (rarest first), two texts sharing
that many must share an element among their first |a| - o(a) + 1 tokens (the prefix filter lemma).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence

from rouge_score import rouge_scorer, scoring

_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_tokens(text: str) -> list[str]:
    """rouge_score's own tokenizer (lowercase, alphanumeric runs), as Alpaca used it."""
    return _SCORER._tokenizer.tokenize(text)


def lcs_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common subsequence (two-row dynamic programme)."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else (prev[j + 1] if prev[j + 1] > cur[j] else cur[j]))
        prev = cur
    return prev[-1]


def rouge_l_f(lcs: int, len_target: int, len_prediction: int) -> float:
    """F exactly as rouge_score computes it (same float operations, so the same rounding)."""
    if len_target == 0 or len_prediction == 0:
        return 0.0
    precision = lcs / len_prediction
    recall = lcs / len_target
    return scoring.fmeasure(precision, recall)


@dataclass
class Verdict:
    kept: bool
    nearest: int | None  # index (into the kept pool, seeds first) of the best-scoring kept text
    score: float


class NearDuplicateIndex:
    """Kept instructions, indexed for the ROUGE-L > threshold test; add texts in order with `check_and_add`."""

    def __init__(self, threshold: float = 0.7, vocabulary_hint: Iterable[str] = ()):
        self.threshold = threshold
        # Slightly loose bound so float rounding can never hide a true candidate.
        self._ratio = (threshold - 1e-9) / (2 - threshold + 1e-9)
        self._token_ids: dict[str, int] = {}
        self._df: Counter[int] = Counter()
        for text in vocabulary_hint:
            self._df.update(set(self._ids(rouge_tokens(text), grow=True)))
        self.texts: list[str] = []
        self._seqs: list[list[int]] = []
        self._postings: dict[tuple[int, int], list[int]] = {}

    def _ids(self, tokens: list[str], grow: bool) -> list[int]:
        ids = []
        for t in tokens:
            i = self._token_ids.get(t)
            if i is None:
                i = len(self._token_ids)
                self._token_ids[t] = i
            ids.append(i)
        return ids

    def _prefix(self, seq: list[int]) -> list[tuple[int, int]]:
        # Elements are (token, k-th occurrence) so repeated tokens count as shared tokens do in an LCS.
        seen: Counter[int] = Counter()
        elems = []
        for t in seq:
            seen[t] += 1
            elems.append((t, seen[t]))
        # Rarest first; ties broken by token id so the order is global and fixed.
        elems.sort(key=lambda e: (self._df.get(e[0], 0), e[0], e[1]))
        need = math.floor(len(seq) * self._ratio) + 1
        return elems[: max(1, len(seq) - need + 1)]

    def check(self, text: str) -> tuple[Verdict, list[int], list[tuple[int, int]]]:
        """Score `text` against every kept text that could exceed the threshold."""
        seq = self._ids(rouge_tokens(text), grow=True)
        if not seq:
            return Verdict(True, None, 0.0), seq, []
        prefix = self._prefix(seq)
        n = len(seq)
        lo, hi = n * self._ratio, n / self._ratio if self._ratio > 0 else math.inf
        candidates: set[int] = set()
        for e in prefix:
            candidates.update(self._postings.get(e, ()))
        best, best_score = None, 0.0
        for c in sorted(candidates):
            other = self._seqs[c]
            if not (lo < len(other) < hi):
                continue
            score = rouge_l_f(lcs_length(seq, other), n, len(other))
            if score > best_score:
                best, best_score = c, score
        return Verdict(best_score <= self.threshold, best, best_score), seq, prefix

    def add(self, text: str, seq: list[int] | None = None, prefix: list[tuple[int, int]] | None = None) -> int:
        """Add a kept text; returns its index in the pool."""
        if seq is None:
            seq = self._ids(rouge_tokens(text), grow=True)
            prefix = self._prefix(seq) if seq else []
        idx = len(self.texts)
        self.texts.append(text)
        self._seqs.append(seq)
        for e in prefix or []:
            self._postings.setdefault(e, []).append(idx)
        return idx

    def check_and_add(self, text: str) -> Verdict:
        """Alpaca's step: keep (and add) the text unless a kept text scores above the threshold."""
        verdict, seq, prefix = self.check(text)
        if verdict.kept:
            self.add(text, seq, prefix)
        return verdict


def dedupe_instructions(instructions: list[str], seeds: list[str] = (), threshold: float = 0.7) -> list[Verdict]:
    """Alpaca's decisions for `instructions` in order, seeds counted as already kept."""
    index = NearDuplicateIndex(threshold, vocabulary_hint=list(seeds) + list(instructions))
    for s in seeds:
        index.add(s)
    return [index.check_and_add(text) for text in instructions]
