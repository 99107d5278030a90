"""The warm runner: `python -m components.<step>` starts in a fork of a process that has already
imported the libraries the steps use, so a step costs its own work, not seconds of imports.

Each of the six DVC steps imports torch, mlflow, scikit-learn, matplotlib, kornia, timm, onnx in a
process of its own (`dvc repro` runs one per stage): seconds before any work, in every stage of
every run (bench/RESULTS.md, "The inner loop"). With the warm runner, the first step of a session
starts, in the background, a server process that imports them once and then waits; each step's
command line, once the preflight has accepted its settings and data (components/preflight.py),
hands itself over to that server, which forks a child to run it: the child takes the command's
standard input, output and error, working directory, environment and umask, runs the module as
`python -m` would, and its exit status becomes the command's. Signals the command gets (Ctrl-C,
SIGTERM) are passed on to the child; a command that is killed takes its child with it.

What stays the same: the step's outputs, messages and exit codes. Only third-party libraries are
imported ahead (which ones, `step_code.libraries` computes from the steps' imports, plus LAZY);
project modules are imported afresh in each child, from the command's folder, so an edit to the
code counts at once and one server serves every copy of the project (`dvc exp run --temp` and
the queue run in copies). One server serves one interpreter and one environment: another of
either (the installed packages, a variable; not DVC's own DVC_* nor PWD, OLDPWD, SHLVL) gets a
server of its own. A server ends after `CNN_PIPELINE_WARM_IDLE_S` seconds (default 900) without a
step.

Where it does not start, a step runs as before, in its own process: off (`CNN_PIPELINE_WARM=0`),
not Linux, the first step of a session (it starts the server and runs cold beside it), a server
that found itself unsafe to fork (importing initialised CUDA; it leaves `<key>.unsafe` saying so,
and no other is started for that key).
A server that is still importing is waited for, up to STARTING_WAIT_S.

    python -m components.warm status   # the servers of this user, their pid and project
    python -m components.warm stop     # ends them (steps they run finish first)

Servers live in `CNN_PIPELINE_WARM_DIR` (default `<tmp>/cnn-pipeline-warm-<uid>`, mode 0700): per
server a socket, a lock (held while it lives; it holds the pid and project) and its log.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import errno
import fcntl
import gc
import hashlib
import importlib
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from components import step_code

SWITCH = "CNN_PIPELINE_WARM"  # "0" turns the warm runner off
DIR = "CNN_PIPELINE_WARM_DIR"
IDLE = "CNN_PIPELINE_WARM_IDLE_S"
IDLE_S = 900.0
STARTING_WAIT_S = 60.0
ROOT = step_code.ROOT
# The environment variables that may differ between two steps of one server: DVC sets them per
# stage, the shell per command; no library reads them when it is imported.
PER_COMMAND = ("PWD", "OLDPWD", "SHLVL", "_", SWITCH, DIR, IDLE)
PER_COMMAND_PREFIXES = ("DVC_",)
# Imported on first use inside the libraries, so no import statement of ours names them:
# torch._dynamo (every optimizer's constructor), mlflow's SQL store (the client on mlflow.db),
# matplotlib's Agg canvas (savefig), torch.onnx (export).
LAZY = ("torch._dynamo", "mlflow.store.tracking.sqlalchemy_store",
        "matplotlib.backends.backend_agg", "torch.onnx")
# Left to the step: onnxruntime starts a thread of its own when imported, which a fork does not
# copy and onnxruntime is not known to restart.
NOT_AHEAD = ("onnxruntime",)


@dataclass(frozen=True)
class Place:
    """A server's files: its socket, its lock (the pid and project inside) and its log."""

    folder: Path
    key: str

    @property
    def socket(self) -> Path:
        return self.folder / f"{self.key}.sock"

    @property
    def lock(self) -> Path:
        return self.folder / f"{self.key}.lock"

    @property
    def log(self) -> Path:
        return self.folder / f"{self.key}.log"

    @property
    def unsafe(self) -> Path:
        """Written by a server that found itself unsafe to fork: none is started again."""
        return self.folder / f"{self.key}.unsafe"


