"""train: the real entry point on real (tiny) data; what it writes; exact determinism and exact
resume after SIGKILL on CPU; refused checkpoints; non-finite losses; out-of-memory halving; the
frozen backbone; optimizer groups; bf16 and channels_last; bad settings.

Data: scikit-learn's digits (8×8×1, ~1300 training images) through the real prepare and augment
steps, once per module. Models that misbehave on purpose (NaN, out of memory) are registered with
timm here, so train creates them by name like any other.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from timm.models import register_model

from components import checkpoint as ckpt
from components import recipe
from components.augment import augment
from components.params import ParamsError, UserError, load_params
from components.prepare import prepare
from components.prepared import load_split
from components.train import NonFiniteLossError, train

TIMING = {"images_per_s", "epoch_s"}  # the only history fields that may differ between runs


# ---------------------------------------------------------------------------------------------
# Models that fail on purpose, registered like any timm model.


class _Tiny(nn.Module):
    def __init__(self, num_classes: int = 10, in_chans: int = 1, **_):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)
        self.calls = 0

    def forward(self, x):
        self.calls += self.training
        return self.fc(self.conv(x).relu().mean((2, 3)))


class _NaNAfter(_Tiny):
    def forward(self, x):
        out = super().forward(x)
        return out * float("nan") if self.calls > 25 else out


class _NaNEvery4th(_Tiny):
    def forward(self, x):
        out = super().forward(x)
        return out * float("nan") if self.calls % 4 == 0 else out


class _OutOfMemoryAlways(_Tiny):
    def forward(self, x):
        raise torch.OutOfMemoryError("simulated: nothing fits")


class _OutOfMemoryAbove16(_Tiny):
    def forward(self, x):
        if x.shape[0] > 16:
            raise torch.OutOfMemoryError(f"simulated: batch of {x.shape[0]} does not fit")
        return super().forward(x)


@register_model
def fake_nan_after_25_steps(pretrained=False, **kwargs):
    return _NaNAfter(**kwargs)


@register_model
def fake_nan_every_4th_step(pretrained=False, **kwargs):
    return _NaNEvery4th(**kwargs)


@register_model
def fake_oom_above_16(pretrained=False, **kwargs):
    return _OutOfMemoryAbove16(**kwargs)


@register_model
def fake_oom_always(pretrained=False, **kwargs):
    return _OutOfMemoryAlways(**kwargs)


# ---------------------------------------------------------------------------------------------
# Data and settings


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Prepared digits and two policies (none, basic), made by the real steps."""
    root = tmp_path_factory.mktemp("digits")
    for preset in ("none", "basic"):
        path = root / f"{preset}.yaml"
        path.write_text(f"paths:\n  prepared: {root / 'prepared'}\n"
                        f"  augment: {root / ('augment_' + preset)}\n")
        params = load_params(path, [f"augment.preset={preset}"])
        if preset == "none":
            prepare(params)
        augment(params)
    return root


