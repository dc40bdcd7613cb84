"""Fan-out generation (pipeline.scale): the same dataset from Ray, Dask and threads as from one process,
with the shared cache and the ledger exact; the accelerate configs load with accelerate's own loader."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import ScaleConfig, TeacherConfig, load_config
from pipeline.generate import answer_instructions, bootstrap_instructions, load_seed_tasks
from pipeline.scale import FanOutTeacher
from pipeline.teachers import make_teacher
from pipeline.teachers.base import Request, ResponseCache
from pipeline.teachers.ledger import Ledger
from tests.conftest import fast_overrides
from tests.fakes.openai_server import FakeOpenAIServer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def prefect_api():
    """A Prefect test server for the module, stopped at its end (the implicit ephemeral one outlived pytest)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def server():
    with FakeOpenAIServer(latency_s=0.01) as s:
        yield s


@pytest.fixture(scope="module")
def ray_cluster():
    """One local 2-CPU Ray cluster for the module (the box is small); RayTaskRunner joins it instead of starting its own."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _cfg(tmp_path, server):
    return load_config(profile="cpu-demo", overrides=fast_overrides(tmp_path / "runs", server.base_url) + [
        "generate.target_instructions=12", "generate.max_prompts=6", "generate.prompts_per_round=3"])


def _generate(cfg, teacher):
    try:
        records, stats = bootstrap_instructions(teacher, load_seed_tasks(cfg.generate.seed_tasks), cfg.generate,
                                                cfg.curate, "scale")
        records = answer_instructions(teacher, records, cfg.generate)
    finally:
        teacher.close()
    return [(r.id, r.instruction, r.output, r.status, r.reject_reason) for r in records], stats


@pytest.fixture(scope="module")
def reference(tmp_path_factory, server):
    """The dataset and ledger from the plain one-process teacher."""
    tmp = tmp_path_factory.mktemp("ref")
    cfg = _cfg(tmp, server)
    ledger = Ledger()
    rows, stats = _generate(cfg, make_teacher(cfg.teacher, tmp / "cache.sqlite", ledger))
    assert sum(1 for r in rows if r[3] == "pending" and r[2]) >= 6, "the fake teacher should yield answered records"
    return rows, stats, ledger.as_dict()["total"]


# Ray ~13 s, Dask ~9 s on the 2-core box with a warm Prefect server (26-30 s when the box is busy).
@pytest.mark.parametrize("runner", ["ray", "dask", "default"])
def test_fanned_out_generation_matches_one_process(runner, request, tmp_path, server, reference):
    if runner == "ray":
        request.getfixturevalue("ray_cluster")
    if runner == "dask":
        pytest.importorskip("prefect_dask")
    cfg = _cfg(tmp_path, server)
    ledger = Ledger()
    teacher = FanOutTeacher(cfg.teacher, tmp_path / "cache.sqlite", ledger,
                            ScaleConfig(task_runner=runner, workers=2, shard_size=2))
    rows, stats = _generate(cfg, teacher)
    ref_rows, ref_stats, ref_total = reference
    assert rows == ref_rows
    assert stats == ref_stats
    total = ledger.as_dict()["total"]
    for k in ("requests", "cached", "failures", "tokens_in", "tokens_out"):
        assert total[k] == ref_total[k], k
    # every reply landed in the shared cache from the workers: a re-run pays nothing
    assert len(ResponseCache(tmp_path / "cache.sqlite")) == total["requests"]


def _chats(n, tag="q"):
    return [Request(messages=[{"role": "user", "content": f"{tag} {i}"}], stage="generate") for i in range(n)]


def test_many_writers_keep_cache_ledger_and_order_exact(tmp_path, server):
    cfg = TeacherConfig(backend="openai", base_url=server.base_url, model="fake", max_retries=1, timeout_s=10)
    ledger = Ledger()
    teacher = FanOutTeacher(cfg, tmp_path / "c.sqlite", ledger, ScaleConfig(task_runner="default", workers=4, shard_size=3))
    before = sum(server.requests.values())
    done = []
    reqs = _chats(40, "order")
    out = teacher.generate(reqs, on_done=done.append)
    assert all(f"order {i}." in c.text for i, c in enumerate(out))  # in input order, not completion order
    assert sum(done) == 40 and sum(server.requests.values()) - before == 40
    assert ledger.as_dict()["generate"]["requests"] == 40
    again = teacher.generate(reqs)
    teacher.close()
    assert all(c.cached for c in again) and sum(server.requests.values()) - before == 40
    assert ledger.as_dict()["generate"]["cached"] == 40 and len(ResponseCache(tmp_path / "c.sqlite")) == 40


def test_budget_holds_the_worst_case_of_every_wave(tmp_path, server):
    from pipeline.teachers.ledger import worst_case_tokens

    reqs = _chats(20, "budget")
    w_in, w_out = worst_case_tokens(reqs[0])
    cap = 4 * (w_in + w_out)  # the first wave (2 shards x 2 requests) fits at its worst case, not much more
    cfg = TeacherConfig(backend="openai", base_url=server.base_url, model="fake", max_retries=1, timeout_s=10,
                        budget_tokens=cap)
    teacher = FanOutTeacher(cfg, tmp_path / "c.sqlite", None, ScaleConfig(task_runner="default", workers=2, shard_size=2))
    before = sum(server.requests.values())
    out = teacher.generate(reqs)
    teacher.close()
    answered = [c for c in out if c.ok]
    spent = teacher.ledger.totals()
    assert len(answered) >= 4 and len(answered) < 20
    assert sum(server.requests.values()) - before == len(answered)  # nothing refused was sent
    assert spent.tokens_in + spent.tokens_out <= cap
    assert all(c.error == "not attempted: budget reached" for c in out if not c.ok)


def test_a_failing_shard_becomes_per_request_errors(tmp_path, server):
    bad = TeacherConfig(backend="no-such-backend", model="fake")
    teacher = FanOutTeacher(bad, tmp_path / "c.sqlite", None, ScaleConfig(task_runner="default", workers=2, shard_size=2))
    out = teacher.generate(_chats(3, "fail"))
    teacher.close()
    assert len(out) == 3 and all("shard failed" in c.error and "no-such-backend" in c.error for c in out)
    assert teacher.ledger.as_dict()["generate"]["failures"] == 3


@pytest.mark.parametrize("name,kind,extra", [("ddp", "MULTI_GPU", None), ("fsdp", "FSDP", "fsdp_config"),
                                             ("deepspeed-zero3", "DEEPSPEED", "deepspeed_config")])
def test_accelerate_configs_load_with_accelerates_loader(name, kind, extra):
    from accelerate.commands.config.config_args import load_config_from_file

    c = load_config_from_file(str(REPO / "deploy" / "accelerate" / f"{name}.yaml"))
    assert c.distributed_type.name == kind and c.num_processes >= 2 and not c.use_cpu
    if extra == "fsdp_config":
        assert c.fsdp_config["fsdp_version"] == 2 and c.fsdp_config["fsdp_transformer_layer_cls_to_wrap"]
    if extra == "deepspeed_config":
        assert c.deepspeed_config["zero_stage"] == 3


def test_train_launcher_refuses_a_run_without_data(tmp_path, capsys):
    from pipeline.scale.train_launch import main

    assert main([str(tmp_path)]) == 2
    assert "distill run --data-only" in capsys.readouterr().err

