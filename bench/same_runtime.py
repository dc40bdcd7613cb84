"""Teacher and student on the same runtime: the student (a run's distilled one, or the demo's cut student) exported
to GGUF at several quantizations, then every file timed in llama.cpp on the same eval prompts, same threads, same
answer length. Prints JSON (and writes it with --out).

    python bench/same_runtime.py                                  # the demo student (layers 12-17 cut), raw
    python bench/same_runtime.py --run runs/<run-id> --quant q4_1 --quant q8_0 --quant q4_k_m

What it answers: is the smaller student faster than its teacher where both run the same way, and how big is each
file? (The report's speed columns come from the same code, pipeline/evaluate/runtime.py.)"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.evaluate import load_eval_set  # noqa: E402
from pipeline.evaluate.contenders import user_message  # noqa: E402
from pipeline.evaluate.runtime import same_runtime_speed  # noqa: E402
from pipeline.models import cut_student_from_gguf, resolve_gguf  # noqa: E402
from pipeline.ship import export_gguf, resolve_export_source  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", help="a run folder: export its distilled student (default: the demo's raw cut student)")
    ap.add_argument("--drop", default="12-17", help="layers cut from the teacher when no --run is given")
    ap.add_argument("--quant", action="append", help="quantizations to export (default: q4_1, the teacher's, and q8_0)")
    ap.add_argument("--prompts", type=int, default=3, help="eval prompts timed per model")
    ap.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per timed answer")
    ap.add_argument("--repeats", type=int, default=2, help="time every model this many times, alternating (best kept)")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()

    teacher = resolve_gguf("smollm2-135m-instruct")
    if args.run:
        model_dir, adapter, source, stem = resolve_export_source(Path(args.run))
    else:
        source = teacher
        model_dir, adapter, stem = cut_student_from_gguf(teacher, args.drop), None, "student"
    quants = args.quant or ["q4_1", "q8_0"]
    with tempfile.TemporaryDirectory(prefix="same-runtime-") as tmp:
        start = time.perf_counter()
        made = export_gguf(model_dir, adapter, source, Path(tmp), quants, stem=stem)
        export_s = time.perf_counter() - start
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(model_dir))
        items = load_eval_set(ROOT / "data" / "alpaca_dev.jsonl", args.prompts)
        prompts = [tok.apply_chat_template(user_message(it), tokenize=False, add_generation_prompt=True) for it in items]
        ggufs = {"teacher": teacher, **{f"student {q}": Path(p) for q, p in made["paths"].items()}}
        # Alternate the models over repeats and keep each one's best: a shared box's noise hits all of them alike.
        best: dict = {}
        for _ in range(args.repeats):
            for name, r in same_runtime_speed(ggufs, prompts, args.new_tokens).items():
                if name not in best or (r["tokens_per_s"] or 0) > (best[name]["tokens_per_s"] or 0):
                    best[name] = r
    fp32 = sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))
    t = best["teacher"]
    result = {"student": str(model_dir), "adapter": str(adapter) if adapter else None, "export_s": round(export_s, 1),
              "student_fp32_checkpoint_mb": round(fp32 / 2**20, 1), "prompts": args.prompts,
              "new_tokens": args.new_tokens, "repeats": args.repeats,
              "rows": {name: {"runtime": r["runtime"], "disk_mb": round(r["disk_bytes"] / 2**20, 1),
                              "tokens_per_s": round(r["tokens_per_s"], 1), "first_token_s": round(r["first_token_s"], 3),
                              "latency_s": round(r["latency_s"], 2), "n_threads": r["n_threads"],
                              "speed_vs_teacher": round(r["tokens_per_s"] / t["tokens_per_s"], 2),
                              "disk_vs_teacher": round(r["disk_bytes"] / t["disk_bytes"], 2)}
                       for name, r in best.items()}}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
