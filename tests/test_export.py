"""The ONNX export: a model written with its meta, any batch size, and the parity check that
passes an honest export and fails an altered one (a model made here); then the export step on the
registered digits champion: the parity figures in its tags, model.onnx logged with the version,
a disagreement stated on it, and a folder scored through ONNX with the classes PyTorch gives."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from PIL import Image

from components.core import outputs
from components.core.params import Export, UserError
from components.data.dataset import load_split
from components.export import export, parity
from components.register import register
from components.serving.onnx_model import OnnxClassifier, write_onnx
from components.tracking.run import Tracker, tracked
from components.training.checkpoint import Classifier
from components.training.models import create_model
from tests.support.projects import tracking_into

META = {"format": "test", "model": {"name": "simple_cnn", "kwargs": {}}, "classes": ["a", "b", "c"],
        "image_size": [8, 8], "channels": 1, "resize": "pad", "min_side": 4, "mean": [0.3],
        "std": [0.4], "epoch": 2, "reference": {"images": 9, "mean_confidence": 0.9}}


def altered(src: Path, dst: Path, scale: float = 1.5) -> Path:
    """The ONNX file at `src` with its largest weight scaled: a model that computes otherwise."""
    model = onnx.load(str(src))
    big = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    big.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(big) * scale, big.name))
    onnx.save(model, str(dst))
    return dst


def test_an_export_carries_its_meta_takes_any_batch_and_agrees(tmp_path):
    torch.manual_seed(0)
    net = create_model("simple_cnn", num_classes=3, in_chans=1, img_size=8).eval()
    path = write_onnx(net, META, tmp_path / outputs.ONNX, opset=18)
    model = OnnxClassifier(path)
    assert model.meta["classes"] == ["a", "b", "c"] and model.meta["resize"] == "pad"
    assert model.meta["reference"] == META["reference"]  # drift is judged from an export too
    images = np.random.default_rng(0).integers(0, 256, (37, 8, 8, 1), dtype=np.uint8)
    for n in (1, 5, 37):  # the batch size is not fixed at the example's 2
        assert model.probabilities(images[:n]).shape == (n, 3)
    assert np.allclose(model.probabilities(images, batch_size=4), model.probabilities(images),
                       atol=1e-6)

    good = parity(Classifier(net, META), model, images, Export())
    assert good.passed and good.reasons == [] and good.images == 37
    assert good.max_abs_diff <= 1e-4 and good.top1_agreement == 1.0

    bad = parity(Classifier(net, META), OnnxClassifier(altered(path, tmp_path / "bad.onnx")),
                 images, Export())
    assert not bad.passed and bad.max_abs_diff > 1e-4
    assert "over export.max_abs_diff 0.0001" in bad.reasons[0]


def test_an_onnx_file_without_our_meta_or_not_there_is_refused(tmp_path):
    with pytest.raises(UserError, match="no such ONNX file"):
        OnnxClassifier(tmp_path / "none.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    with pytest.raises(UserError, match="ONNX Runtime cannot load it"):
        OnnxClassifier(tmp_path / "junk.onnx")
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    plain = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "plain", [x], [y]),
        opset_imports=[onnx.helper.make_opsetid("", 18)])
    onnx.save(plain, str(tmp_path / "plain.onnx"))
    with pytest.raises(UserError, match="without this project's metadata"):
        OnnxClassifier(tmp_path / "plain.onnx")


@pytest.fixture(scope="module")
def exported(registered):
    """The export step run on the registered champion, as `cnn-pipeline export` runs it."""
    with tracking_into(registered.mlflow):
        return tracked(export)(registered.params)


@pytest.mark.slow  # a tracking server and a trained model
def test_export_records_parity_on_the_version(exported, registered):
    from mlflow import MlflowClient

    report = json.loads(Path(exported.report).read_text())
    test = load_split(registered.params.paths.prepared, "test")
    assert report["images"] == exported.images == len(test.y) == 359
    assert report["passed"] and exported.passed and exported.logged
    assert report["max_abs_diff"] <= 1e-4 and report["top1_agreement"] >= 0.999

    client = MlflowClient(registered.mlflow)
    version = client.get_model_version(registered.name, exported.version)
    assert exported.version == registered.version
    tags = version.tags
    assert tags["onnx.parity"] == "passed" and tags["onnx.test_images"] == "359"
    assert float(tags["onnx.max_abs_diff"]) == report["max_abs_diff"]
    assert float(tags["onnx.top1_agreement"]) == report["top1_agreement"] == 1.0
    assert "disagrees" not in (version.description or "")

    import mlflow

    with tracking_into(registered.mlflow):
        local = Path(mlflow.artifacts.download_artifacts(
            f"models:/{registered.name}/{registered.version}"))
    assert (local / outputs.ONNX).read_bytes() == Path(exported.onnx).read_bytes()


@pytest.mark.slow  # a tracking server and a trained model
def test_a_disagreeing_export_is_stated_on_the_version(exported, registered, tmp_path):
    from mlflow import MlflowClient

    from components.export import _record
    from components.training.checkpoint import load_model

    net, meta = load_model(Path(registered.params.paths.train) / outputs.MODEL)
    test = load_split(registered.params.paths.prepared, "test")
    bad_file = altered(Path(exported.onnx), tmp_path / outputs.ONNX, scale=-1.0)
    bad = parity(Classifier(net, meta), OnnxClassifier(bad_file), test.x, Export())
    good = parity(Classifier(net, meta), OnnxClassifier(exported.onnx), test.x, Export())
    assert not bad.passed and len(bad.reasons) == 2  # both figures miss
    client = MlflowClient(registered.mlflow)
    with tracking_into(registered.mlflow), Tracker.resume(registered.params) as tracker:
        _record(tracker, registered.name, registered.version, bad_file, bad, Export())
        version = client.get_model_version(registered.name, registered.version)
        assert version.tags["onnx.parity"].startswith("FAILED: max |Δprobability|")
        assert "ONNX export disagrees with PyTorch" in version.description
        assert version.description.startswith("simple_cnn")  # the card's summary stays
    with tracking_into(registered.mlflow):
        again = tracked(register)(registered.params)  # a retried register writes it again
    version = client.get_model_version(registered.name, registered.version)
    assert not again.created and "ONNX export disagrees with PyTorch" in version.description

    with tracking_into(registered.mlflow), Tracker.resume(registered.params) as tracker:
        _record(tracker, registered.name, registered.version, Path(exported.onnx), good,
                Export())  # exported again, and agreeing: the statement goes
    version = client.get_model_version(registered.name, registered.version)
    assert version.tags["onnx.parity"] == "passed" and "disagrees" not in version.description


@pytest.mark.slow  # a tracking server and two trained models
def test_after_a_refused_challenger_the_export_is_the_champions_and_any_version_is_one_command(
        exported, registered, tmp_path):
    import yaml

    from cnn_pipeline.cli import main as command
    from components.core.params import validate
    from components.evaluate import evaluate
    from components.train import train

    settings = registered.params.model_dump(mode="json")
    settings["paths"] |= {k: str(tmp_path / k) for k in ("train", "evaluate", "register",
                                                         "export")}
    settings["train"]["epochs"] = 1
    settings["register"]["min_improvement"] = 1.0  # nothing beats the champion by that
    params = validate(settings)
    with tracking_into(registered.mlflow):
        tracked(train, "start")(params)
        tracked(evaluate)(params)
        decision = tracked(register)(params)
        assert not decision.promoted and decision.version != registered.version
        shipped = tracked(export)(params)
    report = json.loads((tmp_path / "export" / outputs.EXPORT).read_text())
    assert shipped.version == report["version"] == registered.version  # the champion's
    assert "champion" in report["aliases"] == shipped.aliases
    assert report["registered_by_this_run"] == decision.version
    test = load_split(params.paths.prepared, "test")
    assert np.array_equal(OnnxClassifier(shipped.onnx).probabilities(test.x),
                          OnnxClassifier(exported.onnx).probabilities(test.x))

    # Any version, by alias or number, is one command.
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(settings))
    with tracking_into(registered.mlflow):
        command(["export", "--params", str(path), "--model",
                 f"models:/{registered.name}@challenger"])
        report = json.loads((tmp_path / "export" / outputs.EXPORT).read_text())
        assert report["version"] == decision.version and report["aliases"] == ["challenger"]
        with pytest.raises(SystemExit) as refused:
            command(["export", "--params", str(path), "--model",
                     f"models:/{registered.name}@nobody"])
    assert refused.value.code == 2


@pytest.mark.slow  # a trained model
def test_predict_scores_a_folder_through_onnx_with_pytorchs_classes(exported, registered,
                                                                    tmp_path):
    from components.predict import predict

    test = load_split(registered.params.paths.prepared, "test")
    folder = tmp_path / "inbox"
    folder.mkdir()
    for i in range(0, len(test.y), 3):
        Image.fromarray(test.x[i][..., 0]).save(folder / f"{i:03d}.png")
    Image.fromarray(test.x[1][..., 0]).resize((40, 30)).save(folder / "other_size.png")

    def rows(model: str, out: str) -> dict[str, dict]:
        params = registered.params.model_copy(update={"paths": registered.params.paths.model_copy(
            update={"predictions": tmp_path / out})})
        with open(predict(params, folder, model).predictions, newline="") as f:
            return {r["path"]: r for r in csv.DictReader(f)}

    ours = rows(exported.onnx, "onnx")
    theirs = rows(str(Path(registered.params.paths.train) / outputs.MODEL), "torch")
    assert len(ours) == len(theirs) == len(range(0, len(test.y), 3)) + 1
    assert list(ours) == list(theirs)
    assert [r["class"] for r in ours.values()] == [r["class"] for r in theirs.values()]
    assert list(next(iter(ours.values()))) == list(next(iter(theirs.values())))  # same columns
    assert np.allclose([float(r["confidence"]) for r in ours.values()],
                       [float(r["confidence"]) for r in theirs.values()], atol=1e-4)
    # The drift check judges the same figures from the export's own metadata.
    judged = {p: json.loads((tmp_path / p / outputs.DRIFT).read_text()) for p in ("onnx", "torch")}
    assert judged["onnx"]["drift"] == judged["torch"]["drift"]
    assert set(judged["onnx"]["figures"]) == set(judged["torch"]["figures"])