# --- the command's side --------------------------------------------------------------------

def delegate(module: str) -> None:
    """Run this `python -m <module>` command in the warm server and end this process with its
    exit status; return, to run it here, when the warm runner is off or cannot serve yet."""
    place = _place()
    if place is None or place.unsafe.exists():
        return
    conn = _connect(place.socket)
    if conn is None:
        if not _starting(place):
            _start(place)
            return
        conn = _wait_for(place)
        if conn is None:
            return
    with conn:
        try:
            pid = _hand_over(conn, module)
        except OSError:
            return  # not taken: run here
        if pid is None:
            return
        status = _wait(conn, pid)
    _end_as(status)


def enabled() -> bool:
    return (os.environ.get(SWITCH, "1") != "0" and sys.platform == "linux"
            and hasattr(os, "fork"))


def _place() -> Place | None:
    if not enabled():
        return None
    folder = _folder()
    return None if folder is None else Place(folder, fingerprint())


def _folder() -> Path | None:
    """The servers' folder, made when missing; None where another user could reach it."""
    folder = Path(os.environ.get(DIR) or Path(tempfile.gettempdir()) / f"cnn-pipeline-warm-"
                  f"{os.getuid()}")
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = folder.stat()
    except OSError:
        return None
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        return None
    return folder


def fingerprint() -> str:
    """What a server must share with a command it serves: this file, the interpreter and its
    flags, the installed packages (their folders' change times) and the environment; not the
    project's folder (the child imports the project from the command's)."""
    here = {ROOT, Path.cwd().resolve()}  # the project's and the command's folders change a lot
    packages = {p: os.stat(p).st_mtime_ns for p in sys.path
                if p and os.path.isdir(p) and Path(p).resolve() not in here}
    env = {k: v for k, v in os.environ.items()
           if k not in PER_COMMAND and not k.startswith(PER_COMMAND_PREFIXES)}
    facts = [hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
             sys.executable, sys.version, repr(sys.flags), sys.warnoptions,
             sorted(map(str, sys._xoptions.items())),
             sorted(packages.items()), sorted(env.items())]
    return hashlib.sha256(json.dumps(facts).encode()).hexdigest()[:20]


def _connect(path: Path) -> socket.socket | None:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
    except OSError:
        conn.close()
        return None
    return conn


def _starting(place: Place) -> bool:
    """Whether a server holds the lock (it is importing, or about to listen)."""
    try:
        with open(place.lock, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return True  # cannot tell: do not start another
    return False


def _start(place: Place) -> None:
    with open(place.log, "w") as log:
        subprocess.Popen([sys.executable, "-m", "components.warm", "serve", place.key],
                         cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                         start_new_session=True)


def _wait_for(place: Place) -> socket.socket | None:
    deadline = time.monotonic() + STARTING_WAIT_S
    while time.monotonic() < deadline:
        conn = _connect(place.socket)
        if conn is not None or not _starting(place):
            return conn
        time.sleep(0.05)
    return None


def _hand_over(conn: socket.socket, module: str) -> int | None:
    """Send the command (its stdio as file descriptors); the pid of the child that runs it, from
    which on signals to this process go to it; None when the server did not take it."""
    sys.stdout.flush()
    sys.stderr.flush()
    for fd in (0, 1, 2):
        os.fstat(fd)  # a closed one: OSError, run here
    request = {"module": module, "argv": sys.argv[1:], "cwd": os.getcwd(),
               "env": dict(os.environ), "umask": _umask()}
    socket.send_fds(conn, [_frame(request)], [0, 1, 2])
    child = _read(conn)
    if child is None:
        return None
    pid = child["pid"]
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, lambda signum, _frame, pid=pid: _pass_on(pid, signum))
    return pid


