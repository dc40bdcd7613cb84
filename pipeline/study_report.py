"""The `distill study` report: paired comparisons per question (`analyse`), the answers in words, study.md,
study.json, one plot per question, and the terminal summary. Pure functions of a finished study's saved results,
so a report can be rebuilt from cells without training anything."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.store import atomic_write_json, atomic_write_text

QUESTIONS = {
    "q1": "Is distillation better than training on the original data?",
    "q2": "Which parts of the model benefit most?",
    "q3": "What can be removed?",
}


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


def summary_lines(study: dict[str, Any]) -> list[str]:
    """What the terminal shows at the end: the answers and where the report is."""
    lines = [f"study: {study['cells_ran']} cells run, {study['cells_reused']} reused, {study['wall_s'] / 60:.1f} min"]
    lines += [f"  {q.upper()} {QUESTIONS[q]}\n     {a}" for q, a in study["findings"].get("answers", {}).items()]
    return lines
