"""train: prepared images and an augmentation policy in; a trained model, its history and
checkpoints out.

Reads `paths.prepared` (arrays and manifest.json: channels, classes, size, mean/std),
`paths.augment`/policy.json and the `model` and `train` settings. Writes under `paths.train`:
- model.pt (+ .sha256): the best validated weights (the EMA's when train.ema > 0) with all that is
  needed to use them without params.yaml; `components.training.checkpoint.load_model` rebuilds it;
- history.json: one row per epoch (train/val loss and accuracy, lr, images/s, seconds);
- checkpoints/last.pt (every epoch: everything to continue exactly) and best.pt (weights of the
  best epoch by train.early_stopping_metric), each with a .sha256.

    cnn-pipeline train [--params params.yaml] [--set train.epochs=5 ...]

Resume (train.resume: auto) continues from last.pt when it was made with the same model and train
settings, policy, data and code, and ends exactly where an uninterrupted run would (on CPU).
When any of those changed, the run starts fresh and says what changed: `dvc exp run
--set-param train.lr=...` must train a new model, not refuse. `never` always starts fresh.

A callback may end the run after an epoch by raising StopTraining (a search's pruner does):
the outputs are written as after early stopping and TrainResult.stopped_by says why. On several
devices the parent hears each epoch after the workers wrote it, so they stop after the epoch they
are in when it asks (components.training.ddp, `stop_requested`).

Several devices (train.devices > 1 or auto): train() launches torchrun and tracks, the workers train
(components.training.ddp says who does what). Each epoch's order comes from (seed, epoch) and is the
same on every rank; each global batch of train.batch_size images is cut in one share per rank, the
gradients are averaged by DDP, the metrics summed over the ranks, and rank 0 alone writes. With
models without batch norm or dropout, that is one process's training up to the order of float
additions (tests/test_ddp.py). Batch norm normalises with each rank's own share, as DDP does by
default; out of memory on one rank ends the run (the ranks cannot halve alone).

Imbalanced classes: `train.class_weights` (balanced, or a weight per class name) weighs the training
loss (`weighted_cross_entropy`; validation loss stays unweighted, so best.pt is chosen on the same
scale as without); `train.sampler: balanced` draws each epoch so that every class is seen equally
often (components/training/batches.py, `BalancedOrder`). model.pt also carries the test split as the
kept weights score it, the reference of batch prediction's drift check (components/data/drift.py).

Around the loop: components/training/setup.py sets the run up (device, precision, model, optimizer,
schedule), components/training/batches.py holds the images on the device, components/training/ddp.py
spreads the run over several devices.

Where the time goes: `_train_epoch` and `_step` are the hot loop. Per step: an index slice of the
device-resident uint8 data (or a read from the memory map), one fused cast+scale+normalise (or
cast, augment, normalise), forward, backward, optional clipping, a fused optimizer step, optional
EMA, and a few tiny on-device accumulations. The host waits for the device only every LOG_EVERY
steps, when the progress shows the running loss (at most every BAR_EVERY_S on a terminal,
PLAIN_EVERY_S elsewhere: `EpochProgress`) and at the end of an epoch. A non-finite loss skips its
step without a host sync: the fused optimizers take a `found_inf` flag (as torch.amp.GradScaler
uses them).
"""

from __future__ import annotations

import contextlib
import math
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F
from tqdm import tqdm

from components.core import outputs
from components.core.atomic import write_json
from components.core.params import Params, UserError
from components.core.step_code import code_hashes
from components.data import drift
from components.data.dataset import class_names, load_split, read_manifest, require_two_classes
from components.training import batches, ddp, models, setup, transforms
from components.training import checkpoint as ckpt
from components.training.batches import Images, load_images

if TYPE_CHECKING:
    from timm.utils import ModelEmaV3  # imported where train.ema asks for it: timm is slow

LOG_EVERY = 25  # steps between non-finite checks (each one a host sync)
# Loss and accuracy on the progress bar are read from the device (a sync) at most this often;
# without a terminal (a log file, a Prefect worker, CI) a long epoch prints a plain line as often.
BAR_EVERY_S = 1.0
PLAIN_EVERY_S = 30.0
MIN_BATCH = 2  # halving on out-of-memory stops here: batch norm needs two samples
# Settings that change where or how fast a run computes, not what: resuming with other values of
# these is still the same run.
SAME_RUN_KEYS = {"resume", "device", "devices", "compile", "cudnn_benchmark", "device_data_mb",
                 "max_bad_steps", "early_stopping_patience"}
