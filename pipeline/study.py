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
items (`paired_difference`): "better" only when the interval excludes 0."""

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
from pipeline.store import atomic_write_json, atomic_write_text

log = logging.getLogger("distill")

QUESTIONS = {
    "q1": "Is distillation better than training on the original data?",
    "q2": "Which parts of the model benefit most?",
    "q3": "What can be removed?",
}

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

def _compare(a: dict[str, Any], b: dict[str, Any], names: tuple[str, str], samples: int) -> dict[str, Any]:
    from pipeline.evaluate.metrics import paired_difference

    if a["item_ids"] != b["item_ids"]:
        raise ValueError(f"{names[0]} and {names[1]} were scored on different items; they cannot be compared pairwise.")
    pd = paired_difference(a["per_item"], b["per_item"], names=names, samples=samples)
    return {**pd.as_dict(), "sentence": pd.sentence()}


def _score(cell: dict[str, Any]) -> dict[str, Any]:
    return {"rouge_l": cell["rouge_l"], "rouge_l_ci": cell["rouge_l_ci"]}


def analyse(study: dict[str, Any]) -> dict[str, Any]:
    """Per question: a table of scores and the paired comparisons that answer it."""
    cells, n = study["cells"], study.get("bootstrap_samples", 1000)
    by_label = {p["label"]: cells[p["key"]] for p in study["plan"] if p["key"] in cells}
    raw, teacher = by_label.get("raw student"), by_label.get("teacher")
    out: dict[str, Any] = {"raw_student": _score(raw) if raw else None, "teacher": _score(teacher) if teacher else None}
    plan = study["plan"]

    if "q1" in study["questions"]:
        rows = []
        for method in dict.fromkeys(p["group"] for p in plan if p["question"] == "q1"):
            d, g = by_label[f"distilled {method}"], by_label[f"gold {method}"]
            row = {"method": method, "distilled": _score(d), "gold": _score(g),
                   "distilled_vs_gold": _compare(d, g, (f"distilled {method}", f"gold {method}"), n),
                   "distilled_vs_raw": _compare(d, raw, (f"distilled {method}", "raw student"), n),
                   "gold_vs_raw": _compare(g, raw, (f"gold {method}", "raw student"), n),
                   "examples": d["info"].get("examples"), "steps": d["info"].get("steps"),
                   "gold_steps": g["info"].get("steps")}
            if teacher:
                row["distilled_vs_teacher"] = _compare(d, teacher, (f"distilled {method}", "teacher"), n)
                row["keeps_of_teacher"] = d["rouge_l"] / teacher["rouge_l"] if teacher["rouge_l"] else None
            rows.append(row)
        out["q1"] = {"rows": rows}

    if "q2" in study["questions"]:
        q2 = [p for p in plan if p["question"] == "q2"]
        if not q2:
            out["q2"] = {"rows": [], "skipped": "this build has no train.lora_target / train.lora_layers keys"}
        else:
            ref = cells[next(p["key"] for p in q2 if p["group"] == "reference")]
            rows = []
            for p in q2:
                if p["group"] == "reference":
                    continue
                c = cells[p["key"]]
                row = {"label": p["label"], "group": p["group"], **_score(c),
                       "trainable_params": c["info"].get("trainable_params"),
                       "vs_raw": _compare(c, raw, (p["label"], "raw student"), n)}
                if c is not ref:
                    row["vs_reference"] = _compare(c, ref, (p["label"], "all-linear, all layers"), n)
                rows.append(row)
            out["q2"] = {"reference": {"label": "all-linear, all layers", **_score(ref),
                                       "trainable_params": ref["info"].get("trainable_params")}, "rows": rows}

    if "q3" in study["questions"]:
        methods = list(study["options"].get("cut_methods") or ("sft", "kd"))
        entries = list(study.get("cuts", []))
        base = study["student"].get("base_cut")
        if base is not None and all(f"distilled {m}" in by_label for m in methods):
            # The configured student is itself a cut: its row is the raw student and Q1's cells (trained identically).
            entries.insert(0, {"cut": base, "layers_left": study["student"].get("layers_left"), "from_q1": True,
                               "contenders": {"raw": raw, **{m: by_label[f"distilled {m}"] for m in methods}}})
        rows = []
        for e in entries:
            c = {k: {**v, "label": f"{k} {e['cut']}"} for k, v in e["contenders"].items()}
            missing = [m for m in ["raw", *methods] if m not in c or c[m].get("per_item") is None]
            if missing:
                raise ValueError(f"Cut {e['cut']}: no per-item scores saved for {missing}; delete the study's cuts/ "
                                 f"folder so they are scored again.")
            row = {"cut": e["cut"], "layers_left": e.get("layers_left"), "from_q1": bool(e.get("from_q1")),
                   "scores": {m: _score(c[m]) for m in ["raw", *methods]},
                   "vs_raw": {m: _compare(c[m], c["raw"], (c[m]["label"], c["raw"]["label"]), n) for m in methods},
                   "vs_sft": {m: _compare(c[m], c["sft"], (c[m]["label"], c["sft"]["label"]), n)
                              for m in methods if m != "sft" and "sft" in c},
                   "vs_teacher": {m: _compare(c[m], teacher, (c[m]["label"], "teacher"), n) for m in methods}
                   if teacher else {}}
            rows.append(row)
        out["q3"] = {"methods": methods, "rows": rows}
    out["answers"] = _answers_in_words(out)
    return out


def _answers_in_words(f: dict[str, Any]) -> dict[str, str]:
    """One short answer per question, from the paired verdicts only."""
    answers = {}
    if f.get("q1"):
        parts = []
        for r in f["q1"]["rows"]:
            v = r["distilled_vs_gold"]
            word = {"better": "better than", "worse": "worse than"}.get(v["verdict"], "not distinguishable from")
            parts.append(f"{r['method']}: distilled is {word} gold ({v['mean']:+.3f} [{v['lo']:+.3f}, {v['hi']:+.3f}])")
        answers["q1"] = "; ".join(parts) + "."
    if f.get("q2", {}).get("rows"):
        best = max(f["q2"]["rows"], key=lambda r: r["vs_raw"]["mean"])
        beaten = [r["label"] for r in f["q2"]["rows"] if r.get("vs_reference", {}).get("verdict") == "better"]
        answers["q2"] = (f"largest gain over the raw student: {best['label']} ({best['vs_raw']['mean']:+.3f}, "
                         f"{best['vs_raw']['verdict']}); "
                         + (f"better than all-linear on all layers: {', '.join(beaten)}." if beaten else
                            "no placement is better than all-linear on all layers."))
    if f.get("q3", {}).get("rows"):
        rows = f["q3"]["rows"]
        kept = [r["cut"] for r in rows if any(v["verdict"] != "worse" for v in r["vs_teacher"].values())]
        wins = {m: [r["cut"] for r in rows if r["vs_sft"].get(m, {}).get("verdict") == "better"]
                for m in f["q3"]["methods"] if m != "sft"}
        losses = {m: [r["cut"] for r in rows if r["vs_sft"].get(m, {}).get("verdict") == "worse"]
                  for m in f["q3"]["methods"] if m != "sft"}
        answers["q3"] = ((f"cuts whose trained student is not worse than the teacher: {', '.join(map(str, kept))}"
                          if kept else "every cut student is worse than the teacher at this budget")
                         + "".join(f"; {m} beats SFT at: {', '.join(map(str, wins[m])) or 'none'}, "
                                   f"loses to it at: {', '.join(map(str, losses[m])) or 'none'}" for m in wins) + ".")
    return answers


# --- report ----------------------------------------------------------------------------------------------

def _ci(s: dict[str, Any] | None) -> str:
    if not s:
        return "–"
    ci = s.get("rouge_l_ci")
    return f"{s['rouge_l']:.4f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def _diff(c: dict[str, Any] | None) -> str:
    if not c:
        return "–"
    mark = {"better": " **better**", "worse": " worse"}.get(c["verdict"], " n.d.")
    return f"{c['mean']:+.4f} [{c['lo']:+.3f}, {c['hi']:+.3f}]{mark}"


def render_markdown(study: dict[str, Any]) -> str:
    """study.md: setup, one section per question (table, paired sentences, plot), the exact config."""
    f = study["findings"]
    d, ev, b = study["data"], study["eval"], study["budget"]
    src = study.get("source", {})
    steps = f"{b['max_steps']} steps" if b["max_steps"] and b["max_steps"] > 0 else f"{b['epochs']:g} epochs"
    lines = ["# Distillation study", "",
             f"Data: {src.get('data', '?')}: {d['distilled']['records']} teacher-written records after "
             f"decontamination ({d['distilled']['contaminated_dropped']} dropped as overlapping the eval set).",
             f"Student: {study['student']['source']} (layers dropped: {study['student']['drop_layers']}). "
             f"Budget per trained cell: {steps}, batch {b['batch_size']} x {b['grad_accum']}, max_length "
             f"{b['max_length']}. Eval: {ev['items']} items of {ev['set']}, greedy, {ev['max_new_tokens']} new tokens, "
             f"ROUGE-L to the reference.",
             f"Cells: {study['cells_ran']} run, {study['cells_reused']} reused from a previous (killed) study; "
             f"wall time {study['wall_s'] / 60:.1f} min.", "",
             "Every difference below is paired over the same eval items (bootstrap of the per-item differences, "
             f"{study['bootstrap_samples']} resamples, 95% interval): **better** only when the interval excludes 0, "
             "\"n.d.\" = not distinguishable on these items. The intervals cover the choice of eval items, not "
             "training noise: each cell is one training run with one seed (train.seed).", ""]
    ref = f"Raw student {_ci(f['raw_student'])}" + (f"; teacher {_ci(f['teacher'])}" if f.get("teacher") else "") + "."
    lines += [ref, ""]
    if f.get("answers"):
        lines += ["## Answers", ""] + [f"- **{QUESTIONS[q]}** {a}" for q, a in f["answers"].items()] + [""]

    if "q1" in f:
        g = d.get("gold", {})
        lines += [f"## Q1. {QUESTIONS['q1']}", "",
                  f"Same student, method, steps and number of examples ({d['distilled']['records']}); the gold "
                  f"records are Alpaca references, decontaminated the same way ({g.get('same_instruction_as_distilled', 0)} "
                  f"of them answer the very instructions the teacher answered).", "",
                  "| method | gold | distilled | distilled − gold | distilled − raw | gold − raw | keeps of teacher |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in f["q1"]["rows"]:
            keeps = f"{r['keeps_of_teacher']:.0%}" if r.get("keeps_of_teacher") is not None else "–"
            lines.append(f"| {r['method']} | {_ci(r['gold'])} | {_ci(r['distilled'])} | {_diff(r['distilled_vs_gold'])} "
                         f"| {_diff(r['distilled_vs_raw'])} | {_diff(r['gold_vs_raw'])} | {keeps} |")
        lines += [""] + [f"- {r['distilled_vs_gold']['sentence']}" for r in f["q1"]["rows"]]
        lines += ["", "![Q1](q1_data.png)", ""]

    if "q2" in f:
        lines += [f"## Q2. {QUESTIONS['q2']}", ""]
        if f["q2"].get("skipped"):
            lines += [f"Skipped: {f['q2']['skipped']}.", ""]
        else:
            r0 = f["q2"]["reference"]
            lines += [f"LoRA with the configured method, on the distilled records; the reference is all linear layers "
                      f"on every layer: {_ci(r0)} ({r0.get('trainable_params') or 0:,} trainable parameters).", "",
                      "| adapters on | trainable params | ROUGE-L | − raw | − all-linear, all layers |",
                      "| --- | --- | --- | --- | --- |"]
            for r in f["q2"]["rows"]:
                lines.append(f"| {r['label']} | {r.get('trainable_params') or 0:,} | {_ci(r)} | {_diff(r['vs_raw'])} "
                             f"| {_diff(r.get('vs_reference'))} |")
            lines += ["", "![Q2](q2_placement.png)", ""]

    if "q3" in f:
        k, methods = study["kd"], f["q3"]["methods"]
        others = [m for m in methods if m != "sft"]
        lines += [f"## Q3. {QUESTIONS['q3']}", "",
                  f"Students cut from the teacher, each trained on the distilled records by each method (KD: alpha "
                  f"{k['alpha']:g}, T {k['temperature']:g}) through `pipeline.train.ablation.cut_depth`; every trained "
                  f"student is compared with the teacher on the same items.", "",
                  "| layers dropped | layers left | raw | " + " | ".join(m.upper() for m in methods) + " | "
                  + " | ".join(f"{m.upper()} − SFT" for m in others if "sft" in methods) + " | "
                  + " | ".join(f"{m.upper()} − teacher" for m in methods) + " |"]
        ncols = 3 + len(methods) + (len(others) if "sft" in methods else 0) + len(methods)
        lines.append("|" + " --- |" * ncols)
        for r in f["q3"]["rows"]:
            left = r["layers_left"] if r.get("layers_left") is not None else "–"
            cells = [f"{r['cut']}{' (the student)' if r['from_q1'] else ''}", str(left), _ci(r["scores"]["raw"])]
            cells += [_ci(r["scores"][m]) for m in methods]
            cells += [_diff(r["vs_sft"].get(m)) for m in others if "sft" in methods]
            cells += [_diff(r["vs_teacher"].get(m)) for m in methods]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "![Q3](q3_cuts.png)", ""]

    lines += ["## Cells", "", "| cell | data | overrides | ROUGE-L | steps | last loss | seconds |", "| --- | --- | --- | --- | --- | --- | --- |"]
    seen = set()
    for p in study["plan"]:
        if p["key"] in seen or p["key"] not in study["cells"]:
            continue
        seen.add(p["key"])
        c = study["cells"][p["key"]]
        loss = c["info"].get("last_loss")
        lines.append(f"| {p['label']} | {p['data']} | {' '.join(p['overrides']) or '–'} | {_ci(c)} | "
                     f"{c['info'].get('steps') or '–'} | {f'{loss:.3f}' if loss is not None else '–'} | {c['seconds']} |")
    lines += ["", "## Configuration", "",
              f"Command: `{src.get('command', '')}`. Study options: `{json.dumps(study['options'])}`. "
              f"Config fingerprint {study['config_fingerprint']}; each cell applies its overrides to this config:", "",
              "```yaml", study["config_yaml"].rstrip(), "```", ""]
    return "\n".join(lines)


def write_study_report(out_dir: Path, study: dict[str, Any]) -> Path:
    """study.md, study.json and one PNG per question, written atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    f = study["findings"]
    if "q1" in f:
        _plot_q1(out_dir / "q1_data.png", f)
    if f.get("q2", {}).get("rows"):
        _plot_q2(out_dir / "q2_placement.png", f)
    if f.get("q3", {}).get("rows"):
        _plot_q3(out_dir / "q3_cuts.png", f)
    atomic_write_json(out_dir / "study.json", study)
    path = out_dir / "study.md"
    atomic_write_text(path, render_markdown(study))
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_VERDICT_COLOUR = {"better": "tab:green", "worse": "tab:red", "not distinguishable": "tab:grey"}


