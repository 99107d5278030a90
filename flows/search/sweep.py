"""sweep: a hyperparameter search (flows/search/workers.py) over a Prefect pool, or on this machine.

- `sweep` (deployment `sweep/digits`): checks the space, prepares the data once, opens the study
  and its MLflow parent run, starts `search.parallel` runs of `search-worker/<its deployment's
  name>` on the pool and waits for them (task runs `worker-<i>`, each holding its worker's flow
  run), registers the best trial and leaves a `search-trials` table artifact.
- `search-worker`: one worker (also one more, started by hand): the prepared data (cached where
  the sweep made it), then trials of the study, each a task run `trial-<n> <its settings>`.
- `cnn-pipeline search`: the same search, its workers processes here that die with it.

    cnn-pipeline search [--params params.yaml] [--set search.trials=8 ...]
    prefect deployment run 'sweep/digits' --params '{"search": {"trials": 8}}'
"""

from __future__ import annotations

import functools
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow, task, unmapped
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.deployments import run_deployment
from prefect.runtime import deployment, flow_run

from components.core import outputs
from components.core.lifetime import die_with_parent
from components.core.params import DEFAULT_PARAMS, Params, load_params
from components.export import export
from components.register import register
from components.tracking.run import tracked
from flows import prepare_cache
from flows.parameters import override_list, with_sections
from flows.pipeline import prepared_data, register_best
from flows.run_tags import flow_run_tags
from flows.search import workers as search

trial_task = task(search.run_child, name="trial", task_run_name="{name}", cache_policy=NO_CACHE)


@flow(name="sweep", log_prints=True)
@with_sections
def sweep(params_file: str = DEFAULT_PARAMS,
          overrides: list[str] = [],  # noqa: B006 (Prefect copies parameters)
          **sections: Any) -> dict[str, Any]:
    """A hyperparameter search: `search.parallel` workers on this deployment's pool optimize
    one Optuna study of `search.space`; the best trial goes through the register gate.

    Args:
        params_file: the settings file, relative to the project folder.
        overrides: `section.key=value` as on the command line (`search.space={...}`).
        sections: one per params.yaml section (search, train, model, ...): its overrides;
            empty fields keep the file's values.
    """
    given = [*override_list(**sections), *overrides]
    params, study, parent = search.begin(params_file, given, flow_run_tags())
    prepared_data(params)
    if deployment.name:
        workers = range(params.search.parallel)
        start_worker.map(f"search-worker/{deployment.name}", params_file, unmapped(given),
                         [f"{flow_run.name}/worker-{i}" for i in workers], workers).result()
    else:  # called as a function, not a deployment: its workers are processes here
        search.run_workers(params_file, given, params.search.parallel)
    summary = search.finish(params, params_file, given, study, parent,
                            functools.partial(_register, params_file))
    best = summary["best"]
    create_table_artifact(key="search-trials", table=summary["rows"], description=(
        f"Study {study.study_name}: best trial {best['trial']} ({best['value']:.4f}), "
        f"model version {summary['registered'].get('version')}"))
    return summary


@task(name="worker", task_run_name="worker-{worker}", cache_policy=NO_CACHE)
def start_worker(name: str, params_file: str, overrides: list[str], run_name: str,
                 worker: int) -> None:
    """A run of the worker deployment `name`, waited for (it shows inside this task run)."""
    run_deployment(name, parameters={"params_file": params_file, "overrides": overrides,
                                     "worker": worker}, flow_run_name=run_name, tags=["search"])


@flow(name="search-worker", log_prints=True)
def search_worker(worker: int = 0, params_file: str = DEFAULT_PARAMS,
                  overrides: list[str] = []) -> dict[str, Any]:  # noqa: B006
    """One worker of a search: trains trials of the study of these settings (`params_file`
    with `overrides`) until it has its budget; `worker` seeds its sampler."""
    prepared_data(load_params(params_file, overrides))
    return search.work(params_file, overrides, worker, run=trial_task)


def _register(params_file: str, params: Params, overrides: list[str]) -> dict[str, Any]:
    """The register gate for the best trial: here when its files are on this host, else as a
    run of training-pipeline/<this deployment's name> with its settings."""
    return register_best(params, f"training-pipeline/{deployment.name or 'digits'}", {
        "params_file": params_file, "overrides": overrides}, f"{flow_run.name}/register-best",
        ["search"])


def _register_here(params: Params, overrides: list[str]) -> dict[str, Any]:  # no Prefect
    decision = asdict(tracked(register)(params))
    tracked(export)(params)  # as the training pipeline does after register
    return decision


def run_here(params_file: str, overrides: list[str], worker: int | None = None) -> dict:
    """The search on this machine (`cnn-pipeline search`), its workers processes of their own
    that die with it: what a laptop runs. With `worker`, one more worker of that number for the
    search these settings name, in this process."""
    if worker is not None:
        die_with_parent(search.WORKER_ENV)  # a worker that run_workers started ends with it
        return search.work(params_file, overrides, worker)
    params, study, parent = search.begin(params_file, overrides, {})
    prepare_cache.prepare_unless_made(params, Path(params.paths.search) / outputs.PREPARED_KEY)
    search.run_workers(params_file, overrides, params.search.parallel)
    summary = search.finish(params, params_file, overrides, study, parent, _register_here)
    return {k: v for k, v in summary.items() if k != "rows"}
