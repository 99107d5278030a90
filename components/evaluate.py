"""evaluate: the trained model on the test split, as numbers, tables and pictures.

Reads the test split under `paths.prepared`, the model file `paths.train`/model.pt (the best or
EMA weights train kept) and `paths.train`/history.json, and the `evaluate` settings. Writes under
`paths.evaluate`, into a temporary folder that replaces the old one only when complete:
- metrics.json: the headline figures, what `dvc exp show` sets side by side (a DVC metric):
  accuracy, balanced_accuracy (mean recall over the classes present), macro_f1, loss (mean
  cross-entropy), top5 (only with at least 5 classes), ece, n_test;
- classification_report.json / .txt: scikit-learn's per-class table (precision, recall, F1,
  support per class, and their macro and weighted averages): the per-class figures, kept out of
  metrics.json so that experiments compare in a table of a few columns;
- predictions.csv: index (row of the test split), true, predicted, confidence;
- confusion.csv: actual,predicted, one row per test image (what DVC's confusion template counts),
  confusion.png and confusion_normalized.png (rows sum to 1: per-class recall on the diagonal);
- calibration.csv (per bin: confidence, accuracy, count) and calibration.png, the reliability
  diagram; ECE uses `calibration_bins` equal-width bins of the top-class probability;
- mistakes.png: the most confident wrong answers; curves.png: loss and accuracy per epoch;
- reference.json: what batch prediction's drift check compares new images with
  (components/data/drift.py), as evaluate scored the test split (test-time flips included): train's
  per-channel pixel statistics and input shape, and the test split's predicted-class shares and
  confidences. model.pt carries the same, measured by train without flips.

    cnn-pipeline evaluate [--params params.yaml] [--set evaluate.tta_flip=true ...]

With `tta_flip`, each image's softmax is averaged with its mirror image's (only for data where a
mirrored image keeps its label). A `tracker` (log_metrics, log_artifacts) receives the metrics and
every file. Pictures are drawn on matplotlib Figure objects (Agg), never pyplot's global state.
"""

from __future__ import annotations

import csv
import json
import math
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import ConfusionMatrixDisplay, classification_report, top_k_accuracy_score

from components.core import outputs
from components.core.atomic import atomic_dir, write_json
from components.core.params import Params, UserError
from components.data import drift
from components.data.dataset import class_names, load_split, read_manifest
from components.predict import pick_device
from components.report import gallery
from components.training.checkpoint import check_fits, load_model, score

DPI = 100
ANNOTATE_MAX = 20  # classes up to which the confusion matrix prints its numbers
TICKS_MAX = 40  # classes up to which its axes name every class
UNSAFE_KEY = re.compile(r"[^A-Za-z0-9_.\- /]")  # characters MLflow refuses in a metric name


class Tracker(Protocol):
    def log_metrics(self, metrics: dict[str, float]) -> None: ...

    def log_artifacts(self, paths: list[Path], artifact_path: str) -> None: ...


@dataclass
class EvaluateResult:
    path: str
    n_test: int
    accuracy: float
    top5: float | None  # None with fewer than 5 classes
    macro_f1: float
    balanced_accuracy: float
    ece: float
    loss: float


@dataclass
class Scores:
    y: np.ndarray  # true class per test image
    logp: np.ndarray  # N×classes log-probabilities

    @property
    def pred(self) -> np.ndarray:
        return self.logp.argmax(1)

    @property
    def confidence(self) -> np.ndarray:
        return np.exp(self.logp.max(1))


