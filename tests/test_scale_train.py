"""Training on several processes: the student is cut once when several processes ask at once, and a 2-process
launch (torchrun, gloo on CPU) trains exactly what one process trains with the same global batch."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import load_config

REPO = Path(__file__).resolve().parents[1]


# --- The student is cut once when several processes ask at once (the ranks of a multi-process launch) ---

_CUT_CHILD = """
import json, logging, os, sys, time
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="%(message)s")
from pipeline.models import resolve_gguf, cut_student_from_gguf
gguf = resolve_gguf("smollm2-135m-instruct")
go = Path(sys.argv[1])
(go.parent / f"ready-{os.getpid()}").touch()
while not go.exists():  # every child starts its cut at the same moment
    time.sleep(0.05)
print(json.dumps({"pid": os.getpid(), "path": str(cut_student_from_gguf(gguf, sys.argv[2]))}))
"""


@pytest.mark.slow  # one real cut (~15 s) and three Python processes importing transformers
def test_concurrent_processes_cut_the_student_once(tmp_path):
    import json
    import os
    import subprocess
    import sys
    import time

    cache, sync = tmp_path / "cache", tmp_path / "sync"
    sync.mkdir()
    env = {**os.environ, "DISTILL_CACHE": str(cache), "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _CUT_CHILD, str(sync / "go"), "2-27"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    deadline = time.monotonic() + 240
    while len(list(sync.glob("ready-*"))) < 3 and time.monotonic() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.1)
    (sync / "go").touch()
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert len({r["path"] for r in results}) == 1
    cutters = [err for _, err in outs if "Cutting the student" in err]
    waiters = [err for _, err in outs if "waiting for it" in err]
    assert len(cutters) == 1 and len(waiters) == 2  # one process cut, the other two waited for it
    students = cache / "students"
    assert [p.name for p in students.iterdir() if not p.name.endswith(".lock")] == [Path(results[0]["path"]).name]
    made = json.loads((Path(results[0]["path"]) / "cut.json").read_text())
    assert made["pid"] in {r["pid"] for r in results} and made["kept_layers"] == [0, 1, 28, 29]
    # A later caller finds it finished and does not take the lock.
    again = subprocess.run([sys.executable, "-c", _CUT_CHILD, str(sync / "go"), "2-27"], env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "Cutting" not in again.stderr and "waiting" not in again.stderr


# --- Training launched on 2 processes (torchrun, gloo on CPU) equals one process with the same global batch ---

def _make_train_run(runs_dir: Path, run_id: str) -> Path:
    from pipeline.records import Record
    from pipeline.store import Run
    from tests.conftest import TINY_STUDENT_DROP

    # No LoRA dropout: its masks are drawn per process, and equality with one process is the point here.
    cfg = load_config(profile="cpu-demo", overrides=[
        f"runs_dir={runs_dir}", f"student.drop_layers={TINY_STUDENT_DROP}", "train.max_steps=3", "train.batch_size=4",
        "train.grad_accum=1", "train.max_length=128", "train.learning_rate=0.001", "train.lora_dropout=0"])
    run = Run.create(cfg, run_id=run_id)
    recs = [Record(instruction=i, input=x, output=o, status="accepted") for i, x, o in [
        ("Name a primary colour.", "", "Red is a primary colour."), ("Translate to French.", "good morning", "Bonjour."),
        ("Give a synonym of happy.", "", "Joyful."), ("Add the numbers.", "2 and 3", "2 + 3 = 5.")]]
    run.save_dataset("curated", recs, [], {})
    return run.dir


@pytest.mark.slow  # two real training launches (3 processes) on the 4-layer student: 1-4 min on 2 cores
def test_two_process_training_matches_one_process_with_the_same_global_batch(tmp_path):
    import json
    import os
    import subprocess
    import sys

    import torch
    from safetensors.torch import load_file

    cache = tmp_path / "cache"  # fresh: the three processes race to cut the student, and one cuts it
    env = {**os.environ, "DISTILL_CACHE": str(cache), "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    single, multi = _make_train_run(tmp_path / "runs", "single"), _make_train_run(tmp_path / "runs", "multi")
    torchrun = Path(sys.executable).with_name("torchrun")
    launches = {
        "multi": subprocess.Popen([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "pipeline.cli",
                                   "train", str(multi)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True),
        "single": subprocess.Popen([sys.executable, "-m", "pipeline.cli", "train", str(single)], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)}
    outs = {name: p.communicate(timeout=900)[0] for name, p in launches.items()}
    assert all(p.returncode == 0 for p in launches.values()), {n: o[-3000:] for n, o in outs.items()}

    s_sum, m_sum = (json.loads((d / "train.json").read_text()) for d in (single, multi))
    assert m_sum["batch"] == {"processes": 2, "backend": "gloo", "per_device_batch_size": 2, "grad_accum": 1,
                              "effective_batch_size": 4}
    assert s_sum["batch"]["processes"] == 1 and s_sum["batch"]["effective_batch_size"] == 4
    # One writer: one summary printed, one adapter, one log and one plot in the run folder.
    assert sum(line.startswith('{"student"') for line in outs["multi"].splitlines()) == 1
    assert sorted(p.name for p in multi.iterdir() if p.name not in ("datasets", "checkpoints")) == [
        "adapter", "config.yaml", "status.json", "train.json", "train_log.json", "training_curves.png"]
    # Gradients were all-reduced: rank 0 logged the same losses and gradient norms as one process on the whole batch
    # (its own half-batch would give other norms).
    s_log, m_log = ([h for h in json.loads((d / "train_log.json").read_text()) if "loss" in h] for d in (single, multi))
    assert len(m_log) == len(s_log) == 3
    for a, b in zip(s_log, m_log):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4) and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    s_ad, m_ad = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (single, multi))
    assert s_ad.keys() == m_ad.keys()
    diff = torch.cat([(s_ad[k] - m_ad[k]).flatten() for k in s_ad]).norm()
    trained = torch.cat([s_ad[k].flatten() for k in s_ad if "lora_B" in k]).norm()
    assert trained > 0 and diff / torch.cat([s_ad[k].flatten() for k in s_ad]).norm() < 1e-3
    # The student was cut once for all three processes, and nothing temporary is left anywhere.
    assert [p.name for p in (cache / "students").iterdir() if not p.name.endswith(".lock")] == [
        Path(s_sum["student"]).name]
    assert not [p for root in (cache, tmp_path / "runs") for p in root.rglob("*") if p.name.startswith((".tmp", "tmp"))]


def test_the_configured_batch_is_split_over_processes_or_refused_with_the_fix():
    from pipeline.errors import ConfigError
    from pipeline.scale.distributed import split_batch

    assert split_batch(8, 2, 1) == (8, 2)
    assert split_batch(8, 2, 4) == (2, 2)  # 2 x 2 x 4 processes = 8 x 2
    assert split_batch(3, 4, 2) == (3, 2)  # an odd batch splits the accumulation instead
    with pytest.raises(ConfigError, match="multiple of 4"):
        split_batch(6, 1, 4)
