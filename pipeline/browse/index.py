"""A SQLite sidecar index per dataset version: FTS5 over instruction/input/output plus a narrow table of
filter columns, built once from the version's Parquet files so a page or a search over a million records
stays fast. The Parquet files are never modified; the index lives in a cache folder and is rebuilt when
the files it was built from change."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

SCHEMA_VERSION = "3"
# Columns users filter on; ones a dataset lacks are simply NULL (e.g. task_type before generation adds it).
FACETS = ("status", "reject_reason", "source", "task_type", "template")
TEXT = ("instruction", "input", "output")
# Model-based quality scores (curate.quality) users sort and filter on; NULL where no scorer ran.
SCORES = ("quality_score", "ifd", "judge_score", "reward_score")
MAX_FACET_VALUES = 200
COUNT_STEPS = (1_000, 10_000, 100_000)  # a count stops at the first step it stays under, or shows "step+"
COUNT_BUDGET_S = 0.05  # a count that takes longer than this is reported as "many", never blocks the page
QUERY_BUDGET_S = 10.0  # a filter combination that needs longer is refused with advice, never hangs a worker


def dataset_files(dataset_dir: Path) -> list[Path]:
    """The record files of a dataset version: accepted, rejected, then any other Parquet with records."""
    import pyarrow.parquet as pq

    order = {"accepted.parquet": 0, "rejected.parquet": 1}
    files = sorted(Path(dataset_dir).glob("*.parquet"), key=lambda p: (order.get(p.name, 2), p.name))
    return [p for p in files if "instruction" in pq.read_schema(p).names]


def signature(files: list[Path]) -> str:
    """What the index was built from; any change to a file (size or mtime) means a rebuild."""
    parts = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return json.dumps({"schema": SCHEMA_VERSION, "files": parts})


def count_rows(files: list[Path]) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(p).metadata.num_rows for p in files)


def text_hash(text: str) -> int:
    """A 63-bit key for exact-text lookups (the nearest near-duplicate named by its instruction)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big") >> 1


def _row_batches(files: list[Path], batch_rows: int) -> Iterator[tuple[list, list, list]]:
    """(docs rows, filter rows, fts rows) per Parquet batch, numbered across files in order."""
    import pyarrow.parquet as pq

    row = 0
    for path in files:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        extra_cols = [c for c in names if c not in TEXT and c != "id"]
        for batch in pf.iter_batches(batch_size=batch_rows):
            cols = {c: batch.column(c).to_pylist() for c in names}
            n = batch.num_rows
            empty = [None] * n
            inst, inp, out = ([t or "" for t in cols[c]] if c in cols else [""] * n for c in TEXT)
            extras = [json.dumps(dict(zip(extra_cols, vals)), ensure_ascii=False, default=str)
                      for vals in zip(*(cols[c] for c in extra_cols))] if extra_cols else ["{}"] * n
            rows = range(row, row + n)
            docs = list(zip(rows, inst, inp, out, extras))
            frows = list(zip(rows, cols.get("id", empty), [path.name] * n, *(cols.get(c, empty) for c in FACETS),
                             [len(o) for o in out], [text_hash(i) for i in inst], *(cols.get(c, empty) for c in SCORES)))
            yield docs, frows, list(zip(rows, inst, inp, out))
            row += n