AMP = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(UserError):
    """The loss stayed NaN or infinite for train.max_bad_steps steps in a row."""


class StopTraining(Exception):  # noqa: N818 (a request, not an error)
    """A callback's on_epoch_end raises this to end the run after that epoch, cleanly: every
    callback still hears the epoch, and the checkpoints, history and model.pt are written as after
    early stopping. A search's pruner stops a trial this way; the message says why."""


class Callback(Protocol):
    """Tracking plugs in here (e.g. MLflow); train runs without any. on_train_start and
    on_train_end are optional; on_epoch_end may raise StopTraining."""

    def on_train_start(self, resumed_from: int) -> None: ...  # epochs done before this call

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None: ...

    def on_train_end(self, result: TrainResult) -> None: ...


@dataclass
class TrainResult:
    model_path: str
    history_path: str
    checkpoint_dir: str
    epochs: int  # completed, including those of a run resumed from
    best_epoch: int
    metric: str  # train.early_stopping_metric: what "best" means
    best_value: float | None  # None without a validation split
    resumed_from: int  # epochs already done when this call started; 0: fresh
    stopped_early: bool
    batch_size: int  # after any out-of-memory halving
    device: str
    precision: str
    train_seconds: float  # training time of the epochs run by this call
    images_per_s: float  # of all devices together
    devices: int = 1  # processes (DDP when > 1); batch_size is the global batch over all of them
    stopped_by: str | None = None  # why a callback stopped the run (StopTraining), e.g. a pruner


@dataclass
class Progress:
    """What the loop counts; saved in last.pt so a resumed run continues the same sequence."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken (the EMA's warmup counts them)
    batch_size: int = 0
    best_epoch: int = 0
    best_value: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Loop:
    """Everything the hot loop touches, built once."""

    cfg: Any
    device: torch.device
    amp: torch.dtype | None
    fmt: torch.memory_format
    model: torch.nn.Module
    forward: Any  # the model, or its torch.compile wrapper
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    ema: ModelEmaV3 | None
    augment: Any  # None when the policy changes nothing
    scale: torch.Tensor  # uint8 pixels -> normalised
    shift: torch.Tensor
    head: list[torch.nn.Parameter]
    train_data: Images
    val_data: Images
    bad_run: torch.Tensor = None  # consecutive non-finite steps, counted on the device
    worst_run: torch.Tensor = None
    world: ddp.World = ddp.SINGLE
    frozen: bool = False  # the backbone's state when `forward` (DDP) was made
    order: Any = None  # (seed, epoch) -> the epoch's indices (train.sampler)
    class_weights: torch.Tensor | None = None  # per class, in the loss (train.class_weights)

    def autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp)


class TrackedInputs:
    """What train puts in the pipeline's MLflow run besides each epoch's metrics: with a new run,
    its inputs (augment's policy and preview, the prepared data's manifest); at the end, the
    run's summary and history.json."""

    def __init__(self, params: Params, tracker: Any):
        self.params, self.tracker = params, tracker

    def on_train_start(self, resumed_from: int) -> None:
        if self.tracker.new_run:
            augment = Path(self.params.paths.augment)
            self.tracker.log_artifacts([augment / outputs.POLICY, augment / outputs.PREVIEW],
                                       "augment")
            self.tracker.log_artifacts([Path(self.params.paths.prepared) / outputs.MANIFEST],
                                       "data")

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        pass

    def on_train_end(self, result: TrainResult) -> None:
        if result.epochs > result.resumed_from:  # a finished run started again trained nothing
            self.tracker.log_metrics({"train.best_epoch": result.best_epoch,
                                      "train.seconds": result.train_seconds,
                                      "train.images_per_s": result.images_per_s},
                                     step=result.epochs)
            self.tracker.set_tags({"train.device": str(result.device),
                                   "train.precision": result.precision})
        self.tracker.log_artifacts([Path(result.history_path)], "train")


