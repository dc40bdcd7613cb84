"""Each filter on small examples, and curate() end to end: exact and near duplicates, decontamination."""

from __future__ import annotations

import pytest

from pipeline.config import CurateConfig
from pipeline.curate import contamination_report, curate, reject_counts, stage_counts
from pipeline.curate import filters as F
from pipeline.records import Record

CFG = CurateConfig()


def rec(instruction: str, output: str = "A fine answer.", input: str = "", **kw) -> Record:
    return Record(instruction=instruction, input=input, output=output, **kw)


@pytest.mark.parametrize("instruction, reason", [
    ("Describe the image below in detail.", "blacklisted_word"),
    ("Draw a cat for me please.", "blacklisted_word"),
    ("Plot the sales figures by month.", "blacklisted_word"),
    ("Go to the website and summarise it.", "blacklisted_word"),
    ("Create a flowchart of the login process.", "blacklisted_word"),
    ("Summarise the attached file.", "blacklisted_word"),
    ("Write a program that sorts a list.", "write_a_program"),
    ("\"Quoted\" instructions start with punctuation.", "starts_with_punctuation"),
    ("1. Number lists are fine though", None),
    ("Éxplain the rules of chess briefly.", "starts_non_ascii"),
    ("Summarise", "too_short"),
    ("word " * 151, "too_long"),
    ("Explain photosynthesis to a child.", None),
    ("Explain how mapping works in cartography.", None),  # 'map' only as a whole word
    ("Write a programme of events for a wedding.", "write_a_program"),  # Alpaca's check is a plain prefix
])
def test_instruction_filters(instruction, reason):
    assert F.first_failure(rec(instruction), CFG, F.INSTRUCTION_FILTERS) == reason


@pytest.mark.parametrize("kw, reason", [
    (dict(output="   "), "empty_output"),
    (dict(input="Paris", output="Paris"), "output_equals_input"),
    (dict(output="Here are the steps:"), "trailing_colon"),
    (dict(output="As an AI language model, I cannot have opinions."), "refusal"),
    (dict(output="I'm sorry, but I cannot help with that."), "refusal"),
    (dict(output="The capital of France is", finish_reason="length"), "truncated_reply"),
    (dict(output="The capital of France is Paris.", finish_reason="stop"), None),
])
def test_output_filters(kw, reason):
    assert F.first_failure(rec("Name the capital of France.", **kw), CFG, F.OUTPUT_FILTERS) == reason


def alpaca_drops_for_length(inst: str) -> bool:
    """The rule as Alpaca wrote it (generate_instruction.py, post_process_gpt3_response)."""
    return len(inst.split()) <= 3 or len(inst.split()) > 150


@pytest.mark.parametrize("inst", [
    "Summarise", "Name two rivers", "Name three rivers.", "Name three big rivers.", "  Define\tentropy \n now ",
    "List  four\u00a0prime numbers", "Translate 'chat' into English, please.", "word " * 150, "word " * 151,
    "Rate this:\n\nGood", "Explain why, briefly and clearly.",
])
def test_length_filters_match_alpacas_rule_exactly(inst):
    ours = F.first_failure(rec(inst), CFG, [F.too_short, F.too_long]) is not None
    assert ours == alpaca_drops_for_length(inst)


def test_blacklist_and_word_bounds_come_from_config():
    cfg = CurateConfig(blacklist=["chess"], min_words=1, max_words=4)
    assert F.first_failure(rec("Play chess"), cfg, F.INSTRUCTION_FILTERS) == "blacklisted_word"
    assert F.first_failure(rec("Describe the image"), cfg, F.INSTRUCTION_FILTERS) is None
    assert F.first_failure(rec("one two three four five"), cfg, F.INSTRUCTION_FILTERS) == "too_long"


