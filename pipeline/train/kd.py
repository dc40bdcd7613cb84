"""Logit distillation (Hinton et al. 2015): alpha * CE + (1 - alpha) * T^2 * KL(teacher_T || student_T).

The teacher's distribution comes from an in-process HF teacher (the full vocabulary) or from the top-k logprobs
stored with each record by the generation stage (a KL over the teacher's top-k tokens, renormalised)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from trl import SFTTrainer

from pipeline.errors import DistillError

log = logging.getLogger(__name__)


def hinton_loss(student_logits: torch.Tensor, labels: torch.Tensor, alpha: float, temperature: float,
                teacher_logits: torch.Tensor | None = None, teacher_topk: tuple | None = None) -> torch.Tensor:
    """Per-token KD loss over N tokens: student_logits [N, V], labels [N]; teacher as logits [N, V] or top-k.

    teacher_topk is (ids [N, k], logprobs [N, k], valid [N]); tokens without teacher information get plain CE.
    The T^2 factor keeps the gradient scale of the soft term independent of T (Hinton et al., section 2).
    """
    ce = F.cross_entropy(student_logits.float(), labels, reduction="none")
    if alpha >= 1.0 or (teacher_logits is None and teacher_topk is None):
        return ce
    t = temperature
    log_q = F.log_softmax(student_logits.float() / t, dim=-1)
    if teacher_logits is not None:
        log_p = F.log_softmax(teacher_logits.float() / t, dim=-1)
        kl = _kl_terms(log_p, log_q).sum(-1)
        valid = torch.ones_like(ce, dtype=torch.bool)
    else:
        ids, logprobs, valid = teacher_topk
        # The stored logprobs are at T=1; softmax(lp / T) over the k tokens is the tempered teacher on its top-k.
        log_p = F.log_softmax(logprobs.float() / t, dim=-1)
        kl = _kl_terms(log_p, log_q.gather(-1, ids)).sum(-1)
    soft = alpha * ce + (1 - alpha) * t * t * kl
    return torch.where(valid, soft, ce)


def _kl_terms(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """p * (log p - log q), with 0 where p is 0 (padded top-k slots hold -inf, and 0 * inf would be NaN)."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))


def check_same_vocab(teacher_tok, student_tok, teacher_vocab_size: int, student_vocab_size: int,
                     teacher_name: str, student_name: str) -> None:
    """Refuse logit distillation between models whose vocabularies differ (the logits would not line up)."""
    tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
    differ = len(set(tv.items()) ^ set(sv.items()))
    if differ or teacher_vocab_size != student_vocab_size:
        raise DistillError(
            f"Logit distillation needs teacher and student to share one vocabulary, and they differ: teacher "
            f"{teacher_name} has {len(tv)} tokens (logits {teacher_vocab_size}), student {student_name} has {len(sv)} "
            f"(logits {student_vocab_size}); {differ} token->id entries differ. Use train.method=sft, or a teacher "
            f"from the student's family (train.kd_teacher).")


