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
# Not in the default mix (never retried): "401" answers with an error that echoes the caller's API key, as a
# careless server might, so tests can check the key never leaks from our side.


def request_digest(prompt_or_messages: str | list) -> str:
    """The key `FakeOpenAIServer.requests` counts under, for a prompt string or a messages list."""
    return hashlib.sha256(json.dumps(prompt_or_messages, sort_keys=True).encode()).hexdigest()


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
    answered: Counter = field(default_factory=Counter)  # digest -> full replies sent (what a real API bills)
    # Called with (digest, client (host, port)) once a request is received; returning True drops the connection
    # without a reply (used to kill the calling worker mid-shard).
    on_request: Callable[[str, tuple | None], bool] | None = None
    faults_served: Counter = field(default_factory=Counter)
    latency_s: float = 0.0
    retry_after_s: float = 0.05
    faults_per_request: int | None = None  # if set: each distinct request's first k attempts fail (faults in turn)
    required_api_key: str | None = None  # if set, any other bearer token gets a 401 that echoes it
    keys_seen: Counter = field(default_factory=Counter)  # bearer tokens received (to test key plumbing)
    batch_delay_s: float = 0.0
    batch_fail_custom_ids: set = field(default_factory=set)  # these lines land in the batch's error file
    files: dict = field(default_factory=dict)  # file id -> JSONL text (uploads and batch outputs)
    honor_max_tokens: bool = False  # cut replies to the request's max_tokens (in words, the fake's token), as servers do
    billed: Counter = field(default_factory=Counter)  # what a provider would charge: answered, prompt/completion tokens
    billed_per_model: dict = field(default_factory=dict)  # model name -> Counter like `billed`
    batches: dict = field(default_factory=dict)  # batch id -> batch object

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        app = Starlette(routes=[Route("/v1/chat/completions", self._chat, methods=["POST"]),
                                Route("/v1/completions", self._completions, methods=["POST"]),
                                Route("/v1/models", self._models, methods=["GET"]),
                                Route("/v1/files", self._upload_file, methods=["POST"]),
                                Route("/v1/files/{file_id}/content", self._file_content, methods=["GET"]),
                                Route("/v1/batches", self._create_batch, methods=["POST"]),
                                Route("/v1/batches/{batch_id}", self._get_batch, methods=["GET"])])
        # "critical": a dropped connection is an exception in the app by design; its traceback is noise.
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="critical",
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

    def _wrong_key(self, request: Request) -> Response | None:
        token = request.headers.get("authorization", "").removeprefix("Bearer ")
        if self.required_api_key is not None and token != self.required_api_key:
            return JSONResponse({"error": {"message": f"Incorrect API key provided: {token}.", "code": "invalid_api_key"}},
                                status_code=401)
        return None

    async def _models(self, request: Request) -> Response:
        if (refusal := self._wrong_key(request)) is not None:
            return refusal
        return JSONResponse({"object": "list", "data": [{"id": "fake-teacher", "object": "model"}]})

    def _pick_fault(self, key: str) -> str | None:
        with self._lock:
            if self.faults_per_request is not None:
                attempt = self.requests[key]  # already counts this attempt
                return self.faults[(attempt - 1) % len(self.faults)] if attempt <= self.faults_per_request else None
            if self.fault_rate and self._rng.random() < self.fault_rate:
                return self._rng.choice(self.faults)
        return None

    async def _handle(self, request: Request, kind: str) -> Response:
        body = await request.json()
        if (refusal := self._wrong_key(request)) is not None:
            return refusal
        token = request.headers.get("authorization", "").removeprefix("Bearer ")
        key = request_digest(body.get("prompt") or body.get("messages"))
        with self._lock:
            self.requests[key] += 1
            self.keys_seen[token] += 1
        if self.on_request is not None and self.on_request(key, (request.client.host, request.client.port)
                                                           if request.client else None):
            return _DroppedResponse()
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        fault = self._pick_fault(key)
        if fault:
            with self._lock:
                self.faults_served[fault] += 1
        if fault == "429":
            return JSONResponse({"error": {"message": "rate limited"}}, status_code=429)
        if fault == "429_retry_after":
            return JSONResponse({"error": {"message": "rate limited"}}, status_code=429,
                                headers={"Retry-After": str(self.retry_after_s)})
        if fault == "401":
            return JSONResponse({"error": {"message": f"Incorrect API key provided: {token}.", "code": "invalid_api_key"}},
                                status_code=401)
        if fault in ("500", "503"):
            return JSONResponse({"error": {"message": "server error"}}, status_code=int(fault))
        if fault == "timeout":
            await asyncio.sleep(self.timeout_sleep_s)
        if fault == "drop":
            return _DroppedResponse()
        if fault == "malformed":
            return PlainTextResponse('{"id": "x", "choices": [', media_type="application/json")
        reply = self._reply(body, kind, key, truncated=fault == "length")
        with self._lock:
            self.answered[key] += 1
        return JSONResponse(reply)

    def billed_usd(self, price_per_1m_input: float, price_per_1m_output: float, model: str | None = None) -> float:
        """The bill for every reply served so far (to one model, if named), at the given prices; faults are free."""
        b = self.billed if model is None else self.billed_per_model.get(model, Counter())
        return (b["prompt_tokens"] * price_per_1m_input + b["completion_tokens"] * price_per_1m_output) / 1e6

    def _reply(self, body: dict, kind: str, key: str, truncated: bool = False) -> dict:
        text = self.responder(body)
        finish = "stop"
        if truncated:
            text, finish = text[: max(1, len(text) // 3)], "length"
        if self.honor_max_tokens and body.get("max_tokens") and len(text.split()) > body["max_tokens"]:
            text, finish = " ".join(text.split()[: body["max_tokens"]]), "length"
        usage = {"prompt_tokens": len(json.dumps(body.get("prompt") or body.get("messages")).split()),
                 "completion_tokens": len(text.split()), "total_tokens": 0}
        with self._lock:
            bill = {"answered": 1, "prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"]}
            self.billed.update(bill)
            self.billed_per_model.setdefault(body.get("model", ""), Counter()).update(bill)
        if kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            obj = "text_completion"
        return {"id": f"fake-{key[:8]}", "object": obj, "created": int(time.time()),
                "model": body.get("model", "fake"), "choices": [choice], "usage": usage}

    # --- Batch API: /v1/files and /v1/batches. A batch completes `batch_delay_s` after it was created. ---

    async def _upload_file(self, request: Request) -> Response:
        raw = (await request.body()).decode()
        # The multipart body holds the JSONL verbatim; its request lines are the JSON lines with a custom_id.
        lines = [ln for ln in raw.splitlines() if ln.startswith("{") and '"custom_id"' in ln]
        with self._lock:
            file_id = f"file-{len(self.files) + 1}"
            self.files[file_id] = "\n".join(lines) + "\n"
        return JSONResponse({"id": file_id, "object": "file", "bytes": len(raw), "created_at": int(time.time()),
                             "filename": "batch.jsonl", "purpose": "batch", "status": "processed"})

    async def _file_content(self, request: Request) -> Response:
        file_id = request.path_params["file_id"]
        if file_id not in self.files:
            return JSONResponse({"error": {"message": f"No such file {file_id}"}}, status_code=404)
        return PlainTextResponse(self.files[file_id])

    async def _create_batch(self, request: Request) -> Response:
        body = await request.json()
        with self._lock:
            batch_id = f"batch-{len(self.batches) + 1}"
            self.batches[batch_id] = {"id": batch_id, "object": "batch", "endpoint": body["endpoint"],
                                      "input_file_id": body["input_file_id"], "completion_window": "24h",
                                      "status": "in_progress", "created_at": time.time(), "output_file_id": None,
                                      "error_file_id": None}
        return JSONResponse(self._batch_view(batch_id))

    async def _get_batch(self, request: Request) -> Response:
        batch_id = request.path_params["batch_id"]
        if batch_id not in self.batches:
            return JSONResponse({"error": {"message": f"No such batch {batch_id}"}}, status_code=404)
        batch = self.batches[batch_id]
        if batch["status"] == "in_progress" and time.time() - batch["created_at"] >= self.batch_delay_s:
            self._run_batch(batch)
        return JSONResponse(self._batch_view(batch_id))

    def _batch_view(self, batch_id: str) -> dict:
        b = self.batches[batch_id]
        return {**b, "created_at": int(b["created_at"])}

    def _run_batch(self, batch: dict) -> None:
        kind = "chat" if batch["endpoint"].endswith("chat/completions") else "completion"
        out, errors = [], []
        for line in self.files[batch["input_file_id"]].splitlines():
            item = json.loads(line)
            body = item["body"]
            key = request_digest(body.get("prompt") or body.get("messages"))
            with self._lock:
                self.requests[key] += 1
            if self.batch_fail_custom_ids and item["custom_id"] in self.batch_fail_custom_ids:
                errors.append({"id": f"req-{key[:8]}", "custom_id": item["custom_id"], "response": None,
                               "error": {"code": "server_error", "message": "the model failed on this request"}})
                continue
            out.append({"id": f"req-{key[:8]}", "custom_id": item["custom_id"], "error": None,
                        "response": {"status_code": 200, "request_id": key[:8], "body": self._reply(body, kind, key)}})
        with self._lock:
            for name, rows in (("output_file_id", out), ("error_file_id", errors)):
                if rows:
                    file_id = f"file-{len(self.files) + 1}"
                    self.files[file_id] = "".join(json.dumps(r) + "\n" for r in rows)
                    batch[name] = file_id
            batch["status"] = "completed"
            batch["request_counts"] = {"total": len(out) + len(errors), "completed": len(out), "failed": len(errors)}

    async def _chat(self, request: Request) -> Response:
        return await self._handle(request, "chat")

    async def _completions(self, request: Request) -> Response:
        return await self._handle(request, "completion")


class _DroppedResponse(Response):
    """Starts a 200 reply, sends part of the body, then fails: uvicorn closes the socket mid-response."""

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"500")]})
        await send({"type": "http.response.body", "body": b'{"id": "dropped", "choices": [', "more_body": True})
        raise ConnectionResetError("connection dropped by the fake server")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    """Run the fake server in its own process (benchmarks): prints its base_url, serves until killed."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--latency-s", type=float, default=0.0)
    p.add_argument("--fault-rate", type=float, default=0.0)
    args = p.parse_args()
    server = FakeOpenAIServer(latency_s=args.latency_s, fault_rate=args.fault_rate).start()
    print(server.base_url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
