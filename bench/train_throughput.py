"""Training throughput: our train stage (pipeline.train.train) vs a plain TRL SFTTrainer script on the same
student, data and batch size. Each side runs in its own process so peak RSS is its own. Prints JSON.

    python bench/train_throughput.py [--records 32] [--steps 8] [--batch-size 4] [--max-length 256]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def load_records(n: int):
    from pipeline.records import Record

    lines = (ROOT / "data" / "alpaca_gold_train.jsonl").read_text().splitlines()[:n]
    return [Record(**{k: json.loads(line)[k] for k in ("instruction", "input", "output")}, status="accepted")
            for line in lines]


def student_dir() -> Path:
    from pipeline.models import resolve_student

    return resolve_student("embedded-cut", list(range(12, 18)), "smollm2-135m-instruct")


def run_ours(args) -> dict:
    from pipeline.config import TrainConfig
    from pipeline.train import train

    cfg = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, max_length=args.max_length, check_memory=False)
    with tempfile.TemporaryDirectory() as out:
        s = train(student_dir(), load_records(args.records), cfg, Path(out), resume=False)
    return {"tokens_per_s": s["tokens_per_s"], "runtime_s": s["runtime_s"], "steps": s["steps"]}


def run_plain(args) -> dict:
    """What a user would write from TRL's docs: prompt/completion data, a LoraConfig, SFTTrainer defaults."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from pipeline.train.prepare import to_prompt_completion

    path = student_dir()
    rows = [{k: r[k] for k in ("prompt", "completion")} for r in to_prompt_completion(load_records(args.records))]
    with tempfile.TemporaryDirectory() as out:
        trainer = SFTTrainer(
            model=AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32),
            args=SFTConfig(output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                           max_length=args.max_length, learning_rate=2e-4, logging_steps=1, report_to="none",
                           save_strategy="no", use_cpu=not torch.cuda.is_available(),
                           # TRL's own default is bf16 autocast even on CPU, which is very slow there; --plain-fp32
                           # compares against the stronger fp32 baseline instead.
                           **({"bf16": False} if args.plain_fp32 else {}), **careful_args(args)),
            train_dataset=Dataset.from_list(rows), processing_class=AutoTokenizer.from_pretrained(str(path)),
            peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                   task_type="CAUSAL_LM"))
        result = trainer.train()
    runtime = result.metrics["train_runtime"]
    tokens = [h["num_tokens"] for h in trainer.state.log_history if "num_tokens" in h]
    return {"tokens_per_s": round(tokens[-1] / runtime, 1), "runtime_s": runtime, "steps": trainer.state.global_step}


def careful_args(args) -> dict:
    """--careful: plain TRL as a careful user sets it up (bf16 on a GPU, fp32 on CPU, padding-free packed batches,
    gradient checkpointing off), the baseline the issue asks for rather than TRL's defaults."""
    if not args.careful:
        return {}
    import torch

    cuda = torch.cuda.is_available()
    return {"bf16": cuda, "gradient_checkpointing": False, "padding_free": True, "packing": True,
            "packing_strategy": "bfd"}


def child(which: str, args) -> dict:
    start = time.perf_counter()
    result = (run_ours if which == "ours" else run_plain)(args)
    result["wall_s"] = round(time.perf_counter() - start, 1)
    result["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # KiB on Linux
    import torch

    if torch.cuda.is_available():
        result["peak_cuda_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--plain-fp32", action="store_true", help="plain TRL in fp32 instead of its bf16 default")
    ap.add_argument("--careful", action="store_true", help="plain TRL configured as a careful user would: bf16 on "
                    "GPU (fp32 on CPU), padding_free + packing, gradient checkpointing off")
    ap.add_argument("--child", choices=["ours", "plain"])
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args)))
        return
    student_dir()  # build the cut student once, outside the timed children
    results = {}
    for which in ("plain", "ours"):
        cmd = [sys.executable, __file__, "--child", which, "--records", str(args.records), "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--max-length", str(args.max_length)]
        cmd += ["--plain-fp32"] if args.plain_fp32 else []
        cmd += ["--careful"] if args.careful else []
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results[which] = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    import torch

    print(json.dumps({
        "student": "embedded-cut smollm2-135m-instruct minus layers 12-17", "records": args.records,
        "steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(),
        "plain_precision": "fp32" if args.plain_fp32 else "TRL default (bf16 autocast)",
        "plain_setup": "careful: padding_free + packing, no gradient checkpointing, bf16 on GPU / fp32 on CPU"
                       if args.careful else "TRL defaults",
        "ours": results["ours"], "plain_trl": results["plain"],
        "ratio_tokens_per_s": round(results["ours"]["tokens_per_s"] / results["plain"]["tokens_per_s"], 2),
    }, indent=2))


if __name__ == "__main__":
    main()
