"""Run folders, dataset versions and the catalog. Every write is atomic (temp file + rename), so a killed
run never leaves a half-written file that looks complete."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from pipeline import PROJECT_ROOT, __version__
from pipeline.config import RunConfig, dump_config
from pipeline.errors import DistillError
from pipeline.records import Record, now_iso

RECORD_COLUMNS = list(Record.model_fields)
# What each stage leaves in a run folder (a stage with its outputs present is skipped on resume).
STAGE_OUTPUTS = {"generate": ["generated.parquet", "generate.json"], "curate": ["datasets/curated"],
                 "train": ["train.json", "adapter", "model", "merged", "checkpoints", "training_curves.png",
                           "train_log.json"],
                 "evaluate": ["eval", "gold"], "report": ["report.md", "report.json", "scores.png", "speed_quality.png"]}


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str, ensure_ascii=False) + "\n")


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Build a directory under a temp name and rename it into place only when complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_swap_dir(path: Path) -> Iterator[Path]:
    """Build the next version of the folder `path` and switch to it in one atomic rename.

    `path` is a symlink to a versioned sibling (`.<name>.v-<stamp>`); the switch replaces the symlink with
    os.replace, so a reader or a crash at any moment finds the old version or the new one, never neither (a plain
    folder cannot be replaced in one step: deleting it first opens a window). The previous version is kept for a
    reader still loading from it; older ones are removed after the switch."""
    path = Path(path)
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    stamp = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S%f}"
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{path.name}.tmp-"))
    try:
        yield tmp
        version = parent / f".{path.name}.v-{stamp}"
        os.replace(tmp, version)
        previous = os.readlink(path) if path.is_symlink() else None
        link = parent / f".{path.name}.link-{stamp}"
        os.symlink(version.name, link)  # relative: the runs folder can be moved or mounted elsewhere
        if path.exists() and not path.is_symlink():
            # A plain folder from before versioned swaps becomes a version itself; the symlink takes its place.
            previous = f".{path.name}.v-0-legacy-{stamp}"
            os.replace(path, parent / previous)
        os.replace(link, path)
        for old in parent.glob(f".{path.name}.v-*"):
            if old.name not in (version.name, previous):
                shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def code_version() -> str:
    """The git commit of the code that produced an artifact (or the package version outside git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT_ROOT, capture_output=True,
                             text=True, timeout=5)
        if out.returncode == 0:
            return out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return __version__


# --- datasets -------------------------------------------------------------------------------------------

