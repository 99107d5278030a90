"""Tracking: one MLflow run per pipeline run, fed by train, evaluate and register.

Where: `MLFLOW_TRACKING_URI` alone says. Unset, the embedded default is `mlflow.db` (SQLite) in the
working directory with artifacts in `mlartifacts/` beside it, so nothing has to be started. The
experiment is `register.experiment`, or `register.model_name` when that is null.

One run, three processes: train opens the run and writes its id to `<paths.train>/run.json`
(atomically); evaluate and register (separate processes under `dvc repro`) join that run. A train
that continues its last checkpoint keeps logging into the run that wrote it: after a crash, and
when a finished run is started again (`dvc repro --force`), so that no new run and no new model
version is made; a train that starts fresh gets a new run.

A new run is named so that MLflow's runs list tells it apart (`run_name`): the Prefect flow run's
name, the DVC experiment's under `dvc exp run` (DVC_EXP_NAME, which DVC sets for each stage), else
`<model>-<data>` and the settings that differ from params.yaml; it is tagged with the flow run
(`prefect.flow_run_name`, ... from flows/) or the experiment (`dvc.experiment`, `dvc.baseline`).

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

Where a step's inputs are read-only (Kubeflow passes them as artifacts), the runner says so with
`tracked(..., pending_dir=<the step's own output folder>)`: what the step could not deliver is
parked there, and what earlier steps parked in their folders (any `paths` folder) is delivered
without rewriting their files (MLflow ignores a metric it already holds, so a second delivery
adds nothing). There, too, the run id travels as a value: train writes it to `run_id_out`, and
the later steps join the run given as `run_id` rather than the one run.json names. Without git
(a container), the commit and dirty flag come from CNN_PIPELINE_GIT_COMMIT and _DIRTY, which the
Kubeflow pipeline records when it is compiled.

Steps stay usable without MLflow: they take an optional `tracker`, and every entry point (a step's
main() through components.cli, a flow's task) attaches it the same way, with `tracked(step)`.
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
from typing import Any, Literal

import yaml
from mlflow import MlflowClient
from mlflow.entities import (
    Dataset,
    DatasetInput,
    InputTag,
    LifecycleStage,
    Metric,
    Param,
    Run,
    RunTag,
)
from mlflow.exceptions import MlflowException

from components import files
from components.atomic import atomic_file, write_json
from components.credentials import redact, shown  # secrets masked in text, dropped in addresses
from components.params import DEFAULT_PARAMS, Params, UserError, flatten, load_params
from components.prepared import load_split, read_manifest

EMBEDDED_DB = "mlflow.db"
EMBEDDED_ARTIFACTS = "mlartifacts"
PROBE_TIMEOUT_S = 5.0  # a live server answers /health in milliseconds
BACKOFF_S = (0.5, 30.0)  # first and longest wait between delivery attempts
BATCH = 1000  # MLflow's limits per log_batch: metrics, and tags or params
TAG_BATCH = 100
UNSAFE_KEY = re.compile(r"[^\w\-. :/]")  # MLflow refuses other characters in metric keys
# A database's unique-key violation (PostgreSQL, SQLite, MySQL), as MLflow's server passes it on.
DUPLICATE_KEY = re.compile(r"duplicate key|UNIQUE constraint failed|Duplicate entry", re.I)
GIT_ENV = ("CNN_PIPELINE_GIT_COMMIT", "CNN_PIPELINE_GIT_DIRTY")  # git_state where git is not
# What `dvc exp run` tells each stage's process about its experiment (dvc/env.py; set in
# dvc/repo/experiments/queue/base.py for every way an experiment runs): the run's tags.
DVC_EXP_TAGS = {"dvc.experiment": "DVC_EXP_NAME", "dvc.baseline": "DVC_EXP_BASELINE_REV"}
NAMED_SECTIONS = ("data", "augment", "model", "train")  # settings that make a run's model
NAME_MAX = 250  # characters of a run name (MLflow's limit)


def tracking_uri() -> str:
    """The address from MLFLOW_TRACKING_URI, else the embedded SQLite store in the project."""
    return os.environ.get("MLFLOW_TRACKING_URI") or embedded_uri()


def embedded_uri() -> str:
    return f"sqlite:///{Path(EMBEDDED_DB).resolve()}"


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
    """(commit, dirty) of the working tree; without git or a repository, what GIT_ENV's variables
    say (a container built from a commit sets them), else 'unknown' for both."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                                text=True, timeout=30, check=True).stdout.strip()
        # Untracked files are run outputs and caches, not changes to the code.
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                                capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return os.environ.get(GIT_ENV[0], "unknown"), os.environ.get(GIT_ENV[1], "unknown")
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
        self.path = Path(folder) / files.PENDING

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

    def deliver(self, client: MlflowClient, uri: str, keep: bool = False) -> None:
        """Send what waits for `uri`, removing each entry once it is in; `keep`: leave the file
        as it is (another step's, in a read-only input)."""
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
            if keep:
                continue
            del data[key]
            write_json(self.path, data)
        if mine and not data and not keep:
            self.path.unlink(missing_ok=True)


