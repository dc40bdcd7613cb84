"""`FanOutTeacher`: the Teacher protocol over many workers.

The driver looks every request up in the response cache, cuts the misses into shards and maps the
Prefect task `answer_shard` over the configured task runner. Each worker builds its own backend with
`make_teacher` (no scale config, so no recursion) and writes replies into the same SQLite cache (WAL),
so a crash or a re-run never pays twice. Replies come back in input order; the driver records every
reply in its own ledger, so per-stage tallies and the budget stay exact whatever the worker count (each request's worst
case is held before its wave is sent).

A multi-machine cluster needs `runs_dir` on a filesystem every node mounts (NFS, a cloud file share):
SQLite WAL is safe for processes on one host and for hosts sharing one network filesystem with working
locks. We chose the shared cache over per-node caches merged afterwards: it keeps resume-after-crash
exact, and teacher replies (KBs) are small next to the model traffic.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed

from pipeline.config import ScaleConfig, TeacherConfig
from pipeline.errors import ConfigError
from pipeline.teachers.base import Completion, Request, ResponseCache
from pipeline.teachers.ledger import Ledger

log = logging.getLogger(__name__)


# No Prefect result caching or retries here: the response cache already makes a re-run free, and a
# failed shard is reported per request so the stage keeps its rejects-with-reason contract.
@task(name="answer-shard", cache_policy=NO_CACHE, persist_result=False)
def answer_shard(teacher_cfg: TeacherConfig, cache_path: str, shard: list[Request]) -> dict[str, Any]:
    """Answer one shard on a worker with its own backend; replies land in the shared cache as they come.

    Returns {"replies": [...], "worker": where it ran}."""
    from pipeline.teachers import make_teacher

    # The worker's ledger has no budget: the driver enforces it between waves of shards.
    teacher = make_teacher(teacher_cfg, Path(cache_path), Ledger())
    try:
        return {"replies": teacher.generate(shard), "worker": worker_identity()}
    finally:
        teacher.close()


def worker_identity() -> dict[str, Any]:
    """Host, process and (under Ray) node id of the calling worker: which machines really did the work."""
    ident: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid()}
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ident["ray_node"] = ray.get_runtime_context().get_node_id()
    return ident


def make_task_runner(scale: ScaleConfig):
    """The Prefect task runner `scale.task_runner` names, configured for `scale.workers` workers."""
    if scale.task_runner in ("none", "default"):
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=scale.workers)
    if scale.task_runner == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError:
            raise ConfigError("scale.task_runner=ray needs prefect-ray: pip install 'distill[scale]'.") from None
        if scale.ray_address:
            return RayTaskRunner(address=scale.ray_address)
        # The dashboard pulls extra services and ports that a local fan-out does not need.
        return RayTaskRunner(init_kwargs={"num_cpus": scale.workers, "include_dashboard": False})
    if scale.task_runner == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError:
            raise ConfigError("scale.task_runner=dask needs prefect-dask: pip install 'distill[scale]'.") from None
        if scale.dask_address:
            return DaskTaskRunner(address=scale.dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": scale.workers, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    raise ConfigError(f"Unknown scale.task_runner {scale.task_runner!r}; use none, default, ray or dask.")


class FanOutTeacher:
    """Same `generate(requests, on_done)` contract as CachedTeacher, answered by shards on a task runner."""

    def __init__(self, teacher_cfg: TeacherConfig, cache_path: Path, ledger: Ledger | None, scale: ScaleConfig):
        self.cfg = teacher_cfg
        self.backend = teacher_cfg.backend
        self.model = teacher_cfg.model
        self.cache_path = Path(cache_path)
        self.cache = ResponseCache(self.cache_path)
        self.ledger = ledger or Ledger.for_teacher(teacher_cfg)
        self.scale = scale
        # (host, pid, ray node) -> requests its shards answered; logged at close, read by tests and benchmarks.
        self.workers: Counter[tuple] = Counter()
        self._runner = None  # started on first use and kept: a Ray or Dask cluster takes seconds to start

    def _task_runner(self):
        if self._runner is None:
            self._runner = make_task_runner(self.scale).__enter__()
        return self._runner

    def generate(self, requests: list[Request], on_done: Callable[[int], None] | None = None) -> list[Completion]:
        """Answer every request (cache first, misses fanned out in shards); failures come back with `error` set."""
        self.ledger.check_budget()
        results: list[Completion | None] = [None] * len(requests)
        todo: list[int] = []
        for i, r in enumerate(requests):
            hit = self.cache.get(r.cache_key(self.backend, self.model))
            if hit is None:
                todo.append(i)
                continue
            results[i] = hit.model_copy(update={"cached": True})
            self.ledger.record(r.stage, results[i])
            if on_done:
                on_done(1)

        size = self.scale.shard_size
        wave = self.scale.workers * size
        for start in range(0, len(todo), wave):
            # Each request's worst-case cost is held before its wave goes out, so the cap holds whatever the
            # worker count; a request that would cross it is not sent (and the ones after it neither).
            holds: dict[int, str] = {}
            for i in todo[start:start + wave]:
                hold = self.ledger.reserve(requests[i])
                if hold is None:
                    break
                holds[i] = hold
            admitted = list(holds)
            if admitted:
                self._run_wave(requests, [admitted[k:k + size] for k in range(0, len(admitted), size)], results,
                               on_done, holds)
            if len(admitted) < len(todo[start:start + wave]):
                break
        return [r if r is not None else Completion(error="not attempted: budget reached") for r in results]

    def _run_wave(self, requests: list[Request], shards: list[list[int]], results: list[Completion | None],
                  on_done: Callable[[int], None] | None, holds: dict[int, str]) -> None:
        runner = self._task_runner()
        futures = {runner.submit(answer_shard, {"teacher_cfg": self.cfg, "cache_path": str(self.cache_path),
                                                "shard": [requests[i] for i in shard]}): shard
                   for shard in shards}
        for fut in as_completed(list(futures)):
            shard = futures[fut]
            try:
                answer = fut.result()
                replies = answer["replies"]
                w = answer["worker"]
                self.workers[(w["host"], w["pid"], w.get("ray_node"))] += len(shard)
            except Exception as exc:  # a lost worker or a crashed shard: its requests are retried next run
                replies = [Completion(error=f"shard failed on its worker: {type(exc).__name__}: {exc}")] * len(shard)
            for i, c in zip(shard, replies):
                results[i] = c
                self.ledger.record(requests[i].stage, c, holds.get(i))
            if on_done:
                on_done(len(shard))

    def close(self) -> None:
        """Shut the task runner down (a local Ray or Dask cluster this teacher started goes with it)."""
        if self.workers:
            log.info("fan-out: %d requests answered by %d worker processes on %d hosts (%d Ray nodes)",
                     sum(self.workers.values()), len(self.workers), len({w[0] for w in self.workers}),
                     len({w[2] for w in self.workers if w[2]}))
        if self._runner is not None:
            runner, self._runner = self._runner, None
            runner.__exit__(None, None, None)
