"""The Self-Instruct loop and its instance step against a scripted fake teacher on loopback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.generate import bootstrap_instructions, generate_records, load_seed_tasks
from pipeline.teachers import Ledger, make_teacher
from tests.conftest import fast_overrides
from tests.fakes.openai_server import FakeOpenAIServer

SEEDS = [
    {"id": "s1", "instruction": "Give three tips for staying healthy.", "instances": [{"input": "", "output": "Sleep, eat well, move."}]},
    {"id": "s2", "instruction": "Classify the sentiment of the review as positive or negative.",
     "instances": [{"input": "I loved it.", "output": "positive"}], "is_classification": True},
    {"id": "s3", "instruction": "Translate the sentence into French.", "instances": [{"input": "Good morning.", "output": "Bonjour."}]},
    {"id": "s4", "instruction": "Is the number even or odd?", "instances": [{"input": "7", "output": "odd"}], "is_classification": True},
    {"id": "s5", "instruction": "Write a short poem about autumn leaves.", "instances": [{"input": "", "output": "Red and gold they fall."}]},
]

# The teacher's continuations of the few-shot prompt, in the order the loop asks for them (one prompt per round).
SCRIPT = [
    " Name three rivers in Asia.\nTask 5: Write a haiku about green tea.\n\nSure, here are more.",
    " Name three rivers in Asia!\nTask 5: Explain how vaccines train the immune system.",
    " Draw a picture of a cat.\nTask 5: Ok",
    " Suggest a name for a bakery that sells only rye bread.",
]
# Worked out by hand from SCRIPT: round 1 keeps both (the prose after the blank line is ignored); round 2's
# first item is a ROUGE-L 1.0 duplicate of round 1's; round 3 is all rejects ('draw'/'picture' blacklisted,
# 'Ok' too short); round 4 keeps its one item.
EXPECTED_POOL = ["Name three rivers in Asia.", "Write a haiku about green tea.",
                 "Explain how vaccines train the immune system.", "Suggest a name for a bakery that sells only rye bread."]
EXPECTED_REJECTS = {"Name three rivers in Asia!": "near_duplicate", "Draw a picture of a cat.": "blacklisted_word",
                    "Ok": "too_short"}


class Scripted:
    """A responder that plays SCRIPT in order and remembers every prompt it was shown."""

    def __init__(self, script=SCRIPT):
        self.script, self.prompts = list(script), []

    def __call__(self, body: dict) -> str:
        if "prompt" not in body:
            return "An answer."
        self.prompts.append(body["prompt"])
        return self.script[len(self.prompts) - 1]


@pytest.fixture
def seed_file(tmp_path) -> Path:
    path = tmp_path / "seeds.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in SEEDS))
    return path


def _config(tmp_path, server, seed_file, *extra):
    return load_config(profile="cpu-demo", overrides=fast_overrides(tmp_path / "runs", server.base_url) + [
        f"generate.seed_tasks={seed_file}", "generate.seed_examples=2", "generate.machine_examples=1",
        "generate.prompts_per_round=1", "generate.target_instructions=100", "generate.max_prompts=4", *extra])


def _run_loop(cfg, cache: Path):
    teacher = make_teacher(cfg.teacher, cache, Ledger())
    try:
        return bootstrap_instructions(teacher, load_seed_tasks(cfg.generate.seed_tasks), cfg.generate, cfg.curate, "t")
    finally:
        teacher.close()


def _examples_in(prompt: str) -> list[str]:
    return [line.split(":", 1)[1].strip() for line in prompt.splitlines() if line.startswith("Task ") and ":" in line
            and line.split(":", 1)[1].strip()]


def test_bootstrap_pool_after_four_rounds_matches_hand_reference(tmp_path, seed_file):
    responder = Scripted()
    with FakeOpenAIServer(responder=responder) as server:
        cfg = _config(tmp_path, server, seed_file)
        records, stats = _run_loop(cfg, tmp_path / "cache.sqlite")
    kept = [r.instruction for r in records if r.status == "pending"]
    assert kept == EXPECTED_POOL
    assert {r.instruction: r.reject_reason for r in records if r.status == "rejected"} == EXPECTED_REJECTS
    assert stats == {"prompts": 4, "candidates": 7, "kept_instructions": 4}
    seeds = {s["instruction"] for s in SEEDS}
    for i, prompt in enumerate(responder.prompts):
        shown = _examples_in(prompt)
        machine = [x for x in shown if x not in seeds]
        kept_before = {1: [], 2: EXPECTED_POOL[:2], 3: EXPECTED_POOL[:3], 4: EXPECTED_POOL[:3]}[i + 1]
        # 3 examples per prompt; once the pool has machine instructions one of them fills the machine slot.
        assert len(shown) == 3 and len(machine) == (1 if kept_before else 0)
        assert set(machine) <= set(kept_before)
        assert prompt.rstrip().endswith("Task 4:")
    # Provenance names exactly what the prompt showed.
    r = next(r for r in records if r.instruction == EXPECTED_POOL[2])
    shown = _examples_in(responder.prompts[1])
    assert [next(s["instruction"] for s in SEEDS if s["id"] == i) for i in r.prompt_seed_ids] + r.prompt_machine_instructions == shown
    assert json.loads(r.gen_params)["seed"] == cfg.generate.random_seed and r.template == "self_instruct_completion"


def test_loop_is_deterministic_and_resumes_without_paying_twice(tmp_path, seed_file):
    first = Scripted()
    with FakeOpenAIServer(responder=first) as server:
        full, _ = _run_loop(_config(tmp_path, server, seed_file), tmp_path / "a.sqlite")
    # Same seed, fresh cache, fresh teacher: the same prompts in the same order, the same pool.
    again = Scripted()
    with FakeOpenAIServer(responder=again) as server:
        _run_loop(_config(tmp_path, server, seed_file), tmp_path / "b.sqlite")
    assert again.prompts == first.prompts
    # A run stopped after 2 prompts, then resumed to 4 on its cache: only the 2 new prompts reach the teacher,
    # and the records equal the uninterrupted run's.
    resumed = Scripted()
    with FakeOpenAIServer(responder=resumed) as server:
        _run_loop(_config(tmp_path, server, seed_file, "generate.max_prompts=2"), tmp_path / "c.sqlite")
        assert len(resumed.prompts) == 2
        records, _ = _run_loop(_config(tmp_path, server, seed_file), tmp_path / "c.sqlite")
        assert server.total_requests == 4
    strip = lambda rs: [(r.instruction, r.status, r.reject_reason, r.prompt_seed_ids, r.prompt_machine_instructions) for r in rs]
    assert strip(records) == strip(full)
    assert resumed.prompts == first.prompts


def instance_teacher(body: dict) -> str:
    """Scripted replies for the paper's steps 2-3: a yes/no classifier, then output- or input-first instances."""
    if "messages" in body:
        return "A plain answer from the answer path."
    prompt = body["prompt"]
    if "Task:" not in prompt:  # the bootstrap prompt ('Task 1: ...')
        return (" Tell the sentiment of this tweet.\nTask 5: Name three rivers in Asia.\n"
                "Task 6: Write a haiku about green tea.")
    task = prompt.rsplit("Task:", 1)[1]
    if prompt.rstrip().endswith("Is it classification?"):
        return " Yes" if "sentiment" in task or "spam" in task else " No"
    if prompt.rstrip().endswith("Class label:"):
        return " Positive\nInput: The soup was warm and the staff were kind.\n\nTask: Next"
    if "rivers" in task:
        return " <noinput>\nOutput: The Yangtze, the Ganges and the Mekong."
    if "haiku" in task:
        return " I cannot think of one."  # no 'Output:': not an instance
    return " <noinput>\nOutput: Something."


