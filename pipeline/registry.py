"""The model registry: champion and challenger over the SQLite catalog.

Every trained student is registered as a model with its evaluation numbers. A new model becomes the champion
only if a paired bootstrap of its per-item scores against the champion's, on the eval items both answered
(matched by item id, instruction and input from each run's eval/outputs.jsonl), puts the 95% interval of the
difference above 0, and no guard metric regresses beyond its tolerance; otherwise it stays a challenger, and the
reason is recorded. Models that share no eval items are not compared on their unpaired means.
The champion's adapter is copied to `<runs_dir>/champion/` with a `champion.json` pointer beside it, a stable
place serving code can load from without knowing run ids.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import RetrainConfig
from pipeline.errors import DistillError
from pipeline.records import Record, now_iso
from pipeline.store import Catalog, Run, atomic_swap_dir, atomic_write_json, load_records

# Metrics where a smaller number is the better one; everything else counts higher as better.
LOWER_IS_BETTER = {"latency_s", "perplexity", "loss", "params", "size_mb"}

DECISIONS_SQL = """CREATE TABLE IF NOT EXISTS decisions (id TEXT PRIMARY KEY, model_id TEXT, champion_id TEXT,
    promoted INTEGER, reason TEXT, metric TEXT, details TEXT, created TEXT)"""


@dataclass
class Decision:
    """The outcome of comparing a challenger with the champion, with the numbers behind it."""

    model_id: str
    champion_id: str | None
    promoted: bool
    reason: str
    metric: str
    delta: float | None = None
    margin: float | None = None  # half-width of the paired interval of the difference
    checks: list[dict[str, Any]] = field(default_factory=list)
    paired: dict[str, Any] | None = None  # PairedDifference.as_dict() of challenger - champion

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_metrics(evaluation: dict[str, Any], contender: str = "distilled_student") -> dict[str, Any]:
    """A model's numbers from an evaluation summary: every numeric score, its CIs, and the eval set it used."""
    scores = evaluation.get(contender, {})
    metrics: dict[str, Any] = {k: v for k, v in scores.items()
                               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    metrics.update({k: list(v) for k, v in scores.items() if k.endswith("_ci") and isinstance(v, (list, tuple))})
    metrics["eval_set"] = str(evaluation.get("eval_set"))
    metrics["eval_items"] = evaluation.get("items")
    return metrics


def item_scores(metrics: dict[str, Any], metric: str, contender: str = "distilled_student") -> dict[str, float] | None:
    """Per-item scores of a registered model, keyed by (item id, instruction, input): from `per_item` in the metrics,
    or read from the run's eval/outputs.jsonl (`eval_outputs`); None when neither is there."""
    from pipeline.evaluate.verdict import PER_ITEM

    if isinstance(metrics.get("per_item"), dict):
        return metrics["per_item"]
    path = Path(metrics.get("eval_outputs") or "")
    if metric not in PER_ITEM or not metrics.get("eval_outputs") or not path.is_file():
        return None
    col = contender + PER_ITEM[metric][0]
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line) if line.strip() else {}
        v = row.get(col)
        if v is not None and v == v:
            out[json.dumps([row.get("id"), row.get("instruction"), row.get("input", "")])] = float(v)
    return out


