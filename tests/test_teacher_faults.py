"""The OpenAI-compatible teacher against a fake server on loopback that misbehaves in every way we know of."""

from __future__ import annotations

import time

import pytest

from pipeline.config import TeacherConfig
from pipeline.teachers import Request, make_teacher
from tests.fakes.openai_server import FAULTS, FakeOpenAIServer, default_responder, request_digest


def teacher_for(server: FakeOpenAIServer, cache_path, **cfg):
    """An openai-backend teacher with small timeouts and few retries, so faulty runs stay fast."""
    base = dict(backend="openai", base_url=server.base_url, model="fake-teacher", max_retries=2, timeout_s=0.5,
                malformed_backoff_s=0.01, max_concurrency=32)
    return make_teacher(TeacherConfig(**{**base, **cfg}), cache_path)


def chat(i: int, **kw) -> Request:
    return Request(messages=[{"role": "user", "content": f"question number {i}: why is the sky blue?"}], **kw)


def expected(req: Request) -> str:
    return default_responder({"messages": req.messages})


# Every retryable fault, served once per request: the retry must answer it and the server sees exactly 2 tries.
@pytest.mark.parametrize("fault", [f for f in FAULTS if f != "length"])
def test_each_transient_fault_is_retried_then_answered(tmp_path, fault):
    with FakeOpenAIServer(faults=(fault,), faults_per_request=1, timeout_sleep_s=2.0) as server:
        teacher = teacher_for(server, tmp_path / "c.sqlite")
        reqs = [chat(i) for i in range(3)]
        out = teacher.generate(reqs)
        assert [c.error for c in out] == [None] * 3
        assert [c.text for c in out] == [expected(r) for r in reqs]
        assert [server.requests[request_digest(r.messages)] for r in reqs] == [2, 2, 2]
        assert server.faults_served[fault] == 3


def test_retry_after_is_honoured(tmp_path):
    # Without the header the SDK's first backoff is 0.375-0.5 s; a 1.2 s Retry-After must make it wait longer.
    with FakeOpenAIServer(faults=("429_retry_after",), faults_per_request=1, retry_after_s=1.2) as server:
        teacher = teacher_for(server, tmp_path / "c.sqlite")
        start = time.perf_counter()
        [c] = teacher.generate([chat(0)])
        assert c.ok and time.perf_counter() - start >= 1.2


def test_truncated_reply_is_kept_with_finish_reason_length(tmp_path):
    with FakeOpenAIServer(faults=("length",), fault_rate=1.0) as server:
        teacher = teacher_for(server, tmp_path / "c.sqlite")
        [c] = teacher.generate([chat(0)])
        assert c.ok and c.finish_reason == "length" and expected(chat(0)).startswith(c.text)
        assert server.total_requests == 1  # a truncated answer is an answer, not a fault to retry


def test_persistent_fault_is_recorded_as_failed_and_retried_next_run(tmp_path):
    with FakeOpenAIServer(faults=("500", "malformed", "drop"), faults_per_request=10) as server:
        teacher = teacher_for(server, tmp_path / "c.sqlite")
        out = teacher.generate([chat(i) for i in range(3)])
        assert all(not c.ok for c in out)
        assert all(c.error.split(":")[0] in {"InternalServerError", "JSONDecodeError", "APIConnectionError"} for c in out)
        assert len(teacher.cache) == 0  # failures are never cached
        assert teacher.ledger.totals().failures == 3
        server.faults_per_request = 0  # the server heals: the next run asks again and gets answers
        assert all(c.ok for c in teacher.generate([chat(i) for i in range(3)]))


