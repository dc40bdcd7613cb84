"""Run configuration: one YAML file per run, validated by pydantic before any work starts."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline import DATA_DIR, PROFILES_DIR
from pipeline.errors import ConfigError

DEFAULT_PROFILE = "cpu-demo"


class Strict(BaseModel):
    """Base for config sections: a misspelled key is an error, never silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TeacherConfig(Strict):
    backend: str = Field("llamacpp", description="Teacher backend by name: llamacpp (embedded), openai (any OpenAI-compatible base_url), openai-batch (OpenAI Batch API: half price, hours), vllm (in-process).")
    model: str = Field("smollm2-135m-instruct", description="Model: a GGUF path or packaged alias for llamacpp, the served model name for openai, a hub id or path for vllm.")
    base_url: str | None = Field(None, description="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 for vLLM or llama.cpp servers.")
    extra_base_urls: list[str] = Field(default_factory=list, description="More endpoints serving the same model; requests are spread round-robin over base_url and these.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Name of the environment variable holding the API key (the key itself never goes in a config).")
    api_key_secret_block: str | None = Field(None, description="Name of a Prefect Secret block holding the API key; used instead of api_key_env when set.")
    max_concurrency: int = Field(8, ge=1, le=1024, description="Requests in flight at once (HTTP backends).")
    timeout_s: float = Field(120.0, gt=0, description="Per-request timeout in seconds.")
    max_retries: int = Field(5, ge=0, le=20, description="Retries with exponential backoff and jitter on 429/5xx/timeouts/dropped connections (Retry-After honoured) and on malformed JSON replies.")
    malformed_backoff_s: float = Field(0.5, gt=0, le=60, description="First backoff for retrying a malformed JSON reply (doubling, jittered); the SDK's own 429/5xx backoff starts at 0.5 s and is fixed.")
    batch_poll_s: float = Field(30.0, gt=0, description="openai-batch backend: seconds between status checks of a submitted Batch API job.")
    batch_completion_window: str = Field("24h", description="openai-batch backend: the Batch API completion window (OpenAI accepts 24h).")
    n_ctx: int = Field(2048, ge=256, description="Context window for the embedded llama.cpp teacher.")
    n_threads: int | None = Field(None, ge=1, description="llama.cpp threads; default one per core (oversubscription collapses throughput).")
    seed: int = Field(0, description="Base sampling seed; each request derives its own from its cache key so results are reproducible.")
    price_per_1m_input: float = Field(0.0, ge=0, description="Dollars per million prompt tokens, for the cost ledger.")
    price_per_1m_output: float = Field(0.0, ge=0, description="Dollars per million completion tokens, for the cost ledger.")
    budget_usd: float | None = Field(None, gt=0, description="Stop teacher calls cleanly once this many dollars are spent.")
    budget_tokens: int | None = Field(None, gt=0, description="Stop teacher calls cleanly once this many tokens (in + out) are spent.")


