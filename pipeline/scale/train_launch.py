"""Entry point for multi-GPU training: `accelerate launch --config_file deploy/accelerate/ddp.yaml
-m pipeline.scale.train_launch runs/<run-id>` trains the run's student with one process per GPU.

Run `distill run --data-only` first (one process): generation and curation must not run once per GPU.
TRL's SFTTrainer reads the distributed setup accelerate launch puts in the environment; nothing else changes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Train the student of an existing run folder (its curated dataset must exist)."""
    p = argparse.ArgumentParser(prog="pipeline.scale.train_launch", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="a run folder made by `distill run --data-only`")
    args = p.parse_args(argv)
    run_dir = Path(args.run_dir)
    accepted = run_dir / "datasets" / "curated" / "accepted.parquet"
    if not accepted.exists():
        print(f"error: {accepted} does not exist; run `distill run --data-only` first and pass its run folder.",
              file=sys.stderr)
        return 2
    from pipeline import stages
    from pipeline.store import Run

    summary = stages.train_stage(Run.open(run_dir))
    print(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
