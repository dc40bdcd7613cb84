"""Shipping the student: adapter merged, written as GGUF, quantized by llama.cpp, loaded back by llama.cpp; the
champion served from runs/champion/; speed and size of every contender on one runtime."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest

from pipeline.config import RetrainConfig, load_config
from pipeline.models import cut_student_from_gguf, parse_layer_spec, resolve_gguf
from pipeline.ship import ExportError, check_quants, export_gguf, gguf_quant, write_gguf
from tests.conftest import TINY_STUDENT_DROP

PROMPTS = ["Give three tips for staying healthy.", "What is the capital of France?", "Write a haiku about the sea."]


def _lora_adapter(student_dir: Path, out: Path, std: float = 0.02) -> Path:
    """A real peft LoRA adapter on the student, saved as training saves it, with weights that change its outputs
    (an untrained LoRA has B = 0 and would merge into nothing, hiding a merge that never happened)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(student_dir)),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=std)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(student_dir)).save_pretrained(out)
    return out


def _prompt_ids(tok, text: str) -> list[int]:
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True,
                                   return_dict=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tests' 4-layer cut student, a LoRA adapter on it, and its GGUF export (f32, Q8_0, Q4_K_M)."""
    source = resolve_gguf("smollm2-135m-instruct")
    student = cut_student_from_gguf(source, parse_layer_spec(TINY_STUDENT_DROP, 30))
    root = tmp_path_factory.mktemp("ship")
    adapter = _lora_adapter(student, root / "adapter")
    made = export_gguf(student, adapter, source, root / "export", ["f32", "q8_0", "q4_k_m"])
    return {"source": source, "student": student, "adapter": adapter, "root": root, "made": made}


@pytest.mark.slow
def test_f32_gguf_computes_what_the_merged_model_computes(tiny):
    """llama.cpp on the exported file gives the merged HF model's logits (so q/k permutation, names, tied embeddings
    and the merge are right), and not the base model's."""
    import torch
    from llama_cpp import Llama

    from pipeline.evaluate.contenders import load_student

    merged, tok = load_student(tiny["student"], tiny["adapter"])
    base, _ = load_student(tiny["student"], None)
    llm = Llama(model_path=tiny["made"]["paths"]["f32"], n_ctx=512, n_threads=2, logits_all=True, verbose=False)
    try:
        for text in PROMPTS:
            ids = _prompt_ids(tok, text)
            llm.reset()
            llm.eval(ids)
            ours = np.array(llm.scores[:len(ids)])
            with torch.no_grad():
                theirs = merged(torch.tensor([ids])).logits[0].numpy()
                before = base(torch.tensor([ids])).logits[0].numpy()
            assert np.abs(ours - theirs).max() < 1e-2 * np.abs(theirs).max()
            assert np.abs(before - theirs).max() > 10 * np.abs(ours - theirs).max()  # the adapter was merged in
            assert (ours.argmax(-1) == theirs.argmax(-1)).all()
    finally:
        llm.close()


@pytest.mark.slow
def test_quantized_files_are_smaller_and_named_by_their_type(tiny):
    made, student = tiny["made"], tiny["student"]
    fp32_checkpoint = sum(p.stat().st_size for p in Path(student).glob("*.safetensors"))
    size = {q: Path(p).stat().st_size for q, p in made["paths"].items()}
    assert size["q8_0"] < fp32_checkpoint / 3 and size["q4_k_m"] < size["q8_0"]
    assert gguf_quant(Path(made["paths"]["q8_0"])) == "q8_0" and gguf_quant(Path(made["paths"]["q4_k_m"])) == "q4_k_m"
    manifest = json.loads((Path(made["paths"]["q8_0"]).parent / "student.export.json").read_text())
    assert manifest["files"]["q8_0"]["bytes"] == size["q8_0"] and manifest["adapter"] == str(tiny["adapter"])


