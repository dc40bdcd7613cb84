"""`distill study`: one command, one report that answers the three questions people ask of distillation, on one
dataset and one training budget.

- Q1 data: is distillation better than training on the original data? The same student, method, steps and number
  of examples, trained once on the teacher-written records and once on gold references (both decontaminated
  against the eval set), per method.
- Q2 placement: which parts of the model benefit most? LoRA adapters on attention only, MLP only or all linear
  layers, and on the early, middle or late third of the layers.
- Q3 cuts: what can be removed? The cut-depth table of `pipeline.train.ablation` (raw, SFT and KD students per
  layer cut), each compared with the teacher and with each other.

Each cell is a list of config overrides on one resolved config (the syntax of --set). A cell's result, per-item
scores included, is saved as cells/<key>.json the moment it finishes, where the key hashes everything that decides
the result (data, student, training and evaluation settings); a killed study therefore resumes from its saved
cells, and a changed setting never reuses a stale one. Every comparison is a paired bootstrap over the same eval
items (`paired_difference`): "better" only when the interval excludes 0. This module plans and runs the cells;
`pipeline.study_report` turns their results into the report."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
import typing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from pipeline.config import RunConfig, TrainConfig, dump_config, with_overrides
from pipeline.errors import ConfigError
from pipeline.records import Record
from pipeline.store import atomic_write_json
from pipeline.study_report import QUESTIONS, analyse, write_study_report

log = logging.getLogger("distill")


# The default budget: small enough that the default grid (11 trained cells, 3 scored untrained) finishes in about
# an hour on a share of 2 busy CPU cores with the embedded default (README, `distill study`): 16 steps of 4
# examples per cell, 30 eval items answered in one batch. A key given with --set wins; --budget profile keeps the
# profile's own settings instead.
SMALL_BUDGET = ("train.max_steps=16", "evaluate.limit=30", "evaluate.max_new_tokens=64", "evaluate.batch_size=30")


@dataclass
class StudyOptions:
    """Which questions and cells a study runs."""

    questions: tuple[str, ...] = ("q1", "q2", "q3")
    methods: tuple[str, ...] = ("sft", "kd")
    targets: tuple[str, ...] = ("attention", "mlp", "all-linear")
    layers: tuple[str, ...] = ("early", "middle", "late")
    cuts: tuple[str, ...] = ("middle:10",)
    cut_methods: tuple[str, ...] = ("sft", "kd")  # Q3 contenders, as `distill ablate --methods` takes them
    teacher: bool = True


@dataclass(frozen=True)
class Cell:
    """One trained (or untrained) student, or the teacher, scored on the eval items."""

    question: str
    label: str
    data: str  # distilled | gold (trained on it) | raw (the untrained student) | teacher
    overrides: tuple[str, ...] = ()
    group: str = ""  # Q1: the method; Q2: "target" or "layers"


def available_methods() -> list[str]:
    """train.method values this build knows (on-policy joins Q1 when it is one of them)."""
    return list(typing.get_args(TrainConfig.model_fields["method"].annotation))


def placement_available() -> bool:
    """Whether this build can place adapters (train.lora_target and train.lora_layers)."""
    return {"lora_target", "lora_layers"} <= set(TrainConfig.model_fields)


def plan_cells(options: StudyOptions) -> list[Cell]:
    """The cells the chosen questions need; cells that resolve to the same config are trained once."""
    cells = [Cell("ref", "raw student", "raw")]
    if options.teacher:
        cells.append(Cell("ref", "teacher", "teacher"))
    if "q1" in options.questions:
        unknown = [m for m in options.methods if m not in available_methods()]
        if unknown:
            raise ConfigError(f"Unknown method(s) {unknown} for the study; this build knows train.method "
                              f"{available_methods()}. Fix --methods.")
        for m in options.methods:
            for data in ("distilled", "gold"):
                cells.append(Cell("q1", f"{data} {m}", data, (f"train.method={m}",), group=m))
    if "q2" in options.questions and placement_available():
        # The reference is all linear layers on every layer; each variant moves one of the two settings away from it.
        cells.append(Cell("q2", "all-linear, all layers", "distilled",
                          ("train.lora_target=all-linear", "train.lora_layers=all"), group="reference"))
        for t in options.targets:
            cells.append(Cell("q2", f"{t}, all layers", "distilled",
                              (f"train.lora_target={t}", "train.lora_layers=all"), group="target"))
        for layers in options.layers:
            cells.append(Cell("q2", f"all-linear, {layers} layers", "distilled",
                              ("train.lora_target=all-linear", f"train.lora_layers={layers}"), group="layers"))
    if "q3" in options.questions:
        # The configured student's own row of the cut table (the same cells as Q1's when Q1 runs too).
        for spec in options.cut_methods:
            method, _, extra = spec.partition("+")
            hidden = ("train.hidden_loss_weight=1.0",) if extra == "hidden" else ()
            cells.append(Cell("q3", f"distilled {spec}", "distilled", (f"train.method={method}", *hidden), group=spec))
    return cells


# --- data ------------------------------------------------------------------------------------------------

def decontaminate(records: list[Record], cfg: RunConfig) -> tuple[list[Record], int]:
    """Records whose instruction+input overlaps no item of any eval set (curate's n-gram rule); and how many went."""
    from pipeline.curate.decontaminate import EvalOverlap
    from pipeline.stages import eval_texts

    overlap = EvalOverlap(eval_texts(cfg), cfg.curate.decontaminate_ngram, cfg.curate.decontaminate_threshold)
    kept = [r for r in records if not overlap.is_contaminated(f"{r.instruction} {r.input}")]
    return kept, len(records) - len(kept)


def gold_like(distilled: list[Record], cfg: RunConfig) -> tuple[list[Record], dict[str, Any]]:
    """As many records of the original data (evaluate.gold_train) as there are distilled ones, decontaminated by
    the gold student's own rule (pipeline.stages.gold_records).

    Where a distilled instruction comes from the original data (a teacher that answered its instructions), its
    original twin is used, so the two students see the same prompts and differ only in who wrote the answers; the
    rest is filled with the first unused clean records."""
    from pipeline.curate.filters import normalise
    from pipeline.stages import gold_records

    pool, contaminated = gold_records(10 ** 9, cfg)  # every clean record, in file order
    dropped = len(contaminated)
    by_prompt = {normalise(f"{r.instruction} {r.input}"): r for r in reversed(pool)}
    twins = [by_prompt.get(normalise(f"{r.instruction} {r.input}")) for r in distilled]
    chosen = [t for t in twins if t is not None]
    taken = {r.id for r in chosen}
    fill = [r for r in pool if r.id not in taken][:len(distilled) - len(chosen)]
    gold = chosen + fill
    if len(gold) < len(distilled):
        raise ConfigError(f"The study needs {len(distilled)} gold records (as many as distilled ones) and "
                          f"{cfg.evaluate.gold_train} has only {len(gold)} after decontamination. Train on fewer records "
                          f"or point evaluate.gold_train at a larger file.")
    return gold, {"records": len(gold), "same_instruction_as_distilled": len(chosen),
                  "gold_pool_contaminated": dropped}


def _fingerprint(records: list[Record]) -> str:
    return hashlib.sha256("\n".join(r.id for r in records).encode()).hexdigest()[:16]


def cell_key(cell: Cell, cfg: RunConfig, data_fp: dict[str, str], items_fp: str) -> str:
    """A hash of everything that decides the cell's result; two cells with the same key are the same experiment."""
    # Settings left at their defaults are left out, so a key added to the config later (with a default that keeps
    # the old behaviour) does not orphan the cells a study already saved. The eval part is the items themselves.
    ev = {"items": items_fp, "max_new_tokens": cfg.evaluate.max_new_tokens, "batch_size": cfg.evaluate.batch_size}
    parts: dict[str, Any] = {"data": cell.data, "evaluate": ev}
    if cell.data == "teacher":
        parts["teacher"] = cfg.teacher.model_dump(mode="json", include={"backend", "model", "base_url"})
    else:
        parts["student"] = cfg.student.model_dump(mode="json", exclude_defaults=True)
    if cell.data in data_fp:
        parts["records"] = data_fp[cell.data]
        parts["train"] = cfg.train.model_dump(mode="json", exclude_defaults=True, exclude={"merge", "check_memory"})
    blob = json.dumps(parts, sort_keys=True)
    return f"{cell.data}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


# --- running cells ----------------------------------------------------------------------------------------

def _saved_or_run(path: Path, work: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], bool]:
    """(result, reused): a saved cell is read back, otherwise the work runs and its result is saved atomically."""
    if path.exists():
        return json.loads(path.read_text()), True
    result = work()
    atomic_write_json(path, result)
    return result, False


