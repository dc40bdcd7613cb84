"""`distill export`: a dataset version as Alpaca JSONL or Parquet; the Hub path refuses clearly without a token."""

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq

from pipeline.config import load_config
from pipeline.records import Record
from pipeline.store import Run


def make_version(tmp_path):
    cfg = load_config(overrides=[f"runs_dir={tmp_path / 'runs'}"])
    run = Run.create(cfg, run_id="x")
    accepted = [Record(instruction=f"Name {i} rivers.", input="", output=f"{i} rivers", status="accepted") for i in range(3)]
    return run.save_dataset("curated", accepted, [Record(instruction="draw", status="rejected", reject_reason="blacklisted_word")], {})


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "export", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


def test_export_jsonl_and_parquet(tmp_path):
    version = make_version(tmp_path)
    out = cli(str(version), str(tmp_path / "out.jsonl"))
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert rows == [{"instruction": f"Name {i} rivers.", "input": "", "output": f"{i} rivers"} for i in range(3)]
    out = cli(str(version), "--format", "parquet", str(tmp_path / "out.parquet"))
    assert out.returncode == 0 and pq.read_table(tmp_path / "out.parquet").num_rows == 3


def test_hub_without_token_names_the_variable(tmp_path):
    version = make_version(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "export", str(version), "--format", "hub", "me/data"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 2 and "$HF_TOKEN" in out.stderr and "Traceback" not in out.stderr


def test_not_a_version(tmp_path):
    out = cli(str(tmp_path), str(tmp_path / "o.jsonl"))
    assert out.returncode == 2 and "is not a dataset version" in out.stderr
