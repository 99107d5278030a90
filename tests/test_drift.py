"""Drift in batch prediction: a digits model (the real prepare, augment, train and evaluate steps,
10 epochs) scores folders written as users have them, and drift.json says whether each looks like
the model's data: digits drawn like the test split do, colour pictures do not, a folder of one
class is reported as such; fail_on_drift fails the command with predictions written; the
reference travels inside model.pt; bad thresholds are refused before any work.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient
from PIL import Image

from cnn_pipeline.cli import main as command
from components.core import outputs
from components.core.params import Params, Predict, validate
from components.data import drift
from components.data.dataset import load_split
from components.data.images import Seen, decode_seen
from components.evaluate import evaluate
from components.predict import predict
from components.train import train
from components.training import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(digits: Path, tmp_path_factory) -> Params:
    root = tmp_path_factory.mktemp("drift")
    paths = {"prepared": str(digits / "prepared"), "augment": str(digits / "augment_basic"),
             "train": str(root / "train"), "evaluate": str(root / "evaluate"),
             "predictions": str(root / "predictions")}
    params = validate({"paths": paths, "train": {"epochs": 10, "device": "cpu"},
                       "evaluate": {"device": "cpu", "mistakes": 0}})
    train(params)
    evaluate(params)
    return params


def write_digits(folder: Path, x: np.ndarray) -> Path:
    folder.mkdir(parents=True)
    for i, image in enumerate(x):
        Image.fromarray(np.asarray(image)[..., 0]).save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def splits(digits: Path) -> dict:
    return {s: load_split(digits / "prepared", s) for s in ("train", "val", "test")}


@pytest.fixture(scope="module")
def like_test(splits, tmp_path_factory) -> Path:
    """240 digits drawn at random from val and test (images the model did not train on, as the
    test split's were drawn): not the test split itself."""
    x = np.concatenate([splits["val"].x, splits["test"].x])
    pick = np.random.default_rng(0).choice(len(x), 240, replace=False)
    return write_digits(tmp_path_factory.mktemp("like_test") / "inbox", x[pick])


def digits_of(splits, classes: set[int], folder: Path) -> Path:
    x = np.concatenate([s.x for s in splits.values()])
    y = np.concatenate([s.y for s in splits.values()])
    return write_digits(folder, x[np.isin(y, list(classes))])


@pytest.fixture(scope="module")
def colour(tmp_path_factory) -> Path:
    """72 colour pictures as in the issue: random noise and flat colours in cat/ and dog/, in four
    formats and many sizes."""
    folder = tmp_path_factory.mktemp("colour")
    rng = np.random.default_rng(0)
    for i in range(72):
        side = int(rng.integers(24, 120))
        if i % 2:
            image = Image.fromarray(rng.integers(0, 256, (side, side + 7, 3), np.uint8))
        else:
            image = Image.new("RGB", (side + 5, side), tuple(map(int, rng.integers(0, 256, 3))))
        sub = folder / ("cat" if i % 3 else "dog")
        sub.mkdir(exist_ok=True)
        image.save(sub / f"{i}.{('png', 'jpg', 'bmp', 'webp')[i % 4]}")
    return folder


def scored(params: Params, folder: Path, out: Path, model: str | None = None, **predict_cfg):
    """predict into `out` with predict settings changed; (result, drift.json)."""
    params = params.model_copy(update={
        "paths": params.paths.model_copy(update={"predictions": out}),
        "predict": params.predict.model_copy(update=predict_cfg)})
    result = predict(params, folder, model or str(Path(params.paths.train) / outputs.MODEL))
    assert Path(result.drift) == out / outputs.DRIFT and Path(result.predictions).parent == out
    return result, json.loads(Path(result.drift).read_text())


# ---------------------------------------------------------------------------------------------


def test_digits_drawn_like_the_test_split_show_no_drift(trained, like_test, tmp_path, capsys):
    result, report = scored(trained, like_test, tmp_path)
    assert result.scored == report["images"] == 240 and not result.drifted
    assert report["drift"] is False and report["warnings"] == [] and report["notes"] == []
    assert set(report["figures"]) == set(drift.FIGURES)
    for name, fig in report["figures"].items():
        assert fig["judged"], name  # 240 >= 20 per class x 10 classes: the classes too
        assert fig["setting"] == f"predict.drift_{name}"
        # Far inside the threshold, except two figures that chance moves: the share below the
        # 5th percentile (~0.05 +- 0.014 for 240 images) and the class distance (~0.08 +- 0.02).
        margin = 1 if name in ("low_confidence", "class_distance") else 0.5
        assert fig["value"] <= margin * fig["threshold"], (name, fig)
    assert report["class_distance_metric"] == "total_variation"
    assert report["seen"]["colour"] == 0 and report["seen"]["width"]["median"] == 8
    assert "no drift in 240 images" in capsys.readouterr().err


def test_colour_pictures_drift_naming_the_figures(trained, colour, tmp_path, capsys):
    result, report = scored(trained, colour, tmp_path)
    assert result.scored == 72 and result.drifted and report["drift"] is True
    crossed = {name for name, fig in report["figures"].items() if fig["drift"]}
    assert {"confidence_drop", "low_confidence", "channel_mismatch"} <= crossed
    assert crossed & {"channel_mean", "channel_std"}
    assert not report["figures"]["class_distance"]["judged"]  # 72 < 200: too few to tell
    err = capsys.readouterr().err
    for name in crossed:
        assert f"warning: drift: {name} = " in err and f"predict.drift_{name})" in err
        assert any(w.startswith(f"drift: {name} = ") for w in report["warnings"])
    assert "DRIFT in 72 images" in err
    assert report["seen"]["colour"] >= 70  # a random flat colour may come out grey


def test_a_folder_of_one_class_is_reported_not_called_drift(trained, splits, tmp_path):
    threes = digits_of(splits, {3}, tmp_path / "threes")
    # Few enough images per class needed that the class figure would be judged, were it not
    # one class.
    _, report = scored(trained, threes, tmp_path / "out", drift_class_min_per_class=5)
    fig = report["figures"]["class_distance"]
    assert report["drift"] is False and fig["one_class"] == "3" and not fig["judged"]
    assert any(n.startswith("one class: ") and "'3'" in n for n in report["notes"])
    # Two classes are no longer one: there the class distribution is judged, and drifts.
    pair = digits_of(splits, {3, 5}, tmp_path / "pair")
    _, report = scored(trained, pair, tmp_path / "out2", drift_class_min_per_class=5)
    fig = report["figures"]["class_distance"]
    assert fig["judged"] and fig["drift"] and fig["value"] > 0.6  # 80% of the test's are others
    assert report["warnings"] == [w for w in report["warnings"] if "class_distance" in w]


def test_fail_on_drift_exits_non_zero_with_predictions_written(trained, colour, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(trained.model_dump(mode="json")))
    out = tmp_path / "predictions"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}

    def run(*overrides: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "cnn_pipeline", "predict", "--folder", str(colour),
               "--model", str(Path(trained.paths.train) / outputs.MODEL), "--params", str(params),
               "--set", f"paths.predictions={out}", *[a for o in overrides for a in ("--set", o)]]
        return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)

    warned = run()
    assert warned.returncode == 0, warned.stderr
    assert "warning: drift: confidence_drop" in warned.stderr
    failed = run("predict.fail_on_drift=true")
    assert failed.returncode == 2, failed.stderr
    assert "error: drift in" in failed.stderr and "confidence_drop" in failed.stderr
    assert "predict.fail_on_drift" in failed.stderr
    with open(out / outputs.PREDICTIONS) as f:
        assert len(f.readlines()) == 1 + 72  # every picture scored, and kept
    assert json.loads((out / outputs.DRIFT).read_text())["drift"] is True

    # Each batch is an MLflow run of its own in the default store: figures, verdict, files.
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED"]
    for run_ in runs:
        assert run_.info.run_name == "batch-predict" and run_.data.tags["drift"] == "true"
        assert run_.data.metrics["drift"] == 1.0 and run_.data.metrics["scored"] == 72
        assert run_.data.metrics["drift.confidence_drop"] > 0.1
        logged = {a.path for a in client.list_artifacts(run_.info.run_id, "predictions")}
        assert {f"predictions/{outputs.DRIFT}", f"predictions/{outputs.PREDICTIONS}"} <= logged


