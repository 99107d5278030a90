"""The Optuna study of a search: where it lives, its name, what every worker builds on it.

Storage: `CNN_PIPELINE_SEARCH_STORAGE` (a URL that may hold a password: PostgreSQL for workers on
several hosts, each needing it too), else `search.storage` (no password), else the SQLite file
`<paths.search>/optuna.db` by absolute path, which every worker on the host opens, in any clone.
It is opened with Optuna's heartbeat: a trial whose worker died falls silent, and after GRACE_S
the next worker that looks fails it and RetryHeartbeatStaleTrialCallback queues its copy. Optuna
finds only trials that have beaten once; `fail_stale` also fails those that never did (a worker
killed between Optuna's ask and its first beat), by the mark `begin` sets.

The study is `search.study`, or `<register.model_name>-<hash>` of the settings that decide what a
trial computes: started again, the same command finds it. It records them (user attr `settings`),
refuses others, and names its objective, so optuna-dashboard shows `val_acc`.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from sqlalchemy import exc

from components.core import outputs
from components.core.params import Params, UserError
from components.core.secrets import shown, unescaped_userinfo

STORAGE_ENV = "CNN_PIPELINE_SEARCH_STORAGE"
SQLITE_TIMEOUT_S = 120  # workers and trials write to one SQLite file: wait, don't fail
HEARTBEAT_S = 5  # a running trial's worker says it is alive this often
GRACE_S = 30  # silent this long: its worker is gone (a busy SQLite file can delay a beat)
CREATE_TRIES = 6  # processes opening one new storage at once: all but one lose a race, try again
STUDY_SETTINGS = ("data", "augment", "model", "train")  # with search's: what a trial computes
SEARCH_KEYS = ("metric", "direction", "sampler", "pruner", "startup_trials", "min_epochs",
               "seed", "space")
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
BEGUN = "begun"  # user attr: the number of the trial whose objective began (a copy inherits it)
# Optuna calls its heartbeats, their retries and its matplotlib plots experimental (since 2.8):
# they are what the search is built on, and they work; no warning at every use.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def storage_url(params: Params) -> str:
    """Where the study lives (module docstring); may hold a password: log it through
    components.core.secrets.redact()."""
    return (os.environ.get(STORAGE_ENV) or params.search.storage
            or f"sqlite:///{(Path(params.paths.search) / outputs.STUDY_DB).resolve()}")


def open_storage(url: str) -> optuna.storages.RDBStorage:
    if unescaped_userinfo(url):
        raise UserError(f"Optuna storage {shown(url)}: its user:password part holds an @ or / "
                        f"that is not percent-encoded (write @ as %40, / as %2F). Fix "
                        f"search.storage or {STORAGE_ENV}")
    if sqlite := url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    kwargs = ({"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if sqlite
              else {"pool_pre_ping": True})  # a server closes idle connections under us
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=None)
    for attempt in range(1, CREATE_TRIES + 1):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs,
                                              heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                                              heartbeat_stale_trial_callback=retry)
        except Exception as err:  # a driver missing, a server down, a bad URL: say which storage
            if attempt < CREATE_TRIES and _lost_creation_race(err):
                time.sleep(0.25 * attempt)
                continue
            raise UserError(f"Optuna storage {shown(url)} cannot be opened: {err}. Fix "
                            f"search.storage or {STORAGE_ENV}") from None


def _lost_creation_race(err: Exception) -> bool:
    """Another process was creating the same new storage's tables at the same moment (Optuna
    checks, then creates): a table, or the row recording the schema's version, is already there.
    Opened again a moment later, the storage is found made."""
    if isinstance(err, exc.IntegrityError):
        return True
    return isinstance(err, exc.DBAPIError) and "already exists" in str(err.orig)


def settings(params: Params) -> dict[str, Any]:
    """What decides a trial's result (train's where and how fast aside, as for resuming)."""
    from components.train import SAME_RUN_KEYS

    dumped = params.model_dump(mode="json")
    dumped["train"] = {k: v for k, v in dumped["train"].items() if k not in SAME_RUN_KEYS}
    return {"search": {k: dumped["search"][k] for k in SEARCH_KEYS},
            **{section: dumped[section] for section in STUDY_SETTINGS}}


def study_name(params: Params) -> str:
    if params.search.study:
        return params.search.study
    blob = json.dumps(settings(params), sort_keys=True).encode()
    return f"{params.register.model_name}-{hashlib.sha256(blob).hexdigest()[:8]}"


def budget(search: dict[str, Any]) -> int:
    """Finished trials the study is after: a grid's size, else search.trials."""
    grid = search["sampler"] == "grid"
    return int(np.prod([len(s["choice"]) for s in search["space"].values()])) if grid \
        else search["trials"]


