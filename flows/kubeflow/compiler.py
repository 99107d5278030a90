"""training-pipeline for Kubeflow Pipelines v2: prepare → augment → train → evaluate → register →
export, the steps of dvc.yaml and the Prefect flow.

    cnn-pipeline kfp compile --image REGISTRY/cnn-pipeline:0.1.0 [--out pipeline.yaml]
                                         [--secret NAME] [--request train.memory=64Gi ...]
                                         [--params params.yaml] [--set train.epochs=5 ...]
    cnn-pipeline kfp run-local [--pipeline-root outputs/kfp] [--params ...] [--set ...]

`compile` writes the pipeline as KFP IR YAML, for the KFP UI or `kfp.Client().create_run_from_
pipeline_package`: one container task per step, each running `cnn-pipeline <step>` in
the project's image (infra/Dockerfile). `run-local` runs the same graph here through `kfp.local`
(no cluster, no Docker), each task a lightweight-component twin that runs the same command
in this interpreter, tracking into the MLflow that MLFLOW_TRACKING_URI names. The twins and the
containers share everything but how a task starts: each task's inputs, outputs and command-line
arguments (flows/kubeflow/tasks.py) and the graph (`build`).

Reads params.yaml (or --params) with --set, dvc.yaml (which sections prepare depends on) and the
git state of this project. Writes `--out` (compile, whole or not at all); run-local writes under
`--pipeline-root`, one folder per run (kfp.local's layout: <run>/<task>/<artifact>/), with
prepare's cache entries in its .cache, and prints a JSON summary (the MLflow run, the test
metrics, the registry's decision) on stdout; the tasks' logs go to stderr.

What the graph says:
- Artifacts are folders: the step's `paths` folder is the artifact KFP gives it (`--set
  paths.<folder>=<artifact path>`); inputs are read-only, so the tracked steps park what MLflow
  did not receive in their own output (`--pending-dir`, components/tracking/run.py).
- Settings: one pipeline parameter per params.yaml section but `paths` (KFP places the folders),
  a struct whose default is that section of the validated settings. Each task gets a section as
  one value (`--set train={...}`), validated by the same models when it starts; `compile` and
  `run-local` validate first, with the message every entry point gives. KFP's structs cannot
  hold null, so a null key is left out: a section's keys left out take their defaults, and
  `compile` checks that this gives back exactly the settings it was given. prepare takes only the
  sections its DVC stage depends on (dvc.yaml), so that KFP's cache, on prepare only, is keyed on
  what decides its output.
- One MLflow run: train writes its id to an output parameter; evaluate, register and export
  join it.
  Tracking address and credentials come from the Kubernetes secret `--secret` (kfp-kubernetes),
  never from a parameter; the git commit recorded at compile time stands in for the image's
  missing .git. Retries as the Prefect flow's (KFP cannot tell a bad setting from a lost node, so
  settings are checked at compile time). train asks for `gpu_count` × nvidia.com/gpu.
- Resources: each task requests CPU and memory (REQUESTS; `--request STEP.cpu=N` or
  `STEP.memory=SIZE` at compile), so that Kubernetes places it on a node that has them.
- The image must name its registry (`--image registry.example/cnn-pipeline:0.1.0`): a bare name
  is pulled from Docker Hub, where this image is not, so compile refuses one.
- KFP keeps a struct's numbers as doubles (protobuf's Struct): compile writes the defaults back
  as given, so an integer reads `64`, not `64.0`, in the YAML and its header.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import re
import sys
import tomllib
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import yaml
from kfp import compiler, dsl, kubernetes, local
from kfp.compiler.pipeline_spec_builder import extract_comments_from_pipeline_spec
from kfp.dsl import Artifact
from kfp.dsl.container_component_class import ContainerComponent
from kfp.dsl.structures import ContainerSpecImplementation, Implementation

from components.core import outputs
from components.core.atomic import atomic_file
from components.core.params import Params, ParamsError, UserError
from components.core.step_code import ROOT, STEPS
from components.tracking.lineage import GIT_ENV, git_state
from flows.kubeflow.tasks import (
    CACHED,
    READS,
    RUN_ID,
    TRACKS,
    WRITES,
    interface,
    parameter,
    settings_sections,
    step_sections,
    task_args,
)

PIPELINE = "training-pipeline"
SECRET = "mlflow-client"  # infra/README.md: MLFLOW_TRACKING_URI, _USERNAME, _PASSWORD
PIPELINE_ROOT = "outputs/kfp"  # run-local: kfp.local's artifacts, one folder per run
STARTS = next(step for step, how in TRACKS.items() if how == "start")  # opens the MLflow run
ON_GPU = "train"
GPU_COUNT = "gpu_count"  # a pipeline parameter: nvidia.com/gpu for train
# What each task asks Kubernetes to reserve (requests, not limits: a task may use more where the
# node has it). Digits needs far less; these fit CIFAR-scale data. `--request` changes them.
REQUESTS = {
    "prepare": {"cpu": "2", "memory": "4Gi"},  # decoding in parallel, the arrays in memory
    "augment": {"cpu": "1", "memory": "2Gi"},
    "train": {"cpu": "4", "memory": "16Gi"},  # loading and the memory map; the GPU does the rest
    "evaluate": {"cpu": "2", "memory": "8Gi"},  # scoring, scikit-learn, pictures
    "register": {"cpu": "2", "memory": "4Gi"},
    "export": {"cpu": "2", "memory": "4Gi"},
}
QUANTITY = {"cpu": re.compile(r"\d+(\.\d+)?m?"),  # Kubernetes quantities: 2, 0.5, 500m
            "memory": re.compile(r"\d+(\.\d+)?([EPTGMK]i?)?")}  # 16Gi, 512M, 1e9 as bytes
RETRIES = {  # the Prefect flow's: train once after 5 s, the MLflow steps 3 times (2, 4, 8 s)
    "train": {"num_retries": 1, "backoff_duration": "5s"},
    "evaluate": {"num_retries": 3, "backoff_duration": "2s", "backoff_factor": 2.0},
    "register": {"num_retries": 3, "backoff_duration": "2s", "backoff_factor": 2.0},
    "export": {"num_retries": 3, "backoff_duration": "2s", "backoff_factor": 2.0},
}


# What a pipeline run leaves for its caller: the MLflow run, evaluate's and register's artifacts.
# (Built so, the field types stay types under `from __future__ import annotations`: KFP reads
# them.)
Outputs = NamedTuple("Outputs", [(RUN_ID, str), (WRITES["evaluate"], Artifact),
                                 (WRITES["register"], Artifact)])


# --- one graph -----------------------------------------------------------------------------------


def build(ops: dict[str, Any], defaults: dict[str, dict], commit: tuple[str, str],
          secret: str = SECRET, requests: dict[str, dict[str, str]] = REQUESTS):
    """The pipeline: `ops` (containers or twins) wired by their artifacts, one parameter per
    settings section with `defaults`, and how KFP runs each task."""
    signature = inspect.Signature(
        [parameter(s, dict, default=v) for s, v in defaults.items()]
        + [parameter(GPU_COUNT, int, default=1)], return_annotation=Outputs)

    def pipeline(*args: Any) -> Outputs:
        given, tasks = signature.bind(*args).arguments, {}
        producer = {artifact: step for step, artifact in WRITES.items()}
        for step in STEPS:
            inputs = {a: tasks[producer[a]].outputs[a] for a in READS[step]}
            inputs |= {s: given[s] for s in step_sections(step)}
            if TRACKS.get(step) == "join":
                inputs[RUN_ID] = tasks[STARTS].outputs[RUN_ID]
            tasks[step] = _configure(step, ops[step](**inputs), given, secret, commit)
            tasks[step].set_cpu_request(requests[step]["cpu"])
            tasks[step].set_memory_request(requests[step]["memory"])
        return Outputs(tasks[STARTS].outputs[RUN_ID],
                       *(tasks[producer[a]].outputs[a] for a in Outputs._fields[1:]))

    pipeline.__signature__ = signature
    pipeline.__doc__ = ("Prepare, augment, train, evaluate, register and export a CNN image "
                       "classifier.")
    return dsl.pipeline(name=PIPELINE)(pipeline)


def _configure(step: str, task, given: dict[str, Any], secret: str, commit: tuple[str, str]):
    task.set_caching_options(step == CACHED)  # KFP caches every task unless told
    if step in RETRIES:
        task.set_retry(**RETRIES[step])
    if step in TRACKS:
        kubernetes.use_secret_as_env(task, secret, {"MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI"})
        credentials = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
        kubernetes.use_secret_as_env(task, secret, {k: k for k in credentials}, optional=True)
        for name, value in zip(GIT_ENV, commit, strict=True):
            task.set_env_variable(name, value)
    if step == ON_GPU:
        task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(given[GPU_COUNT])
        # GPU nodes are usually tainted; DDP and data loaders share batches through /dev/shm.
        kubernetes.add_toleration(task, key="nvidia.com/gpu", operator="Exists",
                                  effect="NoSchedule")
        kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm",
                                   medium="Memory", size_limit="8Gi")
    return task


# --- how a task starts: a container, or a twin in this interpreter -------------------------------


def container(step: str, image: str) -> ContainerComponent:
    """`cnn-pipeline <step> <task_args>` in `image`."""
    signature = interface(step)

    def spec(*args: Any) -> dsl.ContainerSpec:
        return dsl.ContainerSpec(image=image, command=["cnn-pipeline", step],
                                 args=task_args(step, signature.bind(*args).arguments))

    spec.__name__, spec.__signature__ = step, signature
    spec.__doc__ = f"cnn-pipeline {step}: see components/{step}.py's docstring."
    return dsl.container_component(spec)


def _stub():  # no annotations: KFP reads them, and here they would be strings
    """Only its compiled command is used: KFP's own lightweight-component launcher script."""


