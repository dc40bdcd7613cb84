"""The run's report: the table users ask for (does the distilled student beat the raw one, and how much
of the teacher does it keep, at what speed and size?), as markdown, JSON, PNG plots and artifact tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from pipeline.evaluate.verdict import COMPARISONS, keeps_sentence
from pipeline.store import atomic_write_json, atomic_write_text

ROWS = [("teacher", "Teacher"), ("raw_student", "Raw student"), ("distilled_student", "Distilled student"),
        ("gold_student", "Gold-trained student")]
COLORS = {"teacher": "#555", "raw_student": "#c66", "distilled_student": "#4a8", "gold_student": "#48c"}
# Scored metrics with intervals: (key, column title, digits, higher is better).
METRICS = [("rouge_l", "ROUGE-L", 3, True), ("win_rate", "win rate", 3, True), ("lc_win_rate", "LC win rate", 3, True),
           ("perplexity", "ref. perplexity", 2, False)]


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _ci(e: dict, key: str, digits: int) -> str:
    lo, hi = (e.get(f"{key}_ci") or [None, None])[:2]
    if e.get(key) is None:
        return "–"
    if isinstance(e[key], float) and abs(e[key]) >= 1000:  # a broken student's perplexity: keep the cell short
        return f"{e[key]:.3g} [{lo:.3g}, {hi:.3g}]"
    return f"{_fmt(e.get(key), digits)} [{_fmt(lo, digits)}, {_fmt(hi, digits)}]"


def contenders(ev: dict[str, Any]) -> list[tuple[str, str]]:
    """(key, label) of the contenders present in an evaluation, in report order (known ones first)."""
    known = [(k, label) for k, label in ROWS if isinstance(ev.get(k), dict)]
    extra = [(k, k) for k, v in ev.items() if isinstance(v, dict) and "rouge_l" in v and k not in dict(ROWS)]
    return known + extra


def headline_rows(ev: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per contender: every metric with its interval, size and speed (for tables and artifacts)."""
    rows = []
    for key, label in contenders(ev):
        e = ev[key]
        row: dict[str, Any] = {"contender": label}
        for m, _, digits, _ in METRICS:
            if e.get(m) is not None:
                lo, hi = (e.get(f"{m}_ci") or [None, None])[:2]
                row.update({m: _round(e[m], digits + 1), f"{m}_low": _round(lo, digits + 1), f"{m}_high": _round(hi, digits + 1)})
        row.update(runtime=e.get("runtime"), params_m=_round(e["params"] / 1e6, 1) if e.get("params") else None,
                   disk_mb=_round(e["disk_bytes"] / 2**20, 1) if e.get("disk_bytes") else None,
                   tokens_per_s=_round(e.get("tokens_per_s"), 1), latency_s=_round(e.get("latency_s"), 2),
                   speed_vs_teacher=_round(e.get("speed_vs_teacher"), 2))
        rows.append(row)
    return rows


def _round(x: Any, digits: int) -> Any:
    return round(x, digits) if isinstance(x, float) and x == x else x


def headline(results: dict[str, Any]) -> dict[str, Any]:
    """The few numbers printed at the end of a run: ROUGE-L per contender (keyed by contender), gaps, win rates."""
    ev = results.get("evaluation", {})
    out: dict[str, Any] = {k: ev[k]["rouge_l"] for k, _ in ROWS if isinstance(ev.get(k), dict) and "rouge_l" in ev[k]}
    t = out.get("teacher")
    if t and "distilled_student" in out:
        out["distilled_keeps_of_teacher"] = out["distilled_student"] / t
    if "raw_student" in out and "distilled_student" in out:
        out["distilled_minus_raw"] = out["distilled_student"] - out["raw_student"]
    if "gold_student" in out and "distilled_student" in out:
        out["distilled_minus_gold"] = out["distilled_student"] - out["gold_student"]
    for k, _ in ROWS:
        if isinstance(ev.get(k), dict) and ev[k].get("win_rate") is not None:
            out[f"{k}_win_rate"] = ev[k]["win_rate"]
    sets = {name: set_headline(e) for name, e in eval_sets(ev).items()}
    if any(s["paired"] for s in sets.values()):
        out["sets"] = sets
    return out