def settings(tmp_path: Path, data: Path, *overrides: str, policy: str = "none"):
    """(params, params.yaml) for a run writing under `tmp_path`; small and fast by default."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "params.yaml"
    path.write_text(
        f"paths:\n  prepared: {data / 'prepared'}\n  augment: {data / ('augment_' + policy)}\n"
        f"  train: {tmp_path / 'train'}\n"
        f"augment:\n  preset: {policy}\n"
        "train:\n  epochs: 1\n  batch_size: 64\n  warmup_epochs: 0\n  precision: fp32\n"
    )
    return load_params(path, list(overrides)), path


def run_cli(path: Path, *overrides: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "components.train", "--params", str(path)]
    for item in overrides:
        args += ["--set", item]
    # main() tracks in MLflow: an SQLite store beside the run, not in the project or the user's.
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{path.parent / 'mlflow.db'}"}
    return subprocess.Popen(args, cwd=path.parent, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def history(out: Path) -> list[dict]:
    return json.loads((out / "history.json").read_text())


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def weights(path: Path, key: str = "state_dict") -> dict[str, torch.Tensor]:
    return ckpt.load(path, what="file")[key]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


# ---------------------------------------------------------------------------------------------
# Entry point and outputs


def test_entry_point_trains_one_epoch_and_writes_its_files(tmp_path, data):
    _, path = settings(tmp_path, data, policy="basic")
    proc = run_cli(path, "train.epochs=1")
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stderr
    result = json.loads(stdout)
    out = tmp_path / "train"
    assert result["epochs"] == 1 and result["resumed_from"] == 0
    assert Path(result["model_path"]) == out / "model.pt"
    rows = history(out)
    assert [r["epoch"] for r in rows] == [1]
    assert set(rows[0]) == {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr",
                            "images_per_s", "epoch_s"}
    assert 0.0 <= rows[0]["val_acc"] <= 1.0 and np.isfinite(rows[0]["train_loss"])
    for name in ("model.pt", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (out / name).is_file() and (out / (name + ".sha256")).is_file(), name
    assert "epoch 1/1" in stderr  # the per-epoch line, also when no progress bar is shown


def test_model_file_rebuilds_the_model_and_predicts_what_training_measured(tmp_path, data):
    params, _ = settings(tmp_path, data, "train.epochs=3", "train.ema=0.9")
    result = train(params)
    model, meta = ckpt.load_model(result.model_path)
    assert meta["model"] == {"name": "simple_cnn",
                             "kwargs": {"num_classes": 10, "in_chans": 1, "img_size": 8}}
    assert meta["classes"] == [str(i) for i in range(10)]
    assert meta["image_size"] == [8, 8] and meta["channels"] == 1 and meta["ema"] is True
    assert len(meta["mean"]) == len(meta["std"]) == 1
    assert meta["epoch"] == result.best_epoch
    val = load_split(data / "prepared", "val")
    with torch.no_grad():
        predicted = model(ckpt.prepare_input(val.x, meta)).argmax(1).numpy()
    assert (predicted == val.y).mean() == pytest.approx(meta["metrics"]["val_acc"], abs=1e-9)
    best_row = history(tmp_path / "train")[result.best_epoch - 1]
    assert meta["metrics"] == best_row and best_row["val_loss"] == result.best_value


def test_two_runs_with_the_same_seed_are_identical(tmp_path, data):
    # Promised on the CPU. On a GPU some kernels (cuDNN's backward passes among them) add in a
    # varying order: two runs on an H200 differed in conv1.weight (bench/RESULTS.md, "GPU").
    results = []
    for name in ("a", "b"):
        params, _ = settings(tmp_path / name, data, "train.epochs=2", "train.device=cpu",
                             policy="basic")
        results.append(train(params))
    a, b = (Path(r.model_path).parent for r in results)
    assert_same_weights(weights(a / "model.pt"), weights(b / "model.pt"))
    assert without_timing(history(a)) == without_timing(history(b))
    params, _ = settings(tmp_path / "c", data, "train.epochs=2", "train.seed=1", "train.device=cpu",
                         policy="basic")
    other = train(params)
    assert not torch.equal(weights(a / "model.pt")["fc.weight"],
                           weights(Path(other.model_path))["fc.weight"])


def test_a_run_killed_with_sigkill_resumes_to_the_same_weights_and_metrics(tmp_path, data):
    # Small batches make an epoch long enough (81 steps) to kill the run inside the next one.
    # Bit-for-bit equality is promised on the CPU (see the test above).
    run = ("train.epochs=3", "train.batch_size=16", "train.warmup_epochs=1", "train.ema=0.9",
           "train.device=cpu")
    params, _ = settings(tmp_path / "whole", data, *run, policy="basic")
    whole = Path(train(params).model_path).parent

    _, path = settings(tmp_path / "killed", data, *run, policy="basic")
    out = tmp_path / "killed" / "train"
    proc = run_cli(path, *run)
    deadline = time.monotonic() + 180
    while not (out / "checkpoints" / "last.pt").exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "no checkpoint within 180 s"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    done = ckpt.load(out / "checkpoints" / "last.pt")["progress"]["epoch"]
    assert done < 3, "the run finished before it was killed: nothing was tested"

    resumed = run_cli(path, *run)
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert json.loads(stdout)["resumed_from"] == done
    assert f"resuming from {out / 'checkpoints' / 'last.pt'}" in stderr
    assert_same_weights(weights(whole / "model.pt"), weights(out / "model.pt"))
    for key in ("model", "optimizer"):
        a = ckpt.load(whole / "checkpoints" / "last.pt")[key]
        b = ckpt.load(out / "checkpoints" / "last.pt")[key]
        assert str(a) == str(b), key
    assert without_timing(history(whole)) == without_timing(history(out))


def test_a_run_with_other_settings_starts_fresh_and_a_finished_one_is_not_repeated(tmp_path,
                                                                                   data):
    params, path = settings(tmp_path, data, "train.epochs=1")
    assert train(params).resumed_from == 0
    again = train(params)
    assert again.resumed_from == 1 and again.epochs == 1 and again.train_seconds == 0
    longer = train(load_params(path, ["train.epochs=2"]))
    assert longer.resumed_from == 0 and longer.epochs == 2


# ---------------------------------------------------------------------------------------------
# Refused checkpoints


@pytest.mark.parametrize("damage", ["flip a byte", "truncate"])
def test_a_damaged_checkpoint_is_refused_naming_the_file(tmp_path, data, damage):
    params, _ = settings(tmp_path, data, "train.epochs=1")
    train(params)
    last = tmp_path / "train" / "checkpoints" / "last.pt"
    raw = bytearray(last.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:
        raw[len(raw) // 2] ^= 0xFF
    last.write_bytes(bytes(raw))
    with pytest.raises(UserError) as info:
        train(params)
    message = str(info.value)
    assert str(last) in message and "sha256" in message
    assert "delete it" in message and "train.resume=never" in message
    assert train(load_params(tmp_path / "params.yaml", ["train.resume=never"])).epochs == 1


def test_a_tampered_model_file_is_refused(tmp_path, data):
    params, _ = settings(tmp_path, data)
    model_path = Path(train(params).model_path)
    raw = bytearray(model_path.read_bytes())
    raw[100] ^= 0xFF
    model_path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="does not match its sha256"):
        ckpt.load_model(model_path)


def test_a_kill_between_a_file_and_its_hash_leaves_a_pair_that_verifies(tmp_path):
    # save() lists the old and the new hash while it moves the file, then only the new one.
    path = ckpt.save(tmp_path / "x.pt", {"v": torch.zeros(3)})
    old = ckpt.sha256_path(path).read_text()
    ckpt.save(path, {"v": torch.ones(3)})
    new = ckpt.sha256_path(path).read_text()
    assert len(new.splitlines()) == 1
    ckpt.sha256_path(path).write_text(new + old)  # killed after the move, before the last write
    assert torch.equal(ckpt.load(path)["v"], torch.ones(3))
    ckpt.sha256_path(path).write_text(old)  # a hash that does not belong to this file
    with pytest.raises(UserError, match="does not match its sha256"):
        ckpt.load(path)


# ---------------------------------------------------------------------------------------------
# Failures during training


def test_non_finite_losses_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path, data):
    params, _ = settings(tmp_path, data, "model.name=fake_nan_after_25_steps", "train.epochs=3",
                         "train.max_bad_steps=5")
    with pytest.raises(NonFiniteLossError) as info:
        train(params)
    last = tmp_path / "train" / "checkpoints" / "last.pt"
    assert "train.max_bad_steps" in str(info.value) and str(last) in str(info.value)
    saved = ckpt.load(last)
    assert saved["progress"]["epoch"] == 1  # 21 steps of epoch 1 were good
    assert all(torch.isfinite(v).all() for v in saved["model"].values())


def test_isolated_non_finite_steps_are_skipped(tmp_path, data):
    params, _ = settings(tmp_path, data, "model.name=fake_nan_every_4th_step", "train.epochs=2",
                         "train.max_bad_steps=2", "train.optimizer=sgd", "train.grad_clip=1.0")
    result = train(params)
    assert result.epochs == 2
    rows = history(tmp_path / "train")
    assert all(np.isfinite(r["train_loss"]) and np.isfinite(r["val_loss"]) for r in rows)
    assert all(torch.isfinite(v).all() for v in weights(Path(result.model_path)).values())


def test_out_of_memory_halves_the_batch_and_goes_on(tmp_path, data):
    params, _ = settings(tmp_path, data, "model.name=fake_oom_above_16", "train.batch_size=64",
                         "train.epochs=2")
    result = train(params)
    assert result.batch_size == 16 and result.epochs == 2
    saved = ckpt.load(tmp_path / "train" / "checkpoints" / "last.pt")
    assert saved["progress"]["batch_size"] == 16  # a resumed run keeps the smaller batch
    # Every image was still seen once per epoch: 1295 images at 16 per step.
    assert saved["progress"]["step"] == 2 * -(-1295 // 16)


def test_out_of_memory_at_the_smallest_batch_is_a_clear_error(tmp_path, data):
    params, _ = settings(tmp_path, data, "model.name=fake_oom_always")
    with pytest.raises(UserError, match="out of memory during training even at batch size 2"):
        train(params)


# ---------------------------------------------------------------------------------------------
# Transfer learning, optimizer, precision


def test_frozen_epochs_train_only_the_head(tmp_path, data):
    params, _ = settings(tmp_path / "source", data, "train.epochs=1")
    source = train(params).model_path
    start = weights(Path(source))

    seen = {}

    class Snapshot:
        def on_epoch_end(self, epoch, metrics):
            seen[epoch] = weights(tmp_path / "train" / "checkpoints" / "last.pt", "model")

        def on_train_end(self, result):
            seen["result"] = result

    params, _ = settings(tmp_path, data, f"model.checkpoint={source}", "train.epochs=2",
                         "train.freeze_epochs=1")
    train(params, callbacks=[Snapshot()])
    head = {"fc.weight", "fc.bias"}
    for name in start:
        frozen_same = torch.equal(seen[1][name], start[name])
        assert frozen_same == (name not in head), f"epoch 1: {name}"
        assert not torch.equal(seen[2][name], seen[1][name]), f"epoch 2: {name} did not train"
    assert seen["result"].epochs == 2


def test_a_checkpoint_with_other_classes_gets_a_new_head(tmp_path, data):
    params, _ = settings(tmp_path, data)
    source = train(params).model_path
    kwargs = {"num_classes": 3, "in_chans": 1, "img_size": 8}
    model = ckpt.init_from(source, "simple_cnn", kwargs, ["a", "b", "c"])
    saved = weights(Path(source))
    assert model.fc.out_features == 3
    assert torch.equal(model.state_dict()["conv1.weight"], saved["conv1.weight"])
    with pytest.raises(UserError, match="holds a simple_cnn model"):
        ckpt.init_from(source, "lenet5", kwargs, ["a", "b", "c"])
    # A URI with a scheme goes through MLflow's artifact download (file: needs no server).
    downloaded = ckpt.resolve_model_uri(Path(source).parent.as_uri())
    assert downloaded.name == "model.pt"
    assert torch.equal(weights(downloaded)["fc.weight"], saved["fc.weight"])


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_no_weight_decay_on_biases_and_norms(tmp_path, data, optimizer):
    params, _ = settings(tmp_path, data, f"train.optimizer={optimizer}", "model.name=cifar_cnn",
                         "train.weight_decay=0.05", "train.momentum=0.8")
    train(params)
    opt = ckpt.load(tmp_path / "train" / "checkpoints" / "last.pt")["optimizer"]
    groups = opt["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    buffer = "exp_avg" if optimizer == "adamw" else "momentum_buffer"  # shaped like its parameter
    for group in groups:
        ndims = {opt["state"][index][buffer].ndim for index in group["params"]}
        assert ndims == ({2, 4} if group["weight_decay"] else {1})
    if optimizer == "sgd":
        assert groups[0]["nesterov"] and groups[0]["momentum"] == 0.8


@pytest.mark.parametrize("benchmark", [False, True])
def test_cudnn_autotuning_follows_the_setting_on_a_gpu_and_is_restored_after(benchmark):
    # Setting the flags needs no GPU: this checks what a CUDA run gets (bench_cuda.py runs one
    # for real).
    before = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = not benchmark
        with recipe.deterministic(torch.device("cuda"), benchmark):
            assert torch.backends.cudnn.benchmark is benchmark
        assert torch.backends.cudnn.benchmark is not benchmark
        with recipe.deterministic(torch.device("cpu"), benchmark):
            assert torch.backends.cudnn.benchmark is not benchmark  # a CPU run leaves it
            assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.backends.cudnn.benchmark = before


@pytest.mark.parametrize("precision,channels_last", [("bf16", False), ("fp32", True),
                                                     ("bf16", True)])
def test_precision_and_memory_format_run_on_cpu(tmp_path, data, precision, channels_last):
    params, _ = settings(tmp_path, data, f"train.precision={precision}", "model.name=cifar_cnn",
                         f"train.channels_last={channels_last}", policy="basic")
    result = train(params)
    assert result.precision == precision
    row = history(tmp_path / "train")[0]
    assert np.isfinite(row["train_loss"]) and row["val_acc"] > 0.1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc tuning")
def test_freed_activation_memory_is_reused_without_page_faults():
    # Four 6 MiB blocks freed each "step", as activations are. With glibc's initial setting
    # (blocks from 128 KiB up are mapped afresh and unmapped when freed) every step faults
    # them in again. glibc raises that bound as it goes, depending on the heap's history, so
    # a fresh process with the setting pinned makes the "before" certain.
    code = """
