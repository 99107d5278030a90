"""ddp: the train step on several devices, DistributedDataParallel under torch's own launcher.

`train.devices: N` (or `auto`: every visible GPU, 1 on a machine without one) with N > 1 makes
`components.train.train` run like this:

- The parent, the process that called train() with its callbacks (the flow's task, or
  `cnn-pipeline train` with its MLflow tracker), writes the validated settings with the
  resolved N to `<paths.train>/ddp/params.yaml` and runs (`launch`) torchrun: `python -m
  torch.distributed.run --standalone --nproc-per-node N -m cnn_pipeline train --params <that
  file>`. The console shows rank 0; every rank's output is in its log under `ddp/logs/`.
  While the workers train, the parent follows history.json and hands each new epoch's row to its
  callbacks, then reads the result rank 0 wrote and returns it: one process tracks, so there is
  one MLflow run whatever N is. A callback that stops the run (train's StopTraining: a search's
  pruner) makes the parent write `ddp/stop.json`; the workers look for it at the end of each
  epoch (`stop_requested`: rank 0 looks, every rank hears), stop together after the epoch they
  are in and write their outputs as after early stopping. The epochs they trained after the
  request still reach the other callbacks (the tracker logs them); the one that asked hears no
  more, as in one process.
- Each worker (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK) joins the group (`process_group`):
  NCCL on GPUs, one GPU per local rank; gloo on CPU, with cores // N torch threads each so the
  processes don't fight over cores. Collectives time out after TIMEOUT_S (TIMEOUT_ENV overrides
  it), so a rank that hangs ends the run instead of stalling it. Workers run train() without
  callbacks; the loop wraps the model in DDP, takes its share of each global batch, all-reduces
  the metrics, and only rank 0 writes history, checkpoints and model.pt.
- Whatever ends the step's command ends torchrun and every rank, SIGKILL included (which no
  handler sees): torchrun runs under a small launcher (`python -m components.training.ddp`) and each
  rank starts by asking the kernel to signal it when its parent ends (`die_with_parent`, Linux's
  PR_SET_PDEATHSIG, as torch.multiprocessing.spawn does for its children): torchrun gets SIGTERM
  when the step's process ends, and stops its ranks as it does on any SIGTERM; a rank gets SIGKILL
  when torchrun ends, however. So no rank outlives the process that started it and goes on writing
  checkpoints that the next run would resume from.
- A failure on any rank ends all of them: the rank's exception is recorded by torch.distributed's
  `record` in its log folder, torchrun stops the other ranks, and the parent raises
  DistributedTrainingError naming the first rank that failed, its error and its log.

A model registered with timm outside this project (like the fault-injecting models of
tests/test_ddp.py) is created in the workers too: the parent names the module that registers it
in MODEL_MODULES_ENV and each worker imports it before building.

    cnn-pipeline train --set train.devices=2     # 2 processes (gloo on a CPU machine)
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.parallel import DistributedDataParallel

from components.core import outputs
from components.core.atomic import atomic_file, write_json
from components.core.lifetime import die_with_parent
from components.core.params import DEFAULT_PARAMS, Params, UserError
from components.training.models import BUILTINS

__all__ = ["record"]  # the command line wraps train in it on a rank: its error lands in error.json

WORKER_MODULE = "components.train"  # what each rank runs (through `python -m cnn_pipeline train`)
WORKER_COMMAND = ("cnn_pipeline", "train")  # torchrun's `-m` module and its first argument
LAUNCHER = "components.training.ddp"  # runs torchrun, ended with the step (die_with_parent)
LOADED_BY_NAME = (WORKER_MODULE,)  # components/core/step_code.py counts it as imported from here
PARENT_ENV = "CNN_PIPELINE_DDP_PARENT"  # the pid of the process a launcher or rank must not outlive
WORKER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
MODEL_MODULES_ENV = "CNN_PIPELINE_MODEL_MODULES"
TIMEOUT_ENV = "CNN_PIPELINE_DDP_TIMEOUT_S"
# A collective waits this long for the slowest rank: longer than any one rank works alone
# (rank 0 saving a checkpoint, the first torch.compile) and as long as NCCL's own default.
TIMEOUT_S = 600.0
POLL_S = 1.0  # how often the parent looks for new history rows
PROJECT = Path(__file__).resolve().parents[2]
# How the parent's callbacks hear an epoch (train.epoch_done): the reason to stop, if one asked.
EpochDone = Callable[[Sequence[Any], int, dict], "str | None"]


class DistributedTrainingError(UserError):
    """A rank failed; the others were stopped. Names the rank, its error and its log."""

    def __init__(self, message: str, rank: int | None, log: Path | None):
        super().__init__(message)
        self.rank, self.log = rank, log


@dataclass(frozen=True)
class World:
    """This process's place among the training processes; (0, 1) without DDP."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