class GenerateConfig(Strict):
    mode: Literal["self-instruct", "alpaca", "responses", "magpie"] = Field(
        "self-instruct", description="self-instruct: the paper's bootstrap loop; alpaca: 3 seeds in, up to 20 "
        "instruction/input/output triples out per prompt; responses: the teacher answers your instructions "
        "(responses_from); magpie: the teacher writes user requests from its chat template's user-turn opening, then answers them.")
    seed_tasks: Path = Field(DATA_DIR / "self_instruct_seed_tasks.jsonl", description="Self-Instruct seed tasks (JSONL: instruction, instances[{input, output}], is_classification).")
    prompt_style: Literal["completion", "chat"] = Field("completion", description="completion: few-shot 'Task 9:' prompt (base/small models); chat: a request for a numbered list.")
    target_instructions: int = Field(40, ge=1, description="Stop once this many new instructions passed the filters.")
    max_prompts: int = Field(40, ge=1, description="Hard cap on instruction-generation prompts, whatever the yield.")
    prompts_per_round: int = Field(4, ge=1, description="Prompts sent together per bootstrap round; the pool grows between rounds.")
    seed_examples: int = Field(6, ge=0, description="Human seed instructions shown per prompt (paper: 6).")
    machine_examples: int = Field(2, ge=0, description="Machine-generated instructions shown per prompt once available (paper: 2).")
    temperature: float = Field(0.7, ge=0, le=2, description="Sampling temperature for instruction generation.")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling for instruction generation.")
    max_tokens: int = Field(256, ge=16, description="Max new tokens per instruction-generation prompt.")
    response_temperature: float = Field(0.0, ge=0, le=2, description="Temperature for the teacher's answers (0 = greedy).")
    response_max_tokens: int = Field(256, ge=16, description="Max new tokens per answer.")
    response_logprobs: int = Field(0, ge=0, le=20, description="Store the teacher's top-k logprobs per answer token (for train.kd_source=logprobs); 0 = off.")
    random_seed: int = Field(42, description="Seeds the choice of examples per prompt; recorded with every record.")
    instances: Literal["paper", "answer", "paper-or-answer"] = Field(
        "paper-or-answer", description="self-instruct outputs. paper: identify classification tasks, then make instances "
        "output-first for those and input-first otherwise; answer: the teacher just answers the instruction; "
        "paper-or-answer: paper, and answer the instruction where no instance parses.")
    classification_examples: int = Field(12, ge=2, description="Seed tasks shown in the 'is it classification?' prompt (half of each kind).")
    instance_examples: int = Field(3, ge=1, description="Seed tasks with instances shown per instance-generation prompt.")
    instance_max_tokens: int = Field(200, ge=16, description="Max new tokens per instance-generation prompt.")
    alpaca_seed_examples: int = Field(3, ge=1, description="alpaca: seed tasks shown per prompt (Alpaca: 3).")
    alpaca_tasks_per_prompt: int = Field(20, ge=2, description="alpaca: triples asked for per prompt (Alpaca: 20).")
    alpaca_max_tokens: int = Field(1024, ge=64, description="alpaca: max new tokens per prompt (20 triples need room).")
    responses_from: Path | None = Field(None, description="responses: your instructions as JSONL, CSV or Parquet, or a "
                                        "`datasets` dataset saved to disk; columns 'instruction' (or 'prompt') and optional 'input'.")
    responses_n: int = Field(1, ge=1, le=16, description="responses: answers sampled per instruction (best-of-n).")
    responses_choice: Literal["first", "longest", "judge-best"] = Field(
        "first", description="responses: which of the n answers to keep; judge-best asks the teacher as a pairwise judge "
        "(both orders) in a knockout over the samples: 2(n-1) extra calls per instruction.")
    magpie_template: Literal["chatml", "llama3", "gemma"] = Field("chatml", description="magpie: the chat template whose user-turn opening is the prompt (SmolLM2 and Qwen use chatml).")
    magpie_system: str = Field("You are a helpful AI assistant named SmolLM, trained by Hugging Face",
                               description="magpie: system message before the user turn ('' for none).")
    magpie_temperature: float = Field(1.0, ge=0, le=2, description="magpie: temperature for writing user requests (Magpie: 1.0).")
    magpie_max_tokens: int = Field(128, ge=8, description="magpie: max new tokens per user request.")
    evol_rounds: int = Field(0, ge=0, le=8, description="Evol-Instruct rounds over the kept records of any mode (0: off): "
                             "each round rewrites every surviving instruction deeper or broader, answers it, and drops "
                             "failed evolutions by WizardLM's elimination rules.")


