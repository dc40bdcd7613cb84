"""Teacher backends registered by name; `make_teacher` builds one from the config."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from pipeline.config import ScaleConfig, TeacherConfig
from pipeline.errors import ConfigError
from pipeline.teachers.base import CachedTeacher, Completion, Request, ResponseCache, Teacher
from pipeline.teachers.ledger import Ledger

__all__ = ["Completion", "Ledger", "Request", "ResponseCache", "Teacher", "make_teacher", "register_teacher"]

_BACKENDS: dict[str, Callable[..., CachedTeacher]] = {}


def register_teacher(name: str):
    """Decorator: make a backend available under `teacher.backend: name`."""
    def wrap(factory):
        _BACKENDS[name] = factory
        return factory
    return wrap


@register_teacher("llamacpp")
def _llamacpp(cfg: TeacherConfig, cache: ResponseCache, ledger: Ledger) -> CachedTeacher:
    from pipeline.teachers.llamacpp import LlamaCppTeacher
    return LlamaCppTeacher(cfg.model, cache, ledger, n_ctx=cfg.n_ctx, n_threads=cfg.n_threads, seed=cfg.seed)


@register_teacher("openai")
def _openai(cfg: TeacherConfig, cache: ResponseCache, ledger: Ledger) -> CachedTeacher:
    from pipeline.teachers.openai_compat import OpenAICompatTeacher
    return OpenAICompatTeacher(cfg, cache, ledger)


@register_teacher("openai-batch")
def _openai_batch(cfg: TeacherConfig, cache: ResponseCache, ledger: Ledger) -> CachedTeacher:
    from pipeline.teachers.openai_batch import OpenAIBatchTeacher
    return OpenAIBatchTeacher(cfg, cache, ledger)


@register_teacher("vllm")
def _vllm(cfg: TeacherConfig, cache: ResponseCache, ledger: Ledger) -> CachedTeacher:
    from pipeline.teachers.vllm_inproc import VLLMTeacher
    return VLLMTeacher(cfg, cache, ledger)


def make_teacher(cfg: TeacherConfig, cache_path: Path, ledger: Ledger | None = None,
                 scale: ScaleConfig | None = None) -> CachedTeacher:
    """Build the configured backend over the shared response cache and a (new or given) ledger."""
    factory = _BACKENDS.get(cfg.backend)
    if factory is None:
        raise ConfigError(f"Unknown teacher.backend {cfg.backend!r}. Known backends: {', '.join(sorted(_BACKENDS))}.")
    ledger = ledger or Ledger.for_teacher(cfg)
    if scale is not None and scale.task_runner != "none":
        from pipeline.scale import FanOutTeacher  # workers call make_teacher without scale: no recursion
        return FanOutTeacher(cfg, cache_path, ledger, scale)
    return factory(cfg, ResponseCache(cache_path), ledger)