def train(params: Params, tracker: Callback | None = None,
          callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Train `params.model` on `params.paths.prepared` with `params.train`; see the module doc.
    `tracker` (components.tracking.run) is one more callback, heard first: its run is open
    before the others hear that training starts (a search's reporter reads run.json)."""
    tracked = [tracker, TrackedInputs(params, tracker)] if tracker is not None else []
    callbacks = [*tracked, *callbacks]
    manifest = read_manifest(params.paths.prepared)
    require_two_classes(manifest, params.paths.prepared)  # refused before any work
    class_weights(params.train, manifest)
    device, precision = setup.runtime(params.train)
    n = ddp.device_count(params.train, device)
    if n > 1 and not ddp.in_worker():
        result = TrainResult(**ddp.launch(params, n, callbacks, epoch_done))
    else:
        with ddp.process_group(device) as (world, device):
            callbacks = callbacks if world.main else ()
            result = _train(params, device, precision, world, callbacks)
            ddp.hand_back(Path(params.paths.train), world, asdict(result))
    for cb in callbacks:
        if hasattr(cb, "on_train_end"):
            cb.on_train_end(result)
    return result


def _train(params: Params, device, precision: str, world: ddp.World,
           callbacks: Sequence[Callback]) -> TrainResult:
    cfg = params.train
    out = Path(params.paths.train)
    ckdir = out / outputs.CHECKPOINTS
    manifest = read_manifest(params.paths.prepared)
    policy = transforms.load_policy(Path(params.paths.augment) / outputs.POLICY)
    fingerprint = _fingerprint(params, manifest, policy)
    if device.type == "cpu":
        setup.keep_freed_memory()
    with setup.deterministic(device, cfg.cudnn_benchmark):
        setup.seed(cfg.seed)
        loop, spec = _build(params, manifest, policy, device, precision, world)
        prog = Progress(batch_size=cfg.batch_size)
        saved = _resume_state(cfg, ckdir, fingerprint, world)
        if saved:
            prog = _restore(loop, saved)
            done = "finished: nothing to train" if _finished(cfg, prog) else "resuming"
            _say(f"{ckdir / outputs.LAST} is this run's, after epoch {prog.epoch}: {done}")
        ddp.announce(out, world, prog.epoch)
        ddp.started(callbacks, prog.epoch)
        resumed_from, seconds, images, stopped_by = prog.epoch, 0.0, 0, None
        while not stopped_by and not _finished(cfg, prog, say=True):
            row = _run_epoch(loop, prog, ckdir)
            seconds, images = seconds + row["train_s"], images + loop.train_data.n
            _end_epoch(loop, prog, row, ckdir, fingerprint)
            stopped_by = (epoch_done(callbacks, prog.epoch, prog.history[-1])
                          or ddp.stop_requested(out, world, device))
        if world.main:
            _write_outputs(params, spec, manifest, loop, prog)
    return TrainResult(
        model_path=str(out / outputs.MODEL), history_path=str(out / outputs.HISTORY),
        checkpoint_dir=str(ckdir), epochs=prog.epoch, best_epoch=prog.best_epoch,
        metric=cfg.early_stopping_metric, best_value=prog.best_value, resumed_from=resumed_from,
        stopped_early=prog.epoch < cfg.epochs, batch_size=prog.batch_size,
        device=device.type if world.distributed else str(device), precision=precision,
        train_seconds=round(seconds, 3),
        images_per_s=round(images / seconds, 1) if seconds else 0.0, devices=world.size,
        stopped_by=stopped_by,
    )


def epoch_done(callbacks: Sequence[Callback], epoch: int, row: dict) -> str | None:
    """Every callback hears the epoch; the reason of the first that asked to stop, if any."""
    stop = None
    for cb in callbacks:
        try:
            cb.on_epoch_end(epoch, row)
        except StopTraining as request:
            stop = stop or str(request) or f"{type(cb).__name__} stopped the run"
    if stop:
        _say(f"asked to stop after epoch {epoch}: {stop}")
    return stop


def _build(params: Params, manifest, policy, device, precision,
           world: ddp.World) -> tuple[Loop, dict]:
    cfg = params.train
    fmt = setup.memory_format(cfg.channels_last, precision)
    model, spec = setup.create_model(params.model, manifest)
    model.to(device=device, memory_format=fmt)
    augment = transforms.make_batch_augment(policy, len(manifest["classes"]))
    train_data, val_data = load_images(params.paths.prepared, device, fmt, cfg.device_data_mb)
    scale, shift = ckpt.scale_shift(manifest["mean"], manifest["std"], device)
    if cfg.ema:
        from timm.utils import ModelEmaV3
    loop = Loop(
        cfg=cfg, device=device, amp=AMP[precision], fmt=fmt, model=model,
        forward=_forward(model, cfg, world, device),
        opt=setup.optimizer(model, cfg),
        scaler=torch.amp.GradScaler("cuda") if precision == "fp16" else None,
        ema=ModelEmaV3(model, decay=cfg.ema, use_warmup=True) if cfg.ema else None,
        # transforms hands back its identity function when the policy changes nothing: then
        # the step scales and normalises uint8 pixels in one kernel.
        augment=None if augment is transforms.identity else augment,
        scale=scale, shift=shift,
        head=models.head_parameters(model) if cfg.freeze_epochs else [],
        train_data=train_data, val_data=val_data,
        bad_run=torch.zeros((), dtype=torch.int64, device=device),
        worst_run=torch.zeros((), dtype=torch.int64, device=device),
        world=world, order=_order(cfg, train_data),
    )
    weights = class_weights(cfg, manifest)
    if weights is not None:
        loop.class_weights = torch.tensor(weights, dtype=torch.float32, device=device)
    if cfg.freeze_epochs and not loop.head:
        raise UserError(f"model {params.model.name} has no classifier head to train alone; "
                        "set train.freeze_epochs=0")
    if not train_data.resident:
        _say(f"train+val images exceed train.device_data_mb = {cfg.device_data_mb}: streaming "
             "them from the memory-mapped arrays")
    return loop, spec


def _forward(model: torch.nn.Module, cfg, world: ddp.World, device: torch.device):
    """What the training step calls: the model, in DDP on several devices, compiled if asked."""
    net = ddp.wrap(model, world, device) if world.distributed else model
    return setup.compiled(net) if cfg.compile else net


def _resume_state(cfg, ckdir: Path, fingerprint: dict, world: ddp.World) -> dict | None:
    """last.pt when it continues this run; every rank reads the same file, rank 0 wrote it."""
    last = ckdir / outputs.LAST
    saved = ckpt.load(last) if cfg.resume == "auto" and last.exists() else None
    if saved is not None:
        changed = ckpt.changes(saved.get("fingerprint", {}), fingerprint)
        if not changed:
            return saved
        _say(f"{last} is from another run (changed: {', '.join(changed)}); starting fresh")
    ddp.barrier(world)  # every rank is done reading last.pt before rank 0 removes it
    if world.main and ckdir.exists():
        shutil.rmtree(ckdir)  # a stale best checkpoint must not outlive its run
    return None


def _restore(loop: Loop, saved: dict) -> Progress:
    loop.model.load_state_dict(saved["model"])
    loop.opt.load_state_dict(saved["optimizer"])
    if loop.ema is not None:
        loop.ema.load_state_dict(saved["ema"])
    if loop.scaler is not None and saved["scaler"]:
        loop.scaler.load_state_dict(saved["scaler"])
    ckpt.set_rng_state(saved["rng"])  # last: building the model drew from the generators
    return Progress(**saved["progress"])


def _run_epoch(loop: Loop, prog: Progress, ckdir: Path) -> dict[str, Any]:
    epoch = prog.epoch + 1
    t0 = time.perf_counter()
    train_loss, train_acc, lr, train_s = _train_epoch(loop, prog, epoch, ckdir)
    net = loop.ema.module if loop.ema is not None else loop.model
    val_loss, val_acc = _evaluate(loop, net, loop.val_data, 2 * prog.batch_size)
    return {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc,
            "val_loss": val_loss, "val_acc": val_acc, "lr": lr,
            "images_per_s": round(loop.train_data.n / train_s, 1),
            "epoch_s": round(time.perf_counter() - t0, 3), "train_s": train_s}


def _train_epoch(loop: Loop, prog: Progress, epoch: int, ckdir: Path):
    cfg, data, dev, world = loop.cfg, loop.train_data, loop.device, loop.world
    _freeze_backbone(loop, epoch <= cfg.freeze_epochs)
    # The order is the same on every rank; augmentation and dropout draw per rank. Both follow
    # from (seed, epoch), so a run resumed at an epoch boundary continues the same sequence.
    perm = loop.order(cfg.seed, epoch).to(data.index_device)
    setup.seed(batches.epoch_seed(cfg.seed, epoch, world.rank))
    loss_sum = torch.zeros((), device=dev)
    correct = torch.zeros((), dtype=torch.int64, device=dev)
    good = torch.zeros((), device=dev)
    bar = EpochProgress(f"epoch {epoch}/{cfg.epochs}", data.n, world.main)
    t0, i, mine, steps, lr = time.perf_counter(), 0, 0, 0, 0.0
    while i < data.n:
        batch = perm[i:i + prog.batch_size]  # the global batch; i counts every rank's images
        if len(batch) < world.size:
            break  # a last batch too small to share: at most devices-1 images skipped
        idx = batches.share(batch, world.rank, world.size)
        lr = setup.learning_rate(cfg, epoch - 1 + (i + len(batch) / 2) / data.n)
        # DDP averages the ranks' gradients; this weight makes that the mean over the global
        # batch when the shares differ in size (a last, uneven batch). 1 otherwise.
        weight = world.size * len(idx) / len(batch)
        try:
            loss, hits, bad = _step(loop, *data.rows(idx), lr, prog.step, weight)
        except torch.OutOfMemoryError:
            loss = None  # handled outside the except block, which holds the failed step's tensors
        if loss is None:
            _out_of_memory(loop, prog)
            continue
        loss_sum.add_(torch.where(bad, 0.0, loss), alpha=len(idx))
        good.add_(~bad, alpha=len(idx))
        correct.add_(hits)
        i, mine, steps, prog.step = i + len(batch), mine + len(idx), steps + 1, prog.step + 1
        bar.update(len(batch))
        if steps % LOG_EVERY == 0:
            _check_finite(loop, prog, ckdir)
        if bar.due():
            bar.show(i, (loss_sum / good).item(), correct.item() / mine)
    _check_finite(loop, prog, ckdir)
    sums = torch.stack([loss_sum.double(), good.double(), correct.double()])
    loss_sum, good, hits = ddp.total(sums, world).tolist()  # waits for the device
    train_s = time.perf_counter() - t0
    bar.close()
    return loss_sum / good if good else math.nan, hits / i, lr, train_s


class EpochProgress:
    """An epoch's progress: on a terminal, a tqdm bar that moves with every step and shows the
    running loss and accuracy (read from the device at most every BAR_EVERY_S); elsewhere, a
    plain line every PLAIN_EVERY_S of a long epoch (short epochs print only their end-of-epoch
    line). Only the process that reports (`shown`: rank 0) prints."""

    def __init__(self, desc: str, total: int, shown: bool):
        self.desc, self.total = desc, total
        self.bar = tqdm(total=total, desc=desc, unit="img", disable=None if shown else True,
                        leave=False, file=sys.stderr)
        self.plain = shown and self.bar.disable  # not a terminal
        self.every = PLAIN_EVERY_S if self.plain else BAR_EVERY_S
        self.next = time.monotonic() + self.every

    def update(self, n: int) -> None:
        self.bar.update(n)  # returns at once when disabled; redraws at most every 0.1 s

    def due(self) -> bool:
        return (self.plain or not self.bar.disable) and time.monotonic() >= self.next

    def show(self, done: int, loss: float, acc: float) -> None:
        self.next = time.monotonic() + self.every
        if self.plain:
            _say(f"{self.desc}: {done}/{self.total} images, loss {loss:.4f} acc {acc:.4f}")
        else:
            self.bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.4f}")

    def close(self) -> None:
        self.bar.close()


def _step(loop: Loop, xb: torch.Tensor, yb: torch.Tensor, lr: float, step: int,
          weight: float = 1.0):
    """One optimizer step on a uint8 batch; returns on-device (loss, correct, non-finite)."""
    for group in loop.opt.param_groups:
        group["lr"] = lr
    if loop.augment is None:
        x, target = torch.addcmul(loop.shift, xb, loop.scale), yb  # one kernel from uint8
    else:
        x, target = loop.augment(xb.float().mul_(1 / 255), yb)
        x = torch.addcmul(loop.shift, x, loop.scale, value=255.0)
    x = x.contiguous(memory_format=loop.fmt)  # a no-op unless augmentation changed the layout
    with loop.autocast():
        logits = loop.forward(x)
        if loop.class_weights is None:
            loss = F.cross_entropy(logits, target, label_smoothing=loop.cfg.label_smoothing)
            scaled = loss if weight == 1.0 else loss * weight
        else:
            loss, scaled = _weighted_loss(loop, logits, target)
    (loop.scaler.scale(scaled) if loop.scaler else scaled).backward()  # DDP: gradients synced
    if loop.cfg.grad_clip:
        if loop.scaler:
            loop.scaler.unscale_(loop.opt)
        norm = torch.nn.utils.clip_grad_norm_(loop.model.parameters(), loop.cfg.grad_clip)
        bad = ~torch.isfinite(norm)  # catches non-finite gradients of a finite loss too
    else:
        bad = ~torch.isfinite(loss.detach())
    bad = ddp.any_rank(bad, loop.world)  # one rank's NaN is in everyone's averaged gradients
    if loop.scaler:  # fp16: the scaler skips non-finite steps itself
        loop.scaler.step(loop.opt)
        loop.scaler.update()
    else:
        loop.opt.found_inf = bad.float()  # read by the fused kernels: 1 skips the update
        loop.opt.grad_scale = None
        loop.opt.step()
    loop.opt.zero_grad(set_to_none=True)
    if loop.ema is not None:
        loop.ema.update(loop.model, step=step)
    loop.bad_run.add_(1).mul_(bad)
    torch.maximum(loop.worst_run, loop.bad_run, out=loop.worst_run)
    labels = target.argmax(1) if target.ndim == 2 else target  # soft targets: mixup/cutmix
    return loss.detach().float(), (logits.detach().argmax(1) == labels).sum(), bad


def weighted_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor,
                           label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of weighted per-sample losses, sum of the weights): their ratio is the class-weighted
    cross-entropy. Each sample weighs its target's mix of class weights: its class's weight for
    a hard label; with label smoothing or mixup/cutmix (soft targets) the weights mixed in the
    target's proportions, so a mixed pair of a rare and a common image weighs in between. For
    hard labels without smoothing the ratio is torch's `cross_entropy(weight=...)`."""
    k = logits.shape[1]
    q = target.float() if target.ndim == 2 else F.one_hot(target, k).float()
    if label_smoothing:
        q = q * (1.0 - label_smoothing) + label_smoothing / k  # torch's smoothing of any target
    per_sample = -(q * F.log_softmax(logits.float(), dim=1)).sum(1)
    w = (q * weights).sum(1)  # not a matmul: autocast would round the weights to 16 bits
    return (w * per_sample).sum(), w.sum()