def evaluate(params: Params, tracker: Tracker | None = None) -> EvaluateResult:
    """Score the test split with the trained model; write metrics, reports and plots."""
    cfg, root = params.evaluate, params.paths.prepared
    manifest = read_manifest(root)
    names = class_names(manifest)
    test = load_split(root, "test")
    if len(test.y) == 0:
        raise UserError(f"{root} has no test images; set data.test_fraction > 0 and prepare again")
    device = pick_device(cfg.device)
    model_path = Path(params.paths.train) / outputs.MODEL
    model, meta = load_model(model_path, device)
    check_fits(meta, manifest, model_path)
    s = Scores(np.asarray(test.y), score(model, meta, test.x, device, cfg.batch_size, cfg.tta_flip))
    metrics, report = _metrics(s, names)
    table = _calibration(s.confidence, s.pred == s.y, cfg.calibration_bins)
    metrics = _ordered(metrics | {"ece": _round(table["gap"] @ table["count"] / len(s.y))})
    history = _read_history(Path(params.paths.train) / outputs.HISTORY)
    with atomic_dir(params.paths.evaluate) as out:
        write_json(out / outputs.METRICS, metrics)
        write_json(out / outputs.REPORT_JSON, report)
        (out / outputs.REPORT_TXT).write_text(_report_text(s, names, metrics))
        _write_predictions(out / outputs.PREDICTIONS, s, names)
        write_json(out / outputs.REFERENCE, _reference(s, names, meta, cfg.tta_flip))
        _write_csv(out / outputs.CONFUSION_CSV, ["actual", "predicted"],
                   ([names[t], names[p]] for t, p in zip(s.y, s.pred, strict=True)))
        _write_csv(out / outputs.CALIBRATION_CSV, ["bin", "lower", "upper", "confidence",
                                                 "accuracy", "count"], _calibration_rows(table))
        for normalize, name in ((None, outputs.CONFUSION_PNG),
                                ("true", outputs.CONFUSION_NORMALIZED_PNG)):
            _save(_confusion_figure(s, names, normalize), out / name)
        _save(_calibration_figure(table, metrics["ece"]), out / outputs.CALIBRATION_PNG)
        _save(_mistakes_figure(s, test.x, names, cfg.mistakes), out / outputs.MISTAKES_PNG)
        _save(_curves_figure(history, meta.get("epoch")), out / outputs.CURVES_PNG)
        written = sorted(p.name for p in out.iterdir())
    final = Path(params.paths.evaluate)
    if tracker is not None:
        tracker.log_metrics(_flat_metrics(metrics, report, names))
        tracker.log_artifacts([final / f for f in written], "evaluate")
    return EvaluateResult(str(final), metrics["n_test"], metrics["accuracy"], metrics.get("top5"),
                          metrics["macro_f1"], metrics["balanced_accuracy"], metrics["ece"],
                          metrics["loss"])


def _reference(s: Scores, names: list[str], meta: dict, tta_flip: bool) -> dict[str, Any]:
    """reference.json: what model.pt carries (drift.carried), its test figures as scored here."""
    return drift.carried(meta) | {"test": drift.reference(s.logp, names, tta_flip)}


# --- numbers -------------------------------------------------------------------------------------


def _metrics(s: Scores, names: list[str]) -> tuple[dict[str, Any], dict]:
    """metrics.json's figures but ece, and scikit-learn's per-class report."""
    labels = np.arange(len(names))
    report = classification_report(s.y, s.pred, labels=labels, target_names=names,
                                   output_dict=True, zero_division=0)
    present = [report[n]["recall"] for n in names if report[n]["support"] > 0]
    metrics: dict[str, Any] = {
        "accuracy": float(np.mean(s.pred == s.y)),
        "balanced_accuracy": float(np.mean(present)),  # as balanced_accuracy_score
        "macro_f1": report["macro avg"]["f1-score"],
        "loss": float(-s.logp[np.arange(len(s.y)), s.y].mean()),
    }
    if len(names) >= 5:
        metrics["top5"] = top_k_accuracy_score(s.y, s.logp, k=5, labels=labels)
    metrics = {k: _round(v) for k, v in metrics.items()}
    return metrics | {"n_test": int(len(s.y))}, report


