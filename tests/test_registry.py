"""Champion/challenger: the promotion rule on metric dicts, and the registry over a real catalog."""

import json

import pytest

from pipeline.config import RetrainConfig, load_config
from pipeline.errors import DistillError
from pipeline.registry import champion, decide, decisions, merge_accepted, promote, register_model
from pipeline.records import Record
from pipeline.store import Catalog, Run

RULE = RetrainConfig(metric="rouge_l", guards={"tokens_per_s": 0.3, "latency_s": 0.5})


def metrics(score, half=0.02, tps=50.0, latency=1.0, eval_set="dev", items=30):
    return {"rouge_l": score, "rouge_l_ci": [score - half, score + half], "tokens_per_s": tps, "latency_s": latency,
            "eval_set": eval_set, "eval_items": items}


def test_first_model_becomes_champion():
    d = decide(metrics(0.10), None, RULE)
    assert d.promoted and "no champion" in d.reason


def test_improvement_inside_the_interval_is_not_enough():
    d = decide(metrics(0.13, half=0.04), metrics(0.10, half=0.02), RULE)
    assert not d.promoted
    assert d.delta == pytest.approx(0.03) and d.margin == pytest.approx(0.04)
    assert "not more than" in d.reason


def test_clear_improvement_is_promoted():
    d = decide(metrics(0.20), metrics(0.10), RULE)
    assert d.promoted and d.delta == pytest.approx(0.10)
    assert all(c["ok"] for c in d.checks)


def test_worse_model_stays_challenger():
    d = decide(metrics(0.05), metrics(0.10), RULE)
    assert not d.promoted and d.delta < 0


def test_guard_regression_blocks_promotion():
    d = decide(metrics(0.20, tps=20.0), metrics(0.10, tps=50.0), RULE)
    assert not d.promoted and "tokens_per_s regressed" in d.reason
    # lower is better for latency: twice as slow is beyond a 50% tolerance
    d = decide(metrics(0.20, latency=2.5), metrics(0.10, latency=1.0), RULE)
    assert not d.promoted and "latency_s regressed" in d.reason
    # a guard that only one model measured is skipped, and says so
    d = decide({**metrics(0.20), "tokens_per_s": None}, metrics(0.10), RULE)
    assert d.promoted and any("skipped" in c.get("note", "") for c in d.checks)


def test_different_eval_sets_are_not_compared():
    d = decide(metrics(0.30, items=10), metrics(0.10, items=30), RULE)
    assert not d.promoted and "different eval set" in d.reason


def _trained_run(runs_dir, run_id, score):
    """A run folder with an adapter file and an evaluation, as the train and evaluate stages leave them."""
    cfg = load_config(overrides=[f"runs_dir={runs_dir}"])
    run = Run.create(cfg, run_id)
    run.path("adapter").mkdir()
    run.path("adapter", "adapter_model.safetensors").write_text(f"weights of {run_id}")
    evaluation = {"eval_set": "dev", "items": 30,
                  "distilled_student": {"rouge_l": score, "rouge_l_ci": [score - 0.01, score + 0.01], "tokens_per_s": 40.0}}
    model_id = register_model(run, {"id": f"{run_id}/curated"}, evaluation, {"distilled_student": score})
    return run, model_id


def test_two_retrains_with_a_worse_second_keep_the_first_champion(tmp_path):
    runs_dir = tmp_path / "runs"
    run1, first = _trained_run(runs_dir, "r1", 0.20)
    assert promote(run1.catalog, first, RULE).promoted
    run2, second = _trained_run(runs_dir, "r2", 0.12)
    d = promote(run2.catalog, second, RULE)
    assert not d.promoted and d.champion_id == first

    catalog = Catalog(runs_dir)
    assert champion(catalog)["id"] == first
    roles = {r["id"]: r["role"] for r in catalog.rows("models")}
    assert roles == {first: "champion", second: "challenger"}
    recorded = decisions(catalog)
    assert [r["model_id"] for r in recorded] == [first, second]
    assert recorded[1]["promoted"] == 0 and "not more than" in recorded[1]["reason"]
    # the stable alias still serves the first model
    pointer = json.loads((runs_dir / "champion" / "champion.json").read_text())
    assert pointer["model_id"] == first
    assert (runs_dir / "champion" / "adapter" / "adapter_model.safetensors").read_text() == "weights of r1"

    # a clearly better third model takes over; the old champion is retired and the alias moves
    run3, third = _trained_run(runs_dir, "r3", 0.40)
    assert promote(run3.catalog, third, RULE).promoted
    roles = {r["id"]: r["role"] for r in catalog.rows("models")}
    assert roles[first] == "retired" and roles[third] == "champion"
    assert (runs_dir / "champion" / "adapter" / "adapter_model.safetensors").read_text() == "weights of r3"


def test_retraining_data_merges_every_accepted_dataset(tmp_path):
    cfg = load_config(overrides=[f"runs_dir={tmp_path / 'runs'}"])
    a, b = Run.create(cfg, "a"), Run.create(cfg, "b")
    rec = lambda i: Record(instruction=f"Instruction number {i}", output=f"answer {i}", status="accepted")  # noqa: E731
    a.save_dataset("curated", [rec(1), rec(2)], [], {"parents": []})
    b.save_dataset("curated", [rec(2), rec(3)], [rec(9).reject("too_short")], {"parents": []})
    retrain = Run.create(cfg, "retrain")
    manifest = merge_accepted(retrain)
    assert manifest["accepted"] == 3 and manifest["kind"] == "retrain-merge"
    assert sorted(manifest["parents"]) == ["a/curated", "b/curated"]
    # a later merge does not count the earlier merge's records twice
    assert merge_accepted(Run.create(cfg, "retrain2"))["accepted"] == 3


def test_retraining_with_no_data_says_what_to_run(tmp_path):
    cfg = load_config(overrides=[f"runs_dir={tmp_path / 'runs'}"])
    with pytest.raises(DistillError, match="--data-only"):
        merge_accepted(Run.create(cfg, "empty"))
