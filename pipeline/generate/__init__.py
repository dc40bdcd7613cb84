"""Generate: the teacher writes instruction data from seed tasks."""

from pipeline.generate.seeds import SeedTask, load_seed_tasks
from pipeline.generate.self_instruct import answer_instructions, bootstrap_instructions

__all__ = ["SeedTask", "answer_instructions", "bootstrap_instructions", "load_seed_tasks"]
