"""The whole `distill` flow against a fake OpenAI-compatible teacher on loopback and a tiny real student."""

import json

import pyarrow.parquet as pq

from flows.distill import distill
from pipeline.store import Catalog


def test_full_flow_writes_a_complete_run_folder(fast_config, fake_server):
    result = distill(config=fast_config, run_id="e2e")
    run = fast_config.runs_dir / "e2e"
    for name in ("config.yaml", "report.md", "report.json", "scores.png", "eval/outputs.jsonl", "adapter/adapter_config.json",
                 "datasets/curated/accepted.parquet", "datasets/curated/rejected.parquet", "datasets/curated/manifest.json"):
        assert (run / name).exists(), name
    accepted = pq.read_table(run / "datasets/curated/accepted.parquet").to_pylist()
    rejected = pq.read_table(run / "datasets/curated/rejected.parquet").to_pylist()
    assert accepted and all(r["status"] == "accepted" and r["output"] for r in accepted)
    assert all(r["reject_reason"] for r in rejected)
    # provenance travels with every record
    assert all(r["template"] == "self_instruct_completion" and r["template_hash"] and r["prompt_seed_ids"] for r in accepted)
    report = (run / "report.md").read_text()
    for row in ("| Teacher |", "| Raw student |", "| Distilled student |"):
        assert row in report
    outputs = [json.loads(line) for line in (run / "eval/outputs.jsonl").read_text().splitlines()]
    # both default held-out sets, 3 items each, answered by all four contenders
    assert [o["eval_set"] for o in outputs] == ["alpaca-dev"] * 3 + ["self-instruct-heldout"] * 3
    assert all(o[c] is not None for o in outputs for c in ("teacher", "raw_student", "distilled_student", "gold_student"))
    # the gold-trained student: same number of examples and steps as the distilled one, decontaminated data
    gold, distilled = (json.loads((run / f).read_text()) for f in ("gold/train.json", "train.json"))
    assert gold["examples"] == distilled["examples"] == len(pq.read_table(run / "gold/dataset.parquet"))
    assert gold["steps"] == distilled["steps"] and gold["method"] == distilled["method"]
    assert "| Gold-trained student |" in report and "## Verdict" in report
    summary = json.loads((run / "eval/summary.json").read_text())
    assert set(summary["sets"]) == {"alpaca-dev", "self-instruct-heldout"}
    assert {"distilled_vs_raw", "distilled_vs_gold", "distilled_vs_teacher"} <= set(summary["sets"]["self-instruct-heldout"]["paired"])
    assert result["sets"]["alpaca-dev"]["paired"]["distilled_vs_raw"]["n"] == 3
    assert json.loads((run / "status.json").read_text())["state"] == "completed"
    assert Catalog(fast_config.runs_dir).rows("runs", "WHERE id='e2e'")[0]["state"] == "completed"
    assert result["run_dir"] == str(run.resolve())


def test_rerun_pays_for_no_teacher_call(fast_config, fake_server):
    distill(config=fast_config, run_id="first", stages_to_run="data")
    paid = fake_server.total_requests
    assert paid > 0
    distill(config=fast_config, run_id="second", stages_to_run="data")
    assert fake_server.total_requests == paid
    first = pq.read_table(fast_config.runs_dir / "first/datasets/curated/accepted.parquet").column("id").to_pylist()
    second = pq.read_table(fast_config.runs_dir / "second/datasets/curated/accepted.parquet").column("id").to_pylist()
    assert first == second