def _wait(conn: socket.socket, pid: int) -> int | None:
    """The child's wait status; None when the server went away first (the child is ended)."""
    done = _read(conn)
    if done is None:
        _pass_on(pid, signal.SIGKILL)
        return None
    return done["status"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _pass_on(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _end_as(status: int | None) -> None:
    """End this process as the child ended: its exit code, or killed by the same signal."""
    if status is None:
        print("error: the warm runner stopped while the step ran; run the command again "
              f"(or with {SWITCH}=0)", file=sys.stderr)
        os._exit(1)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    os._exit(os.waitstatus_to_exitcode(status))


def _frame(message: dict) -> bytes:
    data = json.dumps(message).encode()
    return struct.pack("!I", len(data)) + data


def _read(conn: socket.socket) -> dict | None:
    head = _exactly(conn, 4)
    if head is None:
        return None
    data = _exactly(conn, struct.unpack("!I", head)[0])
    return None if data is None else json.loads(data)


def _exactly(conn: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        part = conn.recv(size - len(data))
        if not part:
            return None
        data += part
    return data


# --- the server's side ---------------------------------------------------------------------

@dataclass
class Child:
    pid: int
    conn: socket.socket


def serve(key: str) -> dict | None:
    """Import ahead, then fork a child per command until idle; returns only in a child, with the
    command it is to run (the server itself ends with SystemExit)."""
    place = Place(_place_folder(), key)
    lock = open(place.lock, "a+")  # noqa: SIM115 - held for the server's life
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(0) from None  # another server of this key is starting
    lock.truncate(0)
    lock.write(json.dumps({"pid": os.getpid(), "project": str(ROOT)}))
    lock.flush()
    unsafe = _import_ahead()
    if unsafe:
        _log(f"not serving: {unsafe}")
        place.unsafe.write_text(f"{unsafe}\n")
        raise SystemExit(0)
    gc.collect()
    gc.freeze()  # the children share these pages instead of copying them at their first collection
    listener = _listen(place.socket)
    _log(f"serving {ROOT} at {place.socket}")
    return _loop(place, lock, listener, os.stat(place.socket).st_ino)


def _place_folder() -> Path:
    folder = _folder()
    if folder is None:
        raise SystemExit(f"{DIR}: the servers' folder cannot be made, or others can reach it")
    return folder


def libraries() -> list[str]:
    """What the server imports ahead: the steps' third-party imports and LAZY."""
    paths = {path for step in step_code.STEPS for path in step_code.step_code(f"components.{step}")}
    names = step_code.libraries(*sorted(paths), "components/tracking.py")
    return [name for name in [*names, *LAZY] if name.split(".")[0] not in NOT_AHEAD]


def _import_ahead() -> str | None:
    """Import `libraries()`; what makes this process unsafe to fork, if anything."""
    started, names = time.perf_counter(), libraries()
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:  # a name of an attribute, or an optional extra
            pass
        except Exception as err:  # noqa: BLE001 - the step that needs it will say so itself
            _log(f"importing {name} failed: {err!r}")
    _log(f"imported {len(names)} names in {time.perf_counter() - started:.1f} s")
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return "CUDA was initialised while importing; a fork cannot use it"
    return None


def _log(line: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {line}", file=sys.stderr, flush=True)


def _listen(path: Path) -> socket.socket:
    """Listen at a temporary name, then move it into place: a command finds a socket that
    answers, or none."""
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(temporary))
    listener.listen(16)
    os.replace(temporary, path)
    return listener


def _loop(place: Place, lock, listener: socket.socket, inode: int) -> dict | None:
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    stopping: list[bool] = []
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    children: dict[int, Child] = {}
    idle_s = float(os.environ.get(IDLE) or IDLE_S)
    while children or not stopping:
        ready, _, _ = select.select([wake_r, *([] if stopping else [listener]),
                                     *(c.conn for c in children.values())], [], [],
                                    None if children else idle_s)
        if not ready and not children:
            break  # idle
        if wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 512)
            _reap(children)
        for child in [c for c in children.values() if c.conn in ready]:
            _pass_on(child.pid, signal.SIGKILL)  # its command is gone (a command says nothing)
        if listener in ready:
            request = _accept(listener, children)
            if request is not None:  # in the child
                signal.set_wakeup_fd(-1)
                os.close(wake_r)
                os.close(wake_w)
                lock.close()
                listener.close()
                return request
    with contextlib.suppress(OSError):  # remove the socket, when it is still this server's
        if os.stat(place.socket).st_ino == inode:
            place.socket.unlink()
    raise SystemExit(0)


def _reap(children: dict[int, Child]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        child = children.pop(pid, None)
        _log(f"pid {pid} ended: exit code {os.waitstatus_to_exitcode(status)}")
        if child is not None:
            with contextlib.suppress(OSError):
                child.conn.sendall(_frame({"status": status}))
            child.conn.close()


def _accept(listener: socket.socket, children: dict[int, Child]) -> dict | None:
    """Take a command and fork its child; in the child, the command (with its stdio installed)."""
    conn, _ = listener.accept()
    try:
        conn.settimeout(10)
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        if struct.unpack("3i", creds)[1] != os.getuid():
            raise OSError(errno.EPERM, "another user")
        message, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
        size = struct.unpack("!I", message[:4])[0]
        rest = _exactly(conn, 4 + size - len(message)) if len(message) < 4 + size else b""
        request = json.loads(message[4:] + (rest or b""))
        conn.settimeout(None)
    except (OSError, ValueError):
        conn.close()
        return None
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        for child in children.values():
            child.conn.close()
        conn.close()
        return {**request, "fds": fds}
    for fd in fds:
        os.close(fd)
    _log(f"pid {pid} runs python -m {request['module']} {' '.join(request['argv'])} in "
         f"{request['cwd']}")
    conn.sendall(_frame({"pid": pid}))
    children[pid] = Child(pid, conn)
    return None


def become(request: dict) -> None:
    """In a fresh child: take on the command's stdio, directory, environment and arguments, and
    forget the project modules the server imported (from the folder it was started in)."""
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for target, fd in enumerate(request["fds"]):
        os.dup2(fd, target)
        os.close(fd)
    sys.stdout.reconfigure(line_buffering=os.isatty(1))
    os.chdir(request["cwd"])
    os.umask(request["umask"])
    os.environ.clear()
    os.environ.update(request["env"])
    project = f"{ROOT}{os.sep}"
    for name, module in list(sys.modules.items()):
        if name != "__main__" and (getattr(module, "__file__", None) or "").startswith(project):
            del sys.modules[name]
    sys.path[0] = request["cwd"]
    if "numpy" in sys.modules:  # its global generator would be the server's in every child
        sys.modules["numpy"].random.seed()
    sys.argv = [request["module"], *request["argv"]]
    from components import cli

    atexit.register(cli.quick_exit)  # as the preflight does in a cold start: it runs last


# --- status and stop -----------------------------------------------------------------------

def servers(folder: Path) -> list[dict]:
    """The servers alive in `folder` (those holding their lock): key, pid, project."""
    found = []
    for lock_path in sorted(folder.glob("*.lock")):
        with open(lock_path, "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.seek(0)
                with contextlib.suppress(ValueError):
                    found.append({"key": lock_path.stem, **json.loads(lock.read())})
    return found


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(prog="python -m components.warm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["status", "stop", "serve"])
    parser.add_argument("key", nargs="?", help="(serve) the fingerprint it serves")
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(args.key)
    for server in servers(_place_folder()):
        print(f"{server['pid']}\t{server['project']}\t{server['key']}")
        if args.command == "stop":
            _pass_on(server["pid"], signal.SIGTERM)
    return None


if __name__ == "__main__":
    _request = main()
    if _request is not None:  # a child of the server: run the command as `python -m` would
        become(_request)
        del _request
        import runpy

        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
