"""A real local Prefect server and worker, started the way scripts/serve.sh starts them; a deployment run
triggered through the `prefect` CLI must reach Completed, and the retraining deployment must get its runs
scheduled by the server."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import pytest

from pipeline import PROJECT_ROOT
from tests.conftest import fast_overrides

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    # Own process group: the teardown ends the server or worker together with its children.
    return subprocess.Popen(cmd, env=env, cwd=PROJECT_ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture
def prefect_server(tmp_path):
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": url,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "PREFECT_WORKER_QUERY_SECONDS": "2",
           "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5"}
    server = _start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], env,
                    tmp_path / "server.log")
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            pytest.fail("Prefect server not healthy after 180 s")
        yield url, env
    finally:
        _stop(server)


@pytest.mark.slow
def test_cli_triggered_deployment_completes_on_a_real_server(prefect_server, tmp_path, fake_server):
    url, env = prefect_server
    py = str(BIN / "python")
    subprocess.run([py, "-m", "flows.deployments", "setup"], env=env, cwd=PROJECT_ROOT, check=True, timeout=120)
    subprocess.run([py, "-m", "flows.deployments", "deploy", "--set", "retrain.cron=0 4 * * *",
                    "--set", "retrain.timezone=Europe/Berlin"], env=env, cwd=PROJECT_ROOT, check=True, timeout=180)
    worker = _start([str(BIN / "prefect"), "worker", "start", "--pool", "distill-pool", "--type", "process"], env,
                    tmp_path / "worker.log")
    try:
        runs_dir = tmp_path / "runs"
        params = {"overrides": fast_overrides(runs_dir, fake_server.base_url), "run_id": "via-cli"}
        done = subprocess.run([str(BIN / "prefect"), "deployment", "run", "distill/full", "--watch",
                               "--params", json.dumps(params)], env=env, cwd=PROJECT_ROOT, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + (tmp_path / "worker.log").read_text()[-3000:]
        assert (runs_dir / "via-cli" / "report.md").exists()
        assert json.loads((runs_dir / "via-cli" / "status.json").read_text())["state"] == "completed"

        # a bad parameter is refused when the run is created, naming the field
        bad = subprocess.run([str(BIN / "prefect"), "deployment", "run", "distill/full",
                              "--params", json.dumps({"config": {"train": {"bogus_key": 1}}})],
                             env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
        assert bad.returncode != 0 and "bogus_key" in bad.stdout + bad.stderr
    finally:
        _stop(worker)

    # the retraining deployment carries the configured schedule, and the server schedules runs for it
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("distill/retrain")
        (schedule,) = dep.schedules
        assert (schedule.schedule.cron, schedule.schedule.timezone) == ("0 4 * * *", "Europe/Berlin")
        deadline = time.monotonic() + 60
        scheduled = []
        while time.monotonic() < deadline and not scheduled:
            scheduled = [r for r in client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))
                         if r.state_type.value == "SCHEDULED"]
            time.sleep(2)
        assert scheduled, "the server created no scheduled runs for distill/retrain"
        berlin = [r.expected_start_time.astimezone(ZoneInfo("Europe/Berlin")) for r in scheduled]
        assert all((t.hour, t.minute) == (4, 0) for t in berlin), berlin
