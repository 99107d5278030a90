"""The served model: the registered champion served by `mlflow models serve` (a real process on a
free loopback port) answers image files and arrays with the class names components.predict gives
the same images, and every bad request with a 4xx that holds our message, no traceback, none of
the request and no secret, and goes on answering; `mlflow models predict` (MLflow's CLI, which
parses JSON its own way) answers every JSON form the README shows with the same classes. The
request checks alone, without a server, first."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.core import outputs
from components.core.params import ParamsError, Predict
from components.data.dataset import load_split
from components.data.images import BadImage, decode
from components.serving.pyfunc import (
    BadRequest,
    check_pixels,
    file_bytes,
    limits,
    pixels,
    request_items,
    table,
)
from tests.support.formats import png_bilevel, png_blank
from tests.support.projects import BIN, tracking_into
from tests.support.servers import model_server

LIMITS = Predict(max_batch=4, max_request_mb=0.01, max_image_mp=1.0, max_request_mp=1.5)
IMAGE = base64.b64encode(b"\x89PNG not really").decode()
SECRET = "PLANTED-SECRET-hunter2"  # in requests, headers and the server's environment


# --- the request checks --------------------------------------------------------------------------


@pytest.mark.parametrize("body, content_type, status, message", [
    (b"x" * 10_001, "application/json", 413, "over the served model's limit of 0.01 MB"),
    (b'{"inputs": []}', "text/csv", 415, "application/json"),
    (b"", "application/json", 400, "the request is empty"),
    (b"{'inputs'", "application/json", 400, "not valid JSON"),
    (b"\xff\xfe\xfa", "application/json", 400, "not UTF-8"),
    (b"[1, 2]", "application/json", 400, "exactly one of the keys"),
    (b'{"inputs": [], "instances": []}', "application/json", 400, "exactly one of the keys"),
    (b'{"inputs": []}', "application/json", 400, "holds no images"),
    (b'{"inputs": {"picture": ["a"]}}', "application/json", 400, "no column 'image'"),
    (b'{"dataframe_split": {"columns": ["x"], "data": [["a"]]}}', "application/json", 400,
     "no column 'image'"),
    (b'{"dataframe_records": [{"image": "a"}, {"x": 1}]}', "application/json", 400,
     "every record"),
    (json.dumps({"inputs": {"image": [IMAGE] * 5}}).encode(), "application/json", 413,
     "5 images, more than the served model's max_batch of 4"),
    (b"[" * 4_000 + b"]" * 4_000, "application/json", 400,
     "holds 4,000 arrays and objects, more than the 356 that 4 images"),  # 4 × (1 + 8 + 64) + 64
    (b'{"inputs": {"image": [' + b'"a",' * 80 + b'"a"]}}', "application/json", 400,
     "holds 83 strings, more than the 72"),
    (b'{"inputs": [' + b"0," * 700 + b"0]}", "application/json", 400,
     "holds 700 values, more than the 612"),  # 4 × (64 + 64 + 8 + 1) + 64
    (b'{"inputs": [' + b"7" * 5_000 + b"]}", "application/json", 400, "more than 4300 digits"),
])
def test_a_bad_request_is_named(body, content_type, status, message):
    with pytest.raises(BadRequest, match=message) as err:
        request_items(body, content_type, LIMITS, (8, 8, 1))
    assert err.value.status == status
    assert IMAGE not in err.value.message and "x" * 20 not in err.value.message


@pytest.mark.parametrize("body, kind, n", [
    ({"inputs": {"image": [IMAGE, IMAGE]}}, "files", 2),
    ({"inputs": {"image": IMAGE}}, "files", 1),
    ({"instances": [{"image": IMAGE}]}, "files", 1),
    ({"dataframe_records": [{"image": IMAGE}] * 3}, "files", 3),
    ({"dataframe_split": {"columns": ["id", "image"], "data": [[7, IMAGE]]}}, "files", 1),
    ({"inputs": [[[[0]]], [[[1]]]]}, "arrays", 2),
])
def test_every_mlflow_json_form_is_read(body, kind, n):
    found, items = request_items(json.dumps(body).encode(), "application/json; charset=utf-8",
                                 LIMITS, (8, 8, 1))
    assert found == kind and len(items) == n


def test_json_nested_deeper_than_python_parses_is_named():
    # within what 4 images of 224×224×3 may hold, deeper than json's recursion limit
    with pytest.raises(BadRequest, match="nested too deeply") as err:
        request_items(b"[" * 3_000 + b"]" * 3_000, "application/json", LIMITS, (224, 224, 3))
    assert err.value.status == 400


@pytest.mark.parametrize("images, message", [
    ([[[[0]]], [[0, 1]]], "ragged"),
    (np.zeros((2, 8, 8, 1)).tolist(), "floating-point"),
    ([[[["a"]]]], "text"),
    (np.zeros((2, 8, 8)).astype(int).tolist(), "shape 2×8×8;"),
    (np.zeros((1, 7, 8, 1), int).tolist(), "shape 1×7×8×1"),
    (np.full((1, 8, 8, 1), 256).tolist(), "outside 0..255"),
    (np.full((1, 8, 8, 1), b"0.5"), "floating-point"),  # as MLflow's CLI hands numbers
    (np.full((1, 8, 8, 1), b"dog"), "text"),
])
def test_bad_arrays_are_named(images, message):
    with pytest.raises(BadRequest, match=message):
        pixels(images, (8, 8, 1))


def test_arrays_become_uint8_and_rows_rank_the_classes():
    assert pixels(np.full((2, 8, 8, 1), 255).tolist(), (8, 8, 1)).dtype == np.uint8
    # MLflow's CLI hands the arrays of {"inputs": [...]} as the numbers' text (a binary column)
    text = pixels(np.full((2, 8, 8, 1), b"255"), (8, 8, 1))
    assert text.dtype == np.uint8 and (text == 255).all()
    rows = table(np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]], np.float32), ["a", "b", "c"], 2)
    assert list(rows["class"]) == ["b", "a"]
    assert rows["top_k"][0] == [{"class": "b", "probability": pytest.approx(0.7)},
                                {"class": "c", "probability": pytest.approx(0.2)}]
    assert rows["probabilities"][1] == pytest.approx([0.5, 0.2, 0.3])


PNG = png_blank(3, 2)


@pytest.mark.parametrize("cell, expected", [
    (PNG, PNG),  # file bytes: the dataframe forms (MLflow decodes their base64), Python
    (base64.b64encode(PNG), PNG),  # MLflow's CLI hands inputs/instances undecoded
    (np.bytes_(base64.b64encode(PNG)), PNG),  # ... as numpy's bytes when there is one image
    (base64.encodebytes(PNG), PNG),  # wrapped at 76 characters, as MLflow's examples are
    (base64.b64encode(PNG).decode(), PNG),  # text in Python
    (b"", b""),  # decode names it: empty
])
def test_a_cell_is_file_bytes_or_their_base64(cell, expected):
    assert file_bytes(0, cell) == expected


@pytest.mark.parametrize("cell, message", [
    (b"QUJ", "image 0: not valid base64"),  # base64's alphabet, without its padding
    ("not base64!", "image 0: not valid base64"),
    (7, "image 0: expected image file bytes or their base64, got int"),
])
def test_a_cell_that_is_neither_is_named(cell, message):
    with pytest.raises(BadRequest, match=message):
        file_bytes(0, cell)


def truncated_png(width: int, height: int) -> bytes:
    """A PNG with one row of pixel data: Pillow reads its size from the header, decoding fails."""
    return png_blank(width, height, rows=1)


@pytest.mark.parametrize("sizes, status, message", [
    ([(1000, 1000), (700, 700)], None, None),  # 1.49 megapixels: within both limits
    ([(1200, 1000)], 413, r"image 0 is 1200×1000 = 1.2 megapixels, over the served model's "
                          r"limit of 1 per image \(predict.max_image_mp\)"),
    ([(900, 900), (900, 900)], 413, r"the request's images total 1.6 megapixels, over the "
                                    r"served model's limit of 1.5 per request "
                                    r"\(predict.max_request_mp\)"),
    ([(20_000, 20_000)], 413, r"image 0 is over 179 megapixels \(Pillow's"),
])
def test_pixel_limits_are_read_from_the_headers_before_decoding(sizes, status, message):
    blobs = [truncated_png(w, h) for w, h in sizes] + [b"not an image: decode names it"]
    if status is None:
        check_pixels(blobs, LIMITS)
        return
    with pytest.raises(BadRequest, match=message) as err:
        check_pixels(blobs, LIMITS)
    assert err.value.status == status
    with pytest.raises(BadImage):  # so the 413 came from the header: the file does not decode
        decode(blobs[0], 8, 1, "crop", 8)


def test_limits_are_validated_like_the_settings():
    assert limits({"predict.max_batch": 8}).max_batch == 8
    assert limits({}).top_k == 5  # the settings' defaults
    with pytest.raises(ParamsError, match=r"predict\.max_batch = 0"):
        limits({"predict.max_batch": 0})
    with pytest.raises(ParamsError, match=r"unknown keys \['max_batch'\]"):
        limits({"max_batch": 8})  # not the setting's name


# --- the real server -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(registered, tmp_path_factory):
    """The champion served by `mlflow models serve` from a folder outside the project, without
    the project on PYTHONPATH: the model's own code answers."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["MLFLOW_TRACKING_URI"] = registered.mlflow
    # Settings that could hold a secret: the tracking server's credentials (which this one
    # ignores). No HTTP body may hold them.
    env |= {"MLFLOW_TRACKING_USERNAME": "user", "MLFLOW_TRACKING_PASSWORD": SECRET}
    root = tmp_path_factory.mktemp("served")
    with model_server(f"models:/{registered.name}@champion", root, env) as url:
        yield url


