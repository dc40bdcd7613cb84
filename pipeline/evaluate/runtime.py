"""Speed and size on one runtime: every contender as a GGUF in llama.cpp, same threads, same prompts, same number of
new tokens, so the teacher's and the students' columns compare like with like (a 4-bit teacher in llama.cpp
against an fp32 student in PyTorch measures the runtimes, not the models)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("distill")


def llamacpp_greedy(llm, prompt_ids: list[int], n: int) -> list[int]:
    """The first n greedy tokens after prompt_ids, end-of-turn or not (a fixed length makes timings comparable)."""
    out: list[int] = []
    llm.reset()  # no KV-cache reuse from an earlier prompt: every answer starts from its full prompt
    for token in llm.generate(prompt_ids, temp=0.0, reset=True):
        out.append(token)
        if len(out) >= n:
            break
    return out


def llamacpp_speed(gguf: Path, prompts: list[str], new_tokens: int, n_threads: int | None = None) -> dict[str, Any]:
    """Decode speed, time to first token and latency per answer of one GGUF in llama.cpp, over rendered chat prompts."""
    from llama_cpp import Llama

    from pipeline.ship import quant_name
    from pipeline.teachers.llamacpp import default_threads

    n_threads = n_threads or default_threads()
    llm = Llama(model_path=str(gguf), n_ctx=2048, n_threads=n_threads, verbose=False)
    try:
        ids = [llm.tokenize(p.encode(), add_bos=False, special=True) for p in prompts]
        llamacpp_greedy(llm, ids[0], 4)  # warm-up: page the weights in before the clock starts
        first, total = [], []
        for prompt_ids in ids:
            llm.reset()  # time the whole prompt, not the part a previous prompt left in the KV cache
            start = time.perf_counter()
            got = 0
            for _ in llm.generate(prompt_ids, temp=0.0, reset=True):
                got += 1
                if got == 1:
                    first.append(time.perf_counter() - start)
                if got >= new_tokens:
                    break
            total.append(time.perf_counter() - start)
        quant = quant_name(llm.metadata.get("general.file_type"))
    finally:
        llm.close()
    decode_s = sum(t - f for t, f in zip(total, first))
    return {"runtime": f"llama.cpp {quant.upper() if quant else 'GGUF'}", "quant": quant,
            "tokens_per_s": len(ids) * (new_tokens - 1) / decode_s if decode_s > 0 else None,
            "first_token_s": sum(first) / len(first), "latency_s": sum(total) / len(total),
            "disk_bytes": Path(gguf).stat().st_size, "speed_prompts": len(ids), "speed_new_tokens": new_tokens,
            "n_threads": n_threads}


def same_runtime_speed(ggufs: dict[str, Path], prompts: list[str], new_tokens: int) -> dict[str, dict[str, Any]]:
    """llamacpp_speed for each contender's GGUF, one after the other on the same box."""
    out = {}
    for name, path in ggufs.items():
        out[name] = llamacpp_speed(path, prompts, new_tokens)
        log.info("speed: %s %s %.1f tokens/s, %.2f s per %d-token answer", name, out[name]["runtime"],
                 out[name]["tokens_per_s"] or 0, out[name]["latency_s"], new_tokens)
    return out


def speed_on_one_runtime(cfg, run_dir: Path, contenders: dict[str, dict[str, Any]],
                         students: dict[str, tuple[Path, Path | None]], items) -> None:
    """The evaluate stage's speed/size columns on llama.cpp (evaluate.speed_runtime), in place in `contenders`.

    Students are merged and exported to GGUF at the teacher's quantization (run/export/, reused on resume; the
    distilled one is the file the champion ships), then every contender, teacher included, is timed on the same
    prompts with the same answer length. Each row names its runtime; the transformers numbers stay under
    `own_runtime`."""
    from pipeline.evaluate.contenders import user_message
    from pipeline.models import resolve_gguf
    from pipeline.ship import ExportError, export_gguf, gguf_quant

    ev = cfg.evaluate
    embedded = cfg.teacher.backend == "llamacpp"
    for name, c in contenders.items():
        c.setdefault("runtime", f"{cfg.teacher.backend} (the teacher's backend)" if name == "teacher"
                     else "transformers (batched)")
    mode = ev.speed_runtime if ev.speed_runtime != "auto" else ("llamacpp" if embedded else "own")
    if mode == "own":
        return
    if not embedded:
        raise ExportError(f"evaluate.speed_runtime is llamacpp but the teacher runs on {cfg.teacher.backend!r}, not "
                          f"as an embedded GGUF; set evaluate.speed_runtime to own (or auto).")
    teacher_gguf = resolve_gguf(cfg.teacher.model)
    quant = gguf_quant(teacher_gguf) or "q8_0"
    try:
        source = resolve_gguf(cfg.student.cut_from)
        ggufs = {"teacher": teacher_gguf}
        for name, (model_dir, adapter) in students.items():
            done = export_gguf(model_dir, adapter, source, Path(run_dir) / "export", [quant], stem=name.replace("_", "-"))
            ggufs[name] = Path(done["paths"][quant])
    except ExportError as e:
        if ev.speed_runtime == "llamacpp":
            raise
        log.warning("speed: students stay on transformers (%s)", e)
        return
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(next(iter(students.values()))[0]))
    prompts = [tok.apply_chat_template(user_message(it), tokenize=False, add_generation_prompt=True)
               for it in items[:ev.speed_prompts]]
    for name, speed in same_runtime_speed(ggufs, prompts, ev.speed_new_tokens).items():
        c = contenders[name]
        c["own_runtime"] = {k: c.get(k) for k in ("runtime", "tokens_per_s", "latency_s", "disk_bytes")}
        c.update(speed)
