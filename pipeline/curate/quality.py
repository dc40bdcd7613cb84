"""Model-based quality: score the records that passed the rules, reject the weak ones, keep the best.

Three scorers, picked by name from `curate.quality` and applied in order, each to the records still accepted:
- judge (AlpaGasus): a teacher rates (instruction, input, output) 1-5 with a short reason (prompts/judge_rating.j2),
  through the same cache, ledger and budget as generation.
- ifd (Cherry LLM, "From Quantity to Quality"): IFD = loss(answer | instruction) / loss(answer alone) under a small
  local model. Near 1 the instruction does not help predict the answer; low values are answers the model finds
  easy given the prompt. The highest IFD below 1 marks the examples worth training on.
- reward: a local reward model's score of (prompt, answer).
Then `select` keeps the top records by a combined score within leading-verb buckets, so selection by score never
wipes out a whole kind of instruction (DEITA pairs its score ranking with a diversity filter for the same reason).
Every record keeps its scores; every drop is a reject with a reason and detail.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from pipeline.curate import QUALITY_REASONS, SELECT_REASON  # noqa: F401 (re-exported: the reasons this module gives)
from pipeline.config import (CurateConfig, IFDScorerConfig, JudgeScorerConfig, RewardScorerConfig, SelectConfig,
                             TeacherConfig)
from pipeline.errors import BudgetExceeded, ConfigError
from pipeline.generate.prompts import render, template_hash
from pipeline.progress import Progress
from pipeline.records import Record

log = logging.getLogger(__name__)

# scorer name -> the Record field holding its score, and the reject reason of a record it drops
SCORE_FIELD = {"judge": "judge_score", "ifd": "ifd", "reward": "reward_score"}
LOW_REASON = {"judge": "low_judge_score", "ifd": "low_ifd", "reward": "low_reward"}
# Higher is better for every score (IFD included: below 1, a higher IFD is a harder, more informative example).


@dataclass
class QualityContext:
    """What scorers need from the run: the teacher (for the judge), its cache and ledger, the student."""

    teacher: TeacherConfig
    cache_path: Path
    ledger: Any  # pipeline.teachers.Ledger: shared with the rest of the run so the budget holds
    student_dir: Callable[[], Path]  # resolved only when a scorer asks for it (cutting a student takes seconds)


# --- IFD -------------------------------------------------------------------------------------------------

def ifd_token_ids(tok, record: Record, max_length: int) -> tuple[list[int], list[int], int]:
    """(prompt ids, answer ids, start id) for IFD: the prompt is the chat template's user turn (prompts/response.j2)
    with the assistant opening; the answer is the output tokenized alone, so both losses score the same tokens.
    "Answer alone" starts from one BOS token (EOS where the tokenizer has none), so its first token is scored too."""
    from pipeline.evaluate.contenders import user_message

    prompt = tok.apply_chat_template(user_message(record), add_generation_prompt=True, tokenize=True, return_dict=False)
    answer = tok(record.output, add_special_tokens=False)["input_ids"]
    answer = answer[:max(max_length - len(prompt), max_length // 2)]
    prompt = prompt[-(max_length - len(answer)):] if len(prompt) + len(answer) > max_length else prompt
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    return list(prompt), list(answer), int(start)


def _mean_losses(model, sequences: list[list[int]], n_targets: list[int], pad_id: int) -> list[float]:
    """Mean cross-entropy of the last n_targets[i] tokens of each sequence, in one left-padded forward pass.

    Left padding puts every sequence's targets at the end of the row, so only the last max(n_targets) + 1 positions
    go through the LM head (`logits_to_keep`): a 49k-word vocabulary over every prompt token would cost more than
    the forward pass. Explicit position ids keep a padded row's positions the same as an unpadded one's."""
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    keep = max(n_targets) + 1
    with torch.no_grad():
        logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                       position_ids=positions.to(model.device), logits_to_keep=keep).logits.float()
    # logits[:, j] predicts the token at width - keep + j + 1
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    nll = -logp.gather(-1, ids[:, width - keep + 1:].to(model.device).unsqueeze(-1)).squeeze(-1)
    return [float(nll[i, nll.shape[1] - n:].mean()) for i, n in enumerate(n_targets)]


def ifd_scores(model_dir: Path | str, records: Sequence[Record], batch_size: int = 8,
               max_length: int = 512) -> list[dict[str, float] | None]:
    """Per record {ifd, loss_conditioned, loss_alone, answer_tokens}; None for a record with an empty answer."""
    from pipeline.evaluate.contenders import load_student

    model, tok = load_student(Path(model_dir))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    parts = [ifd_token_ids(tok, r, max_length) for r in records]
    results: list[dict[str, float] | None] = [None] * len(records)
    # Batches of similar length waste less compute on padding.
    order = sorted((i for i, (_, a, _) in enumerate(parts) if a), key=lambda i: len(parts[i][0]) + len(parts[i][1]))
    with Progress(len(order), "curate: IFD", key="curate-ifd") as bar:
        for b in range(0, len(order), batch_size):
            chunk = order[b:b + batch_size]
            seqs, targets = [], []
            for i in chunk:
                prompt, answer, start = parts[i]
                seqs += [prompt + answer, [start] + answer]
                targets += [len(answer), len(answer)]
            losses = _mean_losses(model, seqs, targets, pad)
            for k, i in enumerate(chunk):
                cond, alone = losses[2 * k], losses[2 * k + 1]
                results[i] = {"ifd": cond / alone if alone > 0 else float("inf"), "loss_conditioned": cond,
                              "loss_alone": alone, "answer_tokens": len(parts[i][1])}
            bar.update(len(chunk))
    del model
    return results


def _ifd_model(cfg: IFDScorerConfig, ctx: QualityContext) -> Path | str:
    if cfg.model == "student":
        return ctx.student_dir()
    path = Path(cfg.model).expanduser()
    if path.exists():
        return path
    import os

    if os.environ.get("HF_HUB_OFFLINE") == "1" or "/" not in cfg.model:
        raise ConfigError(f"curate.quality ifd model {cfg.model!r} is not a local checkpoint directory. Use "
                          f"model: student, or a directory with config.json.")
    return cfg.model


def score_ifd(records: list[Record], cfg: IFDScorerConfig, ctx: QualityContext) -> tuple[list[Record], list[Record]]:
    scores = ifd_scores(_ifd_model(cfg, ctx), records, cfg.batch_size, cfg.max_length)
    scored, rejected = [], []
    for r, s in zip(records, scores):
        if s is None:
            rejected.append(r.reject("low_ifd", "empty answer: IFD is undefined"))
            continue
        r = r.model_copy(update={"ifd": s["ifd"]})
        if cfg.max_ifd is not None and s["ifd"] >= cfg.max_ifd:
            rejected.append(r.reject("low_ifd", f"IFD {s['ifd']:.3f} >= {cfg.max_ifd:g}: the instruction does not help "
                                                f"predict the answer (loss {s['loss_conditioned']:.3f} with it, "
                                                f"{s['loss_alone']:.3f} without)"))
        else:
            scored.append(r)
    kept, low = keep_top_fraction(scored, "ifd", cfg.keep_fraction)
    return kept, rejected + low


# --- judge -----------------------------------------------------------------------------------------------

_SCORE = re.compile(r"(?:score|rating)\s*(?:\(1-5\))?\s*[:=]?\s*\**\s*([0-9]+(?:\.[0-9]+)?)\s*(?:/\s*5)?", re.IGNORECASE)
_LEADING = re.compile(r"^\W*([0-9]+(?:\.[0-9]+)?)\s*(?:/\s*5)?(?![0-9])")
_REASON = re.compile(r"reason\s*[:=]\s*(.+)", re.IGNORECASE | re.DOTALL)


def parse_rating(reply: str) -> tuple[float, str] | None:
    """(score in 1-5, short reason) from a judge's reply; None when no score in range is stated.

    Accepts "Score: 4", "Rating: 4/5", "**Score:** 4.5" or a reply that starts with the number (AlpaGasus's
    format: the score on the first line, the explanation after)."""
    text = (reply or "").strip()
    m = _SCORE.search(text) or _LEADING.match(text)
    if not m:
        return None
    score = float(m.group(1))
    if not 1.0 <= score <= 5.0:
        return None
    r = _REASON.search(text)
    reason = (r.group(1) if r else text[m.end():]).strip().strip("*").strip()
    return score, " ".join(reason.split())[:300]


def judge_rating_request(record: Record, max_tokens: int = 96):
    """The rating prompt (prompts/judge_rating.j2) as a greedy chat request, booked under the ledger's judge stage."""
    from pipeline.teachers import Request

    content = render("judge_rating", instruction=record.instruction, input=record.input, output=record.output)
    return Request(kind="chat", messages=[{"role": "user", "content": content}], max_tokens=max_tokens,
                   temperature=0.0, stage="curate_judge")