def _weighted_loss(loop: Loop, logits: torch.Tensor, target: torch.Tensor):
    """(the loss to report, the one to back-propagate), class-weighted. Normalised by the summed
    weights of the whole global batch (one all-reduce under DDP), so that DDP's mean over the
    ranks is the weighted mean over the global batch, as one process computes it."""
    num, den = weighted_cross_entropy(logits, target, loop.class_weights,
                                      loop.cfg.label_smoothing)
    total = ddp.total(den.detach().clone(), loop.world)
    return num / den, num * (loop.world.size / total.clamp_min(1e-12))


def class_weights(cfg, manifest: dict) -> list[float] | None:
    """train.class_weights as one weight per class (the manifest's order), or None for none.
    balanced: n / (classes present × the class's count), from the train split's counts
    (scikit-learn's "balanced"); a class with no training image gets 0 (nothing to weigh).
    A mapping: its weights by class name, 1 for the classes it leaves out."""
    if cfg.class_weights == "none":
        return None
    names = class_names(manifest)
    if cfg.class_weights == "balanced":
        counts = [int(manifest["counts"]["train"].get(c, 0)) for c in names]
        present = sum(1 for n in counts if n)
        return [sum(counts) / (present * n) if n else 0.0 for n in counts]
    unknown = sorted(set(cfg.class_weights) - set(names))
    if unknown:
        shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
        raise UserError(f"train.class_weights names classes the data does not have: "
                        f"{', '.join(unknown)}; its classes are {shown}")
    return [float(cfg.class_weights.get(c, 1.0)) for c in names]


