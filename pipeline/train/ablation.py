"""KD ablations: the student's score over a grid of temperature T and weight alpha, and over layer cuts (KD vs SFT).

Each cell trains a student and scores its greedy answers on the development set by ROUGE-L. Cells are saved as
they finish (cells/<name>.json), so a killed ablation resumes where it stopped. alpha = 1 is plain SFT, whatever
T is, so it is trained once and shared across the T column."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

from pipeline.config import RunConfig
from pipeline.records import Record
from pipeline.store import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

TEMPERATURES = (1, 2, 3, 5, 10, 20)
ALPHAS = (0.0, 0.2, 0.5, 0.8, 1.0)


def _score(student_dir: Path, adapter_dir: Path | None, cfg: RunConfig) -> dict[str, Any]:
    from pipeline.evaluate import load_eval_set, score_contender
    from pipeline.evaluate.contenders import student_answers

    ev = cfg.evaluate
    items = load_eval_set(ev.eval_set, ev.limit)
    answers = student_answers(student_dir, items, ev.max_new_tokens, ev.batch_size, adapter_dir=adapter_dir,
                              label=str(adapter_dir or student_dir))
    scores = score_contender(items, answers["answers"], ev.bootstrap_samples)
    # Per-item scores are kept so that any two cells on the same items can be compared pairwise.
    return {"rouge_l": scores["rouge_l"], "rouge_l_ci": scores["rouge_l_ci"], "items": len(items),
            "item_ids": [it.id for it in items], "per_item": scores["per_item"]}


def _cell(out_dir: Path, name: str, work: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """Run one cell unless its result is already saved."""
    path = out_dir / "cells" / f"{name}.json"
    if path.exists():
        return json.loads(path.read_text())
    result = work(out_dir / "cells" / name)
    atomic_write_json(path, result)
    return result


def _train_and_score(student_dir: Path, records: list[Record], cfg: RunConfig, teacher_dir: Path | None,
                     method: str, alpha: float, temperature: float) -> Callable[[Path], dict[str, Any]]:
    from pipeline.train import train as train_lora

    def work(cell_dir: Path) -> dict[str, Any]:
        tcfg = cfg.train.model_copy(update={"method": method, "kd_alpha": alpha, "kd_temperature": temperature})
        summary = train_lora(student_dir, records, tcfg, cell_dir, teacher_dir=teacher_dir if method == "kd" else None)
        adapter = Path(summary.get("adapter") or summary["model"])
        model_dir = adapter if tcfg.finetune == "full" else student_dir
        return {"method": method, "alpha": alpha, "temperature": temperature, "last_loss": summary["last_loss"],
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


def cut_depth(cfg: RunConfig, records: list[Record], out_dir: Path, cuts: list[str | list[int]],
              alpha: float = 0.5, temperature: float = 2.0) -> list[dict[str, Any]]:
    """For each layer cut: raw, SFT-trained and KD-trained student scores (how far KD lets the cut go)."""
    from pipeline.models import resolve_student

    out_dir = Path(out_dir)
    teacher_dir = resolve_student(cfg.train.kd_teacher or "embedded-cut", [], cfg.student.cut_from)
    rows = []
    for cut in cuts:
        student_dir = resolve_student("embedded-cut", cut, cfg.student.cut_from)
        tag = str(cut).replace(" ", "").replace(":", "").replace(",", "_").strip("[]")
        raw = _cell(out_dir, f"cut-{tag}-raw", lambda _: _score(student_dir, None, cfg))
        row = {"cut": cut, "raw": raw["rouge_l"], "raw_ci": raw.get("rouge_l_ci"), "raw_per_item": raw.get("per_item")}
        for method in ("sft", "kd"):
            a = 1.0 if method == "sft" else alpha
            cell = _cell(out_dir, f"cut-{tag}-{method}", _train_and_score(student_dir, records, cfg, teacher_dir,
                                                                         method, a, temperature))
            row[method], row[f"{method}_ci"] = cell["rouge_l"], cell.get("rouge_l_ci")
            row[f"{method}_per_item"] = cell.get("per_item")
        rows.append(row)

    def shown(r: dict, key: str) -> str:
        ci = r.get(f"{key}_ci")
        return f"{r[key]:.4f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")

    lines = [f"ROUGE-L [95% bootstrap CI] of students cut from the teacher, on {len(records)} training records.", "",
             "| layers dropped | raw student | SFT | KD (alpha %g, T %g) |" % (alpha, temperature),
             "| --- | --- | --- | --- |"]
    lines += [f"| {r['cut']} | {shown(r, 'raw')} | {shown(r, 'sft')} | {shown(r, 'kd')} |" for r in rows]
    atomic_write_text(out_dir / "cut_depth.md", "\n".join(lines) + "\n")
    atomic_write_json(out_dir / "cut_depth.json", rows)
    return rows


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
