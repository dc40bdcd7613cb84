"""One client for every OpenAI-compatible server: OpenAI, vLLM, llama.cpp's server, Ollama, any base_url."""

from __future__ import annotations

import asyncio
import email.utils
import itertools
import json
import random
import threading
import time
from dataclasses import dataclass, field
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


# What the SDK waits before its first retry when the server does not say (Retry-After is honoured up to 2 minutes).
FIRST_RETRY_DELAY_S, MAX_RETRY_AFTER_S = 0.5, 120.0


class AfterFirstTry(openai.AsyncOpenAI):
    """The SDK client for tries after the fast path's first: its k-th retry is the request's (k+1)-th try, so its
    backoff is taken one step further on (0.5 s was already waited), and the waits are the SDK's own schedule."""

    # The SDK's own backoff method (no public hook for it); if a release renamed it, the waits would only be one
    # step shorter, and tests/test_teacher_faults.py would say so.
    def _calculate_retry_timeout(self, remaining_retries, options, response_headers=None):  # noqa: ANN001
        return super()._calculate_retry_timeout(remaining_retries - 1, options, response_headers)


@dataclass
class Endpoint:
    """One server serving the model: the SDK client, and the httpx client it sends with (shared connection pool)."""

    sdk: AfterFirstTry
    http: Any  # httpx.AsyncClient
    headers: dict[str, str] = field(repr=False)  # what the SDK sends: auth, user agent, organization, project
    base: str

    def url(self, path: str) -> str:
        return self.base + path


class OpenAICompatTeacher(CachedTeacher):
    backend = "openai"

    def __init__(self, cfg: TeacherConfig, cache: ResponseCache, ledger: Ledger):
        super().__init__(cfg.model, cache, ledger)
        self.cfg = cfg
        # Held as a SecretStr (a repr or log of this object shows '**********'), handed only to the HTTP client.
        self._api_key = SecretStr(client_api_key(cfg))
        self.base_urls = [cfg.base_url] + list(cfg.extra_base_urls) if cfg.base_url else [None]
        self._loop: LoopThread | None = None
        self._clients: list[Endpoint] = []

    def _client(self, base_url: str | None) -> Endpoint:
        # The SDK retries 408/409/429/5xx, timeouts and dropped connections with exponential backoff (0.5 s
        # doubling to 8 s), jitter and Retry-After; we only configure how many times and the timeout. The first
        # try goes out on the fast path (`_request`), so the SDK is left one retry fewer: the same tries in all.
        http = openai.DefaultAsyncHttpxClient(timeout=self.cfg.timeout_s)
        sdk = AfterFirstTry(api_key=self._api_key.get_secret_value(), base_url=base_url, http_client=http,
                            max_retries=max(0, self.cfg.max_retries - 1), timeout=self.cfg.timeout_s)
        headers = {k: v for k, v in {**sdk.default_headers, **sdk.auth_headers}.items() if isinstance(v, str)}
        return Endpoint(sdk=sdk, http=http, headers=headers, base=str(sdk.base_url).rstrip("/"))

    def _call_batch(self, items, store: Callable[[int, Completion], None]) -> None:
        if self._loop is None:
            self._loop = LoopThread()
        self._loop.run(self._run(items, store))

    async def _run(self, items, store) -> None:
        if not self._clients:  # made on the loop that will use them
            self._clients = [self._client(url) for url in self.base_urls]
        sem = asyncio.Semaphore(self.cfg.max_concurrency)
        turn = itertools.cycle(self._clients)  # round-robin over the endpoints serving the same model

        landed: list[tuple[int, Completion]] = []
        written = [asyncio.Event()]  # set once the replies that landed with this one are in the cache and ledger

        async def one(i: int, req: Request, key: str) -> None:
            async with sem:  # a slot is given back only after its reply is written: the budget sees it settled
                if not self._admit(req, key):
                    return  # left as "not attempted" by CachedTeacher.generate
                landed.append((i, await self._call_one(next(turn), req, key)))
                done = written[0]
                if len(landed) > 1:
                    await done.wait()
                    return
                # The first reply since the last write waits one turn of the loop, so the replies that land in the
                # same turn are written with it: a burst's cache and ledger writes take one commit each instead of
                # two per reply (on 2 cores those commits, which block the loop, were most of what our client still
                # lost against a bare HTTP load at 64 in flight). A kill loses
                # at most the replies of that one turn, as it loses the calls in flight; their holds stay counted.
                try:
                    await asyncio.sleep(0)
                finally:  # cancelled (Ctrl-C) or not, the replies already received are written
                    group = landed[:]
                    landed.clear()
                    written[0] = asyncio.Event()
                    try:
                        with self.storing_together():
                            for j, c in group:
                                store(j, c)
                    finally:
                        done.set()
        await asyncio.gather(*(one(*item) for item in items))

    async def _close_clients(self) -> None:
        for client in self._clients:
            await client.sdk.close()
        self._clients = []

    def close(self) -> None:
        """Close the HTTP connections and stop the loop thread."""
        if self._loop is not None:
            self._loop.run(self._close_clients())
            self._loop.stop()
            self._loop = None

    async def _call_one(self, client: Endpoint, req: Request, key: str) -> Completion:
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

    async def _retry_malformed(self, client: Endpoint, req: Request, key: str) -> Completion:
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

    async def _request(self, client: Endpoint, req: Request, key: str) -> Completion:
        """One reply: a plain POST first, then the SDK's tries if that did not succeed.

        Why not the SDK for every call: its per-call machinery (request options, header and URL building, the
        response wrapper) costs about 140 us of CPU per request, twice the HTTP exchange itself, and at 64
        requests in flight on 2 cores that is what a run loses to the client (bench/teacher_throughput.py). A
        success is all the fast path handles. A failure the SDK would retry (a timeout, a dropped connection, 408,
        409, 429, 5xx) goes to the SDK's own post after the wait the SDK takes before its first retry, so retries,
        backoff and Retry-After stay the SDK's; one it would not retry (401, 400...) is raised as the SDK's typed
        error without sending it again. A 200 whose body is not JSON raises JSONDecodeError, as from the SDK, for
        `_retry_malformed`."""
        path = endpoint(req)
        body = request_body(self.model, req, request_seed(self.cfg.seed, key))
        if self.cfg.max_retries:  # with no retries allowed, the one try is the SDK's
            try:
                reply = await client.http.post(client.url(path), json=body, headers=client.headers)
            except Exception:  # timeout, refused or dropped connection, TLS reset...: the SDK's tries take over
                reply = None
            if reply is not None:
                if reply.is_success:
                    return completion_from_json(req, reply.json())
                if not sdk_would_retry(reply):
                    raise status_error(reply)
            await asyncio.sleep(wait_before_sdk(reply))
        out = await client.sdk.post(path, body=body, cast_to=object)
        return completion_from_json(req, out)