class CurateConfig(Strict):
    min_words: int = Field(4, ge=0, description="Drop instructions of fewer words than this (whitespace split). The default 4 is Alpaca's rule exactly: it drops `len(inst.split()) <= 3`.")
    max_words: int = Field(150, ge=1, description="Drop instructions of more words than this (Alpaca: `len(inst.split()) > 150`).")
    blacklist: list[str] = Field(
        default_factory=lambda: ["image", "images", "graph", "graphs", "picture", "pictures", "file", "files",
                                 "map", "maps", "draw", "plot", "go to", "video", "audio", "music",
                                 "flowchart", "diagram"],
        description="Alpaca's keywords a text-only model cannot serve; matched as whole words.",
    )
    rouge_threshold: float = Field(0.7, gt=0, le=1, description="Near-duplicate rule: drop when ROUGE-L F against any kept instruction (seeds included) is above this.")
    dedupe_against_seeds: bool = Field(True, description="Count the seed instructions as already kept (Alpaca and Self-Instruct do).")
    decontaminate_ngram: int = Field(8, ge=1, description="n for the n-gram overlap check against the evaluation sets.")
    decontaminate_threshold: float = Field(0.5, gt=0, le=1, description="Drop a record when this fraction of its instruction+input n-grams occurs in an eval item.")
    prior_datasets: list[Path] = Field(default_factory=list, description="Earlier dataset version folders (runs/<id>/datasets/curated): their saved near-duplicate pool counts as kept, so new data is deduped against every earlier version.")
    top_leading_verbs: int = Field(20, ge=1, description="How many leading verbs the diversity statistics list.")
    quality: list[QualityScorer] = Field(default_factory=list, description="Model-based scorers applied in order after the rules and near-duplicates, each to the records still accepted: judge, ifd, reward (e.g. [{scorer: ifd, keep_fraction: 0.8}]). Scores are saved on every record.")
    select: SelectConfig | None = Field(None, description="Keep the top records by combined score, per leading-verb bucket; the rest become rejects with reason not_selected. null: keep all.")

    @model_validator(mode="after")
    def _select_has_scores(self) -> "CurateConfig":
        if self.select is not None and self.select.by != "random":
            names = {q.scorer for q in self.quality}
            if not names or (self.select.by != "quality" and self.select.by not in names):
                raise ValueError(f"curate.select.by={self.select.by} needs "
                                 f"{'a curate.quality scorer' if self.select.by == 'quality' else 'the ' + self.select.by + ' scorer in curate.quality'}"
                                 f" (configured: {sorted(names) or 'none'}); add it, or use by: random")
        return self


class JudgeScorerConfig(Strict):
    """AlpaGasus: a teacher rates each (instruction, input, output) 1-5 with a short reason."""

    scorer: Literal["judge"] = Field("judge", description="Rate each record 1-5 with a short reason through a teacher backend (prompts/judge_rating.j2); same cache, ledger and budget as generation.")
    teacher: TeacherConfig | None = Field(None, description="The judge (any teacher backend, same keys as teacher:); null: the run's own teacher.")
    min_score: float | None = Field(4.0, ge=1, le=5, description="Reject records rated below this as low_judge_score (AlpaGasus kept 4.5 and up on 0-5); null: no threshold.")
    keep_fraction: float | None = Field(None, gt=0, le=1, description="Then keep only this top fraction by rating (ties kept together); null: no fraction.")
    max_tokens: int = Field(96, ge=8, description="Max new tokens of the judge's reply (a score line and a one-sentence reason).")


class IFDScorerConfig(Strict):
    """Cherry LLM (Li et al. 2023): instruction-following difficulty computed by a small local model."""

    scorer: Literal["ifd"] = Field("ifd", description="IFD = loss(answer | instruction) / loss(answer alone) under a small local model, batched.")
    model: str = Field("student", description="student: the configured student (before training); or a local HF checkpoint dir or hub id.")
    max_ifd: float | None = Field(1.0, gt=0, description="Reject records with IFD >= this as low_ifd (at 1 the instruction does not help predict the answer); null: no threshold.")
    keep_fraction: float | None = Field(None, gt=0, le=1, description="Then reject the bottom (1 - keep_fraction) by IFD as low_ifd; null: no fraction.")
    batch_size: int = Field(8, ge=1, description="Records per forward pass.")
    max_length: int = Field(512, ge=16, description="Token budget per record (prompt + answer); longer answers are cut to fit.")


class RewardScorerConfig(Strict):
    """A local reward model (a sequence-classification checkpoint with one output) scores each (prompt, answer)."""

    scorer: Literal["reward"] = Field("reward", description="Score each record with a local reward model.")
    model: str = Field(..., description="A local HF checkpoint dir (AutoModelForSequenceClassification, one label) with a chat template; a hub id only when online.")
    min_score: float | None = Field(None, description="Reject records scored below this as low_reward; null: no threshold.")
    keep_fraction: float | None = Field(None, gt=0, le=1, description="Then keep only this top fraction by reward; null: no fraction.")
    batch_size: int = Field(8, ge=1, description="Records per forward pass.")
    max_length: int = Field(512, ge=16, description="Tokens per record; longer ones are truncated.")


