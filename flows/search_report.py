"""What a search shows in MLflow: one parent run per study, the trials' runs marked with their
state, and at the end the pictures and the trials table.

The parent run (`search-<study>`, in the experiment of register.experiment or model_name) is made
when the study is first driven and found again from the study (user attr `mlflow_parent_run`)
when a search is started again. Its params are the search settings (`search.*`, one
`space.<setting>` per searched setting); at the end it gets, under `search/`, Optuna's
optimisation history, parameter importances and parallel-coordinate pictures (matplotlib: no
browser needed), trials.csv and trials.md, the best value as a metric, and tags naming the best
trial, its run and the registered version.

Each trial's run is nested under it by the trial itself (flows/trial.py); here it gets the tag
`search.state` (COMPLETE, PRUNED, FAIL) when its trial ends, and a run cancelled with its
search is marked KILLED.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from components import files, tracking
from components import markdown as md  # this module has a markdown() of its own
from components.params import Params
from flows.study import Handle

PICTURES = {  # file -> Optuna's matplotlib function
    files.HISTORY_PNG: "plot_optimization_history",
    files.IMPORTANCES_PNG: "plot_param_importances",
    files.PARALLEL_PNG: "plot_parallel_coordinate",
}
SUMMARY_COLUMNS = ("trial", "state", "value", "epochs", "seconds")


def _client() -> MlflowClient:
    return MlflowClient(tracking.tracking_uri())


def parent_run(params: Params, handle: Handle, tags: dict[str, str]) -> str:
    """The study's parent run: the one it records when that is still there, else a new one."""
    uri = tracking.tracking_uri()
    tracking.check_reachable(uri)
    client, study = MlflowClient(uri), handle.study
    recorded = study.user_attrs.get("mlflow_parent_run")
    if recorded and study.user_attrs.get("mlflow_uri") == tracking.shown(uri):
        with contextlib.suppress(Exception):
            if client.get_run(recorded).info.lifecycle_stage == "active":
                client.update_run(recorded, status="RUNNING")
                return recorded
    run = client.create_run(
        tracking.experiment_id(client, params), run_name=f"search-{handle.name}",
        tags={**tags, "search.study": handle.name, "search.storage": tracking.shown(handle.url),
              "mlflow.source.name": "flows.search"})
    search = params.search.model_dump(mode="json", exclude={"space", "storage"})
    values = {f"search.{k}": v for k, v in search.items()}
    values |= {f"space.{k}": json.dumps(v) for k, v in params.search.space.items()}
    for key, value in values.items():
        client.log_param(run.info.run_id, key, value)
    study.set_user_attr("mlflow_parent_run", run.info.run_id)
    study.set_user_attr("mlflow_uri", tracking.shown(uri))
    return run.info.run_id


def mark_run(trial, state: str, killed: bool = False) -> None:
    """Tag the trial's MLflow run with its trial's state (no run yet: nothing to tag)."""
    run_id = trial.user_attrs.get("mlflow_run")
    if not run_id:
        return
    try:
        client = _client()
        client.set_tag(run_id, "search.state", state)
        if killed:
            client.set_terminated(run_id, "KILLED")
    except Exception as err:  # the state is in the study; the tag is for browsing
        print(f"could not tag run {run_id} {state}: {err}", file=sys.stderr)


def rows(handle: Handle, best: int | None) -> list[dict[str, Any]]:
    """One row per trial: number, state, value, epochs run, seconds, the sampled settings, its
    MLflow run and Prefect flow run (or process), and why it failed."""
    space = handle.study.user_attrs["settings"]["search"]["space"]
    out = []
    for t in handle.study.get_trials(deepcopy=False):
        run = t.user_attrs.get("run") or {}
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if (
            t.datetime_complete and t.datetime_start) else None
        row = {"trial": t.number, "state": t.state.name,
               "value": None if t.value is None else round(t.value, 6),
               "epochs": max(t.intermediate_values, default=0),
               "seconds": None if seconds is None else round(seconds, 1)}
        row |= {key: t.params.get(key) for key in space}
        row |= {"mlflow_run": t.user_attrs.get("mlflow_run"),
                "run": run.get("flow_run") or (f"pid {run['pid']}" if run else None),
                "note": ("best" if t.number == best else "") or t.user_attrs.get("failure", "")}
        out.append(row)
    return out


def markdown(table: list[dict[str, Any]], title: str) -> str:
    columns = list(table[0]) if table else list(SUMMARY_COLUMNS)
    rows = [[row[c] for c in columns] for row in table]
    return "\n".join([f"## {title}", "", *md.table(columns, rows)]) + "\n"


def publish(params: Params, handle: Handle, parent: str, table: list[dict], best,
            decision: dict | None) -> None:
    """The pictures, the table and the best on the parent run, which is then finished."""
    client, metric = _client(), params.search.metric
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _pictures(handle, folder)
        (folder / files.TRIALS_MD).write_text(markdown(table, f"Study {handle.name}: "
                                                       f"{len(table)} trials, by {metric}"))
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
        (folder / files.TRIALS_CSV).write_text(out.getvalue())
        client.log_artifacts(parent, tmp, "search")
    states = [row["state"] for row in table]
    for state in ("COMPLETE", "PRUNED", "FAIL"):
        client.log_metric(parent, f"trials_{state.lower()}", states.count(state))
    client.log_metric(parent, f"best_{metric}", best.value)
    client.set_tag(parent, "best.trial", str(best.number))
    client.set_tag(parent, "best.mlflow_run", str(best.user_attrs.get("mlflow_run")))
    if decision and decision.get("version"):
        client.set_tag(parent, "registered.version", str(decision["version"]))
    client.set_terminated(parent, "FINISHED")


def _pictures(handle: Handle, folder: Path) -> None:
    """Optuna's pictures of the study; one it cannot draw (too few trials) is left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as views

    for name, function in PICTURES.items():
        try:
            with warnings.catch_warnings():  # "experimental": they are, and they work
                warnings.simplefilter("ignore")
                axes = getattr(views, function)(handle.study)
            figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
            figure.set_size_inches(9, 5)
            figure.tight_layout()
            figure.savefig(folder / name, dpi=100)
        except Exception as err:  # e.g. importances of a study with one completed trial
            print(f"{name} not drawn: {err}", file=sys.stderr)
        finally:
            plt.close("all")


def close_parent(parent: str | None, status: str) -> None:
    if parent:
        with contextlib.suppress(Exception):
            _client().set_terminated(parent, status)