# --- the tracker --------------------------------------------------------------------------------


class Tracker:
    """An MLflow run shared by the steps of one pipeline run; see the module docstring."""

    def __init__(self, params: Params, client: MlflowClient, uri: str, run_id: str | None = None,
                 pending_dir: str | Path | None = None):
        self.params, self.client, self.uri = params, client, uri
        self.folder = Path(params.paths.train)
        self.pending = Pending(pending_dir or self.folder)
        # Read-only inputs: what earlier steps parked in their own folders (module docstring).
        folders = {Path(f).resolve() for f in params.paths.model_dump().values()}
        self.inherited = [] if pending_dir is None else [
            Pending(f) for f in sorted(folders - {Path(pending_dir).resolve()})]
        self.unsent: list[list[str]] = []  # artifacts whose upload failed
        self.closed = False
        self.run_id = self.experiment_id = self.outbox = None
        self.origin: tuple[str | None, dict[str, str]] = (None, {})  # a new run's name and tags
        if run_id is not None:
            self._attach(run_id)

    def _attach(self, run_id: str, experiment_id: str | None = None) -> None:
        """Log into run `run_id` (of `experiment_id`, asked of the server when not given)."""
        self.run_id = run_id
        self.experiment_id = experiment_id or self.client.get_run(run_id).info.experiment_id
        self.outbox = Outbox(self.client, run_id, self.uri)

    def _deliver_pending(self) -> None:
        for inherited in self.inherited:
            inherited.deliver(self.client, self.uri, keep=True)
        self.pending.deliver(self.client, self.uri)

    @classmethod
    def start(cls, params: Params, pending_dir: str | Path | None = None,
              run_name: str | None = None, run_tags: dict[str, str] | None = None) -> Tracker:
        """For train: connected now, so an unreachable server fails before any work; the run is
        chosen when train says where it starts (`on_train_start`). A new run is named `run_name`
        (else `run_name()` decides) and tagged `run_tags` (who started it, e.g. a flow run)."""
        uri, client = _connect()
        tracker = cls(params, client, uri, pending_dir=pending_dir)
        tracker.origin = (run_name, run_tags or {})
        tracker._deliver_pending()
        return tracker

    @classmethod
    def resume(cls, params: Params, run_id: str | None = None,
               pending_dir: str | Path | None = None) -> Tracker:
        """For evaluate, register and export: the run train started, `run_id` (on this process's
        tracking server) or the one run.json names (a new one if train ran untracked)."""
        if run_id is not None:
            old = {"run_id": run_id, "tracking_uri": shown(tracking_uri())}
            source = "passed on by train"
        else:
            old, source = _read_run_file(params), f"from {Path(params.paths.train) / files.RUN}"
        if old is None:
            tracker = cls.start(params, pending_dir)
            tracker.open_run(continues=False)
            return tracker
        uri, client = _connect()
        if old["tracking_uri"] != shown(uri):
            raise UserError(
                f"{Path(params.paths.train) / files.RUN}: train tracked into "
                f"{shown(old['tracking_uri'])} but MLFLOW_TRACKING_URI now means {shown(uri)}; "
                "point it back, or run train again to start a run there"
            )
        live = _live_run(client, old["run_id"])
        if live is None:
            raise UserError(
                f"run {old['run_id']} ({source}) is not in "
                f"{shown(uri)} or was deleted; run train again to start a new run"
            )
        client.update_run(old["run_id"], status="RUNNING")
        tracker = cls(params, client, uri, pending_dir=pending_dir)
        tracker._attach(old["run_id"], live.info.experiment_id)
        tracker._deliver_pending()
        return tracker

    @classmethod
    def batch(cls, params: Params) -> Tracker:
        """For batch prediction: a new run of its own in the model's experiment (a batch is not
        a training run); what the server does not take waits under paths.predictions."""
        uri, client = _connect()
        tracker = cls(params, client, uri)
        tracker.pending = Pending(params.paths.predictions)  # leftovers wait beside the batch's
        tracker.pending.deliver(client, uri)
        run = client.create_run(experiment_id(client, params), run_name="batch-predict", tags={
            "mlflow.source.name": "components.predict", "mlflow.source.type": "LOCAL",
            "pipeline.kind": "batch-predict"})
        tracker._attach(run.info.run_id, run.info.experiment_id)
        return tracker

    def open_run(self, continues: bool) -> None:
        """The run of train's output: the one run.json names when train continues what that run
        wrote (a resume after a crash, or a finished run started again: no new run, so nothing
        downstream makes a new model version), else a new run with params, lineage tags, the
        dataset input and the inputs' artifacts."""
        old = _read_run_file(self.params)
        live = (_live_run(self.client, old["run_id"])
                if continues and old and old["tracking_uri"] == shown(self.uri) else None)
        reuse = live is not None
        if reuse:
            self.client.update_run(old["run_id"], status="RUNNING")
        run = live if reuse else _new_run(self.client, self.params, *self.origin)
        self._attach(run.info.run_id, run.info.experiment_id)
        logged = live.data.params if reuse else {}
        flat = [Param(k, str(v)) for k, v in flatten(self.params).items() if k not in logged]
        tags = lineage(self.params)
        flat_tags = [RunTag(k, v) for k, v in tags.items()]
        for i in range(0, max(len(flat), len(flat_tags)), TAG_BATCH):
            self.client.log_batch(self.run_id, params=flat[i:i + TAG_BATCH],
                                  tags=flat_tags[i:i + TAG_BATCH], synchronous=True)
        if not reuse:
            log_dataset(self.client, self.run_id, self.params, tags)
            self._log_inputs()
        write_json(self.folder / files.RUN, {
            "run_id": self.run_id, "tracking_uri": shown(self.uri),  # no password in files
            "experiment_id": self.experiment_id,
        })

    def _log_inputs(self) -> None:
        augment = Path(self.params.paths.augment)
        self.log_artifacts([augment / files.POLICY, augment / files.PREVIEW], "augment")
        self.log_artifacts([Path(self.params.paths.prepared) / files.MANIFEST], "data")
        self.log_artifacts([Path("dvc.lock")])
        # The settings as validated, overrides included: what this run really used.
        dumped = yaml.safe_dump(self.params.model_dump(mode="json"), sort_keys=False)
        self.client.log_text(self.run_id, dumped, DEFAULT_PARAMS)

    # The train callback protocol.
    def on_train_start(self, resumed_from: int) -> None:
        self.open_run(continues=resumed_from > 0)

    def on_epoch_end(self, epoch: int, metrics: dict[str, Any]) -> None:
        self.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)

    def on_train_end(self, result: Any) -> None:
        if result.epochs > result.resumed_from:  # a finished run started again trained nothing
            summary = {"train.best_epoch": result.best_epoch,
                       "train.seconds": result.train_seconds,
                       "train.images_per_s": result.images_per_s}
            self.log_metrics(summary, step=result.epochs)
            self.set_tags({"train.device": str(result.device),
                           "train.precision": result.precision})
        self.log_artifacts([Path(result.history_path)], "train")

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
        self.outbox.put(tags=[RunTag(k, redact(str(v))) for k, v in tags.items()])

    def close(self, status: str = "FINISHED") -> None:
        """Deliver what is queued (waiting up to register.flush_timeout_s), park the rest, and
        mark the run with the step's outcome."""
        if self.closed:
            return
        self.closed = True
        if self.run_id is None:
            return  # train failed before it opened its run: nothing was logged
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


