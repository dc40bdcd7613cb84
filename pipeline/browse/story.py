"""One record's whole story: the prompt the teacher saw, its verdicts, its nearest near-duplicate, its
logprobs. Pure functions over a stored record and the run's config, so the page template stays dumb."""

from __future__ import annotations

import hashlib
import json
import math
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2

from pipeline import PROMPTS_DIR

NEAR_DUP = re.compile(r"^ROUGE-L (?P<score>[0-9.]+) to: (?P<text>.*)$", re.S)
SAME_AS = re.compile(r"^same as (?P<ref>\S+)$")
LOGPROB_FIELDS = ("logprobs", "teacher_logprobs", "output_logprobs", "top_logprobs")
TEMPLATE_NAME = re.compile(r"^self_instruct_[a-z_]+$")  # the instruction prompts that take seeds + machine examples
CONTENDER_ORDER = ("teacher", "raw_student", "distilled_student", "gold_student")


def verdict(rec: dict[str, Any]) -> dict[str, Any]:
    """Status, reason and what the reason's detail points at (a near-duplicate's text and score)."""
    out: dict[str, Any] = {"status": rec.get("status"), "reason": rec.get("reject_reason"),
                           "detail": rec.get("reject_detail"), "nearest": None, "score": None, "same_as": None}
    detail = rec.get("reject_detail") or ""
    m = NEAR_DUP.match(detail)
    if m:
        out["nearest"], out["score"] = m["text"], float(m["score"])
    m = SAME_AS.match(detail)
    if rec.get("reject_reason") == "exact_duplicate" and m:
        out["same_as"] = m["ref"]
    return out


@lru_cache(maxsize=8)
def _seeds(path: str, mtime_ns: int) -> dict[str, dict[str, Any]]:
    # Read directly rather than through pipeline.generate, whose package import pulls in the model stack
    # (seconds) that a web page does not need; ids default as the seed loader assigns them.
    out = {}
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        try:
            obj = json.loads(line) if line.strip() else None
        except ValueError:
            continue
        if isinstance(obj, dict):
            inst = (obj.get("instances") or [{}])[0]
            inst = inst if isinstance(inst, dict) else {}
            out[str(obj.get("id") or f"seed_task_{lineno}")] = {
                "instruction": obj.get("instruction"), "input": inst.get("input", ""), "output": inst.get("output", "")}
    return out


def seed_examples(seed_ids: list[str], config: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None]:
    """The seed tasks a prompt showed, looked up in the run's seed file; (examples, problem or None)."""
    path = (config.get("generate") or {}).get("seed_tasks")
    if not seed_ids:
        return [], None
    if not path or not Path(path).is_file():
        return [{"id": i, "instruction": None} for i in seed_ids], f"seed file {path!r} is not on this machine"
    try:
        seeds = _seeds(str(path), Path(path).stat().st_mtime_ns)
    except (OSError, UnicodeDecodeError) as e:  # show the ids, say why
        return [{"id": i, "instruction": None} for i in seed_ids], f"seed file {path} could not be read: {e}"
    return [{"id": i, **seeds.get(i, {"instruction": None})} for i in seed_ids], None


@lru_cache(maxsize=1)
def _prompt_env() -> jinja2.Environment:
    # The same settings as pipeline.generate.prompts (plain text, strict variables), so the prompt reads as sent.
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(PROMPTS_DIR)), undefined=jinja2.StrictUndefined,
                              keep_trailing_newline=False, autoescape=False)


def rendered_prompt(rec: dict[str, Any], seeds: list[dict[str, Any]]) -> tuple[str | None, str]:
    """Re-render the instruction prompt from its template, seeds and machine examples when the template file
    is unchanged (same hash); returns (prompt or None, a note saying how it was obtained)."""
    name = rec.get("template") or ""
    if not TEMPLATE_NAME.match(name):
        return None, f"template {name or '(none)'}: prompt not re-rendered; its inputs are listed below"
    path = PROMPTS_DIR / f"{name}.j2"
    if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest()[:12] != rec.get("template_hash"):
        return None, f"prompts/{name}.j2 changed since this record was made; its inputs are listed below"
    if any(s.get("instruction") is None for s in seeds):
        return None, "some seed tasks are missing; the prompt's inputs are listed below"
    examples = [s["instruction"] for s in seeds] + list(rec.get("prompt_machine_instructions") or [])
    try:
        prompt = _prompt_env().get_template(f"{name}.j2").render(examples=examples, num_new=10)
    except jinja2.TemplateError as e:  # the template wants other variables now
        return None, f"could not re-render prompts/{name}.j2 ({type(e).__name__}); its inputs are listed below"
    return prompt, f"re-rendered from prompts/{name}.j2 (hash {rec.get('template_hash')})"


def _token(item: Any) -> tuple[str, float, list] | None:
    if isinstance(item, dict):
        tok, lp = item.get("token"), item.get("logprob")
        alts = item.get("top_logprobs") or item.get("top") or []
    elif isinstance(item, (list, tuple)) and len(item) >= 2:
        tok, lp, alts = item[0], item[1], item[2] if len(item) > 2 else []
    else:
        return None
    try:
        lp = float(lp)
    except (TypeError, ValueError):
        return None
    return (str(tok) if tok is not None else "", lp, alts if isinstance(alts, list) else [])


def logprob_tokens(rec: dict[str, Any]) -> list[dict[str, Any]]:
    """Tokens with probability and shade (0 = certain, 1 = very unsure), from whichever logprob field exists."""
    for name in LOGPROB_FIELDS:
        value = rec.get(name)
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                continue
        if isinstance(value, dict):  # OpenAI style {"content": [...]}
            value = value.get("content")
        if isinstance(value, list) and value:
            out = []
            for item in value:
                t = _token(item)
                if t is None:
                    continue
                tok, lp, alts = t
                p = math.exp(min(lp, 0.0))
                alt_text = ", ".join(f"{a.get('token')!r} {math.exp(min(float(a.get('logprob', -99)), 0)):.2f}"
                                     for a in alts[:5] if isinstance(a, dict))
                out.append({"token": tok, "p": p, "shade": round(1.0 - p, 3), "alts": alt_text})
            if out:
                return out
    return []


def pretty_json(text: Any) -> str:
    if not text:
        return ""
    try:
        return json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(text)


def contenders(rows: list[dict[str, Any]]) -> list[str]:
    """Answer columns of eval outputs (those with a *_rouge_l score), in the report's order."""
    keys: list[str] = []
    for row in rows:
        for k in row:
            if k.endswith("_rouge_l") and k[: -len("_rouge_l")] in row and k[: -len("_rouge_l")] not in keys:
                keys.append(k[: -len("_rouge_l")])
    return sorted(keys, key=lambda k: (CONTENDER_ORDER.index(k) if k in CONTENDER_ORDER else 99, k))


def eval_extras(row: dict[str, Any], answer_keys: list[str]) -> dict[str, Any]:
    """Everything else stored per eval item (judge verdicts and the like), for a small table."""
    skip = {"id", "instruction", "input", "reference", *answer_keys, *(f"{k}_rouge_l" for k in answer_keys),
            *(f"{k}_judge" for k in answer_keys)}
    return {k: v for k, v in row.items() if k not in skip}
