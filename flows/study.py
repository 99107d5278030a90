"""The Optuna study of a search: where it lives, how it is made and found again, who drives it.

Storage, the first that is set:
- `CNN_PIPELINE_SEARCH_STORAGE` in the environment: a database URL that may hold a password (the
  same PostgreSQL as the servers in production: `postgresql+psycopg2://USER:PASSWORD@HOST/optuna`);
  every worker that runs trials needs it in its environment too;
- `search.storage` in params.yaml: a URL without a password (credentials.py refuses one);
- an SQLite file `<paths.search>/optuna.db`, by absolute path: trials on the same host report to
  the driver's file, even from another clone of the project (a worker's workspace).

The study is named `search.study`, or `<register.model_name>-<hash>` of the settings that decide
what a trial computes (STUDY_SETTINGS): the same command started again finds the same study. It
records those settings (user attr `settings`) and refuses to be continued with others.

The driver lease: the search that drives a study writes who it is (host, pid, Prefect flow run)
and a heartbeat into the study (user attr `driver`) every BEAT_S seconds. Another search on the
same study is refused while that driver lives: its heartbeat is fresh and neither its process
(same host) nor its flow run (Prefect) is known to have ended.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components import files
from components.credentials import unescaped_userinfo
from components.params import Params, UserError
from components.tracking import shown

STORAGE_ENV = "CNN_PIPELINE_SEARCH_STORAGE"
SQLITE_TIMEOUT_S = 120  # trials of parallel workers write to one SQLite file: wait, don't fail
BEAT_S = 5.0  # the driver's heartbeat
STALE_S = 60.0  # a driver silent this long is gone, whatever else is known about it
SETTLE_S = 1.0  # after claiming: long enough for a rival's claim to land, read back to check
CLAIM_WAIT_S = 60.0  # how long a claim may keep being slower than SETTLE_S (a busy database)
CREATE_TRIES = 6  # processes opening one new storage at once: all but one lose a race, try again
CREATE_BACKOFF_S = 0.25
STUDY_SETTINGS = ("data", "augment", "model", "train")  # with search's: what a trial computes
SEARCH_KEYS = ("metric", "direction", "sampler", "pruner", "startup_trials", "min_epochs",
               "seed", "space")


def storage_url(params: Params) -> str:
    """Where the study lives (module docstring); may hold a password: never log it, use shown()."""
    url = os.environ.get(STORAGE_ENV) or params.search.storage
    if url:
        return url
    return f"sqlite:///{(Path(params.paths.search) / files.STUDY_DB).resolve()}"


def trial_storage_url(recorded: str) -> str:
    """For a trial: the URL its driver recorded (without password), or this environment's
    CNN_PIPELINE_SEARCH_STORAGE when it is that same database with its password."""
    env = os.environ.get(STORAGE_ENV)
    return env if env and shown(env) == recorded else recorded


def open_storage(url: str):
    import optuna

    if unescaped_userinfo(url):
        raise UserError(f"Optuna storage {shown(url)}: its user:password part holds an @ or / "
                        f"that is not percent-encoded (write @ as %40, / as %2F). Fix "
                        f"search.storage or {STORAGE_ENV}")
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
    else:
        kwargs = {"pool_pre_ping": True}  # a server's idle connections are closed under us
    for attempt in range(1, CREATE_TRIES + 1):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
        except Exception as err:  # a driver missing, a server down, a bad URL: say which storage
            if attempt < CREATE_TRIES and _lost_creation_race(err):
                time.sleep(CREATE_BACKOFF_S * attempt)
                continue
            raise UserError(f"Optuna storage {shown(url)} cannot be opened: {err}. Fix "
                            f"search.storage or {STORAGE_ENV}") from None


def _lost_creation_race(err: Exception) -> bool:
    """Another process was creating the same new storage's tables at the same moment (Optuna
    checks, then creates): a table, or the row recording the schema's version, is already there.
    Opened again a moment later, the storage is found made."""
    from sqlalchemy import exc

    if isinstance(err, exc.IntegrityError):
        return True
    return isinstance(err, exc.DBAPIError) and "already exists" in str(err.orig)


def settings(params: Params) -> dict[str, Any]:
    """What decides a trial's result: the study is for these and no others (train's settings of
    where and how fast it runs aside, as for resuming a training)."""
    from components.train import SAME_RUN_KEYS

    dumped = params.model_dump(mode="json")
    for key in SAME_RUN_KEYS:
        dumped["train"].pop(key)
    return {"search": {k: dumped["search"][k] for k in SEARCH_KEYS},
            **{section: dumped[section] for section in STUDY_SETTINGS}}


def study_name(params: Params) -> str:
    if params.search.study:
        return params.search.study
    blob = json.dumps(settings(params), sort_keys=True).encode()
    return f"{params.register.model_name}-{hashlib.sha256(blob).hexdigest()[:8]}"


def max_epochs(recorded: dict[str, Any]) -> int:
    """The most epochs a trial can run: train.epochs, or the top of the space's epochs."""
    spec = recorded["search"]["space"].get("train.epochs")
    if spec is None:
        return int(recorded["train"]["epochs"])
    return int(max(next(iter(spec.values()))))


