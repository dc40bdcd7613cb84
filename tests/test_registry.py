"""Champion/challenger: the promotion rule on metric dicts, and the registry over a real catalog."""

import json

import pytest

from pipeline.config import RetrainConfig, load_config
from pipeline.errors import DistillError
from pipeline.registry import champion, decide, decisions, merge_accepted, promote, register_model
from pipeline.records import Record
from pipeline.store import Catalog, Run

RULE = RetrainConfig(metric="rouge_l", guards={"tokens_per_s": 0.3, "latency_s": 0.5})
# 30 items of very different difficulty: separate per-model intervals are wide, per-item differences are not.
BASE = [0.05 + 0.6 * ((7 * i) % 30) / 30 for i in range(30)]


def per_item(scores, ids=None):
    ids = ids or range(len(scores))
    return {json.dumps([f"item-{i}", f"instruction {i}", ""]): s for i, s in zip(ids, scores)}


def metrics(shift=0.0, noise=0.0, tps=50.0, latency=1.0, ids=None):
    """A model's catalog metrics: per-item ROUGE-L = BASE + shift (+ alternating noise), and its guard metrics."""
    scores = [b + shift + (noise if i % 2 else -noise) for i, b in enumerate(BASE)]
    mean = sum(scores) / len(scores)
    return {"rouge_l": mean, "rouge_l_ci": [mean - 0.1, mean + 0.1], "tokens_per_s": tps, "latency_s": latency,
            "per_item": per_item(scores, ids)}


def test_first_model_becomes_champion():
    d = decide(metrics(), None, RULE)
    assert d.promoted and "no champion" in d.reason


def test_small_gain_inside_the_paired_interval_is_not_enough():
    # +0.01 on average, but half the items move +0.06 and half -0.04: the paired interval straddles 0
    d = decide(metrics(0.01, noise=0.05), metrics(), RULE)
    assert not d.promoted and d.paired["verdict"] == "not distinguishable"
    assert d.delta == pytest.approx(0.01) and d.paired["lo"] < 0 < d.paired["hi"]
    assert "not distinguishable on 30 items" in d.reason and "items would be needed" in d.reason


def test_consistent_gain_is_promoted_although_the_separate_intervals_overlap():
    new, old = metrics(0.02, noise=0.005), metrics()
    # the intervals each model reports overlap by far (±0.1 around means 0.02 apart) ...
    assert new["rouge_l_ci"][0] < old["rouge_l_ci"][1]
    d = decide(new, old, RULE)
    # ... but every item moved up: the paired interval excludes 0
    assert d.promoted and d.paired["verdict"] == "better" and d.paired["lo"] > 0
    assert d.delta == pytest.approx(0.02) and all(c["ok"] for c in d.checks)
    assert d.reason.startswith("promoted: challenger beats champion")


def test_worse_model_stays_challenger():
    d = decide(metrics(-0.05), metrics(), RULE)
    assert not d.promoted and d.delta < 0 and d.paired["verdict"] == "worse"


def test_guard_regression_blocks_promotion():
    d = decide(metrics(0.1, tps=20.0), metrics(tps=50.0), RULE)
    assert not d.promoted and "tokens_per_s regressed" in d.reason
    # lower is better for latency: twice as slow is beyond a 50% tolerance
    d = decide(metrics(0.1, latency=2.5), metrics(latency=1.0), RULE)
    assert not d.promoted and "latency_s regressed" in d.reason
    # a guard that only one model measured is skipped, and says so
    d = decide({**metrics(0.1), "tokens_per_s": None}, metrics(), RULE)
    assert d.promoted and any("skipped" in c.get("note", "") for c in d.checks)


def test_models_that_share_no_items_are_not_compared():
    d = decide(metrics(0.3, ids=range(100, 130)), metrics(), RULE)
    assert not d.promoted and "share no eval items" in d.reason and d.paired is None


def test_pairs_only_the_shared_items():
    # the challenger answered 10 more items (worse ones): only the 30 both answered count
    new = metrics(0.05)
    new["per_item"].update(per_item([0.0] * 10, range(30, 40)))
    d = decide(new, metrics(), RULE)
    assert d.promoted and d.paired["n"] == 30 and d.delta == pytest.approx(0.05)


def test_no_per_item_scores_no_promotion():
    d = decide({"rouge_l": 0.9, "rouge_l_ci": [0.89, 0.91]}, metrics(), RULE)
    assert not d.promoted and "unpaired" in d.reason


def _trained_run(runs_dir, run_id, shift):
    """A run folder with an adapter file, an evaluation and its per-item outputs, as train and evaluate leave them."""
    cfg = load_config(overrides=[f"runs_dir={runs_dir}"])
    run = Run.create(cfg, run_id)
    run.path("adapter").mkdir()
    run.path("adapter", "adapter_model.safetensors").write_text(f"weights of {run_id}")
    scores = [b + shift for b in BASE]
    run.path("eval").mkdir()
    run.path("eval", "outputs.jsonl").write_text("".join(
        json.dumps({"eval_set": "alpaca-dev", "id": f"item-{i}", "instruction": f"instruction {i}", "input": "",
                    "distilled_student": "an answer", "distilled_student_rouge_l": s}) + "\n"
        for i, s in enumerate(scores)))
    mean = sum(scores) / len(scores)
    evaluation = {"eval_set": "dev", "items": 30,
                  "distilled_student": {"rouge_l": mean, "rouge_l_ci": [mean - 0.1, mean + 0.1], "tokens_per_s": 40.0}}
    model_id = register_model(run, {"id": f"{run_id}/curated"}, evaluation, {"distilled_student": mean})
    return run, model_id


def test_two_retrains_with_a_worse_second_keep_the_first_champion(tmp_path):
    runs_dir = tmp_path / "runs"
    run1, first = _trained_run(runs_dir, "r1", 0.10)
    assert promote(run1.catalog, first, RULE).promoted
    run2, second = _trained_run(runs_dir, "r2", 0.02)
    d = promote(run2.catalog, second, RULE)
    assert not d.promoted and d.champion_id == first and d.paired["n"] == 30

    catalog = Catalog(runs_dir)
    assert champion(catalog)["id"] == first
    roles = {r["id"]: r["role"] for r in catalog.rows("models")}
    assert roles == {first: "champion", second: "challenger"}
    recorded = decisions(catalog)
    assert [r["model_id"] for r in recorded] == [first, second]
    assert recorded[1]["promoted"] == 0 and "challenger is worse than champion" in recorded[1]["reason"]
    # the stable alias still serves the first model
    pointer = json.loads((runs_dir / "champion" / "champion.json").read_text())
    assert pointer["model_id"] == first
    assert (runs_dir / "champion" / "adapter" / "adapter_model.safetensors").read_text() == "weights of r1"

    # a third model 0.02 better on every item (its own interval overlaps the champion's) takes over on paired
    # evidence from the two runs' eval/outputs.jsonl; the old champion is retired and the alias moves
    run3, third = _trained_run(runs_dir, "r3", 0.12)
    d = promote(run3.catalog, third, RULE)
    assert d.promoted and d.paired["lo"] > 0 and d.delta == pytest.approx(0.02)
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
