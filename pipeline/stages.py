"""The four stages as plain functions over a run folder. Each reads its inputs from the folder and writes its
outputs there atomically; a stage whose output already exists is skipped, so a killed run resumes where it
stopped, and the teacher cache means no reply is paid for twice."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pipeline.config import EvalSetConfig, RunConfig, TeacherConfig
from pipeline.curate import curate, reject_counts
from pipeline.evaluate import EvalItem, load_eval_set
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


def run_ledger(run: Run) -> Ledger:
    """The run's one ledger (runs/<id>/ledger.sqlite): every stage and every resume spends from one budget."""
    return Ledger.for_teacher(run.cfg.teacher, run.path("ledger.sqlite"))


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def preflight(cfg: RunConfig) -> None:
    """Fail before any work starts on inputs that would fail later: seeds, eval set, models."""
    load_seed_tasks(cfg.generate.seed_tasks)
    eval_sets(cfg)
    if cfg.evaluate.gold_student or cfg.train.mix_gold:
        load_eval_set(cfg.evaluate.gold_train, 1)
    if cfg.teacher.backend == "llamacpp":
        resolve_gguf(cfg.teacher.model)
    if cfg.student.source == "embedded-cut":
        resolve_gguf(cfg.student.cut_from)
    for scorer in cfg.curate.quality:
        if scorer.scorer == "reward":  # a configured reward model that is not there stops the run before generation
            from pipeline.curate.quality import require_reward_model

            require_reward_model(scorer.model)
    from pipeline import teachers
    from pipeline.errors import ConfigError

    if cfg.teacher.backend not in teachers._BACKENDS:
        raise ConfigError(f"Unknown teacher.backend {cfg.teacher.backend!r}. Known backends: "
                          f"{', '.join(sorted(teachers._BACKENDS))}.")
    if cfg.teacher.backend in ("openai", "openai-batch"):
        check_teacher_endpoint(cfg)
    if cfg.evaluate.judge is not None and cfg.evaluate.judge.backend in ("openai", "openai-batch"):
        check_teacher_endpoint(cfg, cfg.evaluate.judge, "evaluate.judge")


def check_teacher_endpoint(cfg: RunConfig, teacher: TeacherConfig | None = None, section: str = "teacher") -> None:
    """An unreachable server or a rejected key is named before any run folder exists."""
    import httpx

    from pipeline.errors import ConfigError
    from pipeline.teachers.secrets import resolve_api_key

    t = teacher or cfg.teacher
    base = (t.base_url or "https://api.openai.com/v1").rstrip("/")
    key = resolve_api_key(t)  # the client's own rule: a Prefect Secret block if named, else the environment
    where = f"the Prefect Secret block {t.api_key_secret_block!r}" if t.api_key_secret_block else f"${t.api_key_env}"
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        resp = httpx.get(f"{base}/models", headers=headers, timeout=min(t.timeout_s, 10))
    except httpx.HTTPError as e:
        raise ConfigError(f"{section}.base_url {base} is unreachable ({type(e).__name__}). Start the server "
                          f"(vllm serve / llama.cpp server / ollama) or fix {section}.base_url.") from None
    if resp.status_code in (401, 403):
        raise ConfigError(f"The {section} at {base} rejected the API key from {where} (HTTP {resp.status_code}). "
                          f"Put a valid key there.")


def eval_sets(cfg: RunConfig, whole: bool = False) -> list[tuple[EvalSetConfig, list[EvalItem]]]:
    """Every configured eval set with its evaluated items (or all its items, for decontamination and the seed holdout)."""
    ev = cfg.evaluate
    return [(s, load_eval_set(s.path, None if whole else ev.set_limit(s))) for s in ev.eval_sets]


def eval_texts(cfg: RunConfig) -> list[str]:
    """instruction + input of every item of every eval set: what training data is decontaminated against."""
    return [f"{e.instruction} {e.input}" for _, items in eval_sets(cfg, whole=True) for e in items]


