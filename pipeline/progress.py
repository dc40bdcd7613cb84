"""Progress for long work: a tqdm bar in the terminal and, inside a Prefect run, a progress artifact.

This is the one place the library touches Prefect, and only when a flow run is active.
"""

from __future__ import annotations

import contextvars
import threading
import time

from tqdm.auto import tqdm


def _in_prefect_run() -> bool:
    try:
        from prefect.context import FlowRunContext, TaskRunContext
    except ImportError:
        return False
    return bool(TaskRunContext.get() or FlowRunContext.get())


class Progress:
    """A bar with rate and ETA; mirrored to a Prefect progress artifact at most every few seconds."""

    def __init__(self, total: int, desc: str, key: str | None = None, every_s: float = 3.0):
        self.bar = tqdm(total=total, desc=desc, unit="it", dynamic_ncols=True, mininterval=0.5)
        self.total = max(total, 1)
        self.every_s = every_s
        self._last = 0.0
        self._artifact = None
        self._pushing: threading.Thread | None = None
        if _in_prefect_run():
            try:
                from prefect.artifacts import create_progress_artifact
                self._artifact = create_progress_artifact(progress=0.0, key=key, description=desc)
            except Exception:  # progress reporting must never break the work it reports on
                self._artifact = None

    def update(self, n: int = 1) -> None:
        self.bar.update(n)
        now = time.monotonic()
        if self._artifact is not None and now - self._last >= self.every_s:
            self._last = now
            self._push()

    def set_total(self, total: int) -> None:
        self.total = max(total, 1)
        self.bar.total = total
        self.bar.refresh()

    def _push(self) -> None:
        # In a thread: with the Prefect API down its client retries for about a minute, and the work must not wait.
        if self._pushing is not None and self._pushing.is_alive():
            return  # the previous push is still retrying; skip this one
        progress = min(100.0, 100.0 * self.bar.n / self.total)
        ctx = contextvars.copy_context()  # Prefect's settings and run context live in contextvars
        self._pushing = threading.Thread(target=ctx.run, args=(self._send, progress), daemon=True)
        self._pushing.start()

    def _send(self, progress: float) -> None:
        try:
            from prefect.artifacts import update_progress_artifact
            update_progress_artifact(self._artifact, progress=progress)
        except Exception:  # progress reporting must never break the work it reports on
            pass

    def close(self) -> None:
        if self._artifact is not None:
            if self._pushing is not None:
                self._pushing.join(timeout=5)  # let the last push land, but never wait out a dead API
            self._push()
            self._pushing.join(timeout=5)
        self.bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
