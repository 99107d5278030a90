"""Batch prediction on a real model: digits prepared, trained for one epoch and evaluated by the
real steps; the test images written out as PNG files in nested folders, with files that must be
quarantined or ignored among them. Predictions must equal evaluate's."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from cnn_pipeline.cli import main as command
from components.augment import augment
from components.core import outputs
from components.core.params import Predict, UserError, validate
from components.data.dataset import load_split
from components.evaluate import evaluate
from components.predict import predict
from components.prepare import prepare
from components.train import train
from tests.support.formats import raw_name, special_file, unescape_name

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Params of a one-epoch digits run whose evaluate outputs exist."""
    root = tmp_path_factory.mktemp("pipeline")
    paths = {k: str(root / k) for k in ("prepared", "augment", "train", "evaluate", "register",
                                        "predictions")}
    params = validate({"paths": paths, "train": {"epochs": 1, "device": "cpu"},
                       "evaluate": {"device": "cpu", "batch_size": 100}})
    prepare(params)
    augment(params)
    train(params)
    evaluate(params)
    return params


@pytest.fixture(scope="module")
def inbox(trained, tmp_path_factory) -> Path:
    """The test split as PNG files (img_<index>.png) spread over nested folders, plus files that
    cannot be scored and files that are not images."""
    folder = tmp_path_factory.mktemp("inbox")
    for i, image in enumerate(load_split(trained.paths.prepared, "test").x):
        sub = folder / f"batch{i % 3}" / ("late" if i % 2 else "")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[..., 0]).save(sub / f"img_{i:04d}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "batch0/empty.jpg").write_bytes(b"")
    Image.new("L", (4, 4), 128).save(folder / "batch1/tiny.png")  # below data.min_side
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (30, 41, 4), np.uint8)).save(folder / "odd.png")
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(b"ignored")
    return folder


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predictions_equal_evaluates_on_the_test_images(trained, inbox):
    model = Path(trained.paths.train) / outputs.MODEL
    result = predict(trained, inbox, str(model))
    rows = {r["path"]: r for r in read_csv(Path(result.predictions))}
    expected = read_csv(Path(trained.paths.evaluate) / outputs.PREDICTIONS)
    assert result.scored == len(expected) + 1 == len(rows)  # and odd.png, any size and mode
    assert rows["odd.png"]["class"] in {str(d) for d in range(10)}
    ours = {int(Path(p).stem.split("_")[1]): r for p, r in rows.items() if "img_" in p}
    assert sorted(ours) == [int(e["index"]) for e in expected]
    assert [ours[int(e["index"])]["class"] for e in expected] == [e["predicted"] for e in expected]
    assert np.allclose([float(ours[int(e["index"])]["confidence"]) for e in expected],
                       [float(e["confidence"]) for e in expected], rtol=0, atol=1e-5)

    quarantine = {q["path"]: q["reason"] for q in
                  json.loads(Path(result.quarantine).read_text())}
    assert quarantine == {"broken.png": "not_an_image", "batch0/empty.jpg": "empty",
                          "batch1/tiny.png": "too_small"}
    assert result.quarantined == 3 and result.ignored == 2


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_hostile_folder_is_read_as_prepare_reads_it(trained, tmp_path, kind):
    """The real command on a folder holding a FIFO or a device node named like an image, and
    files and folders whose names are not UTF-8: every good image is scored, each name in
    predictions.csv names its file (escaped bytes: `unescape_name` finds it again), the special
    file is quarantined unopened with prepare's reason, and drift.json is written."""
    inbox = tmp_path / "inbox"
    test = load_split(trained.paths.prepared, "test").x
    names = [b"plain.png", b"caf\xe9.png", b"back\\slash.png", b"dir\xfe/x.png", b"caf\xc3\xa9.png"]
    for image, name in zip(test, names, strict=False):
        raw_name(inbox, name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[..., 0]).save(raw_name(inbox, name), format="PNG")
    raw_name(inbox, b"bad\xff.png").write_bytes(b"not an image")
    special_file(inbox / "special.png", kind)
    settings = trained.model_dump(mode="json")
    settings["paths"]["predictions"] = str(tmp_path / "predictions")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(settings))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    done = subprocess.run([sys.executable, "-m", "cnn_pipeline", "predict", "--folder", str(inbox),
                           "--model", str(Path(trained.paths.train) / outputs.MODEL)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "predictions"
    rows = read_csv(out / outputs.PREDICTIONS)  # read as UTF-8
    assert sorted(r["path"] for r in rows) == sorted(
        ["plain.png", "caf\\xe9.png", "back\\\\slash.png", "dir\\xfe/x.png", "café.png"])
    assert all(raw_name(inbox, unescape_name(r["path"])).is_file() for r in rows)
    quarantined = json.loads((out / outputs.QUARANTINE).read_text())
    quarantine = {q["path"]: q["reason"] for q in quarantined}
    assert quarantine == {"bad\\xff.png": "not_an_image", "special.png": "not_a_file"}
    assert json.loads((out / outputs.DRIFT).read_text())["figures"]


def test_top_k_columns_rank_the_classes(trained, inbox):
    top3 = trained.model_copy(update={"predict": Predict(top_k=3)})
    result = predict(top3, inbox, trained.paths.train)  # a folder holding model.pt
    rows = read_csv(Path(result.predictions))
    assert list(rows[0]) == ["path", "class", "confidence", "top1_class", "top1_prob",
                             "top2_class", "top2_prob", "top3_class", "top3_prob"]
    for row in rows:
        probs = [float(row[f"top{k}_prob"]) for k in (1, 2, 3)]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
        assert row["top1_class"] == row["class"] and row["top1_prob"] == row["confidence"]
        assert len({row[f"top{k}_class"] for k in (1, 2, 3)}) == 3
    wide = predict(trained.model_copy(update={"predict": Predict(top_k=50)}), inbox,
                   trained.paths.train)  # more than there are classes
    assert "top10_class" in read_csv(Path(wide.predictions))[0]
    assert "top11_class" not in read_csv(Path(wide.predictions))[0]


def test_champion_from_the_mlflow_registry_is_the_default(trained, inbox, tmp_path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("predict", (tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment) as run:
        mlflow.log_artifact(str(Path(trained.paths.train) / outputs.MODEL), "model")
    name, client = trained.register.model_name, mlflow.MlflowClient()
    client.create_registered_model(name)
    version = client.create_model_version(name, f"{run.info.artifact_uri}/model", run.info.run_id)
    client.set_registered_model_alias(name, "champion", version.version)

    result = predict(trained, inbox)  # models:/<name>@champion
    local = read_csv(Path(predict(trained, inbox, str(Path(trained.paths.train) / outputs.MODEL))
                          .predictions))
    assert Path(result.model).name == outputs.MODEL
    assert read_csv(Path(result.predictions)) == local
    with pytest.raises(UserError, match="cannot download"):
        predict(trained, inbox, f"models:/{name}@no-such-alias")


def test_command_line(trained, inbox, tmp_path, capsys, monkeypatch):
    # main() tracks each batch in MLflow: an SQLite store here (its artifacts in ./mlruns: the
    # working directory is here too), not in the project.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.chdir(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(trained.model_dump(mode="json")))
    model = str(Path(trained.paths.train) / outputs.MODEL)
    cmd = [sys.executable, "-m", "cnn_pipeline", "predict", "--folder", str(inbox),
           "--model", model, "--params", str(params), "--set", "predict.top_k=2"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["scored"] == len(read_csv(Path(summary["predictions"]))) > 300
    assert "top2_prob" in read_csv(Path(summary["predictions"]))[0]

    for argv, message in [
        ([], "--folder"),
        (["--folder", str(tmp_path / "nowhere"), "--model", model], "folder not found"),
        (["--folder", str(inbox), "--model", str(tmp_path / "none.pt")], "no such file"),
        (["--folder", str(inbox), "--model", model, "--set", "predict.top_k=0"],
         "predict.top_k = 0"),
        (["--folder", str(inbox), "--model", model, "--set", "evaluate.device=tpu"],
         "evaluate.device"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            command(["predict", *argv, "--params", str(params)])
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err
