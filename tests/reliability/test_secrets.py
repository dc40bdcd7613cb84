"""A sentinel API key used for a whole run appears in none of the files the run wrote: run folders, catalog,
teacher cache, Prefect's database (logs and artifacts), nor in the terminal output."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import fast_overrides
from tests.fakes.openai_server import FakeOpenAIServer

pytestmark = pytest.mark.slow

SENTINEL = "sk-SENTINEL-7f3a9c1e5b2d4f60"


def test_sentinel_key_reaches_the_server_and_no_file(tmp_path):
    prefect_home = tmp_path / "prefect-home"
    runs = tmp_path / "runs"
    with FakeOpenAIServer(required_api_key=SENTINEL) as server:
        args = [sys.executable, "-m", "pipeline.cli", "run", "--run-id", "secret"]
        for o in fast_overrides(runs, server.base_url):
            args += ["--set", o]
        out = subprocess.run(args, capture_output=True, text=True, timeout=900, cwd=tmp_path,
                             env={**os.environ, "OPENAI_API_KEY": SENTINEL, "PREFECT_HOME": str(prefect_home),
                                  "PREFECT_LOGGING_LEVEL": "DEBUG"})
        assert out.returncode == 0, out.stderr[-3000:]
        assert server.keys_seen[SENTINEL] > 0  # the key was really used
    assert (runs / "secret" / "report.md").exists()
    written = [p for root in (runs, prefect_home) for p in root.rglob("*") if p.is_file()]
    assert any(p.name == "teacher.sqlite" for p in written) and any(p.suffix == ".db" for p in written)
    leaks = [str(p) for p in written if SENTINEL.encode() in p.read_bytes()]
    assert leaks == []
    assert SENTINEL not in out.stdout + out.stderr