def generate_stage(run: Run) -> dict[str, Any]:
    """generate.mode (Self-Instruct by default): candidates and their outputs -> generated.parquet."""
    from pipeline.generate import generate_records

    out, summary_path = run.path("generated.parquet"), run.path("generate.json")
    if out.exists() and summary_path.exists():
        return _read_json(summary_path)
    cfg = run.cfg
    ledger = run_ledger(run)
    teacher = make_teacher(cfg.teacher, teacher_cache_path(cfg), ledger, scale=cfg.scale)
    try:
        # Seed tasks that are eval items (the held-out seed slice) are never shown to the teacher.
        heldout = [e.instruction for _, items in eval_sets(cfg, whole=True) for e in items]
        records, stats = generate_records(teacher, cfg.generate, cfg.curate, run.id, heldout=heldout)
    finally:
        teacher.close()
    ledger.check_budget()  # a request refused for the budget: the stage is unfinished, resumable with a bigger one
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
    eval_items = eval_texts(cfg)  # every set, whole, not just the evaluated slice
    prior = [t for d in cc.prior_datasets for t in load_pool(Path(d) / "near_dup_pool.npz")]
    accepted, rejected = curate(records, cc, seeds, eval_items, prior)
    quality = None
    if cc.quality or cc.select is not None:  # model-based scorers and selection, after the rules and near-duplicates
        accepted, dropped, quality = quality_stage(run, accepted)
        rejected = rejected + dropped
    reasons = reject_counts(rejected)
    stats = diversity_stats(accepted, seeds, cc.top_leading_verbs)

    def extras(folder: Path) -> None:
        # Beside the version's own files, inside it before its manifest: the Alpaca-format export, plots, and the
        # kept pool that a later version dedupes against (prior_datasets).
        export_alpaca_jsonl(accepted, folder / "accepted.alpaca.jsonl")
        plot_stats(stats, folder)
        pool = (seeds if cc.dedupe_against_seeds else []) + prior + [r.instruction for r in accepted]
        save_pool(folder / "near_dup_pool.npz", list(dict.fromkeys(pool)), cc.rouge_threshold)
        if quality:
            from pipeline.curate.quality import plot_scores

            plot_scores(quality["distribution"], folder / "quality_scores.png")

    run.save_dataset("curated", accepted, rejected, {
        "parents": [str(d) for d in cc.prior_datasets], "teacher": f"{cfg.teacher.backend}:{cfg.teacher.model}",
        "stage_counts": stage_counts(len(records), accepted, rejected), "reject_reasons": reasons,
        "decontamination": contamination_report(rejected, len(eval_items), cc), "diversity": stats,
        **({"quality": quality} if quality else {}),
        "files": {"alpaca_jsonl": "accepted.alpaca.jsonl", "near_dup_pool": "near_dup_pool.npz",
                  "plots": ["rouge_to_seeds.png", "lengths.png", "leading_verbs.png"]
                  + (["quality_scores.png"] if quality else [])}}, extras=extras)
    log.info("curate: %d accepted, %d rejected %s", len(accepted), len(rejected), reasons)
    return _read_json(final)


def quality_stage(run: Run, accepted: list[Record]) -> tuple[list[Record], list[Record], dict[str, Any]]:
    """curate.quality scorers then curate.select over the accepted records; the judge spends from the run's ledger,
    so the run's one budget covers generation, judging and evaluation."""
    from pipeline.curate.quality import QualityContext, apply_quality, score_distribution

    cfg = run.cfg
    ledger = run_ledger(run)
    ctx = QualityContext(cfg.teacher, teacher_cache_path(cfg), ledger,
                         lambda: resolve_student(cfg.student.source, cfg.student.drop_layers, cfg.student.cut_from))
    kept, dropped, report = apply_quality(accepted, cfg.curate, ctx)
    report["distribution"] = score_distribution(kept, dropped)
    report["ledger"] = {k: v for k, v in ledger.as_dict().items() if k != "total"}
    return kept, dropped, report


def train_stage(run: Run) -> dict[str, Any]:
    """Fine-tune the student on the accepted records with train.method (sft, kd, on-policy) -> adapter/ (or model/)."""
    from pipeline.train import train

    summary_path = run.path("train.json")
    if summary_path.exists():
        return _read_json(summary_path)
    cfg = run.cfg
    accepted = load_records(run.path("datasets", "curated", "accepted.parquet"))
    if cfg.train.mix_gold:
        accepted += gold_records(cfg.train.mix_gold, cfg)[0]
    student_dir = resolve_student(cfg.student.source, cfg.student.drop_layers, cfg.student.cut_from)
    summary = train(student_dir, accepted, cfg.train, run.dir, student=cfg.student)
    manifest = run.path("datasets", "curated", "manifest.json")
    summary["dataset"] = _read_json(manifest).get("id") if manifest.exists() else None
    from pipeline.scale.distributed import is_main_process

    if not is_main_process():  # under a multi-process launch only rank 0 writes the run's files
        return summary
    atomic_write_json(summary_path, summary)
    log.info("train: %d examples, %d steps, loss %.3f -> %.3f, %s tokens/s", summary["examples"], summary["steps"],
             summary["first_loss"] or 0, summary["last_loss"] or 0, summary["tokens_per_s"])
    return summary


