"""sweep: a hyperparameter search over a training deployment's workers, or on this machine.

search.method (params.yaml's `search` section) says which:
- `optuna`: an Optuna study of `search.trials` trials sampled from `search.space`, `search.parallel`
  at a time, pruned, resumable, registered once: flows/search.py. In this flow each trial is a
  child run of `deployment`; `python -m flows.sweep` runs the same search here, each trial in a
  process of its own (flows/launchers.py).
- `grid` (below): the flow's `lrs` × `models` grid.

    python -m flows.sweep --set search.method=optuna [--params params.yaml] [--set ...]
    prefect deployment run 'sweep/digits' --params '{"search": {"method": "optuna"}}'

The grid: a learning rate × model grid, fanned out as child runs of a training deployment.

Each grid point is a run of `deployment` (default training-pipeline/digits) started with
`run_deployment`, so the pool's workers share them out; each child writes under its own output
folders (outputs/sweep/<sweep run>/<point>/...) and skips the register gate. Before fanning out,
the sweep prepares the data once with the children's data settings, so children on the same host
find prepare cached instead of preparing side by side.

When all children are done: a comparison table (a markdown artifact `sweep-comparison`, and an
MLflow parent run holding it, with the children's MLflow runs nested under it), and only the best
child, by `register.primary_metric`, goes through the register gate: in place, reusing its MLflow
run, when its files are on this host; otherwise as one more run of the deployment with the same
settings (training resumes or, on another host, repeats deterministically).

One training per GPU: start each GPU worker with `--limit 1`, or cap the train task's tag across
pools with `prefect concurrency-limit create train <number of GPUs>`.
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from prefect import flow, get_client, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.deployments import run_deployment
from prefect.runtime import flow_run

from components import cli, markdown, tracking
from components.params import DEFAULT_PARAMS, Params, UserError
from flows import search
from flows.launchers import PrefectLauncher, ProcessLauncher
from flows.pipeline import prepared_data, register_best
from flows.run_tags import flow_run_tags
from flows.settings import from_parameters, given, with_sections

ARTIFACT_KEY = "sweep-comparison"
COLUMNS = ("point", "state", "model", "lr", "accuracy", "macro_f1", "loss", "epochs",
           "flow_run", "mlflow_run")


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(out.get(key), dict) and isinstance(
            value, dict) else value
    return out


def _deployment_parameters(name: str) -> dict[str, Any]:
    with get_client(sync_client=True) as client:
        return dict(client.read_deployment_by_name(name).parameters or {})


def _point_name(model: str, lr: float) -> str:
    return f"{model}-lr{lr:g}"


def _child_parameters(base: dict, model: str, lr: float, folder: str, parent: str) -> dict:
    paths = {step: f"{folder}/{_point_name(model, lr)}/{step}" for step in search.STEP_FOLDERS}
    return _merge(base, {"model": {"name": model}, "train": {"lr": lr}, "paths": paths,
                         "skip_register": True, "mlflow_parent_run": parent})


@flow(name="sweep", log_prints=True)
@with_sections
def sweep(
    deployment: str = "training-pipeline/digits",
    lrs: list[float] = [0.001, 0.003],  # noqa: B006 (Prefect copies parameters)
    models: list[str] = ["simple_cnn", "cifar_cnn"],  # noqa: B006
    params_file: str = DEFAULT_PARAMS,
    overrides: list[str] = [],  # noqa: B006
    register_best: bool = True,
    **sections: Any,
) -> dict[str, Any]:
    """A search (search.method optuna) or a grid (grid: every (model, lr) pair) of child runs
    of `deployment`; only the best is registered.

    Args:
        deployment: the training deployment the children run (flow/deployment).
        lrs: learning rates of the grid (search.method grid).
        models: model names of the grid (built-ins or timm names).
        params_file: the settings file the children read.
        overrides: `section.key=value` for every child, as on the command line.
        register_best: send the best child through the register gate.
        sections: per params.yaml section, overrides for every child (on top of the
            deployment's; model.name and train.lr come from the grid).
    """
    logger = get_run_logger()
    base = _merge(_deployment_parameters(deployment), {"params_file": params_file,
                                                      **given(**sections)})
    if overrides:
        base["overrides"] = [*base.get("overrides", []), *overrides]
    params = from_parameters(base)
    if params.search.method == "optuna":
        launcher = PrefectLauncher(deployment, base, str(flow_run.id), flow_run.name)
        return search.run(params, launcher, register_best=register_best)
    prepared_data(params)
    client, parent = _parent_run(params)
    folder = f"outputs/sweep/{flow_run.name}"
    points = [(m, lr) for m in models for lr in lrs]
    children = {}
    for model, lr in points:
        parameters = _child_parameters(base, model, lr, folder, parent)
        children[(model, lr)] = (parameters, run_deployment(
            deployment, parameters=parameters, flow_run_name=f"{flow_run.name}/"
            f"{_point_name(model, lr)}", timeout=0, tags=["sweep"]))
    logger.info("started %d child runs of %s", len(children), deployment)
    rows = []
    finished = _wait([child.id for _, child in children.values()])
    for (model, lr), (_, child) in children.items():
        rows.append(_row(client, parent, model, lr, finished[child.id]))
    metric = params.register.primary_metric
    best = _best(rows, metric)
    decision = None
    if best is not None and register_best:
        decision = _register(deployment, children[(best["model"], best["lr"])][0])
    table = comparison_markdown(rows, best, metric, decision)
    _finish_parent(client, parent, rows, table, best, metric)
    create_markdown_artifact(key=ARTIFACT_KEY, markdown=table,
                             description=f"{len(rows)} runs of {deployment}")
    if best is None:
        raise RuntimeError(f"no child run of {deployment} completed with metrics; see the table")
    return {"rows": rows, "best": best, "registered": decision, "mlflow_parent_run": parent}


def _wait(ids: list, poll_s: float = 2.0) -> dict:
    """The flow runs, once every one of them is in a final state."""
    logger, pending, done = get_run_logger(), set(ids), {}
    with get_client(sync_client=True) as client:
        while pending:
            for run_id in list(pending):
                run = client.read_flow_run(run_id)
                if run.state is not None and run.state.is_final():
                    logger.info("child %s ended %s", run.name, run.state.name)
                    done[run_id] = run
                    pending.discard(run_id)
            if pending:
                time.sleep(poll_s)
    return done


def _parent_run(params: Params) -> tuple[MlflowClient, str]:
    uri = tracking.tracking_uri()
    tracking.check_reachable(uri)
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(tracking.experiment_id(client, params),
                            run_name=f"sweep-{flow_run.name}", tags=flow_run_tags())
    return client, run.info.run_id


def _row(client: MlflowClient, parent: str, model: str, lr: float, child) -> dict[str, Any]:
    experiment = client.get_run(parent).info.experiment_id
    found = client.search_runs([experiment], max_results=1,
                               filter_string=f"tags.`prefect.flow_run_id` = '{child.id}'")
    metrics = found[0].data.metrics if found else {}
    return {
        "point": _point_name(model, lr), "state": child.state.name if child.state else "?",
        "model": model, "lr": lr,
        "accuracy": metrics.get("accuracy"), "macro_f1": metrics.get("macro_f1"),
        "loss": metrics.get("loss"),
        "epochs": found[0].data.params.get("train.epochs") if found else None,
        "flow_run": str(child.id), "mlflow_run": found[0].info.run_id if found else None,
        "metrics": metrics,
    }


def _best(rows: list[dict], metric: str) -> dict | None:
    scored = [r for r in rows if r["state"] == "Completed" and _metric(r, metric) is not None]
    return max(scored, key=lambda r: _metric(r, metric), default=None)


def _metric(row: dict, metric: str) -> float | None:
    """`metric` as evaluate logged it (its names differ slightly), else accuracy."""
    names = (metric, {"f1_macro": "macro_f1"}.get(metric, metric), "accuracy")
    return next((row["metrics"][n] for n in names if n in row["metrics"]), None)


def _register(deployment: str, parameters: dict) -> dict[str, Any]:
    """The register gate for the best child: here when its files are here, else as a run."""
    return register_best(from_parameters(parameters), deployment,
                         {**parameters, "skip_register": False},
                         f"{flow_run.name}/register-best", ["sweep"])


def comparison_markdown(rows: list[dict], best: dict | None, metric: str,
                        decision: dict | None) -> str:
    cells = []
    for row in sorted(rows, key=lambda r: -(_metric(r, metric) or -1)):
        mark = " **best**" if best is not None and row["point"] == best["point"] else ""
        cells.append([markdown.cell(row["point"]) + mark, *(row[c] for c in COLUMNS[1:])])
    lines = [f"## Sweep: {len(rows)} runs, best by {metric}", "", *markdown.table(COLUMNS, cells)]
    if best is None:
        lines += ["", "No run completed with metrics: nothing went to the register gate."]
    elif decision is not None:
        lines += ["", f"Register gate for **{best['point']}**: "
                  f"`{json.dumps(decision, default=str)[:400]}`"]
    return "\n".join(lines) + "\n"


def _finish_parent(client, parent, rows, table, best, metric) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "comparison.md").write_text(table)
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        (Path(tmp) / "comparison.csv").write_text(out.getvalue())
        client.log_artifacts(parent, tmp, "sweep")
    client.log_param(parent, "points", len(rows))
    if best is not None:
        client.set_tag(parent, "best.point", best["point"])
        client.set_tag(parent, "best.mlflow_run", str(best["mlflow_run"]))
        value = _metric(best, metric)
        client.log_metric(parent, f"best_{metric}", value)
    client.set_terminated(parent, "FINISHED" if best is not None else "FAILED")



def main(argv: list[str] | None = None) -> None:
    """The search on this machine, each trial in a process of its own: what a laptop runs."""
    args = cli.parser("python -m flows.sweep", __doc__).parse_args(argv)
    with cli.user_errors():
        params = cli.load(args)
        if params.search.method != "optuna":
            raise UserError(
                "search.method is grid: the grid runs as the sweep flow over a Prefect pool "
                "(prefect deployment run 'sweep/digits'); to search here, "
                "--set search.method=optuna")
        launcher = ProcessLauncher(args.params, args.overrides, params.search.parallel)
        summary = search.run(params, launcher)
    cli.show(summary)


if __name__ == "__main__":
    main()
