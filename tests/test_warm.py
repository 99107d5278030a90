"""The warm runner (components/warm.py): a step served from a fork of a process that has its
libraries imported computes, prints and exits as the same step in a process of its own; an edit to
the code counts at once; killing the command ends the step.

The commands run in a project whose `components/` is a copy of this one, so that one test can edit
a step's code without touching the repository's; its own server folder, stopped at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from components import files, warm
from tests.projects import BIN, ROOT, SETTINGS, make_project

pytestmark = pytest.mark.slow
TIMINGS = ("seconds", "cpu_seconds", "train_seconds", "images_per_s")  # differ run to run


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Digits prepared and augmented, the project's code copied beside them, a server folder."""
    root = make_project(tmp_path_factory.mktemp("warm") / "project", SETTINGS, dvc=False)
    shutil.copytree(ROOT / "components", root / "components",
                    ignore=shutil.ignore_patterns("__pycache__"))
    folder = root.parent / "servers"
    yield root, folder
    subprocess.run([sys.executable, "-m", "components.warm", "stop"], cwd=root,
                   env=_env(folder), capture_output=True, timeout=60)


def _env(folder: Path, on: bool = True) -> dict[str, str]:
    """This environment, less pytest's name of the test (one server serves the whole module)."""
    mine = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    return {**mine, "PATH": f"{BIN}:{os.environ['PATH']}", "CNN_PIPELINE_WARM": str(int(on)),
            "CNN_PIPELINE_WARM_DIR": str(folder), "CNN_PIPELINE_WARM_IDLE_S": "600"}


def step(project, name: str, *args: str, on: bool = True) -> subprocess.CompletedProcess:
    root, folder = project
    return subprocess.run([sys.executable, "-m", f"components.{name}", *args], cwd=root,
                          env=_env(folder, on), capture_output=True, text=True, timeout=600)


def served(project) -> list[str]:
    """The commands the server ran, from its log."""
    logs = list(project[1].glob("*.log"))
    return [line for log in logs for line in log.read_text().splitlines() if " runs python -m " in
            line]


def wait_for_server(project, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not list(project[1].glob("*.sock")):
        assert time.monotonic() < deadline, "the warm runner's server did not start"
        time.sleep(0.2)


def result(done: subprocess.CompletedProcess) -> dict:
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    return {k: v for k, v in out.items() if k not in TIMINGS}


def test_a_served_step_computes_and_prints_what_a_cold_one_does(project):
    root, folder = project
    outputs = root / "outputs"
    cold = [result(step(project, name, on=False)) for name in ("train", "evaluate")]
    metrics = (outputs / "evaluate" / files.METRICS).read_text()
    assert not folder.exists() or not list(folder.glob("*.sock")), "started while off"

    first = step(project, "evaluate")  # starts the server, runs in its own process meanwhile
    assert result(first) == cold[1]
    wait_for_server(project)
    shutil.rmtree(outputs / "train")
    shutil.rmtree(outputs / "evaluate")
    warm_results = [result(step(project, name)) for name in ("train", "evaluate")]
    assert [line.split(" runs ")[1].split(" in ")[0] for line in served(project)] == [
        "python -m components.train ", "python -m components.evaluate "]
    assert warm_results == cold  # the same printed result; the run ids differ
    assert (outputs / "evaluate" / files.METRICS).read_text() == metrics


def test_a_served_step_fails_as_a_cold_one_does(project):
    args = ("--set", "paths.train=no/such/folder")
    cold, served_ = step(project, "evaluate", *args, on=False), step(project, "evaluate", *args)
    assert (served_.returncode, served_.stdout, served_.stderr) == (
        cold.returncode, cold.stdout, cold.stderr)
    assert cold.returncode == 2 and cold.stderr.startswith("error: ")
    assert "paths.train=no/such/folder in" in served(project)[-1]


def test_an_edit_to_a_step_counts_at_once(project):
    root, _ = project
    wait_for_server(project)
    code = root / "components" / "evaluate.py"
    before = code.read_text()
    try:
        code.write_text(before.replace("def main(argv: list[str] | None = None) -> None:\n",
                                       "def main(argv: list[str] | None = None) -> None:\n"
                                       "    print('edited', file=sys.stderr)\n"))
        code.write_text(code.read_text().replace("import csv\n", "import csv\nimport sys\n", 1))
        done = step(project, "evaluate")
    finally:
        code.write_text(before)
    assert done.returncode == 0 and done.stderr.startswith("edited"), done.stderr
    assert "components.evaluate" in served(project)[-1]


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_a_killed_command_ends_its_step(project, how):
    root, folder = project
    wait_for_server(project)
    before = len(served(project))
    command = subprocess.Popen([sys.executable, "-m", "components.train", "--set",
                                "train.epochs=500", "--set", "paths.train=outputs/long"],
                               cwd=root, env=_env(folder), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while len(served(project)) == before:
        assert time.monotonic() < deadline, "the server did not take the command"
        time.sleep(0.1)
    pid = int(served(project)[-1].split(" pid ")[1].split()[0])
    time.sleep(1)
    command.send_signal(how)
    assert command.wait(timeout=60) == -how  # ended as the step ended: by the same signal
    deadline = time.monotonic() + 30
    while _alive(pid):
        assert time.monotonic() < deadline, f"the step (pid {pid}) outlived its command"
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def test_stop_ends_the_server_and_removes_its_socket(project):
    root, folder = project
    wait_for_server(project)
    pids = [s["pid"] for s in warm.servers(folder)]
    assert pids
    subprocess.run([sys.executable, "-m", "components.warm", "stop"], cwd=root,
                   env=_env(folder), check=True, capture_output=True, timeout=60)
    deadline = time.monotonic() + 30
    while any(map(_alive, pids)) or list(folder.glob("*.sock")):
        assert time.monotonic() < deadline, "the server outlived stop, or left its socket"
        time.sleep(0.1)
    assert warm.servers(folder) == []


@pytest.mark.parametrize(("name", "value", "same"), [
    ("DVC_STAGE", "train", True),  # DVC's own, per stage
    ("PWD", "/elsewhere", True),
    ("CNN_PIPELINE_WARM_IDLE_S", "5", True),
    ("OMP_NUM_THREADS", "1", False),  # read when torch loads
    ("MLFLOW_TRACKING_URI", "http://elsewhere", False),
    ("SOMETHING_ELSE", "1", False),
])
def test_which_variables_need_a_server_of_their_own(monkeypatch, name, value, same):
    before = warm.fingerprint()
    monkeypatch.setenv(name, value)
    assert (warm.fingerprint() == before) is same


def test_another_folder_of_the_project_shares_the_server(monkeypatch, tmp_path):
    """`dvc exp run --temp` and DVC's queue run each experiment in a copy of the project: the
    copies' steps import their own code in the child, and share one server."""
    before = warm.fingerprint()
    monkeypatch.chdir(tmp_path)
    assert warm.fingerprint() == before


def test_what_the_server_imports_ahead():
    ahead = warm.libraries()
    assert {"torch", "mlflow", "sklearn.metrics", "matplotlib.figure", "timm", "onnx"} <= set(ahead)
    assert set(warm.LAZY) <= set(ahead)
    assert not [name for name in ahead if name.split(".")[0] in ("components", "flows",
                                                                 "onnxruntime", "os", "json")]
