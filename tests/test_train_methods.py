"""The training family: method lookup, LoRA placement, the hidden-state term, and on-policy distillation on the tiny
real student (4 layers cut from the packaged SmolLM2)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import TrainConfig
from pipeline.errors import ConfigError, DistillError
from pipeline.models import resolve_student
from pipeline.records import Record
from pipeline.train import build_trainer, method_module
from pipeline.train.hidden import hidden_state_loss, layer_map
from pipeline.train.prepare import lora_layer_indices, lora_target_modules
from tests.conftest import TINY_STUDENT_DROP


@pytest.fixture(scope="module")
def student():
    return resolve_student("embedded-cut", json.loads(TINY_STUDENT_DROP), "smollm2-135m-instruct")


def records():
    return [Record(instruction="Name a primary colour.", output="Red is a primary colour.", status="accepted"),
            Record(instruction="Give a synonym of happy.", output="Joyful.", status="accepted")]


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ConfigError, match="Known methods: sft, kd, on-policy"):
        method_module("distil-everything")
    assert method_module("on-policy").needs_teacher(TrainConfig()) and not method_module("sft").needs_teacher(TrainConfig())


def test_lora_placement_keys():
    # A run saved before train.lora_target existed (its config.yaml says target_modules) still loads.
    assert TrainConfig.model_validate({"target_modules": ["q_proj"]}).lora_target == ["q_proj"]
    assert lora_target_modules("attention") == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert lora_target_modules("mlp") == ["gate_proj", "up_proj", "down_proj"]
    assert lora_target_modules(["q_proj"]) == ["q_proj"] and lora_target_modules("all-linear") == "all-linear"
    assert [lora_layer_indices(s, 4) for s in ("all", "early", "middle", "late", "1-2")] == [None, [0], [1, 2], [3], [1, 2]]
    assert lora_layer_indices("late", 24) == list(range(16, 24))
    with pytest.raises(ConfigError, match="outside the student's layers 0 to 3"):
        lora_layer_indices("2-7", 4)
    with pytest.raises(ConfigError, match="lora_target"):
        lora_target_modules("attn")


def test_lora_placement_reaches_the_adapter(student, tmp_path):
    cfg = TrainConfig(max_steps=1, max_length=64, padding_free="off", lora_target="attention", lora_layers="late")
    trainer, _ = build_trainer(student, records(), cfg, tmp_path)
    wrapped = {n.split(".lora_A")[0] for n, _ in trainer.model.named_parameters() if ".lora_A" in n}
    assert wrapped and all(".layers.3.self_attn." in n for n in wrapped)
    assert {n.rsplit(".", 1)[-1] for n in wrapped} == {"q_proj", "k_proj", "v_proj", "o_proj"}


def test_all_linear_on_some_layers_wraps_every_linear_of_those_layers_only(student, tmp_path):
    # peft refuses layers_to_transform with target_modules="all-linear" (the default target): a study's Q2 layer
    # cells crashed on it. The names are spelled out from the decoder's own linear modules instead.
    cfg = TrainConfig(max_steps=1, max_length=64, padding_free="off", lora_layers="early")
    trainer, _ = build_trainer(student, records(), cfg, tmp_path)
    wrapped = {n.split(".lora_A")[0] for n, _ in trainer.model.named_parameters() if ".lora_A" in n}
    assert wrapped and all(".layers.0." in n for n in wrapped)
    assert {n.rsplit(".", 1)[-1] for n in wrapped} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                      "up_proj", "down_proj"}


def test_hidden_state_loss_matches_hand_computation():
    s = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    t = torch.tensor([[[2.0, 0.0], [1.0, 0.0]]])
    # cosine: token 0 points the same way (0), token 1 is orthogonal (1); mse: (1 + 0) / 2 and (1 + 1) / 2.
    assert hidden_state_loss([s], [t], None, "cosine").item() == pytest.approx(0.5)
    assert hidden_state_loss([s], [t], None, "mse").item() == pytest.approx(0.75)
    # A padding token (mask 0) does not count; two layer pairs are averaged.
    mask = torch.tensor([[1, 0]])
    assert hidden_state_loss([s], [t], mask, "cosine").item() == pytest.approx(0.0, abs=1e-7)
    assert hidden_state_loss([s, s], [t, s], None, "mse").item() == pytest.approx(0.375)


def test_layer_map_is_what_the_cut_implies():
    assert layer_map(30, 24, "12-17") == list(range(12)) + list(range(18, 30))
    assert layer_map(30, 20, "middle:10") == list(range(10)) + list(range(20, 30))
    assert layer_map(30, 4, json.loads(TINY_STUDENT_DROP)) == [0, 1, 28, 29]
    assert layer_map(4, 4, None) == [0, 1, 2, 3]
    with pytest.raises(DistillError, match="the student has 20"):
        layer_map(30, 20, "12-17")


def test_hidden_state_term_is_zero_for_a_student_identical_to_its_teacher(student, tmp_path):
    # The untrained adapter adds nothing (LoRA B starts at 0), so student and teacher layers give the same outputs.
    cfg = TrainConfig(max_steps=1, batch_size=2, max_length=64, hidden_loss_weight=1.0, hidden_loss="mse")
    trainer, _ = build_trainer(student, records(), cfg, tmp_path, teacher_dir=student)
    batch = trainer.data_collator([{k: ex[k] for k in ex if k in ("input_ids", "completion_mask", "labels")}
                                   for ex in trainer.train_dataset])
    batch = {k: v for k, v in batch.items() if torch.is_tensor(v) and k != "completion_mask"}
    trainer.model.train()
    plain = trainer.model(**batch).loss
    loss = trainer.compute_loss(trainer.model, dict(batch))
    assert trainer.hidden_map == [0, 1, 2, 3] and trainer.last_hidden_loss == pytest.approx(0.0, abs=1e-6)
    assert loss.item() == pytest.approx(plain.item(), rel=1e-4)


@pytest.mark.slow
def test_layer_map_points_at_the_teacher_layers_the_student_was_copied_from(student):
    teacher = resolve_student("embedded-cut", [], "smollm2-135m-instruct")
    mine, theirs = load_file(str(student / "model.safetensors")), load_file(str(teacher / "model.safetensors"))
    for s_layer, t_layer in enumerate(layer_map(30, 4, json.loads(TINY_STUDENT_DROP))):
        key = "model.layers.{}.self_attn.q_proj.weight"
        assert torch.equal(mine[key.format(s_layer)], theirs[key.format(t_layer)])


@pytest.fixture(scope="module")
def other_teacher():
    # A different small model of the same vocabulary: 5 layers of the packaged teacher.
    return resolve_student("embedded-cut", list(range(2, 27)), "smollm2-135m-instruct")


def _fixed_batch(trainer, seed=0):
    torch.manual_seed(seed)
    prompts = [{"prompt": row["prompt"]} for row in trainer.train_dataset]
    trainer.model.eval()
    return trainer._generate_and_score_completions(prompts)


def _divergence(trainer, batch) -> float:
    with torch.no_grad():
        loss, _, _ = trainer._compute_loss(trainer.accelerator.unwrap_model(trainer.model), batch, None)
    return loss.item()


@pytest.mark.slow
def test_on_policy_samples_from_the_student_and_lowers_the_divergence(student, other_teacher, tmp_path):
    cfg = TrainConfig(method="on-policy", max_steps=6, batch_size=2, learning_rate=5e-3, beta=0.5,
                      max_completion_length=12, max_length=64, seed=0)
    trainer, _ = build_trainer(student, records(), cfg, tmp_path, teacher_dir=other_teacher)
    assert type(trainer).__name__ == "DistillationTrainer" and trainer.beta == 0.5
    fixed = _fixed_batch(trainer)
    before_completions = fixed["completion_ids"].tolist()
    before = _divergence(trainer, fixed)
    adapter_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    changed = [n for n, p in trainer.model.named_parameters() if "lora_B" in n and not torch.equal(p, adapter_before[n])]
    assert changed, "training did not change the adapter"
    assert _divergence(trainer, fixed) < before
    # The same seed now samples other completions: they come from the (changed) student, not from stored text.
    assert _fixed_batch(trainer)["completion_ids"].tolist() != before_completions


def test_on_policy_trains_and_records_its_sampler(student, other_teacher, tmp_path):
    from pipeline.train import train

    cfg = TrainConfig(method="on-policy", max_steps=1, batch_size=2, max_completion_length=8, max_length=64,
                      hidden_loss_weight=0.5)
    # This teacher keeps layers 0, 1, 27, 28, 29 of the packaged model, the student 0, 1, 28, 29: relative to the
    # teacher the student's cut is its layer 2, so student layers 2 and 3 come from teacher layers 3 and 4.
    summary = train(student, records(), cfg, tmp_path, teacher_dir=other_teacher, cut=[2])
    assert summary["on_policy"]["sampler"] == "generate" and summary["on_policy"]["trainer"] == "trl.DistillationTrainer"
    assert summary["steps"] == 1 and (tmp_path / "adapter" / "adapter_config.json").exists()
    assert summary["hidden"]["layer_map"] == {"0": 0, "1": 1, "2": 3, "3": 4}
    assert summary["hidden"]["last_hidden_loss"] > 0
