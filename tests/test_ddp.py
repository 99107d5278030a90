"""train on two processes (DDP through torchrun, gloo on CPU): the result of one process with the
same global batch; one MLflow run and one checkpoint set; a rank that fails, runs out of memory or
hangs ends both ranks with an error naming it, the last checkpoint intact, and the run resumes.

Data: scikit-learn's digits (8×8×1, 1295 training images) through the real prepare step, once. Every
DDP run is the real entry point in a fresh process, as a user starts it, tracked in an SQLite MLflow
store in the test's folder. The failing model is registered with timm in conftest.py; the process
that launches torchrun imports that module, so the workers import it too (components.training.ddp
passes the module that registers a model on to them), and the model fails only on rank 1, only in
epoch 2 (after 25 training steps of that rank: 21 per epoch), only when FAULT_ENV says how.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from components.core import outputs
from components.core.params import load_params
from components.train import StopTraining, epoch_done, train
from components.training import checkpoint as ckpt
from components.training import ddp
from tests.conftest import FAULT_ENV

ROOT = Path(__file__).resolve().parent.parent
FAILING = ("train.devices=2", "model.name=fake_fails_on_rank_1")
BOUND_S = 300  # a run that fails must have ended by then (it takes well under a minute)


@pytest.fixture(scope="session")
def data(digits: Path) -> Path:
    return digits


def settings(folder: Path, data: Path, *overrides: str):
    """(params, params.yaml) writing under `folder`: 2 epochs of 64-image global batches."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "params.yaml"
    path.write_text(
        f"paths:\n  prepared: {data / 'prepared'}\n  augment: {data / 'augment_none'}\n"
        f"  train: {folder / 'train'}\n"
        "augment:\n  preset: none\n"
        "train:\n  epochs: 2\n  batch_size: 64\n  warmup_epochs: 0\n  precision: fp32\n"
    )
    return load_params(path, list(overrides)), path


def command(path: Path, *overrides: str, fault: str | None = None,
            timeout_s: int | None = None) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) of `cnn-pipeline train` as a user runs it, after importing
    this module (for its models)."""
    start = "import tests.conftest; from cnn_pipeline.cli import main; main()"
    args = [sys.executable, "-c", start, "train", "--params", str(path)]
    for item in overrides:
        args += ["--set", item]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{path.parent / 'mlflow.db'}",
           "PYTHONPATH": str(ROOT)}
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    if timeout_s:
        env["CNN_PIPELINE_DDP_TIMEOUT_S"] = str(timeout_s)
    return args, env


def run_cli(path: Path, *overrides: str, fault: str | None = None,
            timeout_s: int | None = None) -> subprocess.CompletedProcess:
    """The command, run to its end; bounded: a hang fails the test instead of stalling it."""
    args, env = command(path, *overrides, fault=fault, timeout_s=timeout_s)
    return subprocess.run(args, cwd=path.parent, env=env, capture_output=True, text=True,
                          timeout=BOUND_S)


def runs(folder: Path) -> list:
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    return [(client, run) for exp in client.search_experiments()
            for run in client.search_runs([exp.experiment_id])]


def val_acc_steps(client: MlflowClient, run) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_acc"))


@pytest.fixture(scope="module")
def two_processes(data, tmp_path_factory):
    """One DDP run of simple_cnn (no batch norm, no dropout) on 2 gloo processes."""
    folder = tmp_path_factory.mktemp("ddp")
    _, path = settings(folder, data)
    done = run_cli(path, "train.devices=2")
    assert done.returncode == 0, done.stderr
    return folder, json.loads(done.stdout)


# ---------------------------------------------------------------------------------------------


def test_two_processes_train_like_one_with_the_same_global_batch(two_processes, data, tmp_path):
    """Same samples per step, the mean over the same global batch: the same training, except the
    order of float additions (gloo sums the two halves' gradients; one process sums 64 rows in
    one kernel), which leaves ~1e-7 relative differences per step that Adam carries on. Measured
    after 2 epochs (42 steps): weights within 2e-4 (of weights up to ~0.4), losses within 1e-5,
    the same accuracies. Bounds 1e-3 and 0.01 leave room for other CPUs' kernels; a wrong share
    (a rank skipping or repeating images) or an unscaled loss moves them by far more."""
    folder, result = two_processes
    assert result["devices"] == 2 and result["batch_size"] == 64 and result["epochs"] == 2
    params, _ = settings(tmp_path, data)
    one = train(params)
    assert one.devices == 1
    a = ckpt.load(one.model_path)["state_dict"]
    b = ckpt.load(result["model_path"])["state_dict"]
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=1e-3), name
    rows = [json.loads(Path(p).read_text()) for p in (one.history_path, result["history_path"])]
    for row_one, row_two in zip(*rows, strict=True):
        assert row_two["lr"] == row_one["lr"]
        for key in ("train_loss", "val_loss", "train_acc", "val_acc"):
            assert row_two[key] == pytest.approx(row_one[key], abs=0.01), key


def test_the_balanced_sampler_and_class_weights_train_on_two_processes_like_one(data, tmp_path):
    """Every rank draws the same balanced epoch and trains on its share of each global batch; the
    class-weighted loss is normalised by the weights of the whole global batch (summed over the
    ranks), so two processes compute one process's loss. Bounds as in the test above."""
    imbalance = ("train.sampler=balanced", "train.class_weights={0: 3, 7: 0.5}")
    _, path = settings(tmp_path / "two", data)
    done = run_cli(path, "train.devices=2", *imbalance)
    assert done.returncode == 0, done.stderr
    two = json.loads(done.stdout)
    params, _ = settings(tmp_path / "one", data, *imbalance)
    one = train(params)
    a, b = (ckpt.load(r)["state_dict"] for r in (one.model_path, two["model_path"]))
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=1e-3), name
    rows = [json.loads(Path(p).read_text()) for p in (one.history_path, two["history_path"])]
    for row_one, row_two in zip(*rows, strict=True):
        for key in ("train_loss", "val_loss", "train_acc", "val_acc"):
            assert row_two[key] == pytest.approx(row_one[key], abs=0.01), key