def _answers(cell: Cell, cfg: RunConfig, records: list[Record], items, cell_dir: Path,
             cache_dir: Path) -> tuple[list[str], dict[str, Any]]:
    """Train the cell's student if it has data, then its greedy answers to the eval items (cached per model)."""
    from pipeline.evaluate.contenders import student_answers, teacher_answers
    from pipeline.models import resolve_student

    ev = cfg.evaluate
    if cell.data == "teacher":
        from pipeline.stages import teacher_cache_path
        from pipeline.teachers import make_teacher

        teacher = make_teacher(cfg.teacher, teacher_cache_path(cfg))
        try:
            out = teacher_answers(teacher, items, ev.max_new_tokens)
        finally:
            teacher.close()
        return out["answers"], {"tokens_per_s": out["tokens_per_s"]}
    student_dir = resolve_student(cfg.student.source, cfg.student.drop_layers, cfg.student.cut_from)
    model_dir, adapter, info = student_dir, None, {}
    if cell.data in ("distilled", "gold"):
        from pipeline.train import train

        summary = train(student_dir, records, cfg.train, cell_dir, student=cfg.student)
        if cfg.train.finetune == "full":
            model_dir = Path(summary["model"])
        else:
            adapter = Path(summary["adapter"])
        # The optimiser state is only needed to resume this cell's training, which is now done.
        shutil.rmtree(cell_dir / "checkpoints", ignore_errors=True)
        info = {k: summary.get(k) for k in ("examples", "steps", "first_loss", "last_loss", "trainable_params",
                                            "params", "runtime_s", "method")}
    out = student_answers(model_dir, items, ev.max_new_tokens, ev.batch_size, adapter_dir=adapter, label=cell.label,
                          cache_dir=cache_dir)
    return out["answers"], {**info, "tokens_per_s": out["tokens_per_s"]}


