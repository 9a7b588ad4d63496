"""Servers the reliability tests start, on 127.0.0.1 only: an MLflow tracking server and a PostgreSQL for it.

Every process is started in a session of its own, so stopping it stops exactly what it started (MLflow's web
workers, PostgreSQL's backends) and nothing else on the machine.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent
STARTUP_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    with open(log, "a") as out:
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env or dict(os.environ), start_new_session=True
        )


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process and everything it started: a crash, not a shutdown."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def stop(proc: subprocess.Popen, grace_s: float = 15) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    kill_group(proc)


def wait_for_http(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer within {STARTUP_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


class MlflowServer:
    """`mlflow server` with served artifacts, on a fixed loopback port so that it can be killed and come back."""

    def __init__(self, backend_store_uri: str, folder: Path):
        self.backend_store_uri = backend_store_uri
        self.folder = folder
        self.artifacts = folder / "artifacts"
        self.log = folder / "server.log"
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> MlflowServer:
        # One web worker and no job runner: the tests send a few hundred requests.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.proc = start(
            [
                str(BIN / "mlflow"),
                "server",
                "--backend-store-uri",
                self.backend_store_uri,
                "--artifacts-destination",
                str(self.artifacts),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
            ],
            self.log,
            env,
        )
        wait_for_http(f"{self.uri}/health", self.proc, self.log)
        return self

    def kill(self) -> None:
        kill_group(self.proc)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None


# ---- PostgreSQL -------------------------------------------------------------------------------------
def postgres_bin() -> Path | None:
    """The server binaries of Debian's postgresql package (the newest installed), or of a PATH install."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class Postgres:
    """A throwaway PostgreSQL cluster in a temp folder, listening on a free loopback port; database `mlflow`.

    PostgreSQL refuses to run as root, so as root (CI) it runs as the `postgres` user the package creates."""

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.folder = Path(tempfile.mkdtemp(prefix="vpsde-pg-", dir="/tmp"))
        self.data = self.folder / "data"
        self.log = self.folder / "postgres.log"
        self.port = free_port()
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres", "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.uri = f"postgresql://mlflow@127.0.0.1:{self.port}/mlflow"

    def _run(self, *cmd: str) -> None:
        out = subprocess.run([*self.as_user, *cmd], capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"{cmd[0]} failed ({out.returncode}): {out.stdout[-2000:]}{out.stderr[-2000:]}")

    def start(self) -> Postgres:
        # Throwaway data: no fsync, trust on loopback only (listen_addresses is 127.0.0.1, the socket is ours).
        self._run(
            str(self.bindir / "initdb"), "-D", str(self.data), "-U", "mlflow", "-A", "trust", "-E", "UTF8", "--no-sync"
        )
        options = (
            f"-h 127.0.0.1 -p {self.port} -k {self.folder} -c fsync=off -c synchronous_commit=off "
            "-c full_page_writes=off"
        )
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-o",
            options,
            "-w",
            "-t",
            str(STARTUP_TIMEOUT_S),
            "start",
        )
        self._run(str(self.bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "mlflow", "mlflow")
        return self

    def stop(self) -> None:
        try:
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)
