"""The index cache: finds, builds (once, in the background for big versions) and reopens the sidecar index of
each dataset version, keyed on the version's folder and rebuilt when its files change."""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from pathlib import Path
from typing import Any

from pipeline.browse.index import DatasetIndex, build_index, count_rows, dataset_files, signature


class IndexStore:
    """Finds, builds and caches the index of each dataset version; big ones build in a background thread."""

    def __init__(self, index_dir: Path, sync_rows: int = 50_000):
        self.dir = Path(index_dir)
        self.sync_rows = sync_rows
        self._lock = threading.Lock()
        self._open: dict[str, DatasetIndex] = {}
        self.building: dict[str, dict[str, Any]] = {}  # key -> {"done": rows, "total": rows, "error": str|None}

    def path_for(self, dataset_dir: Path) -> Path:
        dataset_dir = Path(dataset_dir).resolve()
        digest = hashlib.sha256(str(dataset_dir).encode()).hexdigest()[:12]
        return self.dir / f"{dataset_dir.parent.parent.name}--{dataset_dir.name}--{digest}.sqlite"

    def get(self, dataset_dir: Path) -> DatasetIndex | None:
        """The ready index, or None while it builds (see `building`); builds small versions inline."""
        path = self.path_for(dataset_dir)
        key = str(path)
        files = dataset_files(dataset_dir)
        sig = signature(files)
        with self._lock:
            idx = self._open.get(key)
            if idx is not None and idx.signature == sig:
                return idx
            if key in self.building and not self.building[key].get("error"):
                return None
            if path.exists():
                try:
                    idx = DatasetIndex(path)
                except sqlite3.DatabaseError:
                    idx = None
                if idx is not None and idx.signature == sig:
                    self._open[key] = idx
                    return idx
            total = count_rows(files)
            state = {"done": 0, "total": total, "error": None}
            self.building[key] = state
        if total <= self.sync_rows:
            self._build(dataset_dir, path, state)
            return self._open.get(key)
        threading.Thread(target=self._build, args=(dataset_dir, path, state), daemon=True,
                         name=f"browse-index-{path.stem}").start()
        return None

    def progress(self, dataset_dir: Path) -> dict[str, Any] | None:
        return self.building.get(str(self.path_for(dataset_dir)))

    def _build(self, dataset_dir: Path, path: Path, state: dict[str, Any]) -> None:
        try:
            build_index(dataset_dir, path, progress=lambda n: state.__setitem__("done", n))
            idx = DatasetIndex(path)
            with self._lock:
                self._open[str(path)] = idx
                self.building.pop(str(path), None)
        except Exception as e:  # shown on the dataset page; a later visit retries
            state["error"] = f"{type(e).__name__}: {e}"