def run_cell(cell: Cell, cfg: RunConfig, records: list[Record], items, cell_dir: Path, cache_dir: Path) -> dict[str, Any]:
    """Train (if the cell has data) and score one cell; returns its result with per-item ROUGE-L."""
    from pipeline.evaluate import score_contender

    start = time.perf_counter()
    answers, info = _answers(cell, cfg, records, items, cell_dir, cache_dir)
    scores = score_contender(items, answers, cfg.evaluate.bootstrap_samples)
    return {"label": cell.label, "data": cell.data, "overrides": list(cell.overrides),
            "rouge_l": scores["rouge_l"], "rouge_l_ci": scores["rouge_l_ci"],
            "item_ids": [it.id for it in items], "per_item": scores["per_item"],
            "mean_answer_words": sum(len(a.split()) for a in answers) / max(1, len(answers)),
            "info": info, "seconds": round(time.perf_counter() - start, 1)}


def _layers_left(cut: str, cfg: RunConfig) -> int | None:
    from pipeline.models import resolve_student

    try:
        config = json.loads((resolve_student("embedded-cut", cut, cfg.student.cut_from) / "config.json").read_text())
        return config.get("num_hidden_layers")
    except (OSError, ValueError):
        return None


@dataclass
class Plan:
    """Everything decided before any cell runs: the eval items, the training data, the cells and their keys."""

    items: list
    data: dict[str, list[Record]]
    data_info: dict[str, Any]
    cells: list[Cell]
    resolved: dict[Cell, RunConfig]
    keys: dict[Cell, str]
    cuts: list[str]
    base_cut: str | None


