"""Teacher client throughput: our openai backend (cache, ledger, retries included) vs. a bare asyncio+httpx load at
the same concurrency, and vs. a sequential one-request-at-a-time loop like Alpaca's, all against the same fake
OpenAI-compatible server (its own process, fixed latency per request). Prints JSON.

    python bench/teacher_throughput.py --concurrency 16,64 --latency-s 0.2 --repeats 5

Each concurrency c sends `--waves` x c requests (25 waves: 400 at 16, 1,600 at 64) unless --requests says.
Both sides get the same treatment: the same server, the same requests, the HTTP client the SDK itself builds
(same library, connection limits, redirects, timeout), their client made inside the timed span and closed outside
it, one untimed warm-up, then `--repeats` interleaved runs (median). Ours writes its cache and ledger to files, as a
run does. CPU per request (this process, all threads) is reported too: on a shared box it is the steadier figure,
and on 2 cores it is what turns into wall overhead at high concurrency. `bare_vs_ideal_pct` shows whether the
fake server keeps up: the bare load's request rate against concurrency / latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import openai

try:  # the HTTP library the openai SDK itself sends with (openai 3.x: httpx2), so the floor shares its transport
    import httpx2 as httpx
except ImportError:
    import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import TeacherConfig  # noqa: E402
from pipeline.teachers import Ledger, Request, make_teacher  # noqa: E402
from pipeline.processes import stop_process  # noqa: E402


TIMEOUT_S = 30


def messages(i: int, run: str) -> list[dict[str, str]]:
    # Distinct per run, so no measurement is served from another's cache.
    return [{"role": "user", "content": f"[{run}] request {i}: explain why rivers meander, briefly."}]


def ours(base_url: str, n: int, concurrency: int, run: str) -> tuple[float, int]:
    """Seconds and completion tokens for n requests through make_teacher (fresh cache and ledger files)."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TeacherConfig(backend="openai", base_url=base_url, model="fake-teacher", max_concurrency=concurrency,
                            max_retries=2, timeout_s=TIMEOUT_S)
        reqs = [Request(messages=messages(i, run), max_tokens=64) for i in range(n)]
        start = time.perf_counter()
        teacher = make_teacher(cfg, Path(tmp) / "cache.sqlite", Ledger.for_teacher(cfg, Path(tmp) / "ledger.sqlite"))
        out = teacher.generate(reqs)
        wall = time.perf_counter() - start
        teacher.close()
    assert all(c.ok for c in out), [c.error for c in out if not c.ok][:3]
    return wall, sum(c.tokens_out for c in out)


async def _bare(base_url: str, n: int, concurrency: int, run: str) -> tuple[float, int]:
    sem = asyncio.Semaphore(concurrency)
    start = time.perf_counter()
    # The client class the SDK sends with, with its defaults (connection limits, redirects): the same transport.
    async with openai.DefaultAsyncHttpxClient(base_url=base_url, timeout=TIMEOUT_S) as client:
        async def one(i: int) -> int:
            async with sem:
                for attempt in range(3):  # a keep-alive connection the server just closed: retry, as the SDK does
                    try:
                        r = await client.post("/chat/completions", json={"model": "fake-teacher", "max_tokens": 64,
                                                                         "messages": messages(i, run)})
                        break
                    except httpx.TransportError:
                        if attempt == 2:
                            raise
                r.raise_for_status()
                return r.json()["usage"]["completion_tokens"]
        tokens = await asyncio.gather(*(one(i) for i in range(n)))
        wall = time.perf_counter() - start
    return wall, sum(tokens)


def bare(base_url: str, n: int, concurrency: int, run: str) -> tuple[float, int]:
    """The same load with nothing but asyncio + httpx: the floor our client is compared to."""
    return asyncio.run(_bare(base_url, n, concurrency, run))


