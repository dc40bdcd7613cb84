"""Alpaca's and Self-Instruct's filters: each a small function returning a reject reason or None."""

from __future__ import annotations

import re
import string
from typing import Callable

from pipeline.config import CurateConfig
from pipeline.records import Record

REFUSAL_MARKERS = ("as an ai language model", "as a language model", "i'm sorry, but i cannot", "i cannot fulfill",
                   "i am unable to", "i'm unable to", "i can't assist", "i cannot assist")

Filter = Callable[[Record, CurateConfig], "str | None"]


def too_short(r: Record, cfg: CurateConfig) -> str | None:
    return "too_short" if len(r.instruction.split()) < cfg.min_words else None


def too_long(r: Record, cfg: CurateConfig) -> str | None:
    return "too_long" if len(r.instruction.split()) > cfg.max_words else None


def blacklisted(r: Record, cfg: CurateConfig) -> str | None:
    text = r.instruction.lower()
    for word in cfg.blacklist:
        if re.search(rf"\b{re.escape(word.lower())}\b", text):
            return "blacklisted_word"
    return None


def write_a_program(r: Record, cfg: CurateConfig) -> str | None:
    # Alpaca: models answer these with code they cannot run or explain; the seed set has few.
    return "write_a_program" if r.instruction.startswith("Write a program") else None


def starts_with_punctuation(r: Record, cfg: CurateConfig) -> str | None:
    return "starts_with_punctuation" if r.instruction[:1] in string.punctuation else None


def starts_non_english(r: Record, cfg: CurateConfig) -> str | None:
    return "starts_non_ascii" if r.instruction[:1] and not r.instruction[0].isascii() else None


def empty_output(r: Record, cfg: CurateConfig) -> str | None:
    return "empty_output" if not r.output.strip() else None


def output_equals_input(r: Record, cfg: CurateConfig) -> str | None:
    return "output_equals_input" if r.input.strip() and r.input.strip() == r.output.strip() else None


def trailing_colon(r: Record, cfg: CurateConfig) -> str | None:
    # Self-Instruct: an instance ending in ':' is an unfinished list or a header with nothing under it.
    return "trailing_colon" if r.output.rstrip().endswith(":") else None


def truncated(r: Record, cfg: CurateConfig) -> str | None:
    return "truncated_reply" if r.finish_reason == "length" else None


def refusal(r: Record, cfg: CurateConfig) -> str | None:
    low = r.output.lower()
    return "refusal" if any(m in low for m in REFUSAL_MARKERS) else None


INSTRUCTION_FILTERS: list[Filter] = [too_short, too_long, blacklisted, write_a_program, starts_with_punctuation,
                                     starts_non_english]
OUTPUT_FILTERS: list[Filter] = [empty_output, output_equals_input, trailing_colon, truncated, refusal]


def first_failure(r: Record, cfg: CurateConfig, filters: list[Filter]) -> str | None:
    """The first filter's reject reason, or None when the record passes them all."""
    for f in filters:
        reason = f(r, cfg)
        if reason:
            return reason
    return None


def normalise(text: str) -> str:
    """Key for exact duplicates: case, whitespace and punctuation do not make a new example."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())
