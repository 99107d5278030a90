"""The inner loop: a typo or a missing data folder is refused by every command line before torch,
timm, mlflow or scikit-learn is imported, with the message the step itself gives; a built-in model
is made without timm yet stays in timm's registry; a step run as a program skips the interpreter's
last collections but not its exit handlers; the worker's pull step installs the lock only
when it changed; `make stack-down` stops what the stack started, worker first, SIGKILL after the
grace period. Timings are bench/bench_loop.py's, never asserted here.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cnn_pipeline import cli
from cnn_pipeline.commands import COMMANDS
from components.core.params import ParamsError, load_params

PROJECT = Path(__file__).resolve().parents[1]
HEAVY = {"torch", "timm", "torchvision", "mlflow", "sklearn", "matplotlib", "prefect"}
ENTRY_POINTS = {  # the commands that read settings, with what their command line needs besides
    "prepare": [],
    "augment": [],
    "train": [],
    "evaluate": [],
    "register": [],
    "export": [],
    "predict": ["--folder", "inbox"],
    "pipeline": [],
    "search": [],
}
STEPS = [c for c in ENTRY_POINTS if COMMANDS[c].step and c != "predict"]  # the pipeline's


def command_line(cwd: Path, *args: str) -> tuple[int, str, set[str]]:
    """`python -X importtime args` in a fresh interpreter: exit code, what it said on stderr, and
    the top-level packages it imported."""
    done = subprocess.run([sys.executable, "-X", "importtime", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)
    said, imported = [], set()
    for line in done.stderr.splitlines():
        if line.startswith("import time:"):
            imported.add(line.rsplit("|", 1)[1].strip().split(".")[0])
        else:
            said.append(line)
    return done.returncode, "\n".join(said), imported


def in_process_error(main, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err.strip()


@pytest.mark.parametrize("module", ENTRY_POINTS)
@pytest.mark.parametrize("override", ["train.optimizer=adam", "train.optimiser=adamw"])
def test_a_bad_setting_is_refused_before_any_heavy_import(tmp_path, monkeypatch, module,
                                                          override):
    (tmp_path / "params.yaml").write_text("")
    monkeypatch.chdir(tmp_path)
    code, said, imported = command_line(tmp_path, "-m", "cnn_pipeline", module,
                                        *ENTRY_POINTS[module], "--set", override)
    with pytest.raises(ParamsError) as expected:
        load_params("params.yaml", [override])
    assert code == 2 and said == f"error: {expected.value}", said
    assert not imported & HEAVY, f"{module} imported {sorted(imported & HEAVY)} before refusing"


def test_the_import_check_sees_a_heavy_import(tmp_path):
    """The check above can fail: a step's module itself imports torch."""
    code, _, imported = command_line(tmp_path, "-c", "import components.train")
    assert code == 0 and "torch" in imported


def test_missing_data_is_refused_with_the_steps_own_message(tmp_path, capsys, monkeypatch):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"paths": {"prepared": "nothing"}}))
    folder = ["--set", "data.source=imagefolder", "--set", "data.image_size=32",
              "--set", "data.root=no/such/folder"]
    monkeypatch.chdir(tmp_path)
    for step, args in (("prepare", folder), ("augment", [])):
        code, said, imported = command_line(tmp_path, "-m", "cnn_pipeline", step, *args)
        assert code == 2 and said == in_process_error(cli.main, [step, *args], capsys), said
        assert not imported & HEAVY, f"{step} imported {sorted(imported & HEAVY)}"


