"""Yield of each generation mode and prompt style on a teacher (default: the embedded cpu-demo one).

Kept = accepted by curation (Alpaca's filters, exact and ROUGE-L > 0.7 duplicates against the seeds,
decontamination against the eval set). Every teacher call is made for real: the bench uses a fresh,
empty response cache. Prints one JSON object.

    python bench/generation_yield.py --prompts 12
    python bench/generation_yield.py --variants magpie,alpaca-completion --prompts 4
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import load_config  # noqa: E402
from pipeline.curate import curate, reject_counts  # noqa: E402
from pipeline.evaluate import load_eval_set  # noqa: E402
from pipeline.generate import generate_records, load_seed_tasks  # noqa: E402
from pipeline.teachers import Ledger, make_teacher  # noqa: E402

# name -> generate.* overrides; max_prompts is set from --prompts (alpaca prompts are ~5x longer).
VARIANTS = {
    "self-instruct-completion-answer": ["generate.mode=self-instruct", "generate.prompt_style=completion", "generate.instances=answer"],
    "self-instruct-completion-paper": ["generate.mode=self-instruct", "generate.prompt_style=completion", "generate.instances=paper"],
    "self-instruct-completion-paper-or-answer": ["generate.mode=self-instruct", "generate.prompt_style=completion",
                                                 "generate.instances=paper-or-answer"],
    "self-instruct-chat-answer": ["generate.mode=self-instruct", "generate.prompt_style=chat", "generate.instances=answer"],
    "alpaca-completion": ["generate.mode=alpaca", "generate.prompt_style=completion", "generate.alpaca_max_tokens=768"],
    "alpaca-chat": ["generate.mode=alpaca", "generate.prompt_style=chat", "generate.alpaca_max_tokens=768"],
    "magpie": ["generate.mode=magpie"],
}
ALPACA_SHARE = 0.5  # alpaca prompts ask for 20 triples each: half as many prompts keeps its token spend comparable


def measure(name: str, overrides: list[str], prompts: int, profile: str, cache_dir: Path, extra: list[str],
            out_dir: Path | None) -> dict:
    """Generate with one variant on an empty cache, curate, and count kept records per call and per token."""
    n = max(1, int(prompts * ALPACA_SHARE)) if "alpaca" in name else prompts
    cfg = load_config(profile=profile, overrides=overrides + extra + [f"generate.max_prompts={n}", "generate.target_instructions=1000",
                                                              f"runs_dir={cache_dir}"])
    ledger = Ledger()
    teacher = make_teacher(cfg.teacher, cache_dir / f"{name}.sqlite", ledger)
    start = time.perf_counter()
    try:
        records, stats = generate_records(teacher, cfg.generate, cfg.curate, f"bench-{name}")
    finally:
        teacher.close()
    seconds = time.perf_counter() - start
    seeds = [s.instruction for s in load_seed_tasks(cfg.generate.seed_tasks)]
    evals = [f"{e.instruction} {e.input}" for e in load_eval_set(cfg.evaluate.eval_set)]
    accepted, rejected = curate(records, cfg.curate, seeds, evals)
    if out_dir is not None:  # every record with its raw reply, for reading and for parser test cases
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{name}.jsonl").write_text("".join(r.model_dump_json() + "\n" for r in records))
    t = ledger.totals()
    tokens = t.tokens_in + t.tokens_out
    return {"variant": name, "overrides": overrides, "generation_prompts": stats["prompts"], "teacher_calls": t.requests,
            "tokens_in": t.tokens_in, "tokens_out": t.tokens_out, "seconds": round(seconds, 1),
            "candidates": stats["candidates"], "kept_by_loop": stats["kept_instructions"],
            "instances_parsed": stats.get("instances_parsed"), "accepted": len(accepted),
            "kept_per_100_calls": round(100 * len(accepted) / max(1, t.requests), 1),
            "kept_per_1k_tokens": round(1000 * len(accepted) / max(1, tokens), 2),
            "with_input": sum(1 for r in accepted if r.input), "reject_reasons": reject_counts(rejected),
            "examples": [{"instruction": r.instruction, "input": r.input[:200], "output": r.output[:200]} for r in accepted[:3]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="cpu-demo")
    ap.add_argument("--prompts", type=int, default=12, help="instruction-generation prompts per variant")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of: {', '.join(VARIANTS)}")
    ap.add_argument("--set", action="append", default=[], help="extra config override, e.g. teacher.n_threads=1")
    ap.add_argument("--out", type=Path, default=None, help="folder for each variant's records (JSONL)")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="distill-bench-") as tmp:
        for name in args.variants.split(","):
            results.append(measure(name, VARIANTS[name], args.prompts, args.profile, Path(tmp), args.set, args.out))
            # Each variant's result as it lands, so a run stopped early still reports what it measured.
            print(json.dumps({"done": name, **results[-1]}, ensure_ascii=False), file=sys.stderr, flush=True)
    best = max(results, key=lambda r: r["kept_per_1k_tokens"])
    print(json.dumps({"profile": args.profile, "prompts": args.prompts, "results": results,
                      "best_by_tokens": best["variant"]}, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
