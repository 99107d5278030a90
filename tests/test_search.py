"""The search's parts, with real Optuna storage (SQLite files), real processes and real training
on digits: the space is refused before any trial naming the key, a study is found again only with
its own settings, the budget and the grid are kept exactly by the objective, a trial reports each
epoch through the storage and stops cleanly when pruned; and `cnn-pipeline search` end to
end: three workers finish exactly the budget, a worker SIGKILLed mid-trial has its trial retried by
another, a grid runs each point once with three workers and again after the whole search was killed
and started again. On a Prefect pool: tests/test_e2e_search.py.
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
from pathlib import Path

import optuna
import psutil
import pytest
import sqlalchemy
from mlflow import MlflowClient

from components.core import outputs
from components.core.params import ParamsError, UserError, load_params, sections
from components.train import StopTraining, train
from flows.search import study as study_mod
from flows.search.sweep import search_worker, sweep
from flows.search.trial import Reporter
from flows.search.workers import decide, preflight, run_child, skip_reason, suggest
from tests.support.racing import at_once

ROOT = Path(__file__).resolve().parents[1]
RACERS = 5
S = optuna.trial.TrialState


def project(tmp_path: Path, text: str = "") -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(f"paths:\n  search: {tmp_path / 'search'}\n{text}")
    return path


# --- the space, refused before any trial --------------------------------------------------------

BAD_SPACES = [  # (space, what the message must name)
    ("{train.lr: {log_uniform: [0, 0.1]}}", ["search.space['train.lr']", "above 0"]),
    ("{train.lr: {log_uniform: [0.01, 0.001]}}", ["search.space['train.lr']", "empty range"]),
    ("{train.lr: {uniform: [0.01, 0.01]}}", ["search.space['train.lr']", "empty range"]),
    ("{train.lrr: {uniform: [0.001, 0.01]}}", ["search.space['train.lrr']", "unknown setting",
                                              "weight_decay"]),
    ("{lr: {uniform: [0.001, 0.01]}}", ["search.space['lr']", "not a setting"]),
    ("{data.seed: {int: [0, 3]}}", ["search.space['data.seed']", "cannot change data"]),
    ("{paths.train: {choice: [a, b]}}", ["search.space['paths.train']", "cannot change paths"]),
    ("{train.epochs: {int: [0, 5]}}", ["search.space['train.epochs']", "train.epochs = 0",
                                       "greater than or equal to 1"]),
    ("{train.epochs: {uniform: [1, 5]}}", ["search.space['train.epochs']", "whole number"]),
    ("{train.epochs: {int: [1, 4.5]}}", ["search.space['train.epochs']", "whole numbers"]),
    ("{train.optimizer: {choice: [adamw, lion]}}", ["search.space['train.optimizer']",
                                                   '"lion"', "'adamw' or 'sgd'"]),
    ("{train.optimizer: {choice: []}}", ["search.space['train.optimizer']", "one or more"]),
    ("{train.momentum: {uniform: [0.5, 1.0]}}", ["search.space['train.momentum']", "1.0",
                                                 "less than 1"]),
    ("{train.lr: {normal: [0.1, 1]}}", ["search.space['train.lr']", "log_uniform", "choice"]),
    ("{train.lr: {log_uniform: 0.1}}", ["search.space.train.lr.log_uniform", "list"]),
    ("{train.lr: 0.003}", ["search.space.train.lr", "dictionary"]),
]


@pytest.mark.parametrize(("space", "named"), BAD_SPACES, ids=[s for s, _ in BAD_SPACES])
def test_a_bad_space_is_refused_naming_the_key(tmp_path, space, named):
    with pytest.raises(ParamsError) as info:
        load_params(project(tmp_path), [f"search.space={space}"])
    for part in named:
        assert part in str(info.value), f"{part!r} not in:\n{info.value}"


GRID_SPACES = [  # (space, the key a grid refuses, or None)
    ("{train.lr: {choice: [0.001, 0.01]}, model.name: {choice: [simple_cnn]}}", None),
    ("{train.lr: {log_uniform: [0.001, 0.01]}, model.name: {choice: [simple_cnn]}}",
     "search.space['train.lr']"),
    ("{train.epochs: {int: [1, 3]}}", "search.space['train.epochs']"),
]


@pytest.mark.parametrize(("space", "refused"), GRID_SPACES, ids=["choices", "range", "int"])
def test_a_grid_takes_choices_only_naming_the_key_of_a_range(tmp_path, space, refused):
    given = ["search.sampler=grid", f"search.space={space}"]
    if refused is None:
        assert load_params(project(tmp_path), given).search.sampler == "grid"
        return
    with pytest.raises(ParamsError) as info:
        load_params(project(tmp_path), given)
    assert refused in str(info.value) and "grid takes choices only" in str(info.value)


def test_a_good_space_loads_as_given(tmp_path):
    space = ("{train.lr: {log_uniform: [3e-4, 1e-2]}, model.name: {choice: [simple_cnn, "
             "cifar_cnn]}, train.epochs: {log_int: [1, 8]}, augment.preset: {choice: [none]}}")
    params = load_params(project(tmp_path), [f"search.space={space}"])
    assert params.search.space["train.lr"] == {"log_uniform": [0.0003, 0.01]}
    assert params.search.space["train.epochs"] == {"log_int": [1, 8]}


def test_metric_and_direction_must_agree(tmp_path):
    with pytest.raises(ParamsError, match="search.direction=minimize"):
        load_params(project(tmp_path), ["search.metric=val_loss"])
    with pytest.raises(ParamsError, match="search.metric"):
        load_params(project(tmp_path), ["search.metric=accuracy"])  # not reported per epoch


def test_the_storage_setting_refuses_a_password(tmp_path):
    with pytest.raises(ParamsError, match="user:password"):
        load_params(project(tmp_path), ["search.storage=postgresql://u:secret@db/optuna"])


PREFLIGHT = [  # (settings, overrides, what the message must name)
    ("train:\n  epochs: 4\n", ["search.space={train.freeze_epochs: {int: [0, 6]}}"],
     ["search.space['train.freeze_epochs']", "6", "freeze_epochs = 6 is more than epochs"]),
    ("", ["search.space={model.name: {choice: [simple_cnn, no_such_net]}}"],
     ["search.space['model.name']", "no_such_net"]),
    ("", ["search.space={}"], ["search.space is empty"]),
]


@pytest.mark.parametrize(("text", "overrides", "named"), PREFLIGHT,
                         ids=["cross-field", "model", "empty"])
def test_values_the_other_settings_refuse_stop_the_search_before_any_trial(
        tmp_path, text, overrides, named):
    path = project(tmp_path, text)
    with pytest.raises(UserError) as info:
        preflight(str(path), overrides)
    for part in named:
        assert part in str(info.value), f"{part!r} not in:\n{info.value}"
    assert not (tmp_path / "search").exists()  # no study was made


# --- the study -------------------------------------------------------------------------------


def test_a_study_is_found_again_only_with_its_own_settings(tmp_path):
    space = "search.space={train.lr: {log_uniform: [0.001, 0.01]}}"
    params = load_params(project(tmp_path), [space])
    first = study_mod.open_study(params)
    first.tell(first.ask(), 0.5)
    again = study_mod.open_study(params)
    assert again.study_name == first.study_name and len(again.trials) == 1
    assert again.metric_names == ["val_acc"]  # what optuna-dashboard shows
    assert study_mod.storage_url(params) == f"sqlite:///{tmp_path / 'search' / outputs.STUDY_DB}"

    other = load_params(project(tmp_path), [space, "train.epochs=3"])
    assert study_mod.study_name(other) != first.study_name  # other settings: another study
    assert study_mod.study_name(load_params(project(tmp_path), [
        space, "search.trials=40", "search.parallel=8"])) == first.study_name  # more of it
    named = load_params(project(tmp_path), [space, "train.epochs=3",
                                            f"search.study={first.study_name}"])
    with pytest.raises(UserError, match=r"other settings \(changed: train.epochs\)"):
        study_mod.open_study(named)


def test_a_trial_whose_worker_died_before_its_first_heartbeat_is_failed_and_retried(
        tmp_path, monkeypatch):
    """Optuna's stale check skips a trial without a heartbeat: a worker SIGKILLed between ask and
    its heartbeat thread's first beat left the grid test's search waiting on it for good."""
    params = load_params(project(tmp_path), [
        "search.sampler=grid", "search.space={train.lr: {choice: [0.003, 0.001]}}"])
    study = study_mod.open_study(params)
    dead = study.ask()  # what the killed worker left: RUNNING, a grid point, no beat, no mark
    alive = study.ask()
    study_mod.begin(alive)  # a worker that reached its objective
    study_mod.fail_stale(study)  # younger than GRACE_S: left alone
    assert [t.state for t in study.trials] == [S.RUNNING] * 2

    monkeypatch.setattr(study_mod, "GRACE_S", 0)
    study_mod.fail_stale(study)
    study_mod.fail_stale(study)  # a second worker looking: one copy only
    states = [t.state for t in study.trials]
    assert states == [S.FAIL, S.RUNNING, S.WAITING], states
    copy = study.trials[2]
    assert copy.system_attrs["grid_id"] == study.trials[dead.number].system_attrs["grid_id"]
    assert copy.system_attrs["failed_trial"] == dead.number
    assert study.trials[alive.number].user_attrs[study_mod.BEGUN] == alive.number


def test_a_storage_that_cannot_be_opened_is_named_without_its_password(tmp_path, monkeypatch):
    monkeypatch.setenv(study_mod.STORAGE_ENV, "postgresql+psycopg2://me:s3cret@127.0.0.1:1/optuna")
    with pytest.raises(UserError) as info:
        study_mod.open_study(load_params(project(tmp_path)))
    assert "127.0.0.1:1/optuna" in str(info.value) and "s3cret" not in str(info.value)


def test_a_new_storage_opened_by_several_processes_at_once_opens_in_each(tmp_path):
    """Optuna checks for its tables, then creates them: processes that open a new storage at the
    same moment (two searches started together, a test watching one) collide. Before the retry,
    4 of every 10 such opens failed here with "table ... already exists" or a UNIQUE constraint."""
    for round_ in range(3):
        url = f"sqlite:///{tmp_path / f'race{round_}' / outputs.STUDY_DB}"
        errors = at_once(lambda _, url=url: optuna.get_all_study_names(
            study_mod.open_storage(url)), RACERS)
        assert not errors, errors[0]


CREATION_ERRORS = [  # (error, opened again?)
    (sqlalchemy.exc.IntegrityError("INSERT", {}, Exception(
        "UNIQUE constraint failed: alembic_version.version_num")), True),
    (sqlalchemy.exc.OperationalError("CREATE", {}, Exception("table trials already exists")),
     True),
    (sqlalchemy.exc.ProgrammingError("CREATE", {}, Exception(
        'relation "studies" already exists')), True),  # PostgreSQL
    (sqlalchemy.exc.OperationalError("connect", {}, Exception("unable to open database file")),
     False),
    (sqlalchemy.exc.OperationalError("connect", {}, Exception("connection refused")), False),
    (ValueError("already exists"), False),  # not the database's
]


@pytest.mark.parametrize(("error", "again"), CREATION_ERRORS,
                         ids=[str(e).splitlines()[0][:50] for e, _ in CREATION_ERRORS])
def test_lost_creation_races_are_told_from_other_storage_errors(error, again):
    assert study_mod._lost_creation_race(error) is again


SEARCH = {"sampler": "tpe", "trials": 6, "seed": 3, "startup_trials": 2,
          "space": {"train.lr": {"choice": [0.1, 0.2, 0.3]}, "model.name": {"choice": ["a", "b"]}}}


def test_grid_workers_share_one_order_and_other_samplers_differ_per_worker_and_start():
    grid = {**SEARCH, "sampler": "grid"}
    orders = {tuple(study_mod.make_sampler(grid, worker, trials)._all_grids)
              for worker, trials in [(0, 0), (1, 0), (2, 5)]}
    assert len(orders) == 1  # trial n is the same point for every worker and every restart
    assert study_mod.budget(grid) == 6 and study_mod.budget({**SEARCH, "trials": 4}) == 4

    def draws(sampler) -> list:
        study = optuna.create_study(sampler=sampler)
        return [study.ask().suggest_float("x", 0, 1) for _ in range(3)]

    for kind in ("tpe", "random"):
        seen = [draws(study_mod.make_sampler({**SEARCH, "sampler": kind}, worker, trials))
                for worker, trials in [(0, 0), (1, 0), (0, 4)]]
        assert len({tuple(d) for d in seen}) == 3, kind  # two workers, a restart: new points
        assert draws(study_mod.make_sampler({**SEARCH, "sampler": kind}, 1, 0)) == seen[1]


# --- the budget, kept by the objective and the workers (pure decisions) -----------------------


def frozen(number: int, state: S, params: dict | None = None, skipped: bool = False):
    params = params or {}
    return optuna.trial.FrozenTrial(
        number=number, state=state, value=0.5 if state == S.COMPLETE else None,
        datetime_start=None, datetime_complete=None, params=params, distributions={
            k: optuna.distributions.CategoricalDistribution([v]) for k, v in params.items()},
        user_attrs={"skipped": "over"} if skipped else {}, system_attrs={},
        intermediate_values={}, trial_id=number)


C, P, R, F = S.COMPLETE, S.PRUNED, S.RUNNING, S.FAIL
A, B = {"train.lr": 0.1}, {"train.lr": 0.2}
SKIPS = [  # (trials before, this trial's number and point, budget, grid?, skipped?)
    ([], 0, A, 2, False, None),
    ([(0, C, A)], 1, A, 2, False, None),  # TPE and random may draw a point again
    ([(0, C, A)], 1, A, 2, True, "the grid point of trial 0"),
    ([(0, R, A)], 1, B, 2, True, None),
    ([(0, R, A), (1, R, B)], 2, A, 2, False, "over the budget: 0 finished and 2 running of 2"),
    ([(0, C, A), (2, R, B)], 1, B, 2, True, None),  # a running trial of higher number waits
    ([(0, C, A), (1, P, B), (2, F, A)], 3, A, 3, True, "the grid point of trial 0"),
    ([(0, C, A), (1, F, B)], 2, B, 2, True, None),  # a failed point runs again
    ([(0, C, A), (1, C, B), (2, R, A)], 3, A, 3, False,
     "over the budget: 2 finished and 1 running of 3"),
]


@pytest.mark.parametrize(("before", "number", "point", "budget", "grid", "reason"), SKIPS)
def test_a_trial_beyond_the_budget_or_on_a_taken_grid_point_is_not_trained(
        before, number, point, budget, grid, reason):
    trials = [frozen(n, state, p) for n, state, p in before]
    assert skip_reason(trials, number, point, budget, grid) == reason


DECISIONS = [  # (trials: state or (state, skipped), budget, failures allowed, decision)
    ([], 3, 3, "go"),
    ([C, P, R], 3, 3, "wait"),  # the last place is taken: wait, to take it over if it dies
    ([C, P, C], 3, 3, "stop"),
    ([C, R, F, F], 3, 3, "go"),  # failed trials do not count
    ([C, F, F, F], 3, 3, "stop"),  # ...up to search.trials of them
    ([C, (F, True), (F, True), (F, True)], 3, 3, "go"),  # skipped ones are not failures
    ([C, C, C, R], 3, 3, "stop"),
]


@pytest.mark.parametrize(("states", "budget", "failures", "decision"), DECISIONS)
def test_a_worker_between_trials_goes_waits_or_stops(states, budget, failures, decision):
    trials = []
    for number, given in enumerate(states):
        state, skipped = given if isinstance(given, tuple) else (given, False)
        trials.append(frozen(number, state, skipped=skipped))
    assert decide(trials, budget, failures) == decision


def test_suggest_gives_each_kind_of_space_entry():
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    assert 1 <= suggest(trial, "train.epochs", {"log_int": [1, 8]}) <= 8
    assert 1e-4 <= suggest(trial, "train.lr", {"log_uniform": [1e-4, 1e-2]}) <= 1e-2
    assert suggest(trial, "model.name", {"choice": ["a", "b"]}) in ("a", "b")


CHILD_ENDS = [  # (the child's code, what the trial's failure says)
    ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", "killed by SIGKILL"),
    ("import sys; print('error: train.lr = 5: too large', file=sys.stderr); sys.exit(2)",
     "exit code 2: error: train.lr = 5: too large"),
]


@pytest.mark.parametrize(("code", "said"), CHILD_ENDS, ids=["killed", "refused"])
def test_a_training_process_that_ends_badly_fails_its_trial_saying_how(tmp_path, code, said):
    with pytest.raises(RuntimeError, match=said):
        run_child("trial-0", [sys.executable, "-c", code], tmp_path / "t" / outputs.TRIAL_LOG)
    assert run_child("trial-1", [sys.executable, "-c", "print('{\"value\": 1}')"],
                     tmp_path / outputs.TRIAL_LOG) == {"value": 1}


def test_the_flows_forms_hold_only_what_a_user_sets():
    assert set(sweep.parameters.model_dump()["properties"]) == {
        "params_file", "overrides", *sections()}
    assert set(search_worker.parameters.model_dump()["properties"]) == {
        "worker", "params_file", "overrides"}


# --- a trial ---------------------------------------------------------------------------------


def test_a_trial_reports_through_the_storage_and_is_pruned_cleanly(tmp_path):
    params = load_params(project(tmp_path), [
        "search.space={train.lr: {uniform: [0.001, 0.01]}}", "search.startup_trials=1",
        f"paths.train={tmp_path / 'train'}"])
    study = study_mod.open_study(params)
    good = study.ask()
    for epoch, value in enumerate((0.6, 0.8, 0.9), start=1):
        good.report(value, epoch)
    study.tell(good, 0.9)
    trial = study.ask()

    reporter = Reporter(params, study.study_name, trial.number)  # its own connection, as a child
    reporter.on_epoch_end(1, {"val_acc": 0.7, "val_loss": 1.0})  # above the median: goes on
    with pytest.raises(StopTraining, match="median pruner after epoch 2: val_acc 0.1000"):
        reporter.on_epoch_end(2, {"val_acc": 0.1, "val_loss": 2.0})
    seen = optuna.load_study(study_name=study.study_name,
                             storage=study_mod.storage_url(params)).trials[trial.number]
    assert seen.intermediate_values == {1: 0.7, 2: 0.1}
    assert seen.state.name == "RUNNING"  # its worker tells the study, from the child's result


class StopAfter:
    def __init__(self, epoch: int):
        self.epoch, self.heard = epoch, []

    def on_epoch_end(self, epoch, metrics):
        self.heard.append(epoch)
        if epoch == self.epoch:
            raise StopTraining("enough")


def test_train_stopped_by_a_callback_ends_cleanly(tmp_path, digits):
    path = tmp_path / "params.yaml"
    path.write_text(f"paths:\n  prepared: {digits / 'prepared'}\n"
                    f"  augment: {digits / 'augment_none'}\n  train: {tmp_path / 'train'}\n"
                    "train:\n  epochs: 4\n  precision: fp32\n")
    stopper, listener = StopAfter(2), StopAfter(-1)
    result = train(load_params(path), callbacks=[stopper, listener])
    assert result.epochs == 2 and result.stopped_by == "enough" and result.stopped_early
    assert stopper.heard == listener.heard == [1, 2]  # every callback heard the last epoch
    out = tmp_path / "train"
    assert len(json.loads((out / outputs.HISTORY).read_text())) == 2
    assert (out / outputs.CHECKPOINTS / outputs.LAST).is_file() and (out / outputs.MODEL).is_file()


# --- `cnn-pipeline search`: workers as processes ----------------------------------------------

SMALL = ["evaluate.mistakes=0", "augment.preview_images=2", "augment.preview_views=2",
         "search.pruner=none"]


def _sweep(folder: Path, overrides: list[str]) -> subprocess.Popen:
    if not (folder / "params.yaml").is_file():
        shutil.copy(ROOT / "params.yaml", folder / "params.yaml")
        (folder / "data/raw").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # embedded store
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.Popen([sys.executable, "-m", "cnn_pipeline", "search",
                             *(f"--set={o}" for o in [*SMALL, *overrides])], cwd=folder, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finished(run: subprocess.Popen, timeout: float = 600) -> dict:
    """The search's summary; one still going after `timeout` s (below pytest's limit) is killed,
    its workers and trainings with it, and the test fails with what it said."""
    try:
        out, err = run.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        run.kill()
        pytest.fail(f"the search did not finish in {timeout} s: {run.communicate()[1][-4000:]}")
    assert run.returncode == 0, err[-4000:]
    return json.loads(out)


def _study(folder: Path) -> optuna.Study:
    url = f"sqlite:///{folder / 'outputs/search' / outputs.STUDY_DB}"
    name, = optuna.get_all_study_names(url)
    return optuna.load_study(study_name=name, storage=url)


def _wait_until(folder: Path, run: subprocess.Popen, ready, what: str) -> list:
    """The study's trials once `ready(trials)`; the search must still be going."""
    deadline, seen = time.monotonic() + 600, "no study yet"
    while time.monotonic() < deadline:
        assert run.poll() is None, run.communicate()[1][-4000:]
        with contextlib.suppress(Exception):  # not made yet, or busy
            assert (folder / "outputs/search" / outputs.STUDY_DB).is_file()  # reading makes it
            trials = _study(folder).trials
            seen = [(t.number, t.state.name, len(t.intermediate_values)) for t in trials]
            if ready(trials):
                return trials
        time.sleep(0.5)
    raise AssertionError(f"never {what}; last seen {seen}")