def eval_sets(ev: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{set name: that set's evaluation}; an evaluation from before eval_sets is its own single set."""
    if isinstance(ev.get("sets"), dict) and ev["sets"]:
        return ev["sets"]
    return {_set_name(ev): ev} if contenders(ev) else {}


def _set_name(ev: dict[str, Any]) -> str:
    return Path(str(ev.get("eval_set") or "eval")).stem


def set_headline(ev: dict[str, Any]) -> dict[str, Any]:
    """One set's answer to the three questions: ROUGE-L per contender and the paired verdicts."""
    paired = ev.get("paired") or {}
    return {"items": ev.get("items"), "eval_set": ev.get("eval_set"),
            "rouge_l": {k: ev[k].get("rouge_l") for k, _ in contenders(ev)},
            "hit_limit": {k: ev[k].get("hit_limit") for k, _ in contenders(ev)},
            "paired": {k: {f: v.get(f) for f in ("mean", "lo", "hi", "n", "verdict", "n_needed", "sentence")}
                       for k, v in paired.items() if k != "keeps_of_teacher"},
            "keeps_of_teacher": paired.get("keeps_of_teacher")}


def contender_table(ev: dict[str, Any]) -> list[str]:
    """The headline table as markdown lines; columns without any value are left out."""
    cols: list[tuple[str, Callable[[dict], str]]] = []
    present = lambda key: any(ev[k].get(key) is not None for k, _ in contenders(ev))  # noqa: E731
    for m, title, digits, _ in METRICS:
        if present(m):
            cols.append((f"{title} [95% CI]", lambda e, m=m, d=digits: _ci(e, m, d)))
    extra = [("hit_limit", "hit token limit", lambda e: f"{e['hit_limit']:.0%}" if e.get("hit_limit") is not None else "–"),
             ("runtime", "runtime", lambda e: e.get("runtime") or "–"),
             ("params", "params", lambda e: f"{e['params'] / 1e6:.1f} M" if e.get("params") else "–"),
             ("disk_bytes", "disk", lambda e: f"{e['disk_bytes'] / 2**20:.0f} MB" if e.get("disk_bytes") else "–"),
             ("tokens_per_s", "tokens/s", lambda e: _fmt(e.get("tokens_per_s"), 1)),
             ("latency_s", "s/answer", lambda e: _fmt(e.get("latency_s"), 2)),
             ("speed_vs_teacher", "speed vs teacher", lambda e: f"{e['speed_vs_teacher']:.2f}×" if e.get("speed_vs_teacher") else "–"),
             ("rouge_l_vs_teacher", "ROUGE-L vs teacher", lambda e: _fmt(e.get("rouge_l_vs_teacher"), 2))]
    cols += [(title, fn) for key, title, fn in extra if present(key)]
    lines = ["| contender | " + " | ".join(t for t, _ in cols) + " |", "| --- |" + " --- |" * len(cols)]
    for key, label in contenders(ev):
        lines.append(f"| {label} | " + " | ".join(fn(ev[key]) for _, fn in cols) + " |")
    return lines


def category_table(ev: dict[str, Any]) -> list[str]:
    """Per-category ROUGE-L (and win rate) per contender, when the eval set has categories."""
    names = contenders(ev)
    cats = sorted({c for k, _ in names for c in (ev[k].get("by_category") or {})})
    if not cats:
        return []
    lines = ["| category | n | " + " | ".join(label for _, label in names) + " |", "| --- | --- |" + " --- |" * len(names)]
    for cat in cats:
        cells, n = [], "–"
        for k, _ in names:
            c = (ev[k].get("by_category") or {}).get(cat, {})
            n = c.get("n", n)
            wr = f" / {c['win_rate']:.2f}" if c.get("win_rate") is not None else ""
            cells.append(_fmt(c.get("rouge_l")) + wr)
        lines.append(f"| {cat} | {n} | " + " | ".join(cells) + " |")
    return lines


def _verdict(ev: dict[str, Any], h: dict[str, Any]) -> list[str]:
    """The verdict sentences: paired bootstrap on the items both contenders answered; nothing is called better
    unless its interval excludes 0."""
    paired = ev.get("paired")
    if paired:
        lines = []
        for _, _, key in COMPARISONS:
            for k in (key, f"{key}_win_rate"):
                if k in paired:
                    lines.append(f"- {_bold_verdict(paired[k])}")
        keeps = keeps_sentence(paired.get("keeps_of_teacher") or {})
        if keeps:
            lines.append(f"- The distilled student {keeps}.")
        return lines
    if "distilled_minus_raw" not in h:
        return []
    # An evaluation without per-item scores (written before paired verdicts): differences, but no claim.
    line = f"Distilled - raw: {h['distilled_minus_raw']:+.3f} ROUGE-L"
    if h.get("distilled_minus_gold") is not None:
        line += f"; distilled - gold: {h['distilled_minus_gold']:+.3f}"
    if h.get("distilled_keeps_of_teacher") is not None:
        line += f"; the distilled student keeps {h['distilled_keeps_of_teacher']:.0%} of the teacher's ROUGE-L"
    return [line + " (no per-item scores in this evaluation, so no paired verdict)."]


def _bold_verdict(p: dict[str, Any]) -> str:
    sentence = p.get("sentence") or ""
    head, sep, rest = sentence.partition(":")
    return f"**{head}**{sep}{rest}" if sep else sentence


def verdict_table(ev: dict[str, Any]) -> list[str]:
    """The three questions per held-out set, side by side: paired difference [95% CI] and what it means."""
    sets = {name: e for name, e in eval_sets(ev).items() if e.get("paired")}
    if not sets:
        return []
    titles = {"distilled_vs_raw": "distilled - raw", "distilled_vs_gold": "distilled - gold-trained",
              "distilled_vs_teacher": "distilled - teacher", "gold_vs_raw": "gold-trained - raw"}
    lines = ["| ROUGE-L, paired | " + " | ".join(f"{n} ({e.get('items')} items)" for n, e in sets.items()) + " |",
             "| --- |" + " --- |" * len(sets)]
    for _, _, key in COMPARISONS:
        if not any(key in e["paired"] for e in sets.values()):
            continue
        lines.append(f"| {titles[key]} | " + " | ".join(_cell(e["paired"].get(key)) for e in sets.values()) + " |")
    if any(e["paired"].get("keeps_of_teacher") for e in sets.values()):
        cells = []
        for e in sets.values():
            k = e["paired"].get("keeps_of_teacher") or {}
            ok = k.get("ratio") is not None and k["ratio"] == k["ratio"]
            cells.append(f"{k['ratio']:.0%} [{k['lo']:.0%}, {k['hi']:.0%}]" if ok else "–")
        lines.append("| distilled / teacher | " + " | ".join(cells) + " |")
    return lines


def _cell(p: dict[str, Any] | None) -> str:
    if not p or p.get("n") in (None, 0):
        return "–"
    v = p["verdict"]
    what = {"better": "**better**", "worse": "**worse**"}.get(v, f"not distinguishable (~{p['n_needed']} items needed)"
                                                                 if p.get("n_needed") else "not distinguishable")
    return f"{p['mean']:+.3f} [{p['lo']:+.3f}, {p['hi']:+.3f}] {what}"


def _speed_note(ev: dict[str, Any]) -> list[str]:
    """How the speed and size columns were measured, so nobody compares two runtimes by mistake."""
    rows = [ev[k] for k, _ in contenders(ev) if ev[k].get("tokens_per_s")]
    if not rows:
        return []
    if all(r.get("speed_prompts") for r in rows):
        r = rows[0]
        return ["", f"Speed and size on one runtime: every row is a GGUF run by llama.cpp in this process "
                    f"({r.get('n_threads')} threads), the students merged and quantized like the teacher; each answers "
                    f"the same {r['speed_prompts']} eval prompts with exactly {r['speed_new_tokens']} greedy tokens. "
                    f"tokens/s = decode speed, s/answer = prompt + {r['speed_new_tokens']} tokens, disk = the GGUF file."]
    return ["", "Speed is measured on each row's own runtime (see the runtime column): compare rows on the same runtime only."]


def evaluation_section(ev: dict[str, Any], plots: dict[str, str]) -> list[str]:
    """Headline table, notes, per-category breakdown and plots of one evaluation."""
    judge = (f" Judge: `{ev['judge']}`, each contender against the {ev.get('judge_baseline')} answer, both orders "
             f"(win = 1, loss = 0, per item the mean of the two orders); LC = length-controlled.") if ev.get("judge") else ""
    lines = [f"Eval set: `{ev.get('eval_set', '?')}`, {ev.get('items', '?')} items, greedy, max {ev.get('max_new_tokens', '?')} "
             f"new tokens. Intervals: 95% bootstrap over items; verdicts: paired 95% bootstrap of the per-item "
             f"differences on the same items.{judge}", ""]
    lines += contender_table(ev) + [""]
    h = headline({"evaluation": ev})
    lines += _verdict(ev, h)
    bias = [f"{label}: {ev[k]['judge_first_position_rate']:.0%}" for k, label in contenders(ev)
            if ev[k].get("judge_first_position_rate") is not None]
    if bias:
        lines += ["", "How often the judge chose whichever answer was shown first (50% = no position bias): " + ", ".join(bias) + "."]
    if any(ev[k].get("perplexity") is not None for k, _ in contenders(ev)):
        lines += ["", "Reference perplexity: exp of the mean negative log-likelihood per token of the reference answers "
                      "(response tokens and end-of-turn only) under each student; lower is better."]
    if any(ev[k].get("hit_limit") is not None for k, _ in contenders(ev)):
        lines += ["", f"Hit token limit: the share of answers that used all {ev.get('max_new_tokens', '?')} new tokens "
                      f"instead of stopping (a model that rambles past where an answer ends)."]
    lines += _speed_note(ev)
    cat = category_table(ev)
    if cat:
        lines += ["", "### Per category (ROUGE-L / win rate)", ""] + cat
    if plots:
        lines += [""] + [f"![{title}]({name})" for name, title in plots.items()]
    return lines + [""]


def write_report(run_dir: Path, results: dict[str, Any]) -> Path:
    """report.md, report.json, scores.png and speed_quality.png in the run folder."""
    run_dir = Path(run_dir)
    ev = results.get("evaluation", {})
    gen, cur, train, ledger = (results.get(k, {}) for k in ("generation", "curation", "training", "ledger"))
    sets = eval_sets(ev)
    lines = [f"# distill report: {results.get('run_id', run_dir.name)}", ""]
    verdicts = verdict_table(ev)
    if verdicts:
        lines += ["## Verdict", "", "Does the distilled student beat the raw student and the student trained on the "
                  "original data, and how much of the teacher does it keep? Per held-out set, the paired difference "
                  "in ROUGE-L over the items both answered, with its 95% bootstrap interval: **better** or **worse** only "
                  "when the interval excludes 0.", ""] + verdicts + [""]
        if plot_paired(sets, run_dir / "paired.png"):
            lines += ["![paired differences](paired.png)", ""]
        gold = ev.get("gold_training") or {}
        if gold:
            lines += [f"Gold-trained student: {gold.get('examples')} records of `{gold.get('source')}` (the distilled "
                      f"student trained on {gold.get('distilled_examples')}), decontaminated against every eval set like "
                      f"curated data ({gold.get('contaminated_dropped')} skipped), {gold.get('steps')} steps of "
                      f"{gold.get('method')}/{gold.get('finetune')}" + (f"; {gold['note']}" if gold.get("note") else "") + ".", ""]
    for n, (name, e) in enumerate(sets.items()):
        plots = {}
        suffix = "" if n == 0 else f"-{name}"
        if plot_scores(e, run_dir / f"scores{suffix}.png"):
            plots[f"scores{suffix}.png"] = "scores with 95% intervals"
        if n == 0 and plot_speed_quality(e, run_dir / "speed_quality.png"):
            plots["speed_quality.png"] = "speed vs quality"
        if len(sets) > 1:
            lines += [f"## Held-out set: {name}", ""]
        lines += evaluation_section({**e, "max_new_tokens": ev.get("max_new_tokens"), "judge": ev.get("judge"),
                                     "judge_baseline": ev.get("judge_baseline")}, plots)
    lines += ["## Data", "",
              f"- Instruction prompts sent: {gen.get('prompts', '–')}; candidate instructions parsed: "
              f"{gen.get('candidates', '–')}; kept by the bootstrap loop: {gen.get('kept_instructions', '–')}",
              f"- Curated: **{cur.get('accepted', 0)} accepted**, {cur.get('rejected', 0)} rejected", ""]
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
        lines += ["## Teacher ledger", "", "| stage | requests | cached | failures | tokens in | tokens out | cost ($) |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for stage, t in ledger.items():
            lines.append(f"| {stage} | {t['requests']} | {t['cached']} | {t['failures']} | {t['tokens_in']} | "
                         f"{t['tokens_out']} | {t['cost_usd']:.4f} |")
        lines.append("")
    lines += ["## Files", "", "- `config.yaml`: the resolved config", "- `datasets/curated/`: accepted and rejected "
              "records (Parquet) with `manifest.json`", "- `adapter/`: the LoRA adapter", "- `eval/outputs.jsonl`: every "
              "contender's answer per item, with its scores", "- `report.json`: all numbers",
              "- `scores.png`, `speed_quality.png`, `paired.png`: the plots", ""]
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    atomic_write_json(run_dir / "report.json", {**results, "headline": h_all(results)})
    return path


def h_all(results: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers plus the flat per-contender table (report.json)."""
    return {**headline(results), "table": headline_rows(results.get("evaluation", {}))}


def write_benchmark_report(out_dir: Path, results: dict[str, Any]) -> Path:
    """report.md and report.json of `evaluate_model`: one section per eval set."""
    out_dir = Path(out_dir)
    lines = [f"# Benchmark: `{results.get('model')}`" + (f" + adapter `{results['adapter']}`" if results.get("adapter") else ""), ""]
    for name, ev in results.get("sets", {}).items():
        plots = {f"{name}/scores.png": "scores"} if plot_scores(ev, out_dir / name / "scores.png") else {}
        lines += [f"## {name}", ""] + evaluation_section(ev, plots)
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    atomic_write_json(out_dir / "report.json", results)
    return path


def artifact_tables(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The report's tables for Prefect: [{key, table, description}] to pass to create_table_artifact."""
    ev = results.get("evaluation", {})
    out = [{"key": "distill-scores", "table": headline_rows(ev),
            "description": f"Teacher vs students on {ev.get('items', '?')} held-out items (95% bootstrap intervals)"}]
    cats = [{"category": c, "contender": label, **{k: v for k, v in ev[k]["by_category"][c].items()}}
            for k, label in contenders(ev) for c in (ev[k].get("by_category") or {})]
    if cats:
        out.append({"key": "distill-categories", "table": cats, "description": "Per-category scores"})
    verdicts = [{"eval_set": name, "comparison": key, **{f: p.get(f) for f in ("mean", "lo", "hi", "n", "verdict", "n_needed")}}
                for name, e in eval_sets(ev).items() for key, p in (e.get("paired") or {}).items() if key != "keeps_of_teacher"]
    if verdicts:
        out.append({"key": "distill-verdicts", "table": verdicts,
                    "description": "Paired differences (ROUGE-L) per held-out set, 95% bootstrap over shared items"})
    return out


def plot_scores(ev: dict[str, Any], path: Path) -> bool:
    """One bar panel per metric that has values, with 95% intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = contenders(ev)
    panels = [(m, title) for m, title, _, _ in METRICS if any(_ok(ev[k].get(m)) for k, _ in names)]
    if not panels:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels) + 1, 3.4), squeeze=False)
    for ax, (m, title) in zip(axes[0], panels):
        keys = [(k, label) for k, label in names if _ok(ev[k].get(m))]
        means = [ev[k][m] for k, _ in keys]
        cis = [ev[k].get(f"{m}_ci") or [v, v] for (k, _), v in zip(keys, means)]
        err = [[max(0, v - (c[0] if _ok(c[0]) else v)) for v, c in zip(means, cis)],
               [max(0, (c[1] if _ok(c[1]) else v) - v) for v, c in zip(means, cis)]]
        ax.bar(range(len(keys)), means, yerr=err, capsize=5, color=[COLORS.get(k, "#999") for k, _ in keys])
        ax.set_xticks(range(len(keys)), [label.replace(" ", "\n", 1) for _, label in keys], fontsize=8)
        ax.set_title(title)
        if m in ("win_rate", "lc_win_rate"):
            ax.axhline(0.5, color="#999", lw=0.8, ls="--")
    fig.suptitle("Does distillation work? (95% CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_paired(sets: dict[str, dict[str, Any]], path: Path) -> bool:
    """Paired differences with their 95% intervals, one row per comparison and one colour per held-out set: a bar
    that crosses 0 is 'not distinguishable'."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [key for _, _, key in COMPARISONS if any(key in (e.get("paired") or {}) for e in sets.values())]
    if not keys:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 0.7 * len(keys) * max(1, len(sets)) + 1.2))
    height = 0.8 / max(1, len(sets))
    for j, (name, e) in enumerate(sets.items()):
        for i, key in enumerate(keys):
            p = (e.get("paired") or {}).get(key)
            if not p or not _ok(p.get("mean")):
                continue
            y = i + (j - (len(sets) - 1) / 2) * height
            ax.errorbar(p["mean"], y, xerr=[[p["mean"] - p["lo"]], [p["hi"] - p["mean"]]], fmt="o", capsize=4,
                        color=f"C{j}", label=name if i == 0 else None)
    ax.axvline(0, color="#999", lw=0.8, ls="--")
    ax.set_yticks(range(len(keys)), [k.replace("_vs_", " - ").replace("_", " ") for k in keys])
    ax.invert_yaxis()
    ax.set(xlabel="ROUGE-L difference (paired, 95% CI)", title="Paired differences per held-out set")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_speed_quality(ev: dict[str, Any], path: Path) -> bool:
    """Tokens/s against the headline quality score (win rate when judged, else ROUGE-L), one point per contender."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [(k, label) for k, label in contenders(ev) if ev[k].get("tokens_per_s")]
    metric = "win_rate" if any(_ok(ev[k].get("win_rate")) for k, _ in names) else "rouge_l"
    names = [(k, label) for k, label in names if _ok(ev[k].get(metric))]
    if not names:
        return False
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for k, label in names:
        e = ev[k]
        lo, hi = (e.get(f"{metric}_ci") or [e[metric], e[metric]])[:2]
        ax.errorbar(e["tokens_per_s"], e[metric], yerr=[[e[metric] - lo], [hi - e[metric]]], fmt="o", capsize=4,
                    color=COLORS.get(k, "#999"), label=label)
    ax.set(xlabel="tokens/s (this machine)", ylabel=dict((m, t) for m, t, _, _ in METRICS)[metric], title="Speed vs quality")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _ok(x: Any) -> bool:
    return isinstance(x, (int, float)) and x == x
