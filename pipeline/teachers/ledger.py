"""The run's ledger: tokens, requests, failures, latency and dollars per stage, and the budget they count against.

One ledger per run (runs/<id>/ledger.sqlite), shared by every stage, resume and process of the run, so a budget
holds across all of them."""

from __future__ import annotations

import itertools
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from pipeline.errors import BudgetExceeded
from pipeline.teachers.base import Completion, Request, write_transaction


@dataclass
class StageTally:
    requests: int = 0
    cached: int = 0
    failures: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    latency_s: float = 0.0
    cost_usd: float = 0.0


TALLY_FIELDS = tuple(StageTally.__dataclass_fields__)
# Chat formatting adds a few tokens per message (role markers, separators) on every chat template we know.
CHAT_TOKENS_PER_MESSAGE = 8
REPLY_PRIMING_TOKENS = 8


def worst_case_tokens(req: Request) -> tuple[int, int]:
    """An upper bound on what one request can be billed for: (prompt tokens, completion tokens).

    Byte-level BPE and byte-fallback tokenizers spend at least one byte per token, so the prompt's UTF-8 bytes
    (plus the chat template's markers) bound its token count whatever the tokenizer; the completion is bounded by
    max_tokens. No tokenizer of the remote model is needed, and the bound never underestimates."""
    if req.kind == "chat":
        msgs = req.messages or []
        prompt = sum(len((m.get("role") or "").encode()) + len((m.get("content") or "").encode()) for m in msgs)
        prompt += CHAT_TOKENS_PER_MESSAGE * len(msgs) + REPLY_PRIMING_TOKENS
    else:
        prompt = len((req.prompt or "").encode()) + REPLY_PRIMING_TOKENS
    return prompt, req.max_tokens


# Built once: `record` runs once per reply.
_RECORD_SQL = (f"INSERT INTO stages VALUES (?, {', '.join('?' for _ in TALLY_FIELDS)}) ON CONFLICT(stage) "
               f"DO UPDATE SET {', '.join(f'{k}={k}+excluded.{k}' for k in TALLY_FIELDS)}")
_HOLD_SQL = "INSERT INTO holds VALUES (?, ?, ?, ?, ?, ?)"

_LEDGER_SQL = """
CREATE TABLE IF NOT EXISTS stages (stage TEXT PRIMARY KEY, requests INTEGER, cached INTEGER, failures INTEGER,
    tokens_in INTEGER, tokens_out INTEGER, latency_s REAL, cost_usd REAL);
CREATE TABLE IF NOT EXISTS holds (id TEXT PRIMARY KEY, stage TEXT, owner TEXT, tokens INTEGER, cost_usd REAL,
    created REAL) WITHOUT ROWID;
"""


