"""A run is the run it says it is: a dataset version is whole or absent after a real kill, a run is completed only
after its model is registered and promoted, the registry keeps what training saved, the champion swap has no
window, and a resumed run with another config is refused (or re-runs what changed, and says so)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.records import Record
from pipeline.store import Run, save_records

ROOT = Path(__file__).resolve().parents[1]

# Runs a pipeline function in a child process that SIGKILLs itself the moment a named function is entered: a real
# kill at a chosen point, so the test is exact instead of racing a timer.
KILL_AT = textwrap.dedent("""
    import os, signal, sys
    target = sys.argv[1]
    def hook(frame, event, arg):
        if event == "call" and frame.f_code.co_name == target:
            os.kill(os.getpid(), signal.SIGKILL)
    import importlib
    module, func = sys.argv[2].rsplit(".", 1)
    fn = getattr(importlib.import_module(module), func)
    from pipeline.store import Run
    sys.setprofile(hook)
    fn(Run.open(sys.argv[3]))
""")


def run_killed_at(target: str, function: str, run_dir: Path) -> int:
    proc = subprocess.run([sys.executable, "-c", KILL_AT, target, function, str(run_dir)], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    return proc.returncode


def generated_run(tmp_path: Path, run_id: str = "r", extra: list[str] | None = None) -> Run:
    cfg = load_config(overrides=[f"runs_dir={tmp_path / 'runs'}", *(extra or [])])
    run = Run.create(cfg, run_id)
    records = [Record(instruction=f"Explain why {topic} matter to people who study {field}.",
                      output=f"{topic.capitalize()} matter because they shape {field}.", status="pending")
               for topic in ("rivers", "bees", "glaciers", "owls") for field in ("history", "farming", "physics")]
    save_records(run.path("generated.parquet"), records)
    return run


@pytest.mark.slow  # a child process imports the stages (torch, transformers): tens of seconds on 2 cores
def test_a_dataset_version_is_whole_or_absent_after_a_kill(tmp_path):
    from pipeline.curate.fastdedupe import load_pool
    from pipeline.stages import curate_stage

    run = generated_run(tmp_path)
    version = run.path("datasets", "curated")
    # Killed while writing the near-duplicate pool, the last of the version's files.
    assert run_killed_at("save_pool", "pipeline.stages.curate_stage", run.dir) == -signal.SIGKILL
    manifest = version / "manifest.json"
    if manifest.exists():  # before the fix: a manifest that says "complete" beside missing files
        files = json.loads(manifest.read_text())["files"]
        listed = [files["alpaca_jsonl"], files["near_dup_pool"], *files["plots"]]
        missing = [f for f in listed if not (version / f).exists()]
        assert not missing, f"manifest written before {missing}"
    assert not version.exists()

    # The resume writes the version whole, and a later version can dedupe against it.
    summary = curate_stage(Run.open(run.dir))
    assert summary["accepted"] > 0
    assert all((version / f).exists() for f in ("accepted.parquet", "rejected.parquet", "accepted.alpaca.jsonl",
                                                "near_dup_pool.npz", "lengths.png", "manifest.json"))
    assert len(load_pool(version / "near_dup_pool.npz")) >= summary["accepted"]