@pytest.mark.parametrize("override,key", [
    ("predict.drift_channel_mean=-1", "predict.drift_channel_mean"),
    ("predict.drift_low_confidence=abc", "predict.drift_low_confidence"),
    ("predict.drift_confidence_drop=.nan", "predict.drift_confidence_drop"),
    ("predict.drift_class_distance=1.5", "predict.drift_class_distance"),
    ("predict.drift_class_min_per_class=0", "predict.drift_class_min_per_class"),
    ("predict.fail_on_drift=perhaps", "predict.fail_on_drift"),
])
def test_bad_thresholds_are_refused_before_any_work(trained, colour, tmp_path, monkeypatch,
                                                    capsys, override, key):
    monkeypatch.chdir(tmp_path)  # where an MLflow store would appear, were one opened
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(trained.model_dump(mode="json")))
    with pytest.raises(SystemExit) as exit_:
        command(["predict", "--folder", str(colour), "--params", str(params), "--set",
              f"paths.predictions={tmp_path / 'out'}", "--set", override])
    assert exit_.value.code == 2
    assert key + " = " in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing else done


def test_a_model_file_without_a_reference_still_scores(trained, like_test, tmp_path):
    saved = ckpt.load(Path(trained.paths.train) / outputs.MODEL)
    old = ckpt.save(tmp_path / outputs.MODEL, {k: v for k, v in saved.items() if k != "reference"})
    result, report = scored(trained, like_test, tmp_path / "out", model=str(old))
    assert result.scored == 240 and report["drift"] is False
    figures = report["figures"]
    for name in ("confidence_drop", "low_confidence", "class_distance"):
        assert not figures[name]["judged"] and figures[name]["value"] is None
        assert any(n.startswith(f"{name} not judged: the model file has no test reference")
                   for n in report["notes"])
    for name in ("channel_mean", "channel_std", "upscaled", "channel_mismatch"):
        assert figures[name]["judged"], name  # what the old file does carry is still compared
    assert any("carries no test-split reference" in n for n in report["notes"])


