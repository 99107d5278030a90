"""export: the registered version as ONNX, checked against PyTorch on the whole test split.

Reads `<paths.register>/decision.json` (the version register made), that version's model.pt from
the registry (the file the version carries; hash checked, weights only), the test split under
`paths.prepared` and the `export` settings. Writes under `paths.export`, into a temporary folder
that replaces the old one only when complete:
- model.onnx: uint8 N×H×W×C images in, class probabilities out, the training normalisation folded
  in, any batch size, the model's meta inside (components/onnx_model.py);
- export.json: the parity check: images, max |Δprobability|, top-1 agreement, the thresholds,
  passed, and why not.
In MLflow: model.onnx is logged with the version (beside its model: `models:/<name>/<version>`
downloads it), the version gets the tags onnx.parity ("passed", or "FAILED: " and why),
onnx.max_abs_diff, onnx.top1_agreement, onnx.test_images and onnx.opset, and export.json goes to
the pipeline's run.

Parity: ONNX Runtime and PyTorch (fp32, CPU) score every test image; the largest difference of
any probability must be at most `export.max_abs_diff` and the share of images with the same top
class at least `export.min_top1_agreement`. An export that disagrees does not fail the step: the
version stays registered (its PyTorch model is what was gated), with the disagreement stated in
its tags and its description, and the step's result says passed: false.

A step of its own, after register and never inside it: exporting takes seconds the gate need not
wait for.

    python -m components.export [--params params.yaml] [--set export.opset=20]
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from components import files
from components.atomic import atomic_dir, write_json
from components.checkpoint import Classifier, check_fits, load_model, resolve_model_uri
from components.cli import run_step
from components.onnx_model import DISAGREES, OnnxClassifier, write_onnx
from components.params import Export, Params, UserError
from components.prepared import load_split, read_manifest
from components.tracking import Tracker, log_with_version

BATCH = 512  # images per comparison: memory stays flat on large test splits


@dataclass
class Parity:
    images: int
    max_abs_diff: float  # over every image and class
    top1_agreement: float  # share of images
    passed: bool
    reasons: list[str]  # why not, one per threshold missed


@dataclass
class ExportResult:
    model_name: str
    version: str
    onnx: str  # model.onnx
    report: str  # export.json
    images: int
    max_abs_diff: float
    top1_agreement: float
    passed: bool
    logged: bool  # model.onnx logged with the version


def export(params: Params, tracker: Tracker) -> ExportResult:
    """Export the version `<paths.register>`/decision.json names; see the module doc. `tracker`:
    the pipeline's run (components.tracking.tracked attaches it and points mlflow's default at
    its server, where `models:/` URIs are read)."""
    name, version = _registered(params)
    net, meta = load_model(resolve_model_uri(f"models:/{name}/{version}"))
    test = load_split(params.paths.prepared, "test")
    if len(test.y) == 0:
        raise UserError(f"{params.paths.prepared}: its test split is empty; the parity check "
                        f"needs the test split version {version} of {name} was trained with: "
                        "set data.test_fraction above 0 and run the pipeline again")
    check_fits(meta, read_manifest(params.paths.prepared), f"models:/{name}/{version}")
    with atomic_dir(params.paths.export) as out:
        write_onnx(net, meta, out / files.ONNX, params.export.opset)
        result = parity(Classifier(net, meta), OnnxClassifier(out / files.ONNX), test.x,
                        params.export)
        write_json(out / files.EXPORT, {"model_name": name, "version": version,
                                        "opset": params.export.opset, **asdict(result),
                                        "thresholds": params.export.model_dump()})
    final = Path(params.paths.export)
    logged = _record(tracker, name, version, final / files.ONNX, result, params.export)
    tracker.log_artifacts([final / files.EXPORT], "export")
    return ExportResult(name, version, str(final / files.ONNX), str(final / files.EXPORT),
                        result.images, result.max_abs_diff, result.top1_agreement,
                        result.passed, logged)


def _registered(params: Params) -> tuple[str, str]:
    path = Path(params.paths.register) / files.DECISION
    if not path.is_file():
        raise UserError(f"{path}: no registered version to export; run the register step first")
    decision = json.loads(path.read_text())
    return decision["model_name"], str(decision["version"])


@torch.inference_mode()
def parity(model: Classifier, onnx_model: OnnxClassifier, images: np.ndarray,
           cfg: Export) -> Parity:
    """How far ONNX Runtime's probabilities are from PyTorch's on `images`, against `cfg`."""
    worst, same = 0.0, 0
    for i in range(0, len(images), BATCH):
        x = images[i:i + BATCH]
        ours, theirs = model.probabilities(x, BATCH), onnx_model.probabilities(x, BATCH)
        worst = max(worst, float(np.abs(ours - theirs).max()))
        same += int((ours.argmax(1) == theirs.argmax(1)).sum())
    agreement = same / len(images)
    reasons = []
    if not worst <= cfg.max_abs_diff:  # NaN fails too
        reasons.append(f"max |Δprobability| {worst:.3g} is over export.max_abs_diff "
                       f"{cfg.max_abs_diff:g}")
    if agreement < cfg.min_top1_agreement:
        reasons.append(f"top-1 agreement {agreement:.4f} is under export.min_top1_agreement "
                       f"{cfg.min_top1_agreement:g} ({len(images) - same} of {len(images)} "
                       "images differ)")
    return Parity(len(images), worst, agreement, not reasons, reasons)


def _record(tracker: Tracker, name: str, version: str, onnx_path: Path, result: Parity,
            cfg: Export) -> bool:
    """model.onnx with the version, the parity figures as its tags, a disagreement stated."""
    client = tracker.client
    found = client.get_model_version(name, version)
    logged = log_with_version(client, found, onnx_path)
    verdict = "passed" if result.passed else "FAILED: " + "; ".join(result.reasons)
    tags = {"onnx.parity": verdict, "onnx.max_abs_diff": repr(result.max_abs_diff),
            "onnx.top1_agreement": repr(result.top1_agreement),
            "onnx.test_images": str(result.images), "onnx.opset": str(cfg.opset)}
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    tracker.set_tags(tags)
    # The description states a disagreement (and no longer one that a later export fixed).
    kept = [p for p in (found.description or "").split("\n\n") if not p.startswith(DISAGREES)]
    if not result.passed:
        kept.append(f"{DISAGREES} ({'; '.join(result.reasons)}): do not use its "
                    f"{files.ONNX}; the PyTorch model is unaffected.")
    description = "\n\n".join(p for p in kept if p)
    if description != (found.description or ""):
        client.update_model_version(name, version, description=description)
    return logged


def main(argv: list[str] | None = None) -> None:
    run_step(export, argv)


if __name__ == "__main__":
    main()