def _order(cfg, data: Images):
    """train.sampler: the epoch's indices as a function of (seed, epoch)."""
    if cfg.sampler == "balanced":
        return batches.BalancedOrder(data.y.cpu().numpy())
    return lambda seed, epoch: batches.epoch_order(data.n, seed, epoch)


def _freeze_backbone(loop: Loop, frozen: bool) -> None:
    """Only the head trains while frozen; the backbone's batch norms keep their statistics."""
    head = {id(p) for p in loop.head}
    for p in loop.model.parameters():
        p.requires_grad_(not frozen or id(p) in head)
    loop.model.train()
    if frozen:
        loop.model.eval()
        heads = loop.model.get_classifier()
        for h in heads if isinstance(heads, (tuple, list)) else (heads,):
            h.train()
    if loop.world.distributed and frozen != loop.frozen:
        loop.forward = _forward(loop.model, loop.cfg, loop.world, loop.device)
    loop.frozen = frozen


def _out_of_memory(loop: Loop, prog: Progress) -> None:
    world = loop.world
    if world.distributed:
        # The ranks step together: one cannot go on with a smaller batch alone.
        raise UserError(
            f"out of memory on rank {world.rank} ({loop.device}) at {prog.batch_size // world.size}"
            f" images per device (train.batch_size = {prog.batch_size} over {world.size} "
            "devices); lower train.batch_size, use a smaller model or image size, or "
            "train.precision=bf16"
        )
    loop.opt.zero_grad(set_to_none=True)
    if loop.device.type == "cuda":
        torch.cuda.empty_cache()
    prog.batch_size = _halve(prog.batch_size, "training")