def save_records(path: Path, records: list[Record]) -> Path:
    """Write records as Parquet through `datasets`, atomically."""
    from datasets import Dataset

    rows = [r.model_dump() for r in records]
    for row in rows:
        # Per-token dicts with free-form keys would explode into a sparse Arrow struct: keep them as JSON text.
        if row.get("teacher_logprobs") is not None:
            row["teacher_logprobs"] = json.dumps(row["teacher_logprobs"])
    ds = Dataset.from_list(rows) if rows else Dataset.from_dict({c: [] for c in RECORD_COLUMNS})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-", suffix=".parquet")
    os.close(fd)
    try:
        ds.to_parquet(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def load_records(path: Path) -> list[Record]:
    """Read records written by `save_records`."""
    from datasets import Dataset

    ds = Dataset.from_parquet(str(path))
    records = []
    for row in ds:
        if isinstance(row.get("teacher_logprobs"), str):
            row["teacher_logprobs"] = json.loads(row["teacher_logprobs"])
        records.append(Record.model_validate(row))
    return records


# --- catalog --------------------------------------------------------------------------------------------

class Catalog:
    """SQLite index of runs, dataset versions and models that the CLI, flows and browser read."""

    def __init__(self, runs_dir: Path):
        self.path = Path(runs_dir) / "catalog.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._conn() as c:
            c.executescript("""
                CREATE TABLE IF NOT EXISTS runs (id TEXT PRIMARY KEY, name TEXT, dir TEXT, state TEXT,
                    config_hash TEXT, created TEXT, updated TEXT, summary TEXT);
                CREATE TABLE IF NOT EXISTS datasets (id TEXT PRIMARY KEY, run_id TEXT, path TEXT, accepted INTEGER,
                    rejected INTEGER, manifest TEXT, created TEXT);
                CREATE TABLE IF NOT EXISTS models (id TEXT PRIMARY KEY, run_id TEXT, path TEXT, role TEXT,
                    dataset_id TEXT, metrics TEXT, created TEXT);
            """)

    def _conn(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=60)
        conn.execute("PRAGMA journal_mode=WAL")
        return conn

    def upsert(self, table: str, **row: Any) -> None:
        row = {k: json.dumps(v, default=str) if isinstance(v, (dict, list)) else v for k, v in row.items()}
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        updates = ", ".join(f"{k}=excluded.{k}" for k in row if k != "id")
        with self._conn() as c:
            c.execute(f"INSERT INTO {table} ({cols}) VALUES ({marks}) ON CONFLICT(id) DO UPDATE SET {updates}",
                      list(row.values()))

    def rows(self, table: str, where: str = "", params: tuple = ()) -> list[dict[str, Any]]:
        with self._conn() as c:
            c.row_factory = sqlite3.Row
            return [dict(r) for r in c.execute(f"SELECT * FROM {table} {where}", params)]


# --- runs -----------------------------------------------------------------------------------------------

class Run:
    """A run folder: runs/<run-id>/ with config.yaml, status.json, datasets/, adapter/, eval/, report.md."""

    def __init__(self, run_dir: Path, cfg: RunConfig):
        self.dir = Path(run_dir)
        self.id = self.dir.name
        self.cfg = cfg
        self.catalog = Catalog(cfg.runs_dir)

    @classmethod
    def create(cls, cfg: RunConfig, run_id: str | None = None, allow_config_change: bool = False) -> "Run":
        """Start a run folder, or reopen an unfinished one with the same id to resume it.

        A resumed run is the run it says it is: its saved config is compared with `cfg`, and a change to any key
        that shapes its results is refused (naming the keys) unless `allow_config_change`, in which case the
        outputs of the first stage those keys feed, and of every stage after it, are moved to superseded/ so they
        run again; status.json records what changed and what re-ran."""
        run_id = run_id or f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{cfg.name}"
        run = cls(Path(cfg.runs_dir) / run_id, cfg)
        status = run.status()
        if status.get("state") == "completed":
            raise DistillError(f"Run {run_id} already completed in {run.dir}; pick a new run id to run again "
                               f"(teacher replies are cached, so a re-run costs nothing).")
        change = run._config_change(allow_config_change)
        run.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run.dir / "config.yaml", dump_config(cfg))
        if change:
            run.set_state("running", config_changes=[*status.get("config_changes", []), change])
        else:
            run.set_state("running")
        return run

    def _config_change(self, allowed: bool) -> dict[str, Any] | None:
        """Compare the saved config with this one; refuse, or move aside what must re-run. The record, or None."""
        from pipeline.config import config_changes, first_stage_changed, is_operational, load_config

        saved = self.dir / "config.yaml"
        if not saved.exists():
            return None
        try:
            old = load_config(config_file=saved)
        except DistillError:  # written by an older distill whose keys no longer validate: compare as text only
            old = None
        diff = config_changes(old, self.cfg) if old is not None else (
            {} if saved.read_text() == dump_config(self.cfg) else {"(config.yaml)": ("unreadable", "new")})
        if not diff:
            return None
        results = [k for k in diff if not is_operational(k)]
        shown = "; ".join(f"{k}: {diff[k][0]!r} -> {diff[k][1]!r}" for k in results[:12])
        if results and not allowed:
            raise DistillError(
                f"Run {self.id} was started with another config ({len(results)} key(s) that shape its results "
                f"differ: {shown}{'; ...' if len(results) > 12 else ''}). Resume it as it was (drop those --set "
                f"overrides, or pass --config {saved}), start a new run id, or pass --allow-config-change to re-run "
                f"{first_stage_changed(results)} and every stage after it with the new values.")
        rerun: list[str] = []
        if results:
            from pipeline.config import STAGE_ORDER

            first = first_stage_changed(results)
            rerun = list(STAGE_ORDER[STAGE_ORDER.index(first):])
            aside = self.dir / "superseded" / f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S%f}"
            for stage in rerun:
                for name in STAGE_OUTPUTS[stage]:
                    if (self.dir / name).exists():
                        (aside / name).parent.mkdir(parents=True, exist_ok=True)
                        os.replace(self.dir / name, aside / name)
        return {"at": now_iso(), "keys": {k: list(v) for k, v in diff.items()}, "result_keys": results,
                "reran": rerun}

    @classmethod
    def open(cls, run_dir: str | Path) -> "Run":
        """Reopen a run folder from its saved config."""
        from pipeline.config import load_config

        return cls(Path(run_dir), load_config(config_file=Path(run_dir) / "config.yaml"))

    def status(self) -> dict[str, Any]:
        path = self.dir / "status.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def set_state(self, state: str, **extra: Any) -> None:
        status = {**self.status(), "state": state, "updated": now_iso(), "code_version": code_version(), **extra}
        status.setdefault("created", status["updated"])
        atomic_write_json(self.dir / "status.json", status)
        self.catalog.upsert("runs", id=self.id, name=self.cfg.name, dir=str(self.dir.resolve()), state=state,
                            config_hash=self.cfg.fingerprint(), created=status["created"], updated=status["updated"],
                            summary=extra.get("summary", status.get("summary", {})))

    def path(self, *parts: str) -> Path:
        return self.dir.joinpath(*parts)

    def save_dataset(self, name: str, accepted: list[Record], rejected: list[Record], manifest: dict[str, Any],
                     extras: Callable[[Path], None] | None = None) -> Path:
        """Write a dataset version (accepted + rejects + `extras(folder)` + manifest) as one directory, atomically.

        Everything is built in a temp folder and the manifest is its last file, so a version either appears whole
        or not at all: a kill at any point never leaves a manifest beside missing files."""
        final = self.path("datasets", name)
        manifest = {"id": f"{self.id}/{name}", "run_id": self.id, "accepted": len(accepted), "rejected": len(rejected),
                    "config_hash": self.cfg.fingerprint(), "code_version": code_version(), "created": now_iso(),
                    **manifest}
        with atomic_dir(final) as tmp:
            save_records(tmp / "accepted.parquet", accepted)
            save_records(tmp / "rejected.parquet", rejected)
            if extras is not None:
                extras(tmp)
            atomic_write_json(tmp / "manifest.json", manifest)  # last: its presence means the version is whole
        self.catalog.upsert("datasets", id=manifest["id"], run_id=self.id, path=str(final.resolve()),
                            accepted=len(accepted), rejected=len(rejected), manifest=manifest, created=manifest["created"])
        return final
