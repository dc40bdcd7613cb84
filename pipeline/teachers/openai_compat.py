"""One client for every OpenAI-compatible server: OpenAI, vLLM, llama.cpp's server, Ollama, any base_url."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Callable

import openai

from pipeline.config import TeacherConfig
from pipeline.errors import ConfigError
from pipeline.teachers.base import CachedTeacher, Completion, Ledger, Request, ResponseCache, request_seed


class OpenAICompatTeacher(CachedTeacher):
    backend = "openai"

    def __init__(self, cfg: TeacherConfig, cache: ResponseCache, ledger: Ledger):
        super().__init__(cfg.model, cache, ledger)
        self.cfg = cfg
        key = os.environ.get(cfg.api_key_env)
        if not key and not cfg.base_url:
            raise ConfigError(f"teacher.backend=openai with no base_url needs an API key in ${cfg.api_key_env}. "
                              f"Export it, or set teacher.base_url to a local server (vLLM, llama.cpp, Ollama).")
        # Local servers accept any key; the real key is held only by the client, never logged or saved.
        self._api_key = key or "not-needed"

    def _client(self) -> openai.AsyncOpenAI:
        # The SDK retries 408/409/429/5xx, timeouts and dropped connections with exponential backoff,
        # jitter and Retry-After; we only configure it.
        return openai.AsyncOpenAI(api_key=self._api_key, base_url=self.cfg.base_url,
                                  max_retries=self.cfg.max_retries, timeout=self.cfg.timeout_s)

    def _call_batch(self, items, store: Callable[[int, Completion], None]) -> None:
        asyncio.run(self._run(items, store))

    async def _run(self, items, store) -> None:
        sem = asyncio.Semaphore(self.cfg.max_concurrency)
        async with self._client() as client:
            async def one(i: int, req: Request, key: str) -> None:
                async with sem:
                    if self._over_budget():
                        return
                    store(i, await self._call_one(client, req, key))
            await asyncio.gather(*(one(*item) for item in items))

    async def _call_one(self, client: openai.AsyncOpenAI, req: Request, key: str) -> Completion:
        start = time.perf_counter()
        common = dict(model=self.model, max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p,
                      seed=request_seed(self.cfg.seed, key))
        if req.stop:
            common["stop"] = req.stop
        try:
            if req.kind == "chat":
                extra = {"logprobs": True, "top_logprobs": req.logprobs} if req.logprobs else {}
                out = await client.chat.completions.create(messages=req.messages, **common, **extra)
                choice = out.choices[0]
                text = choice.message.content or ""
                lp = None
                if req.logprobs and choice.logprobs and choice.logprobs.content:
                    lp = [{"token": c.token, "logprob": c.logprob,
                           "top": {t.token: t.logprob for t in (c.top_logprobs or [])}} for c in choice.logprobs.content]
            else:
                extra = {"logprobs": req.logprobs} if req.logprobs else {}
                out = await client.completions.create(prompt=req.prompt, **common, **extra)
                choice = out.choices[0]
                text = choice.text or ""
                lp = None
                if req.logprobs and choice.logprobs:
                    lp = [{"token": t, "logprob": l, "top": dict(top or {})} for t, l, top in
                          zip(choice.logprobs.tokens, choice.logprobs.token_logprobs, choice.logprobs.top_logprobs)]
        except Exception as e:  # recorded as a failed item after the SDK's retries; never sinks the batch
            return Completion(error=self._redact(f"{type(e).__name__}: {e}"), latency_s=time.perf_counter() - start)
        usage = out.usage
        return Completion(text=text, finish_reason=choice.finish_reason or "",
                          tokens_in=getattr(usage, "prompt_tokens", 0) or 0,
                          tokens_out=getattr(usage, "completion_tokens", 0) or 0,
                          latency_s=time.perf_counter() - start, logprobs=lp)

    def _redact(self, message: str) -> str:
        if self._api_key and self._api_key != "not-needed":
            message = message.replace(self._api_key, "[REDACTED]")
        return message
