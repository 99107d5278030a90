"""search: an Optuna study over training trials, `search.parallel` at a time, pruned, resumable,
registered once.

Reads the settings (the `search` section: space, trials, parallel, metric, sampler, pruner,...).
Writes the study (flows/study.py says where), one folder per trial,
`<paths.search>/<study>/trial-<n>/{augment,train,evaluate,register,export}`, an MLflow parent run
with every trial's run nested under it (flows/search_report.py), and one model version: the best
trial's, through the register gate.

How it goes:
1. Before any trial: every value the space can give (each choice, both ends of each range) is
   validated with the rest of the settings exactly like a user's run, and model names are looked
   up; the study is created or found again (same settings) and this search takes its lease (a
   study that another live search drives is refused, naming that search).
2. Recovery, when the study has running trials of a search that was killed: a trial whose run
   ended is concluded as usual; a run still going is cancelled (through Prefect, or its process
   group) and its trial marked failed (user attr `cancelled`). Their places are taken by new
   trials: the budget counts finished trials (complete or pruned), not failed ones.
3. Trials: `study.ask()`, a value per space key, the trial's settings validated, and a run started
   by the launcher (flows/launchers.py: a run of the training deployment through a Prefect pool,
   or a local process). Each run reports its metric every epoch through the study's storage and
   the pruner may stop it (flows/trial.py). A run that ends having trained and evaluated
   completes its trial with its best epoch's value; any other end fails it, with the reason in
   the trial (user attr `failure`). The search stops launching after `search.trials` failures.
4. The end: the checkpoints of every trial but the best are removed (unless
   search.keep_checkpoints), the best trial goes through the register gate once (recorded in the
   study, so a search started again after it ended registers nothing new), and the parent run gets
   the pictures and the trials table (Prefect gets a table artifact too).

    python -m flows.sweep --set search.method=optuna [--set search.trials=8 ...]   # here
    prefect deployment run 'sweep/digits' --params '{"search": {"method": "optuna"}}'  # a pool
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from components import files
from components.params import Params, UserError
from components.step_code import STEPS
from components.tracking import shown
from flows import search_report, study
from flows.launchers import Launcher

POLL_S = 2.0  # between looks at the running trials: each look is a few small queries
CANCEL_WAIT_S = 180.0  # for cancelled runs to end before their places are used again
STEP_FOLDERS = STEPS[1:]  # a trial's own folders: every step's but prepare's (shared)


def run(params: Params, launcher: Launcher, sampler=None, register_best: bool = True
        ) -> dict[str, Any]:
    """The whole search (module docstring); `sampler` replaces search.sampler's (a benchmark's
    grid). Returns the best trial, the registry's decision and the counts."""
    preflight(params, launcher)
    handle = study.open_study(params, sampler)
    with study.Lease(handle, study.me(launcher.flow_run)):
        _say(f"study {handle.name} in {shown(handle.url)}: {params.search.trials} trials, "
             f"{params.search.parallel} at a time")
        parent = search_report.parent_run(params, handle, launcher.tags())
        recover(handle, launcher)
        launcher.prepare(params)
        drive(handle, params, launcher, parent)
        return finish(handle, params, launcher, parent, register_best)


def preflight(params: Params, launcher: Launcher) -> None:
    """Refuse, before any trial, a space value these settings refuse (naming the key)."""
    search = params.search
    if not search.space:
        raise UserError("search.space is empty: give at least one setting to search, e.g. "
                        "--set search.space='{train.lr: {log_uniform: [0.0003, 0.01]}}'")
    for key, spec in search.space.items():
        for value in next(iter(spec.values())):
            try:
                launcher.settings([f"{key}={json.dumps(value)}"])
            except UserError as err:
                raise UserError(f"search.space[{key!r}]: {value!r} is refused with these "
                                f"settings: {err}") from None
    names = search.space.get("model.name", {}).get("choice", [params.model.name])
    unknown = [n for n in names if not _known_model(n)]
    if unknown:
        key = "search.space['model.name']" if "model.name" in search.space else "model.name"
        raise UserError(f"{key}: unknown model {', '.join(unknown)}: use a built-in "
                        "(simple_cnn, lenet5, cifar_cnn, resnet_cifar) or a timm model name")


