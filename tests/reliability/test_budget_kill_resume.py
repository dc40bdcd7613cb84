"""A budget is a budget: a real `distill run` with teacher.budget_usd and a paid judge, SIGKILLed during generate,
resumed, SIGKILLed during evaluate (judge calls in flight), resumed again, spends at most the budget in total, by
its own persisted ledger and by the fake provider's own bill. Then, with a raised budget, a kill between
registration and promotion leaves a run that resumes (it is not marked completed before the registry decided)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import TeacherConfig
from pipeline.registry import decisions
from pipeline.store import Catalog
from pipeline.teachers import Ledger
from tests.conftest import fast_overrides
from tests.fakes.openai_server import FakeOpenAIServer, default_responder
from tests.reliability.test_kill_resume import cached_replies, kill_when

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TEACHER_PRICES = (1.0, 2.0)  # dollars per 1M prompt / completion tokens
# A dear judge billed on its verdicts only, each exactly max_tokens (16) long: $1 a call, worst case included, so
# the 10.5-dollar budget binds during evaluate (3 contenders x 3 items x 2 orders = 18 calls wanted).
JUDGE_PRICES = (0.0, 1e6 / 16)
BUDGET = 10.5
VERDICT = "Output (a) " + " ".join(["because"] * 14)
# The CLI with registry.promote replaced by a SIGKILL of the whole process group: a real kill at that exact point.
KILL_AT_PROMOTE = ("import os, signal, sys; import pipeline.registry as r; "
                   "r.promote = lambda *a, **k: os.killpg(0, signal.SIGKILL); "
                   "from pipeline.cli import main; sys.exit(main(sys.argv[1:]))")


def overrides(runs: Path, base_url: str) -> list[str]:
    return fast_overrides(runs, base_url) + [
        "generate.target_instructions=10", "generate.max_prompts=8", "train.max_steps=4",
        f"teacher.price_per_1m_input={TEACHER_PRICES[0]}", f"teacher.price_per_1m_output={TEACHER_PRICES[1]}",
        f"teacher.budget_usd={BUDGET}",
        "evaluate.judge.backend=openai", f"evaluate.judge.base_url={base_url}", "evaluate.judge.model=fake-judge",
        "evaluate.judge.max_retries=1", "evaluate.judge.timeout_s=5", "evaluate.judge.max_concurrency=2",
        "evaluate.perplexity=false",
        f"evaluate.judge.price_per_1m_input={JUDGE_PRICES[0]}", f"evaluate.judge.price_per_1m_output={JUDGE_PRICES[1]}"]


def start(runs: Path, base_url: str, extra: list[str] = (), kill_at_promote: bool = False) -> subprocess.Popen:
    args = ["run", "--run-id", "paid"]
    for o in overrides(runs, base_url) + list(extra):
        args += ["--set", o]
    prefix = ["-c", KILL_AT_PROMOTE] if kill_at_promote else ["-m", "pipeline.cli"]
    return subprocess.Popen([sys.executable, *prefix, *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"})



def test_budget_holds_across_kills_and_resumes_of_a_real_run(tmp_path):
    runs = tmp_path / "runs"
    run = runs / "paid"
    judged: list[int] = []

    def responder(body: dict) -> str:
        msgs = body.get("messages") or []
        if msgs and "Which output is better?" in msgs[-1]["content"]:
            judged.append(1)
            return VERDICT
        return default_responder(body)

    with FakeOpenAIServer(responder=responder, latency_s=0.05, honor_max_tokens=True) as server:
        kill_when(start(runs, server.base_url), lambda: cached_replies(runs) >= 3, timeout=1800)  # during generate
        kill_when(start(runs, server.base_url), lambda: len(judged) >= 2, timeout=1800)  # during evaluate, judge calls in flight
        last = start(runs, server.base_url)
        _, err = last.communicate(timeout=1800)

        # The judge wanted more than the budget: the run stopped cleanly, saying so, resumable with a bigger one.
        assert last.returncode == 2, err[-3000:]
        assert "teacher.budget_usd" in err and "--run-id" in err
        status = json.loads((run / "status.json").read_text())
        assert status["state"] == "failed" and "BudgetExceeded" in status["error"]

        ledger = Ledger.for_teacher(TeacherConfig(budget_usd=BUDGET), run / "ledger.sqlite").as_dict()
        billed = (server.billed_usd(*TEACHER_PRICES, model="fake-teacher")
                  + server.billed_usd(*JUDGE_PRICES, model="fake-judge"))
        # One budget over every stage, process and resume: the ledger's sum and the provider's own bill.
        assert ledger["total"]["cost_usd"] <= BUDGET
        assert billed <= ledger["total"]["cost_usd"] + 1e-9  # nothing was paid that the ledger does not know of
        assert billed > BUDGET / 2  # the budget was what stopped the run, not a run that never spent
        assert server.billed_per_model["fake-judge"]["answered"] < 18
        assert ledger["generate"]["requests"] > 0 and ledger["judge"]["requests"] > 0
        answered = server.billed["answered"]
        assert answered == sum(c["answered"] for c in server.billed_per_model.values())

        # More money, and a kill between registration and promotion: the run is not completed yet...
        more = [f"teacher.budget_usd={BUDGET * 100}"]
        promoted = start(runs, server.base_url, more, kill_at_promote=True)
        promoted.wait(timeout=1800)
        assert promoted.returncode == -signal.SIGKILL, promoted.stderr.read()[-3000:]
        assert json.loads((run / "status.json").read_text())["state"] == "running"
        assert not decisions(Catalog(runs))
        # ...so it resumes, and ends registered, decided and completed.
        final = start(runs, server.base_url, more)
        _, err = final.communicate(timeout=1800)
        assert final.returncode == 0, err[-3000:]
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "completed" and "decision" in status["summary"]
    assert [d["model_id"] for d in decisions(Catalog(runs))] == ["paid/distilled"]
    assert [c["keys"] for c in status["config_changes"]] == [{"teacher.budget_usd": [BUDGET, BUDGET * 100]}]
