"""Answers from each contender to the same eval items: the teacher through its backend, students batched in transformers."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pipeline.evaluate.evalsets import EvalItem
from pipeline.generate.prompts import render
from pipeline.progress import Progress
from pipeline.teachers.base import CachedTeacher, Request


def user_message(item: EvalItem) -> list[dict[str, str]]:
    return [{"role": "user", "content": render("response", instruction=item.instruction, input=item.input)}]


def teacher_answers(teacher: CachedTeacher, items: list[EvalItem], max_new_tokens: int) -> dict[str, Any]:
    """Greedy teacher answers (cached like every teacher call)."""
    requests = [Request(kind="chat", messages=user_message(it), max_tokens=max_new_tokens, temperature=0.0,
                        stage="evaluate") for it in items]
    start = time.perf_counter()
    with Progress(len(items), "evaluate: teacher", key="evaluate-teacher") as bar:
        replies = teacher.generate(requests, on_done=bar.update)
    fresh = [r for r in replies if r.ok and not r.cached]
    gen_time = sum(r.latency_s for r in fresh)
    return {"answers": [r.text.strip() if r.ok else "" for r in replies],
            "errors": sum(1 for r in replies if not r.ok),
            "tokens_per_s": (sum(r.tokens_out for r in fresh) / gen_time) if gen_time else None,
            "latency_s": (gen_time / len(fresh)) if fresh else None,
            "wall_s": time.perf_counter() - start}


def load_student(model_dir: Path, adapter_dir: Path | None = None):
    """A student checkpoint, optionally with a LoRA adapter merged in for fast inference."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    tok = AutoTokenizer.from_pretrained(str(adapter_dir or model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    model.to("cuda" if cuda else "cpu").eval()
    return model, tok


def student_answers(model_dir: Path, items: list[EvalItem], max_new_tokens: int, batch_size: int,
                    adapter_dir: Path | None = None, label: str = "student") -> dict[str, Any]:
    """Greedy answers, batched with left padding; returns answers plus speed and size."""
    import torch

    model, tok = load_student(model_dir, adapter_dir)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    eos_ids = {tok.eos_token_id}
    eot = tok.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tok.get_vocab() else None
    if eot is not None:
        eos_ids.add(eot)
    answers: list[str] = []
    new_tokens = 0
    gen_time = 0.0
    with Progress(len(items), f"evaluate: {label}", key=f"evaluate-{label.replace(' ', '-')}") as bar:
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            prompts = [tok.apply_chat_template(user_message(it), tokenize=False, add_generation_prompt=True) for it in chunk]
            enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            t0 = time.perf_counter()
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     eos_token_id=sorted(eos_ids), pad_token_id=tok.pad_token_id)
            gen_time += time.perf_counter() - t0
            for row in out[:, enc["input_ids"].shape[1]:]:
                ids = row.tolist()
                n = next((i for i, t in enumerate(ids) if t in eos_ids), len(ids))
                new_tokens += n
                answers.append(tok.decode(ids[:n], skip_special_tokens=True).strip())
            bar.update(len(chunk))
    params = sum(p.numel() for p in model.parameters())
    return {"answers": answers, "errors": 0, "params": params,
            "tokens_per_s": new_tokens / gen_time if gen_time else None,
            "latency_s": gen_time / len(items) if items else None}