@pytest.mark.parametrize("mode", ["paper", "paper-or-answer"])
def test_instances_output_first_for_classification_input_first_otherwise(tmp_path, seed_file, mode):
    with FakeOpenAIServer(responder=instance_teacher) as server:
        cfg = _config(tmp_path, server, seed_file, "generate.max_prompts=1", f"generate.instances={mode}")
        teacher = make_teacher(cfg.teacher, tmp_path / "cache.sqlite", Ledger())
        records, stats = generate_records(teacher, cfg.generate, cfg.curate, "t")
        teacher.close()
    by = {r.instruction: r for r in records}
    clf = by["Tell the sentiment of this tweet."]
    assert (clf.input, clf.output) == ("The soup was warm and the staff were kind.", "Positive")
    assert json.loads(clf.gen_params)["instance_template"] == "instance_output_first"
    river = by["Name three rivers in Asia."]
    assert (river.input, river.output) == ("", "The Yangtze, the Ganges and the Mekong.")
    params = json.loads(river.gen_params)
    assert params["instance_template"] == "instance_input_first" and params["is_classification"] is False
    assert sorted(params["instance_seed_ids"]) == ["s1", "s3", "s5"]  # the non-classification seeds only
    haiku = by["Write a haiku about green tea."]
    if mode == "paper":
        assert haiku.status == "rejected" and haiku.reject_reason == "unparseable_instance"
        assert "I cannot think of one." in haiku.reject_detail
    else:
        assert haiku.status == "pending" and haiku.output == "A plain answer from the answer path."
        assert "I cannot think of one." in json.loads(haiku.gen_params)["instance_failure"]
    assert stats["instances_parsed"] == 2
