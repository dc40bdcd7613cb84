"""What every quality scorer shares: the run context, score fields, reject reasons, the top-fraction cut."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pipeline.config import TeacherConfig
from pipeline.records import Record

log = logging.getLogger(__name__)

# scorer name -> the Record field holding its score, and the reject reason of a record it drops
SCORE_FIELD = {"judge": "judge_score", "ifd": "ifd", "reward": "reward_score"}
LOW_REASON = {"judge": "low_judge_score", "ifd": "low_ifd", "reward": "low_reward"}
# Higher is better for every score (IFD included: below 1, a higher IFD is a harder, more informative example).


@dataclass
class QualityContext:
    """What scorers need from the run: the teacher (for the judge), its cache and ledger, the student."""

    teacher: TeacherConfig
    cache_path: Path
    ledger: Any  # pipeline.teachers.Ledger: shared with the rest of the run so the budget holds
    student_dir: Callable[[], Path]  # resolved only when a scorer asks for it (cutting a student takes seconds)


def keep_top_fraction(records: list[Record], scorer: str, fraction: float | None) -> tuple[list[Record], list[Record]]:
    """Keep the top `fraction` by this scorer's score; records tied with the last kept one are kept too."""
    if fraction is None or not records:
        return records, []
    attr = SCORE_FIELD[scorer]
    n = max(1, round(fraction * len(records)))
    cutoff = sorted((getattr(r, attr) for r in records), reverse=True)[n - 1]
    kept = [r for r in records if getattr(r, attr) >= cutoff]
    low = [r.reject(LOW_REASON[scorer], f"{attr} {getattr(r, attr):.3f} below the top {fraction:g} "
                                        f"(cut-off {cutoff:.3f})") for r in records if getattr(r, attr) < cutoff]
    return kept, low
