"""Embedded teacher: a GGUF model run in-process by llama.cpp (the CPU default, no server, no key)."""

from __future__ import annotations

import os
import time
from typing import Callable

from pipeline.models import resolve_gguf
from pipeline.teachers.base import CachedTeacher, Completion, Request, ResponseCache, request_seed
from pipeline.teachers.ledger import Ledger


def default_threads() -> int:
    # One thread per free core: oversubscribed llama.cpp threads collapse throughput (measured: 80 tok/s with 2 threads on 2 cores, under 1 tok/s oversubscribed).
    return max(1, len(os.sched_getaffinity(0)))


class LlamaCppTeacher(CachedTeacher):
    backend = "llamacpp"

    def __init__(self, model: str, cache: ResponseCache, ledger: Ledger, n_ctx: int = 2048,
                 n_threads: int | None = None, seed: int = 0, **_: object):
        super().__init__(model, cache, ledger)
        self.model_path = resolve_gguf(model)
        self.n_ctx = n_ctx
        self.n_threads = n_threads or default_threads()
        self.seed = seed
        self._llm = None
        self._llm_logits = None

    def _load(self, logits_all: bool):
        from llama_cpp import Llama

        attr = "_llm_logits" if logits_all else "_llm"
        if getattr(self, attr) is None:
            setattr(self, attr, Llama(model_path=str(self.model_path), n_ctx=self.n_ctx, n_threads=self.n_threads,
                                      logits_all=logits_all, verbose=False, seed=self.seed))
        return getattr(self, attr)

    def _call_batch(self, items, store: Callable[[int, Completion], None]) -> None:
        # llama.cpp in-process runs one sequence at a time; the cache makes every call count once.
        for i, req, key in items:
            if not self._admit(req, key):
                return
            store(i, self._call_one(req, key))

    def _call_one(self, req: Request, key: str) -> Completion:
        llm = self._load(logits_all=req.logprobs > 0)
        kwargs = dict(max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p,
                      stop=req.stop or None, seed=request_seed(self.seed, key))
        start = time.perf_counter()
        try:
            if req.kind == "chat":
                out = llm.create_chat_completion(messages=req.messages, logprobs=req.logprobs > 0,
                                                 top_logprobs=req.logprobs or None, **kwargs)
                choice = out["choices"][0]
                text = choice["message"]["content"] or ""
                lp = _chat_logprobs(choice.get("logprobs"))
            else:
                out = llm.create_completion(prompt=req.prompt, logprobs=req.logprobs or None, **kwargs)
                choice = out["choices"][0]
                text = choice["text"]
                lp = _completion_logprobs(choice.get("logprobs"))
        except Exception as e:  # a bad request must not sink the batch; it is recorded as failed
            return Completion(error=f"{type(e).__name__}: {e}", latency_s=time.perf_counter() - start)
        usage = out.get("usage") or {}
        return Completion(text=text, finish_reason=choice.get("finish_reason") or "",
                          tokens_in=usage.get("prompt_tokens", 0), tokens_out=usage.get("completion_tokens", 0),
                          latency_s=time.perf_counter() - start, logprobs=lp)

    def close(self) -> None:
        for attr in ("_llm", "_llm_logits"):
            llm = getattr(self, attr)
            if llm is not None:
                llm.close()
                setattr(self, attr, None)


def _completion_logprobs(lp) -> list[dict] | None:
    if not lp:
        return None
    return [{"token": t, "logprob": float(l), "top": {k: float(v) for k, v in (top or {}).items()}}
            for t, l, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"])]


def _chat_logprobs(lp) -> list[dict] | None:
    if not lp or not lp.get("content"):
        return None
    return [{"token": c["token"], "logprob": float(c["logprob"]),
             "top": {t["token"]: float(t["logprob"]) for t in c.get("top_logprobs") or []}}
            for c in lp["content"]]
