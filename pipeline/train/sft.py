"""Fine-tuning through TRL's SFTTrainer (LoRA or full; SFT or logit distillation), with the checks that catch
silent failures before training starts: truncation counts, the loss mask on a rendered example, memory."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

from pipeline.config import TrainConfig
from pipeline.errors import DistillError
from pipeline.records import Record
from pipeline.train.checks import (PreflightReport, available_memory_gb, check_loss_mask, check_memory,
                                   end_of_turn_token, estimate_memory_gb, require_mask_ok, trim_after_end_of_turn,
                                   truncation_counts)

# Kept importable from here: older callers and tests use these names.
__all__ = ["train_lora", "build_trainer", "to_prompt_completion", "PreflightReport", "end_of_turn_token",
           "check_loss_mask", "estimate_memory_gb", "plot_curves"]

log = logging.getLogger(__name__)


def to_prompt_completion(records: list[Record]) -> list[dict[str, Any]]:
    """Records -> conversational prompt/completion rows (TRL then computes loss on the completion only)."""
    from pipeline.generate.prompts import render

    return [{"prompt": [{"role": "user", "content": render("response", instruction=r.instruction, input=r.input)}],
             "completion": [{"role": "assistant", "content": r.output}], "record_index": i}
            for i, r in enumerate(records)]


def load_tokenizer(student_dir: Path | str, chat_template: str | None = None):
    """The student's tokenizer; a declared chat template replaces a missing one, never a silent fallback."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(student_dir))
    if chat_template:
        path = Path(chat_template).expanduser()
        tokenizer.chat_template = path.read_text() if path.suffix in (".j2", ".jinja") and path.exists() else chat_template
    if not tokenizer.chat_template:
        raise DistillError(f"Student {student_dir} has no chat template, so the prompt format and the end-of-turn "
                           f"token the student must learn are undefined. Declare one: add chat_template to its "
                           f"tokenizer_config.json, or use a student that ships one (an -Instruct model).")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _padding_free(cfg: TrainConfig, cuda: bool) -> bool:
    """Padding-free (packed) batches: on for CUDA by default, off on CPU unless asked for.

    Packed rows carry no attention mask, only position_ids that restart at 0 for each example; transformers turns
    those into a block-diagonal mask for sdpa/eager and into varlen calls for flash-attention, so examples never
    attend across their boundaries with any attention implementation (tests/test_train.py checks the losses match)."""
    if cfg.padding_free == "auto":
        return cuda
    return cfg.padding_free == "on"


def _attention_implementation(padding_free: bool) -> str | None:
    import importlib.util

    # flash-attention skips the packed mask entirely (varlen kernels); without it, sdpa with the block mask.
    return "flash_attention_2" if padding_free and importlib.util.find_spec("flash_attn") is not None else None