@pytest.mark.parametrize("fault,error", [("500", "InternalServerError"), ("429", "RateLimitError")])
@pytest.mark.parametrize("max_retries", [0, 1, 2])
def test_a_persistent_fault_gets_exactly_max_retries_more_tries_on_the_sdk_schedule(tmp_path, max_retries, fault,
                                                                                      error):
    # The first try goes out on the fast path and the rest through the SDK: together exactly max_retries + 1 tries,
    # ending in the SDK's typed error, with the SDK's waits between them (0.5 s, then 1 s, each less up to 25%).
    with FakeOpenAIServer(faults=(fault,), faults_per_request=10) as server:
        teacher = teacher_for(server, tmp_path / "c.sqlite", max_retries=max_retries)
        start = time.perf_counter()
        [c] = teacher.generate([chat(0)])
        waited = time.perf_counter() - start
    assert not c.ok and c.error.startswith(error), c.error
    assert server.total_requests == max_retries + 1
    assert waited >= [0, 0.375, 0.375 + 0.75][max_retries]


@pytest.mark.parametrize("max_retries,bad_bodies,tries,ok", [(2, 10, 3, False), (2, 2, 3, True), (0, 10, 1, False)])
def test_malformed_bodies_get_max_retries_more_tries(tmp_path, max_retries, bad_bodies, tries, ok):
    # A 200 whose body is not JSON is retried by us (not the SDK): exactly max_retries more tries, then a failure.
    with FakeOpenAIServer(faults=("malformed",), faults_per_request=bad_bodies) as server:
        teacher = teacher_for(server, tmp_path / "c.sqlite", max_retries=max_retries)
        [c] = teacher.generate([chat(0)])
        assert server.requests[request_digest(chat(0).messages)] == tries
        assert c.ok == ok and (ok or c.error.startswith("JSONDecodeError"))
        assert len(teacher.cache) == int(ok) and teacher.ledger.totals().failures == int(not ok)


def test_500_requests_under_30_percent_faults_none_lost_none_duplicated(tmp_path):
    with FakeOpenAIServer(fault_rate=0.3, seed=7, timeout_sleep_s=3.0) as server:
        # A roomier timeout than the single-fault tests: on a busy box a healthy reply to 64 requests in flight
        # can take longer than 0.5 s, which would turn into extra (legitimate) failures.
        teacher = teacher_for(server, tmp_path / "c.sqlite", max_concurrency=64, timeout_s=1.5)
        reqs = [chat(i) for i in range(500)]
        done: list[int] = []
        out = teacher.generate(reqs, on_done=done.append)

        assert len(out) == 500 and sum(done) == 500
        answered = [i for i, c in enumerate(out) if c.ok]
        failed = [i for i, c in enumerate(out) if not c.ok]
        assert len(answered) + len(failed) == 500
        assert all(out[i].error and not out[i].error.startswith("not attempted") for i in failed)
        # Each answer is its own request's answer (no mix-ups), whole unless the server truncated it.
        for i in answered:
            c = out[i]
            assert c.text == expected(reqs[i]) or (c.finish_reason == "length" and expected(reqs[i]).startswith(c.text))
        assert len(teacher.cache) == len(answered)  # exactly one cached reply per answered request
        assert set(server.requests) == {request_digest(r.messages) for r in reqs}
        assert len(answered) > 400, [out[i].error for i in failed][:10]
        assert set(server.faults_served) == set(FAULTS)
        tally = teacher.ledger.totals()
        assert (tally.requests, tally.failures) == (500, len(failed))

        # A re-run pays only for the failures: answered requests are never sent again.
        before = server.requests.copy()
        server.fault_rate = 0.0
        again = teacher.generate(reqs)
        assert all(c.ok for c in again)
        assert [again[i].text for i in answered] == [out[i].text for i in answered]
        assert all(server.requests[request_digest(reqs[i].messages)] == before[request_digest(reqs[i].messages)]
                   for i in answered)
        assert server.total_requests - sum(before.values()) == len(failed)


def test_requests_are_spread_over_several_base_urls(tmp_path):
    with FakeOpenAIServer() as a, FakeOpenAIServer() as b:
        teacher = teacher_for(a, tmp_path / "c.sqlite", extra_base_urls=[b.base_url])
        reqs = [chat(i) for i in range(20)]
        out = teacher.generate(reqs)
        assert [c.text for c in out] == [expected(r) for r in reqs]
        assert a.total_requests == b.total_requests == 10
        assert set(a.requests).isdisjoint(b.requests)  # each request went to one server only
