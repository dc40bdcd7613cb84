"""Exactly-once teacher calls across crashes: SIGKILL mid-batch, rerun, nothing cached is paid for twice; and the
response cache under several writer processes at once."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from pipeline.config import TeacherConfig
from pipeline.teachers import Completion, Request, ResponseCache, make_teacher
from tests.fakes.openai_server import FakeOpenAIServer, request_digest

ROOT = Path(__file__).resolve().parents[1]
N = 40

# The generation process: 40 chats through the openai backend, results written at the very end.
CHILD = textwrap.dedent("""
    import json, sys
    from pipeline.config import TeacherConfig
    from pipeline.teachers import Request, make_teacher
    base_url, cache, out, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    cfg = TeacherConfig(backend="openai", base_url=base_url, model="fake-teacher", max_concurrency=4,
                        max_retries=1, timeout_s=5)
    teacher = make_teacher(cfg, cache)
    reqs = [Request(messages=[{"role": "user", "content": f"task {i}: name a river"}], temperature=0.7)
            for i in range(n)]
    replies = teacher.generate(reqs)
    with open(out, "w") as f:
        json.dump([[c.text, c.error] for c in replies], f)
""")


def requests_for(n: int) -> list[Request]:
    return [Request(messages=[{"role": "user", "content": f"task {i}: name a river"}], temperature=0.7) for i in range(n)]


def run_child(server: FakeOpenAIServer, cache: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", CHILD, server.base_url, str(cache), str(out), str(N)],
                            cwd=ROOT, env=env)


def cached_keys(cache: Path) -> set[str]:
    if not cache.exists():
        return set()
    with sqlite3.connect(cache, timeout=30) as c:
        try:
            return {k for (k,) in c.execute("SELECT key FROM replies")}
        except sqlite3.OperationalError:  # table not created yet
            return set()


def test_sigkill_mid_batch_then_rerun_pays_for_nothing_twice(tmp_path):
    reqs = requests_for(N)
    digest = {r.cache_key("openai", "fake-teacher"): request_digest(r.messages) for r in reqs}

    # The uninterrupted run, in this process: same requests, same code path, its own server and cache.
    with FakeOpenAIServer() as reference_server:
        cfg = TeacherConfig(backend="openai", base_url=reference_server.base_url, model="fake-teacher")
        reference = [[c.text, c.error] for c in make_teacher(cfg, tmp_path / "ref.sqlite").generate(reqs)]

    cache, out = tmp_path / "cache.sqlite", tmp_path / "out.json"
    with FakeOpenAIServer(latency_s=0.1) as server:
        child = run_child(server, cache, out)
        deadline = time.monotonic() + 60
        while len(cached_keys(cache)) < 12:  # well into the batch: ~12 of 40 done, 4 in flight
            assert child.poll() is None and time.monotonic() < deadline, "child finished or stalled before the kill"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert not out.exists()  # it really died mid-batch
        survived = cached_keys(cache)
        assert 12 <= len(survived) < N
        sent_before = server.requests.copy()

        rerun = run_child(server, cache, out)
        assert rerun.wait(timeout=120) == 0

    # No reply that reached the cache before the kill was asked for again.
    assert all(server.requests[digest[k]] == sent_before[digest[k]] for k in survived)
    # Everything else was asked for on the rerun (at most once more than the in-flight calls lost at the kill).
    assert all(server.requests[digest[k]] >= 1 for k in digest)
    assert server.total_requests - sum(sent_before.values()) == N - len(survived)
    assert json.loads(out.read_text()) == reference


WRITER = textwrap.dedent("""
    import os, sys, time
    from pipeline.teachers import Completion, ResponseCache
    cache, worker = ResponseCache(sys.argv[1]), int(sys.argv[2])
    while not os.path.exists(sys.argv[1] + ".go"):  # start together, so the writes really overlap
        time.sleep(0.01)
    for i in range(300):
        # Keys overlap across workers (i % 200): the same reply written by several processes at once.
        cache.put(f"key-{i % 200}", Completion(text=f"reply {i % 200}", tokens_out=3))
        cache.put(f"w{worker}-{i}", Completion(text=f"worker {worker} reply {i}"))
""")


def test_response_cache_with_concurrent_writer_processes(tmp_path):
    path = tmp_path / "shared.sqlite"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(w)], cwd=ROOT, env=env,
                              stderr=subprocess.PIPE, text=True) for w in range(4)]
    time.sleep(2.5)  # let every writer import and open the database
    Path(str(path) + ".go").touch()
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, errors

    cache = ResponseCache(path)
    assert len(cache) == 200 + 4 * 300
    assert all(cache.get(f"key-{i}").text == f"reply {i}" for i in range(200))
    assert all(cache.get(f"w{w}-{i}").text == f"worker {w} reply {i}" for w in range(4) for i in range(300))
    assert cache.get("missing") is None
    assert isinstance(cache.get("key-0"), Completion)
