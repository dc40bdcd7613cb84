"""API keys reach the server and nothing else: not errors, not the cache, not logs, not the config."""

from __future__ import annotations

import logging

import pytest

from pipeline.config import TeacherConfig
from pipeline.errors import ConfigError
from pipeline.teachers import Request, make_teacher
from pipeline.teachers.secrets import resolve_api_key
from tests.fakes.openai_server import FakeOpenAIServer

SENTINEL = "sk-distill-sentinel-0123456789abcdef"


def test_key_never_leaks_into_errors_cache_or_logs(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("DISTILL_TEST_KEY", SENTINEL)
    caplog.set_level(logging.DEBUG)  # everything the SDK, httpx and we log
    cache = tmp_path / "c.sqlite"
    cfg = TeacherConfig(backend="openai", base_url=None, model="fake-teacher", api_key_env="DISTILL_TEST_KEY",
                        max_retries=1)
    # A careless server answers 401 with the caller's key in its message.
    with FakeOpenAIServer(faults=("401",), fault_rate=1.0) as server:
        teacher = make_teacher(cfg.model_copy(update={"base_url": server.base_url}), cache)
        [failed] = teacher.generate([Request(messages=[{"role": "user", "content": "hello"}])])
        server.fault_rate = 0.0
        [answered] = teacher.generate([Request(messages=[{"role": "user", "content": "hello again"}])])
    assert server.keys_seen[SENTINEL] == 2  # the key really was sent, and a 401 is not retried
    assert failed.error.startswith("AuthenticationError") and "[REDACTED]" in failed.error
    assert SENTINEL not in failed.error
    assert answered.ok
    on_disk = b"".join(p.read_bytes() for p in tmp_path.glob("c.sqlite*"))  # the database and its WAL
    assert b"hello again" in on_disk and SENTINEL.encode() not in on_disk
    assert caplog.records and SENTINEL not in caplog.text
    assert SENTINEL not in cfg.model_dump_json() and SENTINEL not in repr(teacher.__dict__)


def test_missing_key_for_the_openai_api_names_the_fix(monkeypatch):
    monkeypatch.delenv("DISTILL_TEST_KEY", raising=False)
    with pytest.raises(ConfigError, match=r"\$DISTILL_TEST_KEY"):
        make_teacher(TeacherConfig(backend="openai", model="gpt-4o-mini", api_key_env="DISTILL_TEST_KEY"),
                     "/tmp/unused-cache.sqlite")


@pytest.mark.slow  # starts a temporary Prefect API (~10 s)
def test_key_from_a_prefect_secret_block(tmp_path, monkeypatch):
    from prefect.blocks.system import Secret
    from prefect.testing.utilities import prefect_test_harness

    monkeypatch.delenv("DISTILL_TEST_KEY", raising=False)
    with prefect_test_harness():
        Secret(value=SENTINEL).save("distill-teacher-key")
        cfg = TeacherConfig(backend="openai", model="fake-teacher", api_key_secret_block="distill-teacher-key",
                            api_key_env="DISTILL_TEST_KEY")
        assert resolve_api_key(cfg) == SENTINEL
        with FakeOpenAIServer() as server:
            teacher = make_teacher(cfg.model_copy(update={"base_url": server.base_url}), tmp_path / "c.sqlite")
            assert teacher.generate([Request(messages=[{"role": "user", "content": "hi"}])])[0].ok
        assert server.keys_seen[SENTINEL] == 1
        with pytest.raises(ConfigError, match="no-such-block") as err:
            resolve_api_key(cfg.model_copy(update={"api_key_secret_block": "no-such-block"}))
        assert SENTINEL not in str(err.value)


@pytest.mark.slow  # starts a temporary Prefect API (~10 s)
def test_endpoint_preflight_uses_the_clients_key_resolution(tmp_path, monkeypatch):
    """A key held only in a Prefect Secret block passes the pre-flight, as it passes the client."""
    from prefect.blocks.system import Secret
    from prefect.testing.utilities import prefect_test_harness

    from pipeline.config import load_config
    from pipeline.stages import check_teacher_endpoint

    monkeypatch.delenv("DISTILL_TEST_KEY", raising=False)
    with prefect_test_harness(server_startup_timeout=120), FakeOpenAIServer(required_api_key=SENTINEL) as server:
        Secret(value=SENTINEL).save("distill-preflight-key")
        cfg = load_config(overrides=[f"runs_dir={tmp_path}", "teacher.backend=openai", f"teacher.base_url={server.base_url}",
                                     "teacher.api_key_env=DISTILL_TEST_KEY",
                                     "teacher.api_key_secret_block=distill-preflight-key"])
        # The server refuses every other key. Before the fix only $DISTILL_TEST_KEY was read: a 401 here.
        check_teacher_endpoint(cfg)
        Secret(value="sk-wrong-key-000").save("distill-preflight-key", overwrite=True)
        with pytest.raises(ConfigError, match="Prefect Secret block 'distill-preflight-key'") as err:
            check_teacher_endpoint(cfg)
        assert "sk-wrong-key-000" not in str(err.value)
