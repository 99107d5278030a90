"""What each task of the Kubeflow pipeline is: its inputs and outputs, its command-line
arguments, and its lightweight twin; flows/kubeflow/compiler.py wires them into the graph.

A task runs `cnn-pipeline <step>` with `task_args`: `--set paths.<folder>=<artifact>` for
each folder it reads or writes (KFP gives each artifact its own folder), `--set <section>={...}`
for each settings section it takes (a pipeline parameter, a whole section as one value) and, for
the tracked steps, where the MLflow run comes from and where leftovers go (its own output folder:
its inputs are read-only). A container gets KFP's placeholders there, a twin the values.

Kept apart from the pipeline module because a twin runs under KFP's executor, which sets
`_KFP_RUNTIME` and so leaves `kfp` half-imported: `kfp.dsl` works there, `kfp.compiler` does not.
Reads dvc.yaml (prepare's sections); writes nothing itself (the steps write their outputs).
"""

from __future__ import annotations

import functools
import inspect
import json
from typing import Any

import yaml
from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components.core.params import Paths, sections
from components.core.step_code import ROOT, STEPS

# A twin runs its step through the command line, one per step (tests/test_step_code.py checks
# the list is STEPS).
LOADED_BY_NAME = ("components.prepare", "components.augment", "components.train",
                  "components.evaluate", "components.register", "components.export")

# The artifacts, each a folder, by the `paths` folder they stand for in a step's settings.
ARTIFACTS = {"prepared": "prepared", "policy": "augment", "trained_model": "train",
             "evaluation": "evaluate", "decision": "register", "exported": "export"}
TYPES = {"prepared": Dataset, "trained_model": Model}  # the others: plain Artifact
WRITES = dict(zip(STEPS, ARTIFACTS, strict=True))
READS = {"prepare": (), "augment": ("prepared",), "train": ("prepared", "policy"),
         "evaluate": ("prepared", "trained_model"),
         "register": ("prepared", "trained_model", "evaluation"),
         "export": ("prepared", "decision")}
TRACKS = {"train": "start", "evaluate": "join", "register": "join",
          "export": "join"}  # as the command line attaches them
RUN_ID = "run_id"  # train's output parameter; evaluate's, register's and export's input
CACHED = "prepare"  # the one task KFP may cache (flows/kubeflow/compiler.py)


def settings_sections() -> list[str]:
    """The sections that are pipeline parameters: all but the folders, which KFP places."""
    return [name for name, model in sections().items() if model is not Paths]


@functools.cache
def step_sections(step: str) -> tuple[str, ...]:
    """prepare: its DVC stage's params sections (what decides the cached output); the rest: all
    (train logs every setting to MLflow, and they are never cached)."""
    if step != CACHED:
        return tuple(settings_sections())
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][step]
    return tuple(s for s in stage.get("params", []) if s in settings_sections())


def parameter(name: str, annotation: Any, **kw: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                             annotation=annotation, **kw)


@functools.cache
def interface(step: str) -> inspect.Signature:
    """The task's inputs and outputs, the same for the container and the twin."""
    written = WRITES[step]
    parameters = [parameter(a, Input[TYPES.get(a, Artifact)]) for a in READS[step]]
    parameters.append(parameter(written, Output[TYPES.get(written, Artifact)]))
    if step in TRACKS:
        parameters.append(parameter(
            RUN_ID, dsl.OutputPath(str) if TRACKS[step] == "start" else str))
    parameters += [parameter(s, dict) for s in step_sections(step)]
    return inspect.Signature(parameters)


def task_args(step: str, inputs: dict[str, Any]) -> list[str]:
    """`cnn-pipeline <step>`'s arguments, from KFP's placeholders (compiling the
    containers) or from the values themselves (a twin running)."""
    args = []
    for artifact in (*READS[step], WRITES[step]):
        args += ["--set", f"paths.{ARTIFACTS[artifact]}={inputs[artifact].path}"]
    for section in step_sections(step):
        args += ["--set", f"{section}={_text(inputs[section])}"]
    if step in TRACKS:
        args += ["--pending-dir", inputs[WRITES[step]].path]
        args += ["--mlflow-run-out" if TRACKS[step] == "start" else "--mlflow-run",
                 _text(inputs[RUN_ID])]
    return args


def _text(value: Any) -> str:
    return json.dumps(value) if isinstance(value, dict) else str(value)


def run_twin(step: str, **inputs: Any) -> None:
    """A twin's body: the container's command with its arguments, in this interpreter."""
    from cnn_pipeline.cli import main

    main([step, *task_args(step, inputs)])


def _twin_function(step: str):
    signature = interface(step)

    def run(**inputs: Any) -> None:
        run_twin(step, **inputs)

    run.__name__, run.__signature__ = step, signature  # what KFP's executor hands inputs by
    run.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()}
    return run


TWINS = {step: _twin_function(step) for step in STEPS}
