"""Scoring every contender on one eval set, and `evaluate_model`: benchmark any checkpoint or adapter on any
eval files, outside a distill run."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pipeline.evaluate.contenders import perplexity_summary, student_answers
from pipeline.errors import InputFileError, ModelNotFoundError
from pipeline.evaluate.evalsets import EvalItem, load_eval_set
from pipeline.evaluate.metrics import bootstrap_ci, hit_limit_share, rouge_l
from pipeline.store import atomic_write_json, atomic_write_text

log = logging.getLogger("distill")

# Per-item numbers kept out of the summary (they go to outputs.jsonl).
_PER_ITEM = ("answers", "per_item", "nll", "answer_tokens")


def gguf_params(path: Path) -> int | None:
    """Parameter count from a GGUF header (the embedded teacher has no transformers checkpoint to count)."""
    try:
        import gguf

        return sum(int(t.n_elements) for t in gguf.GGUFReader(str(path)).tensors)
    except Exception as e:  # an unreadable header only costs the params column
        log.warning("Could not count parameters in %s: %s", path, e)
        return None


def score_contenders(items: list[EvalItem], contenders: dict[str, dict[str, Any]], judge=None,
                     judge_baseline: str = "reference", samples: int = 1000, max_new_tokens: int | None = None
                     ) -> tuple[dict[str, Any], list[dict]]:
    """ROUGE-L, judge win rates, perplexity, speed/size ratios and the share of answers that ran into
    max_new_tokens (a model that never stops) per contender; returns (summary, per-item rows)."""
    from pipeline.evaluate.judge import judge_pairs

    rows = [{"id": it.id, "instruction": it.instruction, "input": it.input, "reference": it.reference,
             **({"category": it.category} if it.category else {})} for it in items]
    summary: dict[str, Any] = {}
    if judge is not None and judge_baseline == "teacher" and "teacher" not in contenders:
        raise ValueError("evaluate.judge_baseline is 'teacher' but there are no teacher answers; use 'reference'.")
    baseline = [it.reference for it in items] if judge_baseline == "reference" else contenders.get("teacher", {}).get("answers")
    for name, c in contenders.items():
        answers = c["answers"]
        rouge = [rouge_l(a, it.reference) for a, it in zip(answers, items)]
        mean, lo, hi = bootstrap_ci(rouge, samples)
        s: dict[str, Any] = {k: v for k, v in c.items() if k not in _PER_ITEM}
        s.update(rouge_l=mean, rouge_l_ci=[lo, hi], mean_answer_words=sum(len(a.split()) for a in answers) / max(1, len(answers)))
        prefs = None
        if judge is not None and not (judge_baseline == "teacher" and name == "teacher"):
            j = judge_pairs(judge, items, answers, baseline, label=name, samples=samples)
            prefs = j.pop("per_item")
            s.update(j)
        if c.get("nll") is not None:
            s.update(perplexity_summary(c["nll"], samples))
        tokens = c.get("answer_tokens")
        if tokens is not None and max_new_tokens:
            s["hit_limit"] = hit_limit_share(tokens, max_new_tokens)
        for k, row in enumerate(rows):
            row[name] = answers[k]
            row[f"{name}_rouge_l"] = rouge[k]
            if tokens is not None:
                row[f"{name}_tokens"] = tokens[k]
            if prefs is not None:
                row[f"{name}_judge"] = prefs[k]
        s["by_category"] = _by_category(items, rouge, prefs)
        summary[name] = s
    _ratios_to_teacher(summary)
    return summary, rows


def _by_category(items: list[EvalItem], rouge: list[float], prefs: list[float] | None) -> dict[str, Any]:
    cats = sorted({it.category for it in items if it.category})
    out = {}
    for cat in cats:
        idx = [i for i, it in enumerate(items) if it.category == cat]
        r = [rouge[i] for i in idx if rouge[i] == rouge[i]]
        p = [prefs[i] for i in idx if prefs[i] == prefs[i]] if prefs else []
        out[cat] = {"n": len(idx), "rouge_l": sum(r) / len(r) if r else None, "win_rate": sum(p) / len(p) if p else None}
    return out


def _ratios_to_teacher(summary: dict[str, Any]) -> None:
    t = summary.get("teacher")
    if not t:
        return
    for s in summary.values():
        for key, ratio in (("tokens_per_s", "speed_vs_teacher"), ("params", "params_vs_teacher"),
                           ("disk_bytes", "disk_vs_teacher"), ("rouge_l", "rouge_l_vs_teacher")):
            s[ratio] = s[key] / t[key] if s.get(key) is not None and t.get(key) else None


def write_outputs(out_dir: Path, summary: dict[str, Any], rows: list[dict]) -> None:
    """outputs.jsonl (every answer and score per item) and summary.json, atomically."""
    atomic_write_text(Path(out_dir) / "outputs.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    atomic_write_json(Path(out_dir) / "summary.json", summary)


def evaluate_model(model: str | Path, adapter: str | Path | None, eval_files: list[str | Path], out_dir: str | Path, *,
                   judge_config=None, judge_baseline: str = "reference", limit: int | None = None,
                   max_new_tokens: int = 128, batch_size: int = 8, perplexity: bool = True, samples: int = 1000,
                   cache_dir: str | Path | None = None, label: str = "model") -> dict[str, Any]:
    """Benchmark a checkpoint (dir or hub id), optionally with a LoRA adapter, on one or more eval files.

    Writes <out_dir>/<set name>/outputs.jsonl and summary.json, plus report.md/report.json over all sets.
    """
    from pipeline.report import write_benchmark_report
    from pipeline.teachers import Ledger, make_teacher

    out_dir = Path(out_dir)
    cache_dir = Path(cache_dir) if cache_dir else out_dir / "cache"
    adapter_dir = Path(adapter) if adapter else None
    if adapter_dir is not None and not (adapter_dir / "adapter_config.json").exists():
        raise InputFileError(f"Adapter {adapter_dir} has no adapter_config.json; pass the folder a peft "
                             f"save_pretrained wrote (e.g. runs/<id>/adapter), or leave --adapter out.")
    if not Path(model).exists() and "/" not in str(model).strip("/"):
        raise ModelNotFoundError(f"Model {model!r} is neither a checkpoint directory nor a hub id (org/name). "
                                 f"Pass a folder with config.json, e.g. the student a run trained from.")
    if not eval_files:
        raise InputFileError("No eval files given. Pass one or more Alpaca .json/.jsonl or Self-Instruct .jsonl files.")
    for f in eval_files:  # fail on a bad file before any model is loaded
        load_eval_set(Path(f), limit)
    judge = make_teacher(judge_config, cache_dir / "judge.sqlite", Ledger()) if judge_config else None
    sets: dict[str, Any] = {}
    try:
        for f in eval_files:
            items = load_eval_set(Path(f), limit)
            name = _unique(Path(f).stem, sets)
            c = student_answers(Path(model), items, max_new_tokens, batch_size, adapter_dir=adapter_dir, label=label,
                                cache_dir=cache_dir, perplexity=perplexity)
            summary, rows = score_contenders(items, {label: c}, judge, judge_baseline, samples,
                                             max_new_tokens=max_new_tokens)
            summary = {"eval_set": str(f), "items": len(items), "max_new_tokens": max_new_tokens, **summary}
            write_outputs(out_dir / name, summary, rows)
            sets[name] = summary
    finally:
        if judge is not None:
            judge.close()
    results = {"model": str(model), "adapter": str(adapter_dir) if adapter_dir else None, "sets": sets}
    write_benchmark_report(out_dir, results)
    return results


def _unique(name: str, taken: dict) -> str:
    k, out = 2, name
    while out in taken:
        out, k = f"{name}-{k}", k + 1
    return out
