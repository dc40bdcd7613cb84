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
from pipeline.evaluate import load_eval_set
from pipeline.evaluate.contenders import student_answers, teacher_answers
from pipeline.generate import load_seed_tasks
from pipeline.models import resolve_gguf, resolve_student
from pipeline.records import Record
from pipeline.report import headline, write_report
from pipeline.store import Run, atomic_write_json, load_records, save_records
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
    from pipeline import teachers
    from pipeline.errors import ConfigError

    if cfg.teacher.backend not in teachers._BACKENDS:
        raise ConfigError(f"Unknown teacher.backend {cfg.teacher.backend!r}. Known backends: "
                          f"{', '.join(sorted(teachers._BACKENDS))}.")
    if cfg.teacher.backend == "openai":
        check_teacher_endpoint(cfg)


def check_teacher_endpoint(cfg: RunConfig) -> None:
    """An unreachable server or a rejected key is named before any run folder exists."""
    import os

    import httpx

    from pipeline.errors import ConfigError

    t = cfg.teacher
    base = (t.base_url or "https://api.openai.com/v1").rstrip("/")
    key = os.environ.get(t.api_key_env, "")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        resp = httpx.get(f"{base}/models", headers=headers, timeout=min(t.timeout_s, 10))
    except httpx.HTTPError as e:
        raise ConfigError(f"teacher.base_url {base} is unreachable ({type(e).__name__}). Start the server "
                          f"(vllm serve / llama.cpp server / ollama) or fix teacher.base_url.") from None
    if resp.status_code in (401, 403):
        raise ConfigError(f"The teacher at {base} rejected the API key from ${t.api_key_env} (HTTP {resp.status_code}). "
                          f"Export a valid key in {t.api_key_env}.")


def generate_stage(run: Run) -> dict[str, Any]:
    """generate.mode (Self-Instruct by default): candidates and their outputs -> generated.parquet."""
    from pipeline.generate import generate_records

    out, summary_path = run.path("generated.parquet"), run.path("generate.json")
    if out.exists() and summary_path.exists():
        return _read_json(summary_path)
    cfg = run.cfg
    ledger = _ledger(cfg)
    teacher = make_teacher(cfg.teacher, teacher_cache_path(cfg), ledger, scale=cfg.scale)
    try:
        records, stats = generate_records(teacher, cfg.generate, cfg.curate, run.id)
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
    from pipeline.curate import contamination_report, stage_counts
    from pipeline.curate.fastdedupe import load_pool, save_pool
    from pipeline.curate.stats import diversity_stats, export_alpaca_jsonl, plot_stats

    cfg, cc = run.cfg, run.cfg.curate
    records = load_records(run.path("generated.parquet"))
    seeds = [s.instruction for s in load_seed_tasks(cfg.generate.seed_tasks)]
    eval_items = load_eval_set(cfg.evaluate.eval_set)  # the whole set, not just the evaluated slice
    prior = [t for d in cc.prior_datasets for t in load_pool(Path(d) / "near_dup_pool.npz")]
    accepted, rejected = curate(records, cc, seeds, [f"{e.instruction} {e.input}" for e in eval_items], prior)
    reasons = reject_counts(rejected)
    stats = diversity_stats(accepted, seeds, cc.top_leading_verbs)
    folder = run.save_dataset("curated", accepted, rejected, {
        "parents": [str(d) for d in cc.prior_datasets], "teacher": f"{cfg.teacher.backend}:{cfg.teacher.model}",
        "stage_counts": stage_counts(len(records), accepted, rejected), "reject_reasons": reasons,
        "decontamination": contamination_report(rejected, len(eval_items), cc), "diversity": stats,
        "files": {"alpaca_jsonl": "accepted.alpaca.jsonl", "near_dup_pool": "near_dup_pool.npz",
                  "plots": ["rouge_to_seeds.png", "lengths.png", "leading_verbs.png"]}})
    # Extras beside the version's own files: Alpaca-format export, plots, and the kept pool that a later
    # version dedupes against (prior_datasets).
    export_alpaca_jsonl(accepted, folder / "accepted.alpaca.jsonl")
    plot_stats(stats, folder)
    pool = (seeds if cc.dedupe_against_seeds else []) + prior + [r.instruction for r in accepted]
    save_pool(folder / "near_dup_pool.npz", list(dict.fromkeys(pool)), cc.rouge_threshold)
    log.info("curate: %d accepted, %d rejected %s", len(accepted), len(rejected), reasons)
    return _read_json(final)