def score_judge(records: list[Record], cfg: JudgeScorerConfig, ctx: QualityContext) -> tuple[list[Record], list[Record]]:
    from pipeline.teachers import make_teacher

    judge = make_teacher(cfg.teacher or ctx.teacher, ctx.cache_path, ctx.ledger)
    try:
        with Progress(len(records), "curate: judge", key="curate-judge") as bar:
            replies = judge.generate([judge_rating_request(r, cfg.max_tokens) for r in records], on_done=bar.update)
    finally:
        judge.close()
    if any(not c.ok and (c.error or "").startswith("not attempted: budget") for c in replies):
        # Ratings already paid for are in the cache; a re-run with a larger budget pays only for the rest.
        raise BudgetExceeded("The teacher budget ran out while the judge rated records (curate.quality judge); every "
                             "rating paid for is cached. Raise teacher.budget_usd / budget_tokens and resume the run.")
    scored, rejected = [], []
    prompt_tag = f"judge_rating.j2 {template_hash('judge_rating')}"
    for r, c in zip(records, replies):
        if not c.ok:
            rejected.append(r.reject("judge_failed", f"the judge's call failed after retries: {c.error}"))
            continue
        parsed = parse_rating(c.text)
        if parsed is None:
            rejected.append(r.model_copy(update={"judge_reason": c.text.strip()[:300]}).reject(
                "judge_unparsed", f"no 1-5 score in the judge's reply ({prompt_tag}): {c.text.strip()[:200]!r}"))
            continue
        score, reason = parsed
        r = r.model_copy(update={"judge_score": score, "judge_reason": reason})
        if cfg.min_score is not None and score < cfg.min_score:
            rejected.append(r.reject("low_judge_score", f"rated {score:g} < {cfg.min_score:g}: {reason}"))
        else:
            scored.append(r)
    kept, low = keep_top_fraction(scored, "judge", cfg.keep_fraction)
    return kept, rejected + low