def tracked(step: Callable[..., Any], run: Literal["start", "join", "batch"] = "join", *,
            run_id: str | None = None, run_id_out: str | Path | None = None,
            pending_dir: str | Path | None = None, run_name: str | None = None,
            run_tags: dict[str, str] | None = None) -> Callable[[Params], Any]:
    """`step(params, tracker=...)` with the pipeline's MLflow run attached, closed with the
    step's outcome: the one way every entry point (a step's main(), a flow's task) tracks a step.
    `start`: train, which picks the run when it knows where it starts; `join`: the later steps,
    which log into the run train started (`run_id`, else the one run.json names); `batch`:
    batch prediction, a new run per batch. `run_id_out`: a file to write the run's id to;
    `pending_dir`: the step's own folder, where its inputs are read-only (module docstring);
    `run_name`, `run_tags`: a new run's (`start`), from the runner that started it (a flow run).
    While the step runs, mlflow's process-wide default is the run's server (`mlflow_default`)."""
    if run == "start":
        opens = functools.partial(Tracker.start, pending_dir=pending_dir, run_name=run_name,
                                  run_tags=run_tags)
    elif run == "join":
        opens = functools.partial(Tracker.resume, run_id=run_id, pending_dir=pending_dir)
    else:
        opens = Tracker.batch

    @functools.wraps(step)
    def with_tracker(params: Params) -> Any:
        with opens(params) as tracker, mlflow_default(tracker.uri):
            result = step(params, tracker=tracker)
        if run_id_out is not None:
            with atomic_file(run_id_out) as tmp:
                tmp.write_text(tracker.run_id)
        return result

    return with_tracker


