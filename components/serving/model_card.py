"""The model card of a registered version: what it was trained on, how it does, where it fails.

register writes it to `<paths.register>/model_card.md`, logs it with the version's model and to
the run, and makes its summary (the paragraph under the title) the version's description, which
the registry's UI shows. Its layout follows the model cards users of model hubs know (Hugging
Face's, after Mitchell et al. 2019): YAML metadata first, then Summary, Intended use and limits,
Data, Training, Test metrics (overall and per class), Weakest classes, Calibration, Registry
decision, Lineage, How to use it.

Nothing is measured again: the card reads the pipeline's own records (manifest.json, model.pt's
meta, history.json, metrics.json, classification_report.json, confusion.csv, the gate's decision
and the version's lineage tags), so its numbers are those of metrics.json.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.core import outputs
from components.core.params import Params
from components.data.dataset import class_names, read_manifest
from components.report import tables

WEAKEST = 3  # classes listed under "Weakest classes"
CONFUSIONS = 3  # most frequent wrong answers listed per weak class
TRAINING_SECTIONS = ("data", "augment", "model", "train", "evaluate")  # what "settings" lists


@dataclass
class Card:
    text: str  # the whole card, markdown
    summary: str  # its first paragraph: the version's description


@dataclass
class Version:
    """The registry's side of the card."""

    name: str
    version: str
    decision: dict[str, Any]  # decision.json's content
    tags: dict[str, str]  # the version's tags (lineage)
    run_id: str
    run_link: str  # the run's page, or where the run is when there is no UI address
    device: str | None  # train.device of the run


def model_card(params: Params, meta: dict[str, Any], v: Version) -> Card:
    """The card of version `v` of the model whose model.pt meta is `meta`."""
    manifest = read_manifest(params.paths.prepared)
    evaluate = Path(params.paths.evaluate)
    metrics = json.loads((evaluate / outputs.METRICS).read_text())
    report = _json(evaluate / outputs.REPORT_JSON) or {}
    history = _json(Path(params.paths.train) / outputs.HISTORY) or []
    classes = class_names(manifest)
    summary = _summary(params, meta, manifest, metrics, v)
    parts = [
        _front_matter(params, manifest, metrics, v), f"# {v.name} version {v.version}", summary,
        _intended_use(meta, manifest, classes),
        _data(manifest, classes),
        _training(params, meta, history, v.device),
        _test_metrics(metrics, report, classes),
        _weakest(report, classes, _confusions(evaluate / outputs.CONFUSION_CSV)),
        _calibration(params, metrics),
        _decision(v.decision),
        _lineage(v),
        _usage(v, meta),
    ]
    return Card("\n\n".join(parts) + "\n", summary)


def _json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _f(value: Any) -> str:
    """A figure as the card shows it; one metrics.json does not hold is "not recorded"."""
    if value is None:
        return "not recorded"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _front_matter(params: Params, manifest: dict, metrics: dict, v: Version) -> str:
    headline = {k: metrics[k] for k in ("accuracy", "top5", "macro_f1", "ece") if k in metrics}
    meta = {"model_name": v.name, "version": v.version, "library_name": "pytorch",
            "pipeline_tag": "image-classification", "model": params.model.name,
            "datasets": [manifest.get("source")], "metrics": headline}
    return "---\n" + "\n".join(f"{k}: {json.dumps(val)}" for k, val in meta.items()) + "\n---"


def _summary(params: Params, meta: dict, manifest: dict, metrics: dict, v: Version) -> str:
    h, w = manifest["image_size"]
    verdict = ("promoted it to champion" if v.decision.get("promoted")
               else f"kept it as challenger (champion: version {v.decision.get('champion')})")
    return (f"{params.model.name} classifying {h}×{w}×{manifest['channels']} images into "
            f"{len(manifest['classes'])} classes, trained on {manifest.get('source')} "
            f"({manifest['num']['train']} training images). Test accuracy "
            f"{_f(metrics.get('accuracy'))} on {_f(metrics.get('n_test'))} images, macro F1 "
            f"{_f(metrics.get('macro_f1'))}, ECE {_f(metrics.get('ece'))}. The registry gate "
            f"{verdict}: "
            f"{'; '.join(v.decision.get('reasons', []))}.")


