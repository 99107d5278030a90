"""training-pipeline: prepare → augment → train → evaluate → register → export as Prefect tasks.

The tasks call the same step functions, with the same validated settings, as the DVC stages
(`cnn-pipeline <step>`), and track into one MLflow run the same way the command line does, so a
flow run and `dvc repro` of the same params give the same outputs.

Parameters: `params_file`; per params.yaml section, typed overrides (a form in the Prefect UI;
empty fields keep the file's values); `overrides`, `section.key=value` strings as on the command
line (null, lists and mappings too); all validated together like the file (flows/parameters.py).
`skip_register` leaves out the register gate and export.

- prepare is cached on what decides its output (flows/prepare_cache.py); a cached result counts
  only while the prepared folder still holds the same data.
- train resumes from its last checkpoint when retried or re-run (train.resume: auto).
- evaluate, register and export talk to MLflow: retried with exponential backoff. register makes
  at most one model version per training run however often it is retried (the step checks the
  registry).
- Each run leaves a markdown artifact `training-summary`: metrics, registry decision, MLflow run.

    prefect deployment run 'training-pipeline/digits' --watch     # on a worker (prefect.yaml)
    cnn-pipeline pipeline [--params params.yaml] [--set train.epochs=1 ...]   # here, now
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from prefect.tasks import exponential_backoff

from components import augment as augment_step
from components import evaluate as evaluate_step
from components import export as export_step
from components import prepare as prepare_step
from components import register as register_step
from components import train as train_step
from components.core import outputs
from components.core.params import DEFAULT_PARAMS, Params, UserError
from components.data.dataset import class_names, read_manifest
from components.tracking.run import tracked
from flows import prepare_cache, run_tags
from flows.parameters import resolve, run_form, with_sections

ARTIFACT_KEY = "training-summary"


def retry_unless_user_error(task, task_run, state) -> bool:
    """A UserError (bad settings or data) fails the same way every time: do not retry it."""
    try:
        state.result()
    except UserError:
        return False
    except Exception:
        return True
    return True


def _prepare_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    return prepare_cache.cache_key(parameters["params"])


# JSON, not Prefect's default pickle: a cache hit reads this back, and shared result storage
# must not be a way to run code on every worker.
@task(name="prepare", cache_key_fn=_prepare_key, persist_result=True, result_serializer="json")
def prepare_data(params: Params) -> dict[str, Any]:
    """Prepare, unless DVC already holds this output (e.g. fetched by a worker's `dvc pull`) or
    can fetch it from its remote by content hash; push what was made when there is a remote."""
    logger = get_run_logger()
    as_dvc = prepare_cache.dvc_stage(params)
    if as_dvc and prepare_cache.dvc_up_to_date():
        logger.info("%s is what dvc.lock records for these inputs: not prepared again",
                    params.paths.prepared)
        return {**_prepared(params), "reused": True}
    remote = prepare_cache.dvc_remote() if as_dvc else None
    if not remote:
        prepare_step.prepare(params)
        return _prepared(params)
    how = prepare_cache.repro()
    logger.info("%s %s through DVC; pushing it to DVC remote %s", params.paths.prepared,
                "restored from the run cache" if how == "pulled" else "prepared", remote)
    prepare_cache.push()
    return {**_prepared(params), "reused": how == "pulled"}


def _prepared(params: Params) -> dict[str, Any]:
    manifest = read_manifest(params.paths.prepared)
    return {"path": str(params.paths.prepared), "classes": class_names(manifest),
            "counts": manifest["num"], "hashes": manifest["hashes"],
            "duplicates": manifest["duplicates_across_splits"]["count"]}


@task(name="augment", cache_policy=NO_CACHE)
def augment_policy(params: Params) -> dict[str, Any]:
    return asdict(augment_step.augment(params))


# The steps after train, which need MLflow: a server away for a moment is waited for (3 tries).
MLFLOW_RETRIES = dict(retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2),
                      retry_jitter_factor=0.5, retry_condition_fn=retry_unless_user_error)


@task(name="train", cache_policy=NO_CACHE, tags=["train"], retries=1, retry_delay_seconds=5,
      retry_condition_fn=retry_unless_user_error)
def train_model(params: Params) -> dict[str, Any]:
    """A new MLflow run is named after this flow run and tagged with it."""
    tags = run_tags.flow_run_tags()
    return asdict(tracked(train_step.train, "start", run_name=tags["prefect.flow_run_name"],
                          run_tags=tags)(params))


@task(name="evaluate", cache_policy=NO_CACHE, **MLFLOW_RETRIES)
def evaluate_model(params: Params) -> dict[str, Any]:
    return asdict(tracked(evaluate_step.evaluate)(params))


@task(name="register", cache_policy=NO_CACHE, **MLFLOW_RETRIES)
def register_model(params: Params) -> dict[str, Any]:
    return asdict(tracked(register_step.register)(params))


@task(name="export", cache_policy=NO_CACHE, **MLFLOW_RETRIES)
def export_model(params: Params) -> dict[str, Any]:
    return asdict(tracked(export_step.export)(params))


def register_best(params: Params, deployment: str, parameters: dict[str, Any], run_name: str,
                  tags: list[str]) -> dict[str, Any]:
    """The register gate, then export, for the run a search or sweep chose: in this process when
    its files are on this host (returns register's decision), else as one more run of
    `deployment` with `parameters`, named `run_name` (train resumes there, or repeats exactly;
    returns that flow run's id and state)."""
    if (Path(params.paths.evaluate) / outputs.METRICS).is_file():
        decision = register_model(params)
        export_model(params)  # as the training pipeline does after register
        return decision
    from prefect.deployments import run_deployment

    rerun = run_deployment(deployment, parameters=parameters, flow_run_name=run_name, tags=tags)
    if rerun.state is None or not rerun.state.is_completed():
        raise RuntimeError(f"{run_name}, the register run of the best, ended {rerun.state}")
    return {"flow_run": str(rerun.id), "state": rerun.state.name}


def prepared_data(params: Params) -> tuple[dict[str, Any], str]:
    """The prepare task's result and how it came: ran, cached, or pulled (by DVC)."""
    state = prepare_data(params, return_state=True)
    result = state.result()
    if state.name != "Cached":
        return result, "pulled" if result.get("reused") else "ran"
    if prepare_cache.still_valid(result, params):
        return result, "cached"
    get_run_logger().info("cached prepare result, but %s no longer holds that data: preparing "
                          "again (or fetching it from the DVC remote)", params.paths.prepared)
    result = prepare_data.with_options(refresh_cache=True)(params)
    return result, "pulled" if result.get("reused") else "ran"


@run_form("search")  # the search's settings: the sweep's form has them
@flow(name="training-pipeline", log_prints=True)
@with_sections
def training_pipeline(
    params_file: str = DEFAULT_PARAMS,
    overrides: list[str] = [],  # noqa: B006 (Prefect copies parameters)
    skip_register: bool = False,
    **sections: Any,
) -> dict[str, Any]:
    """Prepare, augment, train, evaluate and register a CNN image classifier.

    Args:
        params_file: the settings file, relative to the project folder.
        overrides: `section.key=value` as on the command line (`model.checkpoint=null`).
        skip_register: train and evaluate only.
        sections: one per params.yaml section (paths, data, augment, model, train, evaluate,
            register, ...): its overrides; empty fields keep the file's values.
    """
    params = resolve(params_file, overrides, **sections)
    prepared, how = prepared_data(params)
    augment_policy(params)
    trained = train_model(params)
    evaluated = evaluate_model(params)
    decision = None if skip_register else register_model(params)
    exported = None if skip_register else export_model(params)
    summary = _summary(params, how, prepared, trained, evaluated, decision) | {"onnx": exported}
    _publish(summary)
    return summary


def _summary(params, how, prepared, trained, evaluated, decision) -> dict[str, Any]:
    metrics = {k: v for k, v in evaluated.items() if isinstance(v, int | float)}
    return {
        "model": params.model.name,
        "prepare": how,
        "data_hashes": prepared.get("hashes"),
        "epochs": trained["epochs"],
        "resumed_from": trained["resumed_from"],
        "metrics": metrics,
        "registered": decision,
        "mlflow": run_tags.run_info(params),
    }


def _publish(summary: dict[str, Any]) -> None:
    create_markdown_artifact(key=ARTIFACT_KEY, markdown=summary_markdown(summary),
                             description="Metrics, registry decision and MLflow run")


def summary_markdown(summary: dict[str, Any]) -> str:
    lines = [f"## {summary['model']}: {summary['epochs']} epochs", "",
             "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
              for k, v in summary["metrics"].items()]
    lines += ["", f"prepare: {summary['prepare']}; resumed from epoch {summary['resumed_from']}",
              ""]
    decision = summary["registered"]
    if decision is None:
        lines.append("**Registry:** skipped (`skip_register`).")
    else:
        lines.append("**Registry:** " + run_tags.describe_decision(decision))
    onnx = summary.get("onnx")
    if onnx:
        lines += ["", f"**ONNX:** parity {'passed' if onnx['passed'] else '**FAILED**'} "
                  f"(max |Δp| {onnx['max_abs_diff']:.2g}, top-1 agreement "
                  f"{onnx['top1_agreement']:.4f} on {onnx['images']} test images)"]
    run = summary["mlflow"]
    if run and run["url"].startswith(("http://", "https://")):
        lines += ["", f"**MLflow run:** [{run['run_id']}]({run['url']})"]
    elif run:
        lines += ["", f"**MLflow run:** `{run['run_id']}` in `{run['tracking_uri']}` "
                  f"(`mlflow ui --backend-store-uri {run['tracking_uri']}` shows it)"]
    return "\n".join(lines) + "\n"


def run_here(params_file: str, overrides: list[str], skip_register: bool = False) -> dict:
    """The flow in this process (`cnn-pipeline pipeline`): Prefect starts a temporary server for
    the run when PREFECT_API_URL names none."""
    # Its telemetry service printed an error, or a 50-line traceback when its database write
    # failed as the server stopped: a run here reports nothing to Prefect.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    return training_pipeline(params_file, overrides, skip_register=skip_register)
