"""One client for every OpenAI-compatible server: OpenAI, vLLM, llama.cpp's server, Ollama, any base_url."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from typing import Any, Callable, Coroutine

import openai
from pydantic import SecretStr
from tenacity import (AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt, wait_none,
                      wait_random_exponential)

from pipeline.config import TeacherConfig
from pipeline.teachers.base import CachedTeacher, Completion, Request, ResponseCache, request_seed
from pipeline.teachers.ledger import Ledger
from pipeline.teachers.secrets import redact, client_api_key


class LoopThread:
    """An event loop in a daemon thread that outlives single batches, so HTTP clients and their keep-alive
    connections are reused from one `generate` call to the next (the Self-Instruct loop makes many small ones)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="teacher-http", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run `coro` on the loop and wait for it; Ctrl-C here cancels it there."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


class OpenAICompatTeacher(CachedTeacher):
    backend = "openai"

    def __init__(self, cfg: TeacherConfig, cache: ResponseCache, ledger: Ledger):
        super().__init__(cfg.model, cache, ledger)
        self.cfg = cfg
        # Held as a SecretStr (a repr or log of this object shows '**********'), handed only to the HTTP client.
        self._api_key = SecretStr(client_api_key(cfg))
        self.base_urls = [cfg.base_url] + list(cfg.extra_base_urls) if cfg.base_url else [None]
        self._loop: LoopThread | None = None
        self._clients: list[openai.AsyncOpenAI] = []

    def _client(self, base_url: str | None) -> openai.AsyncOpenAI:
        # The SDK retries 408/409/429/5xx, timeouts and dropped connections with exponential backoff (0.5 s
        # doubling to 8 s), jitter and Retry-After; we only configure how many times and the timeout.
        return openai.AsyncOpenAI(api_key=self._api_key.get_secret_value(), base_url=base_url,
                                  max_retries=self.cfg.max_retries, timeout=self.cfg.timeout_s)

    def _call_batch(self, items, store: Callable[[int, Completion], None]) -> None:
        if self._loop is None:
            self._loop = LoopThread()
        self._loop.run(self._run(items, store))

    async def _run(self, items, store) -> None:
        if not self._clients:  # made on the loop that will use them
            self._clients = [self._client(url) for url in self.base_urls]
        sem = asyncio.Semaphore(self.cfg.max_concurrency)
        turn = itertools.cycle(self._clients)  # round-robin over the endpoints serving the same model

        async def one(i: int, req: Request, key: str) -> None:
            async with sem:
                if not self._admit(req, key):
                    return  # left as "not attempted" by CachedTeacher.generate
                store(i, await self._call_one(next(turn), req, key))
        await asyncio.gather(*(one(*item) for item in items))

    async def _close_clients(self) -> None:
        for client in self._clients:
            await client.close()
        self._clients = []

    def close(self) -> None:
        """Close the HTTP connections and stop the loop thread."""
        if self._loop is not None:
            self._loop.run(self._close_clients())
            self._loop.stop()
            self._loop = None

    async def _call_one(self, client: openai.AsyncOpenAI, req: Request, key: str) -> Completion:
        start = time.perf_counter()
        try:
            try:
                completion = await self._request(client, req, key)
            except json.JSONDecodeError:
                if not self.cfg.max_retries:
                    raise
                completion = await self._retry_malformed(client, req, key)
        except Exception as e:  # recorded as a failed item after the retries; never sinks the batch
            return Completion(error=redact(f"{type(e).__name__}: {e}", self._api_key.get_secret_value()),
                              latency_s=time.perf_counter() - start)
        completion.latency_s = time.perf_counter() - start
        return completion

    async def _retry_malformed(self, client: openai.AsyncOpenAI, req: Request, key: str) -> Completion:
        """The tries after a 200 whose body was not JSON (a proxy cut it, a server bug): the SDK does not retry
        those, so we do, for that error class only (the SDK's retries are not doubled up for everything else).

        The first try ran outside tenacity: its per-call machinery costs about 30 us of CPU per call (a sixth of
        what our client adds to the SDK, bench/teacher_throughput.py) and is only needed here. The schedule is the
        same as one tenacity loop over all tries: `before` sleeps ahead of try k+1 what `wait` would have slept
        after failed try k."""
        backoff = wait_random_exponential(multiplier=self.cfg.malformed_backoff_s, max=8)

        async def sleep_before(state: RetryCallState) -> None:
            await asyncio.sleep(backoff(state))
        async for attempt in AsyncRetrying(retry=retry_if_exception_type(json.JSONDecodeError),
                                           stop=stop_after_attempt(self.cfg.max_retries), wait=wait_none(),
                                           before=sleep_before, reraise=True):
            with attempt:
                completion = await self._request(client, req, key)
        return completion

    async def _request(self, client: openai.AsyncOpenAI, req: Request, key: str) -> Completion:
        # The SDK's generic `post` keeps its retries, backoff, Retry-After and timeouts, but skips the typed
        # request transform and response models, which cost more CPU per call than the HTTP itself
        # (bench/teacher_throughput.py); the reply is read as plain JSON.
        out = await client.post(endpoint(req), body=request_body(self.model, req, request_seed(self.cfg.seed, key)),
                                cast_to=object)
        return completion_from_json(req, out)