def load_teacher(teacher_dir: Path | str, student_tok, student_model, dtype, device: str):
    """The in-process teacher, frozen and in eval mode, after checking it shares the student's vocabulary."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher_tok = AutoTokenizer.from_pretrained(str(teacher_dir))
    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=dtype)
    check_same_vocab(teacher_tok, student_tok, teacher.get_output_embeddings().weight.shape[0],
                     student_model.get_output_embeddings().weight.shape[0], str(teacher_dir),
                     str(getattr(student_model, "name_or_path", "the student")))
    teacher.requires_grad_(False)
    return teacher.to(device).eval()


def piece_index(tokenizer) -> dict[str, int]:
    """Decoded text piece -> token id, to map a teacher's top-k token strings onto the student's ids."""
    index: dict[str, int] = {}
    for tid in sorted(tokenizer.get_vocab().values()):
        index.setdefault(tokenizer.decode([tid]), tid)
    return index


def align_topk(tokenizer, input_ids: list[int], labels: list[int], logprobs: list[dict[str, Any]] | None,
               index: dict[str, int], k: int) -> tuple[list[int], list[list[int]], list[list[float]], int]:
    """Teacher top-k per trained position, matched token by token to the student's rendering of the response.

    Returns (positions, top ids, top logprobs, pieces the student vocabulary lacks). Alignment stops at the first
    token whose text differs (the student tokenised the response differently); the rest trains on CE only.
    """
    positions, ids, lps, unknown = [], [], [], 0
    trained = [i for i, lab in enumerate(labels) if lab != -100]
    for pos, entry in zip(trained, logprobs or []):
        if tokenizer.decode([input_ids[pos]]) != entry.get("token"):
            break
        top = sorted(((index.get(tok), lp) for tok, lp in (entry.get("top") or {}).items()), key=lambda x: -x[1])
        unknown += sum(1 for tid, _ in top if tid is None)
        top = [(tid, lp) for tid, lp in top if tid is not None][:k]
        if not top:
            continue
        top += [(top[0][0], float("-inf"))] * (k - len(top))  # pad: a -inf logprob has zero teacher mass
        positions.append(pos)
        ids.append([t for t, _ in top])
        lps.append([lp for _, lp in top])
    return positions, ids, lps, unknown


class KDTrainer(SFTTrainer):
    """SFTTrainer whose loss is the Hinton KD loss on the trained (response + end-of-turn) tokens."""

    def __init__(self, *args, kd_alpha: float, kd_temperature: float, teacher=None,
                 topk_lookup: dict[tuple, tuple] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.kd_alpha, self.kd_temperature = kd_alpha, kd_temperature
        self.teacher, self.topk_lookup = teacher, topk_lookup
        self.kd_tokens = 0
        self.topk_rows = {"found": 0, "missing": 0}  # batch rows matched to stored teacher top-k (reported)

    def _topk_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        b, s = input_ids.shape
        k = next(iter(self.topk_lookup.values()))[1].shape[-1] if self.topk_lookup else 1
        ids = torch.zeros(b, s, k, dtype=torch.long, device=input_ids.device)
        lps = torch.zeros(b, s, k, device=input_ids.device)
        valid = torch.zeros(b, s, dtype=torch.bool, device=input_ids.device)
        for row in range(b):
            key = tuple(input_ids[row][attention_mask[row].bool()].tolist())
            hit = self.topk_lookup.get(key)
            self.topk_rows["missing" if hit is None else "found"] += 1
            if hit is None:
                continue
            pos, top_ids, top_lps = hit
            ids[row, pos], lps[row, pos], valid[row, pos] = top_ids.to(ids.device), top_lps.to(lps.device), True
        # Position p's distribution is over the token at p, predicted by the logits at p - 1.
        return ids[:, 1:], lps[:, 1:], valid[:, 1:]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        fwd = {k: v for k, v in inputs.items() if k != "labels"}
        outputs = model(**fwd, use_cache=False)
        target = labels[:, 1:]
        mask = target != -100
        logits = outputs.logits[:, :-1][mask]
        teacher_logits = teacher_topk = None
        if self.kd_alpha < 1.0 and self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(**fwd, use_cache=False).logits[:, :-1][mask]
        elif self.kd_alpha < 1.0 and self.topk_lookup is not None:
            ids, lps, valid = self._topk_batch(inputs["input_ids"], inputs["attention_mask"])
            teacher_topk = (ids[mask], lps[mask], valid[mask])
        per_token = hinton_loss(logits, target[mask], self.kd_alpha, self.kd_temperature, teacher_logits, teacher_topk)
        # Like TRL's own loss: a sum over the trained tokens divided by their count over the accumulated batch.
        denom = num_items_in_batch if num_items_in_batch is not None else mask.sum()
        loss = per_token.sum() / torch.as_tensor(denom, device=per_token.device).clamp(min=1)
        if model.training:
            # Keep TRL's token counter going (it feeds num_tokens in the logs, from which tokens/s is computed).
            self.kd_tokens += int(inputs["attention_mask"].sum())
            if hasattr(self, "_metrics"):
                self._metrics["train"]["num_tokens"] = [self.kd_tokens]
        return (loss, outputs) if return_outputs else loss
