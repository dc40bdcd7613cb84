"""The training family: one entry, `train()`, picks the method by name from METHODS.

Shared preparation (tokenizer, student, teacher, rows, LoRA placement, checks, saving) lives in prepare.py; each
method is one small module with `needs_teacher(cfg)`, `PACKING_OK` and `build(prep) -> (trainer, preflight)`.
The hidden-state term (hidden.py) combines with any of them."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

# Method name (train.method) -> module. Plain strings: importing a method pulls in torch and TRL.
METHODS = {"sft": "pipeline.train.sft", "kd": "pipeline.train.kd", "on-policy": "pipeline.train.on_policy"}


def method_module(name: str):
    """The module implementing a method; an unknown name lists the known ones."""
    from pipeline.errors import ConfigError

    if name not in METHODS:
        raise ConfigError(f"Unknown train.method {name!r}. Known methods: {', '.join(METHODS)}.")
    return importlib.import_module(METHODS[name])


def default_teacher(cfg, student=None) -> Path | None:
    """The in-process teacher when the method (or the hidden-state term) needs one: train.kd_teacher, else the GGUF
    the student was cut from, dequantized whole."""
    from pipeline.models import resolve_student

    if not (method_module(cfg.method).needs_teacher(cfg) or cfg.hidden_loss_weight > 0):
        return None
    cut_from = student.cut_from if student is not None else "smollm2-135m-instruct"
    return resolve_student(cfg.kd_teacher or "embedded-cut", [], cut_from)


def _build(student_dir, records, cfg, out_dir, teacher_dir=None, chat_template=None, cut=None):
    from pipeline.train.prepare import prepare

    method = method_module(cfg.method)
    prep = prepare(Path(student_dir), records, cfg, Path(out_dir), needs_teacher=method.needs_teacher(cfg),
                   packing_ok=method.PACKING_OK, teacher_dir=teacher_dir, chat_template=chat_template, cut=cut)
    trainer, report = method.build(prep)
    return prep, trainer, report


def build_trainer(student_dir, records, cfg, out_dir, teacher_dir=None, chat_template=None, cut=None):
    """Everything up to trainer.train(): returns (trainer, preflight report)."""
    _, trainer, report = _build(student_dir, records, cfg, out_dir, teacher_dir, chat_template, cut)
    return trainer, report


def train(student_dir, records, cfg, out_dir, resume: bool = True, teacher_dir=None, chat_template=None,
          student=None, cut=None) -> dict[str, Any]:
    """Train the student on the accepted records with cfg.method; returns the summary written to train.json.

    `student` (a StudentConfig) supplies the chat template, the cut (for the hidden-state layer map) and the GGUF the
    default teacher is dequantized from; explicit teacher_dir / chat_template / cut win over it."""
    from pipeline.train.prepare import fit_and_save

    if student is not None:
        chat_template = chat_template or student.chat_template
        if cut is None and student.source == "embedded-cut":
            cut = student.drop_layers
    if teacher_dir is None:
        teacher_dir = default_teacher(cfg, student)
    prep, trainer, report = _build(student_dir, records, cfg, out_dir, teacher_dir, chat_template, cut)
    return fit_and_save(prep, trainer, report, resume)


# The name older callers use.
train_lora = train
