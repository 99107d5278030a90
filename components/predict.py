r"""predict: score a folder of images with a trained model (batch prediction).

Reads every image under a folder, at any depth and of any size and mode, and a model: a local
model.pt (or the folder holding it) or an MLflow URI, by default `models:/<register.model_name>
@champion`. Each image is decoded exactly as prepare decoded the training images
(`components.data.images.decode` with the model's size and channels, the resize policy and
`data.min_side`) and normalised exactly as in training (`checkpoint.prepare_input`). Scoring uses
the evaluate section's batch_size, device and tta_flip, so a test image scores here as it did in
evaluate. Writes under `paths.predictions`, into a temporary folder that replaces the old one only
when complete:
- `predictions.csv`: path (relative to the folder; a name that is not UTF-8 with its bytes
  escaped, `\xNN`, and backslashes doubled: components.data.images.file_name), class, confidence,
  then the top-k classes and their probabilities (top1_class, top1_prob, top2_class, ...);
- `quarantine.json`: every file that could not be scored, with the reason; the folder is read
  with prepare's scanner and file rules (components.data.images: a FIFO or a device node is rejected
  unopened, a link out of the folder too);
- `drift.json`: how the folder compares with the model's training and test data, figure by
  figure against the `predict.drift_*` thresholds (components/data/drift.py); each figure crossed is
  a warning on stderr, and with `predict.fail_on_drift` an error (exit 2) once everything above
  is written. Tracked in an MLflow run of its own (`tracker`; the command line and the
  batch-predict flow attach one through components.tracking, to MLFLOW_TRACKING_URI or the
  embedded store).

    cnn-pipeline predict --folder inbox/ [--model models:/digits-classifier@champion]
        [--params params.yaml] [--set predict.top_k=3 --set evaluate.device=cpu ...]

`components.training.checkpoint.score` is the inference it shares with evaluate and train:
log-probabilities of uint8 images, batched.

`--model path/to/model.onnx` (an export of components/export.py, which carries the model's meta)
scores with ONNX Runtime on the CPU instead, into the same predictions.csv.
"""

from __future__ import annotations

import csv
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from components.core import outputs
from components.core.atomic import atomic_dir, write_json
from components.core.params import Params, UserError
from components.data import drift
from components.data.dataset import read_manifest
from components.data.images import decode_file, list_images
from components.serving.onnx_model import OnnxClassifier
from components.training.checkpoint import load_model, resolve_model_uri, score

CHUNK = 1024  # images decoded at a time: memory stays flat however large the folder


@dataclass
class PredictResult:
    predictions: str  # predictions.csv
    quarantine: str  # quarantine.json
    model: str  # the model file scored with (downloaded, for an MLflow URI)
    scored: int
    quarantined: int
    ignored: int  # hidden files and files of other extensions
    drift: str = ""  # drift.json
    drifted: bool = False  # a drift figure crossed its threshold


