"""The `gpu-vllm` profile's path on CPU: llama.cpp's OpenAI-compatible server (`distill teacher-server`) stands in
for `vllm serve` (the same HTTP API, top-k logprobs included). The teacher answers with top-k logprobs through the
server, the answers are curated, and the student trains with `train.kd_source: logprobs` on exactly those logprobs.

Only what a GPU box has and this one lacks is overridden: the server address and model name, a tiny student
instead of a hub checkpoint, and sizes that fit a 2-core box (README "The GPU profile, step by step")."""

from __future__ import annotations

import json

import pytest

from pipeline import stages
from pipeline.config import load_config
from pipeline.store import Run, load_records
from pipeline.teachers.server import serve_llamacpp
from tests.conftest import TINY_STUDENT_DROP

pytest.importorskip("llama_cpp.server")
pytestmark = pytest.mark.slow  # a real model behind a real server, then real training steps

INSTRUCTIONS = ["Give me one tip for staying healthy.", "Name three primary colours.",
                "What is the capital of France?", "Write a one-line greeting for a friend.",
                "Suggest a name for a pet cat.", "Explain what a noun is in one sentence."]


def test_vllm_profile_path_with_llamacpp_server_standing_in(tmp_path):
    prompts = tmp_path / "instructions.jsonl"
    prompts.write_text("".join(json.dumps({"instruction": i}) + "\n" for i in INSTRUCTIONS))
    with serve_llamacpp("smollm2-135m-instruct", n_threads=1, n_ctx=1024, log_path=tmp_path / "server.log") as server:
        cfg = load_config(profile="gpu-vllm", overrides=[
            # What `vllm serve` would be: the address and the model it serves.
            f"teacher.base_url={server.base_url}", "teacher.model=smollm2-135m-instruct", "teacher.timeout_s=120",
            # The logit-distillation path: top-k logprobs captured through the server, KD on them.
            "generate.response_logprobs=5", "train.method=kd", "train.kd_source=logprobs", "train.kd_alpha=0.5",
            # CPU-sized: the teacher answers our instructions, a 4-layer student, two steps.
            "generate.mode=responses", f"generate.responses_from={prompts}", "generate.response_max_tokens=32",
            f"runs_dir={tmp_path / 'runs'}", "student.source=embedded-cut", f"student.drop_layers={TINY_STUDENT_DROP}",
            "train.max_steps=2", "train.batch_size=2", "train.max_length=128", "train.lora_r=8", "train.lora_alpha=16"])
        assert cfg.teacher.backend == "openai" and cfg.teacher.max_concurrency == 64  # the profile's own settings
        run = Run.create(cfg)
        gen = stages.generate_stage(run)
    assert gen
    generated = load_records(run.path("generated.parquet"))
    answered = [r for r in generated if r.output]
    assert len(answered) == len(INSTRUCTIONS)
    for r in answered:  # top-k per answer token, as vLLM returns them
        assert r.teacher_logprobs and all(1 <= len(t["top"]) <= 5 and t["logprob"] <= 0 for t in r.teacher_logprobs)
    curated = stages.curate_stage(run)
    accepted = load_records(run.path("datasets", "curated", "accepted.parquet"))
    assert curated["accepted"] == len(accepted) >= 2
    assert all(r.teacher_logprobs for r in accepted)  # the logprobs survive curation into the dataset version

    from pipeline.scale.train_launch import main as train_launch

    assert train_launch([str(run.dir)]) == 0  # the entry the GPU box launches with accelerate/torchrun
    summary = json.loads(run.path("train.json").read_text())
    assert summary["method"] == "kd" and summary["kd"]["source"] == "logprobs" and summary["steps"] == 2
    # The KD term really saw the server's logprobs: most trained tokens had a teacher top-k to match.
    cov = summary["kd"]["coverage"]
    assert cov["top_k"] == 5 and cov["tokens_with_teacher"] >= 0.5 * cov["trained_tokens"] > 0
    assert summary["kd"]["rows_with_topk"]["found"] > 0 and run.path("adapter", "adapter_config.json").exists()
