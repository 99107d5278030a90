"""The Kubeflow pipeline (flows/kubeflow/compiler.py): compiled by the real KFP compiler and read
back; its containers' commands run as KFP would run them, without a container; `run-local` end to
end through kfp.local against a real MLflow server; bad settings refused before anything is written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from cnn_pipeline.cli import main as command
from components.core import outputs
from components.core.params import Params, load_params, sections
from components.core.step_code import STEPS
from components.tracking.lineage import GIT_ENV, dvc_dir_hash
from flows.kubeflow.compiler import REQUESTS
from tests.support.projects import BIN, ROOT

IMAGE = "registry.example/cnn-pipeline:1.2.3"
SMALL = ["train.epochs=1", "augment.preview_images=2", "augment.preview_views=2",
         "evaluate.mistakes=4", "register.flush_timeout_s=2"]
DEPENDS = {"prepare": [], "augment": ["prepare"], "train": ["augment", "prepare"],
           "evaluate": ["prepare", "train"], "register": ["evaluate", "prepare", "train"],
           "export": ["prepare", "register", "train"]}
TRACKED = {"train", "evaluate", "register", "export"}


def compile_to(path: Path, *overrides: str, request: tuple[str, ...] = ()) -> list[dict]:
    """`compile` through the command line; the YAML's documents: pipeline, platform."""
    sets = [a for o in overrides for a in ("--set", o)]
    sets += [a for r in request for a in ("--request", r)]
    command(["kfp", "compile", "--params", str(ROOT / "params.yaml"), "--out", str(path),
             "--image", IMAGE, *sets])
    return list(yaml.safe_load_all(path.read_text()))


def git_head() -> tuple[str, str]:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.strip()
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    return commit, "true" if status.strip() else "false"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> list[dict]:
    return compile_to(tmp_path_factory.mktemp("kfp") / outputs.KFP_PIPELINE)


# --- the compiled YAML ---------------------------------------------------------------------------


def test_a_container_task_per_step_in_order_running_the_steps_in_the_image(compiled):
    spec, _ = compiled
    tasks = spec["root"]["dag"]["tasks"]
    assert spec["pipelineInfo"]["name"] == "training-pipeline"
    assert {t: sorted(tasks[t].get("dependentTasks", [])) for t in tasks} == DEPENDS
    for step in STEPS:
        container = spec["deploymentSpec"]["executors"][f"exec-{step}"]["container"]
        assert container["image"] == IMAGE
        assert container["command"] == ["cnn-pipeline", step]
    # The artifacts are the steps' folders; one MLflow run id goes from train to the others.
    inputs = {t: tasks[t].get("inputs", {}) for t in tasks}
    assert inputs["register"]["artifacts"]["evaluation"]["taskOutputArtifact"] == {
        "outputArtifactKey": "evaluation", "producerTask": "evaluate"}
    for step in ("evaluate", "register", "export"):
        assert inputs[step]["parameters"]["run_id"]["taskOutputParameter"] == {
            "outputParameterKey": "run_id", "producerTask": "train"}


def test_one_parameter_per_section_defaulting_to_params_yaml(compiled):
    spec, _ = compiled
    given = spec["root"]["inputDefinitions"]["parameters"]
    assert set(given) == {*sections(), "gpu_count"} - {"paths"}  # KFP places the folders
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, parameter in given.items():
        if section == "gpu_count":
            continue
        assert parameter["parameterType"] == "STRUCT"
        default = parameter["defaultValue"]
        # What params.yaml says, but its nulls: a KFP struct cannot hold one, and null is the
        # default of every key that allows it.
        assert default == {k: v for k, v in raw[section].items() if v is not None}, section
        assert getattr(Params.model_validate({section: default}), section) == getattr(
            load_params(ROOT / "params.yaml"), section)
    # prepare, the cached task, takes only what decides its output: its DVC stage's params.
    assert set(spec["root"]["dag"]["tasks"]["prepare"]["inputs"]["parameters"]) == {"data"}


def test_gpu_on_train_caching_on_prepare_retries_like_the_prefect_flow(compiled):
    spec, _ = compiled
    tasks, executors = spec["root"]["dag"]["tasks"], spec["deploymentSpec"]["executors"]
    accelerator = executors["exec-train"]["container"]["resources"]["accelerator"]
    assert accelerator["resourceType"] == "nvidia.com/gpu"
    assert "gpu_count" in accelerator["resourceCount"]
    for step in STEPS:  # every task asks for CPU and memory, so that nodes fit it
        resources = executors[f"exec-{step}"]["container"]["resources"]
        assert resources["resourceCpuRequest"] == REQUESTS[step]["cpu"]
        assert resources["resourceMemoryRequest"] == REQUESTS[step]["memory"]
    assert [s for s in STEPS if tasks[s]["cachingOptions"].get("enableCache")] == ["prepare"]
    retries = {s: tasks[s].get("retryPolicy", {}).get("maxRetryCount") for s in STEPS}
    assert retries == {"prepare": None, "augment": None, "train": 1, "evaluate": 3, "register": 3,
                       "export": 3}


