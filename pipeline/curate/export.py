"""Export a dataset version: Alpaca JSONL, Parquet, or the Hugging Face Hub when a token is configured."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from pipeline.curate.stats import SCORE_COLUMNS, export_alpaca_jsonl
from pipeline.errors import DistillError
from pipeline.store import load_records


def _accepted(version_dir: Path) -> Path:
    path = Path(version_dir) / "accepted.parquet"
    if not path.exists():
        raise DistillError(f"{version_dir} is not a dataset version (no accepted.parquet). Pass a folder such as "
                           f"runs/<run-id>/datasets/curated.")
    return path


def export_version(version_dir: Path, fmt: str, dest: str, token_env: str = "HF_TOKEN", private: bool = True) -> str:
    """Write the accepted records of a version as `jsonl` (Alpaca format) or `parquet`, or push them to `hub`."""
    src = _accepted(version_dir)
    if fmt == "jsonl":
        return str(export_alpaca_jsonl(load_records(src), Path(dest)))
    if fmt == "parquet":
        shutil.copyfile(src, dest)
        return dest
    if fmt == "hub":
        token = os.environ.get(token_env)
        if not token:
            raise DistillError(f"Pushing to the Hub needs a token in ${token_env}; export it (a write token from "
                               f"https://huggingface.co/settings/tokens) and run again.")
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise DistillError("HF_HUB_OFFLINE=1 forbids pushing to the Hub; unset it on a machine with network.")
        from datasets import Dataset

        ds = Dataset.from_parquet(str(src))
        columns = ["id", "instruction", "input", "output", "source", "teacher", "template", "run_id"]
        # Quality scores travel with the data when a scorer filled them (curate.quality).
        columns += [c for c in SCORE_COLUMNS if c in ds.column_names and any(v is not None for v in ds[c])]
        ds = ds.select_columns(columns)
        ds.push_to_hub(dest, token=token, private=private)
        return f"https://huggingface.co/datasets/{dest}"
    raise DistillError(f"Unknown export format {fmt!r}: use jsonl, parquet or hub.")
