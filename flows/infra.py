"""The Prefect plumbing the flows share: concurrency limits, the cross-run cache policy, the retry rule.

Kept apart from flows/distill.py so the flow itself reads like a recipe.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy
from prefect.context import TaskRunContext

from pipeline import PROJECT_ROOT
from pipeline.errors import DistillError

# Created by `scripts/serve.sh start` (python -m flows.deployments setup). gpu: one training or evaluation job
# per GPU at a time. teacher-api: stages talking to the teacher at once (each keeps teacher.max_concurrency
# requests in flight), which keeps a rate-limited API or a single local teacher from being swamped.
LIMITS = {"gpu": 1, "teacher-api": 2}


class MissingLimitError(DistillError):
    """A concurrency limit the flow needs does not exist on the Prefect server."""


def _api_url() -> str | None:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


@contextmanager
def limit(name: str) -> Iterator[None]:
    """Hold one slot of a global concurrency limit; strict against a server, so a missing limit is an error.

    A plain `distill run` with no server (ephemeral mode) has nobody to share the machine with through
    Prefect, so it runs without limits rather than failing on a setup it never needed.
    """
    if not _api_url():
        yield
        return
    from prefect.concurrency._asyncio import ConcurrencySlotAcquisitionError
    from prefect.concurrency.sync import concurrency

    try:
        with concurrency(name, occupy=1, strict=True):
            yield
    except ConcurrencySlotAcquisitionError as e:  # raised only while acquiring, never by the work inside
        raise MissingLimitError(f"Concurrency limit {name!r} is missing on the Prefect server at {_api_url()} ({e}). "
                                f"Create the limits with `scripts/serve.sh start` or `python -m flows.deployments setup`.") from None


def ensure_limits(limits: dict[str, int] = LIMITS) -> list[str]:
    """Create the global concurrency limits the flows acquire strictly (existing ones are left alone)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectNotFound

    created = []
    with get_client(sync_client=True) as client:
        for name, slots in limits.items():
            try:
                client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))
                created.append(name)
    return created


# --- caching ----------------------------------------------------------------------------------------------

def _hash_paths(paths: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for rel in paths:
        root = PROJECT_ROOT / rel
        files = sorted(root.rglob("*")) if root.is_dir() else [root]
        for f in files:
            if f.is_file() and f.suffix in (".py", ".j2") and "__pycache__" not in f.parts:
                h.update(str(f.relative_to(PROJECT_ROOT)).encode())
                h.update(f.read_bytes())
    return h.hexdigest()


@dataclass
class StageCode(CachePolicy):
    """Cache key part: the code a stage runs (its pipeline modules) and the identity of the run folder.

    The folder's `created` stamp changes when a run folder is deleted and made again under the same id, and the
    hash of its config.yaml when a resume changed the config, so a cached result never points at files that are
    gone or were made from another config.
    """

    paths: tuple[str, ...] = ()

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        status = Path(inputs["run_dir"]) / "status.json"
        created = json.loads(status.read_text()).get("created") if status.exists() else None
        # The run's config too: a resume with an allowed config change must run the stages again, not replay them.
        config = Path(inputs["run_dir"]) / "config.yaml"
        config_hash = hashlib.sha256(config.read_bytes()).hexdigest() if config.exists() else None
        return hashlib.sha256(f"{_hash_paths(self.paths)}|{created}|{config_hash}".encode()).hexdigest()


def stage_cache(*paths: str) -> CachePolicy:
    """Inputs + the task's source + the code of the given pipeline paths (relative to the project root)."""
    return INPUTS + TASK_SOURCE + StageCode(paths=("pipeline/stages.py", "pipeline/store.py", *paths))


# --- retries ----------------------------------------------------------------------------------------------

def transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a task only for errors a second try can fix: dropped connections, timeouts, 429/5xx."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - the state's own exception, classified below
        import httpx
        import openai

        if isinstance(exc, DistillError):  # budget spent, bad config, missing model: a retry changes nothing
            return False
        return isinstance(exc, (OSError, httpx.TransportError, openai.APIConnectionError, openai.RateLimitError,
                                openai.InternalServerError))
    return False