# --- reward model ----------------------------------------------------------------------------------------

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


SCORERS: dict[str, Callable[[list[Record], Any, QualityContext], tuple[list[Record], list[Record]]]] = {
    "judge": score_judge, "ifd": score_ifd, "reward": score_reward}


# --- shared ----------------------------------------------------------------------------------------------

def keep_top_fraction(records: list[Record], scorer: str, fraction: float | None) -> tuple[list[Record], list[Record]]:
    """Keep the top `fraction` by this scorer's score; records tied with the last kept one are kept too."""
    if fraction is None or not records:
        return records, []
    attr = SCORE_FIELD[scorer]
    n = max(1, round(fraction * len(records)))
    cutoff = sorted((getattr(r, attr) for r in records), reverse=True)[n - 1]
    kept = [r for r in records if getattr(r, attr) >= cutoff]
    low = [r.reject(LOW_REASON[scorer], f"{attr} {getattr(r, attr):.3f} below the top {fraction:g} "
                                        f"(cut-off {cutoff:.3f})") for r in records if getattr(r, attr) < cutoff]
    return kept, low


def percentile_ranks(values: Sequence[float]) -> np.ndarray:
    """Each value's rank among all as a fraction in [0, 1] (ties share their mean rank; a single value gets 1)."""
    x = np.asarray(values, dtype=float)
    if x.size <= 1:
        return np.ones_like(x)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(x.size)
    ranks[order] = np.arange(x.size, dtype=float)
    for v in np.unique(x):  # average tied ranks, so equal scores always get equal percentiles
        tied = x == v
        ranks[tied] = ranks[tied].mean()
    return ranks / (x.size - 1)


