"""The deployments, defined in code so the retraining schedule comes from the validated config.

    python -m flows.deployments setup                 # work pool + concurrency limits on the server
    python -m flows.deployments deploy [--profile P] [--set retrain.cron=...]   # register the deployments

| deployment | what |
| --- | --- |
| `distill/full` | the whole pipeline |
| `distill/data` | generate + curate only |
| `distill/retrain` | on a cron schedule: train on all accepted data so far, evaluate, champion or challenger |

A `prefect worker start --pool distill-pool` runs them (scripts/serve.sh starts one locally; deploy/ has
service files for a team box). Parameters are validated by the server when a run is created: `config` is the
full RunConfig schema (extra keys are rejected with the field named), `overrides` are `section.key=value`
strings checked when the run starts.
"""

from __future__ import annotations

import argparse
import sys

from pipeline import PROJECT_ROOT
from pipeline.config import DEFAULT_PROFILE, RunConfig, load_config

POOL = "distill-pool"
ENTRYPOINT = "flows/distill.py:distill"


def schedule_for(cfg: RunConfig):
    """The cron schedule of distill/retrain, from the config's retrain section."""
    from prefect.client.schemas.schedules import CronSchedule

    return CronSchedule(cron=cfg.retrain.cron, timezone=cfg.retrain.timezone)


def build(profile: str = DEFAULT_PROFILE, overrides: list[str] | None = None) -> list:
    """The three deployments as RunnerDeployments, pointing at this checkout's code."""
    from prefect import Flow
    from prefect.client.schemas.actions import DeploymentScheduleCreate

    cfg = load_config(profile=profile, overrides=overrides)  # fail here, not at 3 a.m., on a bad config
    flow = Flow.from_source(source=str(PROJECT_ROOT), entrypoint=ENTRYPOINT)
    base = {"profile": profile, "overrides": list(overrides or [])}
    return [
        flow.to_deployment(name="full", parameters={**base, "stages_to_run": "full"},
                           description="The whole pipeline: generate, curate, train, evaluate, report, registry."),
        flow.to_deployment(name="data", parameters={**base, "stages_to_run": "data"},
                           description="Generate and curate only: a new dataset version."),
        flow.to_deployment(name="retrain", parameters={**base, "stages_to_run": "retrain"},
                           schedules=[DeploymentScheduleCreate(schedule=schedule_for(cfg), active=True)],
                           description="Scheduled: train on all accepted data so far, evaluate, champion or challenger."),
    ]


def setup(pool: str = POOL) -> None:
    """Create the process work pool and the concurrency limits (idempotent)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    from flows.infra import ensure_limits

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            print(f"created work pool {pool}")
        except ObjectAlreadyExists:
            pass
    created = ensure_limits()
    print(f"concurrency limits ready (created: {', '.join(created) or 'none, all existed'})")


def deploy(profile: str = DEFAULT_PROFILE, overrides: list[str] | None = None, pool: str = POOL) -> list:
    """Register the deployments with the server, on the given process work pool."""
    from prefect import deploy as prefect_deploy

    return prefect_deploy(*build(profile, overrides), work_pool_name=pool, build=False, push=False,
                          print_next_steps_message=False, ignore_warnings=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.deployments", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("setup", help="create the work pool and the concurrency limits")
    s.add_argument("--pool", default=POOL)
    d = sub.add_parser("deploy", help="register distill/full, distill/data and distill/retrain")
    d.add_argument("--profile", default=DEFAULT_PROFILE)
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    d.add_argument("--pool", default=POOL)
    args = p.parse_args(argv)
    if args.command == "setup":
        setup(args.pool)
    else:
        ids = deploy(args.profile, args.set, args.pool)
        print(f"deployed {len(ids)} deployments: distill/full, distill/data, distill/retrain (pool {args.pool})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
