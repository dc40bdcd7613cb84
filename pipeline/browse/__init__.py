"""`distill browse`: a read-only web page for every run, dataset version and record."""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import DistillError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def allowed_hosts(host: str) -> list[str]:
    """Host headers to accept: on loopback only loopback names (a DNS-rebinding page cannot read the data)."""
    if host in ("0.0.0.0", "::", ""):
        return ["*"]
    return sorted({*LOOPBACK, "[::1]", host})


def create_app(runs_dir: str | Path, index_dir: str | Path | None = None, host: str = "127.0.0.1"):
    """The Starlette app over a runs folder (see pipeline.browse.app)."""
    from pipeline.browse.app import create_app as _create

    return _create(runs_dir, index_dir=index_dir, allowed_hosts=allowed_hosts(host))


def serve(runs_dir: str | Path = "runs", host: str = "127.0.0.1", port: int = 8765,
          index_dir: str | Path | None = None) -> None:
    """Serve the browser until interrupted; binds loopback unless told otherwise."""
    import uvicorn

    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise DistillError(f"Runs folder {runs_dir} does not exist. Pass --runs-dir pointing at the folder that holds "
                           f"your run folders and catalog.sqlite (runs_dir in the config).")
    if host not in LOOPBACK:
        print(f"distill browse: warning: binding {host}; anyone who can reach this address can read every record.")
    print(f"distill browse: http://{'[' + host + ']' if ':' in host else host}:{port}/  (runs: {runs_dir.resolve()})")
    uvicorn.run(create_app(runs_dir, index_dir, host), host=host, port=port, log_level="warning")
