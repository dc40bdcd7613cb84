"""Does selecting by IFD beat a random selection of the same size? Train students on (a) all accepted records,
(b) the top half by IFD (Cherry LLM: IFD >= 1 rejected first, then the highest IFD), (c) a random half, each for the
same number of steps, score each on the same dev items by ROUGE-L, and compare b vs c and b vs a with the paired
bootstrap. Both halves come from `curate.select` with the same leading-verb stratification and size, so the only
difference between them is IFD versus a random draw inside each bucket.

    python bench/quality_selection.py --data runs/<id>/datasets/curated/accepted.parquet --dev 100 --steps 64

Prints JSON; writes quality_selection.json and .md into --out. Trained cells are saved as they finish, so a killed
run resumes."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="accepted.parquet of a dataset version")
    ap.add_argument("--profile", default="cpu-demo")
    ap.add_argument("--set", action="append", default=[], help="config override, e.g. train.batch_size=4")
    ap.add_argument("--dev", type=int, default=100, help="dev items (the first N of evaluate.eval_set)")
    ap.add_argument("--steps", type=int, default=64, help="optimiser steps for every student")
    ap.add_argument("--fraction", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0, help="seed of the random half and of tie-breaks")
    ap.add_argument("--samples", type=int, default=2000, help="bootstrap resamples")
    ap.add_argument("--out", default="bench-out/quality_selection")
    ap.add_argument("--only", choices=["all", "ifd", "random", "scores"], default=None,
                    help="train and score one student and stop (run the three at once on a shared box; a last run "
                         "without --only reads the saved cells and writes the comparison); scores: only score IFD "
                         "and write its distribution (quality_ifd.json/.png), no training")
    args = ap.parse_args()

    from pipeline.config import IFDScorerConfig, SelectConfig, load_config
    from pipeline.curate.quality import ifd_scores, plot_scores, score_distribution, select
    from pipeline.evaluate import load_eval_set, score_contender
    from pipeline.evaluate.contenders import student_answers
    from pipeline.evaluate.metrics import paired_difference
    from pipeline.models import resolve_student
    from pipeline.store import atomic_write_json, atomic_write_text, load_records
    from pipeline.train import train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(profile=args.profile, overrides=[*args.set, f"evaluate.limit={args.dev}",
                                                       f"train.max_steps={args.steps}"])
    records = load_records(Path(args.data))
    student_dir = resolve_student(cfg.student.source, cfg.student.drop_layers, cfg.student.cut_from)
    t0 = time.perf_counter()

    def with_ifd() -> list:
        """IFD under the raw student, the model that will be trained (Cherry scores with the model to be tuned)."""
        ifd_path = out / "ifd.json"
        if ifd_path.exists():
            scores = json.loads(ifd_path.read_text())
        else:
            ifd_cfg = IFDScorerConfig()
            scores = ifd_scores(student_dir, records, ifd_cfg.batch_size, ifd_cfg.max_length)
            atomic_write_json(ifd_path, scores)
        return [r.model_copy(update={"ifd": s["ifd"] if s else None}) for r, s in zip(records, scores)]

    half = round(args.fraction * len(records))

    def top_ifd_half() -> list:
        scored = with_ifd()
        helpful = [r for r in scored if r.ifd is not None and r.ifd < 1.0]  # IFD >= 1: the instruction does not help
        return select(helpful, SelectConfig(keep_top_n=min(half, len(helpful)), by="ifd", seed=args.seed))[0]

    builders = {"all accepted": ("all", lambda: records), "top half by IFD": ("ifd", top_ifd_half),
                "random half": ("random", lambda: select(records, SelectConfig(keep_top_n=half, by="random",
                                                                                seed=args.seed))[0])}
    items = load_eval_set(cfg.evaluate.eval_set, args.dev)
    if args.only == "scores":
        scored = with_ifd()
        top = {r.id for r in top_ifd_half()}
        ranked = sorted((r for r in scored if r.ifd is not None), key=lambda r: r.ifd)
        values = [r.ifd for r in ranked]
        show = lambda rs: [{"ifd": round(r.ifd, 4), "instruction": r.instruction[:120], "output": r.output[:120]} for r in rs]
        summary = {"data": args.data, "records": len(scored), "scored": len(values),
                   "at_or_above_1": sum(v >= 1.0 for v in values), "top_half": len(top),
                   "top_half_min_ifd": min(r.ifd for r in scored if r.id in top),
                   "quantiles": {q: round(float(values[min(len(values) - 1, int(q * len(values)))]), 4)
                                 for q in (0.0, 0.1, 0.25, 0.5, 0.75, 0.9)} | {"max": round(values[-1], 4)},
                   "lowest": show(ranked[:5]), "highest_below_1": show([r for r in ranked if r.ifd < 1][-5:]),
                   "at_or_above_1_examples": show([r for r in ranked if r.ifd >= 1][:5]),
                   "student_drop_layers": cfg.student.drop_layers}
        atomic_write_json(out / "quality_ifd.json", summary)
        plot_scores(score_distribution([r for r in scored if r.id in top], [r for r in scored if r.id not in top]),
                    out / "quality_ifd.png")
        print(json.dumps(summary, indent=2))
        return
    results, sets = {}, {}
    for name, (short, build) in builders.items():
        if args.only and short != args.only:
            continue
        subset = sets[name] = build()
        tag = name.replace(" ", "-")
        cell = out / "cells" / f"{tag}.json"
        if cell.exists():
            results[name] = json.loads(cell.read_text())
            continue
        start = time.perf_counter()
        summary = train(student_dir, subset, cfg.train, out / "cells" / tag, student=cfg.student)
        answers = student_answers(student_dir, items, cfg.evaluate.max_new_tokens, cfg.evaluate.batch_size,
                                  adapter_dir=Path(summary["adapter"]), label=name)
        scored = score_contender(items, answers["answers"], args.samples)
        results[name] = {"records": len(subset), "steps": summary["steps"], "last_loss": summary["last_loss"],
                         "rouge_l": scored["rouge_l"], "rouge_l_ci": scored["rouge_l_ci"],
                         "per_item": scored["per_item"], "wall_s": round(time.perf_counter() - start, 1)}
        atomic_write_json(cell, results[name])

    if args.only:
        print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "per_item"} for k, v in results.items()}))
        return
    records = with_ifd()
    top_ifd = sets["top half by IFD"]
    per = {k: v["per_item"] for k, v in results.items()}
    b_vs_c = paired_difference(per["top half by IFD"], per["random half"], names=("top half by IFD", "random half"),
                               samples=args.samples, seed=args.seed)
    b_vs_a = paired_difference(per["top half by IFD"], per["all accepted"], names=("top half by IFD", "all accepted"),
                               samples=args.samples, seed=args.seed)
    c_vs_a = paired_difference(per["random half"], per["all accepted"], names=("random half", "all accepted"),
                               samples=args.samples, seed=args.seed)
    ifds = sorted(r.ifd for r in records if r.ifd is not None)
    report = {
        "data": args.data, "records": len(records), "dev_items": len(items), "steps": args.steps,
        "batch_size": cfg.train.batch_size, "student_drop_layers": cfg.student.drop_layers, "seed": args.seed,
        "ifd": {"scored": len(ifds), "at_or_above_1": sum(1 for v in ifds if v >= 1.0),
                "median": ifds[len(ifds) // 2] if ifds else None, "min": ifds[0] if ifds else None,
                "max": ifds[-1] if ifds else None,
                "top_half_min": min(r.ifd for r in top_ifd) if top_ifd else None},
        "students": {k: {kk: vv for kk, vv in v.items() if kk != "per_item"} for k, v in results.items()},
        "paired": {"b_vs_c": b_vs_c.as_dict(), "b_vs_a": b_vs_a.as_dict(), "c_vs_a": c_vs_a.as_dict()},
        "sentences": [b_vs_c.sentence(), b_vs_a.sentence(), c_vs_a.sentence()],
        "command": "python bench/quality_selection.py " + " ".join(
            [f"--data {args.data}", f"--dev {args.dev}", f"--steps {args.steps}", f"--seed {args.seed}"]
            + [f"--set {s}" for s in args.set]),
        "wall_s": round(time.perf_counter() - t0, 1)}
    atomic_write_json(out / "quality_selection.json", report)
    # Where the IFD half sits in the distribution: kept (top half) vs the rest.
    chosen = {r.id for r in top_ifd}
    plot_scores(score_distribution([r for r in records if r.id in chosen], [r for r in records if r.id not in chosen]),
                out / "quality_selection_ifd.png")
    lines = [f"ROUGE-L on {len(items)} dev items of students trained {args.steps} steps (batch {cfg.train.batch_size}) "
             f"on {len(records)} teacher-written records or a half of them; 95% bootstrap intervals.", "",
             "| training set | records | ROUGE-L |", "| --- | --- | --- |"]
    for k, v in results.items():
        lines.append(f"| {k} | {v['records']} | {v['rouge_l']:.4f} [{v['rouge_l_ci'][0]:.3f}, {v['rouge_l_ci'][1]:.3f}] |")
    lines += ["", *[f"- {s}" for s in report["sentences"]], "", f"`{report['command']}`"]
    atomic_write_text(out / "quality_selection.md", "\n".join(lines) + "\n")
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
