"""The OpenAI Batch API backend against the fake server's /v1/files and /v1/batches: submit, poll, collect, and
resume the same job after the submitting process was killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from pipeline.config import TeacherConfig
from pipeline.teachers import Request, make_teacher
from tests.fakes.openai_server import FakeOpenAIServer, default_responder

ROOT = Path(__file__).resolve().parents[1]


def batch_config(server: FakeOpenAIServer, **kw) -> TeacherConfig:
    return TeacherConfig(backend="openai-batch", base_url=server.base_url, model="fake-teacher", batch_poll_s=0.05,
                         max_retries=1, **kw)


def chats(n: int) -> list[Request]:
    return [Request(messages=[{"role": "user", "content": f"batch item {i}: define a delta"}]) for i in range(n)]


def test_batch_submit_poll_collect_then_cached(tmp_path):
    reqs = chats(5) + [Request(kind="completion", prompt=f"Task {i}: Name a river.\nTask", max_tokens=32)
                       for i in range(2)]
    with FakeOpenAIServer(batch_delay_s=0.3) as server:
        server.batch_fail_custom_ids = {reqs[1].cache_key("openai-batch", "fake-teacher")}
        teacher = make_teacher(batch_config(server), tmp_path / "c.sqlite")
        out = teacher.generate(reqs)
        assert len(server.batches) == 2  # one job per endpoint
        assert {b["endpoint"] for b in server.batches.values()} == {"/v1/chat/completions", "/v1/completions"}
        assert not out[1].ok and "the model failed" in out[1].error
        for r, c in zip(reqs[:1] + reqs[2:], out[:1] + out[2:]):
            body = {"messages": r.messages} if r.kind == "chat" else {"prompt": r.prompt}
            assert c.ok and c.text == default_responder(body) and c.tokens_out > 0
        assert len(teacher.cache) == 6 and teacher.cache.pending_batch("anything") is None
        # A rerun submits a new job only for the failed item; the rest come from the cache.
        server.batch_fail_custom_ids = set()
        again = teacher.generate(reqs)
        assert all(c.ok for c in again) and sum(not c.cached for c in again) == 1
        assert len(server.batches) == 3


CHILD = textwrap.dedent("""
    import sys
    from pipeline.config import TeacherConfig
    from pipeline.teachers import Request, make_teacher
    cfg = TeacherConfig(backend="openai-batch", base_url=sys.argv[1], model="fake-teacher", batch_poll_s=0.05)
    reqs = [Request(messages=[{"role": "user", "content": f"batch item {i}: define a delta"}]) for i in range(8)]
    make_teacher(cfg, sys.argv[2]).generate(reqs)
""")


def test_killed_batch_run_resumes_the_same_job(tmp_path):
    cache = tmp_path / "c.sqlite"
    with FakeOpenAIServer(batch_delay_s=3.0) as server:
        child = subprocess.Popen([sys.executable, "-c", CHILD, server.base_url, str(cache)], cwd=ROOT,
                                 env={**os.environ, "PYTHONPATH": str(ROOT)})
        deadline = time.monotonic() + 60
        while not server.batches:  # submitted; now polling
            assert child.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.3)
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert all(b["status"] == "in_progress" for b in server.batches.values())

        out = make_teacher(batch_config(server), cache).generate(chats(8))
        assert all(c.ok for c in out)
        assert len(server.batches) == 1 and len(server.files) == 2  # the one upload and its output: no second job
        assert server.total_requests == 8
