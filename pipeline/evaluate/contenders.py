"""Answers from each contender to the same eval items: the teacher through its backend, students batched in
transformers. Student answers and reference log-likelihoods are cached per (model, adapter, prompt, params), so
re-scoring a run, or re-running it, costs no generation."""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

from pipeline.evaluate.evalsets import EvalItem
from pipeline.generate.prompts import render
from pipeline.progress import Progress
from pipeline.store import atomic_write_json
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
    # Speed from every reply that has a latency, cached ones included: the cache stores the original timing.
    timed = [r for r in replies if r.ok and r.latency_s > 0]
    gen_time = sum(r.latency_s for r in timed)
    return {"answers": [r.text.strip() if r.ok else "" for r in replies],
            "errors": sum(1 for r in replies if not r.ok),
            "tokens_per_s": (sum(r.tokens_out for r in timed) / gen_time) if gen_time else None,
            "latency_s": (gen_time / len(timed)) if timed else None,
            "answer_tokens": [r.tokens_out if r.ok else None for r in replies],
            "wall_s": time.perf_counter() - start}


def _files_digest(folder: Path, names: list[str] | None = None, content: bool = False) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        if p.is_file() and (names is None or p.name in names):
            h.update(p.name.encode())
            h.update(p.read_bytes() if content else f"{p.stat().st_size}:{p.stat().st_mtime_ns}".encode())
    return h.hexdigest()


def model_identity(model_dir: Path | str, adapter_dir: Path | None = None) -> str:
    """A short hash naming a (checkpoint, adapter) pair: the checkpoint's files by size and time, the adapter's by content."""
    model_dir = Path(model_dir)
    base = f"{model_dir.resolve()}:{_files_digest(model_dir)}" if model_dir.is_dir() else str(model_dir)
    adapter = _files_digest(Path(adapter_dir), content=True) if adapter_dir else ""
    return hashlib.sha256(f"{base}|{adapter}".encode()).hexdigest()[:16]


def disk_bytes(*folders: Path | None) -> int | None:
    """Bytes on disk of the weight files in the given folders (None for hub ids)."""
    total = 0
    for folder in folders:
        if folder is None:
            continue
        folder = Path(folder)
        if not folder.is_dir():
            return None
        total += sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin", ".gguf"))
    return total


class StudentCache:
    """One JSON file per (model, adapter): answers and reference log-likelihoods keyed by prompt and params."""

    def __init__(self, cache_dir: Path | None, identity: str):
        self.path = Path(cache_dir) / "student_outputs" / f"{identity}.json" if cache_dir else None
        self.data: dict[str, Any] = {"answers": {}, "nll": {}, "meta": {}}
        if self.path and self.path.exists():
            self.data.update(json.loads(self.path.read_text()))

    @staticmethod
    def key(*parts: Any) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def save(self) -> None:
        if self.path:
            atomic_write_json(self.path, self.data)


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


def _prompt(tok, item: EvalItem) -> str:
    return tok.apply_chat_template(user_message(item), tokenize=False, add_generation_prompt=True)


def _generate(model, tok, items: list[EvalItem], max_new_tokens: int, batch_size: int, label: str):
    """Greedy, batched with left padding; yields (item index, text, new tokens, seconds per answer)."""
    import torch

    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    eos_ids = {tok.eos_token_id}
    if "<|im_end|>" in tok.get_vocab():
        eos_ids.add(tok.convert_tokens_to_ids("<|im_end|>"))
    with Progress(len(items), f"evaluate: {label}", key=f"evaluate-{label.replace(' ', '-')}") as bar:
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            enc = tok([_prompt(tok, it) for it in chunk], return_tensors="pt", padding=True,
                      add_special_tokens=False).to(model.device)
            t0 = time.perf_counter()
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     eos_token_id=sorted(eos_ids), pad_token_id=tok.pad_token_id)
            per_answer = (time.perf_counter() - t0) / len(chunk)
            for k, row in enumerate(out[:, enc["input_ids"].shape[1]:]):
                ids = row.tolist()
                n = next((i for i, t in enumerate(ids) if t in eos_ids), len(ids))
                yield start + k, tok.decode(ids[:n], skip_special_tokens=True).strip(), n, per_answer
            bar.update(len(chunk))


