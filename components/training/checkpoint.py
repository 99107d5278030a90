"""Verified checkpoint files and the model file that evaluate and predict load.

Every file is written atomically with a `<name>.sha256` beside it (sha256sum format) and read back
only after its hash matches, with `torch.load(weights_only=True)`: a truncated or tampered file is
refused with an error that names it, never unpickled. Only weights_only-loadable types go in
(tensors, numbers, strings, lists, dicts, tuples).

`model.pt` (written by train) holds the weights and everything needed to use them without
params.yaml: the model's name and create_model arguments, classes, input size, channels and the
normalisation. `load_model(path)` rebuilds it:

    model, meta = load_model("outputs/train/model.pt")
    logits = model(prepare_input(images_uint8_nhwc, meta))
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from components.core import outputs
from components.core.atomic import atomic_file
from components.core.params import UserError
from components.data.dataset import class_names
from components.training import models

MODEL_FORMAT = "cnn-pipeline/model@1"


def sha256_path(path: Path) -> Path:
    return path.with_name(path.name + outputs.HASH_SUFFIX)


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _accepted(path: Path) -> set[str]:
    side = sha256_path(path)
    if not side.is_file():
        return set()
    return {line.split()[0] for line in side.read_text().splitlines() if line.strip()}


def save(path: str | Path, obj: dict[str, Any]) -> Path:
    """torch.save `obj` to `path` atomically, with its sha256 beside it.

    The file and its hash cannot be replaced in one step, so the hash file first lists the old
    and the new hash, then only the new: a kill between the two moves leaves a pair that verifies.
    """
    path = Path(path)
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:  # through Python's file: a full disk stays an OSError (ENOSPC)
            torch.save(obj, f)      # in the error's context, where torch's own writer loses it
        digest = _digest(tmp)
        _write_hashes(path, [digest, *sorted(_accepted(path) - {digest})])
    _write_hashes(path, [digest])
    return path


def _write_hashes(path: Path, digests: list[str]) -> None:
    with atomic_file(sha256_path(path)) as tmp:
        tmp.write_text("".join(f"{d}  {path.name}\n" for d in digests))


def load(path: str | Path, *, require_hash: bool = True, what: str = "checkpoint") -> dict:
    """The dict saved by `save`, after its hash is checked; a UserError names any problem."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist")
    accepted = _accepted(path)
    advice = (
        f"delete it (and {sha256_path(path).name}) to start again"
        if what == "checkpoint"
        else "write it again or point to another file"
    )
    if require_hash and not accepted:
        raise UserError(f"{what} {path} has no {sha256_path(path).name} beside it; {advice}")
    if accepted and _digest(path) not in accepted:
        raise UserError(
            f"{what} {path} does not match its sha256 (truncated or changed after it was "
            f"written); it was not loaded. {advice}, or set train.resume=never"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unpickling failure means the same thing to the user
        raise UserError(f"{what} {path} cannot be read safely ({err}); {advice}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{what} {path} holds a {type(obj).__name__}, not a dict; {advice}")
    return obj


def rng_state() -> dict[str, Any]:
    """Every random generator training draws from, in weights_only-loadable types."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": [version, list(internal), gauss],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def scale_shift(mean, std, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) with uint8 pixels * scale + shift = (pixel/255 - mean) / std, per channel.

    One multiply-add instead of divide, subtract, divide: the normalisation train, evaluate and
    predict all share.
    """
    mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return 1.0 / (255.0 * std), -mean / std


def prepare_input(images, meta: dict[str, Any], device=None) -> torch.Tensor:
    """uint8 N×H×W×C images (numpy or torch, as in the prepared arrays) to the model's input."""
    x = images if torch.is_tensor(images) else torch.from_numpy(np.array(images, np.uint8))
    x = x.to(device).permute(0, 3, 1, 2)
    scale, shift = scale_shift(meta["mean"], meta["std"], x.device)
    return torch.addcmul(shift, x.float(), scale)


@torch.inference_mode()
def score(model: torch.nn.Module, meta: dict, images: np.ndarray, device: torch.device,
          batch_size: int = 512, tta_flip: bool = False) -> np.ndarray:
    """Log-probabilities (N×classes, float32) of uint8 N×H×W×C images (an array or memory map).

    With `tta_flip`, the softmax of each image and of its mirror image are averaged.
    """
    out = [np.empty((0, len(meta["classes"])), np.float32)]
    for i in range(0, len(images), batch_size):
        # A copy: a read-only memory map would make torch warn, and batches are small.
        x = prepare_input(np.array(images[i:i + batch_size]), meta, device)
        logp = torch.log_softmax(model(x).float(), dim=1)
        if tta_flip:
            mirrored = torch.log_softmax(model(x.flip(-1)).float(), dim=1)
            logp = torch.logaddexp(logp, mirrored) - math.log(2.0)  # log of the mean softmax
        out.append(logp.cpu().numpy())
    return np.concatenate(out)


class Classifier(torch.nn.Module):
    """uint8 N×H×W×C images in, class probabilities out: the training normalisation travels
    inside the model (the register gate scores it, the ONNX export exports it, the served model
    runs it). `probabilities` scores a whole array, as onnx_model.OnnxClassifier's does."""

    def __init__(self, net: torch.nn.Module, meta: dict[str, Any]):
        super().__init__()
        self.net = net.eval()
        self.n_classes = len(meta["classes"])
        scale, shift = scale_shift(meta["mean"], meta["std"])
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.addcmul(self.shift, images.permute(0, 3, 1, 2).float(), self.scale)
        return self.net(x).float().softmax(dim=1)

    @torch.inference_mode()
    def probabilities(self, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
        """Class probabilities (N×classes, float32) of uint8 N×H×W×C `images` (an array or
        memory map), `batch_size` at a time: memory stays flat on large splits."""
        out = [np.empty((0, self.n_classes), np.float32)]
        for i in range(0, len(images), batch_size):
            # A copy: torch refuses read-only memory maps, and batches are small.
            out.append(self(torch.from_numpy(np.array(images[i:i + batch_size]))).numpy())
        return np.concatenate(out)


def model_file(spec: dict, manifest: dict, weights: dict, **extra) -> dict[str, Any]:
    """The contents of a model.pt: weights, how to build the model, and how to feed it: all that
    preprocessing a new image needs (size, channels, resize policy, smallest side, normalisation)
    travels in it, so a model file scores images with nothing beside it."""
    return {
        "format": MODEL_FORMAT, "model": spec, "classes": class_names(manifest),
        "image_size": manifest["image_size"], "channels": manifest["channels"],
        "resize": manifest.get("resize"), "min_side": manifest.get("min_side"),
        "mean": manifest["mean"], "std": manifest["std"],
        "data": {"source": manifest.get("source"), "hashes": manifest.get("hashes")},
        **extra, "state_dict": weights,
    }


def load_model(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, dict]:
    """Rebuild the model saved in a model.pt: (module in eval mode on `device`, meta).

    meta: model (name, kwargs for create_model), classes (names, by index), image_size [H, W],
    channels, mean and std (0-1 scale), data (source, hashes), epoch and metrics of the weights,
    and reference: the test split as train scored it, for batch prediction's drift check
    (components/data/drift.py; absent from files written before it, or without a test split).
    """
    saved = _load_model_file(path, str(path))
    meta = {k: v for k, v in saved.items() if k != "state_dict"}
    model = models.create_model(meta["model"]["name"], pretrained=False, **meta["model"]["kwargs"])
    model.load_state_dict(saved["state_dict"])
    return model.to(device).eval(), meta


def check_fits(meta: dict, manifest: dict, source: str | Path) -> None:
    """A model (the meta of model file `source`) of other data than the prepared split whose
    `manifest` is given would score nonsense without failing: say so instead."""
    ours = (class_names(manifest), list(manifest["image_size"]), manifest["channels"])
    theirs = (list(meta["classes"]), list(meta["image_size"]), meta["channels"])
    if ours != theirs:
        raise UserError(
            f"{source} was trained on other data ({len(theirs[0])} classes, {theirs[1]} px, "
            f"{theirs[2]} channels) than the prepared test split ({len(ours[0])} classes, "
            f"{ours[1]} px, {ours[2]} channels); run the pipeline again from train (dvc repro)"
        )


def init_from(source: str, name: str, kwargs: dict, classes: list[str]) -> torch.nn.Module:
    """Model `name` for this data (`kwargs`, `classes`) starting from the model file at `source`
    (a path or an MLflow URI), with a new head when the classes differ."""
    saved = _load_model_file(resolve_model_uri(source), f"model.checkpoint = {source}")
    if saved["model"]["name"] != name:
        raise UserError(f"model.checkpoint = {source} holds a {saved['model']['name']} model, "
                        f"not {name}; set model.name: {saved['model']['name']}")
    model = models.create_model(name, **{**kwargs, "num_classes": len(saved["classes"])})
    try:
        model.load_state_dict(saved["state_dict"])
    except RuntimeError as err:
        shape = f"{kwargs['in_chans']} channels, {kwargs['img_size']} px"
        raise UserError(f"model.checkpoint = {source} does not fit this data ({shape}): {err}"
                        ) from None
    if saved["classes"] != classes:
        model.reset_classifier(len(classes))  # transfer learning: the old head means nothing here
    return model


def _load_model_file(path: str | Path, what: str) -> dict:
    saved = load(path, require_hash=False, what=what)
    if saved.get("format") != MODEL_FORMAT:
        raise UserError(f"{what} is not a model file written by the train step (format "
                        f"{saved.get('format')!r}, expected {MODEL_FORMAT}); use its "
                        f"{outputs.MODEL}")
    return saved


def resolve_model_uri(uri: str) -> Path:
    """A local model.pt path, or an MLflow URI (models:/name@alias, runs:/id/path) downloaded."""
    if Path(uri).exists() or not re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:/", uri):
        path = Path(uri)
        if path.is_dir():
            path = path / outputs.MODEL
        if not path.is_file():
            raise UserError(f"model.checkpoint = {uri}: no such file; give a {outputs.MODEL} path")
        return path
    import mlflow  # only when a URI asks for it: mlflow is slow to import

    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except Exception as err:  # MlflowException, connection errors: all are the user's to fix
        raise UserError(
            f"model.checkpoint = {uri}: cannot download it from MLflow: {err}"
        ) from None
    found = [local] if local.is_file() else sorted(local.rglob(outputs.MODEL))
    if not found:
        raise UserError(f"model.checkpoint = {uri}: the artifacts hold no {outputs.MODEL}")
    return found[0]


def changes(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two fingerprints."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [c for k in keys for c in changes(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".") or "(everything)"]
