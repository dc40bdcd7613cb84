"""distill: turn a teacher LLM into training data and a smaller student, and measure the result."""

from pathlib import Path

__version__ = "0.1.0"

# Repository root: prompts/, profiles/ and data/ are found relative to the package, never the cwd.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
PROMPTS_DIR = PROJECT_ROOT / "prompts"
PROFILES_DIR = PROJECT_ROOT / "profiles"
DATA_DIR = PROJECT_ROOT / "data"