def combine_scores(records: list[Record], scorers: Sequence[str]) -> list[Record]:
    """quality_score = mean percentile rank over the scorers that ran: scales differ (1-5, a loss ratio, logits),
    ranks do not, and no one scorer dominates by its units."""
    if not records or not scorers:
        return records
    ranks = [percentile_ranks([getattr(r, SCORE_FIELD[s]) for r in records]) for s in scorers]
    combined = np.mean(ranks, axis=0)
    return [r.model_copy(update={"quality_score": round(float(q), 6)}) for r, q in zip(records, combined)]


def apply_quality(accepted: list[Record], cfg: CurateConfig, ctx: QualityContext) -> tuple[list[Record], list[Record], dict]:
    """Run `cfg.quality` in order, then `cfg.select`; returns (kept, rejected, report for the manifest)."""
    kept, rejected = list(accepted), []
    steps: list[dict[str, Any]] = []
    for sc in cfg.quality:
        before = len(kept)
        kept, dropped = SCORERS[sc.scorer](kept, sc, ctx) if kept else (kept, [])  # nothing left: load no model
        rejected += dropped
        steps.append({"scorer": sc.scorer, "scored": before, "rejected": len(dropped),
                      "reasons": dict(Counter(r.reject_reason for r in dropped)), "kept": len(kept)})
        log.info("curate quality %s: %d scored, %d rejected", sc.scorer, before, len(dropped))
    names = list(dict.fromkeys(sc.scorer for sc in cfg.quality))
    kept = combine_scores(kept, names)
    if cfg.select is not None:
        kept, dropped = select(kept, cfg.select)
        rejected += dropped
        steps.append({"scorer": "select", "by": cfg.select.by, "scored": len(kept) + len(dropped),
                      "rejected": len(dropped), "kept": len(kept)})
    return kept, rejected, {"steps": steps, "scorers": names}


# --- selection -------------------------------------------------------------------------------------------

def buckets(records: Sequence[Record], min_size: int) -> list[str]:
    """Each record's leading-verb bucket; verbs with fewer than `min_size` records share one bucket ("(rare)"), so
    a long tail of one-off verbs neither claims a guaranteed slot each nor escapes the ranking."""
    from pipeline.curate.stats import leading_verb

    verbs = [leading_verb(r.instruction) or "(none)" for r in records]
    counts = Counter(verbs)
    return [v if counts[v] >= min_size else "(rare)" for v in verbs]


