"""The four stages as plain functions over a run folder. Each reads its inputs from the folder and writes its
outputs there atomically; a stage whose output already exists is skipped, so a killed run resumes where it
stopped, and the teacher cache means no reply is paid for twice."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig
from pipeline.curate import curate, reject_counts
from pipeline.evaluate import load_eval_set, score_contender
from pipeline.evaluate.contenders import student_answers, teacher_answers
from pipeline.generate import answer_instructions, bootstrap_instructions, load_seed_tasks
from pipeline.models import resolve_gguf, resolve_student
from pipeline.records import Record
from pipeline.report import headline, write_report
from pipeline.store import Run, atomic_write_json, atomic_write_text, load_records, save_records
from pipeline.teachers import Ledger, make_teacher

log = logging.getLogger("distill")


def teacher_cache_path(cfg: RunConfig) -> Path:
    """One cache per runs_dir: every run there reuses every reply any earlier run paid for."""
    return Path(cfg.runs_dir) / "cache" / "teacher.sqlite"


def _ledger(cfg: RunConfig) -> Ledger:
    t = cfg.teacher
    return Ledger(t.price_per_1m_input, t.price_per_1m_output, t.budget_usd, t.budget_tokens)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def preflight(cfg: RunConfig) -> None:
    """Fail before any work starts on inputs that would fail later: seeds, eval set, models."""
    load_seed_tasks(cfg.generate.seed_tasks)
    load_eval_set(cfg.evaluate.eval_set, cfg.evaluate.limit)
    if cfg.teacher.backend == "llamacpp":
        resolve_gguf(cfg.teacher.model)
    if cfg.student.source == "embedded-cut":
        resolve_gguf(cfg.student.cut_from)


def generate_stage(run: Run) -> dict[str, Any]:
    """Self-Instruct: new instructions from the seeds, then the teacher's answers -> generated.parquet."""
    out, summary_path = run.path("generated.parquet"), run.path("generate.json")
    if out.exists() and summary_path.exists():
        return _read_json(summary_path)
    cfg = run.cfg
    seeds = load_seed_tasks(cfg.generate.seed_tasks)
    ledger = _ledger(cfg)
    teacher = make_teacher(cfg.teacher, teacher_cache_path(cfg), ledger)
    try:
        records, stats = bootstrap_instructions(teacher, seeds, cfg.generate, cfg.curate, run.id)
        records = answer_instructions(teacher, records, cfg.generate)
    finally:
        teacher.close()
    save_records(out, records)
    summary = {**stats, "records": len(records), "ledger": ledger.as_dict()}
    atomic_write_json(summary_path, summary)
    log.info("generate: %d prompts, %d candidates, %d instructions kept by the loop",
             stats["prompts"], stats["candidates"], stats["kept_instructions"])
    return summary


def curate_stage(run: Run) -> dict[str, Any]:
    """Filters, duplicates, decontamination -> dataset version datasets/curated/ (accepted + rejects)."""
    final = run.path("datasets", "curated", "manifest.json")
    if final.exists():
        return _read_json(final)
    cfg = run.cfg
    records = load_records(run.path("generated.parquet"))
    seeds = [s.instruction for s in load_seed_tasks(cfg.generate.seed_tasks)]
    eval_items = load_eval_set(cfg.evaluate.eval_set)  # the whole set, not just the evaluated slice
    accepted, rejected = curate(records, cfg.curate, seeds, [f"{e.instruction} {e.input}" for e in eval_items])
    reasons = reject_counts(rejected)
    run.save_dataset("curated", accepted, rejected, {"parents": [], "teacher": f"{cfg.teacher.backend}:{cfg.teacher.model}",
                                                     "reject_reasons": reasons})
    log.info("curate: %d accepted, %d rejected %s", len(accepted), len(rejected), reasons)
    return _read_json(final)