def make_pruner(recorded: dict[str, Any]):
    """The pruner of the recorded settings: the driver and every trial build the same one."""
    import optuna

    search = recorded["search"]
    if search["pruner"] == "median":
        # A trial is pruned from epoch min_epochs on, once startup_trials trials have completed.
        return optuna.pruners.MedianPruner(n_startup_trials=search["startup_trials"],
                                           n_warmup_steps=search["min_epochs"])
    if search["pruner"] == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=search["min_epochs"],
                                              max_resource=max_epochs(recorded))
    return optuna.pruners.NopPruner()


def make_sampler(search: dict[str, Any], seed: int):
    import optuna

    if search["sampler"] == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # constant_liar: parallel trials do not all pick the same point while others are running.
    return optuna.samplers.TPESampler(n_startup_trials=search["startup_trials"], seed=seed,
                                      constant_liar=True)


def trial_state(name: str):
    """optuna's TrialState of that name (optuna is imported only where a search runs)."""
    import optuna

    return optuna.trial.TrialState[name]


@dataclass
class Handle:
    """A study and the storage it lives in (for reading and writing single trials)."""

    study: Any  # optuna.Study
    storage: Any  # optuna.storages.RDBStorage
    url: str
    name: str

    @property
    def study_id(self) -> int:
        return self.storage.get_study_id_from_name(self.name)

    def trial_id(self, number: int) -> int:
        return self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)

    def set_trial_attr(self, number: int, key: str, value: Any) -> None:
        self.storage.set_trial_user_attr(self.trial_id(number), key, value)

    def trial(self, number: int):
        return self.storage.get_trial(self.trial_id(number))


def open_study(params: Params, sampler=None) -> Handle:
    """The study of these settings: created, or found again and checked to be for them."""
    import optuna

    url, name, current = storage_url(params), study_name(params), settings(params)
    storage = open_storage(url)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own log says what happens
    study = optuna.create_study(storage=storage, study_name=name, load_if_exists=True,
                                direction=params.search.direction, pruner=make_pruner(current))
    recorded = study.user_attrs.get("settings")
    if recorded is None:
        study.set_user_attr("settings", current)
    elif recorded != current:
        changed = sorted(f"{s}.{k}" for s in current for k in {*current[s], *recorded.get(s, {})}
                         if current[s].get(k) != recorded.get(s, {}).get(k))
        raise UserError(
            f"study {name} in {shown(url)} was started with other settings (changed: "
            f"{', '.join(changed)}); continue it with those, or set search.study to a new name")
    # Seeded by how many trials exist: a resumed search does not draw its first points again.
    study.sampler = sampler or make_sampler(current["search"], params.search.seed
                                            + len(study.get_trials(deepcopy=False)))
    return Handle(study, storage, url, name)


def load_for_trial(study: str, url: str) -> Handle:
    """A trial's view of its study: the pruner from the study's recorded settings."""
    import optuna

    storage = open_storage(url)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        handle = optuna.load_study(study_name=study, storage=storage,
                                   sampler=optuna.samplers.RandomSampler())
    except KeyError:
        raise UserError(f"study {study} is not in {shown(url)}: the trial's storage must be its "
                        f"search's (search.storage or {STORAGE_ENV})") from None
    handle.pruner = make_pruner(handle.user_attrs["settings"])  # as open_study sets its sampler
    return Handle(handle, storage, url, study)


