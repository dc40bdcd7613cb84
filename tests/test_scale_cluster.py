"""`scale.ray_address`: generation joins a Ray cluster that someone else started (`ray start --head`, here on this
box with free ports), the teacher calls run in the cluster's worker processes, and a worker killed in the middle of
its shard costs no second payment for what it had already been answered."""

from __future__ import annotations

import os
import signal

import psutil
import pytest

from pipeline.config import ScaleConfig, TeacherConfig
from pipeline.scale import FanOutTeacher
from pipeline.teachers.base import Request
from pipeline.teachers.ledger import Ledger
from tests.fakes.openai_server import FakeOpenAIServer, request_digest

ray = pytest.importorskip("ray")
pytest.importorskip("prefect_ray")
# A real cluster: `ray start` takes 15-40 s here and each worker imports Prefect and the pipeline.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def head():
    from tests.ray_head import RayHead

    if ray.is_initialized():  # a driver left connected elsewhere would make the runner reuse it
        ray.shutdown()
    with RayHead(num_cpus=2) as h:
        yield h


def _client_pid(client: tuple[str, int], server_port: int) -> int | None:
    """The process on the other end of a loopback connection to the fake server."""
    for c in psutil.net_connections(kind="tcp"):
        if c.laddr and c.raddr and c.laddr.port == client[1] and c.raddr.port == server_port:
            return c.pid
    return None


def _chats(n: int) -> list[Request]:
    return [Request(messages=[{"role": "user", "content": f"cluster question {i}"}], max_tokens=16, stage="generate")
            for i in range(n)]


def test_generation_runs_on_a_cluster_joined_by_address_and_a_killed_worker_pays_nothing_twice(head, tmp_path):
    killed: dict = {}
    cluster_pids: set[int] = set()

    def kill_the_caller_once(key: str, client) -> bool:
        # The 6th request: its shard (4 requests each) already has answered ones in the shared cache.
        seen = kill_the_caller_once.seen = getattr(kill_the_caller_once, "seen", 0) + 1
        if killed or seen < 6:
            return False
        pid = _client_pid(client, server.port)
        cluster_pids.update(p.pid for p in head.descendants())
        killed.update(pid=pid, key=key, worker_of_the_cluster=pid in cluster_pids)
        os.kill(pid, signal.SIGKILL)
        return True  # the reply is never sent: the request is received but not answered

    with FakeOpenAIServer(latency_s=0.02, on_request=kill_the_caller_once) as server:
        cfg = TeacherConfig(backend="openai", base_url=server.base_url, model="fake", max_concurrency=1,
                            max_retries=1, timeout_s=30)
        ledger = Ledger()
        teacher = FanOutTeacher(cfg, tmp_path / "cache.sqlite", ledger,
                                ScaleConfig(task_runner="ray", ray_address=head.address, workers=2, shard_size=4))
        requests = _chats(16)
        try:
            # Ray re-runs a task whose worker died (max_retries 3 by default); the re-run finds the shard's answered
            # requests in the shared cache. Were the shard reported failed instead, a plain re-run finishes the job.
            out = teacher.generate(requests)
            if not all(c.ok for c in out):
                out = teacher.generate(requests)
            cluster_pids.update(p.pid for p in head.descendants())
        finally:
            teacher.close()

    assert all(c.ok for c in out), [c.error for c in out if not c.ok]
    assert [c.text for c in out] == [f"Here is a careful answer about: cluster question {i}. It has two parts, first "
                                     f"the facts and then an example." for i in range(16)]
    # The calls ran in the cluster's own worker processes, on its one node, never in this (the driver's) process.
    assert killed["worker_of_the_cluster"] and killed["pid"] != os.getpid()
    pids = {pid for _, pid, _ in teacher.workers}
    nodes = {node for _, _, node in teacher.workers}
    assert pids and os.getpid() not in pids and pids <= cluster_pids and killed["pid"] not in pids
    assert len(nodes) == 1 and None not in nodes
    # Nothing paid twice: every distinct request answered exactly once; only the killed call was asked again.
    keys = {request_digest(r.messages) for r in requests}
    assert set(server.answered) == keys and set(server.answered.values()) == {1}
    assert server.requests[killed["key"]] == 2 and sum(server.requests.values()) == len(keys) + 1
