"""The training stage on CUDA: bf16, padding-free packed batches, gradient accumulation, resume, logit distillation.

Skipped without a GPU (the default suite and CI have none); run on a GPU machine with `pytest -m gpu`."""

import json

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import TrainConfig
from pipeline.models import resolve_student
from pipeline.train import build_trainer, train_lora
from tests.conftest import TINY_STUDENT_DROP
from tests.test_train import _batch_loss, records

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run with `pytest -m gpu`)")]


@pytest.fixture(scope="module")
def student():
    return resolve_student("embedded-cut", json.loads(TINY_STUDENT_DROP), "smollm2-135m-instruct")


def test_bf16_padding_free_lora_learns(student, tmp_path):
    cfg = TrainConfig(max_steps=12, batch_size=2, max_length=128, learning_rate=2e-3)
    summary = train_lora(student, records(8), cfg, tmp_path)
    assert summary["device"] == "cuda" and summary["dtype"] == "bfloat16"
    trainer_args = json.loads((tmp_path / "checkpoints" / "checkpoint-12" / "trainer_state.json").read_text())
    assert trainer_args["global_step"] == 12
    weights = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    lora_b = [w for name, w in weights.items() if "lora_B" in name]
    assert lora_b and all(torch.count_nonzero(w) > 0 for w in lora_b)  # B starts at zero; training moved every one
    assert summary["last_loss"] < summary["first_loss"] / 2  # eight short examples, twelve steps: it memorises them


def test_padding_free_is_the_cuda_default_and_scores_like_padding(student, tmp_path):
    recs = records(4)
    packed, _ = build_trainer(student, recs, TrainConfig(max_length=256, max_steps=1), tmp_path / "a")
    padded, _ = build_trainer(student, recs, TrainConfig(max_length=256, max_steps=1, padding_free="off"), tmp_path / "b")
    assert packed.args.padding_free and packed.args.bf16 and len(packed.train_dataset) < len(recs)
    assert next(packed.model.parameters()).dtype == torch.bfloat16
    assert _batch_loss(packed) == pytest.approx(_batch_loss(padded), rel=1e-4)  # scored in fp32


def test_gradient_accumulation_sees_every_example(student, tmp_path):
    recs = records(8)
    cfg = TrainConfig(max_steps=2, batch_size=2, grad_accum=2, max_length=128, padding_free="off")
    trainer, _ = build_trainer(student, recs, cfg, tmp_path)
    expected_tokens = sum(len(ex["input_ids"]) for ex in trainer.train_dataset)
    summary = train_lora(student, recs, cfg, tmp_path, resume=False)
    history = json.loads((tmp_path / "train_log.json").read_text())
    tokens = [h["num_tokens"] for h in history if "num_tokens" in h]
    assert summary["steps"] == 2 and tokens[-1] == expected_tokens  # 2 steps x 2 micro-batches x 2 examples = all 8


def test_killed_run_resumes_on_cuda(student, tmp_path):
    recs = records(4)
    first = train_lora(student, recs, TrainConfig(max_steps=2, batch_size=2, max_length=64), tmp_path)
    second = train_lora(student, recs, TrainConfig(max_steps=4, batch_size=2, max_length=64), tmp_path)
    assert first["steps"] == 2 and second["resumed_from_step"] == 2 and second["steps"] == 4
    assert second["dtype"] == "bfloat16"


def test_logit_distillation_on_cuda(student, tmp_path):
    cfg = TrainConfig(method="kd", kd_alpha=0.5, kd_temperature=2.0, max_steps=4, batch_size=2, max_length=64,
                      learning_rate=1e-3)
    summary = train_lora(student, records(4), cfg, tmp_path, teacher_dir=student)
    assert summary["device"] == "cuda" and summary["kd"]["alpha"] == 0.5
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in json.loads((tmp_path / "train_log.json").read_text())
               if "loss" in h)
