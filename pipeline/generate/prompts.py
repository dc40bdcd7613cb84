"""Prompt templates are files in prompts/; the template's hash goes into provenance and the cache key."""

from __future__ import annotations

import hashlib
from functools import lru_cache

from jinja2 import Environment, FileSystemLoader, StrictUndefined

from pipeline import PROMPTS_DIR


@lru_cache(maxsize=1)
def _env() -> Environment:
    # StrictUndefined: a misspelled variable is an error, not an empty string in a paid prompt.
    # Generated text is only ever passed as a variable, never compiled as a template.
    return Environment(loader=FileSystemLoader(str(PROMPTS_DIR)), undefined=StrictUndefined,
                       keep_trailing_newline=False, autoescape=False)


def render(name: str, **variables) -> str:
    """Render prompts/<name>.j2 with the given variables."""
    return _env().get_template(f"{name}.j2").render(**variables)


def template_hash(name: str) -> str:
    """Short hash of the template file's text, recorded with every record it produced."""
    return hashlib.sha256((PROMPTS_DIR / f"{name}.j2").read_bytes()).hexdigest()[:12]