def reference_nll(model, tok, item: EvalItem) -> tuple[float, int]:
    """Summed negative log-likelihood of the reference answer's tokens (and the end-of-turn) after the prompt."""
    import torch

    prompt_ids = tok.apply_chat_template(user_message(item), add_generation_prompt=True, tokenize=True, return_dict=False)
    full_ids = tok.apply_chat_template(user_message(item) + [{"role": "assistant", "content": item.reference}],
                                       tokenize=True, return_dict=False)
    if full_ids[:len(prompt_ids)] != prompt_ids:  # a template that rewrites the prompt once an answer follows
        return float("nan"), 0
    ids = torch.tensor([full_ids], device=model.device)
    with torch.no_grad():
        logits = model(ids).logits[0, :-1].float()
    targets = ids[0, 1:]
    nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")[len(prompt_ids) - 1:]
    return float(nll.sum()), int(nll.numel())


def student_answers(model_dir: Path, items: list[EvalItem], max_new_tokens: int, batch_size: int,
                    adapter_dir: Path | None = None, label: str = "student", cache_dir: Path | None = None,
                    perplexity: bool = False) -> dict[str, Any]:
    """Greedy answers (cached), plus speed, size and optionally the reference answers' log-likelihoods."""
    cache = StudentCache(cache_dir, model_identity(model_dir, adapter_dir))
    gen_keys = [cache.key(_prompt_text(it), max_new_tokens, "greedy") for it in items]
    nll_keys = [cache.key(_prompt_text(it), it.reference) for it in items]
    todo = [i for i, k in enumerate(gen_keys) if k not in cache.data["answers"]]
    todo_nll = [i for i, k in enumerate(nll_keys) if perplexity and items[i].reference and k not in cache.data["nll"]]
    if todo or todo_nll or "params" not in cache.data["meta"]:
        model, tok = load_student(model_dir, adapter_dir)
        cache.data["meta"]["params"] = sum(p.numel() for p in model.parameters())
        for pos, text, n, secs in _generate(model, tok, [items[i] for i in todo], max_new_tokens, batch_size, label):
            cache.data["answers"][gen_keys[todo[pos]]] = {"text": text, "tokens": n, "seconds": secs}
            if (pos + 1) % batch_size == 0:
                cache.save()  # a kill loses at most one batch
        for i in todo_nll:
            nll, n = reference_nll(model, tok, items[i])
            cache.data["nll"][nll_keys[i]] = {"nll": nll, "tokens": n}
        cache.save()
        del model
    got = [cache.data["answers"][k] for k in gen_keys]
    gen_time = sum(g["seconds"] for g in got)
    out: dict[str, Any] = {
        "answers": [g["text"] for g in got], "errors": 0, "params": cache.data["meta"]["params"],
        "disk_bytes": disk_bytes(Path(model_dir), adapter_dir),
        "tokens_per_s": sum(g["tokens"] for g in got) / gen_time if gen_time else None,
        "latency_s": gen_time / len(items) if items else None,
        "answer_tokens": [g["tokens"] for g in got],  # == max_new_tokens: the answer hit the limit (did not stop)
        "cached_answers": len(items) - len(todo)}
    if perplexity:
        out["nll"] = [cache.data["nll"].get(k) if items[i].reference else None for i, k in enumerate(nll_keys)]
    return out


def _prompt_text(item: EvalItem) -> str:
    # The cache key uses the rendered user message (not the tokenizer's template), so it is stable across runs.
    return user_message(item)[0]["content"]


def perplexity_summary(nll: list[dict | None], samples: int = 1000) -> dict[str, Any]:
    """Token-level perplexity of the references, exp(total NLL / total tokens), with a bootstrap interval over items."""
    import numpy as np

    from pipeline.evaluate.metrics import bootstrap_stat

    rows = [r for r in nll if r and r["tokens"] and r["nll"] == r["nll"]]
    if not rows:
        return {"perplexity": None, "perplexity_ci": [None, None]}
    s = np.array([r["nll"] for r in rows])
    n = np.array([r["tokens"] for r in rows])
    ppl = math.exp(s.sum() / n.sum())
    lo, hi = bootstrap_stat(len(rows), lambda idx: math.exp(s[idx].sum() / n[idx].sum()), samples)
    return {"perplexity": ppl, "perplexity_ci": [lo, hi]}