def twin(step: str, image: str) -> ContainerComponent:
    """The container's component with KFP's lightweight launcher in place of its command: the
    launcher's module takes the twin from TWINS, whose signature is the container's."""
    component = container(step, image)
    launcher = dsl.component(_stub, base_image=image, install_kfp_package=False)
    *script, source = launcher.component_spec.implementation.container.command  # sh -ec ...
    module = f"{source}\nfrom flows.kubeflow.tasks import TWINS\n\n{step} = TWINS[{step!r}]\n"
    implementation = ContainerSpecImplementation(
        image=image, command=[*script, module],
        args=["--executor_input", dsl.PIPELINE_TASK_EXECUTOR_INPUT_PLACEHOLDER,
              "--function_to_execute", step])
    spec = dataclasses.replace(component.component_spec,
                               implementation=Implementation(container=implementation))
    return ContainerComponent(spec, component.pipeline_func)


# --- the command line ----------------------------------------------------------------------------


def defaults(params: Params) -> dict[str, dict]:
    """Each section parameter's default: the validated section without its null keys (a KFP
    struct cannot hold null), after checking that a task validating it gets `params` back."""
    dumped = params.model_dump(mode="json")
    found = {s: {k: v for k, v in dumped[s].items() if v is not None}
             for s in settings_sections()}
    again = Params.model_validate({"paths": dumped["paths"], **found})
    lost = [s for s in found if getattr(again, s) != getattr(params, s)]
    if lost:
        raise ParamsError(f"sections {', '.join(lost)}: a null there is not its default, and a "
                          "Kubeflow struct cannot say null; set those keys to a value")
    return found