QualityScorer = Annotated[Union[JudgeScorerConfig, IFDScorerConfig, RewardScorerConfig], Field(discriminator="scorer")]


class SelectConfig(Strict):
    """Keep the top records by combined quality score, stratified so no kind of instruction vanishes (DEITA-style)."""

    keep_fraction: float | None = Field(None, gt=0, le=1, description="Keep this fraction of the records that passed every other check (give this or keep_top_n).")
    keep_top_n: int | None = Field(None, ge=1, description="Keep this many records (give this or keep_fraction).")
    by: str = Field("quality", description="Rank by: quality (the combined score of every scorer that ran), judge, ifd, reward, or random (no score: a stratified random sample).")
    diversity: Literal["leading_verb", "none"] = Field("leading_verb", description="leading_verb: every leading-verb bucket keeps its share (at least one record) and the top records within it; none: the global top.")
    bucket_min_size: int = Field(3, ge=1, description="leading_verb: verbs with fewer records than this share one bucket, so one-off verbs do not each claim a guaranteed slot.")
    seed: int = Field(0, description="Seeds tie-breaks and the random choice; the same seed gives the same selection.")

    @model_validator(mode="after")
    def _one_size(self) -> "SelectConfig":
        if (self.keep_fraction is None) == (self.keep_top_n is None):
            raise ValueError("give exactly one of keep_fraction or keep_top_n")
        if self.by not in ("quality", "judge", "ifd", "reward", "random"):
            raise ValueError(f"by must be quality, judge, ifd, reward or random (got {self.by!r})")
        return self


