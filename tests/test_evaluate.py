"""The evaluate step on tiny data whose answers are known: a model whose logits the test controls.

`readout` (registered with timm below, created by load_model like any model) turns each image
into logits directly: logit c = scale × (row c of the image, as the model sees it), averaged over
the row ("rows": a mirror image gives the same logits) or taken from the row's first pixel
("first_column": a mirror image gives other logits). So every probability, and every metric, can
be recomputed here with numpy alone.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from timm.models import register_model

from cnn_pipeline.cli import main as command
from components.core import outputs
from components.core.params import ParamsError, UserError, load_params, validate
from components.evaluate import _calibration, evaluate
from components.training import checkpoint
from components.training.models import create_model

ROOT = Path(__file__).resolve().parents[1]
SCALE = 8.0
FILES = set(outputs.EVALUATE)


class Readout(torch.nn.Module):
    def __init__(self, num_classes: int, mode: str = "rows", **_):
        super().__init__()
        self.num_classes, self.mode = num_classes, mode
        self.scale = torch.nn.Parameter(torch.tensor(1.0))  # saved and loaded like any weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x[:, 0, : self.num_classes]
        return self.scale * (rows.mean(-1) if self.mode == "rows" else rows[..., 0])


@register_model
def readout(pretrained: bool = False, num_classes: int = 10, in_chans: int = 1, mode: str = "rows",
            **kwargs) -> Readout:
    return Readout(num_classes, mode)


# --- test data ------------------------------------------------------------------------------------


def write_prepared(root: Path, x: np.ndarray, y: np.ndarray, n_classes: int) -> list[str]:
    """The prepared format (components/data/dataset.py) with x as every split; mean 0, std 1 so the
    model sees pixel/255."""
    root.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test"):
        np.save(root / f"{split}_x.npy", x)
        np.save(root / f"{split}_y.npy", y.astype(np.int64))
    names = [f"class {chr(65 + i)}" for i in range(n_classes)]  # spaces: CSV and keys cope
    c = x.shape[3]
    manifest = {"classes": [{"index": i, "name": n} for i, n in enumerate(names)],
                "image_size": list(x.shape[1:3]), "channels": c, "mean": [0.0] * c,
                "std": [1.0] * c, "resize": "crop", "source": "test"}
    (root / outputs.MANIFEST).write_text(json.dumps(manifest))
    return names


def write_model(path: Path, model: torch.nn.Module, name: str, kwargs: dict, manifest: dict,
                epoch: int = 2) -> None:
    """A model.pt in train's format (what components.training.checkpoint.load_model reads)."""
    checkpoint.save(path, {
        "format": checkpoint.MODEL_FORMAT, "model": {"name": name, "kwargs": kwargs},
        "classes": [c["name"] for c in manifest["classes"]], "image_size": manifest["image_size"],
        "channels": manifest["channels"], "mean": manifest["mean"], "std": manifest["std"],
        "epoch": epoch, "metrics": {}, "state_dict": model.state_dict(),
    })


def write_history(path: Path, epochs: int = 3) -> None:
    rows = [{"epoch": e, "train_loss": 2.0 / e, "train_acc": 0.3 * e, "val_loss": 2.1 / e,
             "val_acc": 0.28 * e, "lr": 0.001} for e in range(1, epochs + 1)]
    path.write_text(json.dumps(rows))