# The SDK's error class per status, for a fast-path failure it would not retry (the same classes the SDK raises).
_STATUS_ERRORS = {400: openai.BadRequestError, 401: openai.AuthenticationError, 403: openai.PermissionDeniedError,
                  404: openai.NotFoundError, 409: openai.ConflictError, 422: openai.UnprocessableEntityError,
                  429: openai.RateLimitError}


def sdk_would_retry(reply: Any) -> bool:
    """The SDK's rule for a reply that is not a success: not when the server asks for a wait over 2 minutes, else
    the server's x-should-retry if it says, else 408, 409, 429 and 5xx are retried."""
    wait = retry_after_s(reply)
    if wait is not None and wait > MAX_RETRY_AFTER_S:
        return False
    says = reply.headers.get("x-should-retry")
    if says in ("true", "false"):
        return says == "true"
    return reply.status_code in (408, 409, 429) or reply.status_code >= 500


def status_error(reply: Any) -> openai.APIStatusError:
    """The exception the SDK raises for this reply, with its message ("Error code: 401 - {...}")."""
    text = reply.text.strip()
    try:
        body: Any = json.loads(text)
    except ValueError:
        body = text
    cls = _STATUS_ERRORS.get(reply.status_code,
                             openai.InternalServerError if reply.status_code >= 500 else openai.APIStatusError)
    return cls(f"Error code: {reply.status_code} - {body}", response=reply,
               body=body.get("error", body) if isinstance(body, dict) else body)


def retry_after_s(reply: Any) -> float | None:
    """The wait the server asks for: retry-after-ms, or Retry-After in seconds or as an HTTP date."""
    try:
        return float(reply.headers["retry-after-ms"]) / 1000
    except (KeyError, ValueError):
        pass
    value = reply.headers.get("retry-after")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        when = email.utils.parsedate_tz(value)
        return None if when is None else email.utils.mktime_tz(when) - time.time()


def wait_before_sdk(reply: Any) -> float:
    """Seconds to wait before the SDK retries a failed fast-path try: what the SDK waits before its first retry
    (the wait the server asks for, up to 2 minutes, else 0.5 s less up to 25% jitter)."""
    wait = retry_after_s(reply) if reply is not None else None
    if wait is not None and 0 < wait <= MAX_RETRY_AFTER_S:
        return wait
    return FIRST_RETRY_DELAY_S * (1 - 0.25 * random.random())


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
