"""The `distill` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from pipeline.errors import DistillError


def _quiet_prefect() -> None:
    # Offline boxes: telemetry calls only produce noise.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.config import load_config

    cfg = load_config(profile=None if args.config else args.profile, config_file=args.config, overrides=args.set)
    from pipeline.stages import preflight

    preflight(cfg)  # bad seeds, eval set or model: fail in a second, before Prefect starts
    _quiet_prefect()
    from flows.distill import distill

    start = time.perf_counter()
    result = distill(config=cfg, run_id=args.run_id, stages_to_run="data" if args.data_only else "full")
    elapsed = time.perf_counter() - start
    print_summary(result, elapsed)
    return 0


def print_summary(result: dict, elapsed: float) -> None:
    print("\n" + "=" * 72)
    print(f"distill finished in {elapsed / 60:.1f} min. Run folder: {result['run_dir']}")
    print(f"  data: {result.get('accepted')} accepted, {result.get('rejected')} rejected")
    for key, label in (("teacher", "teacher"), ("raw_student", "raw student"), ("distilled_student", "distilled student")):
        if key in result:
            print(f"  ROUGE-L {label:<18} {result[key]:.3f}")
    if "distilled_minus_raw" in result:
        print(f"  distilled - raw: {result['distilled_minus_raw']:+.3f}; "
              f"keeps {result.get('distilled_keeps_of_teacher', float('nan')):.0%} of the teacher")
    if result.get("report"):
        print(f"  report: {result['report']}")
    print("=" * 72)


def cmd_dedupe(args: argparse.Namespace) -> int:
    from pipeline.curate.standalone import dedupe_file

    stats = dedupe_file(Path(args.input), Path(args.output), field=args.field, threshold=args.threshold,
                        seeds=Path(args.seeds) if args.seeds else None, seed_field=args.seed_field)
    print(json.dumps(stats, indent=2))
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from pipeline.store import Catalog

    for row in Catalog(Path(args.runs_dir)).rows("runs", "ORDER BY created"):
        print(f"{row['id']:<40} {row['state']:<10} {row['dir']}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from pipeline.store import Catalog

    for row in Catalog(Path(args.runs_dir)).rows("models", "ORDER BY created"):
        metrics = json.loads(row["metrics"] or "{}")
        score = metrics.get("distilled_student")
        print(f"{row['id']:<48} {row['role']:<11} ROUGE-L {score if score is None else round(score, 4)}  {row['path']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distill", description="Distil a teacher LLM into a small student through synthetic data.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run the whole pipeline (the `distill` flow) locally")
    r.add_argument("--profile", default="cpu-demo", help="profile in profiles/ (default: cpu-demo)")
    r.add_argument("--config", help="a YAML config file instead of a profile")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set generate.target_instructions=20 (repeatable)")
    r.add_argument("--run-id", help="reuse this run id: resumes an unfinished run folder")
    r.add_argument("--data-only", action="store_true", help="generate and curate only")
    r.set_defaults(func=cmd_run)

    d = sub.add_parser("dedupe", help="Alpaca's ROUGE-L near-duplicate filter over a JSONL/JSON/Parquet file")
    d.add_argument("input")
    d.add_argument("output", help="kept records (same format); dropped ones go beside it as <name>.dropped.<ext>")
    d.add_argument("--field", default="instruction")
    d.add_argument("--threshold", type=float, default=0.7)
    d.add_argument("--seeds", help="file of instructions counted as already kept")
    d.add_argument("--seed-field", default="instruction")
    d.set_defaults(func=cmd_dedupe)

    for name, fn, help_ in (("runs", cmd_runs, "list runs in the catalog"), ("models", cmd_models, "list models with scores")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--runs-dir", default="runs")
        s.set_defaults(func=fn)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DistillError as e:
        print(f"\ndistill: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ndistill: interrupted; finished stages are kept, rerun with --run-id to resume.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