def decide(challenger: dict[str, Any], champion: dict[str, Any] | None, rule: RetrainConfig,
           model_id: str = "challenger", champion_id: str | None = None, samples: int = 1000) -> Decision:
    """Apply the promotion rule to two metric dicts (as `register_model` stores them): a paired bootstrap of
    challenger - champion on the eval items both answered, then the guard metrics."""
    from pipeline.evaluate.metrics import paired_difference

    m = rule.metric
    if champion is None:
        return Decision(model_id, None, True, "no champion yet: the first model becomes the champion", m)
    new, old = item_scores(challenger, m), item_scores(champion, m)
    if not new:
        return Decision(model_id, champion_id, False, f"the challenger has no per-item {m!r} scores to pair with the "
                        f"champion's (eval/outputs.jsonl); not promoting on unpaired numbers", m)
    if not old:
        return Decision(model_id, champion_id, True, f"the champion has no per-item {m!r} scores to defend", m)
    shared = sorted(set(new) & set(old))
    if not shared:
        return Decision(model_id, champion_id, False,
                        f"the challenger ({len(new)} items) and the champion ({len(old)} items) share no eval items: "
                        f"not comparable, and not promoting on unpaired numbers", m)
    sign = -1.0 if m in LOWER_IS_BETTER else 1.0  # the difference is always 'how much better the challenger is'
    d = paired_difference([sign * new[k] for k in shared], [sign * old[k] for k in shared],
                          names=("challenger", "champion"), samples=samples, seed=0)
    checks = []
    for name, tolerance in rule.guards.items():
        a, b = challenger.get(name), champion.get(name)
        if a is None or b is None:
            checks.append({"metric": name, "ok": True, "note": "not measured for both models, skipped"})
            continue
        worse = (a - b) if name in LOWER_IS_BETTER else (b - a)
        allowed = tolerance * abs(b)
        checks.append({"metric": name, "champion": b, "challenger": a, "allowed_regression": allowed,
                       "regression": max(worse, 0.0), "ok": worse <= allowed})
    margin = (d.hi - d.lo) / 2
    sentence = d.sentence(m)
    if d.verdict != "better":
        return Decision(model_id, champion_id, False, f"not promoted: {sentence}", m, d.mean, margin, checks, d.as_dict())
    failed = [c for c in checks if not c["ok"]]
    if failed:
        reason = "; ".join(f"{c['metric']} regressed from {c['champion']:.4g} to {c['challenger']:.4g} "
                           f"(tolerance {c['allowed_regression']:.4g})" for c in failed)
        return Decision(model_id, champion_id, False, f"{sentence} But {reason}", m, d.mean, margin, checks, d.as_dict())
    return Decision(model_id, champion_id, True, f"promoted: {sentence}", m, d.mean, margin, checks, d.as_dict())


def register_model(run: Run, curation: dict[str, Any], evaluation: dict[str, Any], headline: dict[str, Any]) -> str:
    """Record the run's distilled student in the catalog as a candidate; returns the model id."""
    model_id = f"{run.id}/distilled"
    # What training saved: a LoRA adapter, or the whole model for train.finetune=full.
    saved = run.path("model") if run.cfg.train.finetune == "full" else run.path("adapter")
    known = run.catalog.rows("models", "WHERE id=?", (model_id,))
    # A resumed run registers again: keep the role a finished promotion gave it.
    role = known[0]["role"] if known else "candidate"
    run.catalog.upsert("models", id=model_id, run_id=run.id, path=str(saved.resolve()), role=role,
                       dataset_id=curation.get("id"), metrics={**headline, **model_metrics(evaluation),
                                                               # per-item scores the promotion rule pairs on
                                                               "eval_outputs": str(run.path("eval", "outputs.jsonl").resolve())},
                       created=run.status().get("updated") or now_iso())
    return model_id