def _versions(folder: Path, name: str) -> list:
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    return client.search_model_versions(f"name = '{name}'")


def _trial_process(run: subprocess.Popen, number: int) -> psutil.Process:
    """The training process of trial `number` among the search's descendants."""
    for proc in psutil.Process(run.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error, ValueError, IndexError):
            cmd = proc.cmdline()
            if "flows.search.trial" in cmd and cmd[cmd.index("--number") + 1] == str(number):
                return proc
    raise AssertionError(f"no training process of trial {number}")


def _gone(procs: list[psutil.Process]) -> bool:
    _, alive = psutil.wait_procs(procs, timeout=60)
    return all(p.status() == psutil.STATUS_ZOMBIE for p in alive)


@pytest.mark.slow
def test_three_workers_finish_exactly_the_budget_and_train_nothing_beyond_it(tmp_path):
    """Optuna's MaxTrialsCallback alone let 3 workers finish 8 trials of a budget of 6."""
    summary = _finished(_sweep(tmp_path, [
        "search.trials=6", "search.parallel=3", "search.sampler=random", "train.epochs=1",
        "search.space={train.lr: {choice: [0.003, 0.002]}}", "register.model_name=budget"]))
    trials = _study(tmp_path).trials
    finished = {t.number for t in trials if t.state.is_finished() and t.state != S.FAIL}
    assert len(finished) == 6 and summary["trials"]["COMPLETE"] == 6
    assert all(t.user_attrs.get("skipped") for t in trials if t.state == S.FAIL)
    trained = {int(p.parts[-3].removeprefix("trial-")) for p in (
        tmp_path / "outputs/search" / summary["study"]).glob(f"trial-*/train/{outputs.HISTORY}")}
    assert trained == finished  # no trial beyond the budget trained
    assert [v.run_id for v in _versions(tmp_path, "budget")] == [summary["best"]["mlflow_run"]]


