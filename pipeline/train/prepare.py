"""Shared preparation for every training method: tokenizer, student, in-process teacher, rows, LoRA placement,
trainer arguments, the pre-flight checks, resuming, saving and the training summary.

Each method (sft.py, kd.py, on_policy.py) only builds its trainer from a `Prepared`; everything else lives here."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import TrainConfig
from pipeline.errors import ConfigError, DistillError
from pipeline.records import Record
from pipeline.train.checks import (PreflightReport, available_memory_gb, check_loss_mask, check_memory,
                                   end_of_turn_token, estimate_memory_gb, require_mask_ok, trim_after_end_of_turn,
                                   truncation_counts)

log = logging.getLogger(__name__)

# Module names of each placement keyword in Llama-style decoders (SmolLM2, Llama, Qwen, Mistral).
LORA_TARGETS = {"attention": ["q_proj", "k_proj", "v_proj", "o_proj"], "mlp": ["gate_proj", "up_proj", "down_proj"]}


@dataclass
class Prepared:
    """What every method's trainer is built from."""

    cfg: TrainConfig
    student_dir: Path
    out_dir: Path
    records: list[Record]
    tokenizer: Any
    model: Any
    rows: list[dict[str, Any]]
    eot: str
    counts: dict[str, Any]
    dtype: Any
    cuda: bool
    padding_free: bool
    lora: Any | None
    lora_layers: list[int] | None
    teacher: Any | None = None
    teacher_dir: Path | None = None
    layer_map: list[int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # method-specific facts for the summary


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


def lora_target_modules(target: str | list[str]) -> str | list[str]:
    """train.lora_target -> peft's target_modules: a keyword's module names, all-linear, or the list as given."""
    if isinstance(target, list):
        return target
    if target == "all-linear":
        return target
    if target in LORA_TARGETS:
        return list(LORA_TARGETS[target])
    raise ConfigError(f"train.lora_target {target!r} is not known: use attention, mlp, all-linear or a list of "
                      f"module names such as [q_proj, v_proj].")


def lora_layer_indices(spec: str, n_layers: int) -> list[int] | None:
    """train.lora_layers -> the decoder layers LoRA wraps (None: all), in the student's own numbering."""
    text = str(spec).strip().replace(" ", "")
    if text == "all":
        return None
    bounds = [round(n_layers * k / 3) for k in range(4)]  # thirds; 4 layers -> [0], [1, 2], [3]
    named = {"early": range(bounds[0], bounds[1]), "middle": range(bounds[1], bounds[2]),
             "late": range(bounds[2], bounds[3])}
    if text in named:
        layers = list(named[text])
    else:
        try:
            a, b = (int(x) for x in text.split("-", 1))
        except ValueError:
            raise ConfigError(f"train.lora_layers {spec!r} is not a layer choice: use all, early, middle, late or a "
                              f"block 'a-b' of the student's layers (0 to {n_layers - 1}).") from None
        if not 0 <= a <= b < n_layers:
            raise ConfigError(f"train.lora_layers {spec!r} is outside the student's layers 0 to {n_layers - 1}.")
        layers = list(range(a, b + 1))
    if not layers:
        raise ConfigError(f"train.lora_layers {spec!r} selects no layer of a {n_layers}-layer student; use all.")
    return layers


def decoder_linear_names(model) -> list[str]:
    """Leaf names of the linear modules inside the decoder layers (q_proj, ..., down_proj for Llama-style models):
    what peft's "all-linear" wraps there, spelled out, because peft accepts layers_to_transform only with a list."""
    import torch

    layers = model.get_decoder().layers
    return sorted({name.rsplit(".", 1)[-1] for name, m in layers.named_modules() if isinstance(m, torch.nn.Linear)})


def lora_config(cfg: TrainConfig, model):
    """The LoRA adapter's placement (modules and layers) and size; None for full fine-tuning."""
    from peft import LoraConfig

    if cfg.finetune == "full":
        return None, None
    layers = lora_layer_indices(cfg.lora_layers, model.config.num_hidden_layers)
    targets = lora_target_modules(cfg.lora_target)
    if layers is not None and targets == "all-linear":
        targets = decoder_linear_names(model)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, layers_to_transform=layers, task_type="CAUSAL_LM")
    return lora, layers


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