def _halve(batch_size: int, what: str) -> int:
    if batch_size // 2 < MIN_BATCH:
        raise UserError(
            f"out of memory during {what} even at batch size {batch_size}; use a smaller model "
            "or image size, or train.precision=bf16"
        )
    _say(f"out of memory during {what} at batch size {batch_size}: going on with "
         f"{batch_size // 2}")
    return batch_size // 2


def _check_finite(loop: Loop, prog: Progress, ckdir: Path) -> None:
    worst = int(loop.worst_run.item())
    if worst < loop.cfg.max_bad_steps:
        return
    last = ckdir / outputs.LAST
    kept = (f"the last good checkpoint is {last} (epoch {prog.epoch})" if last.exists()
            else "no checkpoint was written yet")
    raise NonFiniteLossError(
        f"the loss was NaN or infinite for {worst} steps in a row (train.max_bad_steps = "
        f"{loop.cfg.max_bad_steps}) in epoch {prog.epoch + 1}; stopped, {kept}. Lower "
        "train.lr, set train.grad_clip (e.g. 1.0) or use train.precision=fp32"
    )


def _evaluate(loop: Loop, net, data: Images, batch_size: int):
    """(loss, accuracy) on a split, or (None, None) when it is empty; each rank scores its part."""
    if data.n == 0:
        return None, None
    ddp.sync_buffers(net, loop.world)
    part = batches.part(data.n, loop.world.rank, loop.world.size)
    loss, correct = ddp.total(_score(loop, net, data, part, batch_size), loop.world).tolist()
    return loss / data.n, correct / data.n


