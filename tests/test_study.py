"""`distill study`: the report and its paired verdicts from saved cell results (no training), resuming from saved
cells, and (slow) a real study on the tiny student killed mid-way and resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.errors import ModelNotFoundError
from pipeline.records import Record
from pipeline.study import Cell, StudyOptions, make_plan, plan_cells, run_study
from pipeline.study_report import analyse, write_study_report
from tests.conftest import TINY_STUDENT_DROP

ITEMS = [f"i{k}" for k in range(30)]
RNG = np.random.default_rng(7)
BASE = RNG.uniform(0.0, 0.6, len(ITEMS))  # items differ a lot in difficulty, as real eval items do


def cell(label: str, shift: float, noise: float = 0.0, steps: int | None = 8) -> dict:
    scores = np.clip(BASE + shift + RNG.normal(0, noise, len(ITEMS)), 0, 1) if noise else BASE + shift
    mean = float(np.mean(scores))
    return {"label": label, "rouge_l": mean, "rouge_l_ci": [mean - 0.1, mean + 0.1], "item_ids": ITEMS,
            "per_item": [float(x) for x in scores], "info": {"steps": steps, "last_loss": 1.5, "examples": 40,
                                                             "trainable_params": 1000}, "seconds": 1.0}


def saved_study(questions=("q1", "q2", "q3")) -> dict:
    """A study as run_study would assemble it, with hand-made per-item scores."""
    options = StudyOptions(questions=questions, methods=("sft", "kd"), targets=("attention", "mlp", "all-linear"),
                           layers=("early", "late"))
    shifts = {"raw student": 0.0, "teacher": 0.2, "distilled sft": 0.03, "gold sft": 0.0,
              "distilled kd": 0.0, "gold kd": 0.0, "all-linear, all layers": 0.03, "attention, all layers": 0.05,
              "mlp, all layers": 0.03, "all-linear, early layers": 0.0, "all-linear, late layers": 0.01}
    cells, plan = {}, []
    for c in plan_cells(options):
        key = f"{c.data}-{c.label.replace(' ', '_')}"
        noise = 0.05 if c.label in ("distilled kd", "mlp, all layers") else 0.0
        cells[key] = cell(c.label, shifts[c.label], noise, steps=None if c.data in ("raw", "teacher") else 8)
        plan.append({"question": c.question, "label": c.label, "data": c.data, "overrides": list(c.overrides),
                     "group": c.group, "key": key})
    per = lambda s: [float(x) for x in np.clip(BASE + s, 0, 1)]  # noqa: E731
    cut = {"cut": "middle:10", "layers_left": 20, "contenders": {
        m: {"rouge_l": float(np.mean(per(s))), "rouge_l_ci": [0.0, 0.5], "item_ids": ITEMS, "per_item": per(s)}
        for m, s in (("raw", -0.2), ("sft", 0.0), ("kd", 0.05))}}
    study = {"source": {"data": "accepted.parquet", "command": "distill study --data accepted.parquet"},
             "questions": {q: "" for q in questions}, "options": {"questions": list(questions)},
             "config_yaml": "train:\n  max_steps: 8\n", "config_fingerprint": "abc",
             "data": {"distilled": {"records": 40, "contaminated_dropped": 2},
                      "gold": {"records": 40, "same_instruction_as_distilled": 40, "gold_pool_contaminated": 5}},
             "eval": {"set": "data/alpaca_dev.jsonl", "items": len(ITEMS), "max_new_tokens": 64},
             "budget": {"max_steps": 8, "epochs": 2, "batch_size": 4, "grad_accum": 1, "max_length": 256},
             "student": {"source": "embedded-cut", "drop_layers": "12-17", "base_cut": "12-17", "layers_left": 24},
             "kd": {"alpha": 0.5, "temperature": 2.0}, "plan": plan, "cells": cells, "cuts": [cut],
             "cells_ran": 3, "cells_reused": 4, "bootstrap_samples": 500, "wall_s": 90.0}
    study["findings"] = analyse(study)
    return study


def test_study_report_gives_paired_verdicts_from_saved_cells(tmp_path):
    study = saved_study()
    f = study["findings"]
    sft, kd = f["q1"]["rows"]
    # Every item gains 0.03: the separate intervals (±0.1 here, as wide as item difficulty makes them) overlap, but
    # the paired difference is exactly +0.03 with a zero-width interval, so it is "better".
    assert sft["method"] == "sft" and sft["distilled_vs_gold"]["verdict"] == "better"
    assert sft["distilled_vs_gold"]["mean"] == pytest.approx(0.03) and sft["distilled_vs_gold"]["lo"] > 0
    # Pure noise around the same scores: not distinguishable, with the interval straddling 0 and the items needed.
    d = kd["distilled_vs_gold"]
    assert d["verdict"] == "not distinguishable" and d["lo"] < 0 < d["hi"]
    assert "not distinguishable on 30 items" in d["sentence"]
    assert sft["distilled_vs_teacher"]["verdict"] == "worse"
    # Q3: the student's own cut comes from Q1's cells, then the extra cut; KD beats SFT at middle:10 only.
    rows = f["q3"]["rows"]
    assert [(r["cut"], r["from_q1"]) for r in rows] == [("12-17", True), ("middle:10", False)]
    assert rows[1]["vs_sft"]["kd"]["verdict"] == "better" and rows[1]["vs_raw"]["sft"]["verdict"] == "better"
    assert rows[0]["vs_sft"]["kd"]["verdict"] != "better" and rows[0]["vs_teacher"]["sft"]["verdict"] == "worse"
    assert "kd beats SFT at: middle:10, loses to it at: 12-17" in f["answers"]["q3"]
    assert f["answers"]["q1"].startswith("sft: distilled is better than gold (+0.030")

    # Q2: each placement against the raw student and against all-linear on all layers.
    q2 = {r["label"]: r for r in f["q2"]["rows"]}
    assert q2["attention, all layers"]["vs_reference"]["verdict"] == "better"
    assert q2["mlp, all layers"]["vs_reference"]["verdict"] == "not distinguishable"
    assert q2["all-linear, early layers"]["vs_reference"]["verdict"] == "worse"
    assert q2["all-linear, late layers"]["vs_raw"]["verdict"] == "better"
    assert "all-linear, all layers" in q2 and "vs_reference" not in q2["all-linear, all layers"]  # it is the reference
    assert "better than all-linear on all layers: attention, all layers." in f["answers"]["q2"]

    write_study_report(tmp_path, study)
    md = (tmp_path / "study.md").read_text()
    assert "## Q1." in md and "## Q2." in md and "## Q3." in md
    assert "| sft | " in md and "**better**" in md and " n.d." in md
    assert "```yaml\ntrain:\n  max_steps: 8\n```" in md  # the exact resolved config rides along
    assert json.loads((tmp_path / "study.json").read_text())["findings"]["q1"]["rows"][0]["method"] == "sft"
    assert (tmp_path / "q1_data.png").stat().st_size > 1000 and (tmp_path / "q3_cuts.png").stat().st_size > 1000
    assert (tmp_path / "q2_placement.png").stat().st_size > 1000


def test_comparing_cells_scored_on_different_items_is_refused():
    study = saved_study(questions=("q1",))
    gold_key = next(p["key"] for p in study["plan"] if p["label"] == "gold sft")
    study["cells"][gold_key]["item_ids"] = list(reversed(ITEMS))
    with pytest.raises(ValueError, match="different items"):
        analyse(study)


def records(n: int = 6) -> list[Record]:
    return [Record(instruction=f"Give one word that rhymes with number {k}.", output=f"Word {k}.", status="accepted")
            for k in range(n)]


def test_gold_data_matches_distilled_size_and_is_decontaminated():
    from pipeline import DATA_DIR

    cfg = load_config(overrides=["evaluate.limit=3"])
    gold_rows = [json.loads(x) for x in (DATA_DIR / "alpaca_gold_train.jsonl").read_text().splitlines()[:3]]
    # Two distilled records answer gold instructions (their gold twins are used), one copies an eval item.
    dev = json.loads((DATA_DIR / "alpaca_dev.jsonl").read_text().splitlines()[0])
    recs = [Record(instruction=g["instruction"], input=g["input"], output="teacher's answer", status="accepted")
            for g in gold_rows[:2]] + records(3) + [Record(instruction=dev["instruction"], input=dev["input"],
                                                           output="x", status="accepted")]
    plan = make_plan(cfg, recs, StudyOptions(questions=("q1",), methods=("sft",), teacher=False))
    distilled, gold = plan.data["distilled"], plan.data["gold"]
    assert len(distilled) == 5 and plan.data_info["distilled"]["contaminated_dropped"] == 1
    assert len(gold) == len(distilled) and all(r.source == "gold" for r in gold)
    assert [g.output for g in gold[:2]] == [g["output"] for g in gold_rows[:2]]
    assert plan.data_info["gold"]["same_instruction_as_distilled"] == 2
    assert len({r.id for r in gold}) == len(gold)


def test_study_resumes_from_saved_cells_and_runs_only_missing_ones(tmp_path):
    # The student's GGUF does not exist: any cell that had to run would fail to load its model.
    cfg = load_config(overrides=["evaluate.limit=4", f"student.cut_from={tmp_path / 'missing.gguf'}",
                                 "evaluate.bootstrap_samples=100"])
    options = StudyOptions(questions=("q1",), methods=("sft",), teacher=False)
    plan = make_plan(cfg, records(), options)
    ids = [it.id for it in plan.items]
    keys = sorted(set(plan.keys.values()))
    assert len(keys) == 3  # raw, distilled sft, gold sft
    for c, k in plan.keys.items():
        per = [0.1 + 0.01 * i + (0.05 if c.data == "distilled" else 0.0) for i in range(len(ids))]
        (tmp_path / "out" / "cells").mkdir(parents=True, exist_ok=True)
        (tmp_path / "out" / "cells" / f"{k}.json").write_text(json.dumps(
            {"label": c.label, "data": c.data, "rouge_l": float(np.mean(per)), "rouge_l_ci": [0, 1], "item_ids": ids,
             "per_item": per, "info": {"steps": 2}, "seconds": 0.1}))
    study = run_study(cfg, records(), tmp_path / "out", options)
    assert (study["cells_ran"], study["cells_reused"]) == (0, 3)
    assert study["findings"]["q1"]["rows"][0]["distilled_vs_gold"]["verdict"] == "better"
    assert "max_steps" in (tmp_path / "out" / "study.md").read_text()
    # A changed setting is a different experiment: its cells are not the saved ones, so they would run.
    changed = load_config(overrides=["evaluate.limit=4", f"student.cut_from={tmp_path / 'missing.gguf'}",
                                     "train.learning_rate=0.001"])
    assert set(make_plan(changed, records(), options).keys.values()) != set(keys)
    # With one saved cell gone, the study runs exactly that cell (and here fails loading the missing model).
    (tmp_path / "out" / "cells" / f"{plan.keys[Cell('q1', 'gold sft', 'gold', ('train.method=sft',), 'sft')]}.json").unlink()
    with pytest.raises(ModelNotFoundError):
        run_study(cfg, records(), tmp_path / "out", options)


def test_unknown_method_and_bad_override_are_named():
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="Unknown method"):
        plan_cells(StudyOptions(methods=("sft", "magic")))
    from pipeline.config import with_overrides

    with pytest.raises(ConfigError, match="study cell 'x'.*unknown key 'train.max_step'"):
        with_overrides(load_config(), ["train.max_step=3"], source="study cell 'x'")


@pytest.mark.slow
@pytest.mark.timeout(2400)  # two real CLI processes; on a shared, busy 2-core box each start alone takes minutes
def test_study_on_tiny_student_resumes_after_kill(tmp_path):
    """A real study (raw, distilled SFT, gold SFT on the 4-layer student), killed once its first cell is saved."""
    from pipeline.store import save_records

    data = tmp_path / "accepted.parquet"
    save_records(data, records(8))
    out = tmp_path / "study"
    cmd = [sys.executable, "-m", "pipeline.cli", "study", "--data", str(data), "--out", str(out),
           "--questions", "1", "--methods", "sft", "--no-teacher",
           "--set", f"student.drop_layers={TINY_STUDENT_DROP}", "--set", "train.max_steps=2",
           "--set", "train.batch_size=2", "--set", "train.max_length=64", "--set", "evaluate.limit=3",
           "--set", "evaluate.max_new_tokens=8", "--set", "evaluate.bootstrap_samples=100"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 1200
        while not list((out / "cells").glob("*.json")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        os.killpg(proc.pid, signal.SIGKILL)  # the whole process group, as a kill -9 of the study would
    finally:
        proc.wait()
    saved = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    assert 1 <= len(saved) < 3 and not (out / "study.md").exists()

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "study written to" in done.stdout and "Q1" in done.stdout
    study = json.loads((out / "study.json").read_text())
    assert study["cells_reused"] == len(saved) and study["cells_ran"] == 3 - len(saved)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json") if p.name in saved} == saved
    row = study["findings"]["q1"]["rows"][0]
    assert row["method"] == "sft" and row["steps"] == row["gold_steps"] == 2 and row["examples"] == 8
    assert row["distilled_vs_gold"]["n"] == 3 and row["distilled_vs_gold"]["verdict"] in (
        "better", "worse", "not distinguishable")
    assert (out / "q1_data.png").exists() and "train.max_steps=2" in (out / "study.md").read_text()


def test_study_without_a_data_source_names_both_options(capsys):
    from pipeline.cli import main

    assert main(["study", "--profile", "cpu-demo"]) == 2
    err = capsys.readouterr().err
    assert "--run-id ID" in err and "--data FILE" in err
