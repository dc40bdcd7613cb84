"""What the browser reads from a runs folder: runs, their dataset versions, reports and eval outputs. Every
name that arrives in a URL is checked here, and every file path is resolved and kept inside its run folder."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path
from typing import Any

import yaml

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
# Files a page may link to; served with a fixed content type, never as HTML (an .html or .svg could run script).
SERVABLE = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".md": "text/plain; charset=utf-8",
            ".json": "text/plain; charset=utf-8", ".jsonl": "text/plain; charset=utf-8",
            ".yaml": "text/plain; charset=utf-8", ".txt": "text/plain; charset=utf-8"}


class NotFound(Exception):
    """A run, dataset, record or file the URL names that does not exist (or may not be served)."""


def check_name(name: str, what: str) -> str:
    """A run id or dataset name from a URL: one plain path segment, nothing else."""
    if not isinstance(name, str) or not NAME.match(name) or ".." in name:
        raise NotFound(f"no {what} named {name!r}")
    return name


def inside(root: Path, *parts: str) -> Path:
    """root/parts resolved (symlinks too), refused unless it stays inside root."""
    root = root.resolve()
    path = root.joinpath(*parts).resolve()
    if path != root and root not in path.parents:
        raise NotFound("path outside the run folder")
    return path


def read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return default


class RunsFolder:
    """A runs/ folder: run folders, their dataset versions and the catalog beside them."""

    def __init__(self, runs_dir: Path):
        self.root = Path(runs_dir).resolve()

    def catalog(self, table: str) -> list[dict[str, Any]]:
        """Rows of a catalog table, opened read-only; an absent or locked catalog reads as empty."""
        path = self.root / "catalog.sqlite"
        if not path.exists():
            return []
        try:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
            conn.row_factory = sqlite3.Row
            try:
                return [dict(r) for r in conn.execute(f"SELECT * FROM {table}")]
            finally:
                conn.close()
        except sqlite3.Error:
            return []

    def run_dir(self, run_id: str) -> Path:
        path = inside(self.root, check_name(run_id, "run"))
        if not path.is_dir() or not ((path / "config.yaml").exists() or (path / "status.json").exists()):
            raise NotFound(f"no run named {run_id!r}")
        return path

    def runs(self) -> list[dict[str, Any]]:
        """Every run folder, newest first, with its status and catalog summary."""
        catalog = {r["id"]: r for r in self.catalog("runs")}
        out = []
        for d in self.root.iterdir() if self.root.exists() else []:
            if not d.is_dir() or not NAME.match(d.name) or not ((d / "config.yaml").exists() or (d / "status.json").exists()):
                continue
            status = read_json(d / "status.json", {}) or {}
            row = catalog.get(d.name, {})
            summary = status.get("summary") or read_json_text(row.get("summary")) or {}
            out.append({"id": d.name, "name": row.get("name", ""), "state": status.get("state", row.get("state", "?")),
                        "created": status.get("created", row.get("created", "")), "updated": status.get("updated", ""),
                        "summary": summary, "error": status.get("error"), "datasets": self.dataset_names(d.name)})
        return sorted(out, key=lambda r: (r["created"] or "", r["id"]), reverse=True)

    def dataset_names(self, run_id: str) -> list[str]:
        base = self.run_dir(run_id) / "datasets"
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if p.is_dir() and NAME.match(p.name) and (p / "manifest.json").exists())

    def dataset_dir(self, run_id: str, name: str) -> Path:
        path = inside(self.run_dir(run_id), "datasets", check_name(name, "dataset version"))
        if not (path / "manifest.json").exists():
            raise NotFound(f"no dataset version {run_id}/{name}")
        return path

    def dataset_by_id(self, dataset_id: str) -> tuple[str, str]:
        """'run/name' (the manifest id) -> (run, name), checked."""
        run_id, _, name = str(dataset_id).partition("/")
        self.dataset_dir(run_id, name)
        return run_id, name

    def all_datasets(self) -> list[str]:
        """Every dataset version id ('run/name'), from the folders alone (cheap enough for every page)."""
        out = []
        for d in sorted(self.root.iterdir()) if self.root.exists() else []:
            if d.is_dir() and NAME.match(d.name) and (d / "datasets").is_dir():
                try:
                    out += [f"{d.name}/{n}" for n in self.dataset_names(d.name)]
                except NotFound:  # a folder that is not a run
                    continue
        return out

    def manifest(self, run_id: str, name: str) -> dict[str, Any]:
        return read_json(self.dataset_dir(run_id, name) / "manifest.json", {}) or {}

    def config(self, run_id: str) -> tuple[str, dict[str, Any]]:
        """The run's config.yaml as text and as a dict (read as YAML, so older configs still show)."""
        path = self.run_dir(run_id) / "config.yaml"
        if not path.exists():
            return "", {}
        text = path.read_text(encoding="utf-8", errors="replace")
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError:
            data = {}
        return text, data if isinstance(data, dict) else {}

    def plots(self, run_id: str) -> list[str]:
        """Image files of the run and its dataset versions, as paths relative to the run folder."""
        run = self.run_dir(run_id)
        found = sorted(p.relative_to(run).as_posix() for p in run.glob("*.png"))
        for name in self.dataset_names(run_id):
            found += sorted(p.relative_to(run).as_posix() for p in (run / "datasets" / name).glob("*.png"))
        return found

    def file(self, run_id: str, rel: str) -> tuple[Path, str]:
        """A servable file inside the run folder and its content type; anything else is NotFound."""
        if not rel or rel.startswith(("/", "\\")) or "\\" in rel or "\x00" in rel \
                or any(part in ("", ".", "..") or part.startswith(".") for part in rel.split("/")):
            raise NotFound("bad file path")
        path = inside(self.run_dir(run_id), *rel.split("/"))
        kind = SERVABLE.get(path.suffix.lower())
        if kind is None or not path.is_file():
            raise NotFound(f"no servable file {rel!r}")
        return path, kind

    def eval_outputs(self, run_id: str) -> list[dict[str, Any]]:
        path = self.run_dir(run_id) / "eval" / "outputs.jsonl"
        if not path.exists():
            return []
        rows = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                rows.append(obj)
        return rows


def read_json_text(text: Any) -> Any:
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return None
