"""The Teacher protocol, its request/completion types, the response cache, and the cached front every backend shares."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal, Protocol

from pydantic import BaseModel, Field

if TYPE_CHECKING:
    from pipeline.teachers.ledger import Ledger


class Request(BaseModel):
    """One teacher call: a chat (messages) or a raw completion (prompt), with decoding params."""

    kind: Literal["chat", "completion"] = "chat"
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = Field(default_factory=list)
    logprobs: int = 0  # top-k logprobs to capture per sampled token (0 = none)
    sample_index: int = 0  # distinguishes the n samples of the same prompt in the cache
    stage: str = "generate"  # for the ledger only; not part of the cache key

    def params(self) -> dict[str, Any]:
        return {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "stop": self.stop, "logprobs": self.logprobs}

    def cache_key(self, backend: str, model: str) -> str:
        body = {"backend": backend, "model": model, "kind": self.kind, "messages": self.messages,
                "prompt": self.prompt, "params": self.params(), "sample_index": self.sample_index}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class Completion(BaseModel):
    """A teacher's answer to one Request, or the error that remained after retries."""

    text: str = ""
    finish_reason: str = ""
    tokens_in: int = 0
    tokens_out: int = 0
    latency_s: float = 0.0
    error: str | None = None
    cached: bool = False
    logprobs: list[dict[str, Any]] | None = None  # per token: {"token", "logprob", "top": {tok: lp}}

    @property
    def ok(self) -> bool:
        return self.error is None


@contextmanager
def write_transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """One commit for the writes inside (the response cache's and the ledger's); inside another transaction on the
    same connection it simply joins it."""
    if conn.in_transaction:
        yield
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except sqlite3.Error:
        if conn.in_transaction:  # not after SQLite rolled back itself: keep the real error
            conn.execute("ROLLBACK")
        raise
    except BaseException:
        # Not the database failing (a progress callback raised, Ctrl-C): every write made is whole, and a paid
        # reply must not be thrown away with the error, so what was written is kept.
        if conn.in_transaction:
            conn.execute("COMMIT")
        raise


class ResponseCache:
    """Content-addressed store of teacher replies in SQLite (WAL: safe with concurrent writers)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._conn() as c:
            c.execute("CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, reply TEXT NOT NULL, created REAL)")

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    def get(self, key: str) -> Completion | None:
        row = self._conn().execute("SELECT reply FROM replies WHERE key=?", (key,)).fetchone()
        return Completion.model_validate_json(row[0]) if row else None

    def get_many(self, keys: list[str]) -> dict[str, Completion]:
        """The cached replies among `keys`, in a few queries: a batch's lookups must not cost a round trip
        to SQLite per request before the first call can start (bench/teacher_throughput.py)."""
        found: dict[str, Completion] = {}
        conn = self._conn()
        for k in range(0, len(keys), 500):  # SQLite's default cap on bound parameters is well above this
            chunk = keys[k:k + 500]
            marks = ",".join("?" * len(chunk))
            for key, reply in conn.execute(f"SELECT key, reply FROM replies WHERE key IN ({marks})", chunk):
                found[key] = Completion.model_validate_json(reply)
        return found

    def transaction(self) -> AbstractContextManager[None]:
        """Puts inside commit together: one write to the database for a group of replies instead of one each."""
        return write_transaction(self._conn())

    def put(self, key: str, completion: Completion) -> None:
        # Only successful replies are cached: a failure must be retried on the next run.
        if completion.ok:
            self._conn().execute("INSERT OR REPLACE INTO replies VALUES (?, ?, ?)",
                                 (key, completion.model_dump_json(), time.time()))

    def __len__(self) -> int:
        return self._conn().execute("SELECT COUNT(*) FROM replies").fetchone()[0]

    # Batch API jobs in flight, so a killed run resumes polling its batch instead of paying for a second one.
    def _batches(self) -> sqlite3.Connection:
        conn = self._conn()
        conn.execute("CREATE TABLE IF NOT EXISTS batches (tag TEXT PRIMARY KEY, batch_id TEXT NOT NULL, created REAL)")
        return conn

    def pending_batch(self, tag: str) -> str | None:
        """The batch id submitted earlier for this set of requests, if it was not collected yet."""
        row = self._batches().execute("SELECT batch_id FROM batches WHERE tag=?", (tag,)).fetchone()
        return row[0] if row else None

    def remember_batch(self, tag: str, batch_id: str) -> None:
        self._batches().execute("INSERT OR REPLACE INTO batches VALUES (?, ?, ?)", (tag, batch_id, time.time()))

    def forget_batch(self, tag: str) -> None:
        self._batches().execute("DELETE FROM batches WHERE tag=?", (tag,))


class Teacher(Protocol):
    """What every backend provides: a batch of requests in, one completion per request out, in order."""

    backend: str
    model: str

    def generate(self, requests: list[Request], on_done: Callable[[int], None] | None = None) -> list[Completion]: ...


class CachedTeacher:
    """Shared front for backends: cache lookups, ledger, budget; subclasses implement `_call_batch`."""

    backend = "base"

    def __init__(self, model: str, cache: ResponseCache, ledger: Ledger):
        self.model = model
        self.cache = cache
        self.ledger = ledger
        self._holds: dict[str, list[str]] = {}  # cache key -> budget holds of its requests in flight

    def generate(self, requests: list[Request], on_done: Callable[[int], None] | None = None) -> list[Completion]:
        """Answer every request, from the cache where possible; failures come back with `error` set."""
        self.ledger.check_budget()
        results: list[Completion | None] = [None] * len(requests)
        keys = [r.cache_key(self.backend, self.model) for r in requests]
        hits = self.cache.get_many(keys)
        todo: list[int] = []
        for i, key in enumerate(keys):
            hit = hits.get(key)
            if hit is not None:
                results[i] = hit.model_copy(update={"cached": True})
                self.ledger.record(requests[i].stage, results[i])
                if on_done:
                    on_done(1)
            else:
                todo.append(i)

        def store(i: int, c: Completion) -> None:
            # Called as each reply lands, so a kill loses at most the calls in flight (their holds stay counted).
            self.cache.put(keys[i], c)
            holds = self._holds.get(keys[i])
            self.ledger.record(requests[i].stage, c, holds.pop() if holds else None)
            results[i] = c
            if on_done:
                on_done(1)

        if todo:
            self._call_batch([(i, requests[i], keys[i]) for i in todo], store)
        return [r if r is not None else Completion(error="not attempted: budget reached") for r in results]

    def _call_batch(self, items: list[tuple[int, Request, str]], store: Callable[[int, Completion], None]) -> None:
        raise NotImplementedError

    @contextmanager
    def storing_together(self) -> Iterator[None]:
        """`store` calls inside write their replies to the cache and the ledger in one commit each (a backend
        whose replies land in bursts groups them, instead of paying three commits per reply)."""
        # The cache commits first: a kill between the two commits leaves a reply cached with its hold still
        # counted at the worst case (never paid twice, never under-counted), not counted but uncached.
        with self.ledger.transaction(), self.cache.transaction():
            yield

    def _admit(self, req: Request, key: str) -> bool:
        """Hold this request's worst-case cost before sending it; False when that would cross the run's budget."""
        hold = self.ledger.reserve(req)
        if hold is None:
            return False
        self._holds.setdefault(key, []).append(hold)
        return True

    def close(self) -> None:
        """Release model memory or connections."""


def request_seed(base_seed: int, key: str) -> int:
    """A per-request sampling seed derived from the cache key: same request, same sample."""
    return (base_seed + int(key[:8], 16)) % (2**31 - 1)