@torch.no_grad()
def _score(loop: Loop, net, data: Images, part: range, batch_size: int) -> torch.Tensor:
    """[summed loss, correct] over rows `part`; halves the batch on out-of-memory."""
    net.eval()
    try:
        loss = torch.zeros((), device=loop.device)
        correct = torch.zeros((), dtype=torch.int64, device=loop.device)
        for i in range(part.start, part.stop, batch_size):
            xb, yb = data.span(i, min(i + batch_size, part.stop))
            x = torch.addcmul(loop.shift, xb, loop.scale).contiguous(memory_format=loop.fmt)
            with loop.autocast():
                logits = net(x).float()
            loss += F.cross_entropy(logits, yb, reduction="sum")
            correct += (logits.argmax(1) == yb).sum()
        return torch.stack([loss.double(), correct.double()])
    except torch.OutOfMemoryError:
        pass
    return _score(loop, net, data, part, _halve(batch_size, "evaluation"))


def _end_epoch(loop: Loop, prog: Progress, row: dict, ckdir: Path, fingerprint: dict) -> None:
    """Best, then last, then history: a kill between any two leaves a consistent set."""
    cfg = loop.cfg
    row.pop("train_s")
    prog.epoch = row["epoch"]
    prog.history.append(row)
    value = row[cfg.early_stopping_metric]
    better = (value is None or prog.best_value is None
              or (value > prog.best_value if cfg.early_stopping_metric == "val_acc"
                  else value < prog.best_value))
    if better:
        prog.best_epoch, prog.best_value = prog.epoch, value
    if not loop.world.main:
        return  # every rank keeps the same Progress; rank 0 writes it
    if better:
        net = loop.ema.module if loop.ema is not None else loop.model
        ckpt.save(ckdir / outputs.BEST, {"state_dict": net.state_dict(), "epoch": prog.epoch,
                                      "metrics": row})
    ckpt.save(ckdir / outputs.LAST, {
        "fingerprint": fingerprint, "progress": asdict(prog),
        "model": loop.model.state_dict(), "optimizer": loop.opt.state_dict(),
        "ema": loop.ema.state_dict() if loop.ema is not None else None,
        "scaler": loop.scaler.state_dict() if loop.scaler is not None else None,
        "rng": ckpt.rng_state(),
    })
    write_json(ckdir.parent / outputs.HISTORY, prog.history)
    val = "" if row["val_acc"] is None else (
        f" val_loss {row['val_loss']:.4f} val_acc {row['val_acc']:.4f}")
    _say(f"epoch {prog.epoch}/{cfg.epochs} loss {row['train_loss']:.4f} "
         f"acc {row['train_acc']:.4f}{val} {row['images_per_s']:.0f} img/s {row['epoch_s']:.1f}s")


