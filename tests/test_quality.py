"""Model-based quality: IFD on the tiny real student, the judge through the fake OpenAI-compatible server, the
reward scorer on a tiny real reward model, selection that keeps every kind of instruction, and the curate stage
that saves scores, a distribution and its plot."""

from __future__ import annotations

import json
import math

import pytest

from pipeline.config import (CurateConfig, IFDScorerConfig, JudgeScorerConfig, RewardScorerConfig, SelectConfig,
                             TeacherConfig, load_config)
from pipeline.curate.quality import (QualityContext, apply_quality, ifd_scores, keep_top_fraction, parse_rating,
                                     percentile_ranks, reward_scores, select)
from pipeline.errors import ConfigError
from pipeline.records import Record
from pipeline.teachers import Ledger
from tests.conftest import TINY_STUDENT_DROP, fast_overrides
from tests.fakes.openai_server import FakeOpenAIServer


@pytest.fixture(scope="module")
def tiny_student():
    from pipeline.models import resolve_student

    return resolve_student("embedded-cut", json.loads(TINY_STUDENT_DROP), "smollm2-135m-instruct")


def rec(instruction: str, output: str = "An answer.", **kw) -> Record:
    return Record(instruction=instruction, output=output, status="accepted", **kw)


# --- IFD --------------------------------------------------------------------------------------------------

