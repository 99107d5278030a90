"""Real servers for tests: a Prefect server and an MLflow tracking server on loopback, free ports.

Each is a context manager that starts the server from this environment's own executables, waits
until it answers, yields its address, and stops it (and its children) afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]  # the project, for its params.yaml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(url: str) -> str | None:
    """The body at `url` if it answers 200, else None."""
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.read().decode() if reply.status == 200 else None
    except OSError:
        return None


@contextmanager
def _server(cmd: list[str], health: str, log: Path, env: dict, timeout: float,
            cwd: Path | None = None) -> Iterator[None]:
    with open(log, "w") as out:
        # A process group of its own, so the server's workers are stopped with it.
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while answers(health) is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{cmd[0]} did not start; its log:\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        yield
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextmanager
def prefect_server(home: Path, timeout: float = 180,
                   database_url: str | None = None) -> Iterator[str]:
    """A Prefect server with its own SQLite database under `home` (or the database at
    `database_url`, e.g. postgresql+asyncpg://...); yields its API address."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_DATABASE_CONNECTION_URL":
            database_url or f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)
    api = f"http://127.0.0.1:{port}/api"
    cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with _server(cmd, f"{api}/health", home / "server.log", env, timeout):
        yield api


@contextmanager
def mlflow_server(root: Path, port: int | None = None, timeout: float = 120,
                  backend_store_uri: str | None = None, workers: int = 1) -> Iterator[str]:
    """An MLflow server (SQLite backend under `root`, or `backend_store_uri`, e.g.
    postgresql+psycopg2://...; artifacts proxied into `root`); yields its URI."""
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    uri = f"http://127.0.0.1:{port}"
    cmd = [
        str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
        "--artifacts-destination", str(root / "artifacts"), "--serve-artifacts",
        "--workers", str(workers),
    ]
    # From the environment, like `make stack-up`: a database password stays off the command line.
    env = {**os.environ,
           "MLFLOW_BACKEND_STORE_URI": backend_store_uri or f"sqlite:///{root / 'mlflow.db'}"}
    with _server(cmd, f"{uri}/health", root / "server.log", env, timeout):
        yield uri


@contextmanager
def prefect_worker(pool: str, cwd: Path, env: dict, name: str, limit: int | None = None,
                   timeout: float = 120) -> Iterator[subprocess.Popen]:
    """A process worker on `pool`, started in `cwd` (its flow runs' working_dir is relative to
    it); yields the process once the server lists the worker as online."""
    cmd = [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--name", name]
    if limit:
        cmd += ["--limit", str(limit)]
    with open(cwd / f"{name}.log", "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while "started!" not in (cwd / f"{name}.log").read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker {name} did not start:\n"
                                   f"{(cwd / f'{name}.log').read_text()[-4000:]}")
            time.sleep(0.5)
        yield proc
    finally:
        _stop(proc)


def api_post(api: str, path: str, body: dict) -> list | dict:
    """POST `body` as JSON to the Prefect API at `api` + `path`; the decoded reply."""
    request = urllib.request.Request(f"{api}{path}", data=json.dumps(body).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as reply:
        return json.loads(reply.read())


@contextmanager
def model_server(model_uri: str, root: Path, env: dict, timeout: float = 300) -> Iterator[str]:
    """`cnn-pipeline serve` (MLflow's model server, --env-manager local: this environment) of
    `model_uri` on a free loopback port, started in `root`; yields its address."""
    root.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{free_port()}"
    cmd = [str(BIN / "cnn-pipeline"), "serve", "--params", str(ROOT / "params.yaml"),
           "--model", model_uri, "--port", url.rsplit(":", 1)[1]]
    # The scoring server's command is `uvicorn ...` through a shell: this environment first.
    env = {**env, "PATH": f"{BIN}:{env.get('PATH', os.environ['PATH'])}"}
    with _server(cmd, f"{url}/ping", root / "model-server.log", env, timeout, cwd=root):
        yield url