def _known_model(name: str) -> bool:
    import timm

    import components.models  # noqa: F401 (registers the built-ins with timm)

    return timm.is_model(name)


def recover(handle: study.Handle, launcher: Launcher) -> None:
    """Conclude or cancel the running trials a killed search left (module docstring, 2.)."""
    from optuna.trial import TrialState

    cancelled = {}
    for trial in handle.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        run = trial.user_attrs.get("run")
        note = launcher.ended(run) if run else "its search stopped before starting it"
        if note is not None:
            conclude(handle, trial.number, note)
            continue
        launcher.cancel(run)
        cancelled[trial.number] = run
        _say(f"trial {trial.number}: its run was still going after its search stopped; "
             f"cancelling it ({launcher.describe(run)})")
    deadline = time.monotonic() + CANCEL_WAIT_S
    while any(launcher.ended(run) is None for run in cancelled.values()):
        if time.monotonic() > deadline:
            _say(f"cancelled runs still going after {CANCEL_WAIT_S:.0f} s; going on")
            break
        time.sleep(POLL_S)
    for number in cancelled:  # after they ended: their runs' last words do not overwrite ours
        conclude(handle, number, "cancelled: the search that started it was stopped",
                 cancelled=True)


def drive(handle: study.Handle, params: Params, launcher: Launcher, parent: str | None) -> None:
    """Keep `search.parallel` trials running until `search.trials` have finished."""
    search, running = params.search, {}
    try:
        while True:
            for number, run in list(running.items()):
                note = launcher.ended(run)
                if note is not None:
                    conclude(handle, number, note)
                    del running[number]
            finished, failed = _counts(handle)
            while (failed < search.trials and finished + len(running) < search.trials
                   and len(running) < search.parallel):
                number, run = launch(handle, params, launcher, parent)
                if run is None:
                    failed += 1
                else:
                    running[number] = run
            if not running:
                return
            time.sleep(POLL_S)
    except BaseException:
        # Stopped (Ctrl-C, a cancelled flow run, an error): its trials stop with it.
        for number, run in running.items():
            launcher.cancel(run)
            conclude(handle, number, "cancelled: its search stopped", cancelled=True)
        raise


def _counts(handle: study.Handle) -> tuple[int, int]:
    """(finished, failed): complete or pruned trials, and failed ones not cancelled."""
    trials = handle.study.get_trials(deepcopy=False)
    finished = sum(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    failed = sum(t.state.name == "FAIL" and not t.user_attrs.get("cancelled") for t in trials)
    return finished, failed


def launch(handle: study.Handle, params: Params, launcher: Launcher, parent: str | None
           ) -> tuple[int, dict | None]:
    """Ask the study for a trial and start its run; (number, run), run None if refused."""
    trial = handle.study.ask()
    sampled = {key: suggest(trial, key, spec) for key, spec in params.search.space.items()}
    folder = Path(params.paths.search) / handle.name / f"trial-{trial.number}"
    extra = [f"{key}={json.dumps(value)}" for key, value in sampled.items()]
    extra += [f"paths.{step}={(folder / step).as_posix()}" for step in STEP_FOLDERS]
    trial.set_user_attr("overrides", extra)
    try:
        launcher.settings(extra)  # validated exactly like a user's run
    except UserError as err:
        trial.set_user_attr("failure", str(err))
        handle.study.tell(trial, state=study.trial_state("FAIL"))
        _say(f"trial {trial.number} {sampled}: refused: {err}")
        return trial.number, None
    ref = {"study": handle.name, "number": trial.number, "storage": shown(handle.url)}
    run = launcher.start(trial.number, extra, ref, parent)
    trial.set_user_attr("run", run)
    _say(f"trial {trial.number} started ({launcher.describe(run)}): "
         + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in sampled.items()))
    return trial.number, run


def suggest(trial, key: str, spec: dict[str, list[Any]]) -> Any:
    """The trial's value of one space entry (components.params.DISTRIBUTIONS)."""
    kind, values = next(iter(spec.items()))
    if kind == "choice":
        return trial.suggest_categorical(key, values)
    low, high = values
    if kind in ("int", "log_int"):
        return trial.suggest_int(key, int(low), int(high), log=kind == "log_int")
    return trial.suggest_float(key, float(low), float(high), log=kind == "log_uniform")


def conclude(handle: study.Handle, number: int, note: str, cancelled: bool = False) -> None:
    """A trial whose run ended: complete with its best epoch's value if the run trained and
    evaluated; failed otherwise (`cancelled`: by a search). A pruned trial was concluded by its
    run already."""
    trial = handle.trial(number)
    if trial.state.name != "RUNNING":
        _say(f"trial {number} ended {trial.state.name}")
        search_report.mark_run(trial, trial.state.name)
        return
    values = trial.intermediate_values
    if trial.user_attrs.get("done") and values:
        value = best_value(values, handle.study.direction.name.lower())
        handle.study.tell(number, value, skip_if_finished=True)
        _say(f"trial {number} complete: {value:.4f}")
        search_report.mark_run(trial, "COMPLETE")
    else:
        handle.set_trial_attr(number, "failure", note)
        if cancelled:
            handle.set_trial_attr(number, "cancelled", True)  # not counted as a failure
        handle.study.tell(number, state=study.trial_state("FAIL"), skip_if_finished=True)
        _say(f"trial {number} failed: {note}")
        search_report.mark_run(trial, "FAIL", killed=cancelled)


def best_value(values: dict[int, float], direction: str) -> float:
    """The trial's value: its best epoch's metric (the epoch whose weights best.pt keeps when
    train.early_stopping_metric is the same metric)."""
    return max(values.values()) if direction == "maximize" else min(values.values())


def finish(handle: study.Handle, params: Params, launcher: Launcher, parent: str | None,
           register_best: bool) -> dict[str, Any]:
    trials = handle.study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    if not complete:
        search_report.close_parent(parent, "FAILED")
        reasons = {t.user_attrs.get("failure") for t in trials if t.user_attrs.get("failure")}
        raise UserError(f"no trial of study {handle.name} completed ({len(trials)} trials); "
                        f"failures: {'; '.join(sorted(map(str, reasons)))[:2000] or 'none'}")
    best = handle.study.best_trial
    if not params.search.keep_checkpoints:
        _remove_checkpoints(params, handle, best.number)
    decision = _register_once(handle, launcher, best) if register_best else None
    rows = search_report.rows(handle, best.number)
    search_report.publish(params, handle, parent, rows, best, decision)
    launcher.publish(handle.name, rows, best, decision)
    counts = {state: sum(t.state.name == state for t in trials)
              for state in ("COMPLETE", "PRUNED", "FAIL")}
    return {"study": handle.name, "storage": shown(handle.url), "trials": counts,
            "best": {"trial": best.number, "value": best.value, "params": best.params,
                     "mlflow_run": best.user_attrs.get("mlflow_run")},
            "registered": decision, "mlflow_parent_run": parent}


def _remove_checkpoints(params: Params, handle: study.Handle, best: int) -> None:
    """Every trial's checkpoints but the best's, where this host sees them (model.pt and the
    history stay)."""
    root = Path(params.paths.search) / handle.name
    for folder in sorted(root.glob("trial-*")):
        if folder.name != f"trial-{best}":
            shutil.rmtree(folder / "train" / files.CHECKPOINTS, ignore_errors=True)


def _register_once(handle: study.Handle, launcher: Launcher, best) -> dict[str, Any]:
    """The best trial through the register gate, once per study and best trial."""
    done = handle.study.user_attrs.get("registered")
    if done and done.get("trial") == best.number:
        _say(f"trial {best.number} was registered when this study ended before: version "
             f"{done.get('version')}")
        return done
    extra = best.user_attrs["overrides"]
    decision = launcher.register(launcher.settings(extra), extra)
    record = {"trial": best.number, **{k: decision.get(k) for k in (
        "model_name", "version", "promoted", "run_id", "flow_run") if k in decision}}
    handle.study.set_user_attr("registered", record)
    return {**decision, "trial": best.number}


def _say(message: str) -> None:
    """To the flow run's log in Prefect, else to stderr (stdout is the command's JSON)."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        get_run_logger().info(message)
    except MissingContextError:
        print(message, file=sys.stderr, flush=True)