def build_trainer(student_dir: Path, records: list[Record], cfg: TrainConfig, out_dir: Path,
                  teacher_dir: Path | str | None = None, chat_template: str | None = None):
    """Everything up to trainer.train(): tokenizer, model, data, checks. Returns (trainer, preflight report)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig

    if not records:
        raise DistillError("No accepted records to train on: every generated example was rejected. See the rejects "
                           "in the dataset folder; raise generate.target_instructions or loosen curate filters.")
    cuda = torch.cuda.is_available()
    tokenizer = load_tokenizer(student_dir, chat_template)
    rows = to_prompt_completion(records)
    eot = end_of_turn_token(tokenizer)
    counts = truncation_counts(tokenizer, rows, cfg.max_length)

    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    # KD needs each example whole and padded (teacher forward, top-k lookup by token ids): no packing there.
    padding_free = _padding_free(cfg, cuda) and cfg.method != "kd"
    model = AutoModelForCausalLM.from_pretrained(
        str(student_dir), dtype=dtype, attn_implementation=_attention_implementation(padding_free))
    teacher = None
    if cfg.method == "kd" and cfg.kd_alpha < 1.0 and cfg.kd_source == "model":
        from pipeline.train.kd import load_teacher

        if teacher_dir is None:
            raise DistillError("train.method=kd with kd_source=model needs a teacher checkpoint; set train.kd_teacher "
                               "or student.cut_from to the teacher's GGUF.")
        teacher = load_teacher(teacher_dir, tokenizer, model, dtype, "cuda" if cuda else "cpu")
    lora = None if cfg.finetune == "full" else LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=cfg.target_modules,
        task_type="CAUSAL_LM")
    steps_per_epoch = max(1, math.ceil(len(rows) / cfg.batch_size / cfg.grad_accum))
    args = SFTConfig(
        output_dir=str(Path(out_dir) / "checkpoints"),
        max_length=cfg.max_length,
        completion_only_loss=True,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        logging_steps=1,
        save_strategy="steps",
        save_steps=min(steps_per_epoch, cfg.max_steps) if cfg.max_steps > 0 else steps_per_epoch,
        save_total_limit=1,
        # Small students do not need it, and it slows CPU training (TRL turns it on by default).
        gradient_checkpointing=False,
        bf16=dtype == torch.bfloat16,
        # TRL enforces max_length in padding-free mode only through packing (best-fit decreasing keeps examples whole).
        padding_free=padding_free,
        packing=padding_free,
        packing_strategy="bfd",
        use_cpu=not cuda,
        seed=cfg.seed,
        report_to="none",
        disable_tqdm=False,
        dataset_num_proc=None,
    )
    common = dict(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                  peft_config=lora)
    if cfg.method == "kd":
        from pipeline.train.kd import KDTrainer

        trainer = KDTrainer(**common, kd_alpha=cfg.kd_alpha, kd_temperature=cfg.kd_temperature, teacher=teacher)
    else:
        from trl import SFTTrainer

        trainer = SFTTrainer(**common)

    # TRL trains the template's trailing newline after <|im_end|> too; the loss must end at the end-of-turn token.
    eot_id = tokenizer.convert_tokens_to_ids(eot)
    trainer.train_dataset = trainer.train_dataset.map(
        lambda ex: {"labels": trim_after_end_of_turn(ex["labels"], eot_id)}, desc="Masking after end-of-turn")
    mask_ok = _check_rendered_example(tokenizer, trainer.train_dataset, records, eot, cfg.max_length)
    require_mask_ok(mask_ok, eot)
    if cfg.method == "kd" and cfg.kd_alpha < 1.0 and cfg.kd_source == "logprobs":
        trainer.topk_lookup, trainer.kd_coverage = _topk_lookup(tokenizer, trainer.train_dataset, records, cfg)

    n_params = sum(p.numel() for p in trainer.model.parameters())
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    mc = model.config
    est = estimate_memory_gb(n_params, trainable, cfg.batch_size, cfg.max_length, mc.hidden_size,
                             mc.num_hidden_layers, 2 if dtype != torch.float32 else 4, mc.vocab_size,
                             sum(p.numel() for p in teacher.parameters()) if teacher is not None else 0)
    avail = available_memory_gb(cuda)
    if cfg.check_memory:
        check_memory(est, avail, cfg.batch_size, "GPU memory" if cuda else "RAM")
    preflight = PreflightReport(examples=len(rows), truncated=counts["truncated"],
                                truncated_responses_lost=counts["lost"], max_tokens=counts["max_tokens"],
                                mean_tokens=round(counts["mean_tokens"], 1), end_of_turn=eot, mask_ok=mask_ok,
                                est_memory_gb=round(est, 2), available_memory_gb=round(avail, 1))
    log.info("Preflight: %s", preflight.as_dict())
    return trainer, preflight


def _check_rendered_example(tokenizer, dataset, records: list[Record], eot: str, max_length: int) -> bool:
    """The loss-mask check on the first example that was not truncated (a truncated one has no end-of-turn)."""
    eot_id = tokenizer.convert_tokens_to_ids(eot)
    outputs = {r.output.strip(): r.output for r in records}
    for ex in dataset:
        if "record_index" in ex:
            if len(ex["input_ids"]) >= max_length:
                continue
            return check_loss_mask(tokenizer, ex["input_ids"], ex["labels"], records[ex["record_index"]].output, eot)
        # A packed row: check its first labelled run, which must be one record's response plus the end-of-turn
        # token. Packing truncates an over-long example to max_length, so a truncated one fills a row by itself.
        labels = ex["labels"]
        first = next((i for i, lab in enumerate(labels) if lab != -100), None)
        if first is None:
            return False
        end = next((j for j in range(first, len(labels)) if labels[j] == -100), len(labels))
        if labels[end - 1] != eot_id and len(labels) >= max_length:
            continue
        match = outputs.get(tokenizer.decode(ex["input_ids"][first:end - 1]).strip())
        return match is not None and check_loss_mask(tokenizer, ex["input_ids"][:end], labels[:end], match, eot)
    log.warning("Every example is longer than train.max_length=%d; the loss-mask check had nothing whole to check.",
                max_length)
    return True


def _topk_lookup(tokenizer, dataset, records: list[Record], cfg: TrainConfig) -> tuple[dict[tuple, tuple], dict]:
    """Token ids of each example -> (positions, teacher top-k ids, logprobs), from the records' stored logprobs."""
    import torch

    from pipeline.train.kd import align_topk, piece_index

    stored = [getattr(r, "teacher_logprobs", None) for r in records]
    if not any(stored):
        raise DistillError("train.kd_source=logprobs but no record carries teacher top-k logprobs. Generate with "
                           "logprobs captured, or use train.kd_source=model (an in-process teacher).")
    index = piece_index(tokenizer)
    k = max((len(e.get("top") or {}) for lp in stored if lp for e in lp), default=1)
    lookup, unknown, seen, aligned, trained = {}, 0, 0, 0, 0
    for ex in dataset:
        pos, ids, lps, unk = align_topk(tokenizer, ex["input_ids"], ex["labels"], stored[ex["record_index"]], index, k)
        unknown += unk
        seen += sum(len(e.get("top") or {}) for e in (stored[ex["record_index"]] or [])[:len(pos) + 1])
        aligned += len(pos)
        trained += sum(1 for lab in ex["labels"] if lab != -100)
        if pos:
            lookup[tuple(ex["input_ids"])] = (torch.tensor(pos), torch.tensor(ids), torch.tensor(lps))
    if seen and unknown > 0.05 * seen:
        raise DistillError(f"Logit distillation needs teacher and student to share one vocabulary, and they differ: "
                           f"{unknown} of {seen} stored teacher top-k tokens are not in the student's vocabulary. "
                           f"Use train.method=sft, or a student from the teacher's family.")
    log.info("KD from stored logprobs: teacher top-%d on %d of %d trained tokens (the rest train on CE only).",
             k, aligned, trained)
    return lookup, {"top_k": k, "tokens_with_teacher": aligned, "trained_tokens": trained}


