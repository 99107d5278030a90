"""Tracking: one MLflow run per pipeline run, fed by train, evaluate and register.

Where: `MLFLOW_TRACKING_URI` alone says. Unset, the embedded default is `mlflow.db` (SQLite) in the
working directory with artifacts in `mlartifacts/` beside it, so nothing has to be started. The
experiment is `register.experiment`, or `register.model_name` when that is null.

One run, three processes: train starts the run and writes its id to `<paths.train>/run.json`
(atomically); evaluate and register (separate processes under `dvc repro`) open that run again.
A train that resumes after a crash keeps logging into the run it started.

The run gets, when train starts: the validated params flattened (`section.key`), lineage tags
(git commit and dirty tree, the prepared data's DVC hash, a params hash, the dataset's name), the
prepared data as a run input whose digest is that DVC hash, and the artifacts policy.json,
preview.png, params.yaml (as validated, overrides included), dvc.lock and manifest.json; per-epoch
metrics; history.json at the end. Evaluate and register add their own through `log_metrics`,
`log_artifacts` and `set_tags`.

Metrics never slow training down or stop it: `on_epoch_end` only appends to a buffer that a
background thread delivers in batches (`log_batch`). When the server is away the thread retries
with backoff; at the end the step waits up to `register.flush_timeout_s` for it, and what is still
undelivered (metrics, tags, artifacts) is parked in `<paths.train>/mlflow-pending.json`, which the
next step or run delivers first. An unreachable server fails a step before any work, naming it.

Steps stay usable without MLflow: only their main() wires this in, through `tracked(step)`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, LifecycleStage, Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from components.atomic import write_json
from components.params import Params, UserError, flatten
from components.prepared import MANIFEST, load_split, read_manifest

RUN_FILE = "run.json"
PENDING_FILE = "mlflow-pending.json"
EMBEDDED_DB = "mlflow.db"
EMBEDDED_ARTIFACTS = "mlartifacts"
PROBE_TIMEOUT_S = 5.0  # a live server answers /health in milliseconds
BACKOFF_S = (0.5, 30.0)  # first and longest wait between delivery attempts
BATCH = 1000  # MLflow's limits per log_batch: metrics, and tags or params
TAG_BATCH = 100
UNSAFE_KEY = re.compile(r"[^\w\-. :/]")  # MLflow refuses other characters in metric keys


def tracking_uri() -> str:
    """The address from MLFLOW_TRACKING_URI, else the embedded SQLite store in the project."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(EMBEDDED_DB).resolve()}"


def shown(uri: str) -> str:
    """`uri` without any user:password part, for messages and tags."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None and parts.username is None:
        return uri
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.hostname + (
        f":{parts.port}" if parts.port else "")))


def check_reachable(uri: str) -> None:
    """Fail fast, naming the address, when an HTTP tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return  # it answered: reachable, whatever it thinks of /health
    except OSError as err:
        reason = getattr(err, "reason", err)
        raise UserError(
            f"MLflow tracking server {shown(uri)} (MLFLOW_TRACKING_URI) is unreachable: {reason}. "
            "Start it or fix the address; unset MLFLOW_TRACKING_URI to track into the "
            f"embedded {EMBEDDED_DB} instead"
        ) from None


def _answers(uri: str) -> bool:
    try:
        check_reachable(uri)
        return True
    except UserError:
        return False


# --- lineage ------------------------------------------------------------------------------------