def compile_pipeline(params: Params, out: str | Path, image: str, secret: str = SECRET,
                     requests: dict[str, dict[str, str]] = REQUESTS) -> Path:
    """The container pipeline as KFP IR YAML at `out`, written whole or not at all."""
    check_image(image)
    sections_ = defaults(params)
    pipeline = build({step: container(step, image) for step in STEPS}, sections_,
                     git_state(ROOT), secret, requests)
    with atomic_file(out) as tmp:
        named = tmp.with_suffix(".yaml")  # the compiler picks its format by the name
        try:
            compiler.Compiler().compile(pipeline, str(named))
            tmp.write_text(_as_given(named.read_text(), sections_))
        finally:
            named.unlink(missing_ok=True)
    return Path(out)


def _as_given(text: str, sections_: dict[str, dict]) -> str:
    """The compiled YAML with the root parameters' defaults as given (KFP wrote a struct's and an
    integer parameter's numbers as doubles: 64.0), and its header comment made again from them
    by KFP's own writer."""
    spec, *platform = yaml.safe_load_all(text)
    for name, given in spec["root"]["inputDefinitions"]["parameters"].items():
        if name in sections_:
            given["defaultValue"] = sections_[name]
        elif given["parameterType"] == "NUMBER_INTEGER" and "defaultValue" in given:
            given["defaultValue"] = int(given["defaultValue"])
    header = extract_comments_from_pipeline_spec(spec, spec["pipelineInfo"].get("description"))
    return header + yaml.dump_all([spec, *platform], sort_keys=True)


