"""Selection: the top records by score within leading-verb buckets, so a score never wipes out a kind of instruction."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Sequence

import numpy as np

from pipeline.config import SelectConfig
from pipeline.errors import ConfigError
from pipeline.records import Record
from pipeline.curate import SELECT_REASON
from pipeline.curate.quality.common import SCORE_FIELD


def buckets(records: Sequence[Record], min_size: int) -> list[str]:
    """Each record's leading-verb bucket; verbs with fewer than `min_size` records share one bucket ("(rare)"), so
    a long tail of one-off verbs neither claims a guaranteed slot each nor escapes the ranking."""
    from pipeline.curate.stats import leading_verb

    verbs = [leading_verb(r.instruction) or "(none)" for r in records]
    counts = Counter(verbs)
    return [v if counts[v] >= min_size else "(rare)" for v in verbs]


def select(records: list[Record], cfg: SelectConfig) -> tuple[list[Record], list[Record]]:
    """Keep the top records by score, per bucket in proportion to its size; deterministic for `cfg.seed`.

    Records are ranked within their bucket (best first) and ordered by rank / bucket size: every bucket's best
    record comes first, then each bucket contributes in proportion to its size, and ties in that order go to the
    higher score, then to a seeded random draw. With `by: random` the in-bucket ranking is the random draw itself:
    a stratified random sample. Dropped records become rejects with reason not_selected."""
    n = len(records)
    if n == 0:
        return [], []
    n_keep = min(n, cfg.keep_top_n if cfg.keep_top_n is not None else max(1, round(cfg.keep_fraction * n)))
    draw = np.random.default_rng(cfg.seed).random(n)
    if cfg.by == "random":
        score = draw.copy()
    else:
        attr = "quality_score" if cfg.by == "quality" else SCORE_FIELD[cfg.by]
        missing = [r.id for r in records if getattr(r, attr) is None]
        if missing:
            raise ConfigError(f"curate.select.by={cfg.by} but {len(missing)} records have no {attr} (e.g. {missing[0]}). "
                              f"Add the {cfg.by} scorer to curate.quality, or select by: random.")
        score = np.array([getattr(r, attr) for r in records], dtype=float)
    groups = buckets(records, cfg.bucket_min_size) if cfg.diversity == "leading_verb" else ["all"] * n
    members: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    position = np.empty(n)
    for idx in members.values():
        ranked = sorted(idx, key=lambda i: (-score[i], draw[i]))
        for rank, i in enumerate(ranked):
            position[i] = rank / len(idx)
    order = sorted(range(n), key=lambda i: (position[i], -score[i], draw[i]))
    chosen = set(order[:n_keep])
    by = "random draw" if cfg.by == "random" else f"{cfg.by} score"
    kept = [r for i, r in enumerate(records) if i in chosen]
    dropped = [r.reject(SELECT_REASON, f"{by} {score[i]:.3f} ranked {int(position[i] * len(members[groups[i]])) + 1} "
                                       f"of {len(members[groups[i]])} in bucket {groups[i]!r}; kept {n_keep} of {n}")
               for i, r in enumerate(records) if i not in chosen]
    return kept, dropped
