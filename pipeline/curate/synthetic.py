"""Synthetic instruction sets with planted near-duplicates, for the exactness test and bench/dedupe.py."""

from __future__ import annotations

import json
import random
import string
from typing import Sequence

from pipeline import DATA_DIR

_FILLERS = ["the", "a", "please", "also", "briefly", "now", "new", "simple", "short", "following"]


def alpaca_records() -> list[dict]:
    """The 5,000 Alpaca records this repository ships (data/alpaca_dev.jsonl + alpaca_gold_train.jsonl), in
    their original order (`alpaca-<k>` ids), so tests and benchmarks run from a fresh clone."""
    rows = [json.loads(line) for name in ("alpaca_dev.jsonl", "alpaca_gold_train.jsonl")
            for line in (DATA_DIR / name).read_text(encoding="utf-8").splitlines() if line.strip()]
    return sorted(rows, key=lambda r: int(r["id"].rsplit("-", 1)[1]))


def near_duplicate_of(text: str, rng: random.Random) -> str:
    """One to three small edits a generator makes when it repeats itself: swapped, dropped or added
    words, a change of case, added or removed punctuation."""
    words = text.split()
    for _ in range(rng.randint(1, 3)):
        edit = rng.choice(("swap", "delete", "insert", "case", "punct"))
        if edit == "swap" and len(words) > 2:
            i = rng.randrange(len(words) - 1)
            words[i], words[i + 1] = words[i + 1], words[i]
        elif edit == "delete" and len(words) > 3:
            del words[rng.randrange(len(words))]
        elif edit == "insert":
            words.insert(rng.randrange(len(words) + 1), rng.choice(_FILLERS + words))
        elif edit == "case" and words:
            i = rng.randrange(len(words))
            words[i] = words[i].upper() if rng.random() < 0.5 else words[i].capitalize()
        elif words:
            i = rng.randrange(len(words))
            stripped = words[i].rstrip(string.punctuation)
            words[i] = stripped if stripped != words[i] and stripped else words[i] + rng.choice(",.;!?")
    return " ".join(words)


def mutate(text: str, rng: random.Random, corpus_words: Sequence[str], replace_prob: float) -> str:
    """A new instruction shaped like `text`: each word replaced with probability p by a corpus word."""
    return " ".join(rng.choice(corpus_words) if rng.random() < replace_prob else w for w in text.split())


def synthetic_instructions(base: Sequence[str], n: int, dup_fraction: float = 0.2, seed: int = 0,
                           corpus_words: Sequence[str] = (), replace_prob: float = 0.4) -> tuple[list[str], list[int]]:
    """n instructions: fresh ones (the base texts, then mutations of them once the base runs out) with
    about `dup_fraction` planted near-duplicates of earlier ones. Returns (texts, planted positions)."""
    rng = random.Random(seed)
    words = list(corpus_words) or [w for t in base for w in t.split()]
    order = list(base)
    rng.shuffle(order)
    texts: list[str] = []
    planted: list[int] = []
    fresh = 0
    for i in range(n):
        if texts and rng.random() < dup_fraction:
            texts.append(near_duplicate_of(texts[rng.randrange(len(texts))], rng))
            planted.append(i)
        else:
            src = order[fresh % len(order)]
            texts.append(src if fresh < len(order) else mutate(src, rng, words, replace_prob))
            fresh += 1
    return texts, planted
