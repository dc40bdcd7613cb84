"""The score distributions written to the curated dataset's manifest, and their plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.records import Record
from pipeline.curate.quality.common import SCORE_FIELD


def score_distribution(accepted: Sequence[Record], rejected: Sequence[Record]) -> dict[str, Any]:
    """Per score: how many records carry it, its mean and quantiles, and a 10-bin histogram, accepted vs rejected."""
    out: dict[str, Any] = {}
    for name, attr in {**SCORE_FIELD, "quality": "quality_score"}.items():
        acc = [getattr(r, attr) for r in accepted if getattr(r, attr) is not None]
        rej = [getattr(r, attr) for r in rejected if getattr(r, attr) is not None]
        values = [v for v in acc + rej if math.isfinite(v)]
        if not values:
            continue
        lo, hi = min(values), max(values)
        edges = np.linspace(lo, hi if hi > lo else lo + 1, 11)
        out[name] = {"field": attr, "records": len(values), "mean": round(float(np.mean(values)), 4),
                     "quantiles": {q: round(float(np.quantile(values, float(q))), 4) for q in ("0.1", "0.5", "0.9")},
                     "bins": [round(float(e), 4) for e in edges],
                     "accepted": np.histogram([v for v in acc if math.isfinite(v)], bins=edges)[0].tolist(),
                     "rejected": np.histogram([v for v in rej if math.isfinite(v)], bins=edges)[0].tolist()}
    return out


def plot_scores(distribution: dict[str, Any], path: Path) -> Path:
    """quality_scores.png: one histogram per score, accepted and rejected stacked."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.store import atomic_write_bytes

    names = list(distribution) or ["none"]
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        d = distribution.get(name)
        if not d:
            ax.set_title("no scores")
            continue
        edges = np.array(d["bins"])
        mids, width = (edges[:-1] + edges[1:]) / 2, (edges[1] - edges[0]) * 0.9
        ax.bar(mids, d["accepted"], width=width, label="accepted")
        ax.bar(mids, d["rejected"], width=width, bottom=d["accepted"], label="rejected", color="tab:red", alpha=0.7)
        ax.set(title=f"{name} (n={d['records']}, median {d['quantiles']['0.5']:.2f})", xlabel=d["field"],
               ylabel="records")
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)