def make_case(tmp_path: Path, n: int = 97, n_classes: int = 6, mode: str = "rows", seed: int = 0,
              **evaluate_settings):
    """Random 8×8 images, labels mostly the model's answer, a readout model; returns params,
    images, labels, class names."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, 8, 8, 1), dtype=np.uint8)
    p = expected_probs(x, n_classes, mode, tta=False)
    y = np.where(rng.random(n) < 0.6, p.argmax(1), rng.integers(0, n_classes, n))
    names = write_prepared(tmp_path / "prepared", x, y, n_classes)
    model = Readout(n_classes, mode)
    with torch.no_grad():
        model.scale.fill_(SCALE)
    (tmp_path / "train").mkdir()
    manifest = json.loads((tmp_path / "prepared" / outputs.MANIFEST).read_text())
    write_model(tmp_path / "train" / outputs.MODEL, model, "readout",
                {"num_classes": n_classes, "in_chans": 1, "img_size": 8, "mode": mode}, manifest)
    write_history(tmp_path / "train" / outputs.HISTORY)
    return params_for(tmp_path, **evaluate_settings), x, y, names


def params_for(tmp_path: Path, **evaluate_settings):
    paths = {k: str(tmp_path / k) for k in ("prepared", "augment", "train", "evaluate",
                                            "register", "predictions")}
    return validate({"paths": paths, "evaluate": {"device": "cpu", **evaluate_settings}})


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def expected_probs(x: np.ndarray, n_classes: int, mode: str, tta: bool) -> np.ndarray:
    rows = x[:, :n_classes, :, 0].astype(np.float64) / 255.0

    def probs(r):
        return softmax(SCALE * (r.mean(-1) if mode == "rows" else r[..., 0]))

    return (probs(rows) + probs(rows[..., ::-1])) / 2 if tta else probs(rows)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --- metrics ------------------------------------------------------------------------------------


def test_metrics_match_an_independent_computation(tmp_path):
    params, x, y, names = make_case(tmp_path)
    result = evaluate(params)
    out = tmp_path / "evaluate"
    metrics = json.loads((out / outputs.METRICS).read_text())

    p = expected_probs(x, len(names), "rows", tta=False)
    pred, conf = p.argmax(1), p.max(1)
    assert 0.4 < np.mean(pred == y) < 0.95  # the case has right and wrong answers
    assert metrics["n_test"] == len(y) == result.n_test
    assert metrics["accuracy"] == pytest.approx(np.mean(pred == y), abs=1e-6)
    top5 = np.argsort(-p, axis=1)[:, :5]
    assert metrics["top5"] == pytest.approx(np.mean((top5 == y[:, None]).any(1)), abs=1e-6)
    assert metrics["loss"] == pytest.approx(-np.mean(np.log(p[np.arange(len(y)), y])), abs=1e-5)

    tp = np.array([np.sum((pred == c) & (y == c)) for c in range(len(names))], float)
    precision = tp / np.maximum([np.sum(pred == c) for c in range(len(names))], 1)
    support = np.array([np.sum(y == c) for c in range(len(names))], float)
    recall = tp / support
    f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall + 1e-300), 0)
    assert metrics["macro_f1"] == pytest.approx(f1.mean(), abs=1e-6)
    assert metrics["balanced_accuracy"] == pytest.approx(recall.mean(), abs=1e-6)
    # The per-class figures and their averages are the report's, not metrics.json's.
    report = json.loads((out / outputs.REPORT_JSON).read_text())
    assert report["weighted avg"]["f1-score"] == pytest.approx(f1 @ support / support.sum(),
                                                               abs=1e-6)
    assert report["macro avg"]["precision"] == pytest.approx(precision.mean(), abs=1e-6)
    assert {n: report[n]["recall"] for n in names} == pytest.approx(
        dict(zip(names, recall, strict=True)), abs=1e-6)
    assert list(metrics) == ["accuracy", "balanced_accuracy", "macro_f1", "loss", "top5", "ece",
                             "n_test"]

    ece = 0.0
    for lo, hi in zip(np.arange(15) / 15, np.arange(1, 16) / 15, strict=True):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += inside.sum() / len(y) * abs(np.mean(pred[inside] == y[inside])
                                               - conf[inside].mean())
    assert metrics["ece"] == pytest.approx(ece, abs=1e-6) and result.ece == metrics["ece"]

    rows = read_csv(out / outputs.PREDICTIONS)
    assert [int(r["index"]) for r in rows] == list(range(len(y)))
    assert [r["true"] for r in rows] == [names[i] for i in y]
    assert [r["predicted"] for r in rows] == [names[i] for i in pred]
    assert np.allclose([float(r["confidence"]) for r in rows], conf, atol=1e-6)
    confusion = read_csv(out / outputs.CONFUSION_CSV)
    assert [(r["actual"], r["predicted"]) for r in confusion] == [
        (names[t], names[q]) for t, q in zip(y, pred, strict=True)]
    calibration = read_csv(out / outputs.CALIBRATION_CSV)
    assert sum(int(r["count"]) for r in calibration) == len(y)
    report = json.loads((out / outputs.REPORT_JSON).read_text())
    assert report[names[0]]["support"] == support[0]


def test_ece_on_a_hand_made_case():
    # Bins of 0.2, right-closed: (0, .2] holds .2; (.2, .4] holds .3; (.8, 1] holds .9, .95, 1.
    confidence = np.array([0.2, 0.3, 0.9, 0.95, 1.0])
    correct = np.array([False, True, True, False, True])
    table = _calibration(confidence, correct, bins=5)
    assert table["count"].tolist() == [1, 1, 0, 0, 3]
    ece = table["gap"] @ table["count"] / len(confidence)
    assert ece == pytest.approx(0.2 / 5 + 0.7 / 5 + 3 / 5 * abs(2 / 3 - 0.95))
    calibrated = _calibration(np.array([0.5, 0.5, 1.0]), np.array([True, False, True]), bins=10)
    assert calibrated["gap"] @ calibrated["count"] == pytest.approx(0.0)


def test_top5_only_with_five_classes_or_more(tmp_path):
    params, *_ = make_case(tmp_path, n=30, n_classes=3)
    result = evaluate(params)
    metrics = json.loads((tmp_path / "evaluate" / outputs.METRICS).read_text())
    assert "top5" not in metrics and result.top5 is None
    assert "top-5" not in (tmp_path / "evaluate" / outputs.REPORT_TXT).read_text()


# --- files --------------------------------------------------------------------------------------


class RecordingTracker:
    """A tracker with the two methods evaluate calls (tracking/run.py provides MLflow's)."""

    def __init__(self):
        self.metrics: dict[str, float] = {}
        self.artifacts: list[tuple[list[Path], str]] = []

    def log_metrics(self, metrics: dict[str, float]) -> None:
        self.metrics.update(metrics)

    def log_artifacts(self, paths: list[Path], artifact_path: str) -> None:
        self.artifacts.append((list(paths), artifact_path))


def test_every_file_is_written_and_logged_and_pictures_are_valid(tmp_path):
    params, *_ = make_case(tmp_path, mistakes=5)
    (tmp_path / "evaluate").mkdir()
    (tmp_path / "evaluate/stale.png").write_bytes(b"from an older run")
    tracker = RecordingTracker()
    evaluate(params, tracker)
    out = tmp_path / "evaluate"
    assert {p.name for p in out.iterdir()} == FILES  # the folder was replaced whole
    for name in FILES:
        if name.endswith(".png"):
            with Image.open(out / name) as img:
                img.verify()
                assert img.format == "PNG" and min(img.size) >= 100
    metrics = json.loads((out / outputs.METRICS).read_text())
    assert tracker.metrics["accuracy"] == metrics["accuracy"]
    report = json.loads((out / outputs.REPORT_JSON).read_text())
    assert tracker.metrics["class_recall.class A"] == pytest.approx(report["class A"]["recall"])
    assert tracker.metrics["weighted_f1"] == pytest.approx(report["weighted avg"]["f1-score"])
    assert all(isinstance(v, float) for v in tracker.metrics.values())
    [(logged, artifact_path)] = tracker.artifacts
    assert {Path(p).name for p in logged} == FILES and all(Path(p).is_file() for p in logged)
    assert artifact_path == "evaluate"


def test_no_gallery_and_no_history_still_give_every_picture(tmp_path):
    params, *_ = make_case(tmp_path, mistakes=0)
    (tmp_path / "train" / outputs.HISTORY).unlink()
    evaluate(params)
    assert {p.name for p in (tmp_path / "evaluate").iterdir()} == FILES


# --- test-time augmentation ---------------------------------------------------------------------


def test_tta_flip_changes_nothing_for_a_flip_invariant_model(tmp_path):
    params, *_ = make_case(tmp_path, mode="rows")
    plain = evaluate(params)
    before = read_csv(tmp_path / "evaluate" / outputs.PREDICTIONS)
    flipped = evaluate(params_for(tmp_path, tta_flip=True))
    after = read_csv(tmp_path / "evaluate" / outputs.PREDICTIONS)
    assert [r["predicted"] for r in after] == [r["predicted"] for r in before]
    assert np.allclose([float(r["confidence"]) for r in after],
                       [float(r["confidence"]) for r in before], atol=1e-6)
    assert flipped.accuracy == plain.accuracy
    assert flipped.loss == pytest.approx(plain.loss, abs=1e-5)


def test_tta_flip_averages_with_the_mirror_image(tmp_path):
    params, x, _, names = make_case(tmp_path, mode="first_column", tta_flip=True)
    evaluate(params)
    p = expected_probs(x, len(names), "first_column", tta=True)
    rows = read_csv(tmp_path / "evaluate" / outputs.PREDICTIONS)
    assert [r["predicted"] for r in rows] == [names[i] for i in p.argmax(1)]
    assert np.allclose([float(r["confidence"]) for r in rows], p.max(1), atol=1e-6)
    # and differs from the unflipped answer, so the check above can tell them apart
    assert not np.allclose(p.max(1), expected_probs(x, len(names), "first_column", False).max(1))


# --- refusals and the entry point ---------------------------------------------------------------


def test_a_model_of_other_data_is_refused(tmp_path):
    params, *_ = make_case(tmp_path, n_classes=6)
    write_prepared(tmp_path / "prepared", np.zeros((4, 8, 8, 1), np.uint8), np.arange(4), 4)
    with pytest.raises(UserError, match="trained on other data"):
        evaluate(params)


def test_missing_model_and_empty_test_split_are_user_errors(tmp_path):
    params, *_ = make_case(tmp_path)
    write_prepared(tmp_path / "prepared", np.zeros((0, 8, 8, 1), np.uint8), np.zeros(0), 6)
    with pytest.raises(UserError, match="no test images"):
        evaluate(params)
    make_case(tmp_path / "again")
    (tmp_path / "again/train" / outputs.MODEL).unlink()
    with pytest.raises(UserError, match=f"{outputs.MODEL} does not exist"):
        evaluate(params_for(tmp_path / "again"))


@pytest.mark.parametrize("override", ["evaluate.calibration_bins=1", "evaluate.mistakes=-1",
                                      "evaluate.mistakes=65", "evaluate.device=gpu",
                                      "evaluate.batch_size=0", "evaluate.tta_flip=sometimes",
                                      "evaluate.bins=15"])
def test_bad_settings_are_rejected(override):
    with pytest.raises(ParamsError, match=override.split("=")[0].replace(".", r"\.")):
        load_params(ROOT / "params.yaml", [override])


def write_simple_cnn_case(tmp_path: Path) -> Path:
    """A built-in model (importable by a fresh process) with random weights; returns params.yaml."""
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(40, 8, 8, 1), dtype=np.uint8)
    write_prepared(tmp_path / "prepared", x, rng.integers(0, 10, 40), 10)
    manifest = json.loads((tmp_path / "prepared" / outputs.MANIFEST).read_text())
    kwargs = {"num_classes": 10, "in_chans": 1, "img_size": 8}
    torch.manual_seed(0)
    (tmp_path / "train").mkdir()
    write_model(tmp_path / "train" / outputs.MODEL, create_model("simple_cnn", **kwargs),
                "simple_cnn", kwargs, manifest)
    write_history(tmp_path / "train" / outputs.HISTORY)
    params = params_for(tmp_path).model_dump(mode="json")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_entry_point_runs_from_the_command_line(tmp_path, capsys):
    """The command tracks into MLflow (components/tracking/): a SQLite store of the test's own."""
    from mlflow import MlflowClient

    params = write_simple_cnn_case(tmp_path)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "cnn_pipeline", "evaluate", "--params", str(params)]
    # Run from the test's folder: MLflow keeps a SQLite store's artifacts under ./mlruns.
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MLFLOW_TRACKING_URI": store, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["n_test"] == 40 and 0.0 <= summary["accuracy"] <= 1.0
    assert {p.name for p in (tmp_path / "evaluate").iterdir()} == FILES
    [run] = MlflowClient(store).search_runs(
        [e.experiment_id for e in MlflowClient(store).search_experiments()])
    assert run.data.metrics["accuracy"] == summary["accuracy"]

    with pytest.raises(SystemExit) as exit_:  # the same command, in this process: faster
        command(["evaluate", "--params", str(params), "--set", "evaluate.calibration_bins=0"])
    assert exit_.value.code == 2
    assert "evaluate.calibration_bins = 0" in capsys.readouterr().err


