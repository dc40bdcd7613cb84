"""IFD (Cherry LLM, "From Quantity to Quality"): loss(answer | instruction) / loss(answer alone) under a small local
model; near 1 the instruction does not help predict the answer."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from pipeline.config import IFDScorerConfig
from pipeline.errors import ConfigError
from pipeline.progress import Progress
from pipeline.records import Record
from pipeline.curate.quality.common import QualityContext, keep_top_fraction


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