def _forest(ax, comparisons: list[dict[str, Any]], labels: list[str], title: str) -> None:
    """Paired differences with their intervals, coloured by verdict, against a line at 0."""
    ys = list(range(len(comparisons)))[::-1]
    for y, c in zip(ys, comparisons):
        ax.errorbar(c["mean"], y, xerr=[[c["mean"] - c["lo"]], [c["hi"] - c["mean"]]], fmt="o", capsize=3,
                    color=_VERDICT_COLOUR[c["verdict"]])
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_ylim(-0.7, len(comparisons) - 0.3)
    ax.set_yticks(ys, labels, fontsize=8)
    ax.set(title=title, xlabel="paired difference in ROUGE-L (95% interval)")


def _reference_lines(ax, f: dict[str, Any]) -> None:
    if f.get("raw_student"):
        ax.axhline(f["raw_student"]["rouge_l"], color="grey", linestyle="--", label="raw student")
    if f.get("teacher"):
        ax.axhline(f["teacher"]["rouge_l"], color="black", linestyle=":", label="teacher")


def _bar(ax, x: float, s: dict[str, Any], colour: str, label: str | None) -> None:
    lo, hi = s["rouge_l_ci"]
    ax.bar(x, s["rouge_l"], 0.38, color=colour, label=label,
           yerr=[[s["rouge_l"] - lo], [hi - s["rouge_l"]]], capsize=3)


