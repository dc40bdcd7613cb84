"""A real Ray cluster of one head node on this box, started with `ray start --head` the way an operator would,
for tests and benchmarks that join a cluster by address (`scale.ray_address`).

Every port is chosen free and the session lives in its own temp dir, so it never collides with another Ray on the
same machine. Teardown stops only this head: SIGTERM to its `ray start --block` process (which stops the
processes it started), then SIGKILL to any of its descendants still alive. `ray stop` is not used: it stops every
Ray cluster of this user on the machine, including other people's.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from pipeline.teachers.server import free_port

REPO = Path(__file__).resolve().parents[1]


class RayHead:
    """`with RayHead(num_cpus=2) as head: ... head.address ...` (GCS address: host:port)."""

    def __init__(self, num_cpus: int = 2, env: dict[str, str] | None = None, start_timeout_s: float = 180):
        self.num_cpus = num_cpus
        self.env = env or {}
        self.start_timeout_s = start_timeout_s
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        # Short path on purpose: Ray puts Unix sockets under it and they are limited to ~107 characters.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rayh-", dir="/tmp"))
        self.log_path = self.temp_dir / "ray-start.log"

    def start(self, attempts: int = 3) -> "RayHead":
        """Start the head; on a busy box Ray gives its raylet a fixed 30 s to register, so retry a failed start."""
        for attempt in range(attempts):
            try:
                return self._start_once()
            except RuntimeError:
                if attempt == attempts - 1:
                    raise
                self.port = free_port()
                self.address = f"127.0.0.1:{self.port}"
                self.temp_dir = Path(tempfile.mkdtemp(prefix="rayh-", dir="/tmp"))
                self.log_path = self.temp_dir / "ray-start.log"
        raise AssertionError("unreachable")

    def _start_once(self) -> "RayHead":
        ray_cli = Path(sys.executable).with_name("ray")
        cmd = [str(ray_cli), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={self.port}",
               f"--num-cpus={self.num_cpus}", "--include-dashboard=false", "--disable-usage-stats",
               f"--temp-dir={self.temp_dir}",
               # Fixed defaults (10001, 52365...) would collide with any other Ray on the box.
               f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
               f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
               f"--metrics-export-port={free_port()}"]
        # Workers import `pipeline` (the shard task) from this checkout, like nodes with the package installed.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               "RAY_USAGE_STATS_ENABLED": "0",
               # Ray turns token authentication on when ~/.ray/auth_token exists (left by any earlier Ray on the box),
               # and a driver without RAY_AUTH_MODE=token is then refused: this loopback head runs without it.
               "RAY_AUTH_MODE": "disabled", **self.env}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + self.start_timeout_s
        while "Ray runtime started" not in self.log_path.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log_path.read_text(errors="replace")[-3000:]
                self.stop()
                raise RuntimeError(f"`ray start --head` did not come up: {tail}")
            time.sleep(0.25)
        # Ray announces the box's own address (it avoids loopback for clusters); join by what it printed.
        for line in self.log_path.read_text(errors="replace").splitlines():
            if "ray start --address=" in line:
                self.address = line.split("--address=")[1].split("'")[1]
        return self

    def descendants(self) -> list[psutil.Process]:
        """The processes this head started (GCS, raylet, agents, workers)."""
        try:
            return psutil.Process(self.proc.pid).children(recursive=True) if self.proc else []
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> None:
        """Stop this head and everything it started; leave other Ray instances alone."""
        if self.proc is not None:
            kids = self.descendants()
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=10)
            _, alive = psutil.wait_procs(kids, timeout=10)
            for p in alive:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
            self.proc = None
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> "RayHead":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