def make_pruner(recorded: dict[str, Any]) -> optuna.pruners.BasePruner:
    """The pruner of the recorded settings: every worker and every trial builds the same one."""
    search = recorded["search"]
    if search["pruner"] == "median":
        # A trial is pruned from epoch min_epochs on, once startup_trials trials have completed.
        return optuna.pruners.MedianPruner(n_startup_trials=search["startup_trials"],
                                           n_warmup_steps=search["min_epochs"])
    if search["pruner"] == "hyperband":
        spec = search["space"].get("train.epochs")  # the most epochs a trial can run
        top = max(next(iter(spec.values()))) if spec else recorded["train"]["epochs"]
        return optuna.pruners.HyperbandPruner(min_resource=search["min_epochs"],
                                              max_resource=int(top))
    return optuna.pruners.NopPruner()


class GridSampler(optuna.samplers.GridSampler):
    """Optuna's, without its study.stop() once each point is taken or done (a failed one waits
    for its retry): when workers stop is the search's to say (its budget)."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


def make_sampler(search: dict[str, Any], worker: int, trials: int) -> optuna.samplers.BaseSampler:
    """A grid: one seed for all workers and restarts (GridSampler shuffles its points by it and
    gives trial n point n). TPE, random: a seed per worker and start, or two draw alike."""
    if search["sampler"] == "grid":
        return GridSampler({k: v["choice"] for k, v in search["space"].items()}, search["seed"])
    seed = int(np.random.SeedSequence([search["seed"], worker, trials]).generate_state(1)[0])
    if search["sampler"] == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # constant_liar: parallel trials do not all pick the same point while others are running.
    return optuna.samplers.TPESampler(n_startup_trials=search["startup_trials"], seed=seed,
                                      constant_liar=True)


def open_study(params: Params, worker: int = 0) -> optuna.Study:
    """The study of these settings, created or found again (checked), with `worker`'s sampler."""
    url, name, current = storage_url(params), study_name(params), settings(params)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # the search's own log says what happens
    study = optuna.create_study(storage=open_storage(url), study_name=name, load_if_exists=True,
                                direction=params.search.direction, pruner=make_pruner(current))
    recorded = study.user_attrs.get("settings")
    if recorded is None:
        study.set_user_attr("settings", current)
        study.set_metric_names([params.search.metric])
    elif recorded != current:
        changed = sorted(f"{s}.{k}" for s in current for k in {*current[s], *recorded.get(s, {})}
                         if current[s].get(k) != recorded.get(s, {}).get(k))
        raise UserError(  # redacted by UserError
            f"study {name} in {url} was started with other settings (changed: "
            f"{', '.join(changed)}); continue it with those, or set search.study to a new name")
    study.sampler = make_sampler(current["search"], worker, len(study.get_trials(deepcopy=False)))
    return study


def begin(trial: optuna.Trial) -> None:
    """The objective's first act: a beat of its own (Optuna's heartbeat thread, started a moment
    ago, may not have written one yet), then the mark that this trial has beaten."""
    trial.study._storage.record_heartbeat(trial._trial_id)  # as Optuna's own thread does
    trial.set_user_attr(BEGUN, trial.number)


def fail_stale(study: optuna.Study) -> None:
    """Optuna's fail_stale_trials, and the same for a running trial that never began, created
    over GRACE_S ago: its worker died before its first beat, which Optuna would wait on forever."""
    optuna.storages.fail_stale_trials(study)
    storage, now = study._storage, datetime.datetime.now()  # Optuna stores local naive times
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if trial.user_attrs.get(BEGUN) == trial.number or (
                now - trial.datetime_start).total_seconds() < GRACE_S:  # ask sets the start
            continue
        try:
            failed = storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            failed = False  # another worker failed it first
        if failed:
            retry = storage.get_heartbeat_stale_trial_callback()
            retry(study, copy.deepcopy(storage.get_trial(trial._trial_id)))
