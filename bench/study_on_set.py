"""Re-score a finished `distill study`'s trained students on another eval set, without training anything.

A study scores every cell on one eval set (evaluate.eval_set). Whether a gain carries over to instructions of a
different kind is the next question a skeptic asks; this answers it from the cells' saved adapters: the teacher,
the raw student and every trained cell of the configured student's own cut answer the items of --eval-set, and
each trained cell is compared with the raw student (or --against another contender) by the paired bootstrap,
beside the share of answers that hit the token limit.

    python bench/study_on_set.py --study runs/study-teach255 --eval-set data/self_instruct_heldout.jsonl \\
        --profile cpu-demo --max-new-tokens 64

Prints JSON; writes study_on_<set>.json and .md into --study.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def held_out_items(items: list, exclude_sets: list[str], training_data: str | None, cfg) -> tuple[list, dict]:
    """The items left after dropping those in `exclude_sets` and those the training data overlaps (the curate
    stage's own n-gram rule, applied from the eval item's side); returns them and what was dropped, by reason."""
    from pipeline.curate.decontaminate import EvalOverlap
    from pipeline.evaluate import load_eval_set

    left_out: dict[str, list[str]] = {"in_excluded_set": [], "overlaps_training_data": []}
    seen = {(it.instruction, it.input) for path in exclude_sets for it in load_eval_set(Path(path))}
    kept = []
    for it in items:
        if (it.instruction, it.input) in seen:
            left_out["in_excluded_set"].append(it.id)
        else:
            kept.append(it)
    if training_data:
        from pipeline.store import load_records

        train = [r.instruction + " " + r.input for r in load_records(Path(training_data))]
        overlap = EvalOverlap(train, cfg.curate.decontaminate_ngram, cfg.curate.decontaminate_threshold)
        clean = []
        for it in kept:
            if overlap.is_contaminated(it.instruction + " " + it.input):
                left_out["overlaps_training_data"].append(it.id)
            else:
                clean.append(it)
        kept = clean
    return kept, left_out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--study", required=True, help="the study's output folder (with cells/)")
    ap.add_argument("--eval-set", required=True, help="Alpaca/Self-Instruct JSON(L) eval file")
    ap.add_argument("--profile", default="cpu-demo", help="profile whose teacher and student the study used")
    ap.add_argument("--set", action="append", default=[], help="config override, e.g. teacher.n_threads=2")
    ap.add_argument("--skip", type=int, default=0,
                    help="leave out the set's first N items (e.g. the ones the study itself was scored on)")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--exclude-set", action="append", default=[],
                    help="leave out items that also appear in this eval file (e.g. ones already looked at)")
    ap.add_argument("--decontaminate-against", default=None,
                    help="training records (a parquet the pipeline wrote): leave out items that share "
                         "curate.decontaminate_threshold of their n-grams with one of them, unseen by the students")
    ap.add_argument("--only", action="append", default=[],
                    help="score only the cells with this label (repeatable), e.g. 'distilled sft'")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=25)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--perplexity", action="store_true", help="also the reference perplexity of every student")
    ap.add_argument("--against", default="raw student",
                    help="the contender every other one is compared with, e.g. 'distilled sft' (default: raw student)")
    ap.add_argument("--no-teacher", action="store_true", help="students only (e.g. on the study's own eval set)")
    args = ap.parse_args()

    from pipeline.config import load_config
    from pipeline.evaluate import load_eval_set
    from pipeline.evaluate.bench import score_contenders
    from pipeline.evaluate.contenders import student_answers, teacher_answers
    from pipeline.evaluate.metrics import paired_difference
    from pipeline.models import resolve_student
    from pipeline.stages import teacher_cache_path
    from pipeline.store import atomic_write_json, atomic_write_text
    from pipeline.teachers import make_teacher

    study = Path(args.study)
    cfg = load_config(profile=args.profile, overrides=args.set)
    items = load_eval_set(Path(args.eval_set))[args.skip:]
    items, left_out = held_out_items(items, args.exclude_set, args.decontaminate_against, cfg)
    items = items[:args.limit] if args.limit else items
    student_dir = resolve_student(cfg.student.source, cfg.student.drop_layers, cfg.student.cut_from)
    cache_dir = study / "cache"
    rows: dict[str, dict] = {}

    if not args.no_teacher:
        teacher = make_teacher(cfg.teacher, teacher_cache_path(cfg))
        try:
            t = teacher_answers(teacher, items, args.max_new_tokens)
        finally:
            teacher.close()
        rows["teacher"] = t
    raw = student_answers(student_dir, items, args.max_new_tokens, args.batch_size, label="raw student",
                          cache_dir=cache_dir, perplexity=args.perplexity)
    rows["raw student"] = raw
    for cell_file in sorted((study / "cells").glob("*.json")):
        cell = json.loads(cell_file.read_text())
        adapter = cell_file.with_suffix("") / "adapter"
        if not adapter.is_dir() or (args.only and cell["label"] not in args.only):
            continue  # raw student and teacher cells have no adapter
        rows[cell["label"]] = student_answers(student_dir, items, args.max_new_tokens, args.batch_size,
                                              adapter_dir=adapter, label=cell["label"], cache_dir=cache_dir,
                                              perplexity=args.perplexity)

    result = {"study": str(study), "eval_set": args.eval_set, "against": args.against, "left_out": left_out,
              "skipped": args.skip, "items": len(items), "max_new_tokens": args.max_new_tokens, "contenders": {}}
    # Scored the way a run's evaluation scores its contenders (ROUGE-L, perplexity, token-limit share).
    summary, per_item = score_contenders(items, rows, samples=args.samples, max_new_tokens=args.max_new_tokens)
    if args.against not in summary:
        raise SystemExit(f"--against {args.against!r} is not among the contenders: {', '.join(summary)}")
    base = [r[f"{args.against}_rouge_l"] for r in per_item]
    for name, s in summary.items():
        entry = {k: s[k] for k in ("rouge_l", "rouge_l_ci", "hit_limit", "perplexity", "perplexity_ci") if k in s}
        if name not in ("teacher", args.against):
            entry["vs"] = paired_difference([r[f"{name}_rouge_l"] for r in per_item], base,
                                            names=(name, args.against), samples=args.samples).as_dict()
        result["contenders"][name] = entry
    name = (Path(args.eval_set).stem + (f"_from{args.skip + 1}" if args.skip else "")
            + ("" if args.against == "raw student" else "_vs_" + args.against.replace(" ", "_")))
    atomic_write_json(study / f"study_on_{name}.json", result)
    dropped = "".join(f", {len(v)} left out ({k.replace('_', ' ')})" for k, v in left_out.items() if v)
    lines = [f"Trained cells of `{study}` re-scored on `{args.eval_set}` ({len(items)} items"
             f"{f' after the first {args.skip}' if args.skip else ''}{dropped}, greedy, up to "
             f"{args.max_new_tokens} new tokens); differences are paired bootstrap 95% intervals over the same items.",
             "", f"| contender | ROUGE-L [95% CI] | minus {args.against} [95% CI] | reference perplexity | hit token limit |",
             "| --- | --- | --- | --- | --- |"]
    for label, e in result["contenders"].items():
        v = e.get("vs")
        diff = f"{v['mean']:+.4f} [{v['lo']:+.4f}, {v['hi']:+.4f}] {v['verdict']}" if v else ""
        hit = f"{e['hit_limit']:.0%}" if e.get("hit_limit") is not None else "n/a"
        ppl = f"{e['perplexity']:.1f}" if e.get("perplexity") else ""
        lines.append(f"| {label} | {e['rouge_l']:.4f} [{e['rouge_l_ci'][0]:.3f}, {e['rouge_l_ci'][1]:.3f}] | {diff} | {ppl} "
                     f"| {hit} |")
    atomic_write_text(study / f"study_on_{name}.md", "\n".join(lines) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
