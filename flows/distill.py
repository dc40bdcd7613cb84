"""The `distill` flow: generate -> curate -> train -> evaluate -> report, one Prefect task per stage."""

from __future__ import annotations

from typing import Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from pipeline import stages
from pipeline.config import RunConfig, load_config
from pipeline.store import Run


@task(name="generate")
def generate(run_dir: str) -> dict:
    return stages.generate_stage(Run.open(run_dir))


@task(name="curate")
def curate(run_dir: str) -> dict:
    return stages.curate_stage(Run.open(run_dir))


@task(name="train")
def train(run_dir: str) -> dict:
    return stages.train_stage(Run.open(run_dir))


@task(name="evaluate")
def evaluate(run_dir: str) -> dict:
    return stages.evaluate_stage(Run.open(run_dir))


@task(name="report")
def report(run_dir: str, generation: dict, curation: dict, training: dict, evaluation: dict) -> dict:
    run = Run.open(run_dir)
    summary = stages.report_stage(run, generation, curation, training, evaluation)
    create_markdown_artifact(key="distill-report", markdown=run.path("report.md").read_text(),
                             description=f"Report of run {run.id} ({run.dir.resolve()})")
    rows = [{"contender": k, "rouge_l": round(v["rouge_l"], 4), "ci_low": round(v["rouge_l_ci"][0], 4),
             "ci_high": round(v["rouge_l_ci"][1], 4)} for k, v in evaluation.items()
            if isinstance(v, dict) and "rouge_l" in v]
    create_table_artifact(key="distill-scores", table=rows, description="ROUGE-L on the held-out set")
    return summary


@flow(name="distill")
def distill(profile: str = "cpu-demo", overrides: list[str] | None = None, config: RunConfig | None = None,
            run_id: str | None = None, stages_to_run: Literal["full", "data"] = "full") -> dict:
    """Distil the teacher into the student and report whether it worked."""
    logger = get_run_logger()
    cfg = config or load_config(profile=profile, overrides=overrides)
    stages.preflight(cfg)
    run = Run.create(cfg, run_id)
    logger.info("Run folder: %s", run.dir.resolve())
    try:
        run_dir = str(run.dir)
        generation = generate(run_dir)
        curation = curate(run_dir)
        if stages_to_run == "data":
            run.set_state("completed", summary={"accepted": curation["accepted"], "rejected": curation["rejected"]})
            return {"run_dir": str(run.dir.resolve()), **curation}
        training = train(run_dir)
        evaluation = evaluate(run_dir)
        summary = report(run_dir, generation, curation, training, evaluation)
    except BaseException as e:
        run.set_state("failed", error=f"{type(e).__name__}: {e}")
        raise
    logger.info("Done: %s", summary)
    return {"run_dir": str(run.dir.resolve()), **summary}
