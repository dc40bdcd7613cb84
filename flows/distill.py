"""The `distill` flow: generate -> curate -> train -> evaluate -> report -> registry, one Prefect task per stage.

`stages_to_run` picks the recipe: `full` (everything), `data` (generate + curate) or `retrain` (train on all
accepted data so far, evaluate, and let the registry decide champion or challenger).
"""

from __future__ import annotations

from typing import Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from flows.infra import limit, stage_cache, transient
from pipeline import registry, stages
from pipeline.config import RunConfig, load_config
from pipeline.report import artifact_tables
from pipeline.store import Run


# Teacher I/O is the one place a retry helps; the response cache makes a retried stage pay only for what failed.
@task(name="generate", retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=transient, persist_result=True,
      cache_policy=stage_cache("pipeline/generate", "pipeline/teachers", "pipeline/records.py", "prompts"))
def generate(run_dir: str) -> dict:
    with limit("teacher-api"):
        return stages.generate_stage(Run.open(run_dir))


@task(name="curate", persist_result=True, cache_policy=stage_cache("pipeline/curate", "pipeline/records.py"))
def curate(run_dir: str) -> dict:
    return stages.curate_stage(Run.open(run_dir))


@task(name="gather-accepted-data", persist_result=True, cache_policy=stage_cache("pipeline/registry.py"))
def gather_accepted(run_dir: str) -> dict:
    return registry.merge_accepted(Run.open(run_dir))


@task(name="train", persist_result=True, cache_policy=stage_cache("pipeline/train", "pipeline/models.py"))
def train(run_dir: str) -> dict:
    with limit("gpu"):
        return stages.train_stage(Run.open(run_dir))


@task(name="train-gold", persist_result=True, cache_policy=stage_cache("pipeline/train", "pipeline/models.py"))
def train_gold(run_dir: str) -> dict:
    """The gold-trained contender: same student, method, steps and size, on the original data."""
    with limit("gpu"):
        return stages.gold_stage(Run.open(run_dir))


@task(name="evaluate", persist_result=True,
      cache_policy=stage_cache("pipeline/evaluate", "pipeline/models.py", "pipeline/teachers"))
def evaluate(run_dir: str) -> dict:
    with limit("gpu"), limit("teacher-api"):
        return stages.evaluate_stage(Run.open(run_dir))


@task(name="report")
def report(run_dir: str, generation: dict, curation: dict, training: dict, evaluation: dict) -> dict:
    run = Run.open(run_dir)
    summary = stages.report_stage(run, generation, curation, training, evaluation)
    create_markdown_artifact(key="distill-report", markdown=run.path("report.md").read_text(),
                             description=f"Report of run {run.id} ({run.dir.resolve()})")
    for table in artifact_tables({"evaluation": evaluation}):
        create_table_artifact(key=table["key"], table=table["table"], description=table["description"])
    return summary


@task(name="promote")
def promote(run_dir: str, model_id: str) -> dict:
    run = Run.open(run_dir)
    decision = registry.promote(run.catalog, model_id, run.cfg.retrain)
    verdict = "**champion**" if decision.promoted else "kept as **challenger**"
    checks = "".join(f"\n| {c['metric']} | {c.get('champion', '–')} | {c.get('challenger', '–')} | "
                     f"{'ok' if c['ok'] else 'regressed'} {c.get('note', '')} |" for c in decision.checks)
    create_markdown_artifact(
        key="distill-promotion",
        markdown=f"# Registry decision: {model_id} {verdict}\n\n{decision.reason}\n\n"
                 f"- champion before: `{decision.champion_id}`\n- metric: `{decision.metric}`, paired difference "
                 f"{decision.delta}, 95% interval half-width {decision.margin}\n\n| guard | champion | challenger | result |\n"
                 f"| --- | --- | --- | --- |{checks}\n",
        description="Champion/challenger decision")
    get_run_logger().info("registry: %s %s: %s", model_id, "promoted to champion" if decision.promoted
                          else "kept as challenger", decision.reason)
    return decision.as_dict()


def dataset_artifact(curation: dict) -> None:
    """Dataset stats as a table: accepted, rejected, and the count per reject reason."""
    rows = [{"what": "accepted", "count": curation.get("accepted", 0)},
            {"what": "rejected", "count": curation.get("rejected", 0)}]
    rows += [{"what": f"rejected: {k}", "count": v} for k, v in (curation.get("reject_reasons") or {}).items()]
    create_table_artifact(key="distill-dataset", table=rows, description=f"Dataset {curation.get('id')}")
    get_run_logger().info("data: %s accepted, %s rejected %s", curation.get("accepted"), curation.get("rejected"),
                          curation.get("reject_reasons") or "")


@flow(name="distill")
def distill(profile: str = "cpu-demo", overrides: list[str] | None = None, config: RunConfig | None = None,
            run_id: str | None = None, stages_to_run: Literal["full", "data", "retrain"] = "full",
            allow_config_change: bool = False) -> dict:
    """Distil the teacher into the student and report whether it worked."""
    logger = get_run_logger()
    cfg = config or load_config(profile=profile, overrides=overrides)
    stages.preflight(cfg)
    run = Run.create(cfg, run_id, allow_config_change=allow_config_change)
    logger.info("Run folder: %s", run.dir.resolve())
    create_link_artifact(key="distill-run-folder", link=run.dir.resolve().as_uri(), link_text=str(run.dir.resolve()),
                         description=f"Run folder of {run.id}")
    try:
        run_dir = str(run.dir)
        if stages_to_run == "retrain":
            generation, curation = {}, gather_accepted(run_dir)
        else:
            generation = generate(run_dir)
            curation = curate(run_dir)
        dataset_artifact(curation)
        if stages_to_run == "data":
            run.set_state("completed", summary={"accepted": curation["accepted"], "rejected": curation["rejected"]})
            return {"run_dir": str(run.dir.resolve()), **curation}
        training = train(run_dir)
        if cfg.evaluate.gold_student:
            train_gold(run_dir)
        evaluation = evaluate(run_dir)
        summary = report(run_dir, generation, curation, training, evaluation)
        decision = promote(run_dir, summary["model_id"])
        # Completed only now: the model is registered and the registry has decided.
        run.set_state("completed", summary={**summary, "promoted": decision["promoted"], "decision": decision["reason"]})
    except BaseException as e:
        run.set_state("failed", error=f"{type(e).__name__}: {e}")
        raise
    logger.info("Done: %s", summary)
    return {"run_dir": str(run.dir.resolve()), **summary, "promoted": decision["promoted"], "decision": decision["reason"]}
