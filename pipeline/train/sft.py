"""Method sft: cross-entropy on the teacher's text through TRL's SFTTrainer (sequence-level distillation)."""

from __future__ import annotations

from pipeline.config import TrainConfig
from pipeline.train.prepare import (Prepared, attach_hidden, mask_after_end_of_turn, plot_curves, preflight,
                                    sft_args, to_prompt_completion, tokens_per_second, trainer_class)

# Kept importable from here: older callers and tests use these names.
__all__ = ["build", "needs_teacher", "train_lora", "build_trainer", "to_prompt_completion", "plot_curves",
           "tokens_per_second"]

PACKING_OK = True


def needs_teacher(cfg: TrainConfig) -> bool:
    return False


def build(prep: Prepared):
    """SFTTrainer on prompt/completion rows, loss on response + end-of-turn only."""
    from datasets import Dataset
    from trl import SFTTrainer

    cls = trainer_class(prep, SFTTrainer)
    trainer = cls(model=prep.model, args=sft_args(prep), train_dataset=Dataset.from_list(prep.rows),
                  processing_class=prep.tokenizer, peft_config=prep.lora)
    attach_hidden(prep, trainer)
    return trainer, preflight(prep, trainer, mask_after_end_of_turn(prep, trainer))


def train_lora(*args, **kwargs):
    """The family's entry under its old name (see pipeline.train.train)."""
    from pipeline.train import train

    return train(*args, **kwargs)


def build_trainer(*args, **kwargs):
    from pipeline.train import build_trainer as build_any

    return build_any(*args, **kwargs)
