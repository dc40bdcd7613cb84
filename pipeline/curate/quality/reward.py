"""A local reward model's score of (prompt, answer)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from pipeline.config import RewardScorerConfig
from pipeline.errors import ConfigError
from pipeline.progress import Progress
from pipeline.records import Record
from pipeline.curate.quality.common import QualityContext, keep_top_fraction


def require_reward_model(name: str) -> Path | str:
    """The reward model's local path (or hub id when online); a ConfigError naming the fix when it is not there."""
    import os

    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ConfigError(f"curate.quality reward model {name!r} is a path without config.json: not a checkpoint. "
                              f"Point model: at a reward model checkpoint directory, or remove the reward scorer.")
        return path
    if os.environ.get("HF_HUB_OFFLINE") == "1" or "/" not in name:
        raise ConfigError(f"curate.quality reward model {name!r} is not available: no such local directory"
                          f"{' (and HF_HUB_OFFLINE=1 forbids the hub)' if '/' in name else ''}. Point model: at a "
                          f"reward model checkpoint (AutoModelForSequenceClassification with one label), or remove the "
                          f"reward scorer from curate.quality.")
    return name


def load_reward_model(name: str):
    """A local sequence-classification reward model and its tokenizer; a clear error when it is not there."""
    path = Path(require_reward_model(name))
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
    except (OSError, ValueError) as e:
        raise ConfigError(f"curate.quality reward model {name!r} could not be loaded as a sequence-classification "
                          f"checkpoint: {str(e).splitlines()[0]}. Fix model: or remove the reward scorer.") from None
    if model.config.num_labels != 1:
        raise ConfigError(f"curate.quality reward model {name!r} has {model.config.num_labels} labels; a reward model "
                          f"has one output (a scalar score).")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.config.pad_token_id = tok.pad_token_id
    return model, tok


def reward_scores(name: str, records: Sequence[Record], batch_size: int = 8, max_length: int = 512) -> list[float]:
    """The reward model's scalar per (user prompt, answer), rendered with its chat template."""
    import torch

    from pipeline.evaluate.contenders import user_message

    model, tok = load_reward_model(name)
    tok.padding_side = "right"
    texts = [tok.apply_chat_template(user_message(r) + [{"role": "assistant", "content": r.output}], tokenize=False)
             if tok.chat_template else f"{r.instruction}\n{r.input}\n{r.output}" for r in records]
    out: list[float] = []
    with Progress(len(texts), "curate: reward", key="curate-reward") as bar:
        for b in range(0, len(texts), batch_size):
            enc = tok(texts[b:b + batch_size], return_tensors="pt", padding=True, truncation=True,
                      max_length=max_length, add_special_tokens=False)
            with torch.no_grad():
                out += model(**enc).logits[:, 0].float().tolist()
            bar.update(len(texts[b:b + batch_size]))
    return out


def score_reward(records: list[Record], cfg: RewardScorerConfig, ctx: QualityContext) -> tuple[list[Record], list[Record]]:
    scores = reward_scores(cfg.model, records, cfg.batch_size, cfg.max_length)
    scored, rejected = [], []
    for r, s in zip(records, scores):
        r = r.model_copy(update={"reward_score": s})
        if cfg.min_score is not None and s < cfg.min_score:
            rejected.append(r.reject("low_reward", f"reward {s:.3f} < {cfg.min_score:g}"))
        else:
            scored.append(r)
    kept, low = keep_top_fraction(scored, "reward", cfg.keep_fraction)
    return kept, rejected + low
