"""Diversity statistics of a dataset version, as Self-Instruct reported them (its section 3 / figures 3-4):
each instruction's ROUGE-L to its most similar seed, length distributions, the most common leading verbs."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.curate.fastdedupe import max_rouge_to, rouge_token_list
from pipeline.records import Record

ROUGE_BINS = [round(0.1 * i, 1) for i in range(11)]
LENGTH_BINS = [0, 5, 10, 20, 40, 80, 160, 320, 640, 100000]


def _lengths(texts: Sequence[str]) -> dict[str, Any]:
    n = np.array([len(t.split()) for t in texts], dtype=np.int64)
    if n.size == 0:
        return {"count": 0}
    hist, _ = np.histogram(n, bins=LENGTH_BINS)
    return {"count": int(n.size), "mean": round(float(n.mean()), 2), "median": float(np.median(n)),
            "p90": float(np.percentile(n, 90)), "max": int(n.max()), "bins_words": LENGTH_BINS,
            "histogram": hist.tolist()}


def leading_verb(instruction: str) -> str:
    """The first word, lowercased: instructions are imperatives ("Write", "Classify"), so this is the verb."""
    tokens = rouge_token_list(instruction)
    return tokens[0] if tokens else ""


def diversity_stats(records: Sequence[Record], seed_instructions: Sequence[str], top_verbs: int = 20) -> dict[str, Any]:
    """Numbers for the manifest: ROUGE-L-to-nearest-seed histogram, word lengths, top leading verbs."""
    instructions = [r.instruction for r in records]
    stats: dict[str, Any] = {"records": len(records)}
    if seed_instructions and instructions:
        best = max_rouge_to(instructions, seed_instructions)
        hist, _ = np.histogram(best, bins=ROUGE_BINS)
        stats["rouge_l_to_nearest_seed"] = {"bins": ROUGE_BINS, "histogram": hist.tolist(),
                                            "mean": round(float(best.mean()), 4),
                                            "median": round(float(np.median(best)), 4)}
    stats["lengths_words"] = {"instruction": _lengths(instructions),
                              "input": _lengths([r.input for r in records if r.input.strip()]),
                              "output": _lengths([r.output for r in records])}
    stats["inputs_nonempty"] = sum(bool(r.input.strip()) for r in records)
    verbs = Counter(v for v in map(leading_verb, instructions) if v)
    stats["leading_verbs"] = verbs.most_common(top_verbs)
    stats["distinct_leading_verbs"] = len(verbs)
    return stats


def plot_stats(stats: dict[str, Any], folder: Path) -> list[Path]:
    """PNG plots of `diversity_stats` into `folder`; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.store import atomic_write_bytes

    folder = Path(folder)
    written: list[Path] = []

    def save(fig, name: str) -> None:
        import io

        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        atomic_write_bytes(folder / name, buf.getvalue())
        written.append(folder / name)

    # Every plot is written even for an empty version, so the files the manifest lists always exist.
    rouge = stats.get("rouge_l_to_nearest_seed")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if rouge:
        ax.bar([b + 0.05 for b in rouge["bins"][:-1]], rouge["histogram"], width=0.09)
        ax.set_title(f"Overlap with seeds (n={stats['records']}, median {rouge['median']:.2f})")
    else:
        ax.set_title("Overlap with seeds: no records or no seeds")
    ax.set_xlabel("ROUGE-L to the most similar seed instruction")
    ax.set_ylabel("instructions")
    save(fig, "rouge_to_seeds.png")

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.5))
    for ax, field in zip(axes, ("instruction", "input", "output")):
        lengths = stats["lengths_words"][field]
        if lengths.get("count"):
            labels = [f"{a}-{b}" if b < 100000 else f"{a}+" for a, b in zip(LENGTH_BINS, LENGTH_BINS[1:])]
            ax.bar(range(len(labels)), lengths["histogram"])
            ax.set_xticks(range(len(labels)), labels, rotation=45, fontsize=7)
        ax.set_title(f"{field} length (words), n={lengths.get('count', 0)}")
    save(fig, "lengths.png")

    verbs = stats.get("leading_verbs") or []
    fig, ax = plt.subplots(figsize=(6, 0.25 * len(verbs) + 1.5))
    ax.barh([v for v, _ in verbs][::-1], [c for _, c in verbs][::-1])
    ax.set_xlabel("instructions")
    ax.set_title("Most common leading verbs" if verbs else "Most common leading verbs: no records")
    save(fig, "leading_verbs.png")
    return written


SCORE_COLUMNS = ("judge_score", "judge_reason", "ifd", "reward_score", "quality_score")


def quality_fields(record: Record) -> dict[str, Any]:
    """The model-based scores a record carries (curate.quality), for exports; none when no scorer ran."""
    return {k: getattr(record, k) for k in SCORE_COLUMNS if getattr(record, k) is not None}


def export_alpaca_jsonl(records: Sequence[Record], path: Path) -> Path:
    """Alpaca-format JSONL (instruction, input, output, plus any quality scores), atomically."""
    from pipeline.store import atomic_write_text

    atomic_write_text(path, "".join(json.dumps({"instruction": r.instruction, "input": r.input, "output": r.output,
                                                **quality_fields(r)}, ensure_ascii=False) + "\n" for r in records))
    return Path(path)
