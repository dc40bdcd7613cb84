"""Benchmark: Alpaca's near-duplicate rule (ROUGE-L > 0.7 against any kept instruction) at 50k and 1M.

Synthetic sets come from the 5,000 Alpaca instructions in ../shared/data/alpaca_5000.json: fresh ones are the
instructions themselves, then mutations of them (each word replaced with probability 0.4 by a word drawn
from the instructions, inputs and outputs), with ~20% planted near-duplicates (swapped, dropped or added words,
case and punctuation changes) of earlier ones. Alpaca's own loop (rouge_score `_score_lcs` against every
kept instruction, a new process Pool per instruction, as in generate_instruction.py) is timed on the first
`--alpaca-n` instructions of the 50k set and extrapolated to each size from its measured parts (Pool
start-up, seconds per `_score_lcs`). Each size runs in a fresh process, so peak RSS is that size's own.

    python bench/dedupe.py                      # 50k and 1M, Alpaca's loop on 5k (15+ minutes)
    python bench/dedupe.py --sizes 50000 --alpaca-n 500
    python bench/dedupe.py --cli 10000000 --vocab instructions   # `distill dedupe` end to end, /usr/bin/time -v
Prints one JSON object.

`--cli N` writes N records as JSONL and times the real command (`python -m pipeline.cli dedupe`), reading
wall time and peak RSS from /usr/bin/time -v. `--vocab instructions` builds every synthetic record from the
words of the 5,000 instructions only (a smaller vocabulary, so posting lists grow with N); `corpus` (the
default) also draws words from their inputs and outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from functools import partial
from multiprocessing import Pool
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load_base(vocab: str = "corpus") -> tuple[list[str], list[str]]:
    from pipeline.curate.synthetic import alpaca_records

    rows = alpaca_records()
    fields = ("instruction", "input", "output") if vocab == "corpus" else ("instruction",)
    return [r["instruction"] for r in rows], [w for r in rows for f in fields for w in r[f].split()]


def make_set(n: int, seed: int = 0, vocab: str = "corpus") -> tuple[list[str], list[int]]:
    from pipeline.curate.synthetic import synthetic_instructions

    base, words = load_base(vocab)
    return synthetic_instructions(base, n, dup_fraction=0.2, seed=seed, corpus_words=words)


def run_cli(n: int, vocab: str, cores: int) -> dict:
    """`distill dedupe` on n JSONL records, in a child process under /usr/bin/time -v (wall, peak RSS)."""
    import tempfile

    texts, planted = make_set(n, vocab=vocab)
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "in.jsonl", Path(tmp) / "kept.jsonl"
        with open(src, "w", encoding="utf-8") as f:
            for i, t in enumerate(texts):
                f.write(json.dumps({"instruction": t, "input": "", "output": f"answer {i}"}) + "\n")
        del texts
        size_mb = src.stat().st_size / 2**20
        cpus = ",".join(str(c) for c in sorted(os.sched_getaffinity(0))[:cores])
        cmd = ["/usr/bin/time", "-v", "taskset", "-c", cpus, sys.executable, "-m", "pipeline.cli", "dedupe",
               str(src), str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        stats = json.loads(proc.stdout)
        tv = {k.strip(): v.strip() for k, _, v in (ln.partition(": ") for ln in proc.stderr.splitlines() if ": " in ln)}
        h, m, sec = (["0"] + tv["Elapsed (wall clock) time (h:mm:ss or m:ss)"].split(":"))[-3:]
        wall = int(h) * 3600 + int(m) * 60 + float(sec)
    return {"records": n, "vocab": vocab, "input_mb": round(size_mb), "wall_s": round(wall, 1),
            "cpu_s": round(float(tv["User time (seconds)"]) + float(tv["System time (seconds)"]), 1),
            "peak_rss_mb": round(int(tv["Maximum resident set size (kbytes)"]) / 1024),
            "kept": stats["kept"], "dropped": stats["dropped"], "planted": len(planted), "cores": cores,
            "load_average_1min": round(os.getloadavg()[0], 1)}


def run_ours(n: int, cores: int) -> dict:
    """One size, in this process: build the set, then time tokenizing + indexing + deciding."""
    from pipeline.curate.fastdedupe import dedupe_encoded, encode

    os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:cores]))
    dedupe_encoded(encode(["warm up the compiled kernel", "warm up the kernel"]))  # JIT/cache load, not timed
    texts, planted = make_set(n)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    enc = encode(texts)
    t1 = time.perf_counter()
    res = dedupe_encoded(enc)
    t2 = time.perf_counter()
    cpu = time.process_time() - cpu0
    dropped = int((~res.kept).sum())
    planted_dropped = int((~res.kept[planted]).sum()) if planted else 0
    return {"instructions": n, "seconds": round(t2 - t0, 2), "tokenize_s": round(t1 - t0, 2),
            "dedupe_s": round(t2 - t1, 2),
            "cpu_s": round(cpu, 2), "load_average_1min": round(os.getloadavg()[0], 1), "per_second": round(n / (t2 - t0)), "dropped": dropped,
            "planted": len(planted), "planted_dropped": planted_dropped,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "rss_before_dedupe_mb": round(rss_before), "cores": len(os.sched_getaffinity(0))}


def alpaca_loop(texts: list[str], cores: int) -> dict:
    """Alpaca's generate_instruction.py filter, transcribed: a Pool per instruction, scored against all kept."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    pool_tokens: list[list[str]] = []
    samples = []  # (pool size, seconds) per instruction
    t_start = time.perf_counter()
    for text in texts:
        t0 = time.perf_counter()
        tokens = scorer._tokenizer.tokenize(text)
        if pool_tokens:
            with Pool(cores) as p:
                scores = [s.fmeasure for s in p.map(partial(rouge_scorer._score_lcs, tokens), pool_tokens)]
        else:
            scores = [0.0]
        if max(scores) <= 0.7:
            pool_tokens.append(tokens)
        samples.append((len(pool_tokens), time.perf_counter() - t0))
    total = time.perf_counter() - t_start
    # Cost model, from parts measured here rather than a fit over noisy per-instruction timings: a Pool
    # start-up per instruction plus one `_score_lcs` per kept instruction, spread over the cores.
    startup = sorted(t for _, t in samples[1:51])[len(samples[1:51]) // 2]  # median, pool still small
    rng = random.Random(0)
    pairs = [(rng.choice(pool_tokens), rng.choice(pool_tokens)) for _ in range(20000)]
    t0 = time.perf_counter()
    for a, b in pairs:
        rouge_scorer._score_lcs(a, b)
    per_pair = (time.perf_counter() - t0) / len(pairs)
    model = {"pool_startup_s": startup, "score_lcs_s": per_pair, "cores": cores}
    predicted = extrapolate(model, len(texts), len(pool_tokens) / len(texts))
    return {"instructions": len(texts), "seconds": round(total, 1), "per_second": round(len(texts) / total, 2),
            "kept": len(pool_tokens), "cost_model": model, "model_predicts_this_run_s": round(predicted, 1)}


def extrapolate(model: dict, n: int, keep_rate: float) -> float:
    """Seconds for n instructions: a Pool start-up each, plus keep_rate * i pair scores for the i-th."""
    return n * model["pool_startup_s"] + model["score_lcs_s"] * keep_rate * n * (n - 1) / 2 / model["cores"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[50_000, 1_000_000])
    ap.add_argument("--alpaca-n", type=int, default=5000, help="instructions for Alpaca's loop (0: skip)")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child mode: one size, JSON out
    ap.add_argument("--cli", type=int, nargs="*", help="time `distill dedupe` end to end on these sizes instead")
    ap.add_argument("--vocab", choices=["corpus", "instructions"], default="corpus",
                    help="words the synthetic records are built from (see above)")
    args = ap.parse_args()
    if args.cli:
        runs = []
        for n in args.cli:
            runs.append(run_cli(n, args.vocab, args.cores))
            print(json.dumps(runs[-1]), file=sys.stderr, flush=True)  # each size as it finishes
        print(json.dumps({"command": "distill dedupe in.jsonl kept.jsonl", "runs": runs}, indent=2))
        return
    if args.one:
        print(json.dumps(run_ours(args.one, args.cores)))
        return
    out: dict = {"rule": "drop if ROUGE-L F > 0.7 against any kept instruction (Alpaca)", "ours": []}
    for n in args.sizes:
        proc = subprocess.run([sys.executable, __file__, "--one", str(n), "--cores", str(args.cores)],
                              capture_output=True, text=True, check=True)
        out["ours"].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    if args.alpaca_n:
        texts, _ = make_set(max(args.alpaca_n, 1))
        ref = alpaca_loop(texts[: args.alpaca_n], args.cores)
        keep_rate = ref["kept"] / ref["instructions"]
        out["alpaca_loop"] = ref
        for row in out["ours"]:
            est = extrapolate(ref["cost_model"], row["instructions"], keep_rate)
            row["alpaca_loop_extrapolated_s"] = round(est)
            row["alpaca_loop_extrapolated_days"] = round(est / 86400, 2)
            row["speedup_vs_alpaca"] = round(est / row["seconds"])
        ref["extrapolated_days"] = {str(n): round(extrapolate(ref["cost_model"], n, keep_rate) / 86400, 3)
                                    for n in (5_000, 50_000, 1_000_000)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