@contextlib.contextmanager
def mlflow_default(uri: str):
    """mlflow's process-wide tracking address (what `mlflow.pyfunc.log_model` and `models:/` URIs
    use) set to the run's `uri` inside, and put back after, with the MLFLOW_TRACKING_URI variable
    that mlflow.set_tracking_uri also writes: a step run in-process (a flow's task, a test) leaves
    the process pointing where it pointed before, not at a server that may since have gone."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)
        if before is not None:
            os.environ["MLFLOW_TRACKING_URI"] = before


def log_with_version(client: MlflowClient, version: Any, path: str | Path) -> bool:
    """Upload `path` beside a registered version's model (into its logged model's artifacts,
    which `models:/<name>/<version>` downloads); False for a version that has no logged model."""
    source = str(version.source)
    model_id = version.model_id or (source.removeprefix("models:/")
                                    if source.startswith("models:/m-") else None)
    if not model_id:
        return False
    client.log_model_artifact(model_id, str(path))
    return True


# --- helpers ------------------------------------------------------------------------------------


def _connect() -> tuple[str, MlflowClient]:
    uri = tracking_uri()
    check_reachable(uri)
    return uri, MlflowClient(tracking_uri=uri)


def experiment_id(client: MlflowClient, params: Params) -> str:
    name = params.register.experiment or params.register.model_name
    found = client.get_experiment_by_name(name)
    if found is None:
        # The embedded store keeps artifacts beside it, not in MLflow's default ./mlruns. Judged
        # by the client's address, not the environment: mlflow_default writes that in-process.
        location = (Path(EMBEDDED_ARTIFACTS).resolve().as_uri()
                    if client.tracking_uri == embedded_uri() else None)
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException:  # created by a concurrent pipeline a moment ago
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
    if found.lifecycle_stage == LifecycleStage.DELETED:
        client.restore_experiment(found.experiment_id)
    return found.experiment_id


def log_dataset(client: MlflowClient, run_id: str, params: Params, tags: dict[str, str]) -> None:
    """The prepared train split as the run's dataset input (name and digest from lineage tags)."""
    import mlflow.data

    folder = Path(params.paths.prepared)
    train = load_split(folder, "train")
    with warnings.catch_warnings():  # "source can be interpreted in multiple ways": all local
        warnings.simplefilter("ignore", UserWarning)
        ds = mlflow.data.from_numpy(train.x, targets=train.y, source=str(folder.resolve()),
                                    name=tags["data.name"], digest=tags["data.hash"])
    inputs = [DatasetInput(Dataset(**ds.to_dict()), [InputTag("mlflow.data.context", "train")])]
    try:
        client.log_inputs(run_id, inputs)
    except MlflowException as err:
        # Two runs of one experiment logging the same data at the same moment: MLflow's store
        # looks for the dataset, then inserts it, and the later insert breaks the unique key
        # (a 400, which the client does not retry). The winner's row is in by then: this run
        # is linked to it on a second try.
        if not DUPLICATE_KEY.search(str(err)):
            raise
        client.log_inputs(run_id, inputs)