def make_plan(cfg: RunConfig, records: list[Record], options: StudyOptions) -> Plan:
    """Decontaminate the data, pick the gold twin set, resolve every cell's config (a bad override fails here)."""
    from pipeline.evaluate import load_eval_set

    primary = cfg.evaluate.eval_sets[0]
    items = load_eval_set(primary.path, cfg.evaluate.set_limit(primary))
    # Training data is decontaminated against every item of every eval set, not only the evaluated slice.
    distilled, contaminated = decontaminate(records, cfg)
    if not distilled:
        raise ConfigError("No training records left after decontamination against the eval sets; "
                          "check --data and evaluate.eval_sets.")
    data: dict[str, list[Record]] = {"distilled": distilled}
    data_info: dict[str, Any] = {"distilled": {"records": len(distilled), "contaminated_dropped": contaminated}}
    if "q1" in options.questions:
        data["gold"], data_info["gold"] = gold_like(distilled, cfg)
    cells = plan_cells(options)
    fp = {k: _fingerprint(v) for k, v in data.items()}
    data_info["fingerprints"] = fp
    resolved = {c: with_overrides(cfg, list(c.overrides), source=f"study cell {c.label!r}") for c in cells}
    items_fp = hashlib.sha256(json.dumps([[it.id, it.instruction, it.input, it.reference] for it in items]).encode()
                              ).hexdigest()[:16]
    keys = {c: cell_key(c, resolved[c], fp, items_fp) for c in cells}
    base_cut = _base_cut(cfg) if "q3" in options.questions else None
    # The configured student's own cut is already in the plan (raw student, distilled sft/kd).
    cuts = [c for c in options.cuts if "q3" in options.questions and not _same_cut(c, base_cut, cfg)]
    return Plan(items, data, data_info, cells, resolved, keys, cuts, base_cut)


