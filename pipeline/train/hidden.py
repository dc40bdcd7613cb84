"""Hidden-state matching between a cut student and its teacher (DistilBERT's cosine loss, FitNets' MSE).

A student cut from its teacher keeps the teacher's hidden size, and each kept student layer is a copy of one teacher
layer: its output should reproduce that teacher layer's output. The term is added to any method's loss.

Hand-written: TRL and transformers ship no intermediate-layer distillation loss (TRL's distillation trainers match
output distributions only)."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from pipeline.errors import DistillError

log = logging.getLogger(__name__)


def layer_map(n_teacher: int, n_student: int, cut: list[int] | str | None) -> list[int]:
    """Student layer i -> the teacher layer it was copied from: the teacher's layers minus the cut, in order."""
    from pipeline.models import parse_layer_spec

    dropped = set(parse_layer_spec(cut, n_teacher)) if cut is not None else set()
    kept = [i for i in range(n_teacher) if i not in dropped]
    if len(kept) != n_student:
        raise DistillError(f"The hidden-state layer map needs the cut the student was made with: the teacher has "
                           f"{n_teacher} layers, the cut {cut!r} keeps {len(kept)}, but the student has {n_student}. "
                           f"Set student.drop_layers to the cut used, or train.hidden_loss_weight=0.")
    return kept


def hidden_state_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], mask: torch.Tensor | None,
                      kind: str) -> torch.Tensor:
    """Mean over layer pairs of the per-token distance, averaged over the tokens where mask is 1.

    student/teacher: one [B, S, H] tensor per mapped pair; cosine = 1 - cos(s, t), mse = mean over H of (s - t)^2."""
    if mask is None:
        mask = torch.ones(student[0].shape[:2], device=student[0].device)
    m = mask.to(student[0].dtype)
    terms = []
    for s, t in zip(student, teacher, strict=True):
        s, t = s.float(), t.float()
        d = 1 - F.cosine_similarity(s, t, dim=-1) if kind == "cosine" else (s - t).pow(2).mean(-1)
        terms.append((d * m).sum() / m.sum().clamp(min=1))
    return torch.stack(terms).mean()


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder's layer list, through any peft/DDP wrapping."""
    for name, module in model.named_modules():
        if name.endswith("layers") and isinstance(module, torch.nn.ModuleList):
            return module
    raise DistillError(f"Cannot find the decoder layers of {type(model).__name__} for the hidden-state term; "
                       f"set train.hidden_loss_weight=0.")


class _Capture:
    """Forward hooks that keep each decoder layer's output of one forward pass."""

    def __init__(self, layers):
        self.outputs: list[torch.Tensor] = []
        self.handles = [layer.register_forward_hook(self._keep) for layer in layers]

    def _keep(self, module, args, output):
        self.outputs.append(output[0] if isinstance(output, tuple) else output)

    def close(self):
        for h in self.handles:
            h.remove()


def _ids_and_mask(inputs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The token ids the student just saw: SFT-style batches carry input_ids; TRL's DistillationTrainer carries the
    prompt and the sampled completion separately, concatenated in its forward."""
    if "input_ids" in inputs:
        return inputs["input_ids"], inputs.get("attention_mask")
    return (torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1))


class HiddenStateMixin:
    """Adds weight * hidden_state_loss to the base trainer's loss, on the same input ids the student saw."""

    def hidden_setup(self, teacher, layer_map: list[int], weight: float, kind: str) -> None:
        self.hidden_teacher, self.hidden_map, self.hidden_weight, self.hidden_kind = teacher, layer_map, weight, kind
        self.last_hidden_loss = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        layers = decoder_layers(model)
        capture = _Capture(layers)
        try:
            result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                          num_items_in_batch=num_items_in_batch)
        finally:
            capture.close()
        student = capture.outputs[:len(layers)]  # the first forward pass is the student's on this batch
        input_ids, mask = _ids_and_mask(inputs)
        teacher_capture = _Capture(decoder_layers(self.hidden_teacher))
        try:
            with torch.no_grad():
                self.hidden_teacher(input_ids=input_ids, attention_mask=mask, use_cache=False)
        finally:
            teacher_capture.close()
        teacher = [teacher_capture.outputs[i] for i in self.hidden_map]
        term = hidden_state_loss(student, teacher, mask, self.hidden_kind)
        if model.training:
            self.last_hidden_loss = round(term.item(), 5)
        metrics = getattr(self, "_metrics", None)
        if isinstance(metrics, dict) and "train" in metrics:  # TRL's per-step metrics: logged beside the loss
            metrics["train" if model.training else "eval"]["hidden_loss"].append(term.item())
        if return_outputs:
            loss, outputs = result
            return loss + self.hidden_weight * term, outputs
        return result + self.hidden_weight * term