def git_state(cwd: str | Path = ".") -> tuple[str, str]:
    """(commit, dirty) of the working tree, 'unknown' for both without git or a repository."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                                text=True, timeout=30, check=True).stdout.strip()
        # Untracked files are run outputs and caches, not changes to the code.
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                                capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown", "unknown"
    return commit, "true" if status.strip() else "false"


def params_hash(params: Params) -> str:
    canonical = json.dumps(params.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def data_hash(folder: str | Path, lock: str | Path = "dvc.lock") -> str:
    """The hash DVC records for a folder (`<md5>.dir`): from dvc.lock when it describes the folder
    as it is now, else computed as DVC computes it (dvc-data's tree hash)."""
    folder = Path(folder)
    recorded = _locked_hash(folder, Path(lock))
    return recorded or dvc_dir_hash(folder)


def _locked_hash(folder: Path, lock: Path) -> str | None:
    if not lock.is_file():
        return None
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    for stage in stages.values():
        for out in stage.get("outs", []):
            if (lock.parent / out["path"]).resolve() != folder.resolve():
                continue
            files = [p for p in folder.rglob("*") if p.is_file()]
            # A lock written before the folder was made again is stale: size and count tell.
            if out.get("nfiles") == len(files) and out.get("size") == sum(
                    p.stat().st_size for p in files):
                return out.get("md5")
    return None


def dvc_dir_hash(folder: str | Path) -> str:
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    fs = LocalFileSystem()
    with tempfile.TemporaryDirectory() as tmp:
        _, _, tree = build(HashFileDB(fs, tmp, hash_name="md5"), str(Path(folder).resolve()), fs,
                           "md5", dry_run=True)
    return tree.hash_info.value


def lineage(params: Params) -> dict[str, str]:
    """The tags that tie a run and a model version to code, data and settings."""
    commit, dirty = git_state()
    manifest = read_manifest(params.paths.prepared)
    return {
        "git.commit": commit, "git.dirty": dirty, "mlflow.source.git.commit": commit,
        "data.hash": data_hash(params.paths.prepared), "data.name": dataset_name(params, manifest),
        "data.test_hash": str(manifest.get("hashes", {}).get("test", "unknown")),
        "params.hash": params_hash(params),
    }


def dataset_name(params: Params, manifest: dict) -> str:
    source = manifest.get("source", params.data.source)
    return Path(params.data.root).name if source == "imagefolder" else str(source)


# --- delivery -----------------------------------------------------------------------------------


def _permanent(err: Exception) -> bool:
    """A request the server understood and refused (bad key, deleted run): retrying won't help."""
    status = err.get_http_status_code() if isinstance(err, MlflowException) else None
    return status is not None and 400 <= status < 500 and status != 429


class Outbox:
    """Metrics and tags waiting for the server, delivered in batches by a background thread."""

    def __init__(self, client: MlflowClient, run_id: str, uri: str):
        self.client, self.run_id, self.uri = client, run_id, uri
        self.metrics: list[Metric] = []
        self.tags: list[RunTag] = []
        self.last_error: Exception | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._deadline: float | None = None  # set by close(): stop trying after it
        self._thread = threading.Thread(target=self._loop, name="mlflow-outbox", daemon=True)
        self._thread.start()

    def put(self, metrics: Iterable[Metric] = (), tags: Iterable[RunTag] = ()) -> None:
        with self._lock:
            self.metrics.extend(metrics)
            self.tags.extend(tags)
        self._wake.set()

    def close(self, timeout: float) -> tuple[list[Metric], list[RunTag]]:
        """Wait up to `timeout` s for everything to go out; return what did not."""
        self._deadline = time.monotonic() + timeout
        self._wake.set()
        self._thread.join(timeout + PROBE_TIMEOUT_S)
        with self._lock:
            left = self.metrics, self.tags
            self.metrics, self.tags = [], []
        return left

    def _loop(self) -> None:
        backoff = BACKOFF_S[0]
        while True:
            with self._lock:
                metrics, tags = self.metrics[:BATCH], self.tags[:TAG_BATCH]
            closing = self._deadline is not None
            if closing and (not (metrics or tags) or time.monotonic() > self._deadline):
                return
            if (metrics or tags) and self._send(metrics, tags):
                backoff = BACKOFF_S[0]
                continue
            wait = None
            if metrics or tags:
                wait = backoff = min(2 * backoff, BACKOFF_S[1])
            if closing:
                wait = max(0.0, min(backoff, self._deadline - time.monotonic()))
            self._wake.wait(wait)
            self._wake.clear()

    def _send(self, metrics: list[Metric], tags: list[RunTag]) -> bool:
        # The probe fails in milliseconds when the server is down, where a log_batch would sit in
        # the client's own retries for minutes.
        if not _answers(self.uri):
            self.last_error = ConnectionError(f"{shown(self.uri)} does not answer")
            return False
        try:
            self.client.log_batch(self.run_id, metrics=metrics, tags=tags, synchronous=True)
        except Exception as err:  # any failure: keep them unless they can never go in
            self.last_error = err
            if not _permanent(err):
                return False
            _say(f"MLflow refused {len(metrics)} metrics and {len(tags)} tags for run "
                 f"{self.run_id}: {err}; dropped")
        with self._lock:
            del self.metrics[:len(metrics)]
            del self.tags[:len(tags)]
        return True


def _send_entry(client: MlflowClient, entry: dict[str, Any]) -> None:
    metrics = [Metric(**m) for m in entry["metrics"]]
    tags = [RunTag(k, v) for k, v in entry["tags"].items()]
    for i in range(0, max(len(metrics), len(tags)), TAG_BATCH):
        client.log_batch(entry["run_id"], metrics=metrics[i:i + TAG_BATCH],
                         tags=tags[i:i + TAG_BATCH], synchronous=True)
    for local, artifact_path in entry["artifacts"]:
        if Path(local).exists():
            client.log_artifact(entry["run_id"], local, artifact_path or None)


class Pending:
    """What a step could not deliver (metrics, tags, artifacts), parked for the next step."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / PENDING_FILE

    def read(self) -> dict[str, Any]:
        return json.loads(self.path.read_text()) if self.path.is_file() else {}

    def add(self, uri: str, run_id: str, metrics: list[Metric], tags: list[RunTag],
            artifacts: list[list[str]]) -> None:
        if not (metrics or tags or artifacts):
            return
        data = self.read()
        entry = data.setdefault(f"{shown(uri)} {run_id}", {"uri": shown(uri), "run_id": run_id,
                                                    "metrics": [], "tags": {}, "artifacts": []})
        entry["metrics"] += [{"key": m.key, "value": m.value, "timestamp": m.timestamp,
                              "step": m.step} for m in metrics]
        entry["tags"] |= {t.key: t.value for t in tags}
        entry["artifacts"] += [a for a in artifacts if a not in entry["artifacts"]]
        write_json(self.path, data)
        _say(f"MLflow at {shown(uri)} is unreachable: {len(metrics)} metrics, {len(tags)} tags "
             f"and {len(artifacts)} artifacts of run {run_id} wait in {self.path}; the next step "
             "delivers them")

    def deliver(self, client: MlflowClient, uri: str) -> None:
        data = self.read()
        mine = [key for key, entry in data.items() if entry["uri"] == shown(uri)]
        for key in mine:
            entry = data[key]
            try:
                _send_entry(client, entry)
            except MlflowException as err:
                if not _permanent(err):
                    raise
                _say(f"MLflow refused what waited for run {entry['run_id']}: {err}; dropped")
            del data[key]
            write_json(self.path, data)
        if mine and not data:
            self.path.unlink(missing_ok=True)


# --- the tracker --------------------------------------------------------------------------------


class Tracker:
    """An MLflow run shared by the steps of one pipeline run; see the module docstring."""

    def __init__(self, params: Params, client: MlflowClient, uri: str, run_id: str):
        self.params, self.client, self.uri, self.run_id = params, client, uri, run_id
        self.experiment_id = client.get_run(run_id).info.experiment_id
        self.folder = Path(params.paths.train)
        self.pending = Pending(self.folder)
        self.outbox = Outbox(client, run_id, uri)
        self.unsent: list[list[str]] = []  # artifacts whose upload failed
        self.closed = False

    @classmethod
    def start(cls, params: Params) -> Tracker:
        """For train: a new run (or the unfinished one a crashed train resumes), with params,
        lineage tags, the dataset input and the inputs' artifacts."""
        uri, client = _connect()
        old = _read_run_file(params)
        reuse = (old and old["tracking_uri"] == shown(uri) and not old.get("train_finished")
                 and params.train.resume != "never"
                 and (Path(params.paths.train) / "checkpoints" / "last.pt").exists()
                 and _live_run(client, old["run_id"]))
        if reuse:
            run_id = old["run_id"]
            client.update_run(run_id, status="RUNNING")
        else:
            run_id = _new_run(client, params)
        tracker = cls(params, client, uri, run_id)
        tracker._open(fresh=not reuse)
        return tracker

    @classmethod
    def resume(cls, params: Params) -> Tracker:
        """For evaluate and register: the run train started (a new one if train ran untracked)."""
        old = _read_run_file(params)
        if old is None:
            return cls.start(params)
        uri, client = _connect()
        if old["tracking_uri"] != shown(uri):
            raise UserError(
                f"{Path(params.paths.train) / RUN_FILE}: train tracked into "
                f"{shown(old['tracking_uri'])} but MLFLOW_TRACKING_URI now means {shown(uri)}; "
                "point it back, or run train again to start a run there"
            )
        if not _live_run(client, old["run_id"]):
            raise UserError(
                f"run {old['run_id']} (from {Path(params.paths.train) / RUN_FILE}) is not in "
                f"{shown(uri)} or was deleted; run train again to start a new run"
            )
        client.update_run(old["run_id"], status="RUNNING")
        tracker = cls(params, client, uri, old["run_id"])
        tracker.pending.deliver(client, uri)
        return tracker

    def _open(self, fresh: bool) -> None:
        self.pending.deliver(self.client, self.uri)
        params = self.params
        logged = {} if fresh else self.client.get_run(self.run_id).data.params
        flat = [Param(k, str(v)) for k, v in flatten(params).items() if k not in logged]
        tags = lineage(params)
        flat_tags = [RunTag(k, v) for k, v in tags.items()]
        for i in range(0, max(len(flat), len(flat_tags)), TAG_BATCH):
            self.client.log_batch(self.run_id, params=flat[i:i + TAG_BATCH],
                                  tags=flat_tags[i:i + TAG_BATCH], synchronous=True)
        if fresh:
            self._log_dataset(tags)
            self._log_inputs()
        self._write_run_file(train_finished=False)

    def _log_dataset(self, tags: dict[str, str]) -> None:
        import mlflow.data

        folder = Path(self.params.paths.prepared)
        train = load_split(folder, "train")
        with warnings.catch_warnings():  # "source can be interpreted in multiple ways": all local
            warnings.simplefilter("ignore", UserWarning)
            ds = mlflow.data.from_numpy(train.x, targets=train.y, source=str(folder.resolve()),
                                        name=tags["data.name"], digest=tags["data.hash"])
        entity = Dataset(**ds.to_dict())
        context = InputTag("mlflow.data.context", "train")
        self.client.log_inputs(self.run_id, [DatasetInput(entity, [context])])

    def _log_inputs(self) -> None:
        from components.augment import PREVIEW_FILE
        from components.transforms import POLICY_FILE

        augment = Path(self.params.paths.augment)
        self.log_artifacts([augment / POLICY_FILE, augment / PREVIEW_FILE], "augment")
        self.log_artifacts([Path(self.params.paths.prepared) / MANIFEST], "data")
        self.log_artifacts([Path("dvc.lock")])
        # The settings as validated, overrides included: what this run really used.
        dumped = yaml.safe_dump(self.params.model_dump(mode="json"), sort_keys=False)
        self.client.log_text(self.run_id, dumped, "params.yaml")

    def _write_run_file(self, train_finished: bool) -> None:
        write_json(self.folder / RUN_FILE, {
            "run_id": self.run_id, "tracking_uri": shown(self.uri),  # no password in files
            "experiment_id": self.experiment_id,
            "train_finished": train_finished,
        })

    # The train callback protocol.
    def on_epoch_end(self, epoch: int, metrics: dict[str, Any]) -> None:
        self.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)

    def on_train_end(self, result: Any) -> None:
        summary = {"train.best_epoch": result.best_epoch, "train.seconds": result.train_seconds,
                   "train.images_per_s": result.images_per_s}
        self.log_metrics(summary, step=result.epochs)
        self.set_tags({"train.device": str(result.device), "train.precision": result.precision})
        self.log_artifacts([Path(result.history_path)], "train")
        self._write_run_file(train_finished=True)

    # What evaluate and register call.
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Queue numeric values (nested dicts become dotted keys); delivered in the background."""
        now = int(time.time() * 1000)
        self.outbox.put(Metric(UNSAFE_KEY.sub("_", k), v, now, step or 0)
                        for k, v in _numbers(metrics))

    def log_artifacts(self, paths: Iterable[str | Path], artifact_path: str | None = None) -> None:
        """Upload the files (or folders) that exist; a failed upload waits in the pending file."""
        for path in map(Path, paths):
            if not path.exists():
                continue
            if not _answers(self.uri):  # don't sit in the client's retries: keep it for later
                self.unsent.append([str(path.resolve()), artifact_path or ""])
                continue
            try:
                if path.is_dir():
                    self.client.log_artifacts(self.run_id, str(path), artifact_path)
                else:
                    self.client.log_artifact(self.run_id, str(path), artifact_path)
            except Exception as err:  # a dead server: keep it for later, don't fail the step
                _say(f"could not upload {path} to MLflow ({err}); kept for later")
                self.unsent.append([str(path.resolve()), artifact_path or ""])

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Queue tags; delivered in the background like metrics."""
        self.outbox.put(tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def close(self, status: str = "FINISHED") -> None:
        """Deliver what is queued (waiting up to register.flush_timeout_s), park the rest, and
        mark the run with the step's outcome."""
        if self.closed:
            return
        self.closed = True
        metrics, tags = self.outbox.close(self.params.register.flush_timeout_s)
        self.pending.add(self.uri, self.run_id, metrics, tags, self.unsent)
        if metrics or tags or self.unsent or not _answers(self.uri):
            return  # the status can wait; the pending file is the record
        try:
            # Its "View run at" lines go to stderr: stdout is the step's JSON summary.
            with contextlib.redirect_stdout(sys.stderr):
                self.client.set_terminated(self.run_id, status)
        except Exception as err:  # the status is cosmetic; the data is already in
            _say(f"could not mark run {self.run_id} {status}: {err}")

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, kind, value, tb) -> None:
        self.close("FAILED" if kind else "FINISHED")


