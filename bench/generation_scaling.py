"""Generation throughput vs number of fan-out workers (pipeline.scale) against a fake server with fixed latency.

Each worker's backend keeps `--concurrency` requests in flight, so the ideal is
workers * concurrency / latency requests per second until something saturates (the fake server and the
clients share this box's cores). Cluster start-up is excluded: a warm-up batch runs first for each point.

    python bench/generation_scaling.py --runner ray --workers 1,2,4 --latency 0.05 > scaling.json

Against a Ray cluster joined by address (`scale.ray_address`), as on a real cluster:

    python bench/generation_scaling.py --runner ray --ray-address HEAD:6379 --workers 1,2,4
    python bench/generation_scaling.py --runner ray --start-head 4 --workers 1,2,4   # `ray start --head` here first
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

from pipeline.config import ScaleConfig, TeacherConfig  # noqa: E402
from pipeline.scale import FanOutTeacher  # noqa: E402
from pipeline.teachers import make_teacher  # noqa: E402
from pipeline.teachers.base import Request  # noqa: E402
from tests.fakes.openai_server import FakeOpenAIServer  # noqa: E402


def chats(n: int, tag: str) -> list[Request]:
    return [Request(messages=[{"role": "user", "content": f"{tag} question {i}"}], max_tokens=32) for i in range(n)]


def measure(teacher, n: int, tag: str, warm: int) -> dict:
    teacher.generate(chats(warm, f"warm-{tag}"))  # starts the runner and every worker's imports; not timed
    t0 = time.perf_counter()
    out = teacher.generate(chats(n, tag))
    dt = time.perf_counter() - t0
    return {"requests": n, "ok": sum(c.ok for c in out), "seconds": round(dt, 3), "req_per_s": round(n / dt, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runner", default="ray", choices=["default", "ray", "dask"])
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    p.add_argument("--latency", type=float, default=0.05, help="fake server latency per request, seconds")
    p.add_argument("--concurrency", type=int, default=1, help="requests in flight per worker (teacher.max_concurrency)")
    p.add_argument("--requests", type=int, default=192, help="requests per point")
    p.add_argument("--shard-size", type=int, default=24,
                   help="requests per shard: each shard pays a Prefect task run (a few API calls) and a new client")
    p.add_argument("--ray-address", help="join this Ray cluster (HOST:PORT or ray://HOST:10001) by address")
    p.add_argument("--start-head", type=int, metavar="CPUS",
                   help="start a Ray head of CPUS CPUs on this box with `ray start --head` (free ports) and join it "
                        "by address; it is stopped at the end")
    a = p.parse_args()
    counts = [int(w) for w in a.workers.split(",")]
    head = None
    if a.start_head:
        from tests.ray_head import RayHead

        head = RayHead(num_cpus=a.start_head).start()
        a.ray_address = head.address
    if a.runner == "ray" and not a.ray_address:
        import ray

        # One local cluster for every point; RayTaskRunner joins an initialised Ray instead of starting its own.
        ray.init(num_cpus=max(counts), include_dashboard=False, log_to_driver=False)
    try:
        if os.environ.get("PREFECT_API_URL"):
            result = run_points(a, counts)
        else:
            from prefect.testing.utilities import prefect_test_harness

            # One Prefect API for the driver and every worker (they receive its address with each task); without
            # one, each cluster worker starts a temporary server of its own for every shard.
            with prefect_test_harness(server_startup_timeout=180):
                result = run_points(a, counts)
    finally:
        if head is not None:
            head.stop()
    result["cluster"] = ({"joined_by_address": a.ray_address, "started_here_with_ray_start": head is not None,
                          "head_cpus": a.start_head} if a.ray_address else
                         {"joined_by_address": None, "local_ray_init_cpus": max(counts)} if a.runner == "ray" else None)
    print(json.dumps(result, indent=2))


def run_points(a, counts: list[int]) -> dict:
    """The one-process baseline, then one point per worker count (a fresh fan-out teacher and cache each)."""
    points = []
    with FakeOpenAIServer(latency_s=a.latency) as server, tempfile.TemporaryDirectory() as tmp:
        cfg = TeacherConfig(backend="openai", base_url=server.base_url, model="fake", max_concurrency=a.concurrency,
                            max_retries=1, timeout_s=30)
        base = make_teacher(cfg, Path(tmp) / "single.sqlite")
        single = measure(base, a.requests, "single", 4)
        base.close()
        for w in counts:
            teacher = FanOutTeacher(cfg, Path(tmp) / f"w{w}.sqlite", None,
                                    ScaleConfig(task_runner=a.runner, workers=w, shard_size=a.shard_size,
                                                ray_address=a.ray_address if a.runner == "ray" else None))
            r = measure(teacher, a.requests, f"w{w}", w * a.shard_size)
            teacher.close()
            # Where the shards really ran (warm-up included): worker processes, hosts and Ray nodes.
            r.update(workers=w, ideal_req_per_s=round(w * a.concurrency / a.latency, 1),
                     worker_processes=len(teacher.workers), hosts=len({k[0] for k in teacher.workers}),
                     ray_nodes=len({k[2] for k in teacher.workers if k[2]}))
            points.append(r)
    for r in points:
        r["speedup_vs_1_worker"] = round(r["req_per_s"] / points[0]["req_per_s"], 2)
        r["efficiency_vs_ideal"] = round(r["req_per_s"] / r["ideal_req_per_s"], 2)
    return {"bench": "generation_scaling", "runner": a.runner, "latency_s": a.latency,
            "concurrency_per_worker": a.concurrency, "shard_size": a.shard_size,
            "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 1),
            "python": platform.python_version(), "single_process_no_fanout": single, "points": points}


if __name__ == "__main__":
    main()