def train_stage(run: Run) -> dict[str, Any]:
    """LoRA SFT of the student on the accepted records -> adapter/."""
    from pipeline.train.sft import train_lora

    summary_path = run.path("train.json")
    if summary_path.exists():
        return _read_json(summary_path)
    cfg = run.cfg
    accepted = load_records(run.path("datasets", "curated", "accepted.parquet"))
    if cfg.train.mix_gold:
        accepted += gold_records(cfg.train.mix_gold)
    student_dir = resolve_student(cfg.student.source, cfg.student.drop_layers, cfg.student.cut_from)
    summary = train_lora(student_dir, accepted, cfg.train, run.dir)
    atomic_write_json(summary_path, summary)
    log.info("train: %d examples, %d steps, loss %.3f -> %.3f", summary["examples"], summary["steps"],
             summary["first_loss"] or 0, summary["last_loss"] or 0)
    return summary


def gold_records(n: int) -> list[Record]:
    """The first n gold Alpaca records of the training split (never the eval split)."""
    from pipeline import DATA_DIR

    rows = [json.loads(line) for line in (DATA_DIR / "alpaca_gold_train.jsonl").read_text().splitlines()[:n]]
    return [Record(instruction=r["instruction"], input=r["input"], output=r["output"], source="gold", status="accepted")
            for r in rows]


def evaluate_stage(run: Run) -> dict[str, Any]:
    """Teacher, raw student and distilled student answer the held-out items; ROUGE-L with intervals."""
    summary_path = run.path("eval", "summary.json")
    if summary_path.exists():
        return _read_json(summary_path)
    cfg, ev = run.cfg, run.cfg.evaluate
    items = load_eval_set(ev.eval_set, ev.limit)
    ledger = _ledger(cfg)
    teacher = make_teacher(cfg.teacher, teacher_cache_path(cfg), ledger)
    try:
        contenders = {"teacher": teacher_answers(teacher, items, ev.max_new_tokens)}
    finally:
        teacher.close()
    student_dir = resolve_student(cfg.student.source, cfg.student.drop_layers, cfg.student.cut_from)
    contenders["raw_student"] = student_answers(student_dir, items, ev.max_new_tokens, ev.batch_size, label="raw student")
    contenders["distilled_student"] = student_answers(student_dir, items, ev.max_new_tokens, ev.batch_size,
                                                      adapter_dir=run.path("adapter"), label="distilled student")
    results: dict[str, Any] = {"eval_set": str(ev.eval_set), "items": len(items), "max_new_tokens": ev.max_new_tokens}
    rows = [{"id": it.id, "instruction": it.instruction, "input": it.input, "reference": it.reference} for it in items]
    for name, c in contenders.items():
        scores = score_contender(items, c["answers"], ev.bootstrap_samples)
        for row, answer, score in zip(rows, c["answers"], scores["per_item"]):
            row[name] = answer
            row[f"{name}_rouge_l"] = score
        results[name] = {k: v for k, v in {**c, **scores}.items() if k not in ("answers", "per_item")}
    results["ledger"] = ledger.as_dict()
    atomic_write_text(run.path("eval", "outputs.jsonl"), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    atomic_write_json(summary_path, results)
    return results


def report_stage(run: Run, generation: dict, curation: dict, training: dict, evaluation: dict) -> dict[str, Any]:
    """report.md/json/png, then mark the run completed in its status and the catalog."""
    ledger: dict[str, Any] = {}
    for part in (generation.get("ledger", {}), evaluation.get("ledger", {})):
        ledger.update({k: v for k, v in part.items() if k != "total"})
    results = {"run_id": run.id, "generation": generation, "curation": curation, "training": training,
               "evaluation": {k: v for k, v in evaluation.items() if k != "ledger"}, "ledger": ledger}
    path = write_report(run.dir, results)
    summary = {"report": str(path), **headline(results), "accepted": curation.get("accepted"),
               "rejected": curation.get("rejected")}
    run.set_state("completed", summary=summary)
    run.catalog.upsert("models", id=f"{run.id}/distilled", run_id=run.id, path=str(run.path("adapter").resolve()),
                       role="candidate", dataset_id=curation.get("id"), metrics=headline(results),
                       created=run.status().get("updated"))
    return summary
