"""Logit distillation: the Hinton loss against a hand computation, and KD training on the tiny real student."""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import TrainConfig
from pipeline.errors import DistillError
from pipeline.models import resolve_student
from pipeline.records import Record
from pipeline.train.kd import align_topk, hinton_loss, piece_index
from pipeline.train import train_lora
from tests.conftest import TINY_STUDENT_DROP


def softmax(xs, t):
    e = [math.exp(x / t) for x in xs]
    return [v / sum(e) for v in e]


def test_hinton_loss_matches_hand_computation():
    s, t, label, alpha, temp = [2.0, 0.5, -1.0], [1.0, 1.5, 0.0], 0, 0.3, 2.0
    ce = -math.log(softmax(s, 1.0)[label])
    p, q = softmax(t, temp), softmax(s, temp)
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    expected = alpha * ce + (1 - alpha) * temp ** 2 * kl
    got = hinton_loss(torch.tensor([s]), torch.tensor([label]), alpha, temp, teacher_logits=torch.tensor([t]))
    assert got.shape == (1,) and got.item() == pytest.approx(expected, rel=1e-5)
    # The top-k form with every token of the vocabulary is the same loss (teacher logprobs at T=1).
    lp = torch.log_softmax(torch.tensor([t]), -1)
    topk = (torch.tensor([[0, 1, 2]]), lp, torch.tensor([True]))
    assert hinton_loss(torch.tensor([s]), torch.tensor([label]), alpha, temp, teacher_topk=topk).item() == \
        pytest.approx(expected, rel=1e-5)


def test_hinton_loss_is_cross_entropy_at_alpha_one():
    torch.manual_seed(0)
    s, t, y = torch.randn(5, 11), torch.randn(5, 11), torch.randint(0, 11, (5,))
    got = hinton_loss(s, y, 1.0, 3.0, teacher_logits=t)
    assert torch.allclose(got, F.cross_entropy(s, y, reduction="none"))
    # ... and pure distillation at alpha=0: zero when the student already matches the teacher.
    assert hinton_loss(t, y, 0.0, 3.0, teacher_logits=t).abs().max() < 1e-5


def test_topk_tokens_without_teacher_information_train_on_ce():
    s, y = torch.randn(2, 4), torch.tensor([1, 2])
    topk = (torch.tensor([[0, 1], [0, 1]]), torch.tensor([[-0.1, float("-inf")], [-0.5, -1.0]]), torch.tensor([True, False]))
    got = hinton_loss(s, y, 0.5, 2.0, teacher_topk=topk)
    assert torch.isfinite(got).all() and got[1].item() == pytest.approx(F.cross_entropy(s[1:], y[1:]).item(), rel=1e-6)


@pytest.fixture(scope="module")
def student():
    return resolve_student("embedded-cut", json.loads(TINY_STUDENT_DROP), "smollm2-135m-instruct")


def kd_records():
    return [Record(instruction="Name a primary colour.", output="Red is a primary colour.", status="accepted"),
            Record(instruction="Give a synonym of happy.", output="Joyful.", status="accepted")]


def test_teacher_with_another_vocabulary_is_refused(student, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    other = tmp_path / "other-teacher"
    shutil.copytree(student, other)
    tok = AutoTokenizer.from_pretrained(str(other))
    tok.add_tokens(["<extra_a>", "<extra_b>"])
    tok.save_pretrained(str(other))
    model = AutoModelForCausalLM.from_pretrained(str(other))
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(str(other))
    cfg = TrainConfig(method="kd", kd_alpha=0.5, max_steps=1)
    with pytest.raises(DistillError, match="share one vocabulary") as err:
        train_lora(student, kd_records(), cfg, tmp_path / "out", teacher_dir=other)
    assert "49154" in str(err.value) and "49152" in str(err.value)


def test_kd_training_with_in_process_teacher(student, tmp_path):
    cfg = TrainConfig(method="kd", kd_alpha=0.5, kd_temperature=2.0, max_steps=2, batch_size=2, max_length=64,
                      learning_rate=1e-3)
    summary = train_lora(student, kd_records(), cfg, tmp_path, teacher_dir=student)
    assert summary["steps"] == 2 and summary["kd"]["temperature"] == 2.0
    assert summary["tokens_per_s"] and summary["first_loss"] > 0


def test_stored_topk_aligns_with_the_students_tokens(student):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(student))
    text = "Red is a primary colour."
    ids = tok.apply_chat_template([{"role": "user", "content": "Colour?"}, {"role": "assistant", "content": text}],
                                  tokenize=True, return_dict=False)
    start = len(tok.apply_chat_template([{"role": "user", "content": "Colour?"}], tokenize=True,
                                        add_generation_prompt=True, return_dict=False))
    labels = [-100] * start + ids[start:]
    pieces = [tok.decode([t]) for t in ids[start:]]
    # What a llama.cpp/OpenAI teacher stores: each sampled token's text and its top alternatives' texts.
    stored = [{"token": p, "logprob": -0.1, "top": {p: -0.1, " the": -2.5}} for p in pieces[:4]]
    pos, top_ids, top_lps, unknown = align_topk(tok, ids, labels, stored, piece_index(tok), k=2)
    assert pos == list(range(start, start + 4)) and unknown == 0
    assert [row[0] for row in top_ids] == ids[start:start + 4] and top_lps[0] == [-0.1, -2.5]


