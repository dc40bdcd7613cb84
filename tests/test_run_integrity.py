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


# --- the registry ------------------------------------------------------------------------------------------

from pipeline.config import RetrainConfig  # noqa: E402
from pipeline.registry import champion, promote, register_model  # noqa: E402
from pipeline.store import Catalog  # noqa: E402

RULE = RetrainConfig(metric="rouge_l", guards={})


def trained_run(runs_dir: Path, run_id: str, score: float, finetune: str = "lora") -> tuple[Run, str]:
    """A run folder as train and evaluate leave it: what training saved, and an evaluation."""
    cfg = load_config(overrides=[f"runs_dir={runs_dir}", f"train.finetune={finetune}"])
    run = Run.create(cfg, run_id)
    saved = run.path("model" if finetune == "full" else "adapter")
    saved.mkdir()
    (saved / "model.safetensors").write_text(f"weights of {run_id}")
    evaluation = {"eval_set": "dev", "items": 30,
                  "distilled_student": {"rouge_l": score, "rouge_l_ci": [score - 0.01, score + 0.01]}}
    return run, register_model(run, {"id": f"{run_id}/curated"}, evaluation, {"distilled_student": score})


def test_full_finetune_registers_and_promotes_the_saved_model(tmp_path):
    runs = tmp_path / "runs"
    run, model_id = trained_run(runs, "full1", 0.3, finetune="full")
    row = Catalog(runs).rows("models", "WHERE id=?", (model_id,))[0]
    assert Path(row["path"]) == run.path("model").resolve()  # not adapter/, which full fine-tuning never writes
    assert promote(run.catalog, model_id, RULE).promoted
    pointer = json.loads((runs / "champion" / "champion.json").read_text())
    assert pointer["kind"] == "model" and (Path(pointer["model"]) / "model.safetensors").read_text() == "weights of full1"


def test_promotion_is_not_decided_twice_on_resume(tmp_path):
    runs = tmp_path / "runs"
    run1, first = trained_run(runs, "a", 0.2)
    promote(run1.catalog, first, RULE)
    run2, second = trained_run(runs, "b", 0.5)
    d = promote(run2.catalog, second, RULE)
    # The resumed run registers and promotes again: same decision, roles untouched, one decision on record.
    register_model(Run.open(run2.dir), {"id": "b/curated"}, {"eval_set": "dev", "items": 30, "distilled_student": {}}, {})
    again = promote(run2.catalog, second, RULE)
    assert again.promoted == d.promoted and again.reason == d.reason
    assert champion(Catalog(runs))["id"] == second
    from pipeline.registry import decisions
    assert [x["model_id"] for x in decisions(Catalog(runs))] == [first, second]


KILL_IN_PROMOTE = textwrap.dedent("""
    import os, signal, sys
    from pipeline.config import RetrainConfig
    from pipeline.registry import promote
    from pipeline.store import Catalog
    names, nth = set(sys.argv[2].split(",")), int(sys.argv[3])
    seen = 0
    def hook(frame, event, arg):
        global seen
        name = getattr(arg, "__name__", "") if event == "c_call" else frame.f_code.co_name if event == "call" else ""
        if name in names:
            seen += 1
            if seen == nth:
                os.kill(os.getpid(), signal.SIGKILL)
    sys.setprofile(hook)
    promote(Catalog(sys.argv[1]), "new/distilled", RetrainConfig(metric="rouge_l", guards={}))
""")


@pytest.mark.slow  # one child process per kill point
def test_champion_swap_survives_a_kill_at_every_step(tmp_path):
    runs = tmp_path / "runs"
    old_run, old = trained_run(runs, "old", 0.2)
    promote(old_run.catalog, old, RULE)
    trained_run(runs, "new", 0.6)
    steps = "rmtree,replace,rename,symlink,unlink,rmdir,copytree"
    for nth in range(1, 40):
        proc = subprocess.run([sys.executable, "-c", KILL_IN_PROMOTE, str(runs), steps, str(nth)], cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
        pointer = runs / "champion" / "champion.json"
        # Whatever step the kill hit, a whole champion is there: the old one or the new one.
        assert pointer.exists(), f"no champion after a kill at step {nth}"
        named = json.loads(pointer.read_text())["model_id"].split("/")[0]
        assert (runs / "champion" / "adapter" / "model.safetensors").read_text() == f"weights of {named}"
        if proc.returncode == 0:  # the promotion ran to the end: every step was a kill point once
            assert named == "new" and nth > 3
            break
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    else:
        pytest.fail("the promotion never finished")


# --- resuming with another config ----------------------------------------------------------------------------

def test_resume_with_another_config_is_refused_naming_the_keys_or_reruns_what_changed(tmp_path):
    from flows.infra import StageCode
    from pipeline.errors import DistillError

    run = generated_run(tmp_path, "c")
    atomic = run.path("generate.json")
    atomic.write_text("{}")
    run.save_dataset("curated", [], [], {"parents": []})
    run.path("train.json").write_text("{}")
    policy = StageCode(paths=("pipeline/stages.py",))
    key_before = policy.compute_key(None, {"run_dir": str(run.dir)}, {})

    runs = f"runs_dir={tmp_path / 'runs'}"
    changed = load_config(overrides=[runs, "curate.rouge_threshold=0.5", "train.epochs=3"])
    with pytest.raises(DistillError, match=r"curate\.rouge_threshold: 0\.7 -> 0\.5; train\.epochs: 2\.0 -> 3") as err:
        Run.create(changed, "c")
    assert "--allow-config-change" in str(err.value)
    assert run.path("datasets", "curated", "manifest.json").exists()  # nothing was touched

    # Raising the budget (how a run stopped by it continues) changes no result: allowed, and recorded.
    Run.create(load_config(overrides=[runs, "teacher.budget_usd=5"]), "c")
    status = json.loads(run.path("status.json").read_text())
    assert status["config_changes"][-1]["keys"] == {"teacher.budget_usd": [None, 5.0]}
    assert status["config_changes"][-1]["reran"] == []

    # With the flag: curate and every stage after it run again; generate's output stays.
    Run.create(changed, "c", allow_config_change=True)
    status = json.loads(run.path("status.json").read_text())
    assert status["config_changes"][-1]["reran"] == ["curate", "train", "evaluate", "report"]
    assert set(status["config_changes"][-1]["result_keys"]) == {"curate.rouge_threshold", "train.epochs"}
    assert run.path("generated.parquet").exists() and run.path("generate.json").exists()
    assert not run.path("datasets", "curated").exists() and not run.path("train.json").exists()
    [aside] = run.path("superseded").iterdir()
    assert (aside / "datasets" / "curated" / "manifest.json").exists() and (aside / "train.json").exists()
    # Prefect's cross-run stage cache is keyed on the config too, so it cannot replay the old results.
    assert policy.compute_key(None, {"run_dir": str(run.dir)}, {}) != key_before