SINGLE = World()


def in_worker() -> bool:
    return any(key in os.environ for key in WORKER_ENV)


def device_count(cfg, device: torch.device) -> int:
    """train.devices resolved: `auto` is every visible GPU on CUDA, 1 on a CPU."""
    visible = torch.cuda.device_count() if device.type == "cuda" else 0
    n = max(1, visible) if cfg.devices == "auto" else cfg.devices
    if visible and n > visible:
        raise UserError(f"train.devices = {n} but this machine has {visible} CUDA GPU(s); set "
                        "train.devices=auto, or train.device=cpu for CPU processes")
    if cfg.batch_size % n:
        raise UserError(f"train.batch_size = {cfg.batch_size} (the global batch) does not split "
                        f"evenly over train.devices = {n}; make it a multiple of {n}")
    return n


# --- the parent ------------------------------------------------------------------------------


def launch(params: Params, n: int, callbacks: Sequence[Any],
           epoch_done: EpochDone) -> dict[str, Any]:
    """Run train on `n` processes through torchrun; rank 0's TrainResult fields, as a dict.
    The callbacks hear where the workers start and every epoch they finish, as in one process,
    through `epoch_done`; when one asks to stop, the workers stop after the epoch they are in."""
    folder = Path(params.paths.train) / outputs.DDP
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    settings = params.model_dump(mode="json")
    settings["train"]["devices"] = n
    with atomic_file(folder / DEFAULT_PARAMS) as tmp:
        tmp.write_text(yaml.safe_dump(settings, sort_keys=False))
    cmd = [sys.executable, "-m", LAUNCHER, "--standalone",
           "--nproc-per-node", str(n), "--log-dir", str(folder / "logs"),
           "--redirects", "3", "--tee", "3", "--local-ranks-filter", "0",
           "-m", *WORKER_COMMAND, "--params", str(folder / DEFAULT_PARAMS)]
    proc = subprocess.Popen(cmd, env=_worker_env(params, n), stdout=2, stderr=2)
    listening = list(callbacks)  # less those that asked to stop
    try:
        followed = _follow(proc, Path(params.paths.train), listening, epoch_done)
    finally:
        if proc.poll() is None:  # the parent was interrupted: take the workers down with it
            proc.terminate()
            proc.wait()
    if proc.returncode != 0:
        raise _failure(folder / "logs", proc.returncode, n, Path(params.paths.train))
    result = json.loads((folder / outputs.RESULT).read_text())
    if followed is None:  # over before the parent saw where it started
        started(callbacks, result["resumed_from"])
    after = result["resumed_from"] if followed is None else followed
    _deliver(Path(params.paths.train), after, result["epochs"], listening, epoch_done)
    # asked after the last epoch: too late to stop, still said, as train says it in one process
    result["stopped_by"] = result["stopped_by"] or _stop_reason(folder)
    return result


