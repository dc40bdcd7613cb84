"""Shared fixtures: a fake OpenAI-compatible teacher on loopback and small, fast run configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.config import load_config
from tests.fakes.openai_server import FakeOpenAIServer

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


@pytest.fixture(scope="session", autouse=True)
def distill_cache(tmp_path_factory) -> Path:
    """Students cut from the teacher are cached once per test session (building one takes ~15 s)."""
    path = Path(os.environ.get("DISTILL_TEST_CACHE") or tmp_path_factory.mktemp("distill-cache"))
    os.environ["DISTILL_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session", autouse=True)
def stop_prefect_ephemeral_servers():
    """Stop Prefect's temporary API servers while pytest's output streams are still open.

    Prefect stops them at interpreter exit and logs a line as it does, after pytest has closed the streams: a
    harmless but noisy "I/O operation on closed file" traceback (PrefectHQ/prefect#16626)."""
    yield
    import sys

    server_module = sys.modules.get("prefect.server.api.server")
    if server_module is not None:
        for server in list(server_module.SubprocessASGIServer._instances.values()):
            server.stop()


@pytest.fixture
def fake_server():
    with FakeOpenAIServer() as server:
        yield server


# A student of 4 layers cut from the packaged teacher: real weights, real tokenizer, fast training steps.
TINY_STUDENT_DROP = "[" + ",".join(str(i) for i in range(2, 28)) + "]"


def fast_overrides(runs_dir: Path, base_url: str | None = None) -> list[str]:
    """Overrides that make a whole run take well under a minute."""
    o = [f"runs_dir={runs_dir}", "generate.target_instructions=6", "generate.max_prompts=4",
         "generate.prompts_per_round=2", "generate.response_max_tokens=64", f"student.drop_layers={TINY_STUDENT_DROP}",
         "train.max_steps=2", "train.batch_size=2", "train.max_length=128", "evaluate.limit=3",
         "evaluate.max_new_tokens=16", "evaluate.bootstrap_samples=100",
         "retrain.champion_gguf=null"]  # GGUF export of the champion has its own tests (tests/test_ship.py)
    if base_url:
        o += ["teacher.backend=openai", f"teacher.base_url={base_url}", "teacher.model=fake-teacher",
              "teacher.max_retries=2", "teacher.timeout_s=5"]
    return o


@pytest.fixture
def fast_config(tmp_path, fake_server):
    """A validated config that runs the whole pipeline against the fake teacher."""
    return load_config(profile="cpu-demo", overrides=fast_overrides(tmp_path / "runs", fake_server.base_url))
