"""A small but complete runs folder for the browse tests, built with the real store (Run, save_dataset), and a
real `serve()` process on a free loopback port."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import PROJECT_ROOT
from pipeline.config import load_config
from pipeline.curate import reject_counts
from pipeline.generate.prompts import template_hash
from pipeline.processes import stop_process
from pipeline.records import Record
from pipeline.store import Run, atomic_write_json, atomic_write_text

PLANTED = "quokkaphile"  # one accepted record contains this word, nothing else does
XSS = '<script>document.title="pwned";alert("pwned")</script><img src=x onerror="alert(2)"><b>bold?</b>'
SECRET = "top-secret-do-not-serve"
# 1x1 transparent PNG
PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII=")
TOPICS = ["volcanoes", "jazz", "tides", "bees", "chess", "glaciers", "owls", "compilers", "bread", "comets"]


def _record(i: int, **kw) -> Record:
    topic = TOPICS[i % len(TOPICS)]
    base = dict(instruction=f"Describe the role of {topic} in example number {i}.", output=("word " * (i % 40 + 1)).strip(),
                run_id="r1", teacher="openai:fake-teacher", template="self_instruct_completion",
                template_hash=template_hash("self_instruct_completion"), prompt_seed_ids=["seed_task_0", "seed_task_1"],
                prompt_machine_instructions=[f"List three facts about {topic}."], raw_reply=f" reply text {i}\nTask 4: more",
                gen_params=json.dumps({"temperature": 0.7, "prompt_index": i}), finish_reason="stop")
    return Record(**{**base, **kw})


def make_runs(root: Path) -> dict:
    """runs/r1 with versions curated and v2 (child of curated), a logprobs version, eval outputs, plots."""
    cfg = load_config(profile="cpu-demo", overrides=[f"runs_dir={root}"])
    run = Run.create(cfg, run_id="r1")
    accepted = [_record(i).accept() for i in range(120)]
    accepted.append(_record(500, instruction=f"Explain why the {PLANTED} collects spoons.", output="Because spoons shine.").accept())
    accepted.append(_record(501, instruction=XSS, input=XSS, output=XSS).accept())
    accepted.append(_record(502, instruction="Name a gold answer.", source="gold", output="gold").accept())
    near = _record(600, instruction="Describe the role of volcanoes in example number 0!")
    rejected = [near.reject("near_duplicate", f"ROUGE-L 0.812 to: {accepted[0].instruction}"),
                accepted[1].reject("exact_duplicate", f"same as {accepted[1].id}"),
                _record(601, instruction="Draw a map.", output="").reject("blacklisted_word"),
                _record(602, instruction="Hi", output="x").reject("too_short")]
    run.save_dataset("curated", accepted, rejected, {"parents": [], "teacher": "openai:fake-teacher",
                                                     "reject_reasons": reject_counts(rejected)})
    # v2: one record removed, one added, one flipped to rejected
    added = _record(700, instruction="A brand new instruction about lighthouses.").accept()
    flipped = accepted[6].reject("contaminated", "0.90 of its 13-grams are in the eval set")
    v2_acc = [r for k, r in enumerate(accepted) if k not in (5, 6)] + [added]
    v2_rej = rejected + [flipped]
    run.save_dataset("v2", v2_acc, v2_rej, {"parents": ["r1/curated"], "teacher": "openai:fake-teacher",
                                            "reject_reasons": reject_counts(v2_rej)})
    # a version with stored teacher logprobs (a column later stages may add), written with pyarrow directly
    lp_dir = run.path("datasets", "scored")
    lp_dir.mkdir(parents=True)
    rec = _record(800, instruction="Say hello.", output="Hello world").accept().model_dump()
    rec["logprobs"] = json.dumps([{"token": "Hello", "logprob": -0.01},
                                  {"token": " world", "logprob": -2.5, "top_logprobs": [{"token": " there", "logprob": -0.2}]}])
    pq.write_table(pa.Table.from_pylist([rec]), lp_dir / "accepted.parquet")
    atomic_write_json(lp_dir / "manifest.json", {"id": "r1/scored", "run_id": "r1", "accepted": 1, "rejected": 0,
                                                 "parents": ["r1/curated"]})
    # run outputs the pages read
    (run.dir / "scores.png").write_bytes(PNG)
    (run.dir / "datasets" / "curated" / "diversity.png").write_bytes(PNG)
    (run.dir / "evil.html").write_text("<script>alert(1)</script>")
    (root / "secret.png").write_text(SECRET)
    (root.parent / "secret.txt").write_text(SECRET)
    (run.dir / "link.png").symlink_to(root / "secret.png")
    ledger = {"generate": {"requests": 11, "cached": 2, "failures": 1, "tokens_in": 495, "tokens_out": 311, "cost_usd": 0.0123}}
    atomic_write_json(run.dir / "report.json", {
        "run_id": "r1", "generation": {"prompts": 4, "candidates": 16, "kept_instructions": 7, "records": 16},
        "curation": {"accepted": len(accepted), "rejected": len(rejected)}, "training": {"examples": 7, "steps": 2},
        "evaluation": {"eval_set": "data/alpaca_dev.jsonl", "items": 2, "max_new_tokens": 16,
                       "teacher": {"rouge_l": 0.4, "rouge_l_ci": [0.3, 0.5]}, "raw_student": {"rouge_l": 0.1},
                       "distilled_student": {"rouge_l": 0.2}}, "ledger": ledger})
    rows = [{"id": "alpaca-1", "instruction": "Give a synonym of happy.", "input": "", "reference": "joyful",
             "teacher": "glad", "teacher_rouge_l": 0.0, "raw_student": XSS, "raw_student_rouge_l": 0.0,
             "distilled_student": "joyful", "distilled_student_rouge_l": 1.0, "distilled_student_judge": 1.0, "category": "words"},
            {"id": "alpaca-2", "instruction": "Add 2 and 2.", "input": "", "reference": "4", "teacher": "4",
             "teacher_rouge_l": 1.0, "raw_student": "5", "raw_student_rouge_l": 0.0, "distilled_student": "4",
             "distilled_student_rouge_l": 1.0}]
    atomic_write_text(run.dir / "eval" / "outputs.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    run.set_state("completed", summary={"accepted": len(accepted), "rejected": len(rejected), "teacher": 0.4,
                                        "raw_student": 0.1, "distilled_student": 0.2})
    return {"root": root, "run": run, "accepted": accepted, "rejected": rejected, "added": added, "flipped": flipped,
            "removed": accepted[5]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BrowseServer:
    """`pipeline.browse.serve` in its own process (what `distill browse` runs), stopped by its pid."""

    def __init__(self, runs_dir: Path, index_dir: Path, host: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        kw = f", host={host!r}" if host else ""
        code = (f"import sys; from pipeline.browse import serve; "
                f"serve(sys.argv[1], port={self.port}, index_dir=sys.argv[2]{kw})")
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(runs_dir), str(index_dir)], cwd=PROJECT_ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def __enter__(self) -> "BrowseServer":
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"browse server exited: {self.proc.stdout.read()}")
            try:
                httpx.get(self.url + "/", timeout=1)
                return self
            except httpx.HTTPError:
                time.sleep(0.1)
        self.__exit__()
        raise RuntimeError("browse server did not start in 30 s")

    def __exit__(self, *exc) -> None:
        stop_process(self.proc)