def _worker_env(params: Params, n: int) -> dict[str, str]:
    env = dict(os.environ)
    env[PARENT_ENV] = str(os.getpid())  # the launcher ends with this process
    # torchrun would set 1 thread per process with a warning; cores // n is what each may use.
    env["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // n))
    # One host (--standalone): gloo's links between ranks stay on loopback rather than listening
    # on every interface. (torchrun's rendezvous store still does; see docs/security.md.)
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    # Workers run `-m cnn_pipeline train` from this working directory (relative paths in params
    # mean the same there); the project must be importable from it.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT), env.get("PYTHONPATH")]))
    module = _model_module(params.model.name)
    if module:
        env[MODEL_MODULES_ENV] = module
    return env


def _model_module(name: str) -> str | None:
    """The module that registers `name` with timm, when the workers would not import it."""
    if name in BUILTINS:
        return None  # made without timm, in components.training.models, which the workers import
    from timm.models import is_model, model_entrypoint

    if not is_model(name):
        return None  # create_model will say so in the workers, with suggestions
    module = model_entrypoint(name).__module__
    if module == "__main__":
        raise UserError(f"model {name} is registered in the script being run (__main__), which "
                        "the torchrun workers cannot import; register it in a module instead")
    return None if module.startswith(("timm.", "components.")) else module


def _follow(proc: subprocess.Popen, out: Path, callbacks: list[Any],
            epoch_done: EpochDone) -> int | None:
    """Hand history rows to the callbacks as rank 0 writes them, until the workers end, and once
    more after: a failed run's last epochs reach them too (each row has its checkpoint: train
    writes history.json after last.pt). The last epoch delivered (None: rank 0 had not said
    where it started)."""
    delivered, seen = None, None
    while True:
        try:
            proc.wait(timeout=POLL_S)
            ended = True
        except subprocess.TimeoutExpired:
            ended = False
        said = out / outputs.DDP / outputs.STARTED
        if delivered is None and said.exists():
            delivered = json.loads(said.read_text())["resumed_from"]
            started(callbacks, delivered)
        history = out / outputs.HISTORY
        stamp = history.stat().st_mtime_ns if history.exists() else None
        if delivered is not None and stamp != seen:
            seen = stamp
            delivered = _deliver(out, delivered, None, callbacks, epoch_done)
        if ended:
            return delivered


def started(callbacks: Sequence[Any], resumed_from: int) -> None:
    """Tell train's callbacks where the run starts (epochs already done): from train itself in
    one process, from the parent for the workers."""
    for cb in callbacks:
        if hasattr(cb, "on_train_start"):
            cb.on_train_start(resumed_from)


def _deliver(out: Path, after: int, upto: int | None, callbacks: list[Any],
             epoch_done: EpochDone) -> int:
    """The epochs after `after` (up to `upto`) to the callbacks; the first request to stop goes
    to the workers in ddp/stop.json. The last epoch delivered."""
    path = out / outputs.HISTORY
    rows = json.loads(path.read_text()) if path.exists() else []
    stop = out / outputs.DDP / outputs.STOP
    for row in rows:
        if row["epoch"] > after and (upto is None or row["epoch"] <= upto):
            reason = _hear(callbacks, row["epoch"], row, epoch_done)
            if reason and not stop.exists():
                write_json(stop, {"reason": reason, "epoch": row["epoch"]})
            after = row["epoch"]
    return after


def _hear(callbacks: list[Any], epoch: int, row: dict, epoch_done: EpochDone) -> str | None:
    """Each callback hears the epoch; one that asks to stop leaves `callbacks` and hears no more,
    as in one process, where the run ends there (the workers may be an epoch further on). The
    first reason."""
    reasons = []
    for cb in list(callbacks):
        reason = epoch_done([cb], epoch, row)
        if reason:
            callbacks.remove(cb)
            reasons.append(reason)
    return reasons[0] if reasons else None


def _stop_reason(folder: Path) -> str | None:
    """What the parent's callbacks said when they asked the workers to stop (ddp/stop.json)."""
    path = folder / outputs.STOP
    if not path.exists():
        return None
    request = json.loads(path.read_text())
    return f"{request['reason']} (asked after epoch {request['epoch']})"


def _failure(logs: Path, code: int, n: int, out: Path) -> DistributedTrainingError:
    last = out / outputs.CHECKPOINTS / outputs.LAST
    kept = (f"the last good checkpoint is {last}; run again to resume from it" if last.exists()
            else "no checkpoint was written")
    errors = sorted(_recorded_errors(logs))
    if not errors:
        return DistributedTrainingError(
            f"training on {n} processes failed (torchrun exit code {code}) and no rank recorded "
            f"an error (killed by a signal? the system's out-of-memory killer?); {kept}. Logs: "
            f"{logs}", None, None)
    lost_peer, _, rank, message, log = errors[0]
    if lost_peer:
        message += (f" (it lost touch with another rank: one that died without an error, or hung "
                    f"longer than the {_timeout().total_seconds():.0f} s collective timeout)")
    return DistributedTrainingError(
        f"training on {n} processes failed on rank {rank}: {message}\nThe other ranks were "
        f"stopped; {kept}. Rank {rank}'s log: {log}", rank, log)


def _recorded_errors(logs: Path) -> Iterator[tuple[bool, int, int, str, Path]]:
    """(lost a peer?, when, rank, message, log) per error.json that `record` wrote.

    A rank whose peer died fails too, in a collective, moments later: the first error that is not
    such a consequence is the cause.
    """
    for path in logs.glob("*/attempt_*/*/error.json"):
        raw = json.loads(path.read_text()).get("message", {})
        message = raw.get("message", str(raw)) if isinstance(raw, dict) else str(raw)
        message = message.strip().splitlines()[0] if message.strip() else "(no message)"
        lost_peer = message.startswith("DistBackendError") or any(
            word in message.lower() for word in ("gloo", "nccl", "connection closed"))
        yield lost_peer, path.stat().st_mtime_ns, int(path.parent.name), message, (
            path.parent / "stderr.log")


# --- the launcher and a worker ------------------------------------------------------------------


def worker_lifetime() -> None:
    """A rank never outlives torchrun: SIGKILL when it ends (the command line calls this first
    on a rank)."""
    die_with_parent(PARENT_ENV, signal.SIGKILL)


def _torchrun(argv: list[str]) -> None:
    """torchrun, ending with the step's process: SIGTERM then, on which torchrun stops its ranks
    as on any SIGTERM; the ranks it starts end with it (`worker_lifetime`)."""
    from torch.distributed.run import main

    die_with_parent(PARENT_ENV, signal.SIGTERM)
    os.environ[PARENT_ENV] = str(os.getpid())  # the ranks inherit it: they end with torchrun
    main(argv)


# --- a worker --------------------------------------------------------------------------------


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[tuple[World, torch.device]]:
    """This process in the training group: (its World, its device). SINGLE outside torchrun."""
    if not in_worker():
        yield SINGLE, device
        return
    world = World(*(int(os.environ[key]) for key in WORKER_ENV))
    for module in filter(None, os.environ.get(MODEL_MODULES_ENV, "").split(",")):
        importlib.import_module(module)
    timeout = _timeout()
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
    else:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world.size))
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local))
        dist.init_process_group("gloo", timeout=timeout)
    try:
        yield world, device
    finally:
        dist.destroy_process_group()


