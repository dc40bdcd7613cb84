"""The record every stage passes along: an instruction, its input and output, and where it came from."""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from typing import Literal

from pydantic import BaseModel, Field


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def content_id(instruction: str, input: str = "", output: str = "") -> str:
    """Stable id from the content, so the same example gets the same id in every run."""
    blob = "\x1f".join(s.strip() for s in (instruction, input, output))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


class Record(BaseModel):
    """One instruction example with provenance; rejects keep their reason instead of vanishing."""

    id: str = ""
    instruction: str
    input: str = ""
    output: str = ""
    source: Literal["generated", "seed", "gold"] = "generated"
    status: Literal["accepted", "rejected", "pending"] = "pending"
    reject_reason: str | None = None
    reject_detail: str | None = None
    # provenance
    run_id: str = ""
    teacher: str = ""
    template: str = ""
    template_hash: str = ""
    prompt_seed_ids: list[str] = Field(default_factory=list)
    prompt_machine_instructions: list[str] = Field(default_factory=list)
    gen_params: str = ""  # JSON of decoding params for instruction and answer calls
    finish_reason: str = ""
    raw_reply: str = ""
    # per answer token: {"token", "logprob", "top": {token: logprob}}; for train.kd_source=logprobs and the browser
    teacher_logprobs: list[dict] | None = None
    # model-based quality scores (curate.quality); None where a scorer did not run, so older files load unchanged
    judge_score: float | None = None  # the judge's 1-5 rating
    judge_reason: str | None = None  # the judge's short reason for it
    ifd: float | None = None  # instruction-following difficulty: loss(answer | instruction) / loss(answer alone)
    reward_score: float | None = None  # a local reward model's score
    quality_score: float | None = None  # the scores combined (mean percentile rank), what curate.select ranks by
    created_at: str = Field(default_factory=now_iso)

    def model_post_init(self, __context) -> None:
        if not self.id:
            self.id = content_id(self.instruction, self.input, self.output)

    def reject(self, reason: str, detail: str | None = None) -> "Record":
        return self.model_copy(update={"status": "rejected", "reject_reason": reason, "reject_detail": detail})

    def accept(self) -> "Record":
        return self.model_copy(update={"status": "accepted", "reject_reason": None, "reject_detail": None})