def test_integers_stay_integers_in_the_yaml_and_its_header(compiled, tmp_path):
    spec, _ = compiled
    given = spec["root"]["inputDefinitions"]["parameters"]
    assert given["gpu_count"]["defaultValue"] == 1
    train = given["train"]["defaultValue"]
    assert type(train["batch_size"]) is int and type(train["epochs"]) is int
    assert type(train["lr"]) is float
    text = (tmp_path / outputs.KFP_PIPELINE)
    compile_to(text)
    header = [line for line in text.read_text().splitlines() if line.startswith("#")]
    assert any("'batch_size': 64," in line for line in header), header
    assert not any("64.0" in line for line in header)


def test_requests_are_set_at_compile_and_a_bad_one_or_an_image_without_registry_refused(
        tmp_path, capsys):
    from flows.kubeflow import compiler as kfp_pipeline

    out = tmp_path / outputs.KFP_PIPELINE
    spec, _ = compile_to(out, request=["train.memory=64Gi", "prepare.cpu=500m"])
    executors = spec["deploymentSpec"]["executors"]
    assert executors["exec-train"]["container"]["resources"]["resourceMemoryRequest"] == "64Gi"
    assert executors["exec-prepare"]["container"]["resources"]["resourceCpuRequest"] == "500m"
    out.unlink()
    for args, says in [(["--request", "train.gpu=1"], "RESOURCE cpu or memory"),
                       (["--request", "train.memory=lots"], "not a Kubernetes memory quantity"),
                       (["--image", "cnn-pipeline:0.1.0"], "names no registry"),
                       ([], "names no registry")]:  # the default image: compile needs --image
        image = [] if "--image" in args or not args else ["--image", IMAGE]
        with pytest.raises(SystemExit) as refused:
            command(["kfp", "compile", "--params", str(ROOT / "params.yaml"), "--out", str(out),
                     *image, *args])
        assert refused.value.code == 2 and says in capsys.readouterr().err
        assert not out.exists()  # nothing written
    kfp_pipeline.check_image("localhost:5000/cnn-pipeline:1")  # a local registry names itself


def test_tracking_address_from_a_secret_and_the_commit_recorded(compiled):
    spec, platform = compiled
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for step in STEPS:
        secrets = k8s.get(f"exec-{step}", {}).get("secretAsEnv", [])
        mapped = {m["envVar"]: (s["secretName"], s["optional"]) for s in secrets
                  for m in s["keyToEnv"]}
        if step in TRACKED:
            assert mapped["MLFLOW_TRACKING_URI"] == ("mlflow-client", False)
            assert mapped["MLFLOW_TRACKING_PASSWORD"] == ("mlflow-client", True)
        else:
            assert not mapped
        env = {e["name"]: e["value"] for e in
               spec["deploymentSpec"]["executors"][f"exec-{step}"]["container"].get("env", [])}
        assert (env == dict(zip(GIT_ENV, git_head(), strict=True))) == (step in TRACKED)
    assert "MLFLOW" not in json.dumps(spec["root"]["inputDefinitions"])  # never a parameter


def test_the_twins_differ_from_the_containers_only_in_how_a_task_starts():
    from google.protobuf import json_format

    from flows.kubeflow.compiler import build, container, defaults, twin

    params, commit = load_params(ROOT / "params.yaml"), ("c0ffee", "false")
    specs = [json_format.MessageToDict(build({s: make(s, IMAGE) for s in STEPS}, defaults(params),
                                             commit).pipeline_spec) for make in (container, twin)]
    containers, twins = specs
    assert containers["root"] == twins["root"] and containers["components"] == twins["components"]
    for step in STEPS:
        a, b = (s["deploymentSpec"]["executors"][f"exec-{step}"]["container"] for s in specs)
        assert a["command"] == ["cnn-pipeline", step]
        assert "kfp.dsl.executor_main" in " ".join(b["command"])  # KFP's lightweight launcher
        assert {k: v for k, v in a.items() if k not in ("command", "args")} == {
            k: v for k, v in b.items() if k not in ("command", "args")}