def _new_run(client: MlflowClient, params: Params, name: str | None = None,
             tags: dict[str, str] | None = None) -> Run:
    from_dvc = {tag: os.environ[env] for tag, env in DVC_EXP_TAGS.items() if os.environ.get(env)}
    return client.create_run(
        experiment_id(client, params), run_name=run_name(params, name),
        tags={"mlflow.source.name": "components.train", "mlflow.source.type": "LOCAL",
              **from_dvc, **(tags or {})},
    )


def run_name(params: Params, given: str | None = None) -> str:
    """What tells a run apart in MLflow's runs list: `given` (a Prefect flow run's name), else
    the DVC experiment's name under `dvc exp run`, else `<model>-<data>` and the settings of
    NAMED_SECTIONS that differ from params.yaml here (from the defaults without one), e.g.
    `simple_cnn-digits train.lr=0.01`."""
    name = given or os.environ.get(DVC_EXP_TAGS["dvc.experiment"])
    if not name:
        name = " ".join([f"{params.model.name}-{dataset_name(params, {})}",
                         *_differences(params)])
    return name if len(name) <= NAME_MAX else name[:NAME_MAX - 1] + "…"


def _differences(params: Params) -> list[str]:
    try:
        base = load_params(DEFAULT_PARAMS) if Path(DEFAULT_PARAMS).is_file() else Params()
    except UserError:  # a file that does not validate alone: compare with the defaults
        base = Params()
    ours, theirs = flatten(params), flatten(base)
    named = ("model.name", "data.source")  # the name's start already says them
    return [f"{key}={value if isinstance(value, str) else json.dumps(value, separators=(',', ':'))}"
            for key, value in ours.items() if key.split(".")[0] in NAMED_SECTIONS
            and key not in named and value != theirs.get(key)]


def _live_run(client: MlflowClient, run_id: str) -> Run | None:
    """The run, unless it is not there or was deleted."""
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return None
    return run if run.info.lifecycle_stage == LifecycleStage.ACTIVE else None


def _read_run_file(params: Params) -> dict | None:
    path = Path(params.paths.train) / files.RUN
    return json.loads(path.read_text()) if path.is_file() else None


def _numbers(metrics: dict[str, Any], prefix: str = "") -> Iterable[tuple[str, float]]:
    for key, value in metrics.items():
        if isinstance(value, dict):
            yield from _numbers(value, f"{prefix}{key}.")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            yield f"{prefix}{key}", float(value)  # NaN too: MLflow stores it as such


def _say(message: str) -> None:
    print(redact(message), file=sys.stderr)  # a server's error may quote its address
