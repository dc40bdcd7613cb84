"""Paired verdicts: the paired bootstrap against a hand computation, 'better' where separate intervals overlap,
'not distinguishable on N items' with the items needed, and the report and CLI lines built from them."""

import json
import math
from statistics import NormalDist

import numpy as np
import pytest

from pipeline.cli import verdict_lines
from pipeline.evaluate.metrics import bootstrap_ci, paired_difference, paired_ratio
from pipeline.evaluate.verdict import paired_verdicts
from pipeline.report import headline, write_report

# A small table: four items, two contenders.
A = [0.30, 0.10, 0.55, 0.20]
B = [0.25, 0.12, 0.40, 0.10]


def test_paired_interval_equals_a_hand_computation():
    d = paired_difference(A, B, names=("A", "B"), samples=200, seed=7)
    # by hand: the per-item differences, resampled with the same generator draws
    diff = np.array(A) - np.array(B)  # [0.05, -0.02, 0.15, 0.10]
    idx = np.random.default_rng(7).integers(0, 4, size=(200, 4))
    means = diff[idx].mean(axis=1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    assert d.n == 4 and d.mean == pytest.approx(0.07)
    assert (d.lo, d.hi) == (pytest.approx(lo), pytest.approx(hi))
    sd = float(np.std(diff, ddof=1))
    assert d.sd == pytest.approx(sd)
    z = NormalDist().inv_cdf(0.975) + NormalDist().inv_cdf(0.8)
    assert d.n_needed == math.ceil((z * sd / 0.07) ** 2)
    # the ratio of means uses the very same draws
    ratio, rlo, rhi, n = paired_ratio(A, B, samples=200, seed=7)
    ratios = np.array(A)[idx].mean(axis=1) / np.array(B)[idx].mean(axis=1)
    assert n == 4 and ratio == pytest.approx(sum(A) / sum(B))
    assert (rlo, rhi) == (pytest.approx(np.quantile(ratios, 0.025)), pytest.approx(np.quantile(ratios, 0.975)))


def test_missing_scores_drop_the_item_from_both_sides():
    d = paired_difference(A + [float("nan")], B + [0.9], samples=200, seed=7)
    assert d.n == 4 and d.mean == pytest.approx(0.07)
    with pytest.raises(ValueError, match="same items"):
        paired_difference(A, B[:3])


# 40 items of very different difficulty; the distilled student is 0.03 better on nearly every one.
BASE = [0.05 + 0.5 * ((11 * i) % 40) / 40 for i in range(40)]


def _rows(distilled, raw, teacher=None, gold=None):
    rows = []
    for i in range(len(raw)):
        r = {"id": f"item-{i}", "instruction": f"instruction {i}", "input": "", "raw_student_rouge_l": raw[i],
             "distilled_student_rouge_l": distilled[i]}
        if teacher:
            r["teacher_rouge_l"] = teacher[i]
        if gold:
            r["gold_student_rouge_l"] = gold[i]
        rows.append(r)
    return rows


def test_overlapping_separate_intervals_but_paired_interval_excludes_zero_is_better():
    raw = BASE
    distilled = [b + 0.03 + (0.004 if i % 2 else -0.004) for i, b in enumerate(BASE)]
    _, lo_d, _ = bootstrap_ci(distilled)
    _, _, hi_r = bootstrap_ci(raw)
    assert lo_d < hi_r  # the separate intervals overlap: the old rule would say "not conclusive"
    v = paired_verdicts(_rows(distilled, raw), ["raw_student", "distilled_student"], samples=1000)
    d = v["distilled_vs_raw"]
    assert d["verdict"] == "better" and d["lo"] > 0 and d["n"] == 40
    assert d["sentence"].startswith("distilled student beats raw student: distilled student - raw student = +0.030")


def test_a_small_noisy_difference_is_not_distinguishable_and_says_how_many_items_it_would_take():
    raw = BASE
    distilled = [b + (0.05 if i % 2 else -0.04) for i, b in enumerate(BASE)]  # +0.005 on average, sd ~0.046
    v = paired_verdicts(_rows(distilled, raw), ["raw_student", "distilled_student"], samples=1000)
    d = v["distilled_vs_raw"]
    diff = np.array(distilled) - np.array(raw)
    z = NormalDist().inv_cdf(0.975) + NormalDist().inv_cdf(0.8)
    need = math.ceil((z * diff.std(ddof=1) / diff.mean()) ** 2)
    assert d["verdict"] == "not distinguishable" and d["lo"] < 0 < d["hi"] and d["n_needed"] == need > 40
    assert (f"distilled student and raw student are not distinguishable on 40 items" in d["sentence"]
            and f"about {need} items would be needed" in d["sentence"])


def test_report_and_cli_answer_the_three_questions_per_held_out_set(tmp_path):
    teacher = [b + 0.2 for b in BASE]
    gold = [b + 0.01 + (0.05 if i % 2 else -0.05) for i, b in enumerate(BASE)]
    good = [b + 0.03 for b in BASE]
    contenders = ["teacher", "raw_student", "distilled_student", "gold_student"]
    sets = {}
    for name, distilled in (("alpaca-dev", good), ("self-instruct-heldout", BASE)):
        rows = _rows(distilled, BASE, teacher, gold)
        ev = {"eval_set": f"{name}.jsonl", "items": 40, "paired": paired_verdicts(rows, contenders, samples=500)}
        for c, scores in zip(contenders, (teacher, BASE, distilled, gold)):
            mean, lo, hi = bootstrap_ci(scores)
            ev[c] = {"rouge_l": mean, "rouge_l_ci": [lo, hi]}
        sets[name] = ev
    evaluation = {**sets["alpaca-dev"], "max_new_tokens": 64, "sets": sets,
                  "gold_training": {"source": "gold.jsonl", "examples": 12, "distilled_examples": 12,
                                    "contaminated_dropped": 1, "steps": 6, "method": "sft", "finetune": "lora"}}
    write_report(tmp_path, {"run_id": "r", "evaluation": evaluation})
    md = (tmp_path / "report.md").read_text()
    assert "## Verdict" in md and "| ROUGE-L, paired | alpaca-dev (40 items) | self-instruct-heldout (40 items) |" in md
    row = next(line for line in md.splitlines() if line.startswith("| distilled - raw |"))
    # a gain on the tuning distribution only: better on one set, exactly 0 (no difference) on the other
    assert "+0.030" in row and "**better**" in row and "+0.000 [+0.000, +0.000] not distinguishable" in row
    assert "## Held-out set: alpaca-dev" in md and "## Held-out set: self-instruct-heldout" in md
    assert "**distilled student beats raw student**" in md
    assert "Gold-trained student: 12 records of `gold.jsonl`" in md and "(1 skipped)" in md
    assert (tmp_path / "paired.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "scores-self-instruct-heldout.png").exists()
    h = json.loads((tmp_path / "report.json").read_text())["headline"]
    assert h["sets"]["alpaca-dev"]["paired"]["distilled_vs_raw"]["verdict"] == "better"
    assert h["sets"]["self-instruct-heldout"]["paired"]["distilled_vs_teacher"]["verdict"] == "worse"
    lines = verdict_lines(headline({"evaluation": evaluation})["sets"])
    assert lines[0].startswith("alpaca-dev (40 items), ROUGE-L: teacher ")
    assert any(line.split()[:3] == ["distilled", "vs", "raw"] and line.endswith("better") for line in lines)
    assert any("distilled vs gold" in line and "not distinguishable on 40 items (~" in line for line in lines)
    assert any("keeps of the teacher" in line and "%" in line for line in lines)
