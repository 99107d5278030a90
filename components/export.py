"""export: a registered version as ONNX, checked against PyTorch on the whole test split.

Which version: `--model` (models:/NAME@ALIAS or models:/NAME/VERSION), by default
models:/<register.model_name>@champion, the one you would ship: after register promoted this run's
version that is this run's; after the gate refused it, the champion (it says so on stderr, and
export.json names the version, its aliases and the version register made). Reads that version's
model.pt from the registry (the file the version carries; hash checked, weights only), the test
split under `paths.prepared`, `<paths.register>/decision.json` when there is one, and the `export`
settings. Writes under `paths.export`, into a temporary folder that replaces the old one only when
complete:
- model.onnx: uint8 N×H×W×C images in, class probabilities out, the training normalisation folded
  in, any batch size, the model's meta inside (components/serving/onnx_model.py);
- export.json: which version (model_name, version, aliases, model_uri, registered_by_this_run),
  and the parity check: images, max |Δprobability|, top-1 agreement, the thresholds, passed, and
  why not.
In MLflow: model.onnx is logged with the version (beside its model: `models:/<name>/<version>`
downloads it), the version gets the tags onnx.parity ("passed", or "FAILED: " and why),
onnx.max_abs_diff, onnx.top1_agreement, onnx.test_images and onnx.opset (the pipeline's run gets
them too when the version is its own), and export.json goes to the pipeline's run.

Parity: ONNX Runtime and PyTorch (fp32, CPU) score every test image; the largest difference of
any probability must be at most `export.max_abs_diff` and the share of images with the same top
class at least `export.min_top1_agreement`. An export that disagrees does not fail the step: the
version stays registered (its PyTorch model is what was gated), with the disagreement stated in
its tags and its description, and the step's result says passed: false.

A step of its own, after register and never inside it: exporting takes seconds the gate need not
wait for.

    cnn-pipeline export [--params params.yaml] [--set export.opset=20]
    cnn-pipeline export --model models:/digits-classifier@challenger   # any version
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from mlflow.exceptions import MlflowException

from components.core import outputs
from components.core.atomic import atomic_dir, write_json
from components.core.params import Export, Params, UserError
from components.core.secrets import shown
from components.data.dataset import load_split, read_manifest
from components.serving.onnx_model import DISAGREES, OnnxClassifier, write_onnx
from components.tracking.run import Tracker
from components.tracking.store import log_with_version
from components.training.checkpoint import Classifier, check_fits, load_model, resolve_model_uri

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
    aliases: list[str]  # the version's, when exported
    onnx: str  # model.onnx
    report: str  # export.json
    images: int
    max_abs_diff: float
    top1_agreement: float
    passed: bool
    logged: bool  # model.onnx logged with the version


def export(params: Params, tracker: Tracker, model: str | None = None) -> ExportResult:
    """Export the version `model` names (default: the champion); see the module doc. `tracker`:
    the pipeline's run (components.tracking.tracked attaches it and points mlflow's default at
    its server, where `models:/` URIs are read)."""
    uri = model or f"models:/{params.register.model_name}@champion"
    found = _version(tracker.client, uri)
    name, version = found.name, str(found.version)
    made = _registered(params)
    if made and made != (name, version):
        _say(f"export: version {made[1]} of {made[0]}, registered by this run, is not {uri}: "
             f"exporting {uri}, version {version} ({', '.join(found.aliases) or 'no alias'})")
    net, meta = load_model(resolve_model_uri(f"models:/{name}/{version}"))
    test = load_split(params.paths.prepared, "test")
    if len(test.y) == 0:
        raise UserError(f"{params.paths.prepared}: its test split is empty; the parity check "
                        f"needs the test split version {version} of {name} was trained with: "
                        "set data.test_fraction above 0 and run the pipeline again")
    check_fits(meta, read_manifest(params.paths.prepared), f"models:/{name}/{version}")
    which = {"model_name": name, "version": version, "aliases": list(found.aliases),
             "model_uri": uri, "registered_by_this_run": made[1] if made else None}
    with atomic_dir(params.paths.export) as out:
        write_onnx(net, meta, out / outputs.ONNX, params.export.opset)
        result = parity(Classifier(net, meta), OnnxClassifier(out / outputs.ONNX), test.x,
                        params.export)
        write_json(out / outputs.EXPORT, {**which, "opset": params.export.opset, **asdict(result),
                                        "thresholds": params.export.model_dump()})
    final = Path(params.paths.export)
    logged = _record(tracker, name, version, final / outputs.ONNX, result, params.export)
    tracker.log_artifacts([final / outputs.EXPORT], "export")
    return ExportResult(name, version, list(found.aliases), str(final / outputs.ONNX),
                        str(final / outputs.EXPORT), result.images, result.max_abs_diff,
                        result.top1_agreement, result.passed, logged)


def _version(client, uri: str):
    """The registered version `uri` names (models:/NAME@ALIAS or models:/NAME/VERSION)."""
    found = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))", uri)
    if not found:
        raise UserError(f"--model {uri}: give a registered version as models:/NAME@ALIAS or "
                        "models:/NAME/VERSION")
    name, alias, number = found.groups()
    try:
        if alias:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, number)
    except MlflowException as err:
        registry = shown(client.tracking_uri)
        raise UserError(f"{uri} is not in the registry at {registry} ({err.error_code}): "
                        "run the pipeline through register first, or name a version that is "
                        "there (--model models:/NAME/VERSION)") from None


def _registered(params: Params) -> tuple[str, str] | None:
    """(model name, version) that register made, from decision.json; None without one."""
    path = Path(params.paths.register) / outputs.DECISION
    if not path.is_file():
        return None
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
    """model.onnx with the version, the parity figures as its tags (and the run's, when the
    version is the run's own), a disagreement stated."""
    client = tracker.client
    found = client.get_model_version(name, version)
    logged = log_with_version(client, found, onnx_path)
    verdict = "passed" if result.passed else "FAILED: " + "; ".join(result.reasons)
    tags = {"onnx.parity": verdict, "onnx.max_abs_diff": repr(result.max_abs_diff),
            "onnx.top1_agreement": repr(result.top1_agreement),
            "onnx.test_images": str(result.images), "onnx.opset": str(cfg.opset)}
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    if found.run_id == tracker.run_id:
        tracker.set_tags(tags)
    # The description states a disagreement (and no longer one that a later export fixed).
    kept = [p for p in (found.description or "").split("\n\n") if not p.startswith(DISAGREES)]
    if not result.passed:
        kept.append(f"{DISAGREES} ({'; '.join(result.reasons)}): do not use its "
                    f"{outputs.ONNX}; the PyTorch model is unaffected.")
    description = "\n\n".join(p for p in kept if p)
    if description != (found.description or ""):
        client.update_model_version(name, version, description=description)
    return logged


def _say(message: str) -> None:
    print(message, file=sys.stderr)
