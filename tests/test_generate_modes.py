"""alpaca, responses and magpie modes against a scripted fake teacher on loopback."""

from __future__ import annotations

import json

import pytest

from pipeline.config import load_config
from pipeline.errors import ConfigError, InputFileError
from pipeline.generate import generate_records
from pipeline.generate.responses import choose, load_user_instructions, magpie_prefix
from pipeline.teachers import Ledger, make_teacher
from tests.conftest import fast_overrides
from tests.fakes.openai_server import FakeOpenAIServer

ALPACA_REPLY = (" Name two mammals that live in the ocean.\n4. Input:\n<noinput>\n4. Output:\nDolphins and whales.\n"
                "###\n5. Instruction: Rewrite the sentence in the passive voice.\n5. Input:\nThe cat chased the mouse.\n"
                "5. Output:\nThe mouse was chased by the cat.\n###\n6. Instruction: Describe a picture of a sunset.\n6. Input:\n"
                "<noinput>\n6. Output:\nOrange sky.\n###\n7. Instruction: List three prime numbers")


def _run(tmp_path, responder, *extra):
    with FakeOpenAIServer(responder=responder) as server:
        cfg = load_config(profile="cpu-demo", overrides=fast_overrides(tmp_path / "runs", server.base_url) + list(extra))
        teacher = make_teacher(cfg.teacher, tmp_path / "cache.sqlite", Ledger())
        try:
            return (*generate_records(teacher, cfg.generate, cfg.curate, "t"), server)
        finally:
            teacher.close()


def test_alpaca_mode_keeps_triples_with_inputs_and_provenance(tmp_path):
    prompts = []

    def responder(body):
        prompts.append(body["prompt"])
        return ALPACA_REPLY

    records, stats, _ = _run(tmp_path, responder, "generate.mode=alpaca", "generate.max_prompts=1")
    kept = [(r.instruction, r.input, r.output) for r in records if r.status == "pending"]
    assert kept == [("Name two mammals that live in the ocean.", "", "Dolphins and whales."),
                    ("Rewrite the sentence in the passive voice.", "The cat chased the mouse.", "The mouse was chased by the cat.")]
    rejected = [(r.instruction, r.reject_reason) for r in records if r.status == "rejected"]
    assert rejected == [("Describe a picture of a sunset.", "blacklisted_word")]  # the cut 7th item is not a candidate
    assert stats["kept_instructions"] == 2 and stats["mode"] == "alpaca"
    r = records[0]
    assert len(r.prompt_seed_ids) == 3 and r.template == "alpaca" and len(r.template_hash) == 12
    assert prompts[0].rstrip().endswith("4. Instruction:") and prompts[0].count("###") == 4
    assert json.loads(r.gen_params)["stop"] == ["\n21.", "21. Instruction"]


def test_alpaca_unparseable_reply_is_a_reject_with_its_text(tmp_path):
    records, stats, _ = _run(tmp_path, lambda body: "I am a helpful assistant.", "generate.mode=alpaca", "generate.max_prompts=2")
    assert [r.reject_reason for r in records] == ["unparseable_reply", "unparseable_reply"]
    assert records[0].reject_detail == "I am a helpful assistant." and stats["kept_instructions"] == 0


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet", "datasets"])
def test_user_instructions_load_from_every_format(tmp_path, fmt):
    import datasets

    ds = datasets.Dataset.from_list([{"instruction": "Name a colour.", "input": ""},
                                     {"instruction": "Translate to German.", "input": "Good night."}])
    path = tmp_path / ("data" if fmt == "datasets" else f"data.{fmt}")
    {"jsonl": lambda: ds.to_json(str(path)), "csv": lambda: ds.to_csv(str(path)),
     "parquet": lambda: ds.to_parquet(str(path)), "datasets": lambda: ds.save_to_disk(str(path))}[fmt]()
    rows = load_user_instructions(path)
    assert [(r["instruction"], r["input"]) for r in rows] == [("Name a colour.", ""), ("Translate to German.", "Good night.")]