# --- DVC ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_dvc_repro_gives_metrics_and_plots(tmp_path):
    """The whole pipeline up to evaluate in a temporary git repo, at one epoch."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "components", repo / "components",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ["params.yaml", "dvc.yaml", ".dvcignore", ".dvc/config", "data/raw/.gitkeep"]:
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, repo / name)
    settings = yaml.safe_load((repo / "params.yaml").read_text())
    settings["train"]["epochs"] = 1
    (repo / "params.yaml").write_text(yaml.safe_dump(settings))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    for cmd in (["git", "init", "-q"], [*git, "add", "."], [*git, "commit", "-qm", "project"]):
        dvc(cmd, repo)

    assert "Running stage 'evaluate'" in dvc(["dvc", "repro", "evaluate"], repo)
    shown = json.loads(dvc(["dvc", "metrics", "show", "--json"], repo))
    metrics = shown[""]["data"][f"outputs/evaluate/{outputs.METRICS}"]["data"]
    assert metrics["n_test"] == 359 and 0.0 <= metrics["accuracy"] <= 1.0
    assert set(metrics) == {"accuracy", "balanced_accuracy", "macro_f1", "loss", "top5", "ece",
                            "n_test"}  # the per-class figures are in the report, not here

    plots = json.loads(dvc(["dvc", "plots", "show", "--json"], repo))["data"]
    [confusion] = plots[f"outputs/evaluate/{outputs.CONFUSION_CSV}"]
    assert confusion["type"] == "vega"
    assert len(confusion["content"]["data"]["values"]) == 359  # one row per test image, counted
    assert plots[f"outputs/evaluate/{outputs.CALIBRATION_CSV}"][0]["type"] == "vega"
    for name in [n for n in outputs.EVALUATE if n.endswith(".png")]:
        assert plots[f"outputs/evaluate/{name}"][0]["type"] == "image"
    dvc(["dvc", "plots", "show"], repo)
    html = (repo / "dvc_plots/index.html").read_text()
    assert "vega" in html and html.count("<img") == 5

    assert "Running stage" not in dvc(["dvc", "repro", "evaluate"], repo)
    settings["evaluate"]["calibration_bins"] = 10
    (repo / "params.yaml").write_text(yaml.safe_dump(settings))
    out = dvc(["dvc", "repro", "evaluate"], repo)
    assert "Running stage 'evaluate'" in out and "Running stage 'train'" not in out


def dvc(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout
