"""search: `search.parallel` workers optimize one Optuna study; the best trial is registered once.

Reads the settings. Writes the study (flows/search/study.py), `<paths.search>/<study>/trial-<n>/` (a
trial's outputs, trial.log), a model version, and an MLflow parent run `search-<study>` holding
the trials' runs (tag `search.state`) and at the end Optuna's pictures and trials table:
1. `begin`: each value of the space (each choice, both ends of each range) is validated with the
   other settings, naming the key; the study and its run are created or found again.
2. `work`, per worker: Optuna's `optimize` hands out trials; the objective trains each in a child
   process (flows/search/trial.py, which reports every epoch to the pruner). It keeps the budget
   exact, which Optuna does not: a trial beyond it (finished trials and running ones of lower number
   fill it), or on a grid point another trial has (GridSampler repeats points once all are taken),
   ends untrained, `skipped`. A worker stops at the budget of finished (complete or pruned) trials
   or at `search.trials` failed ones, and waits while running trials fill the rest, to take over a
   dead worker's trial (heartbeat: flows/search/study.py).
3. `finish`: a last look until no trial runs (a dead worker's fails with its heartbeat), the
   checkpoints of all but the best removed (unless search.keep_checkpoints), the best
   registered once (recorded in the study; register takes the registry's lock), the report.

    cnn-pipeline search --worker N [--params params.yaml] [--set ...]   # one more worker
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from mlflow import MlflowClient
from mlflow.entities import Param

from components.core import outputs
from components.core.params import Params, UserError, load_params
from components.core.secrets import redact
from components.core.step_code import STEPS
from components.tracking import store
from flows.search import study as studies

WORKER_ENV = "CNN_PIPELINE_SEARCH_WORKER"  # the pid of the process a child dies with
RUNNING = optuna.trial.TrialState.RUNNING
PICTURES = {outputs.HISTORY_PNG: "plot_optimization_history",  # file -> Optuna's function
            outputs.IMPORTANCES_PNG: "plot_param_importances",
            outputs.PARALLEL_PNG: "plot_parallel_coordinate"}
COLUMNS = ("number", "state", "value", "duration", "params", "user_attrs")  # trials table
Run = Callable[[str, list[str], Path], dict[str, Any]]  # (name, command, log) -> trial's result


def preflight(params_file: str, overrides: list[str]) -> Params:
    """The settings, once every value of the space passes with them (naming the key)."""
    params = load_params(params_file, overrides)
    if not params.search.space:
        raise UserError("search.space is empty: give at least one setting to search, e.g. "
                        "--set search.space='{train.lr: {log_uniform: [0.0003, 0.01]}}'")
    for key, spec in params.search.space.items():
        for value in next(iter(spec.values())):
            try:
                load_params(params_file, [*overrides, f"{key}={json.dumps(value)}"])
            except UserError as err:
                raise UserError(f"search.space[{key!r}]: {value!r} is refused with these "
                                f"settings: {err}") from None
    from components.training.models import known_model

    for name in params.search.space.get("model.name", {}).get("choice", []):
        if problem := known_model(name):
            raise UserError(f"search.space['model.name']: {problem}")
    return params


def begin(params_file: str, overrides: list[str], tags: dict[str, str]
          ) -> tuple[Params, optuna.Study, str]:
    """Checked settings, the study and its MLflow parent run, before any worker starts."""
    params = preflight(params_file, overrides)
    study = studies.open_study(params)
    _say(f"study {study.study_name} in {redact(studies.storage_url(params))}: "
         f"{studies.budget(params.search.model_dump())} trials, {params.search.parallel} workers")
    return params, study, parent_run(params, study, tags)


def work(params_file: str, overrides: list[str], worker: int, run: Run | None = None
         ) -> dict[str, Any]:
    """One worker: optimize the study until it has its budget (module docstring, 2.)."""
    params = load_params(params_file, overrides)
    study = studies.open_study(params, worker)
    budget, failures = studies.budget(params.search.model_dump()), params.search.trials

    def room() -> str:
        return settle(study, lambda trials: decide(trials, budget, failures), "wait")

    def after_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if room() == "stop":
            study.stop()

    if room() == "go":
        study.optimize(lambda trial: _objective(trial, params, params_file, overrides,
                                                run or run_child, budget),
                       callbacks=[after_trial], catch=(Exception,))
    return {"study": study.study_name, "worker": worker, "trials": _counts(study)}


def decide(trials: list, budget: int, failures: int) -> str:
    """For a worker between trials: `stop` (the budget is reached, or `failures` trials
    failed), `wait` (running trials take each remaining place) or `go`."""
    finished = sum(t.state in studies.FINISHED for t in trials)
    failed = sum(t.state.name == "FAIL" and not t.user_attrs.get("skipped") for t in trials)
    if finished >= budget or failed >= failures:
        return "stop"
    return "wait" if finished + sum(t.state == RUNNING for t in trials) >= budget else "go"


def settle(study: optuna.Study, look: Callable[[list], Any], again: Any) -> Any:
    """What `look(trials)` says once it is not `again`; between looks, trials whose worker
    stopped beating, or died before its first beat, are failed and their copies queued."""
    while True:
        studies.fail_stale(study)
        if (said := look(study.get_trials(deepcopy=False))) != again:
            return said
        time.sleep(studies.HEARTBEAT_S)


def skip_reason(trials: list, number: int, sampled: dict[str, Any], budget: int, grid: bool
                ) -> str | None:
    """Why trial `number` must not train: beyond the budget (the finished trials and the running
    ones of lower number fill it), or a grid point that a finished or lower trial has."""
    finished = [t for t in trials if t.state in studies.FINISHED]
    ahead = [t for t in trials if t.state == RUNNING and t.number < number]
    if len(finished) + len(ahead) >= budget:
        return f"over the budget: {len(finished)} finished and {len(ahead)} running of {budget}"
    same = [t.number for t in finished + ahead if t.params == sampled]
    return f"the grid point of trial {same[0]}" if grid and same else None


def _objective(trial: optuna.Trial, params: Params, params_file: str, overrides: list[str],
               run: Run, budget: int) -> float:
    studies.begin(trial)
    search, study, number = params.search, trial.study, trial.number
    sampled = {key: suggest(trial, key, spec) for key, spec in search.space.items()}
    name = f"trial-{number} " + " ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sampled.items())
    trial.set_user_attr("mlflow_run", None)  # a retried trial's copy holds the dead trial's
    grid = search.sampler == "grid"
    if reason := skip_reason(study.get_trials(deepcopy=False), number, sampled, budget, grid):
        trial.set_user_attr("skipped", reason)
        _say(f"{name}: not trained, {reason}")
        raise RuntimeError(f"not trained: {reason}")  # a failure that decide() does not count
    folder, extra = trial_settings(params, study.study_name, number, sampled)
    try:
        load_params(params_file, [*overrides, *extra])  # refused here: no process for it
        _say(f"{name}: training")
        result = run(name, [sys.executable, "-m", "flows.search.trial", "--study", study.study_name,
                            "--number", str(number), "--params", params_file,
                            *(f"--set={o}" for o in [*overrides, *extra])],
                     folder / outputs.TRIAL_LOG)
    except BaseException as err:  # Ctrl-C too: a grid's point must not be lost
        trial.set_user_attr("failure", str(err)[:2000] or type(err).__name__)
        _say(f"{name}: failed: {err}")
        if grid and not isinstance(err, UserError):  # its point again (GridSampler counts a
            study.enqueue_trial(trial.params)  # failed point as done)
        raise
    if result["pruned"]:
        _say(f"{name}: {result['pruned']}")
        raise optuna.TrialPruned(result["pruned"])
    _say(f"{name}: {search.metric} {result['value']:.4f}")
    return result["value"]


def trial_settings(params: Params, study: str, number: int, sampled: dict[str, Any]
                   ) -> tuple[Path, list[str]]:
    """A trial's folder, and its overrides: its sampled values, and its own folder for each
    step's output but prepare's (the prepared data is shared)."""
    folder = Path(params.paths.search) / study / f"trial-{number}"
    return folder, [*(f"{key}={json.dumps(value)}" for key, value in sampled.items()),
                    *(f"paths.{step}={(folder / step).as_posix()}" for step in STEPS[1:])]


def suggest(trial: optuna.Trial, key: str, spec: dict[str, list[Any]]) -> Any:
    """The trial's value of one space entry (components.core.params.DISTRIBUTIONS)."""
    kind, values = next(iter(spec.items()))
    if kind == "choice":
        return trial.suggest_categorical(key, values)
    low, high = values
    if kind in ("int", "log_int"):
        return trial.suggest_int(key, int(low), int(high), log=kind == "log_int")
    return trial.suggest_float(key, float(low), float(high), log=kind == "log_uniform")


def run_child(name: str, command: list[str], log: Path) -> dict[str, Any]:
    """`command` (trial `name`'s training) in a child process that dies with this one, its
    stderr appended to `log`: its printed result, or RuntimeError saying how it ended."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as err:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=err,
                              env={**os.environ, WORKER_ENV: str(os.getpid())})
    if done.returncode < 0:
        raise RuntimeError(f"its training process was killed by "
                           f"{signal.Signals(-done.returncode).name} (log {log})")
    if done.returncode != 0:
        said = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
        raise RuntimeError(f"its training process ended with exit code {done.returncode}: "
                           f"{said[0][:500]} (log {log})")
    return json.loads(done.stdout)


def run_workers(params_file: str, overrides: list[str], parallel: int) -> None:
    """`parallel` workers as processes here that die with this one, each with its share of the
    CPU threads (unless OMP_NUM_THREADS says); their messages go to stderr."""
    env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // parallel)), **os.environ,
           WORKER_ENV: str(os.getpid())}
    workers = [subprocess.Popen([sys.executable, "-m", "cnn_pipeline", "search", "--worker", str(i),
                                 "--params", params_file, *(f"--set={o}" for o in overrides)],
                                env=env, stdout=sys.stderr) for i in range(parallel)]
    for i, worker in enumerate(workers):
        if worker.wait():
            _say(f"worker {i} ended with exit code {worker.returncode}")


def finish(params: Params, params_file: str, overrides: list[str], study: optuna.Study,
           parent: str, register: Callable[[Params, list[str]], dict]) -> dict[str, Any]:
    """Module docstring, 3. `register(settings, overrides)` registers the model of the trial
    with those settings (`overrides`: all of them, the trial's last)."""
    settle(study, lambda trials: any(t.state == RUNNING for t in trials), True)
    _mark_runs(trials := study.get_trials(deepcopy=False))
    if not any(t.state.name == "COMPLETE" for t in trials):
        with contextlib.suppress(Exception):
            _client().set_terminated(parent, "FAILED")
        reasons = {str(t.user_attrs.get("failure")) for t in trials} - {"None"}
        raise UserError(f"no trial of study {study.study_name} completed ({len(trials)} trials); "
                        f"failures: {'; '.join(sorted(reasons))[:2000] or 'none'}")
    best = study.best_trial
    if not params.search.keep_checkpoints:
        for folder in (Path(params.paths.search) / study.study_name).glob("trial-*"):
            if folder.name != f"trial-{best.number}":
                shutil.rmtree(folder / "train" / outputs.CHECKPOINTS, ignore_errors=True)
    decision = study.user_attrs.get("registered")
    if not decision or decision.get("trial") != best.number:  # else registered when it ended
        given = [*overrides, *trial_settings(params, study.study_name, best.number,
                                             best.params)[1]]
        decision = {"trial": best.number, **register(load_params(params_file, given), given)}
        study.set_user_attr("registered", {k: decision.get(k) for k in (
            "trial", "model_name", "version", "promoted", "run_id", "flow_run")})
    _publish(params, study, parent, decision)
    return {"study": study.study_name, "storage": redact(studies.storage_url(params)),
            "trials": _counts(study), "registered": decision, "rows": json.loads(
                study.trials_dataframe(attrs=COLUMNS).to_json(orient="records")),
            "best": {"trial": best.number, "value": best.value, "params": best.params,
                     "mlflow_run": best.user_attrs.get("mlflow_run")}, "mlflow_parent_run": parent}


def _counts(study: optuna.Study) -> dict[str, int]:
    return dict(Counter("SKIPPED" if t.user_attrs.get("skipped") else t.state.name
                        for t in study.get_trials(deepcopy=False)))


def _client() -> MlflowClient:
    return MlflowClient(store.tracking_uri())


def parent_run(params: Params, study: optuna.Study, tags: dict[str, str]) -> str:
    """The study's parent run: the one it records when that is still there, else a new one
    with the search settings as params (`search.*`, `space.<key>`)."""
    store.check_reachable(store.tracking_uri())
    client, recorded = _client(), study.user_attrs.get("mlflow_parent_run")
    if recorded:  # not this server's (a new MLFLOW_TRACKING_URI): not found, a new one
        with contextlib.suppress(Exception):
            if client.get_run(recorded).info.lifecycle_stage == "active":
                client.update_run(recorded, status="RUNNING")
                return recorded
    run = client.create_run(store.experiment_id(client, params),
                            run_name=f"search-{study.study_name}",
                            tags={**tags, "search.study": study.study_name,
                                  "mlflow.source.name": "flows.search.workers"}).info.run_id
    search = params.search.model_dump(mode="json", exclude={"space", "storage"})
    client.log_batch(run, params=[Param(f"search.{k}", str(v)) for k, v in search.items()] + [
        Param(f"space.{k}", json.dumps(v)) for k, v in params.search.space.items()])
    study.set_user_attr("mlflow_parent_run", run)
    if (kept := study.user_attrs["mlflow_parent_run"]) != run:  # another search's, at once
        client.delete_run(run)
    return kept


def _mark_runs(trials: list) -> None:
    """Each trial's run tagged with its trial's state; a failed trial's run that MLflow still
    has running (its process died) ended KILLED."""
    client = _client()
    for trial in trials:
        if run := trial.user_attrs.get("mlflow_run"):
            with contextlib.suppress(Exception):  # a deleted run: the study has the state
                client.set_tag(run, "search.state", trial.state.name)
                if trial.state.name == "FAIL" and client.get_run(run).info.status == "RUNNING":
                    client.set_terminated(run, "KILLED")


def _publish(params: Params, study: optuna.Study, parent: str, decision: dict) -> None:
    """Optuna's pictures and trials table, the counts and the best on the parent run, which is
    then finished."""
    import matplotlib

    matplotlib.use("Agg")  # no display: draw into files
    from optuna.visualization import matplotlib as views

    client, best = _client(), study.best_trial
    for name, function in PICTURES.items():
        try:
            axes = getattr(views, function)(study)
            figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
            figure.set_size_inches(9, 5)
            client.log_figure(parent, figure, f"search/{name}", save_kwargs={"dpi": 100,
                                                                           "bbox_inches": "tight"})
        except Exception as err:  # e.g. importances of a study with one completed trial
            _say(f"{name} not drawn: {err}")
    client.log_text(parent, study.trials_dataframe(attrs=COLUMNS).to_csv(index=False),
                    f"search/{outputs.TRIALS_CSV}")
    for key, value in {f"best_{params.search.metric}": best.value, **{
            f"trials_{state.lower()}": n for state, n in _counts(study).items()}}.items():
        client.log_metric(parent, key, value)
    for key, value in {"best.trial": best.number, "registered.version": decision.get("version"),
                       "best.mlflow_run": best.user_attrs.get("mlflow_run")}.items():
        client.set_tag(parent, key, str(value))
    client.set_terminated(parent, "FINISHED")


def _say(message: str) -> None:
    """To stderr (stdout is a command's JSON), which a flow's log_prints sends to its log."""
    print(message, file=sys.stderr, flush=True)
