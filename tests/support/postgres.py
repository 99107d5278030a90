"""A throwaway PostgreSQL server for tests: the production backend of the MLflow and Prefect
servers, started on a free loopback port from this machine's own PostgreSQL.

`postgres_server(databases)` finds `initdb` and `pg_ctl` (PATH, then Debian's
/usr/lib/postgresql/<version>/bin); when they are missing and we are root it installs Debian's
`postgresql` with apt-get, and otherwise fails saying what to install. The cluster lives in a temp
folder (data, log, unix socket) that is removed afterwards; it listens on 127.0.0.1 only, with a
password user made for this run. PostgreSQL refuses to run as root, so as root the server runs
as the `postgres` OS user (runuser). Yields a `Postgres` whose `url(db, driver)` builds the
SQLAlchemy addresses MLflow (psycopg2) and Prefect (asyncpg) take.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support.servers import free_port

DEBIAN_BINS = "/usr/lib/postgresql/*/bin"
INSTALL_HINT = ("PostgreSQL's server programs (initdb, pg_ctl) are needed: install them "
                "(Debian/Ubuntu: `apt-get install postgresql`; they land in "
                "/usr/lib/postgresql/<version>/bin) or put their folder on PATH")
OS_USER = "postgres"  # the account Debian's package creates; servers may not run as root


@dataclass(frozen=True)
class Postgres:
    port: int
    user: str
    password: str
    folder: Path  # data/, server.log and the unix socket

    def url(self, database: str, driver: str = "psycopg2") -> str:
        """An SQLAlchemy address: driver psycopg2 (MLflow) or asyncpg (Prefect). Named always:
        SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3, which is not installed."""
        return f"postgresql+{driver}://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    def dsn(self, database: str) -> str:
        """The libpq address, for psycopg2.connect and asyncpg.connect themselves."""
        return self.url(database).replace("+psycopg2", "", 1)

    def log(self) -> str:
        return (self.folder / "server.log").read_text(errors="replace")


def find_bin() -> Path | None:
    """The folder holding initdb and pg_ctl: on PATH first, else Debian's newest version."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(os.path.realpath(on_path)).parent
    by_version = sorted(glob.glob(DEBIAN_BINS), key=lambda p: int(Path(p).parent.name)
                        if Path(p).parent.name.isdigit() else 0)
    found = [Path(p) for p in by_version if (Path(p) / "initdb").is_file()]
    return found[-1] if found else None


def install() -> None:
    """apt-get install Debian's postgresql (root only); says so, since it changes the system."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise RuntimeError(f"{INSTALL_HINT}; not root with apt-get here, so the tests cannot "
                           "install it themselves")
    print("PostgreSQL not found: installing Debian's postgresql with apt-get (root)",
          file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"],
                ["apt-get", "install", "-y", "--no-install-recommends", "postgresql"]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{INSTALL_HINT}; `{' '.join(cmd)}` failed:\n"
                               f"{done.stdout[-2000:]}{done.stderr[-2000:]}")


def server_bin() -> Path:
    found = find_bin()
    if found is None:
        install()
        found = find_bin()
    if found is None:
        raise RuntimeError(f"{INSTALL_HINT}; apt-get installed postgresql but no initdb "
                           f"appeared under {DEBIAN_BINS}")
    return found


def _as_owner(cmd: list[str]) -> list[str]:
    """`cmd` run as the postgres OS user when we are root (PostgreSQL refuses root)."""
    return ["runuser", "-u", OS_USER, "--", *cmd] if os.geteuid() == 0 else cmd


def _run(cmd: list[str], folder: Path) -> None:
    # cwd: the postgres user may not be allowed into ours.
    done = subprocess.run(_as_owner(cmd), cwd=folder, capture_output=True, text=True)
    if done.returncode != 0:
        log = folder / "server.log"
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout}{done.stderr}"
                           + (log.read_text()[-3000:] if log.is_file() else ""))


def _make_folder() -> Path:
    # Not under pytest's tmp_path: its parents are root-only (0700), closed to the postgres user.
    folder = Path(tempfile.mkdtemp(prefix="cnn-pg-"))
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam(OS_USER)
        except KeyError as err:
            shutil.rmtree(folder)
            raise RuntimeError(f"no `{OS_USER}` OS user to run PostgreSQL as (root may not); "
                               "Debian's postgresql package creates it") from err
        os.chown(folder, owner.pw_uid, owner.pw_gid)
    return folder


def _create_databases(pg: Postgres, databases: Sequence[str]) -> None:
    import psycopg2  # the driver MLflow's server uses: the same path its connections take

    conn = psycopg2.connect(pg.dsn("postgres"))
    conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
    try:
        with conn.cursor() as cur:
            for name in databases:
                cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()


@contextmanager
def postgres_server(databases: Sequence[str] = ("mlflow", "prefect")) -> Iterator[Postgres]:
    """A fresh PostgreSQL cluster on 127.0.0.1 holding `databases`; stopped and removed after."""
    bin_dir = server_bin()
    folder = _make_folder()
    pg = Postgres(port=free_port(), user="cnn", password=secrets.token_hex(16), folder=folder)
    data = folder / "data"
    started = False
    try:
        pwfile = folder / "pwfile"
        pwfile.write_text(pg.password + "\n")
        if os.geteuid() == 0:
            os.chown(pwfile, pwd.getpwnam(OS_USER).pw_uid, -1)
        pwfile.chmod(0o600)
        _run([str(bin_dir / "initdb"), "-D", str(data), "--username", pg.user,
              "--pwfile", str(pwfile), "--auth", "scram-sha-256", "--encoding", "UTF8",
              "--locale", "C", "--no-sync"], folder)
        pwfile.unlink()
        # fsync off: a test cluster outlives nothing, and it halves commit latency on this disk.
        options = (f"-c listen_addresses=127.0.0.1 -p {pg.port} -k {folder} -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off")
        _run([str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(folder / "server.log"),
              "-o", options, "-w", "-t", "60", "start"], folder)
        started = True
        _create_databases(pg, databases)
        yield pg
    finally:
        if started:
            _run([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "60",
                  "stop"], folder)
        shutil.rmtree(folder, ignore_errors=True)
