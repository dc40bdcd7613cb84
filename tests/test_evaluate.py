"""Scores and their intervals against hand-computed values; the pairwise judge against a scripted fake judge."""

import math
import re

import pytest

from pipeline.config import TeacherConfig
from pipeline.evaluate.evalsets import EvalItem
from pipeline.evaluate.judge import item_preference, judge_pairs, parse_verdict, win_rate
from pipeline.evaluate.metrics import bootstrap_ci, length_controlled_win_rate, rouge_l
from pipeline.teachers import make_teacher
from tests.fakes.openai_server import FakeOpenAIServer


def test_rouge_l_matches_hand_computed_lcs():
    # LCS("the cat on the mat", "the cat sat on the mat") = 5 tokens; P = 5/5, R = 5/6, F = 2PR/(P+R) = 10/11.
    assert rouge_l("the cat on the mat", "the cat sat on the mat") == pytest.approx(10 / 11)
    assert rouge_l("completely different words", "the cat sat") == 0.0
    assert math.isnan(rouge_l("anything", "   "))  # no reference: not scored, not a zero


def test_bootstrap_interval_of_two_values_is_hand_computable():
    # Resampling [0, 1] twice gives means 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4: the 2.5% and 97.5%
    # quantiles are 0 and 1.
    mean, lo, hi = bootstrap_ci([0.0, 1.0], samples=4000)
    assert (mean, lo, hi) == (0.5, 0.0, 1.0)
    assert bootstrap_ci([0.3] * 5) == pytest.approx((0.3, 0.3, 0.3))


def test_length_controlled_win_rate_removes_the_length_advantage():
    # Half the items the contender is longer and wins 90%; half it is shorter and wins 50%. Raw win rate 0.7.
    # With x = ±1 (tanh(±1) after scaling), sigmoid(b0 + b1) = 0.9 and sigmoid(b0 - b1) = 0.5, so
    # b0 = (logit 0.9 + logit 0.5) / 2 = ln(9) / 2 and the length-controlled rate is sigmoid(b0) = 3/4.
    prefs = [1.0] * 9 + [0.0] + [1.0] * 5 + [0.0] * 5
    longer, shorter = [200] * 10 + [100] * 10, [100] * 10 + [200] * 10
    assert sum(prefs) / len(prefs) == 0.7
    assert length_controlled_win_rate(prefs, longer, shorter) == pytest.approx(0.75, abs=1e-3)
    # Equal lengths: nothing to control for, the LC rate is the plain win rate.
    assert length_controlled_win_rate([1, 0, 1, 1], [50] * 4, [50] * 4) == pytest.approx(0.75, abs=1e-3)


def test_win_rate_reports_intervals_around_the_mean():
    out = win_rate([1.0, 0.0, 1.0, 0.5], [10, 20, 30, 40], [20, 20, 20, 20], samples=200)
    assert out["win_rate"] == pytest.approx(0.625)
    assert out["win_rate_ci"][0] <= 0.625 <= out["win_rate_ci"][1]
    assert out["lc_win_rate_ci"][0] <= out["lc_win_rate"] <= out["lc_win_rate_ci"][1]


@pytest.mark.parametrize("reply,verdict", [
    ("Output (a)", "a"), ("Output (b)", "b"), ("output (B).", "b"), ("(a)", "a"), ("[[B]]", "b"), ("b", "b"),
    ("A.", "a"), ("The better one is Output (b) because it is correct.", "b"), ("Output b", "b"),
    ("Both are a good start", None), ("", None), ("I cannot decide.", None),
])
def test_parse_verdict(reply, verdict):
    assert parse_verdict(reply) == verdict


def test_item_preference_cancels_position():
    assert item_preference("a", "b") == 1.0  # contender won in both orders
    assert item_preference("b", "a") == 0.0
    assert item_preference("a", "a") == 0.5  # the judge always picks the first answer: a tie
    assert item_preference(None, "b") == 0.75