def _ordered(metrics: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers first, as `dvc metrics show` and `dvc exp show` list them."""
    head = ["accuracy", "balanced_accuracy", "macro_f1", "loss", "top5", "ece", "n_test"]
    return {k: metrics[k] for k in head if k in metrics} | metrics


def _round(value: float) -> float:
    return round(float(value), 6)  # beyond this the digits are noise, and they clutter diffs


def _calibration(confidence: np.ndarray, correct: np.ndarray, bins: int) -> dict[str, np.ndarray]:
    """Per equal-width bin (lower, upper] of confidence: count, mean confidence, accuracy and
    their gap; ECE is the count-weighted mean gap."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins).astype(float)
    seen = np.maximum(count, 1)
    conf = np.bincount(which, weights=confidence, minlength=bins) / seen
    acc = np.bincount(which, weights=correct.astype(float), minlength=bins) / seen
    return {"lower": edges[:-1], "upper": edges[1:], "count": count, "confidence": conf,
            "accuracy": acc, "gap": np.abs(acc - conf)}


def _calibration_rows(table: dict[str, np.ndarray]):
    for i in np.flatnonzero(table["count"]):
        yield [i, f"{table['lower'][i]:.4f}", f"{table['upper'][i]:.4f}",
               f"{table['confidence'][i]:.6f}", f"{table['accuracy'][i]:.6f}",
               int(table["count"][i])]


def _flat_metrics(metrics: dict[str, Any], report: dict, names: list[str]) -> dict[str, float]:
    """What MLflow gets: metrics.json, the report's macro and weighted averages, and each class's
    recall (`class_recall.<class>`, class names made valid MLflow metric keys)."""
    flat = {k: float(v) for k, v in metrics.items()}
    for avg in ("macro", "weighted"):
        for key in ("precision", "recall", "f1"):
            flat.setdefault(f"{avg}_{key}", _round(report[f"{avg} avg"][
                "f1-score" if key == "f1" else key]))
    for name in names:
        flat["class_recall." + UNSAFE_KEY.sub("_", name)] = _round(report[name]["recall"])
    return flat


def _read_history(path: Path) -> list[dict]:
    """train's history.json: a list of per-epoch rows (or {"epochs": [...]})."""
    if not path.is_file():
        return []
    rows = json.loads(path.read_text())
    return rows.get("epochs", []) if isinstance(rows, dict) else rows


# --- files ---------------------------------------------------------------------------------------


def _report_text(s: Scores, names: list[str], metrics: dict) -> str:
    text = classification_report(s.y, s.pred, labels=np.arange(len(names)), target_names=names,
                                 digits=4, zero_division=0)
    extra = f"top-5 accuracy {metrics['top5']:.4f}, " if "top5" in metrics else ""
    return (f"{text}\n{extra}loss {metrics['loss']:.4f}, ECE {metrics['ece']:.4f}, "
            f"{metrics['n_test']} test images\n")


def _write_predictions(path: Path, s: Scores, names: list[str]) -> None:
    rows = ([i, names[t], names[p], f"{c:.8g}"]
            for i, (t, p, c) in enumerate(zip(s.y, s.pred, s.confidence, strict=True)))
    _write_csv(path, ["index", "true", "predicted", "confidence"], rows)


def _write_csv(path: Path, header: list[str], rows) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


# --- pictures ------------------------------------------------------------------------------------


def _save(fig: Figure, path: Path) -> None:
    fig.savefig(path, dpi=DPI)


def _fixed_layout(fig: Figure, left: float = 0.8, right: float = 0.25, top: float = 0.45,
                  bottom: float = 0.6, **spacing: float) -> Figure:
    """Margins in inches, for a figure whose labels have a known size. Constrained layout would
    measure every artist in a drawing pass of its own first: a third of a figure's time."""
    width, height = fig.get_size_inches()
    fig.subplots_adjust(left=left / width, right=1 - right / width, top=1 - top / height,
                        bottom=bottom / height, **spacing)
    return fig


def _confusion_figure(s: Scores, names: list[str], normalize: str | None) -> Figure:
    n = len(names)
    side = min(16.0, max(4.5, 0.45 * n + 2))
    labels = names if n <= TICKS_MAX else None
    # Margins from the longest class name rather than constrained layout, whose measuring pass
    # doubled the figure's time; x labels turn vertical past 10 classes.
    name = _text_inches(max(labels, key=len)) if labels else 0.0
    fig = _fixed_layout(Figure(figsize=(side + 1, side)), left=0.55 + name, right=0.3,
                        bottom=0.55 + (name if n > 10 else 0.1))
    ax = fig.add_subplot()
    ConfusionMatrixDisplay.from_predictions(
        s.y, s.pred, labels=np.arange(n), display_labels=labels, normalize=normalize,
        include_values=n <= ANNOTATE_MAX, values_format=".2f" if normalize else "d",
        cmap="Blues", ax=ax, xticks_rotation="vertical" if n > 10 else "horizontal",
        colorbar=True,
    )
    if labels is None:  # the display numbers every tick; with many classes that is a smear
        ax.set_xticks([])
        ax.set_yticks([])
    what = "share of each true class" if normalize else "test images"
    ax.set_title(f"Confusion matrix ({what}), accuracy {np.mean(s.pred == s.y):.4f}")
    return fig


def _text_inches(text: str, points: float = 10.0) -> float:
    """About how wide `text` prints at `points` (matplotlib's default tick labels): a margin's
    width without a layout pass. Generous: DejaVu Sans averages under 0.6 em a character."""
    return 0.62 * points / 72 * len(text)


def _calibration_figure(table: dict[str, np.ndarray], ece: float) -> Figure:
    fig = _fixed_layout(Figure(figsize=(5.5, 6.5)), hspace=0.08)
    top, bottom = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    width = table["upper"] - table["lower"]
    used = table["count"] > 0
    top.bar(table["lower"][used], table["accuracy"][used], width[used], align="edge",
            color="tab:blue", edgecolor="white", label="accuracy")
    low = np.minimum(table["accuracy"], table["confidence"])[used]
    top.bar(table["lower"][used], table["gap"][used], width[used], bottom=low, align="edge",
            fill=False, hatch="///", edgecolor="tab:red", lw=0.8, label="gap to confidence")
    top.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    top.set(ylim=(0, 1), ylabel="accuracy", title=f"Reliability diagram, ECE {ece:.4f}")
    top.legend(loc="upper left")
    bottom.bar(table["lower"], table["count"], width, align="edge", color="grey",
               edgecolor="white")
    bottom.set(xlim=(0, 1), xlabel="confidence (top-class probability)", ylabel="images")
    return fig


def _mistakes_figure(s: Scores, x: np.ndarray, names: list[str], limit: int) -> Figure:
    wrong = np.flatnonzero(s.pred != s.y)
    worst = wrong[np.argsort(-s.confidence[wrong], kind="stable")][:limit]
    if len(worst) == 0:
        return _message_figure("No mistakes on the test split" if limit else
                               "Gallery off (evaluate.mistakes = 0)")
    cols = min(8, len(worst))
    rows = math.ceil(len(worst) / cols)
    fig = Figure(figsize=(1.6 * cols, 1.9 * rows + 0.4))
    fig.suptitle(f"Most confident mistakes ({len(worst)} of {len(wrong)} wrong)",
                 y=1 - 0.05 / fig.get_figheight(), va="top")
    ax = fig.add_axes((0.01, 0.01, 0.98, 0.99 - 0.4 / fig.get_figheight()))
    captions = [(f"true {_short(names[s.y[i]])}\npred {_short(names[s.pred[i]])} "
                 f"{s.confidence[i]:.2f}", {"fontsize": 8}) for i in worst]
    gallery.draw(ax, [np.asarray(x[i]) for i in worst], captions, cols, caption_inches=0.32)
    return fig


def _short(name: str) -> str:
    return textwrap.shorten(name, 14, placeholder="…")


def _curves_figure(history: list[dict], best_epoch: int | None) -> Figure:
    if not history:
        return _message_figure(f"No training history ({outputs.HISTORY}) to draw")
    fig = _fixed_layout(Figure(figsize=(10, 4)), wspace=0.15)
    epochs = [row["epoch"] for row in history]
    for ax, metric, title in zip(fig.subplots(1, 2), ("loss", "acc"), ("Loss", "Accuracy"),
                                 strict=True):
        for split, style in (("train", "-o"), ("val", "-s")):
            values = [row.get(f"{split}_{metric}") for row in history]
            if any(v is not None for v in values):
                ax.plot(epochs, [np.nan if v is None else v for v in values], style, ms=3,
                        label=split)
        if best_epoch:
            ax.axvline(best_epoch, color="grey", ls=":", label=f"kept weights (epoch {best_epoch})")
        ax.set(title=title, xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
        ax.grid(alpha=0.3)
    return fig


def _message_figure(text: str) -> Figure:
    fig = Figure(figsize=(4, 1))
    fig.text(0.5, 0.5, text, ha="center", va="center")
    return fig
