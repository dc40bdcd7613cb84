"""LoRA SFT through TRL's SFTTrainer, with the checks that catch silent failures before training starts."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import TrainConfig
from pipeline.errors import DistillError
from pipeline.records import Record

log = logging.getLogger(__name__)


def to_prompt_completion(records: list[Record]) -> list[dict[str, Any]]:
    """Records -> conversational prompt/completion rows (TRL then computes loss on the completion only)."""
    from pipeline.generate.prompts import render

    return [{"prompt": [{"role": "user", "content": render("response", instruction=r.instruction, input=r.input)}],
             "completion": [{"role": "assistant", "content": r.output}]} for r in records]


@dataclass
class PreflightReport:
    examples: int
    truncated: int
    max_tokens: int
    mean_tokens: float
    end_of_turn: str
    mask_ok: bool
    est_memory_gb: float

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def end_of_turn_token(tokenizer) -> str:
    """The token that closes an assistant turn in the student's chat template."""
    probe = tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": "MARK"}],
                                          tokenize=False)
    tail = probe.split("MARK", 1)[1]
    for tok in tokenizer.all_special_tokens:
        if tok and tail.lstrip().startswith(tok):
            return tok
    return tokenizer.eos_token


def check_loss_mask(tokenizer, input_ids: list[int], labels: list[int], completion: str, eot: str) -> bool:
    """True when the trained tokens are exactly the response plus the end-of-turn token (and what follows it)."""
    trained = [t for t, l in zip(input_ids, labels) if l != -100]
    text = tokenizer.decode(trained)
    first_trained = next(i for i, l in enumerate(labels) if l != -100) if trained else len(labels)
    prompt_text = tokenizer.decode(input_ids[:first_trained])
    return bool(trained) and completion.strip() in text and eot in text and completion.strip() not in prompt_text


def estimate_memory_gb(n_params: int, trainable: int, batch: int, seq: int, hidden: int, layers: int,
                       bytes_per_param: int) -> float:
    """Rough peak: weights + trainable grads/Adam states + activations (about 34·h bytes per token per layer)."""
    weights = n_params * bytes_per_param
    optim = trainable * (4 + 4 + 4 + 4)
    activations = batch * seq * hidden * layers * 34 * (bytes_per_param / 2)
    return (weights + optim + activations) / 2**30


def train_lora(student_dir: Path, records: list[Record], cfg: TrainConfig, out_dir: Path,
               resume: bool = True) -> dict[str, Any]:
    """Fine-tune a LoRA adapter on the accepted records; returns the training summary."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    if not records:
        raise DistillError("No accepted records to train on: every generated example was rejected. See the rejects "
                           "in the dataset folder; raise generate.target_instructions or loosen curate filters.")
    out_dir = Path(out_dir)
    cuda = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(str(student_dir))
    if not tokenizer.chat_template:
        raise DistillError(f"Student {student_dir} has no chat template. Declare one (tokenizer.chat_template in its "
                           f"tokenizer_config.json) so prompts and the end-of-turn token are defined, not guessed.")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    rows = to_prompt_completion(records)
    eot = end_of_turn_token(tokenizer)

    lengths = [len(tokenizer.apply_chat_template(r["prompt"] + r["completion"], tokenize=True, return_dict=False)) for r in rows]
    truncated = sum(1 for n in lengths if n > cfg.max_length)
    if truncated:
        log.warning("%d of %d examples exceed train.max_length=%d tokens and will be truncated (longest %d).",
                    truncated, len(rows), cfg.max_length, max(lengths))

    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(student_dir), dtype=dtype)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.target_modules, task_type="CAUSAL_LM")
    args = SFTConfig(
        output_dir=str(out_dir / "checkpoints"),
        max_length=cfg.max_length,
        completion_only_loss=True,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        logging_steps=1,
        save_strategy="steps",
        save_steps=max(1, math.ceil(len(rows) / cfg.batch_size / cfg.grad_accum)),
        save_total_limit=1,
        # Small students do not need it, and it slows CPU training (TRL turns it on by default).
        gradient_checkpointing=False,
        bf16=dtype == torch.bfloat16,
        use_cpu=not cuda,
        seed=cfg.seed,
        report_to="none",
        disable_tqdm=False,
        dataset_num_proc=None,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=lora)

    sample = trainer.train_dataset[0]
    mask_ok = check_loss_mask(tokenizer, sample["input_ids"], sample["labels"], records[0].output, eot)
    if not mask_ok:
        raise DistillError(f"Loss mask check failed on the first example: the trained tokens are not the response plus "
                           f"{eot!r}. The student's chat template renders prompt and completion inconsistently; fix "
                           f"the template or the dataset format before training.")
    n_params = sum(p.numel() for p in trainer.model.parameters())
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    cfgm = model.config
    preflight = PreflightReport(examples=len(rows), truncated=truncated, max_tokens=max(lengths),
                                mean_tokens=sum(lengths) / len(lengths), end_of_turn=eot, mask_ok=mask_ok,
                                est_memory_gb=round(estimate_memory_gb(n_params, trainable, cfg.batch_size, cfg.max_length,
                                                                       cfgm.hidden_size, cfgm.num_hidden_layers,
                                                                       2 if dtype != torch.float32 else 4), 2))
    log.info("Preflight: %s", preflight.as_dict())

    checkpoints = sorted((out_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    result = trainer.train(resume_from_checkpoint=str(checkpoints[-1]) if resume and checkpoints else None)
    adapter_dir = out_dir / "adapter"
    trainer.model.save_pretrained(str(adapter_dir))
    tokenizer.save_pretrained(str(adapter_dir))
    history = [h for h in trainer.state.log_history if "loss" in h]
    summary = {"student": str(student_dir), "adapter": str(adapter_dir), "examples": len(rows),
               "steps": trainer.state.global_step, "train_loss": result.training_loss,
               "first_loss": history[0]["loss"] if history else None, "last_loss": history[-1]["loss"] if history else None,
               "params": n_params, "trainable_params": trainable, "device": "cuda" if cuda else "cpu",
               "dtype": str(dtype).replace("torch.", ""), "preflight": preflight.as_dict(),
               "runtime_s": result.metrics.get("train_runtime"),
               "tokens_per_s": None}
    (out_dir / "train_log.json").write_text(json.dumps(trainer.state.log_history, indent=2))
    plot_curves(trainer.state.log_history, out_dir / "training_curves.png")
    return summary


def plot_curves(log_history: list[dict[str, Any]], path: Path) -> None:
    """Loss and learning rate per step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in log_history if "loss" in h]
    if not steps:
        return
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ax[0].plot(steps, [h["loss"] for h in log_history if "loss" in h], marker=".")
    ax[0].set(title="training loss", xlabel="step")
    ax[1].plot(steps, [h.get("learning_rate", 0) for h in log_history if "loss" in h], color="tab:orange")
    ax[1].set(title="learning rate", xlabel="step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
