"""lm-evaluation-harness on a custom task over a local file: the integration is real even offline."""

import json

import pytest

from pipeline.models import resolve_student
from tests.conftest import TINY_STUDENT_DROP

pytest.importorskip("lm_eval")


@pytest.mark.slow
def test_harness_scores_a_local_file_in_both_formats(tmp_path):
    from pipeline.evaluate.harness import run_harness

    alpaca = tmp_path / "arith.jsonl"
    alpaca.write_text("".join(json.dumps(r) + "\n" for r in [
        {"instruction": "What is 2 plus 3? Answer with a number only.", "input": "", "output": "5"},
        {"instruction": "Repeat the word.", "input": "hello", "output": "hello"}]))
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps({"instruction": "Copy the input.", "instances": [{"input": "x", "output": "x"}]}) + "\n")
    student = resolve_student("embedded-cut", json.loads(TINY_STUDENT_DROP), "smollm2-135m-instruct")
    out = run_harness(student, local_files=[alpaca, tasks], max_gen_toks=4, batch_size=2)
    assert set(out["results"]) == {"distill_arith", "distill_tasks"}
    assert out["results"]["distill_arith"]["sample_len"] == 2 and out["results"]["distill_tasks"]["sample_len"] == 1
    assert 0.0 <= out["results"]["distill_arith"]["exact_match"] <= 1.0
    assert 1e6 < int(out["config"]["model_num_parameters"]) < 60e6  # the 4-layer student, not the teacher
