"""The real embedded teacher (llama.cpp + the packaged GGUF) and real training steps on a student cut from it."""

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import load_config
from pipeline.generate import answer_instructions, bootstrap_instructions, load_seed_tasks
from pipeline.models import resolve_gguf, resolve_student
from pipeline.teachers import Request, make_teacher
from pipeline.train import train_lora
from tests.conftest import TINY_STUDENT_DROP


@pytest.fixture(scope="module")
def embedded_teacher(tmp_path_factory):
    cfg = load_config()
    teacher = make_teacher(cfg.teacher, tmp_path_factory.mktemp("cache") / "teacher.sqlite")
    yield teacher
    teacher.close()


def test_embedded_teacher_answers_and_caches(embedded_teacher):
    req = Request(kind="chat", messages=[{"role": "user", "content": "Give three tips for staying healthy."}],
                  max_tokens=48)
    first = embedded_teacher.generate([req])[0]
    assert first.ok and len(first.text.split()) > 5 and first.tokens_out > 0
    again = embedded_teacher.generate([req])[0]
    assert again.cached and again.text == first.text


def test_self_instruct_then_training_changes_the_adapter(embedded_teacher, tmp_path):
    cfg = load_config(overrides=["generate.target_instructions=3", "generate.max_prompts=2", "generate.prompts_per_round=2",
                                 "generate.response_max_tokens=48", f"student.drop_layers={TINY_STUDENT_DROP}",
                                 "train.max_steps=3", "train.batch_size=2", "train.max_length=128"])
    seeds = load_seed_tasks(cfg.generate.seed_tasks)
    records, stats = bootstrap_instructions(embedded_teacher, seeds, cfg.generate, cfg.curate, "test")
    assert stats["prompts"] == 2 and stats["candidates"] >= 1
    records = answer_instructions(embedded_teacher, records, cfg.generate)
    usable = [r for r in records if r.status == "pending" and r.output]
    assert usable, "the embedded teacher produced no usable example"

    student = resolve_student(cfg.student.source, cfg.student.drop_layers, cfg.student.cut_from)
    summary = train_lora(student, usable, cfg.train, tmp_path)
    assert summary["steps"] == 3 and summary["preflight"]["mask_ok"]
    weights = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    lora_b = [w for name, w in weights.items() if "lora_B" in name]
    # LoRA's B matrices start at zero: any non-zero entry means training moved the adapter.
    assert lora_b and any(torch.count_nonzero(w) > 0 for w in lora_b)
    assert resolve_gguf(cfg.teacher.model).stat().st_size > 50_000_000
