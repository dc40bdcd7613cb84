"""Curate: filters, exact and near duplicates, decontamination; every reject keeps its reason."""

from __future__ import annotations

from collections import Counter

from pipeline.config import CurateConfig
from pipeline.curate.decontaminate import EvalOverlap
from pipeline.curate.dedupe import NearDuplicateIndex
from pipeline.curate.filters import INSTRUCTION_FILTERS, OUTPUT_FILTERS, first_failure, normalise
from pipeline.records import Record


def curate(records: list[Record], cfg: CurateConfig, seed_instructions: list[str] = (),
           eval_texts: list[str] = ()) -> tuple[list[Record], list[Record]]:
    """Split records into (accepted, rejected) in input order; rejects carry reason and detail."""
    accepted: list[Record] = []
    rejected: list[Record] = []
    seen_exact: dict[str, str] = {normalise(s): "seed" for s in seed_instructions} if cfg.dedupe_against_seeds else {}
    pool_seeds = list(seed_instructions) if cfg.dedupe_against_seeds else []
    index = NearDuplicateIndex(cfg.rouge_threshold, vocabulary_hint=pool_seeds + [r.instruction for r in records])
    for s in pool_seeds:
        index.add(s)
    contamination = EvalOverlap(list(eval_texts), cfg.decontaminate_ngram, cfg.decontaminate_threshold) if eval_texts else None

    for r in records:
        if r.status == "rejected":  # already rejected upstream (unparseable reply, failed call)
            rejected.append(r)
            continue
        reason = first_failure(r, cfg, INSTRUCTION_FILTERS) or first_failure(r, cfg, OUTPUT_FILTERS)
        if reason:
            rejected.append(r.reject(reason))
            continue
        key = normalise(r.instruction + " " + r.input)
        if key in seen_exact:
            rejected.append(r.reject("exact_duplicate", f"same as {seen_exact[key]}"))
            continue
        if contamination is not None:
            ov = contamination.overlap(r.instruction + " " + r.input)
            if ov >= cfg.decontaminate_threshold:
                rejected.append(r.reject("contaminated", f"{ov:.2f} of its {cfg.decontaminate_ngram}-grams are in the eval set"))
                continue
        verdict = index.check_and_add(r.instruction)
        if not verdict.kept:
            nearest = index.texts[verdict.nearest]
            rejected.append(r.reject("near_duplicate", f"ROUGE-L {verdict.score:.3f} to: {nearest}"))
            continue
        seen_exact[key] = r.id
        accepted.append(r.accept())
    return accepted, rejected


def reject_counts(rejected: list[Record]) -> dict[str, int]:
    return dict(Counter(r.reject_reason or "unknown" for r in rejected).most_common())