def _hand_mean_nll(model, ids: list[int], n_targets: int) -> float:
    """Mean negative log-likelihood of the last n_targets tokens, one unpadded sequence at a time."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    total = 0.0
    for t in range(len(ids) - n_targets, len(ids)):
        total -= float(torch.log_softmax(logits[t - 1], dim=-1)[ids[t]])
    return total / n_targets


def test_ifd_equals_a_hand_computation_on_the_tiny_model(tiny_student):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    records = [rec("Name three primary colours.", "Red, blue and yellow are the three primary colours."),
               rec("Translate to French.", "Bonjour, comment allez-vous aujourd'hui ?", input="Hello, how are you today?")]
    got = ifd_scores(tiny_student, records, batch_size=2)  # one padded batch holding both records, both ways

    tok = AutoTokenizer.from_pretrained(str(tiny_student))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_student)).eval()
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    for r, g in zip(records, got):
        user = r.instruction + (f"\n\n{r.input}" if r.input else "")  # prompts/response.j2
        prompt = tok.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)
        answer = tok(r.output, add_special_tokens=False)["input_ids"]
        cond = _hand_mean_nll(model, list(prompt) + answer, len(answer))
        alone = _hand_mean_nll(model, [start] + answer, len(answer))
        assert g["answer_tokens"] == len(answer)
        assert g["loss_conditioned"] == pytest.approx(cond, rel=1e-4)
        assert g["loss_alone"] == pytest.approx(alone, rel=1e-4)
        assert g["ifd"] == pytest.approx(cond / alone, rel=1e-4)
    # The two records differ, so a mix-up between them (or with padding) would show.
    assert got[0]["ifd"] != pytest.approx(got[1]["ifd"], rel=1e-3)


def test_ifd_scorer_rejects_at_one_and_the_bottom_fraction(tiny_student):
    records = [rec("Name three primary colours.", "Red, blue and yellow."),
               rec("Write a haiku about rain.", "Soft rain on the roof\nwhispers to the sleeping town\nuntil the dawn comes."),
               rec("Repeat the word yes.", "yes"),
               rec("Describe a cat in one sentence.", "A cat is a small, curious animal with soft fur.")]
    ctx = QualityContext(TeacherConfig(), None, Ledger(), lambda: tiny_student)
    cfg = CurateConfig(quality=[IFDScorerConfig(max_ifd=10.0, keep_fraction=0.5)])
    kept, rejected, report = apply_quality(records, cfg, ctx)
    assert len(kept) == 2 and {r.reject_reason for r in rejected} == {"low_ifd"}
    assert min(r.ifd for r in kept) > max(r.ifd for r in rejected)  # the bottom half by IFD went
    assert all(r.quality_score is not None for r in kept) and report["steps"][0]["rejected"] == 2
    # A ceiling below every IFD rejects all of them, each saying why.
    lowest = min(r.ifd for r in kept + rejected)
    kept, rejected, _ = apply_quality(records, CurateConfig(quality=[IFDScorerConfig(max_ifd=lowest * 0.99)]), ctx)
    assert not kept and all("does not help" in r.reject_detail for r in rejected)


# --- judge ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reply,expected", [
    ("Score: 4\nReason: Correct and complete.", (4.0, "Correct and complete.")),
    ("**Score:** 4.5\n**Reason:** Clear.", (4.5, "Clear.")),
    ("Rating: 3/5. Reason: vague", (3.0, "vague")),
    ("5\nThe answer is accurate.", (5.0, "The answer is accurate.")),
    ("Score: 9\nReason: off the scale", None),
    ("Score: 0", None),
    ("I think this answer is quite good.", None),
    ("", None),
])
def test_parse_rating(reply, expected):
    assert parse_rating(reply) == expected


def _judge_responder(body: dict) -> str:
    prompt = body["messages"][-1]["content"]
    if "## Instruction\nExplain why the sky is blue." in prompt:
        return "Score: 5\nReason: Accurate and clear."
    if "## Instruction\nCan I help you today?" in prompt:
        return "Score: 1\nReason: The instruction asks for nothing."
    if "## Instruction\nList two fruits." in prompt:
        return "This response is lovely!"  # no score at all
    return "Score: 11\nReason: out of range"


def test_judge_scores_and_caches_ratings_and_rejects_malformed_ones(tmp_path):
    records = [rec("Explain why the sky is blue.", "Rayleigh scattering favours short wavelengths."),
               rec("Can I help you today?", "Yes."),
               rec("List two fruits.", "Apple, pear."),
               rec("Name a prime number.", "Seven.")]
    cfg = CurateConfig(quality=[JudgeScorerConfig(min_score=4)])
    with FakeOpenAIServer(responder=_judge_responder) as server:
        teacher = TeacherConfig(backend="openai", base_url=server.base_url, model="fake-judge", max_retries=1)
        ledger = Ledger()
        ctx = QualityContext(teacher, tmp_path / "teacher.sqlite", ledger, lambda: None)
        kept, rejected, _ = apply_quality(records, cfg, ctx)
        assert [(r.instruction, r.judge_score, r.judge_reason) for r in kept] == [
            ("Explain why the sky is blue.", 5.0, "Accurate and clear.")]
        why = {r.instruction: (r.reject_reason, r.reject_detail) for r in rejected}
        assert why["Can I help you today?"][0] == "low_judge_score" and "asks for nothing" in why["Can I help you today?"][1]
        assert why["List two fruits."][0] == "judge_unparsed" and "lovely" in why["List two fruits."][1]
        assert why["Name a prime number."][0] == "judge_unparsed"
        assert ledger.stages["curate_judge"].requests == 4
        paid = server.total_requests
        # The same ratings again come from the cache: no new request, same verdicts.
        ledger2 = Ledger()
        kept2, rejected2, _ = apply_quality(records, cfg, QualityContext(teacher, tmp_path / "teacher.sqlite",
                                                                         ledger2, lambda: None))
        assert server.total_requests == paid and ledger2.stages["curate_judge"].cached == 4
        assert [r.id for r in kept2] == [r.id for r in kept] and len(rejected2) == 3


def test_judge_refuses_ratings_the_budget_cannot_cover(tmp_path):
    from pipeline.errors import BudgetExceeded

    records = [rec(f"Explain why the sky is blue, part {i}.") for i in range(3)]
    with FakeOpenAIServer(responder=lambda body: "Score: 4\nReason: fine") as server:
        teacher = TeacherConfig(backend="openai", base_url=server.base_url, model="fake-judge", max_concurrency=1)
        ledger = Ledger(budget_tokens=1)  # not even one rating's worst case fits
        with pytest.raises(BudgetExceeded, match="budget"):
            apply_quality(records, CurateConfig(quality=[JudgeScorerConfig()]),
                          QualityContext(teacher, tmp_path / "t.sqlite", ledger, lambda: None))
        # The run's ledger admits a call only when its worst case fits the budget: nothing is sent, nothing paid.
        assert server.total_requests == 0


# --- reward model -----------------------------------------------------------------------------------------

def test_reward_model_configured_but_missing_is_a_clear_error(tmp_path):
    from pipeline.stages import preflight

    cfg = load_config(overrides=[f"runs_dir={tmp_path}", f"curate.quality=[{{scorer: reward, model: {tmp_path}/no-rm}}]"])
    with pytest.raises(ConfigError, match=r"curate.quality reward model .*no-rm.* not available"):
        preflight(cfg)


@pytest.mark.slow  # builds and saves a reward model: tens of seconds on 2 cores
def test_reward_scorer_on_a_tiny_real_reward_model(tiny_student, tmp_path):
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    config = AutoConfig.from_pretrained(str(tiny_student), num_labels=1)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "rm")
    AutoTokenizer.from_pretrained(str(tiny_student)).save_pretrained(tmp_path / "rm")
    records = [rec("Name a colour.", "Blue."), rec("Write a long story about a dragon.", "Once upon a time " * 10)]
    one_by_one = [reward_scores(str(tmp_path / "rm"), [r], batch_size=1)[0] for r in records]
    batched = reward_scores(str(tmp_path / "rm"), records, batch_size=2)  # padding must not change a score
    assert batched == pytest.approx(one_by_one, rel=1e-4) and all(math.isfinite(s) for s in batched)
    ctx = QualityContext(TeacherConfig(), None, Ledger(), lambda: None)
    kept, rejected, _ = apply_quality(records, CurateConfig(quality=[RewardScorerConfig(model=str(tmp_path / "rm"),
                                                                                        keep_fraction=0.5)]), ctx)
    assert len(kept) == 1 and rejected[0].reject_reason == "low_reward"
    assert kept[0].reward_score == pytest.approx(max(batched), rel=1e-4)


# --- selection --------------------------------------------------------------------------------------------

def _pool() -> list[Record]:
    # 12 "write" records score highest, then 6 "explain", then 4 "list": a global top 8 would be all "write".
    rows = [(f"Write a poem about topic {i}.", 0.9 + i / 1000) for i in range(12)]
    rows += [(f"Explain the idea number {i}.", 0.5 + i / 1000) for i in range(6)]
    rows += [(f"List the facts number {i}.", 0.1 + i / 1000) for i in range(4)]
    return [rec(t, quality_score=s) for t, s in rows]


def test_selection_keeps_every_bucket_and_the_best_within_each():
    kept, dropped = select(_pool(), SelectConfig(keep_top_n=8))
    verbs = [r.instruction.split()[0] for r in kept]
    assert len(kept) == 8 and {"Write", "Explain", "List"} <= set(verbs)
    assert verbs.count("Write") > verbs.count("Explain") >= verbs.count("List")  # shares follow bucket sizes
    for verb in ("Write", "Explain", "List"):  # within a bucket, the top scores are the ones kept
        k = [r.quality_score for r in kept if r.instruction.startswith(verb)]
        d = [r.quality_score for r in dropped if r.instruction.startswith(verb)]
        assert not d or min(k) > max(d)
    assert {r.reject_reason for r in dropped} == {"not_selected"} and "bucket 'write'" in dropped[0].reject_detail
    glob, _ = select(_pool(), SelectConfig(keep_top_n=8, diversity="none"))
    assert {r.instruction.split()[0] for r in glob} == {"Write"}


def test_selection_is_deterministic_for_a_seed():
    pool = _pool()
    for r in pool[12:15]:
        pool[pool.index(r)] = r.model_copy(update={"quality_score": 0.5})  # ties: the seed breaks them
    runs = {seed: [[r.id for r in select(pool, SelectConfig(keep_fraction=0.5, by=by, seed=seed))[0]]
                   for by in ("quality", "random")] for seed in (0, 0, 1, 2, 3)}
    again = [[r.id for r in select(pool, SelectConfig(keep_fraction=0.5, by=by, seed=0))[0]] for by in ("quality", "random")]
    assert again == runs[0]
    assert len({tuple(v[1]) for v in runs.values()}) > 1  # a random selection does depend on the seed
    assert all(len(v[0]) == 11 for v in runs.values())


def test_keep_fraction_keeps_ties_together_and_ranks_are_tie_aware():
    records = [rec(f"Rate item {i} now.", judge_score=s) for i, s in enumerate([5, 4, 4, 4, 2])]
    kept, low = keep_top_fraction(records, "judge", 0.4)  # the top 2 include a 4, so every 4 stays
    assert [r.judge_score for r in kept] == [5, 4, 4, 4] and low[0].reject_reason == "low_judge_score"
    assert percentile_ranks([1, 3, 3, 5]).tolist() == [0.0, 0.5, 0.5, 1.0]


# --- the curate stage -------------------------------------------------------------------------------------

@pytest.mark.slow  # a generate + curate run with IFD on the tiny student
def test_curate_stage_saves_scores_distribution_plot_and_exports_them(tmp_path, fake_server):
    from pipeline.curate.export import export_version
    from pipeline.stages import curate_stage, generate_stage
    from pipeline.store import Run, load_records

    cfg = load_config(overrides=fast_overrides(tmp_path / "runs", fake_server.base_url) + [
        "curate.quality=[{scorer: ifd, max_ifd: 10, batch_size: 4, max_length: 128}]",
        "curate.select={keep_fraction: 0.5}"])
    run = Run.create(cfg, "q1")
    generate_stage(run)
    manifest = curate_stage(run)
    folder = run.path("datasets", "curated")
    accepted, rejected = load_records(folder / "accepted.parquet"), load_records(folder / "rejected.parquet")
    selected_out = [r for r in rejected if r.reject_reason == "not_selected"]
    assert accepted and selected_out and all(r.ifd is not None and r.quality_score is not None for r in accepted)
    assert manifest["stage_counts"]["selection"] == len(selected_out)
    dist = manifest["quality"]["distribution"]["ifd"]
    assert dist["records"] == len(accepted) + len(selected_out) and sum(dist["accepted"]) == len(accepted)
    assert (folder / "quality_scores.png").stat().st_size > 1000
    out = tmp_path / "out.jsonl"
    export_version(folder, "jsonl", str(out))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["ifd"] for r in rows] == pytest.approx([r.ifd for r in accepted])


def test_scores_round_trip_through_parquet_and_older_files_still_load(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.store import load_records, save_records

    scored = [rec("Explain tides briefly.", ifd=0.71, judge_score=4.0, judge_reason="Clear.", quality_score=0.5),
              rec("Name a bird.")]
    save_records(tmp_path / "new.parquet", scored)
    assert load_records(tmp_path / "new.parquet") == scored
    old = {k: v for k, v in rec("Name a fish.").model_dump().items()
           if k not in ("judge_score", "judge_reason", "ifd", "reward_score", "quality_score", "teacher_logprobs")}
    pq.write_table(pa.Table.from_pylist([old]), tmp_path / "old.parquet")  # written before scores existed
    loaded = load_records(tmp_path / "old.parquet")[0]
    assert loaded.instruction == "Name a fish." and loaded.ifd is None and loaded.quality_score is None