def train_stage(run: Run) -> dict[str, Any]:
    """Fine-tune the student on the accepted records with train.method (sft, kd, on-policy) -> adapter/ (or model/)."""
    from pipeline.train import train

    summary_path = run.path("train.json")
    if summary_path.exists():
        return _read_json(summary_path)
    cfg = run.cfg
    accepted = load_records(run.path("datasets", "curated", "accepted.parquet"))
    if cfg.train.mix_gold:
        accepted += gold_records(cfg.train.mix_gold)
    student_dir = resolve_student(cfg.student.source, cfg.student.drop_layers, cfg.student.cut_from)
    summary = train(student_dir, accepted, cfg.train, run.dir, student=cfg.student)
    manifest = run.path("datasets", "curated", "manifest.json")
    summary["dataset"] = _read_json(manifest).get("id") if manifest.exists() else None
    atomic_write_json(summary_path, summary)
    log.info("train: %d examples, %d steps, loss %.3f -> %.3f, %s tokens/s", summary["examples"], summary["steps"],
             summary["first_loss"] or 0, summary["last_loss"] or 0, summary["tokens_per_s"])
    return summary


def gold_records(n: int) -> list[Record]:
    """The first n gold Alpaca records of the training split (never the eval split)."""
    from pipeline import DATA_DIR

    rows = [json.loads(line) for line in (DATA_DIR / "alpaca_gold_train.jsonl").read_text().splitlines()[:n]]
    return [Record(instruction=r["instruction"], input=r["input"], output=r["output"], source="gold", status="accepted")
            for r in rows]


def evaluate_stage(run: Run) -> dict[str, Any]:
    """Teacher, raw, distilled (and gold-trained) student answer the held-out items; ROUGE-L, judge win rates,
    perplexity, speed and size, each with intervals -> eval/summary.json and eval/outputs.jsonl."""
    from pipeline.evaluate.bench import gguf_params, score_contenders, train_gold_adapter, write_outputs

    summary_path = run.path("eval", "summary.json")
    if summary_path.exists():
        return _read_json(summary_path)
    cfg, ev = run.cfg, run.cfg.evaluate
    items = load_eval_set(ev.eval_set, ev.limit)
    ledger = _ledger(cfg)
    cache_dir = teacher_cache_path(cfg).parent  # student answers are cached beside the teacher's replies
    teacher = make_teacher(cfg.teacher, cache_dir / "teacher.sqlite", ledger, scale=cfg.scale)
    try:
        contenders = {"teacher": teacher_answers(teacher, items, ev.max_new_tokens)}
    finally:
        teacher.close()
    if cfg.teacher.backend == "llamacpp":
        gguf = resolve_gguf(cfg.teacher.model)
        contenders["teacher"].update(params=gguf_params(gguf), disk_bytes=gguf.stat().st_size)
    student_dir = resolve_student(cfg.student.source, cfg.student.drop_layers, cfg.student.cut_from)
    # (model dir, adapter dir): full fine-tuning saves a whole model instead of an adapter.
    distilled = (run.path("model"), None) if cfg.train.finetune == "full" else (student_dir, run.path("adapter"))
    students = {"raw_student": (student_dir, None), "distilled_student": distilled}
    if ev.gold_student:  # trained on as many gold Alpaca records as distillation accepted
        n = max(1, _read_json(run.path("datasets", "curated", "manifest.json")).get("accepted") or 0)
        students["gold_student"] = (student_dir, train_gold_adapter(run.path("gold"), student_dir, gold_records(n), cfg.train))
    for name, (model_dir, adapter) in students.items():
        contenders[name] = student_answers(model_dir, items, ev.max_new_tokens, ev.batch_size, adapter_dir=adapter,
                                           label=name.replace("_", " "), cache_dir=cache_dir, perplexity=ev.perplexity)
    judge = make_teacher(ev.judge, cache_dir / "teacher.sqlite", ledger) if ev.judge else None
    try:
        scores, rows = score_contenders(items, contenders, judge, ev.judge_baseline, ev.bootstrap_samples)
    finally:
        if judge is not None:
            judge.close()
    results: dict[str, Any] = {"eval_set": str(ev.eval_set), "items": len(items), "max_new_tokens": ev.max_new_tokens,
                               "judge": f"{ev.judge.backend}:{ev.judge.model}" if ev.judge else None,
                               "judge_baseline": ev.judge_baseline if ev.judge else None, **scores,
                               "ledger": ledger.as_dict()}
    write_outputs(run.path("eval"), results, rows)
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
    from pipeline.registry import register_model  # a candidate until the registry decides champion/challenger

    summary["model_id"] = register_model(run, curation, evaluation, headline(results))
    return summary
