"""Start llama.cpp's own OpenAI-compatible server on loopback, so a local GGUF teacher uses the same HTTP path
(`teacher.backend=openai`, `teacher.base_url=...`) as vLLM or the OpenAI API."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from pipeline.models import resolve_gguf
from pipeline.processes import stop_process


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaCppServer:
    """A running `python -m llama_cpp.server` child process; stop it with `stop()` or a `with` block."""

    def __init__(self, proc: subprocess.Popen, base_url: str, model_path: Path, log_path: Path | None):
        self.proc = proc
        self.base_url = base_url
        self.model_path = model_path
        self.log_path = log_path

    @property
    def model_name(self) -> str:
        # llama.cpp's server answers any model name; it reports the GGUF path as the model id.
        return str(self.model_path)

    def wait_ready(self, timeout_s: float = 60.0) -> "LlamaCppServer":
        """Block until /v1/models answers, or raise with the tail of the server's log."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama.cpp server exited with code {self.proc.returncode}. {self._log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/models", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"llama.cpp server at {self.base_url} not ready after {timeout_s:.0f} s. {self._log_tail()}")

    def _log_tail(self) -> str:
        if self.log_path and self.log_path.exists():
            return "Server log tail:\n" + "\n".join(self.log_path.read_text(errors="replace").splitlines()[-15:])
        return ""

    def stop(self) -> None:
        """Terminate the server (kill it if it does not stop within 10 s)."""
        stop_process(self.proc)

    def __enter__(self) -> "LlamaCppServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_llamacpp(model: str = "smollm2-135m-instruct", port: int | None = None, host: str = "127.0.0.1",
                   n_ctx: int = 2048, n_threads: int | None = None, log_path: Path | None = None,
                   wait: bool = True) -> LlamaCppServer:
    """Start llama.cpp's OpenAI-compatible server for a GGUF (packaged alias or path); returns once it answers."""
    model_path = resolve_gguf(model)
    port = port or free_port()
    # One thread per free core by default: oversubscribed llama.cpp threads collapse throughput.
    n_threads = n_threads or max(1, len(os.sched_getaffinity(0)))
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(model_path), "--host", host, "--port", str(port),
           "--n_ctx", str(n_ctx), "--n_threads", str(n_threads)]
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    finally:
        if log_path:
            out.close()  # the child holds its own handle
    server = LlamaCppServer(proc, f"http://{host}:{port}/v1", model_path, log_path)
    return server.wait_ready() if wait else server


def run_teacher_server(model: str, port: int, n_threads: int | None = None, n_ctx: int = 2048) -> int:
    """CLI body of `distill teacher-server`: serve until Ctrl-C, printing the config lines that use it."""
    server = serve_llamacpp(model, port=port, n_ctx=n_ctx, n_threads=n_threads, wait=False)
    try:
        server.wait_ready()
        print(f"llama.cpp OpenAI-compatible server for {server.model_path.name} at {server.base_url}\n"
              f"Use it with: --set teacher.backend=openai --set teacher.base_url={server.base_url} "
              f"--set teacher.model={model}\nCtrl-C stops it.", flush=True)
        return server.proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()
