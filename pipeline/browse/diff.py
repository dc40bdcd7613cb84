"""Diff two dataset versions by record id: added, removed, and changed (same id, other status or reason).
Runs over the two sidecar indexes (ATTACHed read-only), so it never loads a version into memory."""

from __future__ import annotations

import sqlite3
from typing import Any

from pipeline.browse.index import DatasetIndex, QueryTooSlow, run_with_budget

KINDS = ("added", "removed", "changed")
COUNT_BUDGET_S = 8.0
_COUNTS: dict[tuple, dict[str, int | None]] = {}  # versions are immutable: count once per pair


def _sql(kind: str) -> str:
    # `a` is the old version (main), `b` the new one (attached); every query walks ids in id order.
    if kind == "added":
        return ("SELECT n.id, n.row AS b_row, NULL AS a_row, NULL AS a_status, NULL AS a_reason, n.status AS b_status, "
                "n.reject_reason AS b_reason FROM b.ids n WHERE NOT EXISTS (SELECT 1 FROM main.ids o WHERE o.id = n.id)")
    if kind == "removed":
        return ("SELECT o.id, NULL AS b_row, o.row AS a_row, o.status AS a_status, o.reject_reason AS a_reason, "
                "NULL AS b_status, NULL AS b_reason FROM main.ids o WHERE NOT EXISTS (SELECT 1 FROM b.ids n WHERE n.id = o.id)")
    if kind == "changed":
        return ("SELECT o.id, n.row AS b_row, o.row AS a_row, o.status AS a_status, o.reject_reason AS a_reason, "
                "n.status AS b_status, n.reject_reason AS b_reason FROM main.ids o JOIN b.ids n ON n.id = o.id "
                "WHERE o.status IS NOT n.status OR o.reject_reason IS NOT n.reject_reason")
    raise ValueError(f"diff kind must be one of {KINDS}, got {kind!r}")


def _connect(a: DatasetIndex, b: DatasetIndex) -> sqlite3.Connection:
    conn = sqlite3.connect(f"file:{a.path}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    conn.execute("ATTACH DATABASE ? AS b", (f"file:{b.path}?mode=ro",))
    return conn


def _budgeted(conn: sqlite3.Connection, sql: str, params: list[Any], budget_s: float) -> list[sqlite3.Row]:
    return run_with_budget(conn, sql, params, budget_s, "diff count took too long")


def diff_counts(a: DatasetIndex, b: DatasetIndex) -> dict[str, int | None]:
    """How many ids were added, removed and changed from a to b, from one pass over the shared ids
    (None each when that pass takes longer than the budget)."""
    key = (str(a.path), a.signature, str(b.path), b.signature)
    if key in _COUNTS:
        return _COUNTS[key]
    conn = _connect(a, b)
    try:
        common, changed = _budgeted(conn, "SELECT count(*), coalesce(sum(o.status IS NOT n.status OR "
                                          "o.reject_reason IS NOT n.reject_reason), 0) FROM main.ids o "
                                          "JOIN b.ids n ON n.id = o.id", [], COUNT_BUDGET_S)[0]
    except QueryTooSlow:
        return {k: None for k in KINDS}
    finally:
        conn.close()
    out = {"added": b.info["ids"] - common, "removed": a.info["ids"] - common, "changed": changed}
    _COUNTS[key] = out
    return out


def diff_page(a: DatasetIndex, b: DatasetIndex, kind: str, after_id: str = "", limit: int = 50) -> tuple[list[dict], bool]:
    """One page of a diff kind in id order after `after_id`, each row with its instruction; (rows, has_more)."""
    conn = _connect(a, b)
    try:
        rows = [dict(r) for r in _budgeted(conn, f"SELECT * FROM ({_sql(kind)}) WHERE id > ? ORDER BY id LIMIT ?",
                                           [after_id, limit + 1], 10.0)]
        more = len(rows) > limit
        rows = rows[:limit]
        for r in rows:
            side, row = ("b", r["b_row"]) if r["b_row"] is not None else ("main", r["a_row"])
            doc = conn.execute(f"SELECT substr(instruction, 1, 300), substr(output, 1, 300) FROM {side}.docs WHERE row = ?",
                               (row,)).fetchone()
            r["instruction"], r["output"] = (doc[0], doc[1]) if doc else ("", "")
        return rows, more
    finally:
        conn.close()
