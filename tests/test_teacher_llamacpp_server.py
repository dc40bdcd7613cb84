"""The openai backend against llama.cpp's real OpenAI-compatible server with the packaged SmolLM2 model, and
logprob capture through both the server and the embedded backend."""

from __future__ import annotations

import pytest

from pipeline.config import TeacherConfig
from pipeline.teachers import Request, make_teacher
from pipeline.teachers.server import serve_llamacpp

pytest.importorskip("llama_cpp.server")
# A real model behind a real server: starting and warming it takes 5-25 s here, so the module is `slow`.
pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "Give me one tip for staying healthy."}]


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    with serve_llamacpp("smollm2-135m-instruct", n_threads=1, n_ctx=1024, log_path=log) as server:
        # The first decode warms llama.cpp up (seconds on a busy box); pay it here, not inside a test's timing.
        make_teacher(TeacherConfig(backend="openai", base_url=server.base_url, model="warm-up", timeout_s=120),
                     log.parent / "warm.sqlite").generate([Request(messages=QUESTION, max_tokens=1)])
        yield server


def server_teacher(server, cache_path, **cfg):
    return make_teacher(TeacherConfig(backend="openai", base_url=server.base_url, model="smollm2-135m-instruct",
                                      max_concurrency=2, timeout_s=60, max_retries=1, **cfg), cache_path)


def test_chat_and_completion_through_the_real_server(llama_server, tmp_path):
    teacher = server_teacher(llama_server, tmp_path / "c.sqlite")
    chat, comp = teacher.generate([Request(messages=QUESTION, max_tokens=12),
                                   Request(kind="completion", prompt="Task 1: Name three rivers.\nTask 2:",
                                           max_tokens=8, stop=["\n"])])
    assert chat.ok and chat.text.strip() and chat.tokens_in > 5 and 0 < chat.tokens_out <= 12
    assert comp.ok and comp.text.strip() and "\n" not in comp.text
    # Greedy replies are reproducible and the second ask comes from the cache.
    again = teacher.generate([Request(messages=QUESTION, max_tokens=12)])[0]
    assert again.cached and again.text == chat.text


def test_n_samples_are_distinct_through_sample_index(llama_server, tmp_path):
    # llama.cpp ignores `n`; each sample is its own request whose seed comes from its sample_index.
    teacher = server_teacher(llama_server, tmp_path / "c.sqlite")
    reqs = [Request(messages=[{"role": "user", "content": "Write a short title for a story about a cat."}],
                    max_tokens=12, temperature=1.0, top_p=0.95, sample_index=k) for k in range(4)]
    samples = teacher.generate(reqs)
    assert all(c.ok for c in samples)
    assert len({c.text for c in samples}) >= 3
    # The same sample_index reproduces the same sample (fresh cache, so the server is really asked again).
    fresh = server_teacher(llama_server, tmp_path / "other.sqlite").generate(reqs[:2])
    assert [c.text for c in fresh] == [c.text for c in samples[:2]]


def _check_logprobs(c, k: int) -> None:
    assert c.ok and c.logprobs, c.error
    assert len(c.logprobs) == c.tokens_out
    for tok in c.logprobs:
        assert tok["logprob"] <= 0.0 and 1 <= len(tok["top"]) <= k
        assert max(tok["top"].values()) >= tok["logprob"] - 1e-4  # the sampled token is never above the top-1


def test_top_k_logprobs_through_the_server(llama_server, tmp_path):
    teacher = server_teacher(llama_server, tmp_path / "c.sqlite")
    chat, comp = teacher.generate([Request(messages=QUESTION, max_tokens=8, logprobs=3),
                                   Request(kind="completion", prompt="The capital of France is", max_tokens=6,
                                           logprobs=3)])
    _check_logprobs(chat, 3)
    _check_logprobs(comp, 3)
    # Stored with the reply: a cache hit brings the logprobs back.
    hit = teacher.generate([Request(messages=QUESTION, max_tokens=8, logprobs=3)])[0]
    assert hit.cached and hit.logprobs == chat.logprobs


def test_top_k_logprobs_through_the_embedded_backend(tmp_path):
    teacher = make_teacher(TeacherConfig(backend="llamacpp", n_threads=1, n_ctx=512), tmp_path / "c.sqlite")
    try:
        chat, comp = teacher.generate([Request(messages=QUESTION, max_tokens=8, logprobs=3),
                                       Request(kind="completion", prompt="The capital of France is", max_tokens=6,
                                               logprobs=3)])
    finally:
        teacher.close()
    _check_logprobs(chat, 3)
    _check_logprobs(comp, 3)