def sequential(base_url: str, n: int, run: str) -> tuple[float, int]:
    """One request at a time, waiting for each reply (Alpaca's generate loop, minus its batching of prompts)."""
    with openai.DefaultHttpxClient(base_url=base_url, timeout=TIMEOUT_S) as client:
        start, tokens = time.perf_counter(), 0
        for i in range(n):
            r = client.post("/chat/completions", json={"model": "fake-teacher", "max_tokens": 64,
                                                      "messages": messages(i, run)})
            tokens += r.json()["usage"]["completion_tokens"]
        return time.perf_counter() - start, tokens


def start_server(latency_s: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "tests.fakes.openai_server", "--latency-s", str(latency_s)],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return proc, proc.stdout.readline().strip()


def measure(base_url: str, n: int, concurrency: int, repeats: int, latency_s: float) -> dict:
    """Median tokens/s of ours and of the bare load over `repeats` interleaved runs, and the overhead."""
    bare(base_url, concurrency, concurrency, f"warm-up-{concurrency}")  # connections and imports warmed once
    ours(base_url, concurrency, concurrency, f"warm-up-{concurrency}")
    runs: dict[str, list[float]] = {"ours": [], "bare": []}
    cpu: dict[str, list[float]] = {"ours": [], "bare": []}  # this process's CPU per request: steadier under load
    walls: dict[str, list[float]] = {"ours": [], "bare": []}
    for k in range(repeats):  # interleaved, so load from other processes hits both alike
        for name, fn in (("ours", ours), ("bare", bare)) if k % 2 == 0 else (("bare", bare), ("ours", ours)):
            cpu0 = time.process_time()
            wall, tokens = fn(base_url, n, concurrency, f"{name}-{concurrency}-{k}")
            cpu[name].append((time.process_time() - cpu0) / n * 1000)
            runs[name].append(tokens / wall)
            walls[name].append(wall)
    ours_tps, bare_tps = statistics.median(runs["ours"]), statistics.median(runs["bare"])
    bare_rps = n / statistics.median(walls["bare"])
    return {"concurrency": concurrency, "requests": n, "ours_tokens_per_s": round(ours_tps, 1),
            "bare_httpx_tokens_per_s": round(bare_tps, 1),
            "ours_runs": [round(x, 1) for x in runs["ours"]], "bare_runs": [round(x, 1) for x in runs["bare"]],
            "overhead_vs_bare_pct": round(100 * (1 - ours_tps / bare_tps), 2),
            "ours_cpu_ms_per_request": round(statistics.median(cpu["ours"]), 3),
            "bare_cpu_ms_per_request": round(statistics.median(cpu["bare"]), 3),
            # The fake server is not the bottleneck when the bare load gets close to concurrency / latency.
            "bare_requests_per_s": round(bare_rps, 1), "ideal_requests_per_s": round(concurrency / latency_s, 1),
            "bare_vs_ideal_pct": round(100 * bare_rps * latency_s / concurrency, 1), "_ours_tps": ours_tps}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, help="requests per measurement (default: --waves x concurrency)")
    p.add_argument("--waves", type=int, default=25)
    p.add_argument("--concurrency", nargs="+", default=["16,64"], help="levels, comma- or space-separated")
    p.add_argument("--latency-s", type=float, default=0.2, help="fixed server latency per request")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sequential-requests", type=int, default=25)
    args = p.parse_args()

    proc, base_url = start_server(args.latency_s)
    try:
        levels = [int(c) for arg in args.concurrency for c in arg.split(",") if c]
        results = [measure(base_url, args.requests or args.waves * c, c, args.repeats, args.latency_s) for c in levels]
        seq_wall, seq_tokens = sequential(base_url, args.sequential_requests, "sequential")
    finally:
        stop_process(proc)
    seq_tps = seq_tokens / seq_wall
    for r in results:
        r["speedup_vs_sequential"] = round(r.pop("_ours_tps") / seq_tps, 1)
    print(json.dumps({
        "server_latency_s": args.latency_s, "bare_http_library": f"{httpx.__name__} {httpx.__version__}", "repeats": args.repeats, "statistic": "median of repeats",
        "cpu_cores": len(os.sched_getaffinity(0)), "load_avg_1m": round(os.getloadavg()[0], 1),
        "results": results, "sequential_tokens_per_s": round(seq_tps, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