def predict(params: Params, folder: str | Path | None = None,
            model_uri: str | None = None, tracker=None) -> PredictResult:
    """Score every image under `folder` with `model_uri` into `params.paths.predictions`;
    `tracker` (components.tracking) gets the drift figures and the files."""
    if folder is None:
        raise UserError("no folder to score: pass --folder PATH (a folder of images, any depth)")
    uri = model_uri or f"models:/{params.register.model_name}@champion"
    if str(uri).lower().endswith(".onnx"):  # an export: ONNX Runtime on the CPU, meta inside
        path, device = Path(uri), None
        model = OnnxClassifier(path)
        meta = model.meta
    else:
        path = resolve_model_uri(uri)
        device = pick_device(params.evaluate.device)
        model, meta = load_model(path, device)
    size, channels = _input_shape(meta, path)
    settings = {"size": size, "channels": channels, "resize": _resize_policy(meta, params),
                "min_side": meta.get("min_side") or params.data.min_side}
    scan = list_images(folder)
    quarantine = list(scan.rejected)
    classes = meta["classes"]
    k = min(params.predict.top_k, len(classes))
    scored = 0
    monitor = drift.Monitor(meta, params.predict, settings["resize"], params.evaluate.tta_flip)
    with atomic_dir(params.paths.predictions) as out:
        with open(out / outputs.PREDICTIONS, "w", newline="") as f, ThreadPoolExecutor() as pool:
            writer = csv.writer(f)
            writer.writerow(["path", "class", "confidence"]
                            + [f"top{i}_{w}" for i in range(1, k + 1) for w in ("class", "prob")])
            for start in range(0, len(scan.candidates), CHUNK):
                names, images, seen = [], [], []
                chunk = scan.candidates[start:start + CHUNK]
                # Pillow releases the GIL while it decodes and resizes: threads suffice.
                decoded = pool.map(lambda c: decode_file(c.path, look=True, **settings), chunk)
                for cand, (image, bad) in zip(chunk, decoded, strict=True):
                    if bad is None:
                        names.append(scan.rel(cand.path))
                        images.append(image[0])
                        seen.append(image[1])
                    else:
                        quarantine.append({"path": scan.rel(cand.path), **bad})
                if not images:
                    continue
                batch = np.stack(images)
                probs = _probabilities(model, meta, batch, device, params)
                _write_rows(writer, names, probs, classes, k)
                monitor.add(batch, probs, seen)
                scored += len(images)
        write_json(out / outputs.QUARANTINE, quarantine)
        report = monitor.report()
        write_json(out / outputs.DRIFT, report)
    final = Path(params.paths.predictions)
    result = PredictResult(str(final / outputs.PREDICTIONS), str(final / outputs.QUARANTINE),
                           str(path), scored, len(quarantine), scan.ignored,
                           drift=str(final / outputs.DRIFT), drifted=report["drift"])
    _report_drift(params, report, result, uri, folder, tracker)
    return result


def _report_drift(params: Params, report: dict, result: PredictResult, uri: str, folder,
                  tracker) -> None:
    """Warnings on stderr, the figures and files to the tracker, and the error that
    predict.fail_on_drift asks for (after everything is written)."""
    drift.say(report, result.drift)
    if tracker is not None:
        tracker.set_tags({"batch.folder": str(folder), "batch.model": uri,
                          "drift": str(report["drift"]).lower()})
        tracker.log_metrics(drift.tracked_figures(report) | {"scored": result.scored,
                                                             "quarantined": result.quarantined})
        tracker.log_artifacts([result.drift, result.predictions, result.quarantine], "predictions")
    if report["drift"] and params.predict.fail_on_drift:
        crossed = [n for n, f in report["figures"].items() if f["drift"]]
        raise drift.DriftError(
            f"drift in {folder}: {', '.join(crossed)} crossed their thresholds (predict.fail_on_"
            f"drift is true); predictions are written to {result.predictions}, the figures to "
            f"{result.drift}", result)


def _probabilities(model, meta: dict, images: np.ndarray, device, params: Params) -> np.ndarray:
    cfg = params.evaluate
    if isinstance(model, OnnxClassifier):
        return model.probabilities(images, cfg.batch_size, cfg.tta_flip)
    return np.exp(score(model, meta, images, device, cfg.batch_size, cfg.tta_flip))


def pick_device(name: str) -> torch.device:
    """evaluate.device: auto picks cuda when there is one."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("evaluate.device = cuda but torch sees no CUDA device; use auto or cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _input_shape(meta: dict, path: Path) -> tuple[int, int]:
    h, w = meta["image_size"]
    if h != w:
        # decode makes square images, as prepare does; a non-square model came from elsewhere.
        raise UserError(f"model {path} expects {h}x{w} images; predict scores square images only")
    return int(h), int(meta["channels"])


def _resize_policy(meta: dict, params: Params) -> str:
    """How prepare resized the training images: the model file's record, else the prepared data's
    manifest, else data.resize (which wrote that manifest)."""
    if meta.get("resize"):
        return meta["resize"]
    try:
        return read_manifest(params.paths.prepared)["resize"]
    except (UserError, KeyError):
        return params.data.resize


def _write_rows(writer, names: list[str], probs: np.ndarray, classes: list[str], k: int) -> None:
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    for name, p, idx in zip(names, probs, top, strict=True):
        ranked = [v for j in idx for v in (classes[j], f"{p[j]:.8g}")]
        writer.writerow([name, classes[idx[0]], f"{p[idx[0]]:.8g}", *ranked])