def test_one_mlflow_run_and_one_checkpoint_set(two_processes):
    folder, result = two_processes
    (client, run), = runs(folder)
    assert run.info.status == "FINISHED"
    assert val_acc_steps(client, run) == [1, 2]
    last_row = json.loads(Path(result["history_path"]).read_text())[-1]
    assert run.data.metrics["val_loss"] == last_row["val_loss"]
    assert run.data.tags["train.device"] == "cpu"
    out = folder / "train"
    assert sorted(p.name for p in (out / outputs.CHECKPOINTS).iterdir()) == [
        outputs.BEST, outputs.BEST + outputs.HASH_SUFFIX, outputs.LAST, outputs.LAST +
        outputs.HASH_SUFFIX]
    assert sorted(p.name for p in out.glob("*.pt*")) == [outputs.MODEL,
                                                          outputs.MODEL + outputs.HASH_SUFFIX]
    assert ckpt.load(out / outputs.CHECKPOINTS / outputs.LAST)["progress"]["epoch"] == 2
    assert json.loads((out / outputs.RUN).read_text())["run_id"] == run.info.run_id


@pytest.mark.slow
@pytest.mark.parametrize("fault,said", [
    ("error", "RuntimeError: injected failure on rank 1"),
    ("oom", "out of memory on rank 1 (cpu) at 32 images per device"),
])
def test_a_failing_rank_ends_both_keeps_the_last_checkpoint_and_the_run_resumes(
        tmp_path, data, fault, said):
    _, path = settings(tmp_path, data)
    failed = run_cli(path, *FAILING, fault=fault)  # bounded by BOUND_S
    assert failed.returncode == 2, failed.stderr
    error = failed.stderr[failed.stderr.index("error: training on 2 processes failed"):]
    assert "failed on rank 1: " in error and said in error
    log = Path(error.split("Rank 1's log: ")[1].split()[0])
    assert log.is_file() and said.split(": ")[-1] in log.read_text()
    last = tmp_path / "train" / outputs.CHECKPOINTS / outputs.LAST
    assert str(last) in error
    assert ckpt.load(last)["progress"]["epoch"] == 1  # sha256 checked: whole, from epoch 1

    resumed = run_cli(path, *FAILING)
    assert resumed.returncode == 0, resumed.stderr
    result = json.loads(resumed.stdout)
    assert result["resumed_from"] == 1 and result["epochs"] == 2
    (client, run), = runs(tmp_path)  # the resumed run logs into the run it started
    assert val_acc_steps(client, run) == [1, 2]


def _children(pid: int) -> list[int]:
    """Every process below `pid` (by /proc's parent links), at any depth."""
    parents = {}
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, IndexError, ValueError):
            # The fields after the command's closing parenthesis: state, ppid, ...
            parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1]
                                           .split()[1])
    found, frontier = [], [pid]
    while frontier:
        below = [p for p, parent in parents.items() if parent in frontier]
        found += below
        frontier = below
    return found


