"""The run's report: the table users ask for (does the distilled student beat the raw one, and how much
of the teacher does it keep?), as markdown, JSON and a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.store import atomic_write_json, atomic_write_text

ROWS = [("teacher", "Teacher"), ("raw_student", "Raw student"), ("distilled_student", "Distilled student"),
        ("gold_student", "Gold-trained student")]


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def headline(results: dict[str, Any]) -> dict[str, Any]:
    """The few numbers printed at the end of a run."""
    ev = results.get("evaluation", {})
    out = {k: ev[k]["rouge_l"] for k, _ in ROWS if k in ev}
    t = out.get("teacher")
    if t and "distilled_student" in out:
        out["distilled_keeps_of_teacher"] = out["distilled_student"] / t
    if "raw_student" in out and "distilled_student" in out:
        out["distilled_minus_raw"] = out["distilled_student"] - out["raw_student"]
    return out


def write_report(run_dir: Path, results: dict[str, Any]) -> Path:
    """report.md, report.json and scores.png in the run folder."""
    run_dir = Path(run_dir)
    ev = results.get("evaluation", {})
    gen, cur, train, ledger = (results.get(k, {}) for k in ("generation", "curation", "training", "ledger"))
    teacher_speed = ev.get("teacher", {}).get("tokens_per_s")
    lines = [f"# distill report: {results.get('run_id', run_dir.name)}", "",
             f"Eval set: `{ev.get('eval_set', '?')}`, {ev.get('items', '?')} items, greedy, "
             f"max {ev.get('max_new_tokens', '?')} new tokens. Intervals: 95% bootstrap of the mean.", "",
             "| contender | ROUGE-L | 95% CI | params | tokens/s | latency/answer (s) | share of teacher ROUGE-L |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    t_score = ev.get("teacher", {}).get("rouge_l")
    for key, label in ROWS:
        if key not in ev:
            continue
        e = ev[key]
        ci = e.get("rouge_l_ci") or [None, None]
        share = (e["rouge_l"] / t_score) if t_score else None
        params = f"{e['params'] / 1e6:.1f} M" if e.get("params") else "–"
        lines.append(f"| {label} | {_fmt(e.get('rouge_l'))} | [{_fmt(ci[0])}, {_fmt(ci[1])}] | {params} | "
                     f"{_fmt(e.get('tokens_per_s'), 1)} | {_fmt(e.get('latency_s'), 2)} | {_fmt(share, 2)} |")
    h = headline(results)
    if "distilled_minus_raw" in h:
        verdict = "beats" if h["distilled_minus_raw"] > 0 else "does not beat"
        lines += ["", f"**The distilled student {verdict} the raw student** by {h['distilled_minus_raw']:+.3f} ROUGE-L "
                      f"and keeps {h.get('distilled_keeps_of_teacher', float('nan')):.0%} of the teacher's score."]
    if teacher_speed:
        lines += ["", "Teacher speed is llama.cpp (quantized GGUF) when the teacher is embedded; student speeds are "
                      "transformers on this machine, so compare students with each other."]
    lines += ["", "## Data", "",
              f"- Instruction prompts sent: {gen.get('prompts', '–')}; candidate instructions parsed: "
              f"{gen.get('candidates', '–')}; kept by the bootstrap loop: {gen.get('kept_instructions', '–')}",
              f"- Curated: **{cur.get('accepted', 0)} accepted**, {cur.get('rejected', 0)} rejected",
              ""]
    if cur.get("reject_reasons"):
        lines += ["| reject reason | count |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in cur["reject_reasons"].items()]
        lines.append("")
    if train:
        lines += ["## Training", "",
                  f"- {train.get('examples')} examples, {train.get('steps')} steps on {train.get('device')} "
                  f"({train.get('dtype')}); loss {_fmt(train.get('first_loss'))} → {_fmt(train.get('last_loss'))}; "
                  f"{_fmt(train.get('trainable_params'))} trainable of {_fmt(train.get('params'))} parameters",
                  f"- Truncated examples: {train.get('preflight', {}).get('truncated', '–')}; curves: `training_curves.png`", ""]
    if ledger:
        tot = ledger.get("total", {})
        lines += ["## Teacher ledger", "", "| stage | requests | cached | failures | tokens in | tokens out | cost ($) |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for stage, t in ledger.items():
            lines.append(f"| {stage} | {t['requests']} | {t['cached']} | {t['failures']} | {t['tokens_in']} | "
                         f"{t['tokens_out']} | {t['cost_usd']:.4f} |")
        lines.append("")
        del tot
    lines += ["## Files", "", "- `config.yaml`: the resolved config", "- `datasets/curated/`: accepted and rejected "
              "records (Parquet) with `manifest.json`", "- `adapter/`: the LoRA adapter", "- `eval/outputs.jsonl`: every "
              "contender's answer per item", "- `report.json`: all numbers", "- `scores.png`: scores with intervals", ""]
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    atomic_write_json(run_dir / "report.json", {**results, "headline": h})
    plot_scores(ev, run_dir / "scores.png")
    return path


def plot_scores(ev: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [(k, label) for k, label in ROWS if k in ev and ev[k].get("rouge_l") == ev[k].get("rouge_l")]
    if not keys:
        return
    means = [ev[k]["rouge_l"] for k, _ in keys]
    lo = [m - ev[k]["rouge_l_ci"][0] for (k, _), m in zip(keys, means)]
    hi = [ev[k]["rouge_l_ci"][1] - m for (k, _), m in zip(keys, means)]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar([label for _, label in keys], means, yerr=[lo, hi], capsize=6, color=["#555", "#c66", "#4a8", "#48c"][: len(keys)])
    ax.set(ylabel="ROUGE-L (95% CI)", title="Does distillation work?")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