import resource, torch
from components import recipe
def faults_per_step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        blocks = [torch.ones(6 << 20, dtype=torch.uint8) for _ in range(4)]
        del blocks
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10
faults_per_step()
default = faults_per_step()
recipe.keep_freed_memory()
faults_per_step()
print(default, faults_per_step())
"""
    env = {**os.environ, "GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], env=env, check=True)
    default, kept = map(float, proc.stdout.split())
    assert default > 6000, default  # 24 MiB is 6,144 pages of 4 KiB
    assert kept < 10, kept


def test_streaming_from_disk_trains_like_resident_data(tmp_path, data):
    params, _ = settings(tmp_path, data, "train.device_data_mb=0", "train.epochs=2")
    assert train(params).epochs == 2
    assert history(tmp_path / "train")[-1]["val_acc"] > 0.5


def test_early_stopping_ends_the_run_when_the_metric_stalls(tmp_path, data):
    params, _ = settings(tmp_path, data, "train.epochs=5", "train.lr=1e-9",
                         "train.early_stopping_patience=1", "train.early_stopping_metric=val_acc")
    result = train(params)
    assert result.stopped_early and result.epochs == 2 and result.best_epoch == 1


# ---------------------------------------------------------------------------------------------
# Settings


@pytest.mark.parametrize("override,key", [
    ("train.precision=fp16", "train.precision"),
    ("train.device=cuda", "train.device"),
    ("model.name=no_such_model", "no_such_model"),
])
def test_settings_this_machine_cannot_run_are_refused(tmp_path, data, override, key):
    if torch.cuda.is_available() and ("cuda" in override or "fp16" in override):
        pytest.skip("a GPU is present: these settings are valid here")
    params, _ = settings(tmp_path, data, override)
    with pytest.raises(UserError, match=key):
        train(params)


@pytest.mark.parametrize("override,key", [
    ("train.lr=0", "train.lr"),
    ("train.optimizer=adam", "train.optimizer"),
    ("train.freeze_epochs=3", "freeze_epochs"),
    ("train.ema=1.0", "train.ema"),
    ("train.precision=fp8", "train.precision"),
    ("train.resume=always", "train.resume"),
    ("train.batch_sise=32", "train.batch_sise"),
    ("train.devices=3", "train.devices"),  # the global batch of 64 does not split in 3
    ("model.checkpoint=x.pt", "pretrained"),
])
def test_bad_settings_are_rejected_naming_the_key(tmp_path, data, override, key):
    extra = ["model.pretrained=true"] if override.startswith("model.checkpoint") else []
    with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
        settings(tmp_path, data, override, *extra)
