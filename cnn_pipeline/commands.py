"""What each `cnn-pipeline` command runs, what it takes, and what must be there before it starts.

A command names its function as "module:function", imported only once the settings passed and
its input data is there (cnn_pipeline/cli.py), so a refusal or `--help` never waits for torch,
timm, mlflow or Prefect. The six pipeline steps, as dvc.yaml's stages run them, come first.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from components.core.params import Params
from components.data.dataset import folder_to_score, image_folder, read_manifest

Needs = Callable[[Params, argparse.Namespace], None]


def data_root(params: Params, args: argparse.Namespace | None = None) -> None:
    """An image folder's `data.root` is there (torchvision's sources are checked by prepare,
    which alone knows their files)."""
    if params.data.source == "imagefolder":
        image_folder(params.data.root)


def prepared(params: Params, args: argparse.Namespace | None = None) -> None:
    read_manifest(params.paths.prepared)  # raises the one message for unprepared data


def folder(params: Params, args: argparse.Namespace) -> None:
    """predict's `--folder` is a folder (before a run is opened in MLflow for it)."""
    folder_to_score(args.folder)


def nothing(params: Params, args: argparse.Namespace) -> None:
    return None


@dataclass(frozen=True)
class Command:
    """`run`: "module:function", called with the validated settings and the command's own
    options (by their `dest`). `needs`: checked before that import. `track`: how a step's MLflow
    run is attached (components.tracking.run.tracked). `step`: its result ends with the seconds
    of its own work. `settings`: "params" hands the function the validated Params; "file" hands
    it `params_file` and `overrides` (it passes them on: a search's workers, a Prefect flow);
    "none", nothing."""

    run: str
    about: str
    needs: Needs = nothing
    track: Literal["start", "join", "batch"] | None = None
    step: bool = False
    settings: Literal["params", "file", "none"] = "params"
    options: dict[str, dict[str, Any]] = field(default_factory=dict)


MODEL = {"metavar": "URI", "help": "the registered version: models:/NAME@ALIAS or "
                                   "models:/NAME/VERSION (default models:/<register.model_name>"
                                   "@champion, the one you would ship)"}
COMMANDS: dict[str, Command] = {
    "prepare": Command("components.prepare:prepare", "data.source -> data/prepared (arrays, "
                       "manifest, quarantine)", needs=data_root, step=True),
    "augment": Command("components.augment:augment", "the augmentation policy and its preview",
                       needs=prepared, step=True),
    "train": Command("components.train:train", "train the model (resumes its last checkpoint)",
                     needs=prepared, track="start", step=True),
    "evaluate": Command("components.evaluate:evaluate", "score the test split: metrics, "
                        "reports, pictures", needs=prepared, track="join", step=True),
    "register": Command("components.register:register", "log the model and move champion when "
                        "the gate says so", needs=prepared, track="join", step=True),
    "export": Command("components.export:export", "the champion (or --model) as ONNX, checked "
                      "against PyTorch", needs=prepared, track="join", step=True,
                      options={"--model": MODEL}),
    "predict": Command(
        "components.predict:predict", "score a folder of images: predictions.csv, drift.json",
        needs=folder, track="batch", step=True, options={
            "--folder": {"required": True, "help": "folder of images to score (any depth)"},
            "--model": {"dest": "model_uri", "metavar": "URI_OR_PATH", "help": "model.pt path "
                        "or MLflow URI (default models:/<register.model_name>@champion)"}}),
    "serve": Command(
        "components.serving.server:serve", "the champion (or --model) on MLflow's model server",
        options={"--model": MODEL, "--port": {"type": int, "default": 5001,
                                              "help": "port on 127.0.0.1 (default 5001)"}}),
    "search": Command(
        "flows.search.sweep:run_here", "an Optuna search, its workers processes here",
        needs=data_root, settings="file", options={"--worker": {
            "type": int, "metavar": "N", "help": "run one more worker (number N) of the search "
                                                 "these settings name, not the whole search"}}),
    "pipeline": Command(
        "flows.pipeline:run_here", "the Prefect flow of all steps, in this process",
        needs=data_root, settings="file",
        options={"--skip-register": {"action": "store_true", "help": "train and evaluate only"}}),
    "kfp": Command(
        "flows.kubeflow.compiler:run_command", "compile the Kubeflow pipeline, or run it here "
        "with kfp.local", options={
            "action": {"choices": ("compile", "run-local")},
            "--image": {"help": "compile: the image infra/Dockerfile builds, as the cluster "
                                "pulls it: REGISTRY/cnn-pipeline:TAG"},
            "--out": {"help": "compile: the pipeline file (default pipeline.yaml)"},
            "--secret": {"help": "compile: the Kubernetes secret holding MLFLOW_TRACKING_URI "
                                 "and its credentials (default mlflow-client)"},
            "--request": {"action": "append", "default": [], "metavar": "STEP.RESOURCE=VALUE",
                          "help": "compile: a task's CPU or memory request, e.g. "
                                  "train.memory=64Gi; repeatable"},
            "--pipeline-root": {"help": "run-local: where kfp.local keeps the artifacts "
                                        "(default outputs/kfp)"}}),
    "check": Command("flows.parameters:deployment_parameters", "validate the settings; print "
                     "them as a deployment run's parameters (JSON)", settings="file"),
    "step-code": Command("components.core.step_code:stage_code", "each stage's code, as "
                         "dvc.yaml's deps list it", settings="none"),
}