def _fingerprint(records: list[Record], cfg: TrainConfig, student_dir: Path) -> str:
    blob = json.dumps([str(student_dir), cfg.model_dump(mode="json", exclude={"max_steps", "epochs", "merge", "check_memory"}),
                       [r.id for r in records]], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def last_checkpoint(out_dir: Path, fingerprint: str) -> Path | None:
    """The newest checkpoint of an interrupted run on the same data and config (others are set aside, not reused)."""
    ckpt_dir = Path(out_dir) / "checkpoints"
    marker = ckpt_dir / "fingerprint.txt"
    checkpoints = sorted(ckpt_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    if checkpoints and marker.exists() and marker.read_text().strip() != fingerprint:
        log.warning("Checkpoints in %s come from other data or settings; starting fresh.", ckpt_dir)
        shutil.rmtree(ckpt_dir)
        checkpoints = []
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(fingerprint)
    return checkpoints[-1] if checkpoints else None


def train_lora(student_dir: Path, records: list[Record], cfg: TrainConfig, out_dir: Path,
               resume: bool = True, teacher_dir: Path | str | None = None,
               chat_template: str | None = None) -> dict[str, Any]:
    """Fine-tune the student on the accepted records (LoRA or full, SFT or KD); returns the training summary."""
    out_dir = Path(out_dir)
    trainer, preflight = build_trainer(student_dir, records, cfg, out_dir, teacher_dir, chat_template)
    checkpoint = last_checkpoint(out_dir, _fingerprint(records, cfg, student_dir)) if resume else None
    start_step = int(checkpoint.name.split("-")[1]) if checkpoint else 0
    if checkpoint:
        log.info("Resuming from %s", checkpoint)
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    tokenizer = trainer.processing_class
    outputs: dict[str, str] = {}
    if cfg.finetune == "full":
        outputs["model"] = str(out_dir / "model")
        trainer.save_model(outputs["model"])
        tokenizer.save_pretrained(outputs["model"])
    else:
        outputs["adapter"] = str(out_dir / "adapter")
        trainer.model.save_pretrained(outputs["adapter"])
        tokenizer.save_pretrained(outputs["adapter"])
        if cfg.merge:
            outputs["merged"] = str(out_dir / "merged")
            merged = trainer.model.merge_and_unload()
            merged.save_pretrained(outputs["merged"])
            tokenizer.save_pretrained(outputs["merged"])
    history = trainer.state.log_history
    losses = [h for h in history if "loss" in h]
    runtime = result.metrics.get("train_runtime")
    summary = {"student": str(student_dir), **outputs, "examples": preflight.examples,
               "method": cfg.method, "finetune": cfg.finetune, "steps": trainer.state.global_step,
               "resumed_from_step": start_step, "train_loss": result.training_loss,
               "first_loss": losses[0]["loss"] if losses else None, "last_loss": losses[-1]["loss"] if losses else None,
               "params": sum(p.numel() for p in trainer.model.parameters()),
               "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
               "device": str(trainer.args.device.type), "dtype": "bfloat16" if trainer.args.bf16 else "float32",
               "preflight": preflight.as_dict(), "runtime_s": runtime,
               "tokens_per_s": tokens_per_second(history, runtime, start_step),
               "train_config": cfg.model_dump(mode="json")}
    if cfg.method == "kd":
        summary["kd"] = {"alpha": cfg.kd_alpha, "temperature": cfg.kd_temperature, "source": cfg.kd_source,
                         "teacher": str(teacher_dir) if teacher_dir else None,
                         "coverage": getattr(trainer, "kd_coverage", None),
                         "rows_with_topk": trainer.topk_rows if trainer.topk_lookup is not None else None}
    (out_dir / "train_log.json").write_text(json.dumps(history, indent=2))
    plot_curves(history, out_dir / "training_curves.png")
    return summary


def tokens_per_second(history: list[dict[str, Any]], runtime: float | None, start_step: int = 0) -> float | None:
    """Tokens (prompt + response, padding excluded) processed per second in this call, from TRL's num_tokens log.

    TRL's token counter starts at zero in each process, so after a resume the newest count covers this call only."""
    counts = [h["num_tokens"] for h in history if "num_tokens" in h and h.get("step", 0) > start_step]
    if not counts or not runtime:
        return None
    return round(counts[-1] / runtime, 1)


def plot_curves(log_history: list[dict[str, Any]], path: Path) -> None:
    """Loss and learning rate per step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in log_history if "loss" in h]
    if not steps:
        return
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ax[0].plot(steps, [h["loss"] for h in log_history if "loss" in h], marker=".")
    ax[0].set(title="training loss", xlabel="step")
    ax[1].plot(steps, [h.get("learning_rate", 0) for h in log_history if "loss" in h], color="tab:orange")
    ax[1].set(title="learning rate", xlabel="step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