def test_the_reference_travels_in_model_pt_and_evaluate_measures_the_same(trained, splits):
    _, meta = ckpt.load_model(Path(trained.paths.train) / outputs.MODEL)
    ref = meta["reference"]
    test = splits["test"]
    assert ref["n"] == len(test.y) and ref["tta_flip"] is False
    assert sum(ref["classes"].values()) == pytest.approx(1.0, abs=1e-5)
    assert ref["confidence"]["low_share"] == pytest.approx(0.05, abs=0.01)
    saved = json.loads((Path(trained.paths.evaluate) / outputs.REFERENCE).read_text())
    assert {k: v for k, v in saved.items() if k != "test"} == {
        k: v for k, v in drift.carried(meta).items() if k != "test"}
    assert saved["test"]["classes"] == ref["classes"]
    for key in ("mean", "low", "low_share"):
        assert saved["test"]["confidence"][key] == pytest.approx(ref["confidence"][key], abs=1e-5)


def test_class_distance_is_the_total_variation_distance():
    meta = {"classes": ["a", "b", "c"], "channels": 1, "image_size": [8, 8], "mean": [0.5],
            "std": [0.25], "reference": {"tta_flip": False, "classes": {"a": 0.5, "b": 0.3,
                                                                         "c": 0.2},
                                         "confidence": {"mean": 0.9, "low": 0.6,
                                                        "low_share": 0.05}}}
    monitor = drift.Monitor(meta, Predict(drift_class_min_per_class=1))
    probs = np.eye(3)[[0] * 2 + [1] * 5 + [2] * 3] * 0.8 + 0.2 / 3  # shares 0.2, 0.5, 0.3
    images = np.full((10, 8, 8, 1), 128, np.uint8)
    monitor.add(images, probs, [Seen(8, 8, False)] * 10)
    figures = monitor.report()["figures"]
    close = {"abs": 1e-6}  # drift.json rounds to 6 decimals
    assert figures["class_distance"]["value"] == pytest.approx(0.5 * (0.3 + 0.2 + 0.1), **close)
    assert figures["confidence_drop"]["value"] == pytest.approx(0.9 - (0.8 + 0.2 / 3), **close)
    assert figures["channel_mean"]["value"] == pytest.approx(abs(128 / 255 - 0.5) / 0.25, **close)
    assert figures["channel_std"]["value"] == pytest.approx(1.0)  # a flat batch: no std at all


def test_what_a_file_was_is_seen_before_decoding(tmp_path):
    grey = np.random.default_rng(0).integers(0, 256, (40, 30), np.uint8)
    Image.fromarray(np.stack([grey] * 3, -1)).save(tmp_path / "grey_as_rgb.jpg", quality=90)
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 50, 3), np.uint8)).save(
        tmp_path / "colour.jpg")
    Image.new("P", (16, 16)).save(tmp_path / "palette.gif")
    for name, channels, colour, size in [("grey_as_rgb.jpg", 1, False, (30, 40)),
                                         ("grey_as_rgb.jpg", 3, False, (30, 40)),
                                         ("colour.jpg", 1, True, (50, 20)),  # drafted to grey
                                         ("colour.jpg", 3, True, (50, 20)),
                                         ("palette.gif", 1, False, (16, 16))]:
        image, seen = decode_seen(tmp_path / name, 8, channels, "crop", 8)
        assert image.shape == (8, 8, channels) and (seen.width, seen.height) == size
        assert seen.colour is colour, (name, channels)
        # Looking changes nothing in the pixels: predict decodes as prepare did.
        assert np.array_equal(image, decode_seen(tmp_path / name, 8, channels, "crop", 8,
                                                 look=False)[0])