def tracked(step: Callable[..., Any]) -> Callable[[Params], Any]:
    """`step` tracked in MLflow, for its main(): train gets a Tracker as a callback and starts
    the run; evaluate and register get the run train started as `tracker`."""

    @functools.wraps(step)
    def run(params: Params) -> Any:
        if step.__name__ == "train":
            with Tracker.start(params) as tracker:
                return step(params, callbacks=[tracker])
        with Tracker.resume(params) as tracker:
            return step(params, tracker=tracker)

    return run


# --- helpers ------------------------------------------------------------------------------------


def _connect() -> tuple[str, MlflowClient]:
    uri = tracking_uri()
    check_reachable(uri)
    return uri, MlflowClient(tracking_uri=uri)


def experiment_id(client: MlflowClient, params: Params) -> str:
    name = params.register.experiment or params.register.model_name
    found = client.get_experiment_by_name(name)
    if found is None:
        # The embedded store keeps artifacts beside it, not in MLflow's default ./mlruns.
        location = None if os.environ.get("MLFLOW_TRACKING_URI") else (
            Path(EMBEDDED_ARTIFACTS).resolve().as_uri())
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException:  # created by a concurrent pipeline a moment ago
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
    if found.lifecycle_stage == LifecycleStage.DELETED:
        client.restore_experiment(found.experiment_id)
    return found.experiment_id


def _new_run(client: MlflowClient, params: Params) -> str:
    run = client.create_run(
        experiment_id(client, params),
        run_name=f"{params.model.name}-{params.data.source}",
        tags={"mlflow.source.name": "components.train", "mlflow.source.type": "LOCAL"},
    )
    return run.info.run_id


def _live_run(client: MlflowClient, run_id: str) -> bool:
    try:
        return client.get_run(run_id).info.lifecycle_stage == LifecycleStage.ACTIVE
    except MlflowException:
        return False


def _read_run_file(params: Params) -> dict | None:
    path = Path(params.paths.train) / RUN_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _numbers(metrics: dict[str, Any], prefix: str = "") -> Iterable[tuple[str, float]]:
    for key, value in metrics.items():
        if isinstance(value, dict):
            yield from _numbers(value, f"{prefix}{key}.")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            yield f"{prefix}{key}", float(value)  # NaN too: MLflow stores it as such


def _say(message: str) -> None:
    print(message, file=sys.stderr)