def select(records: list[Record], cfg: SelectConfig) -> tuple[list[Record], list[Record]]:
    """Keep the top records by score, per bucket in proportion to its size; deterministic for `cfg.seed`.

    Records are ranked within their bucket (best first) and ordered by rank / bucket size: every bucket's best
    record comes first, then each bucket contributes in proportion to its size, and ties in that order go to the
    higher score, then to a seeded random draw. With `by: random` the in-bucket ranking is the random draw itself:
    a stratified random sample. Dropped records become rejects with reason not_selected."""
    n = len(records)
    if n == 0:
        return [], []
    n_keep = min(n, cfg.keep_top_n if cfg.keep_top_n is not None else max(1, round(cfg.keep_fraction * n)))
    draw = np.random.default_rng(cfg.seed).random(n)
    if cfg.by == "random":
        score = draw.copy()
    else:
        attr = "quality_score" if cfg.by == "quality" else SCORE_FIELD[cfg.by]
        missing = [r.id for r in records if getattr(r, attr) is None]
        if missing:
            raise ConfigError(f"curate.select.by={cfg.by} but {len(missing)} records have no {attr} (e.g. {missing[0]}). "
                              f"Add the {cfg.by} scorer to curate.quality, or select by: random.")
        score = np.array([getattr(r, attr) for r in records], dtype=float)
    groups = buckets(records, cfg.bucket_min_size) if cfg.diversity == "leading_verb" else ["all"] * n
    members: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    position = np.empty(n)
    for idx in members.values():
        ranked = sorted(idx, key=lambda i: (-score[i], draw[i]))
        for rank, i in enumerate(ranked):
            position[i] = rank / len(idx)
    order = sorted(range(n), key=lambda i: (position[i], -score[i], draw[i]))
    chosen = set(order[:n_keep])
    by = "random draw" if cfg.by == "random" else f"{cfg.by} score"
    kept = [r for i, r in enumerate(records) if i in chosen]
    dropped = [r.reject(SELECT_REASON, f"{by} {score[i]:.3f} ranked {int(position[i] * len(members[groups[i]])) + 1} "
                                       f"of {len(members[groups[i]])} in bucket {groups[i]!r}; kept {n_keep} of {n}")
               for i, r in enumerate(records) if i not in chosen]
    return kept, dropped


# --- manifest --------------------------------------------------------------------------------------------

def score_distribution(accepted: Sequence[Record], rejected: Sequence[Record]) -> dict[str, Any]:
    """Per score: how many records carry it, its mean and quantiles, and a 10-bin histogram, accepted vs rejected."""
    out: dict[str, Any] = {}
    for name, attr in {**SCORE_FIELD, "quality": "quality_score"}.items():
        acc = [getattr(r, attr) for r in accepted if getattr(r, attr) is not None]
        rej = [getattr(r, attr) for r in rejected if getattr(r, attr) is not None]
        values = [v for v in acc + rej if math.isfinite(v)]
        if not values:
            continue
        lo, hi = min(values), max(values)
        edges = np.linspace(lo, hi if hi > lo else lo + 1, 11)
        out[name] = {"field": attr, "records": len(values), "mean": round(float(np.mean(values)), 4),
                     "quantiles": {q: round(float(np.quantile(values, float(q))), 4) for q in ("0.1", "0.5", "0.9")},
                     "bins": [round(float(e), 4) for e in edges],
                     "accepted": np.histogram([v for v in acc if math.isfinite(v)], bins=edges)[0].tolist(),
                     "rejected": np.histogram([v for v in rej if math.isfinite(v)], bins=edges)[0].tolist()}
    return out


def plot_scores(distribution: dict[str, Any], path: Path) -> Path:
    """quality_scores.png: one histogram per score, accepted and rejected stacked."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.store import atomic_write_bytes

    names = list(distribution) or ["none"]
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        d = distribution.get(name)
        if not d:
            ax.set_title("no scores")
            continue
        edges = np.array(d["bins"])
        mids, width = (edges[:-1] + edges[1:]) / 2, (edges[1] - edges[0]) * 0.9
        ax.bar(mids, d["accepted"], width=width, label="accepted")
        ax.bar(mids, d["rejected"], width=width, bottom=d["accepted"], label="rejected", color="tab:red", alpha=0.7)
        ax.set(title=f"{name} (n={d['records']}, median {d['quantiles']['0.5']:.2f})", xlabel=d["field"],
               ylabel="records")
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)
