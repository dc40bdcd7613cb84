"""`distill evaluate`: benchmark any checkpoint or adapter on any eval files (the parser lives here so the
command's options sit next to the function they drive)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pydantic import ValidationError

from pipeline.errors import ConfigError


def judge_config(pairs: list[str]):
    """--judge KEY=VALUE pairs -> a TeacherConfig (the same keys as the teacher: section), or None."""
    import yaml

    from pipeline.config import TeacherConfig

    if not pairs:
        return None
    data = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--judge {pair!r} must look like KEY=VALUE, e.g. --judge backend=openai --judge model=gpt-4o-mini.")
        key, value = pair.split("=", 1)
        data[key.strip()] = yaml.safe_load(value) if value else ""
    try:
        return TeacherConfig.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise ConfigError(f"--judge: {problems}. The keys are those of the teacher: section (pipeline/config.py).") from None


def add_evaluate_parser(sub) -> argparse.ArgumentParser:
    """Register `distill evaluate` on the CLI's subparsers."""
    e = sub.add_parser("evaluate", help="benchmark a checkpoint (and LoRA adapter) on eval files")
    e.add_argument("--model", required=True, help="checkpoint directory (config.json + weights) or hub id")
    e.add_argument("--adapter", help="LoRA adapter folder (peft), e.g. runs/<id>/adapter")
    e.add_argument("--eval-set", action="append", required=True, metavar="FILE",
                   help="Alpaca .json/.jsonl or Self-Instruct .jsonl (repeatable)")
    e.add_argument("--out", default="bench-out", help="output folder (report.md, report.json, <set>/outputs.jsonl)")
    e.add_argument("--limit", type=int, help="first N items of each set")
    e.add_argument("--max-new-tokens", type=int, default=128)
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--judge", action="append", default=[], metavar="KEY=VALUE",
                   help="pairwise judge, teacher keys: --judge backend=openai --judge base_url=... --judge model=...")
    e.add_argument("--judge-baseline", default="reference", choices=["reference"],
                   help="what answers are judged against (a single model has no teacher answers)")
    e.add_argument("--no-perplexity", action="store_true", help="skip reference perplexity")
    e.add_argument("--label", default="model", help="name of the model in tables")
    e.set_defaults(func=cmd_evaluate)
    return e


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Run `evaluate_model` from parsed arguments and print the headline numbers as JSON."""
    from pipeline.evaluate.bench import evaluate_model

    judge = judge_config(args.judge)  # validate before loading any model
    results = evaluate_model(args.model, args.adapter, args.eval_set, Path(args.out), judge_config=judge,
                             judge_baseline=args.judge_baseline, limit=args.limit, max_new_tokens=args.max_new_tokens,
                             batch_size=args.batch_size, perplexity=not args.no_perplexity, label=args.label)
    keys = ("rouge_l", "rouge_l_ci", "win_rate", "win_rate_ci", "lc_win_rate", "perplexity", "tokens_per_s", "params")
    print(json.dumps({name: {k: s[args.label].get(k) for k in keys if s[args.label].get(k) is not None}
                      for name, s in results["sets"].items()}, indent=2))
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0
