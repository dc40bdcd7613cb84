"""Generate: the teacher writes instruction data, by one of several modes (GenerateConfig.mode)."""

from __future__ import annotations

from collections import Counter
from typing import Sequence

from pipeline.config import CurateConfig, GenerateConfig
from pipeline.generate.seeds import SeedTask, load_seed_tasks, without_heldout
from pipeline.generate.self_instruct import answer_instructions, bootstrap_instructions
from pipeline.records import Record
from pipeline.teachers.base import CachedTeacher

__all__ = ["SeedTask", "answer_instructions", "bootstrap_instructions", "generate_records", "load_seed_tasks"]


def generate_records(teacher: CachedTeacher, cfg: GenerateConfig, curate_cfg: CurateConfig,
                     run_id: str, heldout: Sequence[str] = ()) -> tuple[list[Record], dict]:
    """Run the configured mode end to end: candidates, then their outputs; returns (records, stats).

    `heldout`: the eval items' instructions; seed tasks among them are never shown to the teacher.
    """
    all_seeds = load_seed_tasks(cfg.seed_tasks)
    pool = without_heldout(all_seeds, heldout)
    from pipeline.generate.alpaca import alpaca_generate
    from pipeline.generate.instances import make_instances
    from pipeline.generate.responses import magpie_generate, responses_generate

    if cfg.mode == "responses":
        records, stats = responses_generate(teacher, cfg, run_id)
    elif cfg.mode == "alpaca":
        records, stats = alpaca_generate(teacher, pool, cfg, curate_cfg, run_id)
    elif cfg.mode == "magpie":
        seeds = [s.instruction for s in pool] if curate_cfg.dedupe_against_seeds else []
        records, stats = magpie_generate(teacher, cfg, curate_cfg, run_id, seeds)
        records = answer_instructions(teacher, records, cfg)
    else:
        seeds = pool
        records, stats = bootstrap_instructions(teacher, seeds, cfg, curate_cfg, run_id)
        if cfg.instances in ("paper", "paper-or-answer"):
            records = make_instances(teacher, records, seeds, cfg)
            stats["instances_parsed"] = sum(1 for r in records if r.status == "pending" and r.output)
        records = answer_instructions(teacher, records, cfg)
    if cfg.evol_rounds:
        from pipeline.generate.evol import evolve

        seeds_text = [s.instruction for s in pool] if cfg.mode != "responses" else []
        records, evol_stats = evolve(teacher, records, cfg, curate_cfg, run_id, seeds_text)
        stats.update(evol_stats)
    stats["mode"] = cfg.mode
    stats["seeds_held_out"] = len(all_seeds) - len(pool)
    stats["reject_reasons"] = dict(Counter(r.reject_reason for r in records if r.status == "rejected").most_common())
    return records, stats
