"""Train a run's student on N processes (one per GPU, or N CPU processes with gloo):

    accelerate launch --config_file deploy/accelerate/ddp.yaml -m pipeline.scale.train_launch runs/<run-id>
    torchrun --nproc-per-node 4 -m pipeline.scale.train_launch runs/<run-id>      # or: distill train runs/<run-id>

Run `distill run --data-only` first (one process): generation and curation must not run once per GPU. Every process
runs the train stage; transformers' Trainer reads the launcher's environment, shards the data and all-reduces the
gradients. The student is cut once (a file lock: the first process cuts, the others wait), each process's in-process
teacher goes to its own GPU, the configured batch is split so the effective batch stays train.batch_size x
train.grad_accum, and only rank 0 writes the adapter, logs, plots and train.json.
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
    return train_run(Path(args.run_dir))


def train_run(run_dir: Path) -> int:
    """The body of `distill train RUN_DIR` and of this module: the train stage, then a clean process-group exit."""
    accepted = run_dir / "datasets" / "curated" / "accepted.parquet"
    if not accepted.exists():
        print(f"error: {accepted} does not exist; run `distill run --data-only` first and pass its run folder.",
              file=sys.stderr)
        return 2
    from pipeline import stages
    from pipeline.scale.distributed import is_main_process
    from pipeline.store import Run

    try:
        summary = stages.train_stage(Run.open(run_dir))
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()  # without it torch warns at exit that the group leaked
    if is_main_process():
        print(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