# --- the containers' commands, run as KFP runs them, without a container -----------------------

PLACEHOLDER = re.compile(r"\{\{\$\.(inputs|outputs)\.(artifacts|parameters)\['([^']+)'\]"
                         r"\.?(path|output_file)?\}\}")


@pytest.fixture(scope="module")
def mlflow(stack) -> str:
    """The session's MLflow server (conftest's stack); the model names here are this module's."""
    return stack.mlflow


def image_workdir(root: Path) -> Path:
    """What the image's working directory holds for a step: params.yaml, no .git, no dvc.lock."""
    root.mkdir()
    shutil.copy(ROOT / "params.yaml", root / "params.yaml")
    return root


def listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


@pytest.mark.slow
def test_the_containers_commands_run_in_order_on_digits(tmp_path, mlflow):
    spec, _ = compile_to(tmp_path / outputs.KFP_PIPELINE, *SMALL,
                         "register.model_name=kfp-containers")
    defaults = {k: v.get("defaultValue") for k, v in
                spec["root"]["inputDefinitions"]["parameters"].items()}
    workdir, store = image_workdir(tmp_path / "image"), tmp_path / "artifacts"
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
           "MLFLOW_TRACKING_URI": mlflow}
    produced: dict[str, dict[str, str]] = {}  # task -> output name -> folder or value
    for step in STEPS:
        task = spec["root"]["dag"]["tasks"][step]
        container = spec["deploymentSpec"]["executors"][f"exec-{step}"]["container"]
        values = resolved_inputs(task, defaults, produced)
        own = {}

        def fill(match, step=step, values=values, own=own):
            where, kind, name, _ = match.groups()
            if where == "inputs":
                value = values[name]
                return value if isinstance(value, str) else json.dumps(value)
            own[name] = str(store / step / name)  # a fresh local path, as KFP's launcher gives
            return own[name]

        command = [PLACEHOLDER.sub(fill, part) for part in container["command"] + container["args"]]
        assert not any("{{$" in part for part in command), command
        read = [Path(v) for k, v in values.items() if k in task["inputs"].get("artifacts", {})]
        before = [listing(folder) for folder in read]
        task_env = {**env, **{e["name"]: e["value"] for e in container.get("env", [])}}
        done = subprocess.run(command, cwd=workdir, env=task_env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, f"{step}:\n{done.stdout}\n{done.stderr[-4000:]}"
        assert [listing(folder) for folder in read] == before, f"{step} wrote into its inputs"
        produced[step] = {name: (Path(path).read_text() if name == "run_id" else path)
                         for name, path in own.items()}

    run_id = produced["train"]["run_id"]
    assert re.fullmatch(r"[0-9a-f]{32}", run_id)
    decision = json.loads((Path(produced["register"]["decision"]) / outputs.DECISION).read_text())
    assert decision["run_id"] == run_id and decision["promoted"]
    assert json.loads((Path(produced["export"]["exported"]) / outputs.EXPORT).read_text())["passed"]
    assert (Path(produced["train"]["trained_model"]) / outputs.RUN).is_file()
    run = MlflowClient(mlflow).get_run(run_id)
    assert run.data.params["train.epochs"] == "1" and "accuracy" in run.data.metrics
    # No .git in the image: the commit the compiler recorded is the run's.
    assert (run.data.tags["git.commit"], run.data.tags["git.dirty"]) == git_head()
    assert run.data.tags["data.hash"] == dvc_dir_hash(produced["prepare"]["prepared"])


def resolved_inputs(task: dict, defaults: dict, produced: dict) -> dict:
    """A task's inputs as KFP's driver resolves them: pipeline parameters, upstream outputs."""
    values = {}
    for name, source in task.get("inputs", {}).get("parameters", {}).items():
        if "componentInputParameter" in source:
            values[name] = defaults[source["componentInputParameter"]]
        elif "taskOutputParameter" in source:
            found = source["taskOutputParameter"]
            values[name] = produced[found["producerTask"]][found["outputParameterKey"]]
    for name, source in task.get("inputs", {}).get("artifacts", {}).items():
        found = source["taskOutputArtifact"]
        values[name] = produced[found["producerTask"]][found["outputArtifactKey"]]
    return values


# --- run-local: the twins through kfp.local, end to end ------------------------------------------


@pytest.mark.slow
def test_run_local_tracks_one_run_and_registers_a_champion(tmp_path, mlflow, digits):
    workdir, root = image_workdir(tmp_path / "project"), tmp_path / "kfp"
    sets = [a for o in [*SMALL, "register.model_name=kfp-local"] for a in ("--set", o)]
    done = subprocess.run(
        [sys.executable, "-m", "cnn_pipeline", "kfp", "run-local", "--pipeline-root", str(root),
         *sets], cwd=workdir, capture_output=True, text=True, timeout=1200,
        env={**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": mlflow})
    assert done.returncode == 0, done.stderr[-6000:]
    summary = json.loads(done.stdout)  # logs went to stderr
    run_id = summary["run_id"]
    assert summary["registered"]["run_id"] == run_id and 0.1 < summary["metrics"]["accuracy"] <= 1

    client = MlflowClient(mlflow)
    champion = client.get_model_version_by_alias("kfp-local", "champion")
    assert champion.run_id == run_id and champion.version == summary["registered"]["version"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["train.epochs"] == "1"
    assert [m.step for m in client.get_metric_history(run_id, "val_acc")] == [1]
    assert "accuracy" in run.data.metrics  # evaluate logged into train's run
    assert (run.data.tags["git.commit"], run.data.tags["git.dirty"]) == git_head()
    [prepared] = root.glob("*/prepare/prepared")  # kfp.local's artifact folder
    # Content-hashed as DVC hashes: the same value as for the same data prepared elsewhere.
    assert run.data.tags["data.hash"] == dvc_dir_hash(prepared) == dvc_dir_hash(
        digits / "prepared")
    assert champion.tags["data.hash"] == run.data.tags["data.hash"]
    assert champion.tags["onnx.parity"] == "passed"  # the export task ran after register
    logged = set()
    for folder in ("augment", "data", "evaluate", "register", "train"):
        logged |= {a.path for a in client.list_artifacts(run_id, folder)}
    assert {f"augment/{outputs.POLICY}", f"data/{outputs.MANIFEST}", f"evaluate/{outputs.METRICS}",
            f"evaluate/{outputs.CONFUSION_PNG}", f"register/{outputs.DECISION}",
            f"train/{outputs.HISTORY}"} <= logged
    assert not (workdir / "outputs").exists()  # every step wrote into its own artifact


# --- bad settings: refused before anything is written, as everywhere -----------------------------


@pytest.mark.parametrize("override", ["train.epochs=0", "trian.epochs=3", "train=5"])
def test_bad_settings_are_refused_before_anything_is_written(tmp_path, capsys, override):
    params = image_workdir(tmp_path / "project") / "params.yaml"
    with pytest.raises(SystemExit) as refused:
        command(["train", "--params", str(params), "--set", override])
    expected = capsys.readouterr().err
    assert refused.value.code == 2 and expected.startswith("error: ")
    for action, out in (("compile", "--out"), ("run-local", "--pipeline-root")):
        target = tmp_path / action
        with pytest.raises(SystemExit) as refused:
            command(["kfp", action, "--params", str(params), "--set", override, out,
                     str(target)])
        assert refused.value.code == 2
        assert capsys.readouterr().err == expected
        assert not target.exists()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["params.yaml", "project"]


# --- tracking where inputs are read-only -----------------------------------------------------


def test_read_only_inputs_leftovers_go_to_the_steps_own_folder(tmp_path, monkeypatch):
    """evaluate under Kubeflow: it delivers what train parked, leaving train's folder (its input)
    as it was, and parks what it could not deliver in its own output folder."""
    from mlflow.entities import Metric

    from components.tracking.delivery import Pending
    from components.tracking.run import Tracker
    from tests.support.servers import free_port

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(store)
    run_id = client.create_run(client.create_experiment("read-only")).info.run_id
    train, own = tmp_path / "trained_model", tmp_path / "evaluation"
    params = load_params(image_workdir(tmp_path / "project") / "params.yaml", [
        f"paths.train={train}", f"paths.evaluate={own}", "register.flush_timeout_s=0"])
    Pending(train).add(store, run_id, [Metric("train.seconds", 2.5, 0, 1)], [], [])
    before = listing(train)

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    Tracker.resume(params, run_id=run_id, pending_dir=own).close()
    assert [m.value for m in client.get_metric_history(run_id, "train.seconds")] == [2.5]
    assert listing(train) == before

    away = f"http://127.0.0.1:{free_port()}"  # the server gone while evaluate logs
    with Tracker(params, client, away, run_id, pending_dir=own) as tracker:
        tracker.log_metrics({"accuracy": 0.9})
    [parked] = Pending(own).read().values()
    assert parked["run_id"] == run_id and parked["metrics"][0]["key"] == "accuracy"
    assert listing(train) == before