def _intended_use(meta: dict, manifest: dict, classes: list[str]) -> str:
    h, w = manifest["image_size"]
    colour = "grey" if manifest["channels"] == 1 else "colour"
    return (
        "## Intended use and limits\n\n"
        f"Sorts {colour} images into one of {len(classes)} classes: "
        f"{', '.join(f'`{c}`' for c in classes[:50])}{' ...' if len(classes) > 50 else ''}. "
        f"Every image is decoded as in training: converted to {colour}, resized to {h}×{w} "
        f"(`{meta.get('resize') or manifest.get('resize')}`); images with a side under "
        f"{meta.get('min_side') or manifest.get('min_side')} px are refused. It has seen only "
        f"{manifest.get('source')} data: images from elsewhere (other sources, cameras, "
        "backgrounds, styles) may score below the test figures here. An image of none of these "
        "classes still gets one of them; its confidence is the only sign, and the calibration "
        "below says how far to trust it.")


def _data(manifest: dict, classes: list[str]) -> str:
    counts = manifest.get("counts", {})
    splits = [s for s in ("train", "val", "test") if s in counts]
    rows = [[c, *(counts[s].get(c, 0) for s in splits)] for c in classes]
    rows.append(["**all**", *(manifest["num"][s] for s in splits)])
    dup = manifest.get("duplicates_across_splits", {})
    found = manifest.get("files") or {}
    lines = [
        "## Data", "",
        f"Source `{manifest.get('source')}`" + (f" at `{manifest['root']}`" if manifest.get("root")
                                                else "")
        + f", split with seed {manifest.get('seed')}; images {manifest['image_size'][0]}×"
        f"{manifest['image_size'][1]}, {manifest['channels']} channel(s), resize "
        f"`{manifest.get('resize')}`.", "",
        *tables.table(["class", *splits], rows), "",
        "Content hashes (sha256 of each split's images, labels and order):", "",
        *[f"- {s}: `{h}`" for s, h in (manifest.get("hashes") or {}).items()], "",
        f"Exact duplicates across splits: {dup.get('count', 0)} found, "
        f"{dup.get('dropped', 0)} dropped.",
    ]
    if found:
        lines.append(f"Files: {found.get('found')} found, {found.get('prepared')} prepared, "
                     f"{found.get('quarantined')} quarantined, {found.get('ignored')} ignored.")
    return "\n".join(lines)


def _training(params: Params, meta: dict, history: list[dict], device: str | None) -> str:
    defaults, ours = Params().model_dump(mode="json"), params.model_dump(mode="json")
    changed = [f"`{s}.{k}: {json.dumps(val)}`" for s in TRAINING_SECTIONS
               for k, val in ours[s].items() if defaults[s].get(k) != val]
    seconds = sum(float(row.get("epoch_s", 0.0)) for row in history)
    best = next((row for row in history if row.get("epoch") == meta.get("epoch")), {})
    return "\n".join([
        "## Training", "",
        f"- model: `{meta['model']['name']}`" + (" (pretrained weights)" if params.model.pretrained
                                                else "")
        + (f", started from `{params.model.checkpoint}`" if params.model.checkpoint else ""),
        f"- epochs: {len(history)} run of {params.train.epochs}; best epoch {meta.get('epoch')} "
        f"(val loss {_f(best.get('val_loss', '?'))}, val accuracy {_f(best.get('val_acc', '?'))})"
        + (", weights averaged (EMA)" if meta.get("ema") else ""),
        f"- device: {device or 'not recorded'}; time: {seconds:.1f} s of training",
        "- settings that differ from the defaults: " + (", ".join(changed) or "none"),
    ])


def _test_metrics(metrics: dict, report: dict, classes: list[str]) -> str:
    names = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy",
             "top5": "top-5 accuracy", "macro_f1": "macro F1", "weighted_f1": "weighted F1",
             "macro_precision": "macro precision", "macro_recall": "macro recall",
             "loss": "loss (cross-entropy)", "ece": "ECE"}
    averages = {f"{avg}_{k}": report[f"{avg} avg"]["f1-score" if k == "f1" else k]
                for avg in ("macro", "weighted") for k in ("precision", "recall", "f1")
                if f"{avg} avg" in report}
    figures = averages | metrics  # the per-class averages are evaluate's report's
    lines = ["## Test metrics", "", f"On the test split ({_f(metrics.get('n_test'))} images).", "",
             *tables.table(["metric", "value"], [(label, _f(figures[k]))
                                                   for k, label in names.items() if k in figures]),
             ""]
    rows = []
    for c in classes:
        r = report.get(c, {})
        rows.append((c, _f(r.get("precision", "?")), _f(r.get("recall", "?")),
                     _f(r.get("f1-score", "?")), int(r.get("support", 0))))
    lines += tables.table(["class", "precision", "recall", "F1", "images"], rows)
    return "\n".join(lines)


