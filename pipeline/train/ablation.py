"""Ablations: the student's score over a grid of KD temperature T and weight alpha, and a table of distillation
methods (raw / sft / kd / on-policy, each with or without the hidden-state term) per layer cut, paired against SFT.

Each cell trains a student and scores its greedy answers on the development set by ROUGE-L. Cells are saved as
they finish (cells/<name>.json), so a killed ablation resumes where it stopped. alpha = 1 is plain SFT, whatever
T is, so it is trained once and shared across the T column."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

from pipeline.config import RunConfig
from pipeline.errors import ConfigError
from pipeline.records import Record
from pipeline.store import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

TEMPERATURES = (1, 2, 3, 5, 10, 20)
ALPHAS = (0.0, 0.2, 0.5, 0.8, 1.0)


def _score(student_dir: Path, adapter_dir: Path | None, cfg: RunConfig) -> dict[str, Any]:
    """Greedy answers on the dev set: ROUGE-L per item (kept, for paired comparisons), reference perplexity, size and
    the share of answers that hit evaluate.max_new_tokens (a student that never stops)."""
    from pipeline.evaluate import load_eval_set, score_contender
    from pipeline.evaluate.contenders import perplexity_summary, student_answers
    from pipeline.evaluate.metrics import hit_limit_share

    ev = cfg.evaluate
    items = load_eval_set(ev.eval_set, ev.limit)
    answers = student_answers(student_dir, items, ev.max_new_tokens, ev.batch_size, adapter_dir=adapter_dir,
                              label=str(adapter_dir or student_dir), perplexity=ev.perplexity)
    scores = score_contender(items, answers["answers"], ev.bootstrap_samples)
    out = {"rouge_l": scores["rouge_l"], "rouge_l_ci": scores["rouge_l_ci"], "items": len(items),
           "item_ids": [it.id for it in items], "per_item": scores["per_item"], "params": answers["params"],
           "hit_limit": hit_limit_share(answers["answer_tokens"], ev.max_new_tokens)}
    if ev.perplexity:
        out.update(perplexity_summary(answers["nll"], ev.bootstrap_samples))
    return out


def _cell(out_dir: Path, name: str, work: Callable[[Path], dict[str, Any]], saved_only: bool = False
          ) -> dict[str, Any] | None:
    """Run one cell unless its result is already saved (saved_only: never run, None when it is not saved)."""
    path = out_dir / "cells" / f"{name}.json"
    if path.exists():
        return json.loads(path.read_text())
    if saved_only:
        return None
    result = work(out_dir / "cells" / name)
    atomic_write_json(path, result)
    return result


def _train_and_score(student_dir: Path, records: list[Record], cfg: RunConfig, teacher_dir: Path | None,
                     method: str, alpha: float, temperature: float, update: dict[str, Any] | None = None,
                     cut: list[int] | str | None = None) -> Callable[[Path], dict[str, Any]]:
    from pipeline.train import method_module, train

    def work(cell_dir: Path) -> dict[str, Any]:
        tcfg = cfg.train.model_copy(update={"method": method, "kd_alpha": alpha, "kd_temperature": temperature,
                                            **(update or {})})
        needs = method_module(method).needs_teacher(tcfg) or tcfg.hidden_loss_weight > 0
        start = time.perf_counter()
        summary = train(student_dir, records, tcfg, cell_dir, teacher_dir=teacher_dir if needs else None, cut=cut)
        wall = time.perf_counter() - start
        adapter = Path(summary.get("adapter") or summary["model"])
        model_dir = adapter if tcfg.finetune == "full" else student_dir
        return {"method": method, "alpha": alpha, "temperature": temperature, "last_loss": summary["last_loss"],
                "train_wall_s": round(wall, 1), "train_steps": summary["steps"],
                "trainable_params": summary["trainable_params"], "on_policy": summary.get("on_policy"),
                "hidden": summary.get("hidden"),
                **_score(model_dir, None if tcfg.finetune == "full" else adapter, cfg)}

    return work


def kd_grid(cfg: RunConfig, records: list[Record], out_dir: Path, temperatures=TEMPERATURES,
            alphas=ALPHAS) -> dict[str, Any]:
    """Train and score a student for every (T, alpha); write ablation.csv/.md/.png and return the table."""
    from pipeline.models import resolve_student

    out_dir = Path(out_dir)
    student_dir = resolve_student(cfg.student.source, cfg.student.drop_layers, cfg.student.cut_from)
    teacher_dir = resolve_student(cfg.train.kd_teacher or "embedded-cut", [], cfg.student.cut_from)
    raw = _cell(out_dir, "raw", lambda _: {"method": "raw", **_score(student_dir, None, cfg)})
    rows = []
    for t in temperatures:
        for a in alphas:
            # alpha = 1 has no teacher term: one SFT run stands for the whole column.
            name = "sft" if a >= 1.0 else f"kd-T{t:g}-a{a:g}"
            method = "sft" if a >= 1.0 else "kd"
            cell = _cell(out_dir, name, _train_and_score(student_dir, records, cfg, teacher_dir, method, a, t))
            rows.append({**cell, "temperature": t, "alpha": a})
            log.info("ablation T=%g alpha=%g: ROUGE-L %.4f", t, a, cell["rouge_l"])
    table = {"raw_student": raw, "cells": rows, "temperatures": list(temperatures), "alphas": list(alphas)}
    atomic_write_json(out_dir / "ablation.json", table)
    _write_table(out_dir, rows, temperatures, alphas, raw["rouge_l"])
    _plot(out_dir / "ablation.png", rows, temperatures, alphas, raw["rouge_l"])
    return table


def parse_contender(spec: str) -> tuple[str, bool]:
    """'kd' -> ('kd', False); 'sft+hidden' -> ('sft', True): a method name, plus the hidden-state term or not."""
    from pipeline.train import method_module

    name, _, extra = spec.strip().partition("+")
    if extra not in ("", "hidden"):
        raise ConfigError(f"Contender {spec!r}: only '+hidden' can follow a method name (e.g. sft+hidden).")
    method_module(name)  # an unknown method lists the known ones
    return name, extra == "hidden"


def cut_depth(cfg: RunConfig, records: list[Record], out_dir: Path, cuts: list[str | list[int]],
              alpha: float = 0.5, temperature: float = 2.0, methods: tuple[str, ...] = ("sft", "kd"),
              hidden_weight: float = 1.0, method_overrides: dict[str, dict[str, Any]] | None = None,
              saved_only: bool = False) -> list[dict[str, Any]]:
    """For each layer cut: the raw student and a student trained by each method, all scored on the same dev items,
    each trained one against SFT by the paired bootstrap. Writes cut_depth.md/.json/.png; returns the rows.

    saved_only: train nothing, tabulate the cells saved so far (the partial table of a stopped ablation)."""
    from pipeline.models import resolve_student

    out_dir = Path(out_dir)
    contenders = [parse_contender(m) for m in methods]
    teacher_dir = resolve_student(cfg.train.kd_teacher or "embedded-cut", [], cfg.student.cut_from)
    key = hashlib.sha256(json.dumps([cfg.evaluate.model_dump(mode="json"), [r.id for r in records]],
                                    sort_keys=True, default=str).encode()).hexdigest()[:8]
    rows: list[dict[str, Any]] = []
    for cut in cuts:
        student_dir = resolve_student("embedded-cut", cut, cfg.student.cut_from)
        tag = str(cut).replace(" ", "").replace(":", "").replace(",", "_").strip("[]")
        cells = {"raw": _cell(out_dir, f"cut-{tag}-raw-{key}", lambda _: {"method": "raw", **_score(student_dir, None, cfg)},
                              saved_only)}
        for (method, hidden), spec in zip(contenders, methods):
            update = {"hidden_loss_weight": hidden_weight if hidden else 0.0, **(method_overrides or {}).get(spec, {})}
            a = 1.0 if method == "sft" else alpha
            tcfg = cfg.train.model_copy(update={"method": method, "kd_alpha": a, "kd_temperature": temperature, **update})
            digest = hashlib.sha256(f"{key}{tcfg.model_dump_json()}".encode()).hexdigest()[:8]
            cells[spec] = _cell(out_dir, f"cut-{tag}-{spec}-{digest}",
                                _train_and_score(student_dir, records, cfg, teacher_dir, method, a, temperature,
                                                 update, cut), saved_only)
            if not saved_only:  # the table so far: a stopped ablation still leaves one
                _write_cut_table(out_dir, rows + _cut_rows(cut, cells, cfg), records, cfg, alpha, temperature,
                                 hidden_weight)
        rows += _cut_rows(cut, cells, cfg)
    for r in rows:
        d = r["vs_sft"]
        log.info("cut %s %s: ROUGE-L %.4f%s", r["cut"], r["contender"], r["rouge_l"],
                 f" (minus SFT {d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}])" if d else "")
    _write_cut_table(out_dir, rows, records, cfg, alpha, temperature, hidden_weight)
    return rows


def _cut_rows(cut, cells: dict[str, dict | None], cfg: RunConfig) -> list[dict[str, Any]]:
    """One row per contender that has a result, each with its paired difference to SFT on the same items."""
    from pipeline.evaluate.metrics import paired_difference

    rows = []
    base = cells.get("sft")
    for spec, cell in cells.items():
        if cell is None:
            continue
        vs = None
        if base is not None and spec != "sft":
            vs = paired_difference(cell["per_item"], base["per_item"], names=(spec, "sft"),
                                   samples=cfg.evaluate.bootstrap_samples).as_dict()
        # Per-item scores stay in the rows so any two cells on the same items can be compared pairwise later.
        rows.append({"cut": cut, "contender": spec, **cell, "vs_sft": vs})
    return rows


def _write_cut_table(out_dir: Path, rows: list[dict], records: list[Record], cfg: RunConfig, alpha: float,
                     temperature: float, hidden_weight: float) -> None:
    def ci(r: dict, key: str, fmt: str) -> str:
        v, bounds = r.get(key), r.get(f"{key}_ci") or [None, None]
        if v is None:
            return "n/a"
        return format(v, fmt) + (f" [{format(bounds[0], fmt)}, {format(bounds[1], fmt)}]" if bounds[0] is not None else "")

    def diff(r: dict) -> str:
        d = r.get("vs_sft")
        return "(baseline)" if r["contender"] == "sft" else ("n/a" if not d else
                                                            f"{d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}] {d['verdict']}")

    items = rows[0]["items"] if rows else 0
    lines = [f"Students cut from the teacher, trained on {len(records)} records, scored on {items} dev items "
             f"({cfg.evaluate.eval_set.name}, greedy, up to {cfg.evaluate.max_new_tokens} new tokens). KD: alpha "
             f"{alpha:g}, T {temperature:g}; +hidden: hidden-state term, weight {hidden_weight:g} "
             f"({cfg.train.hidden_loss}). Differences are paired bootstrap 95% intervals against SFT on the same items.",
             "", "| layers dropped | contender | params | trainable | ROUGE-L [95% CI] | minus SFT [95% CI] | "
             "reference perplexity | hit token limit | train wall s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        hit = f"{r['hit_limit']:.0%}" if r.get("hit_limit") is not None else "n/a"
        lines.append(f"| {r['cut']} | {r['contender']} | {r['params'] / 1e6:.1f}M | "
                     f"{(r.get('trainable_params') or 0) / 1e6:.2f}M | {ci(r, 'rouge_l', '.4f')} | {diff(r)} | "
                     f"{ci(r, 'perplexity', '.1f')} | {hit} | {r.get('train_wall_s', '')} |")
    atomic_write_text(out_dir / "cut_depth.md", "\n".join(lines) + "\n")
    atomic_write_json(out_dir / "cut_depth.json", rows)
    _plot_cuts(out_dir / "cut_depth.png", rows)


def _plot_cuts(path: Path, rows: list[dict]) -> None:
    """ROUGE-L with its interval per contender, one group of bars per cut."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cuts = list(dict.fromkeys(str(r["cut"]) for r in rows))
    names = list(dict.fromkeys(r["contender"] for r in rows))
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(1.4 + 1.1 * len(cuts) * len(names) / 2, 3.6))
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        for i, cut in enumerate(cuts):
            r = next((r for r in rows if str(r["cut"]) == cut and r["contender"] == name), None)
            if r is None:
                continue
            lo, hi = r.get("rouge_l_ci") or [r["rouge_l"], r["rouge_l"]]
            ax.bar(i + j * width, r["rouge_l"], width, color=f"C{j}", label=name if i == 0 else None,
                   yerr=[[r["rouge_l"] - lo], [hi - r["rouge_l"]]], capsize=2)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cuts))], [f"drop {c}" for c in cuts])
    ax.set(ylabel="ROUGE-L", title="Distillation methods per layer cut")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _write_table(out_dir: Path, rows: list[dict], temperatures, alphas, raw: float) -> None:
    score = {(r["temperature"], r["alpha"]): r["rouge_l"] for r in rows}
    csv = ["temperature,alpha,rouge_l"] + [f"{r['temperature']},{r['alpha']},{r['rouge_l']:.4f}" for r in rows]
    atomic_write_text(out_dir / "ablation.csv", "\n".join(csv) + "\n")
    md = [f"ROUGE-L of the student by KD temperature T (rows) and alpha (columns; 1.0 = plain SFT). Raw student: {raw:.4f}.",
          "", "| T \\ alpha | " + " | ".join(f"{a:g}" for a in alphas) + " |", "|---" * (len(alphas) + 1) + "|"]
    md += [f"| {t:g} | " + " | ".join(f"{score[(t, a)]:.4f}" for a in alphas) + " |" for t in temperatures]
    atomic_write_text(out_dir / "ablation.md", "\n".join(md) + "\n")


def _plot(path: Path, rows: list[dict], temperatures, alphas, raw: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    score = {(r["temperature"], r["alpha"]): r["rouge_l"] for r in rows}
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for a in alphas:
        ax.plot(list(temperatures), [score[(t, a)] for t in temperatures], marker="o", label=f"alpha={a:g}")
    ax.axhline(raw, color="grey", linestyle="--", label="raw student")
    ax.set(xscale="log", xlabel="temperature T", ylabel="ROUGE-L", title="KD ablation")
    ax.set_xticks(list(temperatures), [f"{t:g}" for t in temperatures])
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