# --- the driver lease ---------------------------------------------------------------------------


def me(flow_run: str | None = None) -> dict[str, Any]:
    """Who this driver is, for the lease."""
    import psutil

    return {"id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
            "started": psutil.Process().create_time(), "flow_run": flow_run}


def alive(driver: dict[str, Any]) -> bool:
    """Whether the driver that wrote `driver` may still be driving."""
    import psutil

    if driver.get("ended") or time.time() - driver.get("beat", 0) > STALE_S:
        return False
    if driver.get("flow_run"):
        state = _flow_run_state(driver["flow_run"])
        if state is not None and state.is_final():
            return False
    if driver.get("host") == socket.gethostname():
        try:
            return same_start(psutil.Process(driver["pid"]).create_time(), driver["started"])
        except psutil.Error:
            return False
    return True


def same_start(seen: float, recorded: float) -> bool:
    """Whether two start times read by psutil (in clock ticks, computed again by each reader)
    are of the same process: a reused pid starts at another time."""
    return abs(seen - recorded) < 0.5


def _flow_run_state(flow_run: str):
    """The Prefect state of a flow run, or None when no Prefect API answers."""
    from prefect import get_client

    try:
        with get_client(sync_client=True) as client:
            return client.read_flow_run(flow_run).state
    except Exception:  # no server, or not the server that knows it: the heartbeat decides
        return None


def describe(driver: dict[str, Any]) -> str:
    where = f"flow run {driver['flow_run']}" if driver.get("flow_run") else "a process"
    age = time.time() - driver.get("beat", 0)
    return f"{where} (pid {driver['pid']} on {driver['host']}), last seen {age:.0f} s ago"


class Lease:
    """This search's claim on the study, kept fresh by a heartbeat thread while it drives."""

    def __init__(self, handle: Handle, owner: dict[str, Any]):
        self.handle, self.owner = handle, owner
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="study-lease", daemon=True)

    def __enter__(self) -> Lease:
        study, name = self.handle.study, self.handle.name
        self._claim()
        time.sleep(SETTLE_S)
        if study.user_attrs.get("driver", {}).get("id") != self.owner["id"]:
            raise UserError(f"study {name}: another search claimed it at the same moment: "
                            f"{describe(study.user_attrs['driver'])}")
        self._thread.start()
        return self

    def _claim(self) -> None:
        """Write our claim, unless a live rival drives the study. A write slower than SETTLE_S
        could land after a rival checked its own claim (components.register's RegistryLock
        guards the same): then we wait out a heartbeat, by which a rival that holds the study
        has written itself back, and look again, until CLAIM_WAIT_S."""
        name, deadline = self.handle.name, time.monotonic() + CLAIM_WAIT_S
        while True:
            started = time.monotonic()
            current = self.handle.study.user_attrs.get("driver")
            if current and current["id"] != self.owner["id"] and alive(current):
                raise UserError(
                    f"study {name} in {shown(self.handle.url)} is being driven by another live "
                    f"search: {describe(current)}. Wait for it to end or stop it, or set "
                    "search.study to another name")
            self._write()
            if time.monotonic() - started < SETTLE_S:
                return
            if time.monotonic() > deadline:
                raise UserError(f"study {name}: each claim took over {SETTLE_S:g} s for "
                                f"{CLAIM_WAIT_S:g} s (a busy {shown(self.handle.url)}), too slow "
                                "to tell whether another search claimed it too; run the search "
                                "again")
            time.sleep(BEAT_S + SETTLE_S)

    def _write(self, **extra: Any) -> None:
        self.handle.study.set_user_attr("driver", {**self.owner, "beat": time.time(), **extra})

    def _beat(self) -> None:
        while not self._stop.wait(BEAT_S):
            with contextlib.suppress(Exception):  # a busy database: the next beat tries again
                self._write()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._write(ended=True)
