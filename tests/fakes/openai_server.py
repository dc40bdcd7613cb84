"""A fake OpenAI-compatible HTTP server on loopback: scripted replies, request counting, fault injection.

It is a real HTTP server (uvicorn) so the client, retries and timeouts are exercised for real; only the
model behind it is fake.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

Responder = Callable[[dict], str]

FAULTS = ("429", "429_retry_after", "500", "503", "timeout", "drop", "malformed", "length")


def default_responder(body: dict) -> str:
    """Deterministic text that depends on the request: instructions for few-shot prompts, answers for chats."""
    if "prompt" in body:
        digest = hashlib.sha256(body["prompt"].encode()).hexdigest()
        words = ["summarize", "explain", "classify", "rewrite", "translate", "list", "compare", "describe"]
        topics = ["rivers", "tax law", "jazz", "compilers", "bees", "volcanoes", "chess", "bread", "satellites",
                  "poetry", "soccer", "vaccines", "glaciers", "banking", "origami", "owls"]
        picks = [int(digest[i:i + 4], 16) for i in range(0, 24, 4)]
        lines = [f" {words[picks[0] % 8].capitalize()} the history of {topics[picks[1] % 16]} in {3 + picks[2] % 5} sentences."]
        for k, p in enumerate(picks[3:], start=10):
            lines.append(f"Task {k}: {words[p % 8].capitalize()} why {topics[(p // 8) % 16]} matter to {topics[(p // 128) % 16]} experts.")
        return "\n".join(lines)
    user = body["messages"][-1]["content"]
    return f"Here is a careful answer about: {user[:80]}. It has two parts, first the facts and then an example."


@dataclass
class FakeOpenAIServer:
    responder: Responder = default_responder
    fault_rate: float = 0.0
    faults: tuple[str, ...] = FAULTS
    seed: int = 0
    timeout_sleep_s: float = 3.0
    requests: Counter = field(default_factory=Counter)  # prompt/messages digest -> times received
    faults_served: Counter = field(default_factory=Counter)
    latency_s: float = 0.0

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        app = Starlette(routes=[Route("/v1/chat/completions", self._chat, methods=["POST"]),
                                Route("/v1/completions", self._completions, methods=["POST"]),
                                Route("/v1/models", self._models, methods=["GET"])])
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error",
                                                     timeout_keep_alive=5))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    @property
    def total_requests(self) -> int:
        return sum(self.requests.values())

    def start(self) -> "FakeOpenAIServer":
        self._thread.start()
        deadline = time.time() + 10
        while not self._server.started:
            if time.time() > deadline:
                raise RuntimeError("fake server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def __enter__(self) -> "FakeOpenAIServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    async def _models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "fake-teacher", "object": "model"}]})

    def _pick_fault(self) -> str | None:
        with self._lock:
            if self.fault_rate and self._rng.random() < self.fault_rate:
                return self._rng.choice(self.faults)
        return None

    async def _handle(self, request: Request, kind: str) -> Response:
        body = await request.json()
        key = hashlib.sha256(json.dumps(body.get("prompt") or body.get("messages"), sort_keys=True).encode()).hexdigest()
        with self._lock:
            self.requests[key] += 1
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        fault = self._pick_fault()
        if fault:
            with self._lock:
                self.faults_served[fault] += 1
        if fault == "429":
            return JSONResponse({"error": {"message": "rate limited"}}, status_code=429)
        if fault == "429_retry_after":
            return JSONResponse({"error": {"message": "rate limited"}}, status_code=429, headers={"Retry-After": "0.05"})
        if fault in ("500", "503"):
            return JSONResponse({"error": {"message": "server error"}}, status_code=int(fault))
        if fault == "timeout":
            await asyncio.sleep(self.timeout_sleep_s)
        if fault == "drop":
            raise ConnectionResetError("dropped")  # uvicorn closes the connection without a response
        if fault == "malformed":
            return PlainTextResponse('{"id": "x", "choices": [', media_type="application/json")
        text = self.responder(body)
        finish = "stop"
        if fault == "length":
            text, finish = text[: max(1, len(text) // 3)], "length"
        usage = {"prompt_tokens": len(json.dumps(body.get("prompt") or body.get("messages")).split()),
                 "completion_tokens": len(text.split()), "total_tokens": 0}
        if kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            obj = "text_completion"
        return JSONResponse({"id": f"fake-{key[:8]}", "object": obj, "created": int(time.time()),
                             "model": body.get("model", "fake"), "choices": [choice], "usage": usage})

    async def _chat(self, request: Request) -> Response:
        return await self._handle(request, "chat")

    async def _completions(self, request: Request) -> Response:
        return await self._handle(request, "completion")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
