"""One budget per run: the ledger lives in the run folder, every stage, process and resume spends from it, a
process killed with requests in flight leaves their worst case counted, and a Batch API job that could cross
what is left is refused before anything is uploaded."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline.config import TeacherConfig
from pipeline.errors import BudgetExceeded
from pipeline.teachers import Ledger, Request, make_teacher
from tests.fakes.openai_server import FakeOpenAIServer

ROOT = Path(__file__).resolve().parents[1]
PRICES = dict(price_per_1m_input=3.0, price_per_1m_output=15.0)

CHILD = textwrap.dedent("""
    import sys
    from pipeline.config import TeacherConfig
    from pipeline.teachers import Ledger, Request, make_teacher
    base_url, cache, ledger_path, budget = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    cfg = TeacherConfig(backend="openai", base_url=base_url, model="fake-teacher", max_concurrency=4,
                        max_retries=0, price_per_1m_input=3.0, price_per_1m_output=15.0, budget_usd=budget)
    teacher = make_teacher(cfg, cache, Ledger.for_teacher(cfg, ledger_path))
    teacher.generate([Request(messages=[{"role": "user", "content": f"gen {i}: name a river"}], max_tokens=32)
                      for i in range(40)])
""")


def chats(n: int, tag: str, stage: str) -> list[Request]:
    return [Request(messages=[{"role": "user", "content": f"{tag} {i}: name a river"}], max_tokens=32, stage=stage)
            for i in range(n)]


def cached(cache: Path) -> int:
    try:
        with sqlite3.connect(cache, timeout=1) as c:
            return c.execute("SELECT COUNT(*) FROM replies").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def test_one_ledger_per_run_across_stages_processes_and_a_kill(tmp_path):
    cache, ledger_path = tmp_path / "cache.sqlite", tmp_path / "run" / "ledger.sqlite"
    with FakeOpenAIServer(latency_s=0.1, honor_max_tokens=True) as server:
        # What one reply really costs, measured on a throwaway request: the budget is ~50 of them, the work ~80.
        probe = make_teacher(TeacherConfig(backend="openai", base_url=server.base_url, model="fake-teacher", **PRICES),
                             tmp_path / "probe.sqlite")
        probe.generate(chats(1, "probe", "generate"))
        budget = 50 * probe.ledger.totals().cost_usd
        server.billed.clear()

        # Stage one in its own process, SIGKILLed with requests in flight.
        child = subprocess.Popen([sys.executable, "-c", CHILD, server.base_url, str(cache), str(ledger_path),
                                  str(budget)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        deadline = time.monotonic() + 60
        while cached(cache) < 8:
            assert child.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
        child.wait()

        # The resume, in this process: the same run ledger, the rest of generate, then evaluate.
        cfg = TeacherConfig(backend="openai", base_url=server.base_url, model="fake-teacher", max_concurrency=4,
                            max_retries=0, budget_usd=budget, **PRICES)
        ledger = Ledger.for_teacher(cfg, ledger_path)
        assert "unsettled" in ledger.as_dict()  # the killed process's requests in flight still count
        teacher = make_teacher(cfg, cache, ledger)
        teacher.generate(chats(40, "gen", "generate"))
        out = teacher.generate(chats(40, "eval", "evaluate"))
        assert not all(c.ok for c in out)  # the budget ran out during the second stage...
        with pytest.raises(BudgetExceeded, match="budget_usd"):  # ...and the next call says so
            teacher.generate(chats(1, "more", "evaluate"))
        teacher.close()

    spent = Ledger.for_teacher(cfg, ledger_path).as_dict()
    assert set(spent) >= {"generate", "evaluate", "total"}
    assert spent["total"]["cost_usd"] <= budget
    # The provider's own bill: never more than the budget, and never more than the ledger knows of.
    billed = server.billed_usd(PRICES["price_per_1m_input"], PRICES["price_per_1m_output"])
    assert billed <= spent["total"]["cost_usd"] + 1e-12
    assert billed > 0.6 * budget  # the budget was really the limit, not a test that never spent


def test_batch_job_that_could_cross_the_budget_is_refused_before_upload(tmp_path):
    reqs = [Request(messages=[{"role": "user", "content": f"batch item {i}: define a delta"}], max_tokens=500)
            for i in range(50)]
    # 50 x 500 completion tokens at $15/M is $0.375 at worst; $0.20 is left.
    cfg = TeacherConfig(backend="openai-batch", model="fake-teacher", batch_poll_s=0.05, budget_usd=0.20, **PRICES)
    with FakeOpenAIServer() as server:
        teacher = make_teacher(cfg.model_copy(update={"base_url": server.base_url}), tmp_path / "c.sqlite")
        with pytest.raises(BudgetExceeded, match=r"batch of 50 requests could cost up to \$0\.3[78]") as err:
            teacher.generate(reqs)
        assert "left of $0.2" in str(err.value)
        assert server.batches == {} and server.files == {}  # nothing uploaded, nothing submitted
        # A job that fits at its worst case goes through and is then charged at its real cost.
        small = make_teacher(cfg.model_copy(update={"base_url": server.base_url}), tmp_path / "c.sqlite")
        assert all(c.ok for c in small.generate(reqs[:20]))
        assert len(server.batches) == 1
        assert small.ledger.totals().cost_usd == pytest.approx(server.billed_usd(3.0, 15.0))