def test_curate_reasons_order_and_near_duplicates():
    records = [
        rec("Give three tips for staying healthy."),
        rec("Give three tips for staying healthy!"),           # exact after normalisation
        rec("Give me three tips for staying very healthy."),   # near duplicate of the first
        rec("Describe the picture of a sunset."),               # blacklist
        rec("Translate 'good morning' into French.", output="Bonjour"),
        rec("List the planets of the solar system in order."),
        rec("Write a haiku about autumn leaves.", output="I cannot assist"),
        rec("", status="rejected", reject_reason="teacher_error"),
    ]
    accepted, rejected = curate(records, CFG, seed_instructions=[], eval_texts=[])
    assert [r.instruction for r in accepted] == [records[0].instruction, records[4].instruction, records[5].instruction]
    assert all(r.status == "accepted" for r in accepted)
    reasons = {r.instruction: r.reject_reason for r in rejected}
    assert reasons[records[1].instruction] == "exact_duplicate"
    assert reasons[records[2].instruction] == "near_duplicate"
    assert "ROUGE-L" in next(r for r in rejected if r.reject_reason == "near_duplicate").reject_detail
    assert reasons[records[3].instruction] == "blacklisted_word"
    assert reasons[records[6].instruction] == "refusal"
    assert reject_counts(rejected)["teacher_error"] == 1
    # Rejects stay in input order.
    assert [r.instruction for r in rejected] == [records[i].instruction for i in (1, 2, 3, 6, 7)]
    counts = stage_counts(len(records), accepted, rejected)
    assert counts == {"input": 8, "filters_or_upstream": 3, "exact_duplicates": 1, "decontamination": 0,
                      "near_duplicates": 1, "quality": 0, "selection": 0, "accepted": 3}


def test_seeds_count_as_kept_unless_disabled():
    seed = "Generate a list of five creative names for a coffee shop."
    records = [rec("Generate a list of five creative names for a new coffee shop."),
               rec("Generate a list of 5 creative names for a coffee shop")]
    accepted, rejected = curate(records, CFG, seed_instructions=[seed])
    assert not accepted and {r.reject_reason for r in rejected} == {"near_duplicate"}
    assert seed in rejected[0].reject_detail
    accepted, _ = curate(records, CurateConfig(dedupe_against_seeds=False), seed_instructions=[seed])
    assert len(accepted) == 1  # the two are near duplicates of each other


def test_prior_versions_count_as_kept():
    earlier = ["Explain the difference between weather and climate in simple terms."]
    records = [rec("Explain the difference between weather and climate in very simple terms."),
               rec("Name three renewable sources of energy.")]
    accepted, rejected = curate(records, CFG, prior_kept=earlier)
    assert [r.instruction for r in accepted] == [records[1].instruction]
    assert rejected[0].reject_reason == "near_duplicate"


def test_decontamination_drops_planted_eval_items_and_reports_them():
    eval_texts = [
        "Rewrite the following sentence in the passive voice. The committee approved the new budget after a long debate.",
        "Explain the causes of the French Revolution in three sentences for a middle school class studying European history.",
    ]
    records = [
        rec("Rewrite the following sentence in the passive voice.",
            input="The committee approved the new budget after a long debate."),  # eval item, split in two
        rec("Explain the causes of the French Revolution in three sentences for a middle school class studying European history."),
        rec("Explain the causes of the American Civil War for a general audience in two short paragraphs please."),
        rec("Describe how a bill becomes a law in the United States Congress, step by step."),
    ]
    accepted, rejected = curate(records, CFG, eval_texts=eval_texts)
    contaminated = [r for r in rejected if r.reject_reason == "contaminated"]
    assert [r.instruction for r in contaminated] == [records[0].instruction, records[1].instruction]
    assert eval_texts[0] in contaminated[0].reject_detail
    assert [r.instruction for r in accepted] == [records[2].instruction, records[3].instruction]
    report = contamination_report(rejected, len(eval_texts), CFG)
    assert report["dropped"] == 2 and report["eval_items_checked"] == 2
    assert report["examples"][1]["instruction"] == records[1].instruction
    # Sharing only the instruction's wording with an eval item is not contamination...
    other = rec("Rewrite the following sentence in the passive voice.", input="The dog chased the ball across the park.")
    accepted, rejected = curate([other], CFG, eval_texts=eval_texts)
    assert accepted and not rejected
    # ...unless the configured threshold says so (1 of its 9 8-grams is in the eval item).
    accepted, rejected = curate([other], CurateConfig(decontaminate_threshold=0.1), eval_texts=eval_texts)
    assert [r.reject_reason for r in rejected] == ["contaminated"]
