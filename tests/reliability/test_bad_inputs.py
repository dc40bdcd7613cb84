"""Each bad input ends with a clear message naming file/line/field and the fix, a non-zero exit, and nothing
half-written presented as complete."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fakes.openai_server import FakeOpenAIServer

GOOD_SEED = json.dumps({"id": "s1", "instruction": "Name three rivers.", "instances": [{"input": "", "output": "Nile"}]})


def run_cli(tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "--set", f"runs_dir={tmp_path / 'runs'}", *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})


def assert_clean_failure(out: subprocess.CompletedProcess, tmp_path: Path, *needles: str) -> None:
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    for needle in needles:
        assert needle in out.stderr, (needle, out.stderr[-2000:])
    for status in (tmp_path / "runs").glob("*/status.json"):
        assert json.loads(status.read_text())["state"] != "completed"


def seed_case(tmp_path: Path, content: bytes) -> Path:
    p = tmp_path / "seeds.jsonl"
    p.write_bytes(content)
    return p


@pytest.mark.parametrize("name, content, needles", [
    ("malformed line", (GOOD_SEED + "\n{oops\n").encode(), ["line 2", "not valid JSON"]),
    ("empty file", b"", ["holds no tasks"]),
    ("invalid utf-8", GOOD_SEED.encode() + b"\n\xff\xfe\n", ["line 2", "invalid UTF-8"]),
    ("wrong field type", b'{"id": "x", "instruction": ["a list"]}\n', ["line 1", "field 'instruction'"]),
    ("not an object", b'["a", "b"]\n', ["line 1", "expected a JSON object"]),
])
def test_bad_seed_files(tmp_path, name, content, needles):
    seeds = seed_case(tmp_path, content)
    out = run_cli(tmp_path, "--set", f"generate.seed_tasks={seeds}")
    assert_clean_failure(out, tmp_path, str(seeds), *needles)


def test_huge_seed_file(tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    with open(seeds, "wb") as f:
        f.truncate(51 * 2**20)
    out = run_cli(tmp_path, "--set", f"generate.seed_tasks={seeds}")
    assert_clean_failure(out, tmp_path, "51 MB")


@pytest.mark.parametrize("override, needles", [
    ("generate.temperature=5", ["generate.temperature", "less than or equal to 2"]),
    ("generate.target_instructions=-1", ["generate.target_instructions"]),
    ("train.lora_rank=8", ["unknown key 'train.lora_rank'", "lora_r"]),
    ("teacher.backend=nope", ["Unknown teacher.backend 'nope'", "llamacpp"]),
])
def test_bad_config_values(tmp_path, override, needles):
    out = run_cli(tmp_path, "--set", override)
    assert_clean_failure(out, tmp_path, *needles)


def test_yaml_syntax_error(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("teacher:\n  backend: llamacpp\n   model: x\n")
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "--config", str(cfg)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert_clean_failure(out, tmp_path, str(cfg), "line 3")


def test_corrupt_model_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf")
    out = run_cli(tmp_path, "--set", f"teacher.model={bad}")
    assert_clean_failure(out, tmp_path, str(bad), "not a GGUF file")


def test_missing_model_file(tmp_path):
    out = run_cli(tmp_path, "--set", f"teacher.model={tmp_path / 'nope.gguf'}")
    assert_clean_failure(out, tmp_path, "nope.gguf", "teacher.model")


def test_unreachable_base_url(tmp_path):
    out = run_cli(tmp_path, "--set", "teacher.backend=openai", "--set", "teacher.base_url=http://127.0.0.1:9/v1",
                  "--set", "teacher.model=x")
    assert_clean_failure(out, tmp_path, "http://127.0.0.1:9/v1 is unreachable", "teacher.base_url")


def test_wrong_api_key(tmp_path):
    def reject(body):  # never reached: /models already refuses the key
        return "unused"

    sentinel = "sk-test-SENTINEL-0123456789"
    with FakeOpenAIServer(responder=reject, required_api_key="sk-the-right-one") as server:
        out = run_cli(tmp_path, "--set", "teacher.backend=openai", "--set", f"teacher.base_url={server.base_url}",
                      "--set", "teacher.model=x", env={"OPENAI_API_KEY": sentinel})
    assert_clean_failure(out, tmp_path, "rejected the API key", "OPENAI_API_KEY")
    assert sentinel not in out.stderr + out.stdout


def test_eval_file_in_unknown_format(tmp_path):
    ev = tmp_path / "eval.csv"
    ev.write_text("instruction,output\nhi,there\n")
    out = run_cli(tmp_path, "--set", f"evaluate.eval_set={ev}")
    assert_clean_failure(out, tmp_path, str(ev), "unknown format")
