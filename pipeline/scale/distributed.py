"""Multi-process training (torchrun / accelerate launch): who this process is, which device it owns, and how the
configured batch is split so the effective batch size stays what the config says.

The launchers put RANK, LOCAL_RANK and WORLD_SIZE in each process's environment; transformers' Trainer (through
accelerate) reads the same variables, starts the process group (NCCL on GPUs, gloo on CPUs), shards the data and
all-reduces the gradients. What is left to us: keep one process the writer of files, and give each process its own
device before anything (the in-process KD teacher) is moved to one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from pipeline.errors import ConfigError


@dataclass(frozen=True)
class World:
    """This process's place in a multi-process launch (rank 0 of 1 without a launcher)."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """The process that writes files (adapter, logs, plots, train.json)."""
        return self.rank == 0


def world() -> World:
    """Read the launcher's environment (torchrun and accelerate launch both set these)."""
    env = os.environ
    return World(rank=int(env.get("RANK", 0)), local_rank=int(env.get("LOCAL_RANK", 0)),
                 size=int(env.get("WORLD_SIZE", 1)))


def is_main_process() -> bool:
    """True in a single process, and in rank 0 of a launch."""
    return world().main


def device_for_this_process(cuda: bool) -> str:
    """This process's device, made current: cuda:<local rank> (set before any model is moved), else cpu.

    Without torch.cuda.set_device every process's "cuda" means GPU 0, so N in-process teachers would share it."""
    if not cuda:
        return "cpu"
    import torch

    w = world()
    torch.cuda.set_device(w.local_rank)
    return f"cuda:{w.local_rank}"


def split_batch(batch_size: int, grad_accum: int, size: int | None = None) -> tuple[int, int]:
    """(per-process batch, accumulation steps) whose product over `size` processes is batch_size * grad_accum.

    train.batch_size * train.grad_accum is the effective batch of one optimizer step however many processes run,
    so a recipe keeps its learning-rate/batch balance when it moves from a laptop to N GPUs."""
    size = size or world().size
    if size == 1:
        return batch_size, grad_accum
    if batch_size % size == 0:
        return batch_size // size, grad_accum
    if grad_accum % size == 0:
        return batch_size, grad_accum // size
    raise ConfigError(f"train.batch_size={batch_size} x train.grad_accum={grad_accum} (the effective batch of one "
                      f"optimizer step) cannot be split evenly over {size} processes. Make train.batch_size or "
                      f"train.grad_accum a multiple of {size}.")


def batch_layout(batch_size: int, grad_accum: int) -> dict:
    """What train.json records about the split: processes, per-process batch, accumulation, effective batch."""
    size = world().size
    per_device, accum = split_batch(batch_size, grad_accum, size)
    backend = None
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        backend = dist.get_backend()
    return {"processes": size, "backend": backend, "per_device_batch_size": per_device, "grad_accum": accum,
            "effective_batch_size": per_device * accum * size}
