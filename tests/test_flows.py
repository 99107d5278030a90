"""The training-pipeline flow in this process against a real temporary Prefect server: it runs on
digits and returns its summary, its parameters are a typed form validated like params.yaml, and
prepare is cached on the content of its inputs."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient
from PIL import Image
from prefect import flow
from prefect.exceptions import ParameterTypeError
from prefect.logging.handlers import APILogHandler
from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH, temporary_settings
from prefect.utilities.callables import parameter_schema
from pydantic import ValidationError

from components.core import outputs
from components.core.params import ParamsError, load_params, sections
from components.data.dataset import load_split
from components.data.drift import DriftError
from flows import prepare_cache
from flows.batch_predict import batch_predict
from flows.parameters import OVERRIDES, resolve
from flows.pipeline import ARTIFACT_KEY, prepared_data, training_pipeline
from tests.support.servers import api_post, prefect_server

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect")
    with prefect_server(home) as api:
        yield api, home
        with temporary_settings({PREFECT_API_URL: api}):
            APILogHandler().flush()  # the runs' last log lines, while the server is still up


@pytest.fixture
def project(tmp_path, monkeypatch, prefect_api):
    """A working directory with params.yaml, this flow's own Prefect server and result storage,
    and the embedded MLflow store (MLFLOW_TRACKING_URI unset)."""
    api, home = prefect_api
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "data/raw").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with temporary_settings({PREFECT_API_URL: api,
                             PREFECT_LOCAL_STORAGE_PATH: str(tmp_path / "prefect-storage")}):
        yield tmp_path


def test_parameters_are_a_form_of_every_section_showing_params_yaml():
    """The Run form (the schema `prefect deploy` reads): each section typed and filled with
    params.yaml's values; not the parameters a sweep or search sets, nor the search's section."""
    schema = parameter_schema(training_pipeline).model_dump()
    props, defs = schema["properties"], schema["definitions"]
    settings = load_params(ROOT / "params.yaml").model_dump(mode="json")
    for section in set(sections()) - {"search"}:
        ref = props[section]["allOf"][0]["$ref"] if "allOf" in props[section] else \
            props[section]["$ref"]
        model = defs[ref.rsplit("/", 1)[-1]]
        assert model["additionalProperties"] is False, section
        assert model["properties"], section
        assert props[section]["default"] == settings[section], section
    assert props["train"]["default"]["epochs"] == 30  # what a user used to see as null
    assert not {"trial", "mlflow_parent_run", "search"} & set(props)
    assert not {"search"} & set(parameter_schema(batch_predict).model_dump()["properties"])
    epochs = defs["TrainOverrides"]["properties"]["epochs"]["anyOf"][0]
    assert epochs["type"] == "integer" and epochs["minimum"] == 1
    source = defs["DataOverrides"]["properties"]["source"]["anyOf"][0]
    assert "digits" in source["enum"] and "imagefolder" in source["enum"]
    assert props["params_file"]["default"] == "params.yaml"


def test_overrides_are_checked_like_params_yaml(tmp_path):
    TrainOverrides = OVERRIDES["train"]
    with pytest.raises(ValidationError, match="epochs"):
        TrainOverrides(epochs=0)
    with pytest.raises(ValidationError, match="epoch"):
        TrainOverrides(epoch=3)
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    params = resolve(tmp_path / "params.yaml", train=TrainOverrides(epochs=2, lr=0.01))
    assert params.train.epochs == 2 and params.train.lr == 0.01
    assert params.train.batch_size == resolve(tmp_path / "params.yaml").train.batch_size
    # Rules across keys are params.yaml's own, with its message naming the keys.
    with pytest.raises(ParamsError, match="val_fraction \\+ test_fraction"):
        resolve(tmp_path / "params.yaml", data={"val_fraction": 0.6, "test_fraction": 0.5})


def test_bad_override_fails_the_flow_naming_the_key(project):
    with pytest.raises(ParameterTypeError, match=r"train\.epoch\b"):
        training_pipeline(train={"epoch": 3})
    with pytest.raises(ParameterTypeError, match=r"train\.lr"):
        training_pipeline(train={"lr": -1.0})


def test_flow_runs_on_digits_and_returns_its_summary(project):
    summary = training_pipeline(train={"epochs": 1}, evaluate={"mistakes": 4})
    assert summary["prepare"] == "ran" and summary["epochs"] == 1
    metrics = json.loads((project / "outputs/evaluate" / outputs.METRICS).read_text())
    assert summary["metrics"]["accuracy"] == metrics["accuracy"] > 0.1  # ten classes: chance 0.1
    decision = summary["registered"]
    assert decision["version"] == "1" and decision["promoted"]
    assert summary["mlflow"]["run_id"] == decision["run_id"]
    artifact = api_post(PREFECT_API_URL.value(), "/artifacts/filter",
                        {"artifacts": {"key": {"any_": [ARTIFACT_KEY]}}, "sort": "CREATED_DESC"})
    table = artifact[0]["data"]
    assert "| accuracy |" in table and "champion" in table and summary["mlflow"]["run_id"] in table
    assert summary["onnx"]["passed"] and summary["onnx"]["version"] == "1"  # the export task
    assert "**ONNX:** parity passed" in table

    # The champion it registered scores a folder through batch-predict, as evaluate scored it.
    test = load_split("data/prepared", "test")
    (project / "inbox").mkdir()
    for i in range(6):
        Image.fromarray(test.x[i, :, :, 0]).save(project / f"inbox/{i}.png")
    scored = batch_predict(folder="inbox")
    assert scored["scored"] == 6 and scored["quarantined"] == 0
    with open(scored["predictions"], newline="") as f:
        predicted = {row["path"]: row["class"] for row in csv.DictReader(f)}
    with open(project / "outputs/evaluate" / outputs.PREDICTIONS, newline="") as f:
        expected = {f"{row['index']}.png": row["predicted"] for row in csv.DictReader(f)
                    if int(row["index"]) < 6}
    assert predicted == expected
    # Its drift figures: drift.json beside the predictions, the flow's artifact, an MLflow run.
    report = json.loads(Path(scored["drift"]).read_text())
    assert Path(scored["drift"]).parent == Path(scored["predictions"]).parent
    assert report["images"] == 6 and scored["drifted"] == report["drift"]
    artifact = api_post(PREFECT_API_URL.value(), "/artifacts/filter",
                        {"artifacts": {"key": {"any_": ["batch-predictions"]}},
                         "sort": "CREATED_DESC"})
    table = artifact[0]["data"]
    assert "### Drift: " in table and "| confidence_drop | " in table
    assert "`predict.drift_channel_mean`" in table
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")  # the embedded default store
    batch, = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                "tags.`pipeline.kind` = 'batch-predict'")
    assert batch.data.metrics["drift.images"] == 6 and batch.data.tags["batch.folder"] == "inbox"
    # fail_on_drift fails the flow run after the artifact and the files (a threshold of 0: any
    # difference from training's pixel mean is drift).
    with pytest.raises(DriftError, match="channel_mean"):
        batch_predict(folder="inbox", predict={"fail_on_drift": True, "drift_channel_mean": 0.0})
    assert json.loads(Path(scored["drift"]).read_text())["figures"]["channel_mean"]["drift"]
    table = api_post(PREFECT_API_URL.value(), "/artifacts/filter",
                     {"artifacts": {"key": {"any_": ["batch-predictions"]}},
                      "sort": "CREATED_DESC"})[0]["data"]
    assert "### Drift: **drift**" in table and "warning: drift: channel_mean" in table


@flow
def prepare_only(params_file: str = "params.yaml", data: dict | None = None) -> str:
    return prepared_data(resolve(params_file, data=data))[1]


def _image_folder(root: Path) -> None:
    for cls, colour in [("red", (200, 30, 30)), ("blue", (30, 30, 200))]:
        (root / cls).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (12 + i, 12), colour).save(root / cls / f"{i}.png")


def test_prepare_is_cached_on_content_and_runs_again_when_an_image_changes(project):
    _image_folder(project / "data/raw/shapes")
    data = {"source": "imagefolder", "root": "data/raw/shapes", "image_size": 8}
    assert prepare_only(data=data) == "ran"
    assert prepare_only(data=data) == "cached"

    # Same name, size and modification time; other pixels: a copy that kept its mtime.
    image = project / "data/raw/shapes/blue/3.png"
    stat = image.stat()
    Image.new("RGB", (15, 12), (30, 200, 30)).save(image)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert prepare_only(data=data) == "ran"
    assert prepare_only(data=data) == "cached"

    # A cached result counts only while the prepared data it describes is there.
    shutil.rmtree(project / "data/prepared")
    assert prepare_only(data=data) == "ran"
    assert (project / "data/prepared" / outputs.MANIFEST).is_file()


def test_cache_key_follows_content_not_paths(tmp_path):
    _image_folder(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    folder = {"source": "imagefolder", "root": str(tmp_path / "a"), "image_size": 8}
    params = resolve(ROOT / "params.yaml", data=folder)
    key = prepare_cache.cache_key(params)
    moved = params.model_copy(update={"data": params.data.model_copy(
        update={"root": tmp_path / "b"})})
    assert prepare_cache.cache_key(moved) == key  # a copy elsewhere: the same data
    resized = params.model_copy(update={"data": params.data.model_copy(update={"image_size": 16})})
    assert prepare_cache.cache_key(resized) != key
    (tmp_path / "a/red/0.png").write_bytes((tmp_path / "a/red/1.png").read_bytes())
    assert prepare_cache.cache_key(params) != key
    digits = resolve(ROOT / "params.yaml")
    elsewhere = digits.model_copy(update={"data": digits.data.model_copy(
        update={"root": tmp_path})})
    assert prepare_cache.cache_key(elsewhere) == prepare_cache.cache_key(digits)


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo,
                          capture_output=True, text=True, check=True)
    return done.stdout


def _dvc(repo: Path, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True,
                          text=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    assert done.returncode == 0, f"dvc {' '.join(args)}:\n{done.stdout}{done.stderr}"
    return done.stdout


@pytest.mark.slow
def test_prepared_data_travels_through_the_dvc_remote(project, tmp_path_factory, monkeypatch):
    """Host A prepares and pushes; host B, a clone of the same commit (no dvc.lock travels
    between them) with its own DVC cache and Prefect storage, gets the prepared data from the
    remote's run cache by the hash of its inputs and does not prepare it again."""
    for name in ("dvc.yaml", ".dvcignore", ".dvc/config", "data/raw/.gitkeep"):
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, project / name)
    shutil.copytree(ROOT / "components", project / "components",
                    ignore=shutil.ignore_patterns("__pycache__"))
    remote = tmp_path_factory.mktemp("dvc-remote")
    _git(project, "init", "-q")
    _dvc(project, "remote", "add", "-d", "store", str(remote))
    _git(project, "add", ".")
    _git(project, "commit", "-qm", "project")

    assert prepare_only() == "ran"
    assert any(p.is_file() for p in remote.rglob("*")), "nothing was pushed"
    assert json.loads(_dvc(project, "status", "--cloud", "--json", "prepare")) == {}

    host_b = tmp_path_factory.mktemp("host-b") / "clone"
    _git(project.parent, "clone", "-q", str(project), str(host_b))
    _dvc(host_b, "pull", "--allow-missing")  # prefect.yaml's pull step
    monkeypatch.chdir(host_b)
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: str(host_b / "prefect-storage")}):
        assert prepare_only() == "pulled"
    made = json.loads((project / "data/prepared" / outputs.MANIFEST).read_text())["hashes"]
    assert json.loads((host_b / "data/prepared" / outputs.MANIFEST).read_text())["hashes"] == made
