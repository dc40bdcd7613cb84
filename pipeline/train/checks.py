"""Checks before training starts: truncation, the loss mask, memory. Each says what it found, with numbers."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pipeline.errors import DistillError

log = logging.getLogger(__name__)


@dataclass
class PreflightReport:
    examples: int
    truncated: int
    truncated_responses_lost: int  # examples whose whole response falls beyond max_length (TRL drops them)
    max_tokens: int
    mean_tokens: float
    end_of_turn: str
    mask_ok: bool
    est_memory_gb: float
    available_memory_gb: float | None

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


def token_lengths(tokenizer, rows: list[dict[str, Any]]) -> tuple[list[int], list[int]]:
    """(prompt length, full length) in tokens of each prompt/completion row, rendered with the chat template."""
    prompts, full = [], []
    for r in rows:
        prompts.append(len(tokenizer.apply_chat_template(r["prompt"], tokenize=True, add_generation_prompt=True,
                                                         return_dict=False)))
        full.append(len(tokenizer.apply_chat_template(r["prompt"] + r["completion"], tokenize=True, return_dict=False)))
    return prompts, full


def truncation_counts(tokenizer, rows: list[dict[str, Any]], max_length: int) -> dict[str, int]:
    """How many rows exceed max_length, and how many lose their whole response to truncation."""
    prompts, full = token_lengths(tokenizer, rows)
    truncated = sum(1 for n in full if n > max_length)
    lost = sum(1 for p in prompts if p >= max_length)
    if truncated:
        log.warning("%d of %d examples exceed train.max_length=%d tokens and will be truncated (longest %d tokens); "
                    "%d lose their whole response. Raise train.max_length to keep them whole.",
                    truncated, len(rows), max_length, max(full), lost)
    return {"truncated": truncated, "lost": lost, "max_tokens": max(full, default=0),
            "mean_tokens": sum(full) / max(1, len(full))}


def trim_after_end_of_turn(labels: list[int], eot_id: int) -> list[int]:
    """Mask what the chat template adds after the end-of-turn token (SmolLM2: a newline) so it is not trained.

    Works per labelled run, so packed rows (several examples in one row) keep each example's response."""
    out, seen = list(labels), False
    for i, lab in enumerate(out):
        if lab == -100:
            seen = False
        elif seen:
            out[i] = -100
        elif lab == eot_id:
            seen = True
    return out


def check_loss_mask(tokenizer, input_ids: list[int], labels: list[int], completion: str, eot: str) -> bool:
    """True when the trained tokens are exactly the response tokens followed by the end-of-turn token."""
    trained = [t for t, lab in zip(input_ids, labels) if lab != -100]
    if not trained:
        return False
    eot_id = tokenizer.convert_tokens_to_ids(eot)
    first = next(i for i, lab in enumerate(labels) if lab != -100)
    contiguous = all(lab != -100 for lab in labels[first:first + len(trained)])
    response = tokenizer.decode(trained[:-1])
    return contiguous and trained[-1] == eot_id and response.strip() == completion.strip()


def require_mask_ok(ok: bool, eot: str) -> None:
    """Stop before training when the rendered example's loss mask is wrong."""
    if not ok:
        raise DistillError(f"Loss mask check failed on the first example: the trained tokens are not exactly the "
                           f"response followed by {eot!r}. The student's chat template renders prompt and completion "
                           f"inconsistently; fix the template (student.chat_template) or the data before training.")


def estimate_memory_gb(n_params: int, trainable: int, batch: int, seq: int, hidden: int, layers: int,
                       bytes_per_param: int, vocab: int = 0, extra_params: int = 0) -> float:
    """Rough peak: weights + grads and Adam states of trainable weights + activations + logits (+ a teacher)."""
    weights = (n_params + extra_params) * bytes_per_param
    optim = trainable * (4 + 4 + 4 + 4)  # fp32 grad, two Adam moments, master copy
    activations = batch * seq * hidden * layers * 34 * (bytes_per_param / 2)
    logits = batch * seq * vocab * 4 * (3 if extra_params else 2)  # fp32 logits, log-softmax (+ the teacher's)
    return (weights + optim + activations + logits) / 2**30


def available_memory_gb(cuda: bool) -> float:
    """Free GPU memory on CUDA, else available RAM."""
    if cuda:
        import torch

        free, _ = torch.cuda.mem_get_info()
        return free / 2**30
    import psutil

    return psutil.virtual_memory().available / 2**30


def check_memory(estimate_gb: float, available_gb: float, batch_size: int, where: str) -> None:
    """Warn (with the numbers and the fix) when training likely does not fit."""
    if estimate_gb > 0.9 * available_gb:
        log.warning("Training needs about %.1f GB at train.batch_size=%d but only %.1f GB of %s is free: lower "
                    "train.batch_size (and raise train.grad_accum), or train.max_length.",
                    estimate_gb, batch_size, available_gb, where)