def check_image(image: str) -> None:
    """Refuse an image reference that names no registry (`cnn-pipeline:0.1.0`): a cluster would
    pull it from Docker Hub. A registry is the part before the first `/` when it has a `.` or a
    `:` or is `localhost` (Docker's own rule)."""
    first, _, rest = image.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        return
    raise UserError(
        f"--image {image}: names no registry, so a cluster pulls it from Docker Hub, where this "
        "project's image is not. Build infra/Dockerfile, push it to a registry your cluster "
        f"pulls from and give its whole name: --image registry.example/{image.split('/')[-1]} "
        "(docker.io/... for Docker Hub)")


def parse_requests(given: list[str]) -> dict[str, dict[str, str]]:
    """REQUESTS with `--request STEP.RESOURCE=VALUE` applied, each checked."""
    requests = {step: dict(r) for step, r in REQUESTS.items()}
    for item in given:
        key, _, value = item.partition("=")
        step, _, resource = key.partition(".")
        if step not in requests or resource not in QUANTITY:
            raise UserError(f"--request {item}: expected STEP.RESOURCE=VALUE with STEP one of "
                            f"{', '.join(STEPS)} and RESOURCE cpu or memory, e.g. "
                            "--request train.memory=64Gi")
        if not QUANTITY[resource].fullmatch(value):
            raise UserError(f"--request {item}: {value!r} is not a Kubernetes {resource} "
                            f"quantity (e.g. {REQUESTS['train'][resource]})")
        requests[step][resource] = value
    return requests


def run_local(params: Params, pipeline_root: str | Path = PIPELINE_ROOT) -> dict[str, Any]:
    """The twins' pipeline through kfp.local (subprocesses of this interpreter; prepare cached
    under the root); returns the MLflow run, the test metrics and the registry's decision."""
    root = Path(pipeline_root).resolve()
    sections_ = defaults(params)
    pipeline = build({step: twin(step, _image()) for step in STEPS}, sections_, git_state(ROOT))
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root),
               enable_caching=True, cache_root=str(root / ".cache"))
    # kfp.local prints the tasks' logs; stdout is this command's JSON summary.
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        for expected in ("You may be attemping", ".*have no effect in the current local runner"):
            warnings.filterwarnings("ignore", message=expected)  # the twins run here, on a CPU
        try:
            produced = pipeline(**sections_).outputs
        except RuntimeError as err:  # a task failed: its log above says why
            raise SystemExit(f"error: {err}") from None
    evaluation, decision = (Path(produced[WRITES[step]].path) for step in ("evaluate", "register"))
    metrics = json.loads((evaluation / outputs.METRICS).read_text())
    return {"pipeline_root": str(root), "run_id": produced[RUN_ID],
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, int | float)},
            "registered": json.loads((decision / outputs.DECISION).read_text())}


def _image() -> str:
    """The image infra/Dockerfile builds, tagged with the project's version."""
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    return f"cnn-pipeline:{version}"


def run_command(params: Params, action: str, image: str | None = None, out: str | None = None,
                secret: str | None = None, request: list[str] = (),
                pipeline_root: str | None = None) -> dict[str, Any]:
    """`compile` writes the pipeline's IR YAML (`out`, default pipeline.yaml) for the cluster to
    pull `image` (REGISTRY/cnn-pipeline:TAG), the tasks reading MLflow's address from the
    Kubernetes `secret` and requesting the CPU and memory of REQUESTS and `request`
    (STEP.cpu|memory=VALUE). `run-local` runs the same graph here with kfp.local (artifacts under
    `pipeline_root`, default outputs/kfp)."""
    defaults(params)
    if action == "compile":
        return {"pipeline": str(compile_pipeline(params, out or outputs.KFP_PIPELINE,
                                                 image or _image(), secret or SECRET,
                                                 parse_requests(list(request))))}
    return run_local(params, pipeline_root or PIPELINE_ROOT)