def _plot_q1(path: Path, f: dict[str, Any]) -> None:
    plt = _pyplot()
    rows = f["q1"]["rows"]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, r in enumerate(rows):
        _bar(ax[0], i - 0.2, r["gold"], "tab:orange", "gold data" if i == 0 else None)
        _bar(ax[0], i + 0.2, r["distilled"], "tab:blue", "distilled data" if i == 0 else None)
    _reference_lines(ax[0], f)
    ax[0].set_xticks(range(len(rows)), [r["method"] for r in rows])
    ax[0].set(ylabel="ROUGE-L (95% CI)", title="Q1: same student, steps and examples")
    ax[0].legend(fontsize=7)
    _forest(ax[1], [r["distilled_vs_gold"] for r in rows], [r["method"] for r in rows], "distilled − gold, paired")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_q2(path: Path, f: dict[str, Any]) -> None:
    plt = _pyplot()
    rows = f["q2"]["rows"]
    fig, ax = plt.subplots(1, 2, figsize=(10, 0.5 * len(rows) + 2))
    _forest(ax[0], [r["vs_raw"] for r in rows], [r["label"] for r in rows], "Q2: gain over the raw student")
    with_ref = [r for r in rows if r.get("vs_reference")]
    _forest(ax[1], [r["vs_reference"] for r in with_ref], [r["label"] for r in with_ref],
            "against all-linear on all layers")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_q3(path: Path, f: dict[str, Any]) -> None:
    plt = _pyplot()
    rows, methods = f["q3"]["rows"], ["raw", *f["q3"]["methods"]]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(rows))]
        means = [r["scores"][m]["rouge_l"] for r in rows]
        cis = [r["scores"][m]["rouge_l_ci"] or [mu, mu] for r, mu in zip(rows, means)]
        ax.errorbar(xs, means, yerr=[[mu - c[0] for mu, c in zip(means, cis)], [c[1] - mu for mu, c in zip(means, cis)]],
                    fmt="o", capsize=3, label="raw (untrained cut)" if m == "raw" else m.upper())
    if f.get("teacher"):
        ax.axhline(f["teacher"]["rouge_l"], color="black", linestyle=":", label="teacher")
    ax.set_xticks(range(len(rows)), [f"{r['cut']}\n({r['layers_left']} left)" if r.get("layers_left") else str(r["cut"])
                                     for r in rows], fontsize=8)
    ax.set(xlabel="layers dropped", ylabel="ROUGE-L (95% CI)", title="Q3: how far can the cut go?")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- inputs --------------------------------------------------------------------------------------------------

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


def summary_lines(study: dict[str, Any]) -> list[str]:
    """What the terminal shows at the end: the answers and where the report is."""
    lines = [f"study: {study['cells_ran']} cells run, {study['cells_reused']} reused, {study['wall_s'] / 60:.1f} min"]
    lines += [f"  {q.upper()} {QUESTIONS[q]}\n     {a}" for q, a in study["findings"].get("answers", {}).items()]
    return lines