@pytest.mark.slow
def test_a_worker_killed_mid_trial_has_its_trial_retried_and_the_budget_is_reached(tmp_path):
    """SIGKILL of the worker process whose trial trains: its training dies with it, the trial is
    failed when its heartbeat is stale and its copy is trained by the other worker."""
    run = _sweep(tmp_path, [
        "search.parallel=2", "search.sampler=grid", "train.epochs=15",
        "search.space={train.lr: {choice: [0.003, 0.002, 0.001]}}", "register.model_name=kill"])
    trials = _wait_until(tmp_path, run, lambda ts: any(t.intermediate_values for t in ts),
                         "a trial trained")
    killed = next(t for t in trials if t.intermediate_values)
    child = _trial_process(run, killed.number)
    child.parent().send_signal(signal.SIGKILL)  # its worker
    assert _gone([child])  # the training died with its worker
    summary = _finished(run)
    trials = sorted(_study(tmp_path).trials, key=lambda t: t.number)
    assert trials[killed.number].state == S.FAIL
    copy, = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert copy.state == S.COMPLETE and copy.params == killed.params
    points = [t.params["train.lr"] for t in trials if t.state == S.COMPLETE]
    assert sorted(points) == [0.001, 0.002, 0.003]  # the budget, each point once
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_of_killed = client.get_run(trials[killed.number].user_attrs["mlflow_run"])
    assert run_of_killed.info.status == "KILLED"
    assert run_of_killed.data.tags["search.state"] == "FAIL"
    assert len(_versions(tmp_path, "kill")) == 1 and summary["registered"]["version"] == "1"


