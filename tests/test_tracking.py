"""Tracking for real: the pipeline's entry points against a real MLflow server and against the
embedded SQLite default, read back through the server's REST API (urllib, not the mlflow client).

The project is a temporary git + DVC repository whose prepare stage ran under `dvc repro`, so the
data hash the run carries can be compared with the one DVC wrote into dvc.lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cnn_pipeline.cli import main as command
from components import evaluate, register, train
from components.core import outputs
from components.core.params import flatten, load_params
from components.data.dataset import load_split
from components.tracking.lineage import data_hash, dvc_dir_hash, params_hash
from components.tracking.run import Tracker
from components.training.checkpoint import load_model, prepare_input
from tests.support.projects import get, make_project, pairs
from tests.support.servers import free_port, mlflow_server

pytestmark = pytest.mark.slow

ARTIFACTS = {
    f"augment/{outputs.POLICY}", f"augment/{outputs.PREVIEW}", f"data/{outputs.MANIFEST}",
    "params.yaml",
    "dvc.lock", f"train/{outputs.HISTORY}", f"register/{outputs.DECISION}",
    *(f"evaluate/{name}" for name in outputs.EVALUATE),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_project(tmp_path_factory.mktemp("tracking") / "project")


@pytest.fixture
def project(base: Path, tmp_path: Path, monkeypatch) -> Path:
    """A copy of the prepared project as the working directory, with no tracking address set."""
    root = tmp_path / "project"
    shutil.copytree(base, root, symlinks=True)
    monkeypatch.chdir(root)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return root


# --- reading the server back: plain REST ---------------------------------------------------------


def artifacts(uri: str, run_id: str, path: str = "") -> set[str]:
    found = set()
    for f in get(uri, "artifacts/list", run_id=run_id, path=path).get("files", []):
        found |= artifacts(uri, run_id, f["path"]) if f["is_dir"] else {f["path"]}
    return found


def history(uri: str, run_id: str, key: str) -> list[int]:
    return sorted(m["step"] for m in get(uri, "metrics/get-history", run_id=run_id,
                                         metric_key=key).get("metrics", []))


def run_pipeline(*steps) -> None:
    for step in steps:
        command([step.__name__.rsplit(".", 1)[-1], "--params", "params.yaml"])


def check_pipeline_run(uri: str, commit: str, dirty: str) -> str:
    """Everything one pipeline run should leave in MLflow; returns the run id."""
    run_id = json.loads((Path("outputs/train") / outputs.RUN).read_text())["run_id"]
    run = get(uri, "runs/get", run_id=run_id)["run"]
    params = load_params()
    assert run["info"]["status"] == "FINISHED"
    assert pairs(run["data"]["params"]) == {k: str(v) for k, v in flatten(params).items()}
    metrics = pairs(run["data"]["metrics"])
    assert {"train_loss", "train_acc", "val_loss", "val_acc", "lr", "train.seconds"} <= set(metrics)
    assert {"accuracy", "macro_f1", "ece", "class_recall.0"} <= set(metrics)  # from evaluate
    assert history(uri, run_id, "val_acc") == [1]

    lock = yaml.safe_load(Path("dvc.lock").read_text())
    [out] = lock["stages"]["prepare"]["outs"]
    tags = pairs(run["data"]["tags"])
    assert tags["data.hash"] == out["md5"]  # the hash DVC records for the prepared data
    assert tags["data.name"] == "digits" and tags["params.hash"] == params_hash(params)
    assert (tags["git.commit"], tags["git.dirty"]) == (commit, dirty)
    [dataset] = run["inputs"]["dataset_inputs"]
    assert dataset["dataset"]["digest"] == out["md5"] and dataset["dataset"]["name"] == "digits"

    assert artifacts(uri, run_id) >= ARTIFACTS

    name = params.register.model_name
    version = get(uri, "registered-models/alias", name=name, alias="champion")["model_version"]
    assert version["run_id"] == run_id and {"champion", "challenger"} <= set(version["aliases"])
    vtags = pairs(version["tags"])
    assert vtags["run_id"] == run_id and vtags["data.hash"] == out["md5"]
    assert vtags["git.commit"] == commit and vtags["params.hash"] == params_hash(params)
    assert float(vtags["test.accuracy"]) == pytest.approx(metrics["accuracy"], abs=1e-6)
    assert tags["register.version"] == version["version"]
    return run_id


def git_head() -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()


# --- tests ---------------------------------------------------------------------------------------


def test_data_hash_is_the_one_dvc_records(base: Path, tmp_path: Path):
    with contextlib.chdir(base):
        [out] = yaml.safe_load(Path("dvc.lock").read_text())["stages"]["prepare"]["outs"]
        assert dvc_dir_hash("data/prepared") == out["md5"]  # computed as DVC does
        assert data_hash("data/prepared") == out["md5"]
        lock = {"stages": {"prepare": {"outs": [{**out, "md5": "f" * 32 + ".dir"}]}}}
        (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
        # The lock is read when it describes the folder as it is (here with a made-up hash)...
        copy = tmp_path / "data/prepared"
        shutil.copytree("data/prepared", copy)
        assert data_hash(copy, tmp_path / "dvc.lock") == "f" * 32 + ".dir"
        # ... and not once the folder has changed since.
        (copy / "extra.txt").write_text("new")
        assert data_hash(copy, tmp_path / "dvc.lock") == dvc_dir_hash(copy) != out["md5"]


@pytest.mark.parametrize("given,experiment,overrides,name", [
    (None, None, [], "simple_cnn-digits"),
    (None, None, ["train.lr=0.01"], "simple_cnn-digits train.lr=0.01"),
    (None, None, ["model.name=lenet5", "train.epochs=2", "augment.preset=none"],
     "lenet5-digits augment.preset=none train.epochs=2"),
    (None, None, ["register.model_name=other", "train.device=cpu"],
     "simple_cnn-digits train.device=cpu"),  # only the settings that make the model
    (None, "itchy-moms", ["train.lr=0.01"], "itchy-moms"),  # under `dvc exp run`
    ("glorious-lemur", "itchy-moms", [], "glorious-lemur"),  # a flow run's name, given
])
def test_a_runs_name_tells_it_apart(tmp_path, monkeypatch, given, experiment, overrides, name):
    from components.tracking.run import run_name

    (tmp_path / "params.yaml").write_text("train:\n  epochs: 30\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    if experiment:
        monkeypatch.setenv("DVC_EXP_NAME", experiment)
    assert run_name(load_params("params.yaml", overrides), given) == name


def test_pipeline_is_one_run_on_a_tracking_server(project: Path, monkeypatch):
    with mlflow_server(project.parent / "mlflow") as uri:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        run_pipeline(train, evaluate, register)
        check_pipeline_run(uri, git_head(), "false")

        # The registered model takes image files (a column of PNG bytes) and gives each one's
        # probabilities, those of model.pt (tests/test_serve.py has the rest of what it answers).
        import mlflow.pyfunc
        import pandas as pd

        from components.serving.pyfunc import png

        test = load_split("data/prepared", "test")
        model = mlflow.pyfunc.load_model("models:/tracked@champion")  # runs its code: ours
        rows = model.predict(pd.DataFrame({"image": [png(np.asarray(x)) for x in test.x]}))
        probs = np.array(list(rows["probabilities"]))
        net, meta = load_model(Path("outputs/train") / outputs.MODEL)
        with torch.no_grad():
            expected = net(prepare_input(test.x, meta)).softmax(1).numpy()
        np.testing.assert_allclose(probs, expected, atol=1e-5)
        assert probs.shape == (len(test.y), 10)


def test_embedded_default_is_sqlite_and_artifacts_in_the_project(project: Path):
    (project / "params.yaml").write_text("# changed after the commit: a dirty tree\n"
                                         + (project / "params.yaml").read_text())
    run_pipeline(train, evaluate, register)
    assert (project / "mlflow.db").is_file() and (project / "mlartifacts").is_dir()
    assert not (project / "mlruns").exists()
    with mlflow_server(project) as uri:  # a server on the project's own mlflow.db, to read it
        run_id = check_pipeline_run(uri, git_head(), "true")
    assert (project / "mlartifacts" / run_id / "artifacts" / "params.yaml").is_file()


def test_unreachable_server_fails_before_training(project: Path, monkeypatch, capsys):
    address = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", address)
    with pytest.raises(SystemExit) as exit_:
        command(["train", "--params", "params.yaml"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert address in err and "unreachable" in err
    assert not Path("outputs/train").exists()  # not a single epoch, not a checkpoint


def test_server_away_during_training_loses_no_metric(project: Path, monkeypatch):
    """Down during epoch 2, back after it (what waited is delivered then), down again at the end
    (parked in the pending file, delivered by the next step)."""
    root, port = project.parent / "mlflow", free_port()
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # A request cut by the stop would otherwise sit in the client's own retries for minutes.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    params = load_params("params.yaml", ["train.epochs=2"])
    server = contextlib.ExitStack()
    server.enter_context(mlflow_server(root, port=port))

    class Outage:
        def on_epoch_end(self, epoch: int, metrics: dict) -> None:
            if epoch == 1:
                server.close()
                return
            server.enter_context(mlflow_server(root, port=port))
            deadline = time.monotonic() + 90  # the outbox's backoff is 30 s at most
            while history(uri, tracker.run_id, "train_loss") != [1, 2]:
                assert time.monotonic() < deadline, "metrics not delivered after the restart"
                time.sleep(0.5)
            server.close()  # and away again as training ends

    with Tracker.start(params) as tracker:
        train.train(params, tracker=tracker, callbacks=[Outage()])
    pending = json.loads((project / "outputs/train" / outputs.PENDING).read_text())
    [entry] = pending.values()
    assert {m["key"] for m in entry["metrics"]} >= {"train.seconds"}

    with mlflow_server(root, port=port):
        Tracker.resume(params).close()  # what the next step does first
        for key in ("train_loss", "val_acc", "lr"):
            assert history(uri, tracker.run_id, key) == [1, 2]
        assert history(uri, tracker.run_id, "train.seconds") == [2]
        run = get(uri, "runs/get", run_id=tracker.run_id)["run"]
        assert pairs(run["data"]["tags"])["train.device"] == "cpu"
        assert f"train/{outputs.HISTORY}" in artifacts(uri, tracker.run_id)
    assert not (project / "outputs/train" / outputs.PENDING).exists()


def test_a_step_in_process_leaves_mlflows_default_as_it_found_it(monkeypatch, tmp_path):
    """register and export point mlflow's process-wide default at the run's server (log_model,
    models:/ URIs); afterwards a flow's next task, or the next test, must not find it there."""
    import mlflow

    from components.tracking.store import mlflow_default

    before = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", before)
    with mlflow_default("http://127.0.0.1:9"):
        assert mlflow.get_tracking_uri() == "http://127.0.0.1:9"
    assert mlflow.get_tracking_uri() == before
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with mlflow_default("http://127.0.0.1:9"):
        pass
    assert "MLFLOW_TRACKING_URI" not in os.environ
