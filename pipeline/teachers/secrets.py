"""Where a teacher's API key comes from: a Prefect Secret block or an environment variable, never a config file.

The key is only ever held in memory by the HTTP client; `redact` scrubs it from any text we keep or show.
"""

from __future__ import annotations

import os

from pipeline.config import TeacherConfig
from pipeline.errors import ConfigError

REDACTED = "[REDACTED]"


def resolve_api_key(cfg: TeacherConfig) -> str | None:
    """The API key from the Prefect Secret block named in the config, else from the environment, else None."""
    if cfg.api_key_secret_block:
        try:
            from prefect.blocks.system import Secret

            value = Secret.load(cfg.api_key_secret_block).get()
        except Exception as e:  # the message names the block, never a value
            raise ConfigError(f"teacher.api_key_secret_block={cfg.api_key_secret_block!r}: could not load that Prefect "
                              f"Secret block ({type(e).__name__}). Create it with `Secret(value=...).save("
                              f"{cfg.api_key_secret_block!r})`, or unset the field and export ${cfg.api_key_env}.") from None
        return str(value) if value else None
    return os.environ.get(cfg.api_key_env) or None


def client_api_key(cfg: TeacherConfig) -> str:
    """The key to hand the HTTP client; refuses to start when a remote API (no base_url) has none."""
    key = resolve_api_key(cfg)
    if not key and not cfg.base_url:
        raise ConfigError(f"teacher.backend={cfg.backend} with no base_url needs an API key in ${cfg.api_key_env} "
                          f"(or a Prefect Secret block named in teacher.api_key_secret_block). Export it, or set "
                          f"teacher.base_url to a local server (vLLM, llama.cpp, Ollama).")
    return key or "not-needed"  # local servers accept any key


def redact(text: str, secret: str | None) -> str:
    """`text` with every occurrence of `secret` replaced by a marker."""
    if secret and len(secret) >= 4:
        text = text.replace(secret, REDACTED)
    return text