class StudentConfig(Strict):
    source: str = Field("embedded-cut", description="embedded-cut (the packaged teacher with layers removed), a local HF checkpoint dir, or a hub id.")
    cut_from: str = Field("smollm2-135m-instruct", description="For embedded-cut: the GGUF (packaged alias or path) the student is cut from; share the teacher's for logit distillation.")
    drop_layers: list[int] | str = Field(default_factory=lambda: list(range(12, 18)), description="Layers removed from the teacher for embedded-cut: an explicit list, 'a-b' (a block, inclusive), 'middle:N' (the N centre layers) or 'every:K' (keep layers 0, K, 2K, ...). Measured on SmolLM2-135M: a middle block survives, every-other does not (README, Training).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="auto: float32 on CPU, bfloat16 on CUDA.")
    chat_template: str | None = Field(None, description="Declare a chat template for a student whose tokenizer has none: a Jinja string or a .jinja/.j2 file. Without one such a student is refused (never a silent fallback).")

    @field_validator("drop_layers")
    @classmethod
    def _non_negative(cls, v: list[int] | str) -> list[int] | str:
        if isinstance(v, str):
            from pipeline.models import parse_layer_spec

            parse_layer_spec(v, 10_000)  # syntax only; the layer count is known once the model is loaded
            return v.strip()
        if any(i < 0 for i in v):
            raise ValueError("layer indices must be >= 0")
        return sorted(set(v))


class TrainConfig(Strict):
    lora_r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(32, ge=1, description="LoRA scaling alpha.")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout.")
    lora_target: str | list[str] = Field("all-linear", description="Modules LoRA wraps: attention (q/k/v/o projections), mlp (gate/up/down), all-linear, or an explicit list of module names.")
    lora_layers: str = Field("all", description="Decoder layers LoRA wraps (peft layers_to_transform): all, early / middle / late (a third of the student's layers each), or a block 'a-b' (inclusive, student layer numbers).")
    epochs: float = Field(2.0, gt=0, description="Passes over the accepted data.")
    max_steps: int = Field(-1, description="Stop after this many optimiser steps (-1: use epochs).")
    batch_size: int = Field(4, ge=1, description="Examples per optimizer step (times grad_accum). On N training processes (torchrun, accelerate launch) each takes batch_size / N, so the effective batch stays batch_size x grad_accum.")
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps.")
    learning_rate: float = Field(2e-4, gt=0, lt=1, description="Peak learning rate.")
    max_length: int = Field(256, ge=16, description="Tokens per example after the chat template; longer ones are truncated (counted before training).")
    seed: int = Field(0, description="Training seed.")
    mix_gold: int = Field(0, ge=0, description="Add this many records of the original data (evaluate.gold_train, decontaminated against the eval sets like curated data) to the generated data (0: pure distillation).")
    method: Literal["sft", "kd", "on-policy"] = Field("sft", description="sft: cross-entropy on the teacher's text; kd: Hinton logit distillation, kd_alpha * CE + (1 - kd_alpha) * T^2 * KL(teacher_T || student_T); on-policy: the student answers the instructions itself and the teacher scores every token (TRL's DistillationTrainer, generalized JSD).")
    finetune: Literal["lora", "full"] = Field("lora", description="lora: train a LoRA adapter; full: train every weight (small students only; saves the whole model).")
    kd_alpha: float = Field(0.5, ge=0, le=1, description="Weight of the cross-entropy term in the KD loss (1.0 = plain SFT).")
    kd_temperature: float = Field(2.0, gt=0, description="Softmax temperature T for teacher and student in the KD loss.")
    kd_source: Literal["model", "logprobs"] = Field("model", description="Teacher distributions for kd: model (an in-process HF teacher, full vocabulary) or logprobs (top-k stored with the records).")
    kd_teacher: str | None = Field(None, description="The in-process teacher of every method that needs one (kd with kd_source=model, on-policy, hidden_loss_weight > 0): an HF checkpoint dir or hub id; default: the GGUF named by student.cut_from, dequantized.")
    beta: float = Field(0.5, ge=0, le=1, description="on-policy: generalized JSD interpolation (0 = forward KL(teacher || student), 1 = reverse KL).")
    temperature: float = Field(1.0, gt=0, description="on-policy: sampling and loss temperature of the student's completions.")
    max_completion_length: int = Field(128, ge=8, description="on-policy: max new tokens per student completion; shorter than the teacher's typical answer, it cannot teach the student where to stop.")
    lmbda: float = Field(1.0, ge=0, le=1, description="on-policy: share of batches whose completions the student samples (GKD's lambda); the rest train on the teacher's answers from the records.")
    hidden_loss_weight: float = Field(0.0, ge=0, description="Weight of a hidden-state matching term added to any method's loss: each kept student layer's output against the teacher layer it was cut from (0: off).")
    hidden_loss: Literal["cosine", "mse"] = Field("cosine", description="Hidden-state distance: cosine (1 - cos, DistilBERT) or mse (FitNets), averaged over mapped layers and non-padding tokens.")
    merge: bool = Field(False, description="Also save the student with the LoRA adapter merged in (merged/), ready to serve.")
    padding_free: Literal["auto", "on", "off"] = Field("auto", description="Padding-free batching (examples packed whole into rows, no padding): auto = on for CUDA, off on CPU; on/off force it. Uses flash-attention when installed, else a block-diagonal sdpa mask.")
    check_memory: bool = Field(True, description="Warn before training when the memory estimate exceeds what is free (RAM on CPU, GPU memory on CUDA).")

    @model_validator(mode="before")
    @classmethod
    def _old_key_names(cls, data: Any) -> Any:
        # Runs saved before lora_target existed wrote target_modules into their config.yaml; they must still load.
        if isinstance(data, dict) and "target_modules" in data:
            data = dict(data)
            old = data.pop("target_modules")
            data.setdefault("lora_target", old)
        return data


class EvalSetConfig(Strict):
    """One held-out set: every contender answers its items, and it gets its own table and paired verdicts."""

    name: str = Field(description="Short name shown in the report, the summary and eval/outputs.jsonl (e.g. alpaca-dev).")
    path: Path = Field(description="Held-out instructions with references: Alpaca JSON/JSONL (instruction, input, output) or Self-Instruct JSONL (instruction, instances).")
    limit: int | None = Field(None, ge=1, description="Evaluate on the first N items of this set (null: evaluate.limit).")


def _default_eval_sets() -> list[EvalSetConfig]:
    # Two kinds of held-out set: Alpaca's dev split (the distribution the pipeline is tuned on) and a fixed slice of
    # the human-written Self-Instruct seed tasks, which the generator never sees (seed tasks that are eval items are
    # taken out of its seed pool) and which curate decontaminates against.
    return [EvalSetConfig(name="alpaca-dev", path=DATA_DIR / "alpaca_dev.jsonl"),
            EvalSetConfig(name="self-instruct-heldout", path=DATA_DIR / "self_instruct_heldout.jsonl")]


class EvaluateConfig(Strict):
    eval_sets: list[EvalSetConfig] = Field(default_factory=_default_eval_sets, min_length=1, description="Held-out sets, each reported side by side (the first is the primary one the registry's guard metrics come from). Every set is removed from the generator's seed pool and decontaminated against in curate and in the gold training data. The older single-file key evaluate.eval_set: FILE still works and means one set.")
    limit: int = Field(30, ge=1, description="Evaluate on the first N items of each set (a set's own limit wins).")
    max_new_tokens: int = Field(128, ge=8, description="Max new tokens per answer, for every contender.")
    batch_size: int = Field(8, ge=1, description="Batched generation size for the students.")
    bootstrap_samples: int = Field(1000, ge=100, description="Bootstrap resamples for confidence intervals and paired differences.")
    judge: TeacherConfig | None = Field(None, description="Pairwise LLM judge (any teacher backend, same keys as teacher:); null skips the judge. The embedded 135M model answers in format but cannot tell answers apart ('I don't know.' won 42% against the reference), so the CPU demo leaves it off.")
    judge_baseline: Literal["reference", "teacher"] = Field("reference", description="What each contender's answer is judged against: the eval set's reference answer or the teacher's.")
    perplexity: bool = Field(True, description="Perplexity of the reference answers under each student (response tokens only).")
    gold_student: bool = Field(True, description="Also train the student on the original data (gold_train), same method, steps and number of examples as the distilled one, decontaminated like curated data, and evaluate it: does distillation beat simply training on the original data?")
    gold_train: Path = Field(DATA_DIR / "alpaca_gold_train.jsonl", description="The original data for the gold-trained student and train.mix_gold (Alpaca JSON/JSONL: instruction, input, output); the embedded default is Alpaca's train split.")
    speed_runtime: Literal["auto", "llamacpp", "own"] = Field("auto", description="Where speed and size are measured. llamacpp: every contender as a GGUF in llama.cpp (students merged and exported at the teacher's quantization), same threads, prompts and answer length, so the columns compare like with like; own: each on its own runtime (teacher backend, students in transformers); auto: llamacpp when the teacher is an embedded GGUF, else own.")
    speed_prompts: int = Field(3, ge=1, description="Eval prompts timed per contender for the llamacpp speed columns (a few suffice: the answer length is fixed).")
    speed_new_tokens: int = Field(64, ge=8, description="Tokens each timed answer generates (end-of-turn ignored), the same for every contender.")

    @model_validator(mode="before")
    @classmethod
    def _single_eval_set(cls, data: Any) -> Any:
        # The older single-file form, evaluate.eval_set: FILE, means one set named after the file.
        if isinstance(data, dict) and "eval_set" in data:
            if "eval_sets" in data:
                raise ValueError("give evaluate.eval_sets (a list of {name, path, limit}) or the older evaluate.eval_set "
                                 "(one file), not both")
            path = data["eval_set"]
            data = {k: v for k, v in data.items() if k != "eval_set"}
            data["eval_sets"] = [{"name": Path(str(path)).stem or "eval", "path": path}]
        return data

    @field_validator("eval_sets")
    @classmethod
    def _unique_names(cls, v: list[EvalSetConfig]) -> list[EvalSetConfig]:
        names = [s.name for s in v]
        if len(set(names)) != len(names):
            raise ValueError(f"eval set names must be unique (got {names})")
        return v

    @property
    def eval_set(self) -> Path:
        """The primary (first) eval set's file, for code that reads one set."""
        return self.eval_sets[0].path

    def set_limit(self, s: EvalSetConfig) -> int:
        """How many items of set `s` are evaluated."""
        return s.limit or self.limit

    @field_validator("judge")
    @classmethod
    def _one_budget(cls, v: TeacherConfig | None) -> TeacherConfig | None:
        if v is not None and (v.budget_usd is not None or v.budget_tokens is not None):
            raise ValueError("a run has one budget: set teacher.budget_usd / teacher.budget_tokens; the judge's calls "
                             "count against it at evaluate.judge's prices, so remove evaluate.judge.budget_*")
        return v


class RetrainConfig(Strict):
    """Scheduled retraining (deployment distill/retrain) and the champion/challenger promotion rule."""

    cron: str = Field("0 3 * * 1", description="When distill/retrain runs (cron, 5 fields; default Mondays 03:00).")
    timezone: str = Field("UTC", description="IANA timezone of the cron schedule, e.g. Europe/Berlin.")
    metric: str = Field("rouge_l", description="Per-item metric a challenger must beat the champion on: rouge_l or win_rate (judged runs). Promotion needs a paired 95% bootstrap interval of challenger - champion on the eval items both answered that excludes 0; no shared items, no promotion.")
    guards: dict[str, float] = Field(default_factory=lambda: {"tokens_per_s": 0.3}, description="Other metrics and the relative regression each may show (0.3 = 30% worse) before a promotion is refused; latency_s/perplexity count lower as better.")
    champion_gguf: str | None = Field("teacher", description="Quantization of the GGUF put in <runs_dir>/champion/ beside the adapter, ready for llama.cpp, its server or Ollama (q8_0, q4_k_m, q4_1, f16, ...); 'teacher' = the teacher GGUF's own type (q8_0 when the teacher is not a GGUF); null = no GGUF.")

    @field_validator("cron")
    @classmethod
    def _five_fields(cls, v: str) -> str:
        if len(v.split()) != 5:
            raise ValueError("cron needs 5 fields (minute hour day-of-month month day-of-week), e.g. '0 3 * * 1'")
        return v

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, v: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError("unknown timezone; use an IANA name such as UTC or Europe/Berlin") from None
        return v


class ScaleConfig(Strict):
    task_runner: Literal["none", "default", "ray", "dask"] = Field("none", description="Fan teacher calls out over a Prefect task runner: none (one process, the backend's own concurrency), default (threads), ray (prefect-ray; a local or remote Ray cluster), dask (prefect-dask; a local cluster or scheduler address). Needs the 'scale' extra for ray/dask.")
    workers: int = Field(2, ge=1, le=1024, description="Workers (threads, Ray CPUs or Dask worker processes) for a local cluster; shards in flight at once.")
    shard_size: int = Field(16, ge=1, description="Requests per shard (one Prefect task each). Each worker opens its own backend connection per shard, so very small shards waste time.")
    ray_address: str | None = Field(None, description="Ray cluster to join, e.g. ray://head:10001 or auto (after `ray start --head`); null starts a local cluster of `workers` CPUs.")
    dask_address: str | None = Field(None, description="Dask scheduler to join, e.g. tcp://head:8786; null starts a local cluster of `workers` processes.")


class RunConfig(Strict):
    name: str = Field("distill", description="Human name for the run; the run id adds a timestamp.")
    runs_dir: Path = Field(Path("runs"), description="Where run folders, the catalog and the teacher cache live.")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    curate: CurateConfig = Field(default_factory=CurateConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    retrain: RetrainConfig = Field(default_factory=RetrainConfig)
    scale: ScaleConfig = Field(default_factory=ScaleConfig)

    def fingerprint(self) -> str:
        """Stable hash of the resolved config (recorded in manifests)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# Keys that change how a run spends or reaches its teacher, never what it produces: a resumed run may change them
# (raising the budget to continue is the common case); the change is recorded in its status.
OPERATIONAL_KEYS = ("name", "runs_dir", "scale.", "evaluate.batch_size", "train.check_memory", "retrain.cron",
                    "retrain.timezone")
OPERATIONAL_TEACHER_KEYS = ("base_url", "extra_base_urls", "api_key_env", "api_key_secret_block", "max_concurrency",
                            "timeout_s", "max_retries", "malformed_backoff_s", "batch_poll_s", "batch_completion_window",
                            "n_threads", "price_per_1m_input", "price_per_1m_output", "budget_usd", "budget_tokens")
# The first stage each result key feeds (the stages after it consume its output): (key prefix, stage).
STAGE_OF_KEY = (("evaluate.eval_set", "curate"), ("teacher.", "generate"), ("generate.", "generate"),
                ("curate.", "curate"), ("student.", "train"), ("train.", "train"), ("evaluate.", "evaluate"),
                ("retrain.", "report"))
STAGE_ORDER = ("generate", "curate", "train", "evaluate", "report")


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): value}


def is_operational(key: str) -> bool:
    """True for a key that cannot change a run's outputs (see OPERATIONAL_KEYS)."""
    if any(key == k or (k.endswith(".") and key.startswith(k)) for k in OPERATIONAL_KEYS):
        return True
    for section in ("teacher.", "evaluate.judge."):
        if key.startswith(section) and key[len(section):] in OPERATIONAL_TEACHER_KEYS:
            return True
    return False


def config_changes(old: RunConfig, new: RunConfig) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose resolved values differ between two configs: key -> (old, new)."""
    a, b = _flatten(old.model_dump(mode="json")), _flatten(new.model_dump(mode="json"))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def first_stage_changed(keys: list[str]) -> str | None:
    """The earliest stage whose inputs the given result keys change (None when none does)."""
    stages = [next((stage for prefix, stage in STAGE_OF_KEY if k.startswith(prefix)), "generate") for k in keys]
    return min(stages, key=STAGE_ORDER.index) if stages else None


def profile_path(name: str) -> Path:
    """The YAML file of a named profile shipped in profiles/."""
    path = PROFILES_DIR / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))
        raise ConfigError(f"Unknown profile {name!r}. Known profiles: {', '.join(known)}. "
                          f"Pass one of them with --profile, or a YAML file with --config.")
    return path


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"Config file {path} does not exist. Check the path, or use --profile NAME.") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"Config file {path} is not valid UTF-8 (byte {e.start}). Save it as UTF-8.") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = ""
        mark = getattr(e, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"Config file {path} is not valid YAML{where}: {problem}. Fix the syntax there.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path} must hold a mapping of sections (teacher:, generate:, ...), "
                          f"not a {type(data).__name__}.")
    return data


def _set_dotted(data: dict[str, Any], dotted: str) -> None:
    if "=" not in dotted:
        raise ConfigError(f"Override {dotted!r} must look like section.key=value (e.g. generate.target_instructions=20).")
    key, raw = dotted.split("=", 1)
    value = yaml.safe_load(raw) if raw else ""
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"Override {dotted!r}: {part!r} is not a section.")
    node[parts[-1]] = value


def _describe(err: ValidationError, source: str) -> str:
    lines = []
    for item in err.errors():
        loc = ".".join(str(p) for p in item["loc"])
        if item["type"] == "extra_forbidden":
            section = ".".join(str(p) for p in item["loc"][:-1])
            known = _known_keys(item["loc"][:-1])
            lines.append(f"unknown key {loc!r}" + (f" (known keys in {section or 'the top level'}: {', '.join(known)})" if known else ""))
        else:
            lines.append(f"{loc}: {item['msg']} (got {item.get('input')!r})")
    return f"Invalid config in {source}: " + "; ".join(lines) + ". Fix or remove these keys; every key is documented in pipeline/config.py."


def _known_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] = RunConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return sorted(model.model_fields)


def load_config(profile: str | None = None, config_file: str | Path | None = None,
                overrides: list[str] | None = None) -> RunConfig:
    """Profile (or file) + dotted overrides -> validated RunConfig; errors name the key and the file."""
    if profile and config_file:
        raise ConfigError("Give either a profile or a config file, not both.")
    path = Path(config_file) if config_file else profile_path(profile or DEFAULT_PROFILE)
    data = _read_yaml(path)
    for item in overrides or []:
        _set_dotted(data, item)
    source = str(path) + (f" (with overrides {overrides})" if overrides else "")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe(e, source)) from None


def with_overrides(cfg: RunConfig, overrides: list[str], source: str = "the resolved config") -> RunConfig:
    """A validated copy of cfg with dotted key=value overrides applied (the syntax of --set)."""
    data = cfg.model_dump(mode="json")
    for item in overrides:
        _set_dotted(data, item)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe(e, f"{source} (with overrides {list(overrides)})")) from None


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML (no secrets are ever in it: keys come from the environment)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