def test_user_instructions_without_instruction_column_name_the_fix(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question": "Why?"}\n')
    with pytest.raises(InputFileError, match="'instruction'"):
        load_user_instructions(path)


def test_responses_best_of_n_keeps_the_longest_and_all_samples(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"instruction": "Name a colour."}\n{"instruction": "Name a fruit."}\n')

    def responder(body):  # the sampling seed differs per sample index: use it to vary the length
        return "word " * (1 + body["seed"] % 5)

    records, stats, server = _run(tmp_path, responder, "generate.mode=responses", f"generate.responses_from={path}",
                                  "generate.responses_n=3", "generate.responses_choice=longest",
                                  "generate.response_temperature=0.8")
    assert server.total_requests == 6  # 2 instructions x 3 samples, each its own call
    for r in records:
        samples = json.loads(r.raw_reply)
        assert len(samples) == 3 and r.output == max(samples, key=len).strip()
        assert json.loads(r.gen_params)["choice"] == "longest"
    assert [r.instruction for r in records] == ["Name a colour.", "Name a fruit."]
    assert choose(["a", "ccc", "bb", "ccc"], "longest") == 1 and choose(["a", "ccc"], "first") == 0


def test_responses_n_with_greedy_decoding_is_a_config_error(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"instruction": "Name a colour."}\n')
    with pytest.raises(ConfigError, match="response_temperature"):
        _run(tmp_path, lambda b: "x", "generate.mode=responses", f"generate.responses_from={path}", "generate.responses_n=2")


def test_magpie_writes_requests_from_the_template_opening_then_answers_them(tmp_path):
    queries = ["How do I reverse a list in Python?", "", "Plan a three-day trip to Lisbon for a family of four.",
               "How do I reverse a list in Python!"]
    seen = []

    def responder(body):
        if "prompt" in body:
            seen.append(body)
            return queries[(len(seen) - 1) % len(queries)]
        return "Answer to: " + body["messages"][-1]["content"]

    records, stats, _ = _run(tmp_path, responder, "generate.mode=magpie", "generate.max_prompts=4",
                             "generate.prompts_per_round=1", "generate.target_instructions=10")
    prompt, stop = magpie_prefix(load_config(profile="cpu-demo").generate)
    assert all(b["prompt"] == prompt and b["stop"] == [stop] and b["temperature"] == 1.0 for b in seen)
    assert prompt.endswith("<|im_start|>user\n") and stop == "<|im_end|>"
    kept = [(r.instruction, r.output) for r in records if r.status == "pending"]
    assert kept == [(queries[0], "Answer to: " + queries[0]), (queries[2], "Answer to: " + queries[2])]
    assert sorted(r.reject_reason for r in records if r.status == "rejected") == ["near_duplicate", "unparseable_reply"]
    assert all(r.template == "magpie:chatml" for r in records) and stats["kept_instructions"] == 2


def test_responses_judge_best_keeps_the_sample_the_judge_prefers_in_both_orders(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"instruction": "Name a colour."}\n')

    def number(text: str) -> int:
        return int(text.split()[-1].rstrip("."))

    def responder(body):
        content = body["messages"][-1]["content"]
        if content.startswith("You are comparing two answers"):  # a judge that prefers the larger number, either order
            a = content.split("## Output (a)")[1].split("## Output (b)")[0].strip()
            b = content.split("## Output (b)")[1].split("Which output")[0].strip()
            return "Output (a)" if number(a) > number(b) else "Output (b)"
        return f"Colour number {body['seed']}."  # each sample has its own seed

    records, _, server = _run(tmp_path, responder, "generate.mode=responses", f"generate.responses_from={path}",
                              "generate.responses_n=3", "generate.responses_choice=judge-best",
                              "generate.response_temperature=0.8")
    samples = json.loads(records[0].raw_reply)
    assert len(set(samples)) == 3
    assert records[0].output == max(samples, key=number)
    assert server.total_requests == 3 + 2 * 2  # 3 samples, then 2 knockout rounds judged in both orders


def test_evol_round_keeps_good_rewrites_and_eliminates_by_wizardlm_rules(tmp_path):
    from pipeline.generate.evol import elimination_reason

    queries = ["Explain how tides work.", "Describe the water cycle.", "List three uses of copper.",
               "Suggest a name for a cat."]
    rewrites = {  # parent -> the teacher's evolution
        "Explain how tides work.": "#Rewritten Prompt#: Explain how the moon and the sun together cause spring and neap tides, step by step.",
        "Describe the water cycle.": "Describe the water cycle.",  # no information gain
        "List three uses of copper.": "Here is the rewritten prompt: list uses of copper.",  # copies the prompt's words
        "Suggest a name for a cat.": "Suggest five names for a black cat that hunts at night, with a reason for each.",
    }
    state = {"n": 0}

    def responder(body):
        if "prompt" in body:
            state["n"] += 1
            return queries[state["n"] - 1]
        content = body["messages"][-1]["content"]
        if "#Given Prompt#" in content:
            parent = content.split("#Given Prompt#:\n")[1].split("\n\n#")[0].strip()
            return rewrites[parent]
        if "black cat" in content:
            return "Sorry, I can't."  # an apology: the evolution failed
        return "A full answer."

    records, stats, _ = _run(tmp_path, responder, "generate.mode=magpie", "generate.max_prompts=4",
                             "generate.prompts_per_round=1", "generate.target_instructions=10", "generate.evol_rounds=1")
    evolved = [r for r in records if r.template.startswith("evol_")]
    got = {json.loads(r.gen_params)["parent_instruction"]: (r.status, r.reject_reason) for r in evolved}
    assert got == {"Explain how tides work.": ("pending", None), "Describe the water cycle.": ("rejected", "evol_no_gain"),
                   "List three uses of copper.": ("rejected", "evol_copied_prompt"),
                   "Suggest a name for a cat.": ("rejected", "evol_answer_apology")}
    good = next(r for r in evolved if r.status == "pending")
    assert good.instruction.startswith("Explain how the moon") and good.output == "A full answer."
    assert stats["evolved_kept"] == 1
    assert elimination_reason("a b", "c d e", "the , of .") == "evol_answer_empty"
