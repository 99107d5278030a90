"""End to end, as a user runs it: a Prefect server, an MLflow server and process workers on
loopback, `prefect deploy --all` from a clone of the project, `prefect deployment run ... --watch`.

Workers clone the project at the deployed commit into their working dir (prefect.yaml's pull
steps), so these runs use the committed copy of the code, not this checkout.
"""

import contextlib
import json
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest
import yaml
from mlflow import MlflowClient

from components.core import outputs
from tests.support.projects import CLONE, Stack, git
from tests.support.servers import api_post

pytestmark = pytest.mark.slow
# The stack (servers, pools, deployments) is conftest.py's, shared with other end-to-end tests.


def _artifact(stack: Stack, flow_run_id: str, key: str) -> str:
    found = api_post(stack.env["PREFECT_API_URL"], "/artifacts/filter", {
        "artifacts": {"key": {"any_": [key]}}, "flow_runs": {"id": {"any_": [flow_run_id]}}})
    assert len(found) == 1, f"{len(found)} {key} artifacts for flow run {flow_run_id}"
    return found[0]["data"]


def _task_runs(stack: Stack, flow_run_ids: list[str]) -> list[dict]:
    return api_post(stack.env["PREFECT_API_URL"], "/task_runs/filter",
                    {"flow_runs": {"id": {"any_": flow_run_ids}}, "limit": 200})


def test_deployment_run_on_a_worker_tracks_and_registers(stack):
    with stack.worker("w1"):
        flow_run = stack.run_deployment("training-pipeline/digits", {"train": {"epochs": 1}})
    client = MlflowClient(stack.mlflow)
    champion = client.get_model_version_by_alias("digits-classifier", "champion")
    run = client.get_run(champion.run_id)
    assert run.data.tags["prefect.flow_run_id"] == flow_run
    assert run.data.tags["prefect.deployment"] == "training-pipeline/digits"
    with urllib.request.urlopen(f"{stack.env['PREFECT_API_URL']}/flow_runs/{flow_run}") as got:
        name = json.loads(got.read())["name"]
    assert run.info.run_name == run.data.tags["prefect.flow_run_name"] == name  # told apart
    assert run.data.params["train.epochs"] == "1" and 0.1 < run.data.metrics["accuracy"] <= 1
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [1]
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "evaluate")}
    assert {f"evaluate/{outputs.METRICS}", f"evaluate/{outputs.CONFUSION_PNG}"} <= logged
    summary = _artifact(stack, flow_run, "training-summary")
    assert run.info.run_id in summary and "champion" in summary
    # The Run form: the deployed params.yaml's values, not the parameters a search sets.
    api = stack.env["PREFECT_API_URL"]
    with urllib.request.urlopen(f"{api}/deployments/name/training-pipeline/digits") as got:
        form = json.loads(got.read())["parameter_openapi_schema"]["properties"]
    deployed = yaml.safe_load((stack.repo / "params.yaml").read_text())
    assert form["train"]["default"]["epochs"] == deployed["train"]["epochs"]
    assert not {"trial", "mlflow_parent_run"} & set(form)


def test_killed_worker_rerun_resumes_training_and_registers_once(stack):
    folder = "outputs/killed"
    params = {"paths": {s: f"{folder}/{s}" for s in ("augment", "train", "evaluate", "register")},
              "train": {"epochs": 40}, "register": {"model_name": "killed-classifier"}}
    history = stack.workers / CLONE / folder / "train" / outputs.HISTORY
    with stack.worker("w2") as worker:
        stack.run_deployment("training-pipeline/digits", params, watch=False)
        deadline = time.monotonic() + 600
        while not (history.is_file() and json.loads(history.read_text())):
            assert time.monotonic() < deadline, "train never finished an epoch"
            time.sleep(0.2)
        _kill_tree(worker.pid)  # the worker and the flow run it started, mid-training
    done = len(json.loads(history.read_text()))
    assert 1 <= done < 40

    with stack.worker("w3"):
        rerun = stack.run_deployment("training-pipeline/digits", params)
    states = {t["name"].rsplit("-", 1)[0]: t["state"]["name"] for t in _task_runs(stack, [rerun])}
    assert states["prepare"] == "Cached" and states["train"] == "Completed", states
    summary = _artifact(stack, rerun, "training-summary")
    resumed = int(re.search(r"resumed from epoch (\d+)", summary).group(1))
    assert resumed >= done
    client = MlflowClient(stack.mlflow)
    versions = client.search_model_versions("name = 'killed-classifier'")
    assert len(versions) == 1
    experiment = client.get_experiment_by_name("killed-classifier")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1  # the resumed train kept logging into the run it started
    epochs = [m.step for m in client.get_metric_history(runs[0].info.run_id, "val_acc")]
    assert max(epochs) == 40 and runs[0].info.run_id == versions[0].run_id


def _kill_tree(pid: int) -> None:
    parent = psutil.Process(pid)
    procs = [parent, *parent.children(recursive=True)]
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    psutil.wait_procs(procs, timeout=30)


def test_flow_and_dvc_repro_give_the_same_metrics(stack, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(stack.repo, repo, ignore=shutil.ignore_patterns(".git"))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["epochs"] = 1
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "project")
    env = {k: v for k, v in stack.env.items() if k != "MLFLOW_TRACKING_URI"}  # embedded store
    subprocess.run(["dvc", "repro"], cwd=repo, env=env, check=True, capture_output=True,
                   timeout=600)
    by_dvc = json.loads((repo / "outputs/evaluate" / outputs.METRICS).read_text())

    moved = [f"--set=paths.{s}=flow/{s}" for s in
             ("prepared", "augment", "train", "evaluate", "register")]
    # As a user runs it without a server: Prefect's temporary one, which prints nothing of its own.
    alone = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    alone["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    done = subprocess.run([sys.executable, "-m", "cnn_pipeline", "pipeline", *moved], cwd=repo,
                          env=alone, check=True, capture_output=True, text=True, timeout=600)
    assert "Traceback" not in done.stderr and "| ERROR" not in done.stderr, done.stderr[-3000:]
    by_flow = json.loads((repo / "flow/evaluate" / outputs.METRICS).read_text())
    assert by_flow == by_dvc