def endpoint(req: Request) -> str:
    """The OpenAI-compatible path (under /v1) that serves this request."""
    return "/chat/completions" if req.kind == "chat" else "/completions"


def request_body(model: str, req: Request, seed: int) -> dict[str, Any]:
    """The JSON body of a chat or completions call for `req`."""
    # The seed comes from the cache key, which includes sample_index: the n samples of one prompt differ even on
    # servers that ignore `n` (llama.cpp), and each is reproducible.
    body: dict[str, Any] = dict(model=model, max_tokens=req.max_tokens, temperature=req.temperature,
                                top_p=req.top_p, seed=seed)
    if req.stop:
        body["stop"] = req.stop
    if req.kind == "chat":
        body["messages"] = req.messages
        if req.logprobs:
            body.update(logprobs=True, top_logprobs=req.logprobs)
    else:
        body["prompt"] = req.prompt
        if req.logprobs:
            body["logprobs"] = req.logprobs
    return body


def completion_from_json(req: Request, out: dict[str, Any]) -> Completion:
    """A Completion from a chat or completions reply body (plain JSON)."""
    choice = out["choices"][0]
    if req.kind == "chat":
        text = (choice.get("message") or {}).get("content") or ""
        lp = _chat_logprobs(choice.get("logprobs")) if req.logprobs else None
    else:
        text = choice.get("text") or ""
        lp = _completion_logprobs(choice.get("logprobs")) if req.logprobs else None
    usage = out.get("usage") or {}
    return Completion(text=text, finish_reason=choice.get("finish_reason") or "",
                      tokens_in=usage.get("prompt_tokens") or 0, tokens_out=usage.get("completion_tokens") or 0,
                      logprobs=lp)


def _chat_logprobs(lp: dict | None) -> list[dict] | None:
    if not lp or not lp.get("content"):
        return None
    return [{"token": c["token"], "logprob": float(c["logprob"]),
             "top": {t["token"]: float(t["logprob"]) for t in c.get("top_logprobs") or []}} for c in lp["content"]]


def _completion_logprobs(lp: dict | None) -> list[dict] | None:
    if not lp or not lp.get("tokens"):
        return None
    n = len(lp["tokens"])
    return [{"token": t, "logprob": float(l) if l is not None else None,
             "top": {k: float(v) for k, v in (top or {}).items()}}
            for t, l, top in zip(lp["tokens"], lp.get("token_logprobs") or [None] * n, lp.get("top_logprobs") or [None] * n)]