def test_kd_training_from_stored_topk_logprobs(student, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(student))
    recs = []
    for r in kd_records():
        pieces = [tok.decode([t]) for t in tok(r.output, add_special_tokens=False)["input_ids"]]
        stored = [{"token": p, "logprob": -0.2, "top": {p: -0.2, " and": -1.9, "!": -3.0}} for p in pieces]
        recs.append(r.model_copy(update={"teacher_logprobs": stored}))
    cfg = TrainConfig(method="kd", kd_source="logprobs", kd_alpha=0.2, max_steps=1, batch_size=2, max_length=64)
    summary = train_lora(student, recs, cfg, tmp_path)
    cov = summary["kd"]["coverage"]
    # Every response token has a teacher distribution; only the end-of-turn token trains on CE alone.
    assert cov["top_k"] == 3 and cov["tokens_with_teacher"] == cov["trained_tokens"] - 2
    assert summary["kd"]["rows_with_topk"] == {"found": 2, "missing": 0}  # the lookup hit during training
    assert summary["steps"] == 1 and math.isfinite(summary["train_loss"])


@pytest.mark.slow
def test_ablation_grid_writes_table_and_plot(student, tmp_path):
    from pipeline.config import load_config
    from pipeline.train.ablation import kd_grid

    cfg = load_config(overrides=[f"student.drop_layers={TINY_STUDENT_DROP}", "train.max_steps=1", "train.batch_size=2",
                                 "train.max_length=64", "evaluate.limit=2", "evaluate.max_new_tokens=8",
                                 "evaluate.bootstrap_samples=100", f"train.kd_teacher={student}"])
    table = kd_grid(cfg, kd_records(), tmp_path, temperatures=(1, 4), alphas=(0.5, 1.0))
    assert [(c["temperature"], c["alpha"], c["method"]) for c in table["cells"]] == \
        [(1, 0.5, "kd"), (1, 1.0, "sft"), (4, 0.5, "kd"), (4, 1.0, "sft")]
    assert (tmp_path / "ablation.png").exists() and "| 4 |" in (tmp_path / "ablation.md").read_text()
    assert sorted(p.name for p in (tmp_path / "cells").glob("*.json")) == ["kd-T1-a0.5.json", "kd-T4-a0.5.json",
                                                                          "raw.json", "sft.json"]


@pytest.mark.slow
def test_cut_depth_table_compares_methods_per_cut_against_sft(student, tmp_path):
    from pipeline.config import load_config
    from pipeline.train.ablation import cut_depth

    cfg = load_config(overrides=["train.max_steps=1", "train.batch_size=2", "train.max_length=64", "evaluate.limit=3",
                                 "evaluate.max_new_tokens=8", "evaluate.bootstrap_samples=100",
                                 f"train.kd_teacher={student}"])
    cuts = ["2-29", "every:10"]  # 2 and 3 layers left: small enough to train on a CPU in seconds
    rows = cut_depth(cfg, kd_records(), tmp_path, cuts, alpha=0.5, temperature=2.0, methods=("sft", "kd"))
    assert [(r["cut"], r["contender"]) for r in rows] == [(c, m) for c in cuts for m in ("raw", "sft", "kd")]
    for r in rows:
        assert 0 <= r["rouge_l"] <= 1 and r["rouge_l_ci"][0] <= r["rouge_l"] <= r["rouge_l_ci"][1]
        assert 0 <= r["hit_limit"] <= 1 and r["perplexity"] > 1 and r["params"] > 0
        # Every contender but SFT itself carries its paired difference to SFT on the same items.
        assert (r["vs_sft"] is None) == (r["contender"] == "sft")
        if r["vs_sft"]:
            assert r["vs_sft"]["n"] == 3 and r["vs_sft"]["lo"] <= r["vs_sft"]["mean"] <= r["vs_sft"]["hi"]
    table = (tmp_path / "cut_depth.md").read_text()
    assert "| every:10 | kd |" in table and "KD: alpha 0.5, T 2" in table and (tmp_path / "cut_depth.png").exists()
    assert json.loads((tmp_path / "cut_depth.json").read_text())[0]["cut"] == "2-29"
    # A rerun reuses the saved cells (a killed ablation resumes) and gives the same table.
    assert cut_depth(cfg, kd_records(), tmp_path, cuts, alpha=0.5, temperature=2.0, methods=("sft", "kd")) == rows
    # A stopped ablation: --saved-only tabulates the cells that were saved and trains nothing.
    next((tmp_path / "cells").glob("cut-every10-kd-*.json")).unlink()
    partial = cut_depth(cfg, kd_records(), tmp_path, cuts, methods=("sft", "kd"), saved_only=True)
    assert partial == rows[:-1] and not list((tmp_path / "cells").glob("cut-every10-kd-*.json"))
