"""The ledger per stage, and the budget cap: a request goes out only when its worst case fits what is left, so the
cap is never crossed; it stops the run cleanly and keeps every reply already paid for."""

from __future__ import annotations

import pytest

from pipeline.config import TeacherConfig
from pipeline.errors import BudgetExceeded
from pipeline.teachers import Request, make_teacher
from pipeline.teachers.ledger import worst_case_tokens
from tests.fakes.openai_server import FakeOpenAIServer, default_responder


def chat(i: int, stage: str = "generate") -> Request:
    return Request(messages=[{"role": "user", "content": f"item {i}: what is a bee?"}], stage=stage)


def tokens_of(req: Request) -> tuple[int, int]:
    """What the fake server reports as usage for this request (prompt words, reply words)."""
    import json
    return len(json.dumps(req.messages).split()), len(default_responder({"messages": req.messages}).split())


def config(server: FakeOpenAIServer, **kw) -> TeacherConfig:
    # One request at a time, so the budget is crossed at a known request.
    return TeacherConfig(backend="openai", base_url=server.base_url, model="fake-teacher", max_concurrency=1,
                         max_retries=0, **kw)


@pytest.mark.parametrize("cap", ["tokens", "dollars"])
def test_budget_cap_stops_cleanly_and_keeps_finished_replies(tmp_path, cap):
    reqs = [chat(i) for i in range(10)]
    t_in, t_out = tokens_of(reqs[0])
    w_in, w_out = worst_case_tokens(reqs[0])
    assert w_in >= t_in and w_out >= t_out
    # Room for 3 real replies plus one more at its worst case: the 4th is sent, the 5th could cross the cap.
    if cap == "tokens":
        limits = dict(budget_tokens=3 * (t_in + t_out) + w_in + w_out)
    else:  # $1 per 1M input tokens, $2 per 1M output tokens
        limits = dict(price_per_1m_input=1.0, price_per_1m_output=2.0,
                      budget_usd=(3 * (t_in + 2 * t_out) + w_in + 2 * w_out) / 1e6)
    cache = tmp_path / "c.sqlite"
    with FakeOpenAIServer() as server:
        teacher = make_teacher(config(server, **limits), cache)
        out = teacher.generate(reqs)
        # Requests 0-3 were paid for; the 5th could have crossed the cap, so it and the rest were not sent.
        assert [c.ok for c in out] == [True] * 4 + [False] * 6
        spent = teacher.ledger.totals()
        if cap == "tokens":
            assert spent.tokens_in + spent.tokens_out <= limits["budget_tokens"]
        else:
            assert server.billed_usd(1.0, 2.0) == pytest.approx(spent.cost_usd) and spent.cost_usd <= limits["budget_usd"]
        assert all(c.error.startswith("not attempted") for c in out[4:])
        assert server.total_requests == 4 and len(teacher.cache) == 4
        with pytest.raises(BudgetExceeded, match="budget"):
            teacher.generate([chat(99)])
        assert server.total_requests == 4

        # A later run with a bigger budget reuses the 4 paid replies and pays only for the 6 others.
        more = make_teacher(config(server), cache)
        again = more.generate(reqs)
        assert all(c.ok for c in again) and [c.cached for c in again] == [True] * 4 + [False] * 6
        assert [c.text for c in again[:4]] == [c.text for c in out[:4]]
        assert server.total_requests == 10


def test_ledger_counts_per_stage(tmp_path):
    with FakeOpenAIServer(faults=("500",), faults_per_request=5) as server:
        teacher = make_teacher(config(server, price_per_1m_input=2.0, price_per_1m_output=4.0), tmp_path / "c.sqlite")
        teacher.generate([chat(0, "evaluate")])  # fails: the server errs on every try of this request
        server.faults_per_request = 0
        teacher.generate([chat(i, "generate") for i in range(1, 4)] + [chat(0, "evaluate")])
        teacher.generate([chat(1, "generate")])  # cached: free
    ledger = teacher.ledger.as_dict()
    gen, ev = ledger["generate"], ledger["evaluate"]
    t_in, t_out = zip(*(tokens_of(chat(i)) for i in range(1, 4)))
    assert (gen["requests"], gen["cached"], gen["failures"]) == (3, 1, 0)
    assert (gen["tokens_in"], gen["tokens_out"]) == (sum(t_in), sum(t_out))
    assert gen["cost_usd"] == pytest.approx((2 * sum(t_in) + 4 * sum(t_out)) / 1e6)
    assert (ev["requests"], ev["failures"]) == (2, 1)
    assert gen["latency_s"] > 0 and ev["latency_s"] > 0
    assert ledger["total"]["requests"] == 5 and ledger["total"]["cached"] == 1


def test_a_reply_is_kept_when_the_progress_callback_raises(tmp_path):
    # Replies are written in groups, one commit each; an error that is not the database's (here the caller's
    # progress callback) must not roll back a reply that was paid for: it is cached and counted, its hold settled.
    from pipeline.teachers import Ledger, ResponseCache

    def broken_progress(n: int) -> None:
        raise RuntimeError("progress bar broke")

    with FakeOpenAIServer() as server:
        cfg = config(server).model_copy(update={"max_concurrency": 4, "max_retries": 2})
        teacher = make_teacher(cfg, tmp_path / "c.sqlite", Ledger.for_teacher(cfg, tmp_path / "ledger.sqlite"))
        with pytest.raises(RuntimeError, match="progress bar broke"):
            teacher.generate([chat(0)], on_done=broken_progress)
        teacher.close()
        assert server.total_requests == 1
    assert len(ResponseCache(tmp_path / "c.sqlite")) == 1  # committed: another connection sees it
    tally = Ledger(path=tmp_path / "ledger.sqlite").stages
    assert tally["generate"].requests == 1 and "unsettled" not in tally
