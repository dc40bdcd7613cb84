"""`distill run --dry-run`: before any teacher call, the most each stage can ask for and what it can cost; the
bounds hold against a real generate stage on the fake teacher."""

from __future__ import annotations

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.estimate import estimate
from pipeline.stages import generate_stage, run_ledger
from pipeline.store import Run
from tests.conftest import fast_overrides

PRICES = ["teacher.price_per_1m_input=2.5", "teacher.price_per_1m_output=10"]


def test_dry_run_prints_the_bounds_and_calls_no_teacher(tmp_path, fake_server, capsys):
    runs = tmp_path / "runs"
    args = ["run", "--dry-run", "--run-id", "d"]
    for o in fast_overrides(runs, fake_server.base_url) + PRICES + ["teacher.budget_usd=0.01"]:
        args += ["--set", o]
    assert main(args) == 0
    out = capsys.readouterr().out
    cfg = load_config(overrides=fast_overrides(runs, fake_server.base_url) + PRICES)
    est = estimate(cfg)
    gen, ev = est["stages"]
    assert f"{'generate':<10} {gen.requests:>10,}" in out and f"{'evaluate':<10} {ev.requests:>10,}" in out
    assert f"${est['usd']:,.4f}" in out and "budget: teacher.budget_usd=$0.01" in out
    assert "time: unknown" in out  # no earlier run of this teacher to measure
    assert ev.requests == 3 and gen.requests > 4  # 3 eval items; 4 prompts plus their instructions' answers
    assert fake_server.total_requests == 0 and not (runs / "d").exists()


def test_bounds_hold_against_a_real_generate_stage(tmp_path, fake_server, capsys):
    cfg = load_config(overrides=fast_overrides(tmp_path / "runs", fake_server.base_url) + PRICES)
    est = estimate(cfg)
    run = Run.create(cfg, "g")
    generate_stage(run)
    spent = run_ledger(run).as_dict()["generate"]
    gen = est["stages"][0]
    assert 0 < spent["requests"] <= gen.requests
    assert spent["tokens_in"] <= gen.prompt_tokens and spent["tokens_out"] <= gen.completion_tokens
    assert spent["cost_usd"] <= gen.usd
    # With that run's ledger in runs_dir, the next estimate knows the teacher's rate.
    again = estimate(cfg)
    assert again["seconds_per_request"] is not None and again["stages"][0].seconds is not None
