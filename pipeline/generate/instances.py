"""Self-Instruct's steps 2 and 3: is each new instruction a classification task, and an instance for it,
output-first for classification (label, then an input of that label) and input-first otherwise."""

from __future__ import annotations

import json
import random

from pipeline.config import GenerateConfig
from pipeline.generate.parse import parse_input_first, parse_is_classification, parse_output_first
from pipeline.generate.prompts import render, template_hash
from pipeline.generate.seeds import SeedTask
from pipeline.progress import Progress
from pipeline.records import Record
from pipeline.teachers.base import CachedTeacher, Request

# Stop at the next task: the prompt is a few-shot list of tasks and the model will happily continue it.
INSTANCE_STOP = ["\nTask:", "\n\n\n"]
MAX_EXAMPLE_CHARS = 400  # long seed instances would crowd a 2k context and the model's attention


def as_request(style: str, text: str, **params) -> Request:
    """A rendered prompt as a raw completion (few-shot continuation) or a single user message."""
    if style == "completion":
        return Request(kind="completion", prompt=text, **params)
    return Request(kind="chat", messages=[{"role": "user", "content": text}], **params)


def classification_examples(seeds: list[SeedTask], k: int) -> list[SeedTask]:
    """A fixed, balanced few-shot set (half classification, half not), interleaved as in the paper's prompt."""
    yes = [s for s in seeds if s.is_classification][: k // 2]
    no = [s for s in seeds if not s.is_classification][: k - len(yes)]
    mixed = [x for pair in zip(no, yes) for x in pair]
    return mixed + no[len(yes):] + yes[len(no):]


def instance_examples(seeds: list[SeedTask], classification: bool, k: int, instruction: str, seed: int) -> list[dict]:
    """k seed instances of the same kind, chosen per instruction with a seeded RNG (same run, same prompt)."""
    pool = [s for s in seeds if s.is_classification == classification and s.instances
            and len(s.instruction) + len(s.instances[0].input) + len(s.instances[0].output) <= MAX_EXAMPLE_CHARS]
    picks = random.Random(f"{seed}:{instruction}").sample(pool, min(k, len(pool)))
    return [{"id": s.id, "instruction": s.instruction, "input": s.instances[0].input, "output": s.instances[0].output}
            for s in picks]


def identify_classification(teacher: CachedTeacher, instructions: list[str], seeds: list[SeedTask],
                            cfg: GenerateConfig) -> list[bool | None]:
    """Ask the teacher 'is it classification?' for each instruction (greedy, few-shot); None = no yes/no."""
    examples = classification_examples(seeds, cfg.classification_examples)
    reqs = [as_request(cfg.prompt_style, render("is_classification", examples=examples, instruction=text),
                       max_tokens=3, temperature=0.0, stop=["\n"], stage="generate")
            for text in instructions]
    with Progress(len(reqs), "generate: classification?", key="generate-classify") as bar:
        replies = teacher.generate(reqs, on_done=bar.update)
    return [parse_is_classification(r.text) if r.ok else None for r in replies]


def make_instances(teacher: CachedTeacher, records: list[Record], seeds: list[SeedTask],
                   cfg: GenerateConfig) -> list[Record]:
    """Fill input/output of each pending record from instance generation; unparseable ones are rejected
    with the raw reply (or left pending for the answer path when cfg.instances is 'paper-or-answer')."""
    pending = [r for r in records if r.status == "pending" and not r.output]
    if not pending:
        return records
    kinds = identify_classification(teacher, [r.instruction for r in pending], seeds, cfg)
    reqs, meta = [], []
    for r, clf in zip(pending, kinds):
        name = "instance_output_first" if clf else "instance_input_first"
        examples = instance_examples(seeds, bool(clf), cfg.instance_examples, r.instruction, cfg.random_seed)
        text = render(name, examples=examples, instruction=r.instruction)
        reqs.append(as_request(cfg.prompt_style, text, max_tokens=cfg.instance_max_tokens, temperature=0.0,
                               stop=INSTANCE_STOP if cfg.prompt_style == "completion" else [], stage="generate"))
        meta.append((name, examples, clf))
    with Progress(len(reqs), "generate: instances", key="generate-instances") as bar:
        replies = teacher.generate(reqs, on_done=bar.update)
    done: dict[int, Record] = {}
    for r, req, reply, (name, examples, clf) in zip(pending, reqs, replies, meta):
        params = {**json.loads(r.gen_params or "{}"), "is_classification": clf, "instance_template": name,
                  "instance_template_hash": template_hash(name), "instance_seed_ids": [e["id"] for e in examples],
                  "instance_params": req.params()}
        base = {**r.model_dump(exclude={"id"}), "gen_params": json.dumps(params)}
        if not reply.ok:
            done[id(r)] = Record(**base).reject("teacher_error", reply.error)
            continue
        parse = parse_output_first if clf else parse_input_first
        inst = parse(reply.text, reply.finish_reason == "length")
        if inst is None:
            reason_detail = f"{name}: {reply.text[:500]}"
            if cfg.instances == "paper-or-answer":  # left for the answer path; the failure stays in provenance
                params["instance_failure"] = reason_detail
                done[id(r)] = Record(**{**base, "gen_params": json.dumps(params)})
            else:
                done[id(r)] = Record(**base).reject("unparseable_instance", reason_detail)
            continue
        inp, out = inst
        done[id(r)] = Record(**{**base, "input": inp, "output": out, "finish_reason": reply.finish_reason,
                                "raw_reply": r.raw_reply + "\n\n--- instance reply ---\n" + reply.text})
    return [done.get(id(r), r) for r in records]