def _metrics(row: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if row is None else json.loads(row.get("metrics") or "{}")


def champion(catalog: Catalog) -> dict[str, Any] | None:
    """The current champion's catalog row, or None."""
    rows = catalog.rows("models", "WHERE role='champion' ORDER BY created DESC LIMIT 1")
    return rows[0] if rows else None


def decisions(catalog: Catalog) -> list[dict[str, Any]]:
    """Every promotion decision, oldest first."""
    with sqlite3.connect(catalog.path, timeout=60) as c:
        c.execute(DECISIONS_SQL)
        c.row_factory = sqlite3.Row
        return [dict(r) for r in c.execute("SELECT * FROM decisions ORDER BY created, rowid")]


def promote(catalog: Catalog, model_id: str, rule: RetrainConfig) -> Decision:
    """Decide champion or challenger for a registered model, record the decision, export a new champion."""
    conn = sqlite3.connect(catalog.path, timeout=60, isolation_level=None)
    conn.row_factory = sqlite3.Row
    try:
        conn.execute(DECISIONS_SQL)
        # One decision at a time: two retraining runs finishing together must not both become champion.
        conn.execute("BEGIN IMMEDIATE")
        row = conn.execute("SELECT * FROM models WHERE id=?", (model_id,)).fetchone()
        if row is None:
            raise KeyError(f"model {model_id!r} is not in the catalog {catalog.path}; register it first")
        done = conn.execute("SELECT details FROM decisions WHERE model_id=? ORDER BY created DESC, rowid DESC LIMIT 1",
                            (model_id,)).fetchone()
        if done is not None and row["role"] in ("champion", "challenger", "retired"):
            conn.execute("ROLLBACK")  # decided before a kill: a resumed run does not decide twice
            return Decision(**json.loads(done["details"]))
        current = conn.execute("SELECT * FROM models WHERE role='champion' AND id != ? ORDER BY created DESC LIMIT 1",
                               (model_id,)).fetchone()
        current = dict(current) if current else None
        d = decide(_metrics(dict(row)), _metrics(current), rule, model_id, current["id"] if current else None)
        if d.promoted:
            conn.execute("UPDATE models SET role='retired' WHERE role='champion' AND id != ?", (model_id,))
        conn.execute("UPDATE models SET role=? WHERE id=?", ("champion" if d.promoted else "challenger", model_id))
        conn.execute("INSERT OR REPLACE INTO decisions VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                     (f"{model_id}@{now_iso()}", model_id, d.champion_id, int(d.promoted), d.reason, d.metric,
                      json.dumps(d.as_dict(), default=str), now_iso()))
        if d.promoted:
            target = export_champion(catalog.path.parent, dict(row))
            from pipeline.ship import ship_champion  # the champion as a GGUF too, ready to serve

            ship_champion(target, Path(row["path"]).parent, rule.champion_gguf)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    finally:
        conn.close()
    return d


def export_champion(runs_dir: Path, model: dict[str, Any]) -> Path:
    """Copy the champion's adapter (or full model) to <runs_dir>/champion/ and write champion.json (the stable
    alias). The swap is atomic (see atomic_swap_dir): a crash mid-promotion leaves the old champion or the new one."""
    target = Path(runs_dir) / "champion"
    run_dir = Path(model["path"]).parent
    kind = Path(model["path"]).name  # "adapter", or "model" for a full fine-tune
    with atomic_swap_dir(target) as tmp:
        shutil.copytree(model["path"], tmp / kind)
        if (run_dir / "config.yaml").exists():  # the student base the adapter belongs to
            shutil.copy2(run_dir / "config.yaml", tmp / "config.yaml")
        # The path through the stable alias, not resolved: the versioned folder behind it changes at each promotion.
        atomic_write_json(tmp / "champion.json", {"model_id": model["id"], "run_id": model["run_id"], "kind": kind,
                                                  kind: os.path.join(os.path.abspath(target), kind),
                                                  "source_adapter": model["path"], "dataset_id": model.get("dataset_id"),
                                                  "metrics": _metrics(model), "promoted": now_iso()})
    return target


def merge_accepted(run: Run) -> dict[str, Any]:
    """Retraining data: every accepted record of every curated dataset version so far -> datasets/curated."""
    final = run.path("datasets", "curated", "manifest.json")
    if final.exists():
        return json.loads(final.read_text())
    records: list[Record] = []
    parents, missing, seen = [], [], set()
    for row in run.catalog.rows("datasets", "ORDER BY created"):
        if row["run_id"] == run.id or json.loads(row["manifest"] or "{}").get("kind") == "retrain-merge":
            continue  # merged versions only repeat their parents
        path = Path(row["path"]) / "accepted.parquet"
        if not path.exists():
            missing.append(row["id"])
            continue
        for r in load_records(path):
            key = (r.instruction.strip().lower(), r.input.strip().lower())
            if key not in seen:  # the same instruction from two runs is trained on once
                seen.add(key)
                records.append(r)
        parents.append(row["id"])
    if not records:
        raise DistillError(f"No accepted records in any dataset of the catalog {run.catalog.path}: retraining needs "
                           f"data. Run `distill run --data-only` (or the distill/data deployment) first.")
    run.save_dataset("curated", records, [], {"kind": "retrain-merge", "parents": parents, "missing_parents": missing})
    return json.loads(final.read_text())
