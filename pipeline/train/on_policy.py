"""Method on-policy: the student answers the curated instructions itself and the teacher scores every token of its
answers under a generalized JSD (GKD, Agarwal et al. 2024; beta 0 = forward KL, 1 = reverse KL).

train.lmbda = 1 (default) runs TRL's DistillationTrainer (fully on-policy; vLLM sampling on CUDA when installed).
train.lmbda < 1 runs TRL's experimental GKDTrainer, which samples from the student for that share of batches and
trains on the teacher's recorded answers for the rest (GKD's on/off-policy mix; DistillationTrainer has none)."""

from __future__ import annotations

import importlib.util
import logging
import warnings

from pipeline.config import TrainConfig
from pipeline.train.prepare import Prepared, attach_hidden, common_args, preflight, trainer_class

log = logging.getLogger(__name__)

PACKING_OK = False  # prompts only; completions are generated per batch


def needs_teacher(cfg: TrainConfig) -> bool:
    return True


def sampler(cuda: bool) -> str:
    """How the student's completions are sampled: vLLM (TRL's use_vllm, colocated) on CUDA when installed."""
    return "vllm" if cuda and importlib.util.find_spec("vllm") is not None else "generate"


def build(prep: Prepared):
    from datasets import Dataset

    cfg = prep.cfg
    # TRL pads prompts on the left for generation.
    prep.tokenizer.padding_side = "left"
    how = sampler(prep.cuda)
    if cfg.lmbda >= 1.0:
        from trl import DistillationConfig, DistillationTrainer

        args = DistillationConfig(**common_args(prep), beta=cfg.beta, temperature=cfg.temperature,
                                  max_completion_length=cfg.max_completion_length, use_vllm=how == "vllm",
                                  **({"vllm_mode": "colocate"} if how == "vllm" else {}))
        rows = [{"prompt": r["prompt"]} for r in prep.rows]
        cls = trainer_class(prep, DistillationTrainer)
        trainer = cls(model=prep.model, teacher_model=prep.teacher, args=args, train_dataset=Dataset.from_list(rows),
                      processing_class=prep.tokenizer, peft_config=prep.lora)
        trainer_name = "trl.DistillationTrainer"
    else:
        with warnings.catch_warnings():  # TRL warns on every trl.experimental import
            warnings.simplefilter("ignore")
            from trl.experimental.gkd import GKDConfig, GKDTrainer

        how = "generate"  # GKDTrainer samples with model.generate only
        args = GKDConfig(**common_args(prep), beta=cfg.beta, temperature=cfg.temperature, lmbda=cfg.lmbda,
                         max_new_tokens=cfg.max_completion_length, max_length=cfg.max_length)
        # GKD's collator renders "messages" itself: prompt turn + the teacher's recorded answer (the off-policy part).
        rows = [{"messages": r["prompt"] + r["completion"]} for r in prep.rows]
        cls = trainer_class(prep, GKDTrainer)
        trainer = cls(model=prep.model, teacher_model=prep.teacher, args=args, train_dataset=Dataset.from_list(rows),
                      processing_class=prep.tokenizer, peft_config=prep.lora)
        trainer_name = "trl.experimental.gkd.GKDTrainer"
    attach_hidden(prep, trainer)
    prep.extra["on_policy"] = {"trainer": trainer_name, "sampler": how, "beta": cfg.beta,
                               "temperature": cfg.temperature, "max_completion_length": cfg.max_completion_length,
                               "lmbda": cfg.lmbda}
    log.info("on-policy distillation: %s, completions sampled with %s, beta %g, up to %d tokens",
             trainer_name, how, cfg.beta, cfg.max_completion_length)
    # No loss mask to check: the trainer masks the prompt and scores the student's own completion tokens.
    longest_prompt = max(len(prep.tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True,
                                                                 tokenize=True, return_dict=False)) for r in prep.rows)
    return trainer, preflight(prep, trainer, True, seq_len=longest_prompt + cfg.max_completion_length)
