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
    assert len(outputs) == 3 and all("distilled_student" in o and "raw_student" in o for o in outputs)
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