def _confusions(path: Path) -> Counter:
    """(true, predicted) -> test images, wrong answers only, from evaluate's confusion.csv."""
    if not path.is_file():
        return Counter()
    with open(path, newline="") as f:
        return Counter((r["actual"], r["predicted"]) for r in csv.DictReader(f)
                       if r["actual"] != r["predicted"])


def _weakest(report: dict, classes: list[str], confusions: Counter) -> str:
    scored = [(report[c]["f1-score"], report[c]["recall"], c) for c in classes if c in report]
    lines = ["## Weakest classes", "",
             f"The {WEAKEST} classes with the lowest F1 on the test split, and what they were "
             "most often taken for.", ""]
    rows = []
    for f1, recall, c in sorted(scored)[:WEAKEST]:
        wrong = Counter({p: n for (t, p), n in confusions.items() if t == c})
        taken = ", ".join(f"{p} ({n}×)" for p, n in wrong.most_common(CONFUSIONS)) or "nothing"
        rows.append((c, _f(f1), _f(recall), taken))
    return "\n".join(lines + tables.table(["class", "F1", "recall", "most often taken for"],
                                            rows))


def _calibration(params: Params, metrics: dict) -> str:
    return (f"## Calibration\n\nExpected calibration error (ECE) {_f(metrics.get('ece'))}: the "
            "confidence the model states differs from its accuracy by that much, on average over "
            f"{params.evaluate.calibration_bins} equal-width confidence bins. The run's "
            f"evaluate/{outputs.CALIBRATION_PNG} draws the reliability diagram.")


def _decision(decision: dict) -> str:
    compared = decision.get("compared_with") or {}
    lines = ["## Registry decision", "",
             ("Promoted to `champion`." if decision.get("promoted") else
              f"Kept as `challenger`; `champion` stays version {decision.get('champion')}.")
             + f" Primary metric: `{decision.get('primary_metric')}`."]
    if compared:
        lines.append(f"Compared with version {compared.get('version')}"
                     + (", scored again on this test split." if compared.get("rescored") else "."))
    lines += ["", *[f"- {r}" for r in decision.get("reasons", [])]]
    return "\n".join(lines)


def _lineage(v: Version) -> str:
    t = v.tags
    dirty = " (uncommitted changes)" if t.get("git.dirty") == "true" else ""
    return "\n".join([
        "## Lineage", "",
        f"- git commit: `{t.get('git.commit', 'unknown')}`{dirty}",
        f"- params hash: `{t.get('params.hash', 'unknown')}`",
        f"- data hash (DVC, prepared data): `{t.get('data.hash', 'unknown')}`; test split "
        f"`{t.get('data.test_hash', 'unknown')}`",
        f"- MLflow run: `{v.run_id}`: {v.run_link}",
    ])


def _usage(v: Version, meta: dict) -> str:
    uri = f"models:/{v.name}/{v.version}"
    h, w = meta["image_size"]
    return "\n".join([
        "## How to use it", "",
        "Serve it (MLflow's model server; loading the pyfunc runs this project's code, which "
        "travels with it):", "",
        "```bash",
        f'mlflow models serve -m "{uri}" --env-manager local --host 127.0.0.1 --port 5001',
        'curl -s http://127.0.0.1:5001/invocations -H "Content-Type: application/json" \\',
        '  -d "{\\"inputs\\": {\\"image\\": [\\"$(base64 -w0 digit.png)\\"]}}"',
        "```", "",
        "Each image gets `class`, `confidence`, `top_k` and `probabilities`; uint8 arrays "
        f"N×{h}×{w}×{meta['channels']} are taken as `{{\"inputs\": [...]}}` too.", "",
        "In Python, or a folder at a time:", "",
        "```python",
        "import mlflow, pandas as pd",
        f'model = mlflow.pyfunc.load_model("{uri}")',
        'model.predict(pd.DataFrame({"image": [open("digit.png", "rb").read()]}))',
        "```", "",
        "```bash",
        f'cnn-pipeline predict --folder images/ --model "{uri}"',
        "```", "",
        f"`cnn-pipeline export` adds `{outputs.ONNX}` to this version, with its parity "
        f"against PyTorch in the tags `onnx.*`; `cnn-pipeline predict --model {outputs.ONNX}` "
        "scores with ONNX Runtime.",
    ])