def _timeout() -> timedelta:
    return timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, TIMEOUT_S)))


def wrap(model: torch.nn.Module, world: World, device: torch.device) -> torch.nn.Module:
    """DDP around the parameters that train now (frozen ones are left out: wrap again when that
    changes, or DDP waits for gradients that never come)."""
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)


def total(values: torch.Tensor, world: World) -> torch.Tensor:
    """`values` summed over the ranks, in place."""
    if world.distributed:
        dist.all_reduce(values)
    return values


def any_rank(flag: torch.Tensor, world: World) -> torch.Tensor:
    """A boolean tensor, true where it is true on any rank."""
    if not world.distributed:
        return flag
    flag = flag.to(torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.bool()


def sync_buffers(module: torch.nn.Module, world: World) -> None:
    """Rank 0's buffers (batch-norm statistics, each rank's own from its own batches) everywhere,
    so that every rank validates the weights rank 0 saves."""
    if world.distributed:
        for buffer in module.buffers():
            dist.broadcast(buffer, 0)


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def stop_requested(out: Path, world: World, device: torch.device) -> str | None:
    """At the end of an epoch, on every rank: whether the parent asked the workers to stop (its
    callbacks did, hearing an epoch already written). Rank 0 looks and every rank hears it, so all
    stop after the same epoch. The parent's reason on rank 0, the one that reports it."""
    if not world.distributed:
        return None
    folder = out / outputs.DDP
    asked = torch.tensor(world.main and (folder / outputs.STOP).exists(), device=device)
    if not any_rank(asked, world):
        return None
    return _stop_reason(folder) if world.main else "the parent asked"


def announce(out: Path, world: World, resumed_from: int) -> None:
    """Rank 0 tells the parent which history rows are new (those after `resumed_from`)."""
    if world.distributed and world.main:
        write_json(out / outputs.DDP / outputs.STARTED, {"resumed_from": resumed_from})


def hand_back(out: Path, world: World, result: dict[str, Any]) -> None:
    """Rank 0's result, for the parent to return."""
    if world.distributed and world.main:
        write_json(out / outputs.DDP / outputs.RESULT, result)


if __name__ == "__main__":  # the launcher: `python -m components.training.ddp <torchrun's args>`
    _torchrun(sys.argv[1:])
