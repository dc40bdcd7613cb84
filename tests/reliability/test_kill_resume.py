"""A run killed with SIGKILL during a stage resumes to the same result, and pays no teacher call twice."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import fast_overrides
from tests.fakes.openai_server import FakeOpenAIServer

pytestmark = pytest.mark.slow


def start_run(runs: Path, base_url: str, run_id: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "pipeline.cli", "run", "--run-id", run_id]
    for o in fast_overrides(runs, base_url) + ["generate.target_instructions=10", "generate.max_prompts=8",
                                               "train.max_steps=4"]:
        args += ["--set", o]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)


def cached_replies(runs: Path) -> int:
    db = runs / "cache" / "teacher.sqlite"
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=1) as c:
            return c.execute("SELECT COUNT(*) FROM replies").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def kill_when(proc: subprocess.Popen, condition, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended before the kill point: {proc.stderr.read()[-2000:]}")
        if condition():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError("kill point never reached")


def finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]


def dataset_ids(run: Path) -> list[str]:
    return pq.read_table(run / "datasets/curated/accepted.parquet").column("id").to_pylist()


def teacher_eval_answers(run: Path) -> list[str]:
    return [json.loads(line)["teacher"] for line in (run / "eval/outputs.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run, with its own server, for comparison."""
    runs = tmp_path_factory.mktemp("reference")
    with FakeOpenAIServer(latency_s=0.02) as server:
        finish(start_run(runs, server.base_url, "ref"))
    return runs / "ref"


@pytest.mark.parametrize("stage", ["generate", "train", "evaluate"])
def test_kill_during_stage_then_resume(stage, reference, tmp_path):
    runs = tmp_path / "runs"
    run = runs / "r"
    # Latency keeps the generate stage in flight long enough to be killed mid-batch.
    with FakeOpenAIServer(latency_s=0.05) as server:
        conditions = {
            "generate": lambda: cached_replies(runs) >= 3,
            "train": lambda: (run / "checkpoints").exists() or (run / "datasets/curated/manifest.json").exists(),
            "evaluate": lambda: (run / "train.json").exists(),
        }
        kill_when(start_run(runs, server.base_url, "r"), conditions[stage])
        assert json.loads((run / "status.json").read_text())["state"] == "running"
        assert not (run / "report.md").exists()
        sent_before, cached_before = server.total_requests, cached_replies(runs)

        finish(start_run(runs, server.base_url, "r"))

        # After the restart, exactly the replies missing from the cache were requested: nothing cached was paid
        # for again (a call in flight at the kill was never received, so it is legitimately sent once more).
        unique_needed = len(server.requests)
        assert server.total_requests - sent_before == unique_needed - cached_before
        assert cached_replies(runs) == unique_needed
    assert json.loads((run / "status.json").read_text())["state"] == "completed"
    assert dataset_ids(run) == dataset_ids(reference)
    assert teacher_eval_answers(run) == teacher_eval_answers(reference)
    assert (run / "report.md").exists()
