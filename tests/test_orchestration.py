"""The `distill` flow under a Prefect test server: artifacts, strict concurrency limits, the registry,
deployment definitions and parameter validation at run creation."""

import json

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.testing.utilities import prefect_test_harness

from flows.deployments import build
from flows.distill import distill
from flows.infra import LIMITS, MissingLimitError, ensure_limits, limit
from pipeline.registry import decisions
from pipeline.store import Catalog


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_missing_limit_is_an_error_then_setup_creates_it(harness):
    @flow
    def needs_gpu():
        with limit("gpu"):
            return "ran"

    with pytest.raises(MissingLimitError, match="'gpu' is missing.*serve.sh start"):
        needs_gpu()
    assert sorted(ensure_limits()) == sorted(LIMITS)
    assert ensure_limits() == []  # idempotent
    assert needs_gpu() == "ran"


@pytest.mark.slow
def test_full_flow_records_artifacts_catalog_and_champion(harness, fast_config, fake_server):
    ensure_limits()
    result = distill(config=fast_config, run_id="orchestrated")
    run = fast_config.runs_dir / "orchestrated"
    assert result["run_dir"] == str(run.resolve())
    assert (run / "report.md").exists() and (run / "adapter" / "adapter_config.json").exists()
    assert json.loads((run / "status.json").read_text())["state"] == "completed"

    with get_client(sync_client=True) as client:
        artifacts = {a.key: a for a in client.read_artifacts() if a.key}
    # a link artifact is stored as markdown holding the link
    for key, kind in (("distill-report", "markdown"), ("distill-scores", "table"), ("distill-dataset", "table"),
                      ("distill-run-folder", "markdown"), ("distill-promotion", "markdown")):
        assert artifacts[key].type == kind, key
    assert "| Distilled student |" in artifacts["distill-report"].data
    assert str(run.resolve()) in artifacts["distill-run-folder"].data
    scores = json.loads(artifacts["distill-scores"].data) if isinstance(artifacts["distill-scores"].data, str) \
        else artifacts["distill-scores"].data
    assert {row["contender"] for row in scores} >= {"Teacher", "Raw student", "Distilled student"}

    # the first model of a fresh catalog becomes the champion and is exported to the stable alias
    catalog = Catalog(fast_config.runs_dir)
    model = catalog.rows("models", "WHERE run_id='orchestrated'")[0]
    assert model["role"] == "champion" and result["promoted"] is True
    assert json.loads(model["metrics"])["rouge_l_ci"]
    assert decisions(catalog)[0]["model_id"] == model["id"]
    pointer = json.loads((fast_config.runs_dir / "champion" / "champion.json").read_text())
    assert pointer["model_id"] == model["id"]
    assert (fast_config.runs_dir / "champion" / "adapter" / "adapter_config.json").exists()

    # a run that died after its stages (as a crash in report would leave it) resumes from Prefect's cache:
    # the four stage tasks are Cached, and the teacher is not asked again
    status = json.loads((run / "status.json").read_text())
    (run / "status.json").write_text(json.dumps({**status, "state": "failed"}))
    paid = fake_server.total_requests
    distill(config=fast_config, run_id="orchestrated")
    assert fake_server.total_requests == paid
    with get_client(sync_client=True) as client:
        cached = {t.name.rsplit("-", 1)[0] for t in client.read_task_runs() if t.state_name == "Cached"}
    assert cached >= {"generate", "curate", "train", "evaluate"}


def test_retrain_deployment_schedule_comes_from_config():
    full, data, retrain = build("cpu-demo", ["retrain.cron=15 4 * * 2", "retrain.timezone=Europe/Berlin"])
    assert (full.name, data.name, retrain.name) == ("full", "data", "retrain")
    assert [d.parameters["stages_to_run"] for d in (full, data, retrain)] == ["full", "data", "retrain"]
    assert not full.schedules and not data.schedules
    (schedule,) = retrain.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone) == ("15 4 * * 2", "Europe/Berlin")


def test_bad_parameters_are_rejected_when_the_run_is_created(harness):
    from prefect.deployments import run_deployment

    full = build("cpu-demo")[0]
    full.apply()  # the server stores the parameter schema with the deployment
    with pytest.raises(Exception, match="bogus_key"):
        run_deployment("distill/full", parameters={"config": {"name": "x", "train": {"bogus_key": 1}}}, timeout=0)
    with pytest.raises(Exception, match="stages_to_run"):
        run_deployment("distill/full", parameters={"stages_to_run": "everything"}, timeout=0)
    with get_client(sync_client=True) as client:
        assert not [r for r in client.read_flow_runs() if r.deployment_id]  # no run was created for bad requests