@pytest.mark.slow
def test_q8_0_greedy_answers_equal_the_merged_models(tmp_path):
    """The demo's student (6 middle layers cut, confident enough to have a greedy answer), adapter merged, exported to
    Q8_0: llama.cpp's greedy tokens equal transformers' for the first 24 tokens (or up to the end of turn).

    Quantization tolerance, stated: an answer may part from transformers' only at a near tie, where the merged
    model's two best next tokens are within 0.5 logits of each other (Q8_0's rounding can flip those and nothing
    else), and at least one answer must match whole."""
    import torch
    from llama_cpp import Llama

    from pipeline.evaluate.contenders import load_student
    from pipeline.evaluate.runtime import llamacpp_greedy

    source = resolve_gguf("smollm2-135m-instruct")
    student = cut_student_from_gguf(source, "12-17")
    adapter = _lora_adapter(student, tmp_path / "adapter", std=0.005)
    made = export_gguf(student, adapter, source, tmp_path / "export", ["q8_0"])
    merged, tok = load_student(student, adapter)
    stop = [tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id]
    llm = Llama(model_path=made["paths"]["q8_0"], n_ctx=512, n_threads=2, verbose=False)
    whole = 0
    try:
        for text in PROMPTS:
            ids = _prompt_ids(tok, text)
            with torch.no_grad():
                hf = merged.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=stop,
                                     pad_token_id=tok.eos_token_id)[0, len(ids):].tolist()
            ours = llamacpp_greedy(llm, ids, len(hf))  # up to and with the end of turn, if it came
            if ours == hf:
                whole += 1
                continue
            k = next(i for i, (a, b) in enumerate(zip(ours, hf)) if a != b)
            with torch.no_grad():
                top2 = merged(torch.tensor([ids + hf[:k]])).logits[0, -1].topk(2).values
            assert float(top2[0] - top2[1]) < 0.5, f"{text!r}: token {k} differs where the merged model is sure"
    finally:
        llm.close()
    assert whole >= 1


def test_unknown_quantization_lists_the_known_ones():
    with pytest.raises(ExportError, match="q4_k_m") as e:
        check_quants(["q8_0", "q3_x"])
    assert "q3_x" in str(e.value)
    assert check_quants(["Q8_0", "q8_0", "q4_k_m"]) == ["q8_0", "q4_k_m"]


def test_a_non_llama_student_is_pointed_at_convert_hf_to_gguf(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(ExportError, match="convert_hf_to_gguf.py"):
        write_gguf(model, resolve_gguf("smollm2-135m-instruct"), tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def _promoted_run(runs_dir: Path, adapter: Path, quant: str):
    """A finished run whose distilled student (the tiny one + adapter) is promoted to champion."""
    from pipeline.registry import promote, register_model
    from pipeline.store import Run

    cfg = load_config(overrides=[f"runs_dir={runs_dir}", f"student.drop_layers={TINY_STUDENT_DROP}"])
    run = Run.create(cfg, "r1")
    shutil.copytree(adapter, run.path("adapter"))
    evaluation = {"eval_set": "dev", "items": 3, "distilled_student": {"rouge_l": 0.1, "rouge_l_ci": [0.05, 0.15]}}
    model_id = register_model(run, {"id": "r1/curated"}, evaluation, {"distilled_student": 0.1})
    decision = promote(run.catalog, model_id, RetrainConfig(champion_gguf=quant))
    return run, decision


@pytest.mark.slow
def test_the_champion_folder_holds_a_gguf_that_teacher_server_serves(tiny, tmp_path):
    from pipeline.cli import main
    from pipeline.teachers.server import serve_llamacpp

    runs_dir = tmp_path / "runs"
    run, decision = _promoted_run(runs_dir, tiny["adapter"], "q8_0")
    assert decision.promoted
    champion = runs_dir / "champion"
    files = list(champion.glob("*.gguf"))
    assert [f.name for f in files] == ["distilled-student.Q8_0.gguf"]
    pointer = json.loads((champion / "champion.json").read_text())
    assert pointer["gguf"] == str(files[0].resolve()) and pointer["gguf_quant"] == "q8_0"
    assert (champion / "adapter" / "adapter_config.json").exists()  # the adapter is still there too

    with serve_llamacpp(str(files[0]), n_ctx=512, n_threads=2) as server:
        reply = httpx.post(f"{server.base_url}/chat/completions", timeout=60, json={
            "model": "champion", "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": "Name a primary color."}]}).json()
    assert reply["usage"]["completion_tokens"] > 0 and reply["choices"][0]["message"]["content"]

    # `distill export-model runs/champion` exports the champion at any other type, from the same files
    assert main(["export-model", str(champion), "--quant", "q4_k_m", "--out", str(tmp_path / "out")]) == 0
    assert gguf_quant(tmp_path / "out" / "distilled-student.Q4_K_M.gguf") == "q4_k_m"