def _prefetch(items: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """Iterate `items` in a background thread, `depth` ahead; its exceptions re-raise here, and the thread
    stops when the consumer does (an insert that fails must not leave a reader blocked forever)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(done)
        except BaseException as e:  # handed to the consumer
            put(e)

    threading.Thread(target=work, daemon=True, name="browse-index-reader").start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def build_index(dataset_dir: Path, out: Path, progress: Callable[[int], None] | None = None,
                batch_rows: int = 20_000) -> dict[str, Any]:
    """Read every record file of a dataset version into a new SQLite index at `out` (atomically)."""
    start = time.perf_counter()
    files = dataset_files(dataset_dir)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    tmp.unlink(missing_ok=True)
    conn = sqlite3.connect(tmp)
    try:
        conn.executescript("""
            PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA temp_store=MEMORY; PRAGMA cache_size=-262144;
            CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
            CREATE TABLE docs (row INTEGER PRIMARY KEY, instruction TEXT, input TEXT, output TEXT, extra TEXT);
            CREATE TABLE f (row INTEGER PRIMARY KEY, id TEXT, file TEXT, status TEXT, reject_reason TEXT, source TEXT,
                            task_type TEXT, template TEXT, out_len INTEGER, ihash INTEGER, quality_score REAL,
                            ifd REAL, judge_score REAL, reward_score REAL);
            CREATE VIRTUAL TABLE fts USING fts5(instruction, input, output, content='docs', content_rowid='row',
                                                tokenize='unicode61 remove_diacritics 2');
        """)
        # A reader thread turns Parquet batches into rows while this thread inserts them (SQLite and FTS5
        # tokenising release the GIL), so the two halves of the work overlap on two cores.
        row = 0
        for docs, frows, fts_rows in _prefetch(_row_batches(files, batch_rows)):
            conn.executemany("INSERT INTO docs VALUES (?,?,?,?,?)", docs)
            conn.executemany("INSERT INTO f VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)", frows)
            conn.executemany("INSERT INTO fts(rowid, instruction, input, output) VALUES (?,?,?,?)", fts_rows)
            row += len(docs)
            if progress:
                progress(row)
        # One row per record id for diffs (an exact duplicate shares its original's id): the accepted row wins.
        conn.execute("CREATE TABLE ids (id TEXT PRIMARY KEY, row INTEGER, status TEXT, reject_reason TEXT) WITHOUT ROWID")
        conn.execute("INSERT OR IGNORE INTO ids SELECT id, row, status, reject_reason FROM f WHERE id IS NOT NULL "
                     "ORDER BY (status IS NOT 'accepted'), row")
        # Single-column indexes end in the rowid, so an equality filter already yields rows in page order.
        for col in ("id", "ihash", *FACETS, *SCORES):  # a score index ends in the rowid: (score, row) keysets
            conn.execute(f"CREATE INDEX ix_{col} ON f({col})")
        facet_counts = {}
        for col in FACETS:
            vals = conn.execute(f"SELECT {col}, count(*) FROM f GROUP BY {col} ORDER BY count(*) DESC "
                                f"LIMIT {MAX_FACET_VALUES + 1}").fetchall()
            if any(v is not None for v, _ in vals):
                facet_counts[col] = [[v, c] for v, c in vals[:MAX_FACET_VALUES]]
        scored = [c for c in SCORES if conn.execute(f"SELECT 1 FROM f WHERE {c} IS NOT NULL LIMIT 1").fetchone()]
        info = {"rows": row, "scores": scored, "ids": conn.execute("SELECT count(*) FROM ids").fetchone()[0],
                "files": [p.name for p in files], "facets": facet_counts,
                "build_s": round(time.perf_counter() - start, 3), "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        conn.executemany("INSERT INTO meta VALUES (?, ?)",
                         [("signature", signature(files)), ("info", json.dumps(info, ensure_ascii=False))])
        conn.commit()
        conn.execute("PRAGMA analysis_limit=1000")  # approximate statistics are enough for the planner, and fast
        conn.execute("ANALYZE")
        conn.commit()
    except BaseException:
        conn.close()
        tmp.unlink(missing_ok=True)
        raise
    conn.close()
    os.replace(tmp, out)
    return info


def fts_query(q: str) -> str:
    """User text -> an FTS5 query where every word must appear; FTS syntax in the text is taken literally."""
    terms = []
    for word in q.split():
        prefix = word.endswith("*") and len(word) > 1
        word = word.rstrip("*").replace('"', '""')
        if word:
            terms.append(f'"{word}"' + ("*" if prefix else ""))
    return " AND ".join(terms)


@dataclass
class Query:
    """One page request: search text, filters and a keyset position (rows after/before a row number)."""

    q: str = ""
    filters: dict[str, str] = field(default_factory=dict)  # facet column -> value ("" or absent: any)
    min_len: int | None = None
    max_len: int | None = None
    score_range: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)  # score -> (min, max)
    sort: str = ""  # "" (file order), or a score column, "-" in front for highest first; unscored rows drop out
    after: int | None = None
    before: int | None = None
    limit: int = 50


@dataclass
class Page:
    rows: list[dict[str, Any]]
    has_next: bool
    has_prev: bool
    total: int | None  # None: counting took longer than the budget
    total_capped: bool
    elapsed_ms: float


def run_with_budget(conn: sqlite3.Connection, sql: str, params: list[Any], budget_s: float,
                    too_slow: str) -> list[sqlite3.Row]:
    """Run a query, interrupting it (QueryTooSlow with `too_slow`) once it has used `budget_s` seconds."""
    deadline = time.perf_counter() + budget_s
    conn.set_progress_handler(lambda: int(time.perf_counter() > deadline), 10_000)
    try:
        return conn.execute(sql, params).fetchall()
    except sqlite3.OperationalError as e:
        if "interrupted" in str(e):
            raise QueryTooSlow(too_slow) from None
        raise
    finally:
        conn.set_progress_handler(None, 0)


class QueryTooSlow(Exception):
    """A filter combination that would scan too long; the message suggests narrowing it."""


class DatasetIndex:
    """Read-only queries over one built index file; one SQLite connection per call (threads share nothing)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with self._conn() as c:
            meta = dict(c.execute("SELECT key, value FROM meta"))
        self.info = json.loads(meta["info"])
        self.signature = meta["signature"]

    def _conn(self) -> sqlite3.Connection:
        conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        return conn

    @property
    def rows(self) -> int:
        return int(self.info["rows"])

    def _where(self, query: Query) -> tuple[list[str], list[Any]]:
        where, params = [], []
        for col, value in query.filters.items():
            if col not in FACETS or value in (None, ""):
                continue
            if value == "(none)":
                where.append(f"f.{col} IS NULL")
            else:
                where.append(f"f.{col} = ?")
                params.append(value)
        if query.min_len is not None:
            where.append("f.out_len >= ?")
            params.append(query.min_len)
        if query.max_len is not None:
            where.append("f.out_len <= ?")
            params.append(query.max_len)
        for col, (lo, hi) in query.score_range.items():
            if col not in SCORES:
                continue
            if lo is not None:
                where.append(f"f.{col} >= ?")
                params.append(lo)
            if hi is not None:
                where.append(f"f.{col} <= ?")
                params.append(hi)
        return where, params

    def _source(self, query: Query) -> tuple[str, str, list[Any]]:
        """FROM clause, the row column, and params; a search drives the loop from FTS in rowid order."""
        match = fts_query(query.q)
        if match:
            # CROSS JOIN keeps FTS as the outer loop: it yields rowids in order, so LIMIT stops early.
            return "fts CROSS JOIN f ON f.row = fts.rowid", "fts.rowid", [match]
        return "f", "f.row", []

    def page(self, query: Query) -> Page:
        """One page of rows in file order (or by a score), with a (budgeted) total count."""
        t0 = time.perf_counter()
        source, rowcol, sparams = self._source(query)
        where, params = self._where(query)
        if sparams:
            where.insert(0, "fts MATCH ?")
        sort_col = query.sort.lstrip("-")
        if sort_col and sort_col not in SCORES:
            raise ValueError(f"sort must be one of {', '.join(SCORES)} (with '-' for highest first), got {query.sort!r}")
        if sort_col:
            where.append(f"f.{sort_col} IS NOT NULL")
        base_where = list(where)
        base_params = sparams + params
        with self._conn() as c:
            if sort_col:
                order, pos = self._score_keyset(c, query, sort_col, where)
                rowcol = f"f.{sort_col} {order}, f.row"
            else:
                order = "ASC"
                if query.before is not None:
                    where.append(f"{rowcol} < ?")
                    order = "DESC"
                elif query.after is not None:
                    where.append(f"{rowcol} > ?")
                pos = [query.before] if query.before is not None else [query.after] if query.after is not None else []
            clause = ("WHERE " + " AND ".join(where)) if where else ""
            sql = f"SELECT f.row FROM {source} {clause} ORDER BY {rowcol} {order} LIMIT ?"
            ids = [r[0] for r in self._run(c, sql, base_params + pos + [query.limit + 1], QUERY_BUDGET_S)]
            more = len(ids) > query.limit
            ids = ids[: query.limit]
            if query.before is not None:  # walked backwards from the page's first row: put it back in page order
                ids.reverse()
            rows = self._fetch(c, ids)
            if query.before is not None:
                has_prev, has_next = more, True
            else:
                has_prev, has_next = query.after is not None, more
            total, capped = self._count(c, source, base_where, base_params)
        return Page(rows, has_next and bool(rows), has_prev and bool(rows), total, capped,
                    (time.perf_counter() - t0) * 1000)

    @staticmethod
    def _score_keyset(c: sqlite3.Connection, query: Query, col: str, where: list[str]) -> tuple[str, list[Any]]:
        """Order and keyset condition for a page sorted by a score: ties go by row in the same direction, so the
        (score, row) index serves the order and `after`/`before` (a row on the current page) resume exactly."""
        desc = query.sort.startswith("-")
        anchor = query.before if query.before is not None else query.after
        backwards = query.before is not None
        order = "DESC" if desc != backwards else "ASC"
        if anchor is None:
            return order, []
        got = c.execute(f"SELECT {col} FROM f WHERE row = ?", (anchor,)).fetchone()
        if got is None or got[0] is None:
            return order, []
        where.append(f"(f.{col}, f.row) {'<' if order == 'DESC' else '>'} (?, ?)")
        return order, [got[0], anchor]

    def _count(self, c, source, where, params) -> tuple[int | None, bool]:
        """Count matches under a time budget, in growing steps, so a huge result still says "10,000+"."""
        if not where:
            return self.rows, False
        deadline = time.perf_counter() + COUNT_BUDGET_S
        known: tuple[int | None, bool] = (None, False)
        for cap in COUNT_STEPS:
            sql = f"SELECT count(*) FROM (SELECT 1 FROM {source} WHERE {' AND '.join(where)} LIMIT {cap + 1})"
            try:
                n = self._run(c, sql, params, deadline - time.perf_counter())[0][0]
            except QueryTooSlow:
                return known
            if n <= cap:
                return n, False
            known = (cap, True)
        return known

    @staticmethod
    def _run(c: sqlite3.Connection, sql: str, params: list[Any], budget_s: float) -> list[sqlite3.Row]:
        return run_with_budget(c, sql, params, budget_s, f"this filter combination needs more than {budget_s:.0f} s; "
                                                         f"narrow it with a search word or a status filter")

    def _fetch(self, c: sqlite3.Connection, ids: list[int]) -> list[dict[str, Any]]:
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        sql = (f"SELECT f.*, substr(d.instruction, 1, 400) AS instruction, substr(d.input, 1, 200) AS input, "
               f"substr(d.output, 1, 400) AS output FROM f JOIN docs d ON d.row = f.row WHERE f.row IN ({marks})")
        by_row = {r["row"]: dict(r) for r in c.execute(sql, ids)}
        return [by_row[i] for i in ids if i in by_row]

    def record(self, row: int) -> dict[str, Any] | None:
        """Every stored field of one record (provenance included), or None."""
        with self._conn() as c:
            r = c.execute("SELECT f.*, d.instruction, d.input, d.output, d.extra FROM f JOIN docs d ON d.row = f.row "
                          "WHERE f.row = ?", (row,)).fetchone()
        if r is None:
            return None
        rec = {**json.loads(r["extra"] or "{}"), **{k: r[k] for k in r.keys() if k != "extra"}}
        return rec

    def rows_with_id(self, record_id: str) -> list[int]:
        with self._conn() as c:
            return [r[0] for r in c.execute("SELECT row FROM f WHERE id = ? ORDER BY row LIMIT 20", (record_id,))]

    def rows_with_instruction(self, instruction: str) -> list[int]:
        """Rows whose instruction is exactly this text (hash lookup, then an exact compare)."""
        with self._conn() as c:
            return [r[0] for r in c.execute(
                "SELECT f.row FROM f JOIN docs d ON d.row = f.row WHERE f.ihash = ? AND d.instruction = ? "
                "ORDER BY f.row LIMIT 20", (text_hash(instruction), instruction))]