def test_help_and_good_settings_pass_the_preflight(tmp_path):
    # No params.yaml here: --help must still show the step's own help, not a settings error.
    done = subprocess.run([sys.executable, "-m", "cnn_pipeline", "prepare", "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--params" in done.stdout
    assert done.stdout.startswith("usage: cnn-pipeline prepare ")
    # A valid command runs the step itself: prepare writes its data.
    (tmp_path / "params.yaml").write_text("")
    done = subprocess.run([sys.executable, "-m", "cnn_pipeline", "prepare"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["counts"]["train"] > 0
    assert json.loads(done.stdout)["seconds"] > 0  # the step's own work, timed


@pytest.mark.parametrize("module", STEPS)
def test_a_steps_help_is_its_own_parsers_without_importing_the_step(tmp_path, module, capsys):
    """`cnn-pipeline <step> --help` prints the step's options (cnn_pipeline/commands.py) and the
    step function's docstring read from its source: the docstring the function has once
    imported, and none of the step's heavy imports."""
    import inspect

    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "cnn_pipeline", module,
                           "--help"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    imported = {line.rsplit("|", 1)[1].strip().split(".")[0]
                for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert done.returncode == 0, done.stderr
    assert not imported & HEAVY, f"{module} --help imported {sorted(imported & HEAVY)}"
    step = cli._function(COMMANDS[module].run)
    assert " ".join(inspect.getdoc(step).split()) in " ".join(done.stdout.split())
    with pytest.raises(SystemExit) as info:
        cli.main([module, "--help"])
    assert info.value.code == 0
    assert done.stdout == capsys.readouterr().out


# Imported by the interpreter before `-m` loads anything, so its exit handler is registered before
# the command line's and runs after it.
SITECUSTOMIZE = """
import atexit, gc, sys
atexit.register(lambda: print("frozen at exit:", gc.get_freeze_count() > 0, file=sys.stderr))
"""


def test_a_step_as_a_program_skips_the_last_collections_and_still_runs_exit_handlers(
        tmp_path, monkeypatch, capsys):
    import gc

    (tmp_path / "site").mkdir()
    (tmp_path / "site/sitecustomize.py").write_text(SITECUSTOMIZE)
    (tmp_path / "params.yaml").write_text("")
    path = os.pathsep.join(filter(None, [str(tmp_path / "site"), os.environ.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-m", "cnn_pipeline", "prepare"], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": path}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["counts"]["train"] > 0
    assert "frozen at exit: True" in done.stderr
    # Called in-process (a test), the command leaves the collector as it was until exit.
    monkeypatch.chdir(tmp_path)
    cli.main(["prepare"])
    assert json.loads(capsys.readouterr().out)["counts"]["train"] > 0
    assert gc.get_freeze_count() == 0


# --- built-ins without timm ---------------------------------------------------------------------

BUILTIN_SCRIPT = """
import sys, importlib.util
import components.training.models as m
import torch
model = m.create_model("resnet_cifar" if "{order}" == "resnet" else "simple_cnn", num_classes=3,
                       in_chans=1, img_size=8)
before = "timm" in sys.modules
importlib.util.find_spec("timm")  # a look-up loads nothing and keeps the hook
import timm
made = timm.create_model("lenet5", num_classes=3, in_chans=1)
print(before, sorted(n for n in m.BUILTINS if timm.is_model(n)) == sorted(m.BUILTINS),
      made(torch.randn(2, 1, 32, 32)).shape == (2, 3))
"""


@pytest.mark.parametrize("order", ["builtin-first", "resnet"])
def test_builtins_are_made_without_timm_and_registered_when_timm_comes(order):
    done = subprocess.run([sys.executable, "-c", BUILTIN_SCRIPT.format(order=order)],
                          cwd=PROJECT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    # simple_cnn: no timm at all; resnet_cifar: its blocks are timm's, and timm came with them.
    assert done.stdout.split() == [str(order == "resnet"), "True", "True"]


def test_metrics_are_the_same_as_with_timms_create_model(digits, tmp_path, monkeypatch):
    """metrics.json of a digits model made directly equals that of one made by timm's
    create_model (how every built-in was made before), byte for byte."""
    import timm

    from components.core import outputs
    from components.evaluate import evaluate
    from components.train import train
    from components.training import models

    out = {}
    for how in ("direct", "timm"):
        if how == "timm":
            monkeypatch.setattr(models, "_builtin", lambda name, pretrained, **kwargs:
                                timm.create_model(name, pretrained=pretrained, **kwargs))
        params = load_params(digits / "basic.yaml", [
            f"paths.train={tmp_path / how / 'train'}", f"paths.evaluate={tmp_path / how / 'ev'}",
            "train.epochs=2", "evaluate.mistakes=4"])
        train(params)
        evaluate(params)
        out[how] = (tmp_path / how / "ev" / outputs.METRICS).read_bytes()
    assert out["direct"] == out["timm"]


# --- the pull step ------------------------------------------------------------------------------

FAKE_PYTHON = """#!/bin/sh
# Stands in for the worker's interpreter: its prefix, and pip's calls written down, not run.
if [ "$1" = "-c" ]; then echo "$FAKE_PREFIX"; else echo "$*" >> "$FAKE_PREFIX/calls"; fi
"""


def test_the_pull_step_installs_the_lock_only_when_it_changed(tmp_path):
    from prefect.deployments.steps import run_shell_script

    step = next(s["prefect.deployments.steps.run_shell_script"] for s in yaml.safe_load(
        (PROJECT / "prefect.yaml").read_text())["pull"]
        if "requirements.lock" in str(s.get("prefect.deployments.steps.run_shell_script")))
    clone, prefix, bin_ = tmp_path / "clone", tmp_path / "env", tmp_path / "bin"
    for folder in (clone, prefix, bin_):
        folder.mkdir()
    (bin_ / "python").write_text(FAKE_PYTHON)
    (bin_ / "python").chmod(0o755)
    env = {"PATH": f"{bin_}:{os.environ['PATH']}", "FAKE_PREFIX": str(prefix)}

    def pull() -> str:
        kwargs = {k: v for k, v in step.items() if k != "directory"}
        return asyncio.run(run_shell_script(**kwargs, directory=str(clone), env=env))["stdout"]

    calls = prefix / "calls"
    (clone / "requirements.lock").write_text("torch==2.14.0\n")
    pull()
    assert calls.read_text().splitlines() == ["-m pip install --quiet -r requirements.lock"]
    assert "has requirements.lock installed" in pull()  # the same lock: no pip at all
    assert len(calls.read_text().splitlines()) == 1
    (clone / "requirements.lock").write_text("torch==2.15.0\n")
    pull()
    assert len(calls.read_text().splitlines()) == 2


# --- make stack-down ----------------------------------------------------------------------------

STUBBORN = "trap '' TERM; sleep 300 & setsid sleep 301 & wait"  # ignores SIGTERM; a child session


def test_stack_down_stops_worker_first_and_kills_what_outlives_the_grace(tmp_path):
    (tmp_path / ".stack").mkdir()
    shutil.copy(PROJECT / "Makefile", tmp_path / "Makefile")
    started = {"worker": ["sh", "-c", STUBBORN], "mlflow": ["sleep", "302"]}
    procs = {name: subprocess.Popen(cmd, start_new_session=True) for name, cmd in started.items()}
    for name, proc in procs.items():
        (tmp_path / ".stack" / f"{name}.pid").write_text(str(proc.pid))
    (tmp_path / ".stack/prefect-server.pid").write_text(str(_a_dead_pid()))
    deadline = time.monotonic() + 60  # the worker's shell has started both its children
    while len(_session_pids(procs["worker"].pid)) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    sessions = [_session_pids(p.pid) for p in procs.values()]
    try:
        # As from a user's shell: under `make test` the inherited MAKELEVEL would make this
        # make print "Entering directory" lines around its output.
        make_vars = ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")
        shell = {k: v for k, v in os.environ.items() if k not in make_vars}
        done = subprocess.run(["make", "stack-down", "STOP_GRACE_S=1"], cwd=tmp_path, env=shell,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert lines[0].startswith(f"killed worker (pid {procs['worker'].pid}, 3 processes)")
        assert lines[1].startswith(f"stopped mlflow (pid {procs['mlflow'].pid}, 1 process) within ")
        assert lines[2].startswith("prefect-server") and "was not running" in lines[2]
        for proc in procs.values():
            proc.wait(timeout=10)
        assert not [pid for pids in sessions for pid in pids if _running(pid)]
        assert not list((tmp_path / ".stack").glob("*.pid"))
    finally:
        for pid in [p for pids in sessions for p in pids]:
            if _running(pid):
                os.kill(pid, 9)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_makefiles_stack_one_store_settings_for_a_run_and_a_worker_that_stops_on_sigterm(
        tmp_path):
    """`make stack-up` in a committed project: its MLflow server serves the project's own store
    (the one `dvc repro` tracks into: a run written there, artifacts included, into the
    experiment the server made, is on the server); `make pipeline SET=...` passes its settings to
    the run, and refuses a bad one before any run; `make stack-down` stops the worker with
    SIGTERM (started with SIGINT ignored, as a shell starts `&` jobs, it did not stop until
    killed)."""
    from mlflow import MlflowClient

    from tests.support.projects import committed_copy, get, pairs
    from tests.support.servers import free_port

    project = committed_copy(tmp_path / "project")
    ports = {"PREFECT_PORT": str(free_port()), "MLFLOW_PORT": str(free_port())}
    make = ["make", "-o", "install", f"VENV={sys.prefix}", *(f"{k}={v}" for k, v in ports.items())]
    shell = {k: v for k, v in os.environ.items()
             if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS", "MLFLOW_TRACKING_URI",
                          "PREFECT_API_URL")} | {"DVC_NO_ANALYTICS": "1"}

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([*make, *args], cwd=project, env=shell, capture_output=True,
                              text=True, timeout=900)
        assert done.returncode == 0 or not check, f"make {args}:\n{done.stdout}\n{done.stderr}"
        return done

    uri = f"http://127.0.0.1:{ports['MLFLOW_PORT']}"
    try:
        run("stack-up")
        run("deploy")
        refused = run("pipeline", "SET=train.epochs=0", check=False)
        assert refused.returncode != 0 and "train.epochs = 0" in refused.stderr
        done = run("pipeline", "SET=train.epochs=1 augment.preview_images=2 evaluate.mistakes=4")
        assert "Completed" in done.stdout, done.stdout[-3000:]

        embedded = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")  # what dvc repro writes
        experiment = embedded.get_experiment_by_name("digits-classifier")  # the server made it
        [flow_run] = embedded.search_runs([experiment.experiment_id])
        assert flow_run.data.params["train.epochs"] == "1"  # SET reached the run
        assert flow_run.info.run_name == flow_run.data.tags["prefect.flow_run_name"]
        local = embedded.create_run(experiment.experiment_id, run_name="by-dvc-repro")
        (tmp_path / "note.txt").write_text("an artifact")
        embedded.log_artifact(local.info.run_id, str(tmp_path / "note.txt"))
        shown = get(uri, "runs/get", run_id=local.info.run_id)["run"]
        assert shown["info"]["run_name"] == "by-dvc-repro"
        assert [f["path"] for f in get(uri, "artifacts/list", run_id=local.info.run_id)[
            "files"]] == ["note.txt"]
        version = get(uri, "registered-models/alias", name="digits-classifier", alias="champion")
        assert version["model_version"]["run_id"] == flow_run.info.run_id
        assert pairs(shown["data"].get("tags", [])).get("mlflow.runName") == "by-dvc-repro"
    finally:
        down = run("stack-down", check=False)
    lines = down.stdout.splitlines()
    assert lines[0].startswith("stopped worker (pid "), down.stdout  # not "killed ..."
    assert [line.split()[0] for line in lines] == ["stopped", "stopped", "stopped"], down.stdout


def _session_pids(pid: int) -> list[int]:
    """pid and its descendants (their sessions are what stack-down stops)."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        child, parent = map(int, line.split())
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo += children.get(found[-1], [])
    return found


def _running(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def _a_dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid
