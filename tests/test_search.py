"""The search's parts on their own, with real Optuna storage (SQLite files) and real training on
digits: the space is refused before any trial naming the key, a study is found again only with
its own settings, a live search's lease refuses a second one, a trial reports each epoch through
the storage and stops cleanly when pruned, and train ends cleanly when a callback asks it to.
The whole search runs end to end in tests/test_e2e_search.py.
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

from components import files
from components.params import ParamsError, UserError, load_params
from components.train import StopTraining, train
from flows import study as study_mod
from flows.launchers import ProcessLauncher
from flows.search import best_value, preflight, suggest
from flows.trial import Reporter, parse_ref
from tests.racing import at_once

ROOT = Path(__file__).resolve().parents[1]
RACERS = 5


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
    params = load_params(path, overrides)
    with pytest.raises(UserError) as info:
        preflight(params, ProcessLauncher(path, overrides, parallel=1))
    for part in named:
        assert part in str(info.value), f"{part!r} not in:\n{info.value}"


# --- the study ---------------------------------------------------------------------------------


def test_a_study_is_found_again_only_with_its_own_settings(tmp_path):
    space = "search.space={train.lr: {log_uniform: [0.001, 0.01]}}"
    params = load_params(project(tmp_path), [space])
    first = study_mod.open_study(params)
    first.study.tell(first.study.ask(), 0.5)
    again = study_mod.open_study(params)
    assert again.name == first.name and len(again.study.trials) == 1
    assert again.url == f"sqlite:///{tmp_path / 'search' / files.STUDY_DB}"  # absolute

    other = load_params(project(tmp_path), [space, "train.epochs=3"])
    assert study_mod.study_name(other) != first.name  # other settings: another study
    named = load_params(project(tmp_path), [space, "train.epochs=3", f"search.study={first.name}"])
    with pytest.raises(UserError, match=r"other settings \(changed: train.epochs\)"):
        study_mod.open_study(named)


def test_a_new_storage_opened_by_several_processes_at_once_opens_in_each(tmp_path):
    """Optuna checks for its tables, then creates them: processes that open a new storage at the
    same moment (two searches started together, a test watching one) collide. Before the retry,
    4 of every 10 such opens failed here with "table ... already exists" or a UNIQUE constraint."""
    for round_ in range(3):
        url = f"sqlite:///{tmp_path / f'race{round_}' / files.STUDY_DB}"
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


def test_a_second_search_on_a_live_study_is_refused_naming_the_first(tmp_path):
    params = load_params(project(tmp_path), ["search.space={train.lr: {uniform: [0.001, 0.01]}}"])
    handle = study_mod.open_study(params)
    refused = pytest.raises(UserError, match=rf"study {handle.name} .* another live search: "
                                             rf"a process \(pid {os.getpid()}")
    with study_mod.Lease(handle, study_mod.me()), refused, study_mod.Lease(handle, study_mod.me()):
        pass
    with study_mod.Lease(handle, study_mod.me()):  # the first ended: free again
        pass


def test_a_claim_slower_than_the_settle_time_is_made_again_then_refused(tmp_path, monkeypatch):
    """A claim whose write lands after the settle time could overwrite a rival's confirmed one:
    it is made again after a heartbeat; while every write stays slow it is refused, saying why
    (the real storage, its writes made slow)."""
    params = load_params(project(tmp_path), ["search.space={train.lr: {uniform: [0.001, 0.01]}}"])
    handle = study_mod.open_study(params)
    for name, value in {"SETTLE_S": 0.2, "BEAT_S": 0.1, "CLAIM_WAIT_S": 5.0}.items():
        monkeypatch.setattr(study_mod, name, value)
    write, slow = handle.study.set_user_attr, [2]  # the first two writes are slow

    def slow_write(key, value):
        if slow[0] > 0:
            slow[0] -= 1
            time.sleep(0.3)
        write(key, value)

    monkeypatch.setattr(handle.study, "set_user_attr", slow_write)
    owner = study_mod.me()
    with study_mod.Lease(handle, owner):  # third time fast: taken
        assert slow == [0] and handle.study.user_attrs["driver"]["id"] == owner["id"]
    slow[0] = 100
    monkeypatch.setattr(study_mod, "CLAIM_WAIT_S", 0.5)
    with pytest.raises(UserError, match=rf"study {handle.name}: each claim took over 0.2 s"):
        study_mod.Lease(handle, study_mod.me()).__enter__()


def test_a_killed_drivers_lease_is_taken_over_at_once(tmp_path):
    params = load_params(project(tmp_path), ["search.space={train.lr: {uniform: [0.001, 0.01]}}"])
    handle = study_mod.open_study(params)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead = {**study_mod.me(), "pid": int(gone.stdout)}
    handle.study.set_user_attr("driver", {**dead, "beat": time.time()})
    with study_mod.Lease(handle, study_mod.me()):  # fresh heartbeat, but its process is gone
        pass


# --- a trial -----------------------------------------------------------------------------------


def test_a_trial_reports_through_the_storage_and_is_pruned_cleanly(tmp_path):
    params = load_params(project(tmp_path), [
        "search.space={train.lr: {uniform: [0.001, 0.01]}}", "search.startup_trials=1",
        f"paths.train={tmp_path / 'train'}"])
    handle = study_mod.open_study(params)
    good = handle.study.ask()
    for epoch, value in enumerate((0.6, 0.8, 0.9), start=1):
        good.report(value, epoch)
    handle.study.tell(good, 0.9)
    trial = handle.study.ask()
    ref = parse_ref({"study": handle.name, "number": trial.number, "storage": handle.url})

    reporter = Reporter(params, ref)  # as a worker does: its own connection to the storage
    reporter.on_train_start(0)
    reporter.on_epoch_end(1, {"val_acc": 0.7, "val_loss": 1.0})  # above the median: goes on
    with pytest.raises(StopTraining, match="median pruner after epoch 2: val_acc 0.1000"):
        reporter.on_epoch_end(2, {"val_acc": 0.1, "val_loss": 2.0})
    seen = optuna.load_study(study_name=handle.name, storage=handle.url).trials[trial.number]
    assert seen.state.name == "PRUNED" and seen.intermediate_values == {1: 0.7, 2: 0.1}
    with pytest.raises(UserError, match=f"trial {trial.number} .* PRUNED, not running"):
        Reporter(params, ref)


def test_a_trial_ref_never_carries_a_password():
    with pytest.raises(UserError, match="password"):
        parse_ref('{"study": "s", "number": 0, "storage": "postgresql://u:pw@db/optuna"}')
    with pytest.raises(UserError, match="number"):
        parse_ref('{"study": "s", "number": -1, "storage": "sqlite:////x.db"}')


def test_suggest_and_the_trial_value():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    assert 1 <= suggest(trial, "train.epochs", {"log_int": [1, 8]}) <= 8
    assert 1e-4 <= suggest(trial, "train.lr", {"log_uniform": [1e-4, 1e-2]}) <= 1e-2
    assert suggest(trial, "model.name", {"choice": ["a", "b"]}) in ("a", "b")
    assert best_value({1: 0.5, 2: 0.9, 3: 0.7}, "maximize") == 0.9
    assert best_value({1: 0.5, 2: 0.3, 3: 0.4}, "minimize") == 0.3


# --- train, stopped by a callback --------------------------------------------------------------


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
    assert len(json.loads((out / files.HISTORY).read_text())) == 2
    assert (out / files.CHECKPOINTS / files.LAST).is_file() and (out / files.MODEL).is_file()


# --- the local search, killed and started again -------------------------------------------------


def _sweep(folder: Path, overrides: list[str]) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # embedded store
    env["PYTHONPATH"] = str(ROOT)
    args = [sys.executable, "-m", "flows.sweep", *(f"--set={o}" for o in overrides)]
    return subprocess.Popen(args, cwd=folder, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_the_local_search_killed_and_started_again_continues_its_study(tmp_path):
    """`python -m flows.sweep`, each trial a process: SIGKILLed while trial 1 trains (seed 88:
    lr 0.0003 for 2 epochs, then lr 0.003 for 1000, ahead of trial 0 so never pruned), started
    again: trial 0 kept, trial 1's orphaned process stopped and the trial failed, a new trial in
    its place (seed 88 + 2: lr 1e-6) pruned after epoch 1, the best registered once."""
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "data/raw").mkdir(parents=True)
    overrides = ["search.method=optuna", "search.trials=2", "search.parallel=1",
                 "search.sampler=random", "search.seed=88", "search.startup_trials=1",
                 "search.space={train.lr: {choice: [0.0003, 0.003, 1e-6]}, train.epochs: "
                 "{choice: [2, 1000]}}", "evaluate.mistakes=4", "register.model_name=local-search"]
    first = _sweep(tmp_path, overrides)
    url = f"sqlite:///{tmp_path / 'outputs/search' / files.STUDY_DB}"
    deadline = time.monotonic() + 600
    while True:
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < deadline, "trial 1 never trained"
        with contextlib.suppress(Exception):  # not made yet, or busy
            assert (tmp_path / "outputs/search" / files.STUDY_DB).is_file()
            name = optuna.get_all_study_names(url)[0]
            trials = optuna.load_study(study_name=name, storage=url).trials
            if len(trials) == 2 and trials[1].intermediate_values:
                break
        time.sleep(0.5)
    first.send_signal(signal.SIGKILL)
    first.wait()
    orphan = trials[1].user_attrs["run"]["pid"]
    assert psutil.pid_exists(orphan)  # the trial outlived its search

    second = _sweep(tmp_path, overrides)
    out, err = second.communicate(timeout=900)
    assert second.returncode == 0, err[-3000:]
    summary = json.loads(out)
    assert summary["trials"] == {"COMPLETE": 1, "PRUNED": 1, "FAIL": 1}
    assert summary["best"]["trial"] == 0 and summary["registered"]["version"] == "1"
    trials = sorted(optuna.load_study(study_name=name, storage=url).trials,
                    key=lambda t: t.number)
    assert trials[0].state.name == "COMPLETE" and trials[0].value == summary["best"]["value"]
    assert trials[1].state.name == "FAIL" and trials[1].user_attrs["cancelled"]
    assert _gone(orphan)
    assert trials[2].params["train.lr"] == 1e-6 and trials[2].state.name == "PRUNED"


def _gone(pid: int) -> bool:
    """Not running: no such process, or a zombie (it may be reaped while we look)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
