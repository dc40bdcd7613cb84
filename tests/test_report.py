"""The report from a hand-made evaluation: headline table, verdict, categories, plots, JSON and artifact tables."""

import json

from pipeline.report import artifact_tables, headline, write_report


def _contender(rouge, ci, wr=None, ppl=None, tps=None, params=None, cats=None):
    e = {"rouge_l": rouge, "rouge_l_ci": ci, "tokens_per_s": tps, "params": params, "latency_s": 1.5,
         "by_category": cats or {}}
    if wr is not None:
        e.update(win_rate=wr, win_rate_ci=[wr - 0.1, wr + 0.1], lc_win_rate=wr - 0.05, lc_win_rate_ci=[wr - 0.2, wr],
                 judge_first_position_rate=0.6)
    if ppl is not None:
        e.update(perplexity=ppl, perplexity_ci=[ppl - 1, ppl + 1])
    return e


EVALUATION = {
    "eval_set": "dev.jsonl", "items": 30, "max_new_tokens": 128, "judge": "openai:judge", "judge_baseline": "reference",
    "teacher": _contender(0.25, [0.2, 0.3], wr=0.4, tps=80.0, params=134_500_000),
    "raw_student": _contender(0.10, [0.08, 0.12], wr=0.2, ppl=9.5, tps=40.0, params=113_300_000,
                              cats={"qa": {"n": 10, "rouge_l": 0.1, "win_rate": 0.2}}),
    "distilled_student": _contender(0.18, [0.15, 0.21], wr=0.3, ppl=7.25, tps=41.0, params=113_300_000,
                                    cats={"qa": {"n": 10, "rouge_l": 0.2, "win_rate": 0.35}}),
}


def test_report_has_the_headline_table_verdict_and_plots(tmp_path):
    results = {"run_id": "r1", "evaluation": EVALUATION, "curation": {"accepted": 5, "rejected": 2}}
    write_report(tmp_path, results)
    md = (tmp_path / "report.md").read_text()
    assert ("| contender | ROUGE-L [95% CI] | win rate [95% CI] | LC win rate [95% CI] | ref. perplexity [95% CI] | "
            "params | tokens/s | s/answer |") in md
    assert "| Distilled student | 0.180 [0.150, 0.210] | 0.300 [0.200, 0.400] | 0.250 [0.100, 0.300] | 7.25 [6.25, 8.25] | 113.3 M |" in md
    assert "| Teacher | 0.250 [0.200, 0.300] |" in md and "| 0.40" in md
    # a hand-made evaluation has no per-item scores: the differences are shown, but nothing is called better
    assert "Distilled - raw: +0.080 ROUGE-L" in md and "no paired verdict" in md and "beats" not in md
    assert "keeps 72% of the teacher's ROUGE-L" in md
    assert "| qa | 10 | – | 0.100 / 0.20 | 0.200 / 0.35 |" in md  # the teacher has no category scores here
    assert "Gold-trained" not in md  # not a contender in this run
    for png in ("scores.png", "speed_quality.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["headline"]["distilled_minus_raw"] == 0.18 - 0.10
    assert data["headline"]["table"][2]["contender"] == "Distilled student"


def test_headline_keys_and_artifact_tables():
    h = headline({"evaluation": EVALUATION})
    assert h["teacher"] == 0.25 and h["distilled_student_win_rate"] == 0.3
    tables = artifact_tables({"evaluation": EVALUATION})
    assert [t["key"] for t in tables] == ["distill-scores", "distill-categories"]
    row = tables[0]["table"][1]
    assert row["contender"] == "Raw student" and row["rouge_l_low"] == 0.08 and row["perplexity"] == 9.5
    assert row["params_m"] == 113.3 and row["tokens_per_s"] == 40.0


def test_report_without_judge_or_students_still_renders(tmp_path):
    write_report(tmp_path, {"evaluation": {"items": 3, "teacher": _contender(float("nan"), [float("nan")] * 2)}})
    md = (tmp_path / "report.md").read_text()
    assert "| Teacher |" in md and "win rate" not in md


def test_share_of_answers_that_hit_the_token_limit_is_scored_and_reported(tmp_path):
    from pipeline.evaluate.bench import score_contenders
    from pipeline.evaluate.evalsets import EvalItem

    items = [EvalItem(id=f"i{k}", instruction=f"Say {k}.", input="", reference=f"number {k}") for k in range(4)]
    contenders = {"teacher": {"answers": ["number 0", "number 1", "number 2", "number 3"], "answer_tokens": [2, 2, 2, None]},
                  "raw_student": {"answers": ["a"] * 4, "answer_tokens": [8, 8, 3, 8]}}
    summary, rows = score_contenders(items, contenders, samples=50, max_new_tokens=8)
    assert summary["teacher"]["hit_limit"] == 0.0
    assert summary["raw_student"]["hit_limit"] == 0.75  # three of four answers used all 8 tokens
    assert rows[0]["raw_student_tokens"] == 8 and rows[3]["teacher_tokens"] is None
    write_report(tmp_path, {"evaluation": {"items": 4, "max_new_tokens": 8, **summary}})
    md = (tmp_path / "report.md").read_text()
    assert "hit token limit" in md and "| 75% |" in md and "| 0% |" in md
    assert "used all 8 new tokens" in md
    from pipeline.cli import verdict_lines
    from pipeline.report import set_headline

    lines = verdict_lines({"dev": set_headline({"items": 4, **summary})})
    assert any(line.split()[:4] == ["hit", "the", "token", "limit"] and "raw 75%" in line and "teacher 0%" in line
               for line in lines)