def load_teacher(teacher_dir: Path | str, student_tok, student_model, dtype, device: str):
    """The in-process teacher, frozen and in eval mode, after checking it shares the student's vocabulary."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.train.kd import check_same_vocab

    teacher_tok = AutoTokenizer.from_pretrained(str(teacher_dir))
    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=dtype)
    check_same_vocab(teacher_tok, student_tok, teacher.get_output_embeddings().weight.shape[0],
                     student_model.get_output_embeddings().weight.shape[0], str(teacher_dir),
                     str(getattr(student_model, "name_or_path", "the student")))
    teacher.requires_grad_(False)
    return teacher.to(device).eval()


def prepare(student_dir: Path, records: list[Record], cfg: TrainConfig, out_dir: Path, *, needs_teacher: bool,
            packing_ok: bool, teacher_dir: Path | str | None = None, chat_template: str | None = None,
            cut: list[int] | str | None = None) -> Prepared:
    """Tokenizer, student, rows, LoRA placement and (when the method or the hidden-state term needs one) teacher."""
    import torch
    from transformers import AutoModelForCausalLM

    if not records:
        raise DistillError("No accepted records to train on: every generated example was rejected. See the rejects "
                           "in the dataset folder; raise generate.target_instructions or loosen curate filters.")
    cuda = torch.cuda.is_available()
    tokenizer = load_tokenizer(student_dir, chat_template)
    rows = to_prompt_completion(records)
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    # Methods that need each example whole and padded (a teacher forward on the same rows) never pack.
    padding_free = _padding_free(cfg, cuda) and packing_ok and cfg.hidden_loss_weight == 0
    model = AutoModelForCausalLM.from_pretrained(
        str(student_dir), dtype=dtype, attn_implementation=_attention_implementation(padding_free))
    teacher = None
    if needs_teacher or cfg.hidden_loss_weight > 0:
        if teacher_dir is None:
            raise DistillError(f"train.method={cfg.method}" + (" with hidden_loss_weight > 0" if cfg.hidden_loss_weight
                               else "") + " needs an in-process teacher checkpoint; set train.kd_teacher or "
                               "student.cut_from to the teacher's GGUF.")
        from pipeline.scale.distributed import device_for_this_process

        # cuda:<local rank> under a multi-process launch; plain "cuda" would put every rank's teacher on GPU 0.
        teacher = load_teacher(teacher_dir, tokenizer, model, dtype, device_for_this_process(cuda))
    layer_map = None
    if cfg.hidden_loss_weight > 0:
        from pipeline.train.hidden import layer_map as derive_map

        layer_map = derive_map(teacher.config.num_hidden_layers, model.config.num_hidden_layers, cut)
        if teacher.config.hidden_size != model.config.hidden_size:
            raise DistillError(f"train.hidden_loss_weight needs teacher and student of one hidden size (teacher "
                               f"{teacher.config.hidden_size}, student {model.config.hidden_size}); use a student cut "
                               f"from its teacher, or set train.hidden_loss_weight=0.")
    lora, lora_layers = lora_config(cfg, model)
    return Prepared(cfg=cfg, student_dir=Path(student_dir), out_dir=Path(out_dir), records=records,
                    tokenizer=tokenizer, model=model, rows=rows, eot=end_of_turn_token(tokenizer),
                    counts=truncation_counts(tokenizer, rows, cfg.max_length), dtype=dtype, cuda=cuda,
                    padding_free=padding_free, lora=lora, lora_layers=lora_layers, teacher=teacher,
                    teacher_dir=Path(teacher_dir) if teacher_dir else None, layer_map=layer_map)


def common_args(prep: Prepared) -> dict[str, Any]:
    """Trainer arguments every method shares (TRL's CPU-hostile defaults turned off: bf16, checkpointing)."""
    import torch

    from pipeline.scale.distributed import split_batch

    cfg = prep.cfg
    steps_per_epoch = max(1, math.ceil(len(prep.rows) / cfg.batch_size / cfg.grad_accum))
    # On N processes (torchrun / accelerate launch) the configured batch is split so one optimizer step still sees
    # train.batch_size * train.grad_accum examples.
    per_device, accum = split_batch(cfg.batch_size, cfg.grad_accum)
    return dict(
        output_dir=str(prep.out_dir / "checkpoints"),
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accum,
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
        bf16=prep.dtype == torch.bfloat16,
        use_cpu=not prep.cuda,
        seed=cfg.seed,
        report_to="none",
        disable_tqdm=False,
    )


def sft_args(prep: Prepared):
    """SFTConfig for the methods trained on the teacher's text (sft, kd): completion-only loss."""
    from trl import SFTConfig

    return SFTConfig(**common_args(prep), max_length=prep.cfg.max_length, completion_only_loss=True,
                     # TRL enforces max_length in padding-free mode only through packing (best-fit decreasing keeps
                     # examples whole).
                     padding_free=prep.padding_free, packing=prep.padding_free, packing_strategy="bfd",
                     dataset_num_proc=None)


def trainer_class(prep: Prepared, base: type) -> type:
    """The method's trainer class, with the hidden-state term mixed in when train.hidden_loss_weight > 0."""
    if prep.cfg.hidden_loss_weight <= 0:
        return base
    from pipeline.train.hidden import HiddenStateMixin

    return type(f"HiddenState{base.__name__}", (HiddenStateMixin, base), {})


def attach_hidden(prep: Prepared, trainer) -> None:
    """Hand the hidden-state term its teacher, layer map, weight and distance."""
    if prep.cfg.hidden_loss_weight > 0:
        trainer.hidden_setup(prep.teacher, prep.layer_map, prep.cfg.hidden_loss_weight, prep.cfg.hidden_loss)


def mask_after_end_of_turn(prep: Prepared, trainer) -> bool:
    """TRL trains the template's trailing newline after <|im_end|> too; cut the loss at the end-of-turn token,
    then check the mask on a rendered example (True when it is exactly response + end-of-turn)."""
    eot_id = prep.tokenizer.convert_tokens_to_ids(prep.eot)
    trainer.train_dataset = trainer.train_dataset.map(
        lambda ex: {"labels": trim_after_end_of_turn(ex["labels"], eot_id)}, desc="Masking after end-of-turn")
    ok = _check_rendered_example(prep.tokenizer, trainer.train_dataset, prep.records, prep.eot, prep.cfg.max_length)
    require_mask_ok(ok, prep.eot)
    return ok


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


def preflight(prep: Prepared, trainer, mask_ok: bool, seq_len: int | None = None) -> PreflightReport:
    """Counts, mask check and memory estimate, logged and returned for train.json."""
    import torch

    cfg, model, teacher = prep.cfg, trainer.model, prep.teacher
    n_params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    mc = prep.model.config
    est = estimate_memory_gb(n_params, trainable, cfg.batch_size, seq_len or cfg.max_length, mc.hidden_size,
                             mc.num_hidden_layers, 2 if prep.dtype != torch.float32 else 4, mc.vocab_size,
                             sum(p.numel() for p in teacher.parameters()) if teacher is not None else 0)
    avail = available_memory_gb(prep.cuda)
    if cfg.check_memory:
        check_memory(est, avail, cfg.batch_size, "GPU memory" if prep.cuda else "RAM")
    counts = prep.counts
    report = PreflightReport(examples=len(prep.rows), truncated=counts["truncated"],
                             truncated_responses_lost=counts["lost"], max_tokens=counts["max_tokens"],
                             mean_tokens=round(counts["mean_tokens"], 1), end_of_turn=prep.eot, mask_ok=mask_ok,
                             est_memory_gb=round(est, 2), available_memory_gb=round(avail, 1))
    log.info("Preflight: %s", report.as_dict())
    return report


def fingerprint(records: list[Record], cfg: TrainConfig, student_dir: Path) -> str:
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


def fit_and_save(prep: Prepared, trainer, report: PreflightReport, resume: bool) -> dict[str, Any]:
    """Train (resuming an interrupted run), save the adapter or model, and return the summary for train.json."""
    from pipeline.scale.distributed import batch_layout

    cfg, out_dir = prep.cfg, prep.out_dir
    # Under a multi-process launch the main process sets the checkpoint folder straight first, the others then read it.
    with trainer.args.main_process_first(desc="checkpoint folder"):
        checkpoint = last_checkpoint(out_dir, fingerprint(prep.records, cfg, prep.student_dir)) if resume else None
    start_step = int(checkpoint.name.split("-")[1]) if checkpoint else 0
    if checkpoint:
        log.info("Resuming from %s", checkpoint)
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    tokenizer = trainer.processing_class
    outputs: dict[str, str] = {}
    main = trainer.is_world_process_zero()  # one writer of files under a multi-process launch
    if cfg.finetune == "full":
        outputs["model"] = str(out_dir / "model")
        trainer.save_model(outputs["model"])  # gathers sharded weights on every rank, writes on the main one
        if main:
            tokenizer.save_pretrained(outputs["model"])
    elif not main:
        outputs["adapter"] = str(out_dir / "adapter")
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
    summary = {"student": str(prep.student_dir), **outputs, "examples": report.examples,
               "method": cfg.method, "finetune": cfg.finetune, "steps": trainer.state.global_step,
               "resumed_from_step": start_step, "train_loss": result.training_loss,
               "first_loss": losses[0]["loss"] if losses else None, "last_loss": losses[-1]["loss"] if losses else None,
               "params": sum(p.numel() for p in trainer.model.parameters()),
               "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
               "device": str(trainer.args.device.type), "dtype": "bfloat16" if trainer.args.bf16 else "float32",
               "preflight": report.as_dict(), "runtime_s": runtime,
               "tokens_per_s": tokens_per_second(history, runtime, start_step),
               "lora": None if prep.lora is None else {"target": cfg.lora_target, "layers": cfg.lora_layers,
                                                      "layer_indices": prep.lora_layers, "r": cfg.lora_r},
               "teacher": str(prep.teacher_dir) if prep.teacher is not None else None,
               "train_config": cfg.model_dump(mode="json"),
               "batch": batch_layout(cfg.batch_size, cfg.grad_accum), **prep.extra}
    if cfg.hidden_loss_weight > 0:
        summary["hidden"] = {"weight": cfg.hidden_loss_weight, "loss": cfg.hidden_loss,
                             "layer_map": {str(s): t for s, t in enumerate(prep.layer_map)},
                             "last_hidden_loss": getattr(trainer, "last_hidden_loss", None)}
    if main:
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
