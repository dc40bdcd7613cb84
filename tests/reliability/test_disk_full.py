"""The disk filling up during a dataset write: a clear error, and no half-written version listed as good."""

from __future__ import annotations

import errno
import os
import sys
import subprocess
import base64

import pytest

from pipeline.config import load_config
from pipeline.records import Record
from pipeline.store import Catalog, Run


@pytest.fixture
def tiny_disk(tmp_path):
    """A 2 MB tmpfs: real ENOSPC from the kernel, not a simulated exception."""
    mount = tmp_path / "disk"
    mount.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({out.stderr.strip()}); needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_dataset_write_on_full_disk_leaves_no_version(tiny_disk):
    cfg = load_config(overrides=[f"runs_dir={tiny_disk / 'runs'}"])
    run = Run.create(cfg, run_id="full")
    # Incompressible text so Parquet cannot squeeze it under the limit.
    records = [Record(instruction=f"Explain item {i}.", output=base64.b64encode(os.urandom(900)).decode(), status="accepted")
               for i in range(3000)]
    with pytest.raises(OSError) as e:
        run.save_dataset("curated", records, [], {"parents": []})
    assert e.value.errno == errno.ENOSPC
    assert not (run.dir / "datasets" / "curated").exists()
    leftovers = [p for p in (run.dir / "datasets").rglob("*") if p.name.startswith(".")] if (run.dir / "datasets").exists() else []
    assert leftovers == []
    assert Catalog(cfg.runs_dir).rows("datasets") == []
    assert run.status()["state"] == "running"


def test_cli_reports_full_disk_clearly(tiny_disk):
    # Fill the disk, then ask for a run: the very first write (config.yaml) fails.
    filler = tiny_disk / "filler"
    with open(filler, "wb") as f:
        try:
            f.write(os.urandom(4 * 2**20))
        except OSError:
            pass
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "--set", f"runs_dir={tiny_disk / 'runs'}"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "No space left" in out.stderr and "resume" in out.stderr
    assert "Traceback" not in out.stderr