class Ledger:
    """Tokens, requests, failures, latency and dollars per stage, and the budget they count against.

    One ledger belongs to one run: with `path` (runs/<id>/ledger.sqlite) every stage, every resume and every
    process of the run adds to the same totals, so the cap holds across them. Without a path it lives in memory
    (a one-off client, a fan-out worker). The cap is enforced before money is spent: a request is sent only when
    what is already spent, plus the worst case of the requests in flight, plus its own worst case (see
    `worst_case_tokens`) fit in the budget. A hold left behind by a killed process stays counted at its worst
    case (the server may have answered and billed it), so a kill can never make the run spend more."""

    def __init__(self, price_per_1m_input: float = 0.0, price_per_1m_output: float = 0.0,
                 budget_usd: float | None = None, budget_tokens: int | None = None, path: Path | None = None,
                 *, _shared: dict | None = None):
        self.price_per_1m_input = price_per_1m_input
        self.price_per_1m_output = price_per_1m_output
        self.budget_usd = budget_usd
        self.budget_tokens = budget_tokens
        self.path = Path(path) if path else None
        if _shared is None:
            if self.path:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path or ":memory:", timeout=60, isolation_level=None, check_same_thread=False)
            if self.path:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_LEDGER_SQL)
            _shared = {"conn": conn, "lock": threading.RLock(), "owner": uuid.uuid4().hex, "refused": None,
                       "holds": itertools.count()}
        self._shared = _shared

    @classmethod
    def for_teacher(cls, cfg: Any, path: Path | None = None) -> "Ledger":
        """The ledger a teacher config asks for: its prices and budget, in memory or at `path`."""
        return cls(cfg.price_per_1m_input, cfg.price_per_1m_output, cfg.budget_usd, cfg.budget_tokens, path)

    def priced(self, price_per_1m_input: float, price_per_1m_output: float) -> "Ledger":
        """The same ledger and budget, pricing calls at another model's prices (an LLM judge, say)."""
        return Ledger(price_per_1m_input, price_per_1m_output, self.budget_usd, self.budget_tokens, self.path,
                      _shared=self._shared)

    def cost(self, tokens_in: int, tokens_out: int) -> float:
        return (tokens_in * self.price_per_1m_input + tokens_out * self.price_per_1m_output) / 1e6

    @property
    def _conn(self) -> sqlite3.Connection:
        return self._shared["conn"]

    def _spent(self) -> tuple[float, int]:
        """(dollars, tokens) spent or held, over every stage and process of the run."""
        with self._shared["lock"]:
            c = self._conn
            usd, tok = c.execute("SELECT COALESCE(SUM(cost_usd), 0), COALESCE(SUM(tokens_in + tokens_out), 0) "
                                 "FROM stages").fetchone()
            h_usd, h_tok = c.execute("SELECT COALESCE(SUM(cost_usd), 0), COALESCE(SUM(tokens), 0) FROM holds").fetchone()
        return usd + h_usd, tok + h_tok

    def reserve(self, requests: Request | list[Request], hold_id: str | None = None, check: bool = True) -> str | None:
        """Hold the worst-case cost of one request (or a whole batch job); returns the hold id, or None when it
        would cross the budget (and the ledger then counts as exhausted for this run's process). A batch job passes
        its own id, so a resumed run takes over the hold of the job it resumes instead of holding twice."""
        reqs = [requests] if isinstance(requests, Request) else list(requests)
        bounds = [worst_case_tokens(r) for r in reqs]
        tokens = sum(i + o for i, o in bounds)
        usd = sum(self.cost(i, o) for i, o in bounds)
        taken_over = hold_id is not None
        # Unique across the processes of a run without a random draw per request: this ledger's owner id + a count.
        hold_id = hold_id or f"{self._shared['owner']}-{next(self._shared['holds'])}"
        row = (hold_id, reqs[0].stage if reqs else "", self._shared["owner"], tokens, usd, time.time())
        capped = check and (self.budget_usd is not None or self.budget_tokens is not None)
        with self._shared["lock"]:
            c = self._conn
            if not capped and not taken_over:
                # No cap to check, no hold to take over (one request in flight, the common case): the hold is one
                # statement, its own transaction, still written before the request is sent.
                c.execute(_HOLD_SQL, row)
                return hold_id
            c.execute("BEGIN IMMEDIATE")
            try:
                if taken_over:
                    c.execute("DELETE FROM holds WHERE id=?", (hold_id,))  # a batch job's earlier hold, taken over
                # Money already committed (a submitted batch job) is held whatever is left: nothing to add up.
                spent_usd, spent_tok = self._spent() if capped else (0.0, 0)
                what = "request" if len(reqs) == 1 else f"batch of {len(reqs)} requests"
                worst = (f"{bounds[0][0]} prompt + {bounds[0][1]} completion tokens" if len(reqs) == 1 else
                         f"{sum(i for i, _ in bounds)} prompt + {sum(o for _, o in bounds)} completion tokens")
                refused = None
                if not capped:
                    pass
                elif self.budget_usd is not None and spent_usd + usd > self.budget_usd:
                    refused = ("teacher.budget_usd", f"the next {what} could cost up to ${usd:.4f} ({worst} at most, "
                               f"at the configured prices), more than the ${max(0.0, self.budget_usd - spent_usd):.4f} "
                               f"left of ${self.budget_usd:g} (spent or in flight: ${spent_usd:.4f})")
                elif self.budget_tokens is not None and spent_tok + tokens > self.budget_tokens:
                    refused = ("teacher.budget_tokens", f"the next {what} could use up to {tokens} tokens ({worst}), "
                               f"more than the {max(0, self.budget_tokens - spent_tok)} left of {self.budget_tokens}")
                if refused:
                    c.execute("ROLLBACK")
                    self._shared["refused"] = refused
                    return None
                c.execute(_HOLD_SQL, row)
                c.execute("COMMIT")
            except BaseException:
                if c.in_transaction:
                    c.execute("ROLLBACK")
                raise
        return hold_id

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Records inside commit together (see CachedTeacher.storing_together); the ledger stays locked for them."""
        with self._shared["lock"], write_transaction(self._conn):
            yield

    def release(self, hold_id: str | None) -> None:
        """Drop a hold whose requests were never sent."""
        if hold_id:
            with self._shared["lock"]:
                self._conn.execute("DELETE FROM holds WHERE id=?", (hold_id,))

    def record(self, stage: str, c: Completion, hold_id: str | None = None, *, release: bool = True) -> None:
        """Add one reply to the stage's tally; settles (drops) its hold unless `release` is False."""
        if c.cached:
            row = dict(cached=1)  # a cached reply costs nothing
        else:
            row = dict(requests=1, failures=0 if c.ok else 1, tokens_in=c.tokens_in, tokens_out=c.tokens_out,
                       latency_s=c.latency_s, cost_usd=self.cost(c.tokens_in, c.tokens_out))
        values = [row.get(k, 0) for k in TALLY_FIELDS]
        with self.transaction():  # the tally and the settled hold change together, or neither does
            self._conn.execute(_RECORD_SQL, [stage, *values])
            if hold_id and release:
                self._conn.execute("DELETE FROM holds WHERE id=?", (hold_id,))

    @property
    def stages(self) -> dict[str, StageTally]:
        """The run's tally per stage; `unsettled` holds requests a killed process had in flight (worst case)."""
        with self._shared["lock"]:
            rows = self._conn.execute(f"SELECT stage, {', '.join(TALLY_FIELDS)} FROM stages ORDER BY rowid").fetchall()
            # Holds of processes that died with requests in flight: counted at their worst case, never forgotten.
            stale = self._conn.execute("SELECT COUNT(*), COALESCE(SUM(tokens), 0), COALESCE(SUM(cost_usd), 0) FROM holds "
                                       "WHERE owner != ?", (self._shared["owner"],)).fetchone()
        out = {r[0]: StageTally(*r[1:]) for r in rows}
        if stale[0]:
            out["unsettled"] = StageTally(requests=stale[0], tokens_out=stale[1], cost_usd=stale[2])
        return out

    def totals(self) -> StageTally:
        total = StageTally()
        for t in self.stages.values():
            for k in TALLY_FIELDS:
                setattr(total, k, getattr(total, k) + getattr(t, k))
        return total

    def remaining_usd(self) -> float | None:
        return None if self.budget_usd is None else self.budget_usd - self._spent()[0]

    def check_budget(self) -> None:
        """Raise BudgetExceeded once a request was refused for the budget, or the budget is spent."""
        spent_usd, spent_tok = self._spent()
        refused = self._shared["refused"]
        if refused is None:
            if self.budget_usd is not None and spent_usd >= self.budget_usd:
                refused = ("teacher.budget_usd", f"${spent_usd:.4f} spent of ${self.budget_usd:g}")
            elif self.budget_tokens is not None and spent_tok >= self.budget_tokens:
                refused = ("teacher.budget_tokens", f"{spent_tok} tokens spent of {self.budget_tokens}")
        if refused is not None:
            key, why = refused
            raise BudgetExceeded(f"The run's teacher budget is reached: {why}. Every reply paid for so far is kept; "
                                 f"raise {key} and resume with `distill run --run-id <run id>` to continue.")

    def over_budget(self) -> bool:
        """True once the budget is spent (the non-raising form of `check_budget`)."""
        if self.budget_usd is None and self.budget_tokens is None:
            return False  # asked before every call: no budget, no totals to add up
        try:
            self.check_budget()
            return False
        except BudgetExceeded:
            return True

    def as_dict(self) -> dict[str, Any]:
        out = {name: vars(t).copy() for name, t in self.stages.items()}
        out["total"] = vars(self.totals()).copy()
        return out