def gold_records(n: int, cfg: RunConfig) -> tuple[list[Record], list[Record]]:
    """The first n records of the original data (evaluate.gold_train) that survive decontamination against every
    eval set, by curate's own rule; returns (kept, rejected as contaminated on the way)."""
    from pipeline.curate.decontaminate import EvalOverlap

    cc = cfg.curate
    overlap = EvalOverlap(eval_texts(cfg), cc.decontaminate_ngram, cc.decontaminate_threshold)
    kept: list[Record] = []
    rejected: list[Record] = []
    for item in load_eval_set(cfg.evaluate.gold_train):
        if len(kept) >= n:
            break
        if not item.reference.strip():
            continue
        r = Record(instruction=item.instruction, input=item.input, output=item.reference, source="gold", status="accepted")
        dirty = overlap.reject(r)
        if dirty is None:
            kept.append(r)
        else:
            rejected.append(dirty)
    return kept, rejected


def gold_stage(run: Run) -> dict[str, Any]:
    """The gold-trained contender: the same student, method, steps and number of examples as the distilled one,
    trained on the original data, decontaminated like curated data -> gold/ (kept on resume)."""
    from pipeline.train import train

    summary_path = run.path("gold", "train.json")
    if summary_path.exists():
        return _read_json(summary_path)
    cfg = run.cfg
    distilled = _read_json(run.path("train.json")) if run.path("train.json").exists() else {}
    n = distilled.get("examples") or _read_json(run.path("datasets", "curated", "manifest.json")).get("accepted") or 1
    records, contaminated = gold_records(n, cfg)
    if len(records) < n:
        log.warning("gold student: only %d clean records in %s for the %d the distilled student trained on",
                    len(records), cfg.evaluate.gold_train, n)
    save_records(run.path("gold", "dataset.parquet"), records)
    tcfg = cfg.train.model_copy(update={"merge": False})
    note = None
    if tcfg.method == "kd" and tcfg.kd_source == "logprobs":
        # The original data carries no teacher logprobs to distil from: the closest same-recipe baseline is SFT.
        tcfg, note = tcfg.model_copy(update={"method": "sft"}), "kd_source=logprobs: the gold data has no teacher logprobs, so SFT"
    student_dir = resolve_student(cfg.student.source, cfg.student.drop_layers, cfg.student.cut_from)
    summary = train(student_dir, records, tcfg, run.path("gold"), student=cfg.student)
    summary.update(source=str(cfg.evaluate.gold_train), distilled_examples=n, contaminated_dropped=len(contaminated),
                   note=note)
    atomic_write_json(summary_path, summary)
    log.info("gold student: %d examples (%d contaminated records skipped), %d steps", summary["examples"],
             len(contaminated), summary["steps"])
    return summary


