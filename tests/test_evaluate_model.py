"""`evaluate_model` on a tiny real student: several eval sets in both formats, cached answers, perplexity, judge."""

import json

import pytest

from pipeline.config import TeacherConfig
from pipeline.errors import InputFileError, ModelNotFoundError
from pipeline.evaluate.bench import evaluate_model
from pipeline.evaluate.contenders import model_identity
from pipeline.models import resolve_student
from tests.conftest import TINY_STUDENT_DROP
from tests.fakes.openai_server import FakeOpenAIServer


@pytest.fixture(scope="module")
def tiny_student():
    return resolve_student("embedded-cut", json.loads(TINY_STUDENT_DROP), "smollm2-135m-instruct")


def _eval_files(tmp_path):
    alpaca = tmp_path / "mine.json"
    alpaca.write_text(json.dumps([
        {"instruction": "Give one tip for staying healthy.", "input": "", "output": "Drink water every day.", "category": "advice"},
        {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour", "category": "translation"},
    ]))
    self_instruct = tmp_path / "tasks.jsonl"
    self_instruct.write_text(json.dumps({"id": "t1", "instruction": "Add the numbers.",
                                         "instances": [{"input": "2 and 3", "output": "5"}, {"input": "1 and 1", "output": "2"}]}) + "\n")
    return [alpaca, self_instruct]


def test_evaluate_model_scores_every_set_and_rescoring_costs_no_generation(tmp_path, tiny_student):
    files = _eval_files(tmp_path)
    with FakeOpenAIServer(responder=lambda body: "Output (b)") as server:
        judge = TeacherConfig(backend="openai", base_url=server.base_url, model="fake-judge", max_retries=1, timeout_s=5)
        out = evaluate_model(tiny_student, None, files, tmp_path / "bench", judge_config=judge, max_new_tokens=8,
                             batch_size=2, samples=100, label="tiny")
        assert server.total_requests == 8  # 4 items, both orders
    assert set(out["sets"]) == {"mine", "tasks"}
    mine = out["sets"]["mine"]["tiny"]
    assert mine["cached_answers"] == 0 and mine["params"] > 1e6 and mine["disk_bytes"] > 1e6
    assert mine["tokens_per_s"] > 0 and mine["perplexity"] > 1
    assert mine["perplexity_ci"][0] <= mine["perplexity"] <= mine["perplexity_ci"][1]
    assert mine["win_rate"] == 0.5  # the judge always picks (b): position bias cancels
    assert set(mine["by_category"]) == {"advice", "translation"}
    rows = [json.loads(x) for x in (tmp_path / "bench" / "tasks" / "outputs.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["t1-0", "t1-1"] and all("tiny" in r and "tiny_judge" in r for r in rows)
    report = (tmp_path / "bench" / "report.md").read_text()
    assert "## mine" in report and "## tasks" in report and "| tiny |" in report

    # Same model, same prompts and params: every answer and likelihood comes from the cache.
    again = evaluate_model(tiny_student, None, files, tmp_path / "bench", max_new_tokens=8, batch_size=2, samples=100,
                           label="tiny")
    assert again["sets"]["mine"]["tiny"]["cached_answers"] == 2
    assert again["sets"]["mine"]["tiny"]["rouge_l"] == mine["rouge_l"]
    assert again["sets"]["mine"]["tiny"]["perplexity"] == pytest.approx(mine["perplexity"])


def test_an_adapter_changes_the_cache_identity(tmp_path, tiny_student):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"one")
    first = model_identity(tiny_student, adapter)
    (adapter / "adapter_model.safetensors").write_bytes(b"two")
    assert model_identity(tiny_student, adapter) != first != model_identity(tiny_student)


def test_an_adapter_folder_without_config_is_refused_with_the_fix(tmp_path, tiny_student):
    with pytest.raises(InputFileError, match="adapter_config.json"):
        evaluate_model(tiny_student, tmp_path, [], tmp_path / "out")
    with pytest.raises(ModelNotFoundError, match="checkpoint directory"):
        evaluate_model("no-such-model", None, [], tmp_path / "out")
    with pytest.raises(InputFileError, match="No eval files"):
        evaluate_model(tiny_student, None, [], tmp_path / "out")
