"""Method kd: logit distillation (Hinton et al. 2015), alpha * CE + (1 - alpha) * T^2 * KL(teacher_T || student_T),
on the teacher's text through a small SFTTrainer subclass.

The teacher's distribution comes from an in-process HF teacher (the full vocabulary) or from the top-k logprobs
stored with each record by the generation stage (a KL over the teacher's top-k tokens, renormalised)."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from trl import SFTTrainer

with warnings.catch_warnings():  # TRL warns on every trl.experimental import; GKD's loss is what we want from it
    warnings.simplefilter("ignore")
    from trl.experimental.gkd import GKDTrainer

from pipeline.config import TrainConfig
from pipeline.errors import DistillError
from pipeline.records import Record
from pipeline.train.prepare import (Prepared, attach_hidden, mask_after_end_of_turn, preflight, sft_args,
                                    trainer_class)

log = logging.getLogger(__name__)

generalized_jsd_loss = GKDTrainer.generalized_jsd_loss


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
    if teacher_logits is not None:
        # TRL's generalized JSD at beta = 0 is the forward KL(teacher_T || student_T), element by element.
        kl = generalized_jsd_loss(student_logits.float(), teacher_logits.float(), beta=0.0, temperature=t,
                                  reduction="none").sum(-1)
        valid = torch.ones_like(ce, dtype=torch.bool)
    else:
        # Stored top-k logprobs: TRL has no loss over a teacher's top-k only, so this KL is written here.
        ids, logprobs, valid = teacher_topk
        log_q = F.log_softmax(student_logits.float() / t, dim=-1)
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


# KD needs each example whole and padded (teacher forward, top-k lookup by token ids): no packing.
PACKING_OK = False


def needs_teacher(cfg: TrainConfig) -> bool:
    """An in-process teacher unless the teacher's distributions come stored with the records (or alpha = 1)."""
    return cfg.kd_alpha < 1.0 and cfg.kd_source == "model"


def build(prep: Prepared):
    from datasets import Dataset

    cfg = prep.cfg
    cls = trainer_class(prep, KDTrainer)
    trainer = cls(model=prep.model, args=sft_args(prep), train_dataset=Dataset.from_list(prep.rows),
                  processing_class=prep.tokenizer, peft_config=prep.lora, kd_alpha=cfg.kd_alpha,
                  kd_temperature=cfg.kd_temperature, teacher=prep.teacher if needs_teacher(cfg) else None)
    attach_hidden(prep, trainer)
    mask_ok = mask_after_end_of_turn(prep, trainer)
    coverage = None
    if cfg.kd_alpha < 1.0 and cfg.kd_source == "logprobs":
        trainer.topk_lookup, coverage = topk_lookup(prep.tokenizer, trainer.train_dataset, prep.records)
    prep.extra["kd"] = {"alpha": cfg.kd_alpha, "temperature": cfg.kd_temperature, "source": cfg.kd_source,
                        "teacher": str(prep.teacher_dir) if trainer.teacher is not None else None,
                        "coverage": coverage,
                        # The dict is filled during training: rows of each batch matched to stored top-k.
                        "rows_with_topk": trainer.topk_rows if trainer.topk_lookup is not None else None}
    return trainer, preflight(prep, trainer, mask_ok)


def topk_lookup(tokenizer, dataset, records: list[Record]) -> tuple[dict[tuple, tuple], dict]:
    """Token ids of each example -> (positions, teacher top-k ids, logprobs), from the records' stored logprobs."""
    stored = [getattr(r, "teacher_logprobs", None) for r in records]
    if not any(stored):
        raise DistillError("train.kd_source=logprobs but no record carries teacher top-k logprobs. Generate with "
                           "logprobs captured, or use train.kd_source=model (an in-process teacher).")
    index = piece_index(tokenizer)
    k = max((len(e.get("top") or {}) for lp in stored if lp for e in lp), default=1)
    lookup, unknown, seen, aligned, trained = {}, 0, 0, 0, 0
    for ex in dataset:
        pos, ids, lps, unk = align_topk(tokenizer, ex["input_ids"], ex["labels"], stored[ex["record_index"]], index, k)
        unknown += unk
        seen += sum(len(e.get("top") or {}) for e in (stored[ex["record_index"]] or [])[:len(pos) + 1])
        aligned += len(pos)
        trained += sum(1 for lab in ex["labels"] if lab != -100)
        if pos:
            lookup[tuple(ex["input_ids"])] = (torch.tensor(pos), torch.tensor(ids), torch.tensor(lps))
    if seen and unknown > 0.05 * seen:
        raise DistillError(f"Logit distillation needs teacher and student to share one vocabulary, and they differ: "
                           f"{unknown} of {seen} stored teacher top-k tokens are not in the student's vocabulary. "
                           f"Use train.method=sft, or a student from the teacher's family.")
    log.info("KD from stored logprobs: teacher top-%d on %d of %d trained tokens (the rest train on CE only).",
             k, aligned, trained)
    return lookup, {"top_k": k, "tokens_with_teacher": aligned, "trained_tokens": trained}