def _command(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
    return "?"


def _alive(pid: int) -> bool:
    """Running, not a zombie that nobody reaped yet."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_sigkill_of_the_command_ends_torchrun_and_every_rank(tmp_path, data):
    """The command of a two-process training, killed with SIGKILL (no handler runs) once its
    ranks train: torchrun and both ranks end too, rather than training on into the outputs the
    next run resumes from. (The deadline only bounds the wait; it times nothing.)"""
    _, path = settings(tmp_path, data, "train.devices=2")
    args, env = command(path, "train.devices=2", "train.epochs=1000")
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    family: list[int] = []
    try:
        history, deadline = tmp_path / "train" / outputs.HISTORY, time.monotonic() + BOUND_S
        while not history.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)  # the ranks have trained an epoch
        family = _children(proc.pid)
        named = {pid: _command(pid) for pid in family}
        assert history.exists() and len(family) >= 3, named  # torchrun and two ranks
        proc.kill()
        proc.wait(timeout=60)
        deadline = time.monotonic() + 60
        while any(map(_alive, family)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in family if _alive(pid)], named
    finally:
        for pid in [proc.pid, *family]:  # whatever outlived the test
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=60)


@pytest.mark.slow
def test_a_hung_rank_ends_the_run_after_the_collective_timeout(tmp_path, data):
    _, path = settings(tmp_path, data)
    failed = run_cli(path, *FAILING, fault="hang", timeout_s=10)  # bounded by BOUND_S
    assert failed.returncode == 2, failed.stderr
    error = failed.stderr[failed.stderr.index("error: training on 2 processes failed"):]
    assert "failed on rank 0: " in error and "lost touch with another rank" in error
    last = tmp_path / "train" / outputs.CHECKPOINTS / outputs.LAST
    assert ckpt.load(last)["progress"]["epoch"] == 1


class Heard:
    """What train's callbacks (the MLflow tracker among them) hear from the parent."""

    def __init__(self):
        self.start, self.epochs = None, []

    def on_train_start(self, resumed_from: int) -> None:
        self.start = resumed_from

    def on_epoch_end(self, epoch: int, row: dict) -> None:
        self.epochs.append(epoch)


def test_epochs_written_just_before_the_workers_fail_still_reach_the_callbacks(tmp_path):
    """Stand-in workers (a real process) say where they start, finish epochs 1 and 2 and fail
    at once, between two of the parent's looks (ddp.POLL_S apart): the parent hands on both
    epochs before it reports the failure, so a resumed run's metrics have no gap."""
    write = ("import json, pathlib, sys; out = pathlib.Path(sys.argv[1]); "
             "(out / 'ddp').mkdir(parents=True); "
             f"(out / 'ddp' / {outputs.STARTED!r}).write_text(json.dumps({{'resumed_from': 0}})); "
             f"(out / {outputs.HISTORY!r})"
             ".write_text(json.dumps([{'epoch': 1}, {'epoch': 2}])); "
             "sys.exit(1)")
    heard = Heard()
    proc = subprocess.Popen([sys.executable, "-c", write, str(tmp_path)])
    assert ddp._follow(proc, tmp_path, [heard], epoch_done) == 2
    assert proc.returncode == 1 and heard.start == 0 and heard.epochs == [1, 2]


class StopsAfter(Heard):
    """A callback that asks to stop after `epoch`, as a search's pruner does."""

    def __init__(self, epoch: int):
        super().__init__()
        self.stop_after = epoch

    def on_epoch_end(self, epoch: int, row: dict) -> None:
        super().on_epoch_end(epoch, row)
        if epoch == self.stop_after:
            raise StopTraining("enough")


@pytest.mark.slow
def test_a_callback_stops_the_workers_which_write_their_outputs(tmp_path, data):
    """The parent hears epoch 1 after the workers wrote it (it looks every ddp.POLL_S); they stop
    together after the epoch they are in, long before the 40 asked for, and write model.pt and
    the result as after early stopping. Every epoch they trained still reaches the other callbacks;
    the one that asked hears no more, as in one process."""
    params, _ = settings(tmp_path, data, "train.devices=2", "train.epochs=40")
    stopper, heard = StopsAfter(1), Heard()
    result = train(params, callbacks=[stopper, heard])
    assert result.devices == 2 and 1 <= result.epochs < 40
    assert result.stopped_by == "enough (asked after epoch 1)"
    assert heard.epochs == list(range(1, result.epochs + 1))
    assert stopper.epochs == [1]
    assert len(json.loads(Path(result.history_path).read_text())) == result.epochs
    _, meta = ckpt.load_model(result.model_path)  # whole: its sha256 is checked
    assert meta["epoch"] == result.best_epoch <= result.epochs