def evaluate_stage(run: Run) -> dict[str, Any]:
    """Teacher, raw, distilled and gold-trained student answer the items of every held-out set; per set ROUGE-L, judge
    win rates, perplexity, speed and size with intervals, and paired verdicts -> eval/summary.json and
    eval/outputs.jsonl (one row per item, named by its set)."""
    from pipeline.evaluate.bench import gguf_params, score_contenders, write_outputs
    from pipeline.evaluate.verdict import paired_verdicts

    summary_path = run.path("eval", "summary.json")
    if summary_path.exists():
        return _read_json(summary_path)
    cfg, ev = run.cfg, run.cfg.evaluate
    sets = eval_sets(cfg)
    items = [it for _, its in sets for it in its]  # every contender answers all sets in one pass (one model load)
    ledger = run_ledger(run)
    cache_dir = teacher_cache_path(cfg).parent  # student answers are cached beside the teacher's replies
    teacher = make_teacher(cfg.teacher, cache_dir / "teacher.sqlite", ledger, scale=cfg.scale)
    try:
        contenders = {"teacher": teacher_answers(teacher, items, ev.max_new_tokens)}
    finally:
        teacher.close()
    ledger.check_budget()  # stop before the students' work when the teacher's answers did not fit the budget
    if cfg.teacher.backend == "llamacpp":
        gguf = resolve_gguf(cfg.teacher.model)
        contenders["teacher"].update(params=gguf_params(gguf), disk_bytes=gguf.stat().st_size)
    student_dir = resolve_student(cfg.student.source, cfg.student.drop_layers, cfg.student.cut_from)
    # (model dir, adapter dir): full fine-tuning saves a whole model instead of an adapter.
    distilled = (run.path("model"), None) if cfg.train.finetune == "full" else (student_dir, run.path("adapter"))
    students = {"raw_student": (student_dir, None), "distilled_student": distilled}
    gold = None
    if ev.gold_student:  # same student, method, steps and number of examples, on the original data
        gold = gold_stage(run)
        students["gold_student"] = (Path(gold["model"]), None) if gold.get("model") else (student_dir, Path(gold["adapter"]))
    for name, (model_dir, adapter) in students.items():
        contenders[name] = student_answers(model_dir, items, ev.max_new_tokens, ev.batch_size, adapter_dir=adapter,
                                           label=name.replace("_", " "), cache_dir=cache_dir, perplexity=ev.perplexity)
    from pipeline.evaluate.runtime import speed_on_one_runtime

    speed_on_one_runtime(cfg, run.dir, contenders, students, items)  # speed and size of every row on one runtime
    # The judge spends from the run's budget too, at its own prices.
    judge_ledger = ledger.priced(ev.judge.price_per_1m_input, ev.judge.price_per_1m_output) if ev.judge else None
    judge = make_teacher(ev.judge, cache_dir / "teacher.sqlite", judge_ledger) if ev.judge else None
    per_set: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    try:
        start = 0
        for spec, its in sets:
            part = {name: _items_slice(c, start, start + len(its)) for name, c in contenders.items()}
            start += len(its)
            scores, set_rows = score_contenders(its, part, judge, ev.judge_baseline, ev.bootstrap_samples,
                                                max_new_tokens=ev.max_new_tokens)
            per_set[spec.name] = {"eval_set": str(spec.path), "items": len(its), **scores,
                                  "paired": paired_verdicts(set_rows, list(part), ev.bootstrap_samples)}
            rows += [{"eval_set": spec.name, **r} for r in set_rows]
    finally:
        if judge is not None:
            judge.close()
    ledger.check_budget()  # scores from half-judged items are not a result: stop, resumable with a bigger budget
    # The first set's numbers stay at the top level (what single-set readers and the registry's guards use).
    primary = per_set[sets[0][0].name]
    results: dict[str, Any] = {**primary, "max_new_tokens": ev.max_new_tokens,
                               "judge": f"{ev.judge.backend}:{ev.judge.model}" if ev.judge else None,
                               "judge_baseline": ev.judge_baseline if ev.judge else None, "sets": per_set,
                               "gold_training": _gold_note(gold) if gold else None, "ledger": ledger.as_dict()}
    write_outputs(run.path("eval"), results, rows)
    return results


def _items_slice(contender: dict[str, Any], lo: int, hi: int) -> dict[str, Any]:
    """One set's share of a contender's answers: per-item lists cut to [lo, hi), everything else as is."""
    return {k: v[lo:hi] if k in ("answers", "nll", "answer_tokens") and isinstance(v, list) else v
            for k, v in contender.items()}


def _gold_note(gold: dict[str, Any]) -> dict[str, Any]:
    keys = ("source", "examples", "distilled_examples", "contaminated_dropped", "steps", "method", "finetune", "note",
            "first_loss", "last_loss")
    return {k: gold.get(k) for k in keys}


def report_stage(run: Run, generation: dict, curation: dict, training: dict, evaluation: dict) -> dict[str, Any]:
    """report.md/json/png, and the distilled student registered as a candidate. The run is not completed yet: the
    flow marks it so only after the registry decided (a kill in between leaves a run that resumes)."""
    ledger = {k: v for k, v in run_ledger(run).as_dict().items() if k != "total"}  # every stage and resume
    results = {"run_id": run.id, "generation": generation, "curation": curation, "training": training,
               "evaluation": {k: v for k, v in evaluation.items() if k != "ledger"}, "ledger": ledger}
    path = write_report(run.dir, results)
    summary = {"report": str(path), **headline(results), "accepted": curation.get("accepted"),
               "rejected": curation.get("rejected")}
    from pipeline.registry import register_model  # a candidate until the registry decides champion/challenger

    summary["model_id"] = register_model(run, curation, evaluation, headline(results))
    return summary