def post(url: str, body: bytes | dict, content_type: str = "application/json",
         query: str = "", headers: dict | None = None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}/invocations{query}", data=data,
                                     headers={"Content-Type": content_type, **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def png(image: np.ndarray | Image.Image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    image = image if isinstance(image, Image.Image) else Image.fromarray(image[..., 0])
    image.save(out, format=fmt)
    return out.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.slow  # a model server, a tracking server and a trained model
def test_served_champion_names_the_classes_predict_names(served, registered, tmp_path):
    from components.predict import predict

    test = load_split(registered.params.paths.prepared, "test")
    folder = tmp_path / "inbox"
    folder.mkdir()
    blobs = {f"{i:03d}.png": png(test.x[i]) for i in range(40)}
    big = Image.fromarray(test.x[0][..., 0]).resize((37, 53)).convert("RGB")
    blobs["big.jpg"] = png(big, "JPEG")  # another size, mode and format
    for name, data in blobs.items():
        (folder / name).write_bytes(data)
    with tracking_into(registered.mlflow):
        result = predict(registered.params, folder)  # models:/<name>@champion, as served
    with open(result.predictions, newline="") as f:
        expected = {row["path"]: row for row in csv.DictReader(f)}

    names = sorted(blobs)[:registered.params.predict.max_batch]
    status, body = post(served, {"inputs": {"image": [b64(blobs[n]) for n in names]}})
    assert status == 200, body
    rows = json.loads(body)["predictions"]
    assert [r["class"] for r in rows] == [expected[n]["class"] for n in names]
    assert np.allclose([r["confidence"] for r in rows],
                       [float(expected[n]["confidence"]) for n in names], atol=1e-5)
    k = registered.params.predict.top_k
    for row in rows:
        assert len(row["top_k"]) == k and row["top_k"][0]["class"] == row["class"]
        assert len(row["probabilities"]) == 10 and abs(sum(row["probabilities"]) - 1) < 1e-5

    # The same images as uint8 arrays (the PNGs hold exactly these pixels), and as records.
    arrays = np.asarray(test.x[:20]).tolist()
    status, body = post(served, {"inputs": arrays})
    assert status == 200, body
    assert [r["class"] for r in json.loads(body)["predictions"]] == \
        [expected[f"{i:03d}.png"]["class"] for i in range(20)]
    status, body = post(served, {"dataframe_records": [{"image": b64(blobs["big.jpg"])}]})
    assert status == 200 and json.loads(body)["predictions"][0]["class"] == \
        expected["big.jpg"]["class"]


@pytest.mark.slow  # a model server, a tracking server and a trained model
def test_the_input_example_the_registry_shows_is_answered(served, registered):
    import mlflow

    with tracking_into(registered.mlflow):
        local = mlflow.artifacts.download_artifacts(f"models:/{registered.name}@champion")
    example = json.loads(next(Path(local).glob("serving_input_example.json")).read_text())
    status, body = post(served, example)
    assert status == 200 and len(json.loads(body)["predictions"]) == 2


@pytest.mark.slow  # a model server, a tracking server and a trained model
def test_bad_requests_get_a_4xx_naming_the_problem_without_traceback_payload_or_secret(
        served, registered):
    test = load_split(registered.params.paths.prepared, "test")
    good = png(test.x[0])
    marker = b64(f"{SECRET} ".encode() * 4)
    deep = b'{"inputs": ' + b"[" * 100_000 + SECRET.encode() + b"]" * 100_000 + b"}"
    cases = {  # name: (body, content type, status, words of the message); each holds SECRET
        "undecodable bytes": ({"inputs": {"image": [marker]}}, None, 400, "not_an_image"),
        "truncated PNG": ({"inputs": {"image": [b64(good[:40])]}, "password": SECRET}, None, 400,
                          "image 0"),
        "not base64": ({"inputs": {"image": [marker[:-3] + "!!"]}}, None, 400, "base64"),
        "wrong shape": ({"inputs": np.zeros((2, 5, 5, 1), int).tolist(), "token": SECRET}, None,
                        400, "shape"),
        "wrong dtype": ({"inputs": (np.asarray(test.x[:2]) / 255).tolist(), SECRET: 1}, None,
                        400, "floating-point"),
        "empty body": (b"", None, 400, "empty"),
        "no images": ({"inputs": {"image": []}, "password": SECRET}, None, 400, "no images"),
        "JSON nested 100,000 deep": (deep, None, 400, "nested too deeply"),
        "a 5,000-digit integer": (b'{"inputs": [' + b"9" * 5_000 + b'], "p": "' +
                                  SECRET.encode() + b'"}', None, 400, "more than 4300 digits"),
        # the issue's 16-bit PNG of 9400×9400 (~230 KB): refused from its header
        "88 megapixels": ({"inputs": {"image": [b64(png_blank(9400, 9400, 16))]}}, None, 413,
                          "max_image_mp"),
        "decompression bomb": ({"inputs": {"image": [b64(png_bilevel(9500, 9500))]}}, None, 413,
                               "max_image_mp"),
        "over max_request_mp": ({"inputs": {"image": [b64(png_blank(1000, 1000))] * 2}}, None,
                                413, "max_request_mp"),
        "over max_batch": ({"inputs": {"image": [b64(good)] * 33}}, None, 413, "max_batch"),
        "over the size limit": ({"inputs": {"image": [marker * 20_000]}}, None, 413,
                                "max_request_mb"),
        "not JSON": (f"{SECRET} {{".encode(), None, 400, "not valid JSON"),
        "CSV": (f"image\n{SECRET}".encode(), "text/csv", 415, "application/json"),
        "a parameter in the content type": ({"inputs": {"image": [marker]}},
                                            f"application/json; password={SECRET}", 400,
                                            "not_an_image"),
    }
    for name, (body, content_type, status, words) in cases.items():
        got, reply = post(served, body, content_type or "application/json",
                          query=f"?token={SECRET}", headers={"Authorization": f"Bearer {SECRET}"})
        assert got == status, f"{name}: {got} {reply[:500]}"
        answer = json.loads(reply)
        assert set(answer) == {"error_code", "message"}, name
        assert words in answer["message"], f"{name}: {answer['message']}"
        sent = body if isinstance(body, bytes) else json.dumps(body).encode()
        for piece in ("Traceback", 'File "', SECRET, "hunter2", marker[:16], sent[:40].decode()):
            assert not piece or piece not in reply, f"{name}: {piece!r} in {reply[:500]}"
        with urllib.request.urlopen(f"{served}/ping", timeout=30) as ping:
            assert ping.status == 200, name
    status, reply = post(served, {"inputs": {"image": [b64(good)]}})
    assert status == 200 and SECRET not in reply  # still answering images after all that


# Every JSON form the README shows (its "Serving the champion" section), for two test images.
def readme_forms(images: np.ndarray) -> dict[str, dict]:
    files = [b64(png(x)) for x in images]
    return {
        "inputs": {"inputs": {"image": files}},
        "dataframe_records": {"dataframe_records": [{"image": f} for f in files]},
        "dataframe_split": {"dataframe_split": {"columns": ["image"],
                                                "data": [[f] for f in files]}},
        "instances": {"instances": [{"image": f} for f in files]},
        "arrays": {"inputs": np.asarray(images).tolist()},
    }


@pytest.mark.slow  # a model server, a tracking server, a trained model, five CLI processes
def test_mlflow_models_predict_answers_every_readme_form_as_the_server_does(
        served, registered, tmp_path):
    """`mlflow models predict -m models:/<name>@champion -t json --env-manager local`, from a
    folder outside the project without it on PYTHONPATH: the model's own code parses nothing;
    MLflow's CLI parses the JSON its own way and hands the pyfunc what it made of it."""
    test = load_split(registered.params.paths.prepared, "test")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"MLFLOW_TRACKING_URI": registered.mlflow, "PATH": f"{BIN}:{env['PATH']}"}
    runs = {}
    for name, form in readme_forms(test.x[:2]).items():  # at once: each loads torch and the model
        (tmp_path / f"{name}.json").write_text(json.dumps(form))
        runs[name] = subprocess.Popen(
            [str(BIN / "mlflow"), "models", "predict", "-m", f"models:/{registered.name}@champion",
             "-i", f"{name}.json", "-o", f"{name}.out.json", "-t", "json",
             "--env-manager", "local"],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for name, run in runs.items():
        output = run.communicate(timeout=600)[0]
        assert run.returncode == 0, f"{name}:\n{output[-3000:]}"
        status, body = post(served, json.loads((tmp_path / f"{name}.json").read_text()))
        assert status == 200, f"{name}: {body[:500]}"
        served_rows = json.loads(body)["predictions"]
        cli_rows = json.loads((tmp_path / f"{name}.out.json").read_text())["predictions"]
        assert [r["class"] for r in cli_rows] == [r["class"] for r in served_rows], name
        assert all(r["class"] in [str(d) for d in range(10)] for r in cli_rows), name
        assert np.allclose([r["probabilities"] for r in cli_rows],
                           [r["probabilities"] for r in served_rows], atol=1e-6), name


@pytest.mark.slow  # a tracking server and a trained model
def test_the_pyfunc_in_python_and_what_register_logged(registered):
    import mlflow
    import pandas as pd

    uri = f"models:/{registered.name}/{registered.version}"
    with tracking_into(registered.mlflow):
        info = mlflow.models.get_model_info(uri)
        model = mlflow.pyfunc.load_model(uri)  # runs the model's code: a registry we own
        local = Path(mlflow.artifacts.download_artifacts(uri))
    assert info.signature.inputs.input_names() == ["image"]
    assert info.metadata["classes"] == [str(d) for d in range(10)]
    # conftest's SERVED under the settings' names, which are also the run's params
    assert model.model_config == {"predict.top_k": 3, "predict.max_batch": 32,
                                  "predict.max_request_mb": 1.0, "predict.max_image_mp": 1.0,
                                  "predict.max_request_mp": 1.5}
    test = load_split(registered.params.paths.prepared, "test")
    rows = model.predict(pd.DataFrame({"image": [png(x) for x in test.x[:5]]}))
    arrays = model.unwrap_python_model().classify(np.asarray(test.x[:5]))
    assert list(rows["class"]) == list(arrays["class"])
    assert (local / "artifacts" / outputs.MODEL).is_file()  # what the gate and predict read


# A champion registered before components/ moved into folders by concern: the commit before the
# move (components/ flat, `python -m components.<step>`). Its model carries its own copy of the
# code the pyfunc loads (code_paths), so it must keep loading and serving, and the gate must keep
# scoring it (from its model.pt), whatever the layout of the code that serves or registers now.
PREVIOUS_LAYOUT = "8368b9d"


def previous_layout(into: Path) -> Path:
    """The components/ package as it was at PREVIOUS_LAYOUT (git archive), in `into`."""
    import tarfile

    root = Path(__file__).resolve().parents[1]
    found = subprocess.run(["git", "cat-file", "-e", f"{PREVIOUS_LAYOUT}^{{commit}}"], cwd=root)
    if found.returncode:
        pytest.skip(f"commit {PREVIOUS_LAYOUT} is not in this clone (a shallow one)")
    archive = subprocess.run(["git", "archive", PREVIOUS_LAYOUT, "components"], cwd=root,
                             capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


@pytest.mark.slow  # the old layout's train, evaluate and register, a model server, the gate
def test_a_champion_registered_on_the_previous_layout_still_loads_serves_and_is_scored(
        registered, digits, tmp_path):
    import yaml

    from components.augment import augment
    from components.core.params import validate
    from components.evaluate import evaluate
    from components.prepare import prepare
    from components.register import register
    from components.tracking.run import tracked
    from components.train import train

    old = previous_layout(tmp_path / "old")
    name = "previous-layout"
    (old / "params.yaml").write_text(yaml.safe_dump({
        "paths": {"prepared": str(digits / "prepared"), "augment": str(digits / "augment_none")},
        "train": {"epochs": 1, "device": "cpu"}, "evaluate": {"device": "cpu", "mistakes": 2},
        "register": {"model_name": name, "flush_timeout_s": 10}}))
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered.mlflow, "PYTHONPATH": str(old)}
    for step in ("train", "evaluate", "register"):  # the old code, its own command line
        done = subprocess.run([str(BIN / "python"), "-m", f"components.{step}"], cwd=old, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{step}:\n{done.stderr[-3000:]}"
    old_version = json.loads(done.stdout)["version"]

    # Served by this layout's command: the model's own (old) code answers.
    served_env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    test = load_split(registered.params.paths.prepared, "test")
    with model_server(f"models:/{name}@champion", tmp_path / "served", served_env) as url:
        status, body = post(url, {"inputs": {"image": [b64(png(test.x[i])) for i in range(3)]}})
    assert status == 200, body
    assert all(r["class"] in [str(c) for c in range(10)] for r in json.loads(body)["predictions"])

    # Scored by this layout's gate: a challenger tested on another split (data.seed) makes the
    # gate load the old champion's model.pt and score it on this test split first.
    paths = {k: str(tmp_path / "new" / k) for k in ("prepared", "augment", "train", "evaluate",
                                                    "register")}
    params = validate({"paths": paths, "data": {"seed": 1}, "train": {"epochs": 1,
                       "device": "cpu"}, "evaluate": {"device": "cpu", "mistakes": 2},
                       "register": {"model_name": name, "flush_timeout_s": 10}})
    prepare(params)
    augment(params)
    with tracking_into(registered.mlflow):
        tracked(train, "start")(params)
        tracked(evaluate)(params)
        tracked(register)(params)
    decision = json.loads((Path(paths["register"]) / outputs.DECISION).read_text())
    compared = decision["compared_with"]
    assert compared["version"] == old_version and compared["rescored"]
    assert compared["scores"]["metrics"]["accuracy"] > 0.5  # its model.pt predicted