def _finished(cfg, prog: Progress, say: bool = False) -> bool:
    """All epochs done, or the patience for early stopping spent."""
    if prog.epoch >= cfg.epochs:
        return True
    patience = cfg.early_stopping_patience
    spent = bool(patience) and prog.epoch - prog.best_epoch >= patience
    if spent and say:
        _say(f"early stop after epoch {prog.epoch}: {cfg.early_stopping_metric} has not improved "
             f"since epoch {prog.best_epoch}")
    return spent


def _write_outputs(params: Params, spec: dict, manifest: dict, loop: Loop,
                   prog: Progress) -> None:
    """model.pt from the best checkpoint, with its test-split reference, and the whole history:
    written again when a finished run is started again, so every output DVC expects is there
    after any invocation."""
    out = Path(params.paths.train)
    best = ckpt.load(out / outputs.CHECKPOINTS / outputs.BEST)
    reference = _test_reference(params, manifest, loop, best["state_dict"], 2 * prog.batch_size)
    ckpt.save(out / outputs.MODEL, ckpt.model_file(
        spec, manifest, best["state_dict"], epoch=best["epoch"], metrics=best["metrics"],
        ema=loop.ema is not None, **({"reference": reference} if reference else {})))
    write_json(out / outputs.HISTORY, prog.history)


@torch.no_grad()
def _test_reference(params: Params, manifest: dict, loop: Loop, weights: dict,
                    batch_size: int) -> dict | None:
    """What batch prediction compares new images with (components/data/drift.py), carried in
    model.pt: the test split scored with the kept weights by evaluate's and predict's
    `checkpoint.score` (fp32, the same normalisation; without evaluate.tta_flip, which drift.json
    notes when a batch is scored with it). Measured here, after training, so that the model file
    alone holds it (evaluate may not rewrite train's outputs); the weights were chosen on the
    validation
    split, and nothing in training depends on this. None without a test split."""
    test = load_split(params.paths.prepared, "test")
    if len(test.y) == 0:
        return None
    net = loop.ema.module if loop.ema is not None else loop.model
    net.load_state_dict(weights)  # training is over: score with the weights model.pt keeps
    net.eval()
    while True:
        try:
            logp = ckpt.score(net, manifest, test.x, loop.device, batch_size)
            return drift.reference(logp, class_names(manifest))
        except torch.OutOfMemoryError:
            pass  # halved outside the except block, which holds the failed batch's tensors
        batch_size = _halve(batch_size, "scoring the test split")


def _fingerprint(params: Params, manifest: dict, policy: dict) -> dict:
    """What last.pt must share with this run to be continued: settings that change the numbers,
    the data, the policy, and the code of this step (components/core/step_code.py: its imports)."""
    return dict(
        model=params.model.model_dump(mode="json"),
        train=params.train.model_dump(mode="json", exclude=SAME_RUN_KEYS),
        policy=policy,
        data={"hashes": manifest.get("hashes"), "classes": class_names(manifest),
              "image_size": manifest["image_size"], "channels": manifest["channels"]},
        code=code_hashes("components.train"),
    )


def _say(message: str) -> None:
    tqdm.write(message, file=sys.stderr)