@pytest.mark.slow
def test_a_grid_runs_each_point_once_with_three_workers_also_killed_and_started_again(tmp_path):
    """A 2 x 2 grid, three workers (parallel GridSampler workers ran one point three times in 6
    trials): the whole search SIGKILLed while trials train, started again, and a third time."""
    given = ["search.parallel=3", "search.sampler=grid", "register.model_name=grid",
             "search.space={train.lr: {choice: [0.003, 0.001]}, train.epochs: {choice: [1, 20]}}"]
    run = _sweep(tmp_path, given)
    _wait_until(tmp_path, run, lambda ts: any(t.state == S.COMPLETE for t in ts) and any(
        t.state == S.RUNNING and t.intermediate_values for t in ts), "one finished, one training")
    processes = psutil.Process(run.pid).children(recursive=True)
    run.send_signal(signal.SIGKILL)
    run.communicate()
    assert _gone(processes)  # its workers and their trainings died with it

    summary = _finished(_sweep(tmp_path, given))
    trials = _study(tmp_path).trials
    points = sorted((t.params["train.lr"], t.params["train.epochs"]) for t in trials
                    if t.state in (S.COMPLETE, S.PRUNED))
    assert points == [(0.001, 1), (0.001, 20), (0.003, 1), (0.003, 20)]
    dead = [t.number for t in trials if t.state == S.FAIL and not t.user_attrs.get("skipped")]
    assert dead and all(any(t.system_attrs.get("failed_trial") == n for t in trials)
                        for n in dead)  # each retried
    assert len(_versions(tmp_path, "grid")) == 1

    again = _finished(_sweep(tmp_path, given))  # finished and registered: nothing new
    assert len(_study(tmp_path).trials) == len(trials)
    assert again["registered"]["version"] == summary["registered"]["version"] == "1"
    assert len(_versions(tmp_path, "grid")) == 1