ITEMS = [EvalItem(id=str(i), instruction=f"Name a colour number {i}.", reference=f"Red {i}.") for i in range(4)]


def _judge(server, tmp_path):
    cfg = TeacherConfig(backend="openai", base_url=server.base_url, model="fake-judge", max_retries=1, timeout_s=5)
    return make_teacher(cfg, tmp_path / "judge.sqlite")


def test_a_judge_that_always_prefers_the_first_answer_gives_exactly_half(tmp_path):
    with FakeOpenAIServer(responder=lambda body: "Output (a)") as server:
        judge = _judge(server, tmp_path)
        answers = [f"Blue, a much longer answer {i}." for i in range(4)]
        out = judge_pairs(judge, ITEMS, answers, [it.reference for it in ITEMS], samples=200)
        assert server.total_requests == 8  # both orders of every item
    assert out["win_rate"] == 0.5 and out["win_rate_ci"] == [0.5, 0.5]
    assert out["per_item"] == [0.5] * 4
    assert out["judge_first_position_rate"] == 1.0 and out["judge_unparsed"] == 0


def _prefers_longer(body: dict) -> str:
    prompt = body["messages"][-1]["content"]
    a = re.search(r"## Output \(a\)\n(.*?)\n\n## Output \(b\)", prompt, re.S).group(1)
    b = re.search(r"## Output \(b\)\n(.*?)\n\nWhich output", prompt, re.S).group(1)
    return "Output (a)" if len(a) > len(b) else "Output (b)"


def test_swapped_verdicts_map_back_to_the_contender(tmp_path):
    # A position-blind judge that prefers longer answers: the contender wins where it is longer, in both orders.
    with FakeOpenAIServer(responder=_prefers_longer) as server:
        judge = _judge(server, tmp_path)
        answers = ["Blue, a much longer answer.", "Ok", "Green is longer than red.", "No"]
        out = judge_pairs(judge, ITEMS, answers, [it.reference for it in ITEMS], samples=200)
        again = judge_pairs(judge, ITEMS, answers, [it.reference for it in ITEMS], samples=200)
        assert server.total_requests == 8  # the second pass came from the cache
    assert out["per_item"] == [1.0, 0.0, 1.0, 0.0]
    assert out["win_rate"] == 0.5 and out["judge_first_position_rate"] == 0.5
    assert again["per_item"] == out["per_item"]


def test_items_without_reference_are_not_judged(tmp_path):
    items = ITEMS[:2] + [EvalItem(id="x", instruction="Say hi.")]
    with FakeOpenAIServer(responder=lambda body: "Output (b)") as server:
        out = judge_pairs(_judge(server, tmp_path), items, ["a", "b", "c"], [it.reference for it in items], samples=100)
        assert server.total_requests == 4
    assert out["judged_items"] == 2 and math.isnan(out["per_item"][2])


def test_judge_flags_become_a_validated_teacher_config():
    from pipeline.errors import ConfigError
    from pipeline.evaluate.cli import judge_config

    cfg = judge_config(["backend=openai", "base_url=http://127.0.0.1:9/v1", "model=judge-x", "max_concurrency=4"])
    assert (cfg.backend, cfg.model, cfg.max_concurrency) == ("openai", "judge-x", 4)
    assert judge_config([]) is None
    with pytest.raises(ConfigError, match="modle"):
        judge_config(["modle=x"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        judge_config(["openai"])


def test_evaluate_subcommand_parses_several_sets():
    import argparse

    from pipeline.evaluate.cli import add_evaluate_parser, cmd_evaluate

    parser = argparse.ArgumentParser()
    add_evaluate_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["evaluate", "--model", "m", "--adapter", "a", "--eval-set", "x.json", "--eval-set", "y.jsonl",
                              "--judge", "backend=openai"])
    assert args.eval_set == ["x.json", "y.jsonl"] and args.judge == ["backend=openai"] and args.func is cmd_evaluate