def run_study(cfg: RunConfig, records: list[Record], out_dir: Path, options: StudyOptions,
              source: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run (or resume) every cell of the chosen questions and write study.md, study.json and one PNG per question."""
    from pipeline.progress import Progress

    start = time.perf_counter()
    out_dir = Path(out_dir)
    plan = make_plan(cfg, records, options)
    todo = list(dict.fromkeys(plan.keys.values()))
    results: dict[str, dict[str, Any]] = {}
    ran = reused = 0
    with Progress(len(todo) + len(plan.cuts), "study: cells", key="study") as bar:
        for c in plan.cells:
            k = plan.keys[c]
            if k in results:
                continue
            results[k], was_saved = _saved_or_run(
                out_dir / "cells" / f"{k}.json",
                lambda c=c, k=k: run_cell(c, plan.resolved[c], plan.data.get(c.data, []), plan.items,
                                          out_dir / "cells" / k, out_dir / "cache"))
            reused, ran = reused + was_saved, ran + (not was_saved)
            bar.update()
            log.info("study: %s ROUGE-L %.4f%s", c.label, results[k]["rouge_l"], " (saved)" if was_saved else "")
        cut_rows = []
        for cut in plan.cuts:
            cut_rows.append(_cut_row(cfg, plan.data["distilled"], out_dir, cut, options.cut_methods))
            bar.update()
    study = {
        "source": source or {}, "questions": {q: QUESTIONS[q] for q in options.questions},
        "options": asdict(options), "config_yaml": dump_config(cfg), "config_fingerprint": cfg.fingerprint(),
        "data": plan.data_info, "eval": {"set": cfg.evaluate.eval_sets[0].name, "path": str(cfg.evaluate.eval_set),
                                         "items": len(plan.items),
                                         "max_new_tokens": cfg.evaluate.max_new_tokens},
        "budget": {"max_steps": cfg.train.max_steps, "epochs": cfg.train.epochs, "batch_size": cfg.train.batch_size,
                   "grad_accum": cfg.train.grad_accum, "max_length": cfg.train.max_length},
        "student": {"source": cfg.student.source, "drop_layers": cfg.student.drop_layers, "base_cut": plan.base_cut,
                    "layers_left": _layers_left(plan.base_cut, cfg) if plan.base_cut else None},
        "kd": {"alpha": cfg.train.kd_alpha, "temperature": cfg.train.kd_temperature},
        "placement_available": placement_available(), "methods_available": available_methods(),
        "plan": [{**asdict(c), "key": plan.keys[c]} for c in plan.cells], "cells": results, "cuts": cut_rows,
        "cells_ran": ran, "cells_reused": reused, "bootstrap_samples": cfg.evaluate.bootstrap_samples,
        "wall_s": round(time.perf_counter() - start, 1),
    }
    study["findings"] = analyse(study)
    write_study_report(out_dir, study)
    return study


def _base_cut(cfg: RunConfig) -> str | None:
    """The configured student's own cut, when it is cut from the teacher (its Q3 row comes from Q1's cells)."""
    if cfg.student.source != "embedded-cut":
        return None
    d = cfg.student.drop_layers
    return d if isinstance(d, str) else ",".join(str(i) for i in d)


def _same_cut(a: str, b: str | None, cfg: RunConfig) -> bool:
    """Whether two layer specs drop the same layers of the teacher ('12-17' and '12,13,14,15,16,17')."""
    from pipeline.models import gguf_block_count, parse_layer_spec, resolve_gguf

    if b is None:
        return False
    n = gguf_block_count(resolve_gguf(cfg.student.cut_from)) or 10_000
    return parse_layer_spec(a, n) == parse_layer_spec(b, n)


def _cut_row(cfg: RunConfig, distilled: list[Record], out_dir: Path, cut: str, methods: tuple[str, ...]
             ) -> dict[str, Any]:
    """One row of the cut-depth table through pipeline.train.ablation.cut_depth (its cells are saved and resumed)."""
    from pipeline.train.ablation import cut_depth

    rows = cut_depth(cfg, distilled, out_dir / "cuts", [cut], alpha=cfg.train.kd_alpha,
                     temperature=cfg.train.kd_temperature, methods=methods)
    keep = ("rouge_l", "rouge_l_ci", "item_ids", "per_item")
    return {"cut": cut, "layers_left": _layers_left(cut, cfg),
            "contenders": {r["contender"]: {k: r.get(k) for k in keep} for r in rows}}


# --- analysis (pure: saved cell results in, tables and paired comparisons out) ------------------------------


def budget_overrides(user: list[str], budget: str) -> list[str]:
    """The small CPU budget (keys the user did not --set), then the user's overrides."""
    if budget == "profile":
        return list(user)
    given = {o.split("=", 1)[0].strip() for o in user}
    return [o for o in SMALL_BUDGET if o.split("=", 1)[0] not in given] + list(user)


def load_inputs(run_id: str | None, runs_dir: str, data: str | None, profile: str | None, overrides: list[str],
                out: str | None) -> tuple[RunConfig, list[Record], Path, Path]:
    """(config, accepted records, data path, output folder) from --run-id or --data/--profile."""
    from pipeline.config import load_config
    from pipeline.store import load_records

    if bool(run_id) == bool(data):
        raise ConfigError("distill study needs exactly one data source: --run-id ID (that run's accepted data and "
                          "config) or --data FILE (an accepted.parquet written by curate) with --profile.")
    if run_id:
        run_dir = Path(runs_dir) / run_id
        if not (run_dir / "config.yaml").exists():
            raise ConfigError(f"No run folder {run_dir} (or it has no config.yaml). List runs with `distill runs`.")
        cfg = load_config(config_file=run_dir / "config.yaml", overrides=overrides)
        path, out_dir = run_dir / "datasets" / "curated" / "accepted.parquet", Path(out or run_dir / "study")
    else:
        cfg = load_config(profile=profile, overrides=overrides)
        path, out_dir = Path(data), Path(out or "study")
    if not path.exists():
        raise ConfigError(f"No accepted data at {path}: run generate and curate first (`distill run --data-only`).")
    return cfg, load_records(path), path, out_dir