def test_no_champion_gguf_when_switched_off_or_nothing_to_export(tmp_path):
    """champion_gguf: null ships the adapter only; a run without a peft adapter is promoted without a GGUF."""
    fake = tmp_path / "fake-adapter"
    fake.mkdir()
    (fake / "adapter_model.safetensors").write_text("not weights")
    run, decision = _promoted_run(tmp_path / "runs", fake, "q8_0")
    assert decision.promoted and not list((tmp_path / "runs" / "champion").glob("*.gguf"))


@pytest.mark.slow
def test_speed_columns_come_from_one_runtime(tiny, tmp_path):
    """The evaluate stage's speed step: teacher and students timed as GGUFs in llama.cpp at the teacher's quant."""
    from pipeline.evaluate import load_eval_set
    from pipeline.evaluate.runtime import speed_on_one_runtime
    from pipeline.report import contender_table, evaluation_section

    cfg = load_config(overrides=[f"runs_dir={tmp_path}", f"student.drop_layers={TINY_STUDENT_DROP}",
                                 "evaluate.speed_prompts=2", "evaluate.speed_new_tokens=12"])
    items = load_eval_set(cfg.evaluate.eval_set, 2)
    contenders = {name: {"answers": ["x", "y"], "tokens_per_s": 5.0, "latency_s": 9.0, "disk_bytes": 1}
                  for name in ("teacher", "raw_student", "distilled_student")}
    students = {"raw_student": (tiny["student"], None), "distilled_student": (tiny["student"], tiny["adapter"])}
    speed_on_one_runtime(cfg, tmp_path, contenders, students, items)
    for name, c in contenders.items():
        assert c["runtime"] == "llama.cpp Q4_1" and c["speed_new_tokens"] == 12 and c["speed_prompts"] == 2
        assert c["tokens_per_s"] > 0 and c["own_runtime"]["tokens_per_s"] == 5.0
    assert contenders["teacher"]["disk_bytes"] == resolve_gguf("smollm2-135m-instruct").stat().st_size
    exported = tmp_path / "export" / "distilled-student.Q4_1.gguf"
    assert contenders["distilled_student"]["disk_bytes"] == exported.stat().st_size
    # the 4-layer students are a fraction of the teacher's file
    assert contenders["raw_student"]["disk_bytes"] < contenders["teacher"]["disk_bytes"] / 2

    ev = {"eval_set": "dev", "items": 2, "max_new_tokens": 16,
          **{k: {**c, "rouge_l": 0.1, "rouge_l_ci": [0.0, 0.2]} for k, c in contenders.items()}}
    table = "\n".join(contender_table(ev))
    assert "| runtime |" in table.splitlines()[0]
    assert table.count("llama.cpp Q4_1") == 3
    assert "Speed and size on one runtime" in "\n".join(evaluation_section(ev, {}))


def test_a_run_folder_without_a_model_says_what_to_pass(tmp_path):
    from pipeline.ship import resolve_export_source

    with pytest.raises(ExportError, match="runs/<run-id>"):
        resolve_export_source(tmp_path)
