"""Curate: filters, exact and near duplicates, decontamination; every reject keeps its reason."""

from __future__ import annotations

from collections import Counter
from typing import Sequence

from pipeline.config import CurateConfig
from pipeline.curate.decontaminate import EvalOverlap
from pipeline.curate.fastdedupe import dedupe_texts
from pipeline.curate.filters import INSTRUCTION_FILTERS, OUTPUT_FILTERS, first_failure, normalise
from pipeline.records import Record

# Reject reasons of the model-based stage (pipeline/curate/quality/), named here so this module need not import it.
QUALITY_REASONS = ("low_judge_score", "judge_unparsed", "judge_failed", "low_ifd", "low_reward")
SELECT_REASON = "not_selected"


def curate(records: list[Record], cfg: CurateConfig, seed_instructions: Sequence[str] = (),
           eval_texts: Sequence[str] = (), prior_kept: Sequence[str] = ()) -> tuple[list[Record], list[Record]]:
    """Split records into (accepted, rejected) in input order; rejects carry reason and detail.

    Order of checks per record: Alpaca's and Self-Instruct's filters, exact duplicates (after normalising
    case, whitespace and punctuation) of an earlier record that got this far or of a seed,
    decontamination against the eval texts, then Alpaca's near-duplicate rule against the seeds,
    `prior_kept` (instructions kept by earlier dataset versions) and every earlier kept record.
    """
    pool = (list(seed_instructions) if cfg.dedupe_against_seeds else []) + list(prior_kept)
    seen_exact: dict[str, str] = {normalise(s): "an instruction kept earlier (seed or earlier version)" for s in pool}
    contamination = EvalOverlap(list(eval_texts), cfg.decontaminate_ngram, cfg.decontaminate_threshold) if eval_texts else None

    verdicts: list[Record | None] = [None] * len(records)  # a reject, or None while still a candidate
    candidates: list[int] = []
    for k, r in enumerate(records):
        if r.status == "rejected":  # already rejected upstream (unparseable reply, failed call)
            verdicts[k] = r
            continue
        reason = first_failure(r, cfg, INSTRUCTION_FILTERS) or first_failure(r, cfg, OUTPUT_FILTERS)
        if reason:
            verdicts[k] = r.reject(reason)
            continue
        key = normalise(r.instruction + " " + r.input)
        if key in seen_exact:
            verdicts[k] = r.reject("exact_duplicate", f"same as {seen_exact[key]}")
            continue
        dirty = contamination.reject(r) if contamination is not None else None
        if dirty is not None:
            verdicts[k] = dirty
            continue
        seen_exact[key] = f"record {r.id}"
        candidates.append(k)

    texts = [records[k].instruction for k in candidates]
    result = dedupe_texts(texts, pool, cfg.rouge_threshold)
    everything = pool + texts
    for j, k in enumerate(candidates):
        at = len(pool) + j
        if not result.kept[at]:
            nearest = everything[int(result.nearest[at])]
            verdicts[k] = records[k].reject("near_duplicate", f"ROUGE-L {result.score[at]:.3f} to: {nearest}")

    accepted = [r.accept() for r, v in zip(records, verdicts) if v is None]
    rejected = [v for v in verdicts if v is not None]
    return accepted, rejected


def reject_counts(rejected: list[Record]) -> dict[str, int]:
    """Rejects per reason, most common first."""
    return dict(Counter(r.reject_reason or "unknown" for r in rejected).most_common())


def contamination_report(rejected: list[Record], eval_items: int, cfg: CurateConfig, limit: int = 50) -> dict:
    """What decontamination dropped: counts, the rule, and the first `limit` records with their match."""
    dropped = [r for r in rejected if r.reject_reason == "contaminated"]
    return {"eval_items_checked": eval_items, "ngram": cfg.decontaminate_ngram,
            "threshold": cfg.decontaminate_threshold, "dropped": len(dropped),
            "examples": [{"id": r.id, "instruction": r.instruction, "input": r.input, "detail": r.reject_detail}
                         for r in dropped[:limit]]}


_STAGE_OF = {"exact_duplicate": "exact_duplicates", "contaminated": "decontamination", "near_duplicate": "near_duplicates",
             **{reason: "quality" for reason in QUALITY_REASONS}, SELECT_REASON: "selection"}


def stage_counts(n_input: int, accepted: list[Record], rejected: list[Record]) -> dict[str, int]:
    """Records in, dropped at each stage (upstream/filters, exact duplicates, decontamination, near
    duplicates, model-based quality scorers, selection), and accepted."""
    counts = Counter(_STAGE_OF.get(r.reject_reason or "", "filters_or_upstream") for r in rejected)
    return {"input": n_input, **{k: counts.get(k, 0) for k in ("filters_or_upstream", "exact_duplicates",
                                                               "decontamination", "near_duplicates", "quality",
                                                               "selection")},
            "accepted": len(accepted)}
