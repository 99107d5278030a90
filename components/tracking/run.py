"""The run: one MLflow run per pipeline run, fed by train, evaluate, register and export.

One run, several processes: train opens the run and writes its id to `<paths.train>/run.json`
(atomically); the later steps (separate processes under `dvc repro`) join that run. A train that
continues its last checkpoint keeps logging into the run that wrote it: after a crash, and when a
finished run is started again (`dvc repro --force`), so that no new run and no new model version
is made; a train that starts fresh gets a new run, which gets the validated params flattened
(`section.key`), lineage tags (lineage.py) and the prepared data as its dataset input. What else
goes in, each step says itself through `log_metrics`, `log_artifacts`, `log_text` and `set_tags`:
the Tracker knows no step's files.

A new run is named so that MLflow's runs list tells it apart (`run_name`): the Prefect flow run's
name, the DVC experiment's under `dvc exp run` (DVC_EXP_NAME, which DVC sets for each stage), else
`<model>-<data>` and the settings that differ from params.yaml; it is tagged with the flow run
(`prefect.flow_run_name`, ... from flows/) or the experiment (`dvc.experiment`, `dvc.baseline`).

Where a step's inputs are read-only (Kubeflow passes them as artifacts), the runner says so with
`tracked(..., pending_dir=<the step's own output folder>)`: what the step could not deliver is
parked there (delivery.py), and what earlier steps parked in their folders (any `paths` folder) is
delivered without rewriting their files (MLflow ignores a metric it already holds). There, too,
the run id travels as a value: train writes it to `run_id_out`, and the later steps join the run
given as `run_id` rather than the one run.json names.

Steps stay usable without MLflow: they take an optional `tracker`, and every entry point (the
command line, a flow's task) attaches it the same way, with `tracked(step)`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import sys
import time
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

from components.core import outputs
from components.core.atomic import atomic_file, write_json
from components.core.params import DEFAULT_PARAMS, Params, UserError, flatten, load_params
from components.core.secrets import redact, shown
from components.data.dataset import load_split
from components.tracking.delivery import TAG_BATCH, Outbox, Pending
from components.tracking.lineage import dataset_name, lineage
from components.tracking.store import (
    answers,
    connect,
    experiment_id,
    mlflow_default,
    say,
    tracking_uri,
)

UNSAFE_KEY = re.compile(r"[^\w\-. :/]")  # MLflow refuses other characters in metric keys
# A database's unique-key violation (PostgreSQL, SQLite, MySQL), as MLflow's server passes it on.
DUPLICATE_KEY = re.compile(r"duplicate key|UNIQUE constraint failed|Duplicate entry", re.I)
# What `dvc exp run` tells each stage's process about its experiment (dvc/env.py; set in
# dvc/repo/experiments/queue/base.py for every way an experiment runs): the run's tags.
DVC_EXP_TAGS = {"dvc.experiment": "DVC_EXP_NAME", "dvc.baseline": "DVC_EXP_BASELINE_REV"}
NAMED_SECTIONS = ("data", "augment", "model", "train")  # settings that make a run's model
NAME_MAX = 250  # characters of a run name (MLflow's limit)


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
        self.new_run = False  # open_run made the run (train's inputs go in with it)
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
        uri, client = connect()
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
            old, source = _read_run_file(params), f"from {Path(params.paths.train) / outputs.RUN}"
        if old is None:
            tracker = cls.start(params, pending_dir)
            tracker.open_run(continues=False)
            return tracker
        uri, client = connect()
        if old["tracking_uri"] != shown(uri):
            raise UserError(
                f"{Path(params.paths.train) / outputs.RUN}: train tracked into "
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
        uri, client = connect()
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
        downstream makes a new model version), else a new run (`new_run`) with params, lineage
        tags, the dataset input, the settings as validated and dvc.lock."""
        old = _read_run_file(self.params)
        live = (_live_run(self.client, old["run_id"])
                if continues and old and old["tracking_uri"] == shown(self.uri) else None)
        self.new_run = live is None
        if live is not None:
            self.client.update_run(old["run_id"], status="RUNNING")
        run = _new_run(self.client, self.params, *self.origin) if self.new_run else live
        self._attach(run.info.run_id, run.info.experiment_id)
        logged = {} if self.new_run else live.data.params
        flat = [Param(k, str(v)) for k, v in flatten(self.params).items() if k not in logged]
        tags = lineage(self.params)
        flat_tags = [RunTag(k, v) for k, v in tags.items()]
        for i in range(0, max(len(flat), len(flat_tags)), TAG_BATCH):
            self.client.log_batch(self.run_id, params=flat[i:i + TAG_BATCH],
                                  tags=flat_tags[i:i + TAG_BATCH], synchronous=True)
        if self.new_run:
            log_dataset(self.client, self.run_id, self.params, tags)
            # The settings as validated, overrides included: what this run really used.
            self.log_text(yaml.safe_dump(self.params.model_dump(mode="json"), sort_keys=False),
                          DEFAULT_PARAMS)
            self.log_artifacts([Path("dvc.lock")])
        write_json(self.folder / outputs.RUN, {
            "run_id": self.run_id, "tracking_uri": shown(self.uri),  # no password in files
            "experiment_id": self.experiment_id,
        })

    # The train callback protocol (train adds what it logs itself: components/train.py).
    def on_train_start(self, resumed_from: int) -> None:
        self.open_run(continues=resumed_from > 0)

    def on_epoch_end(self, epoch: int, metrics: dict[str, Any]) -> None:
        self.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)

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
            if not answers(self.uri):  # don't sit in the client's retries: keep it for later
                self.unsent.append([str(path.resolve()), artifact_path or ""])
                continue
            try:
                if path.is_dir():
                    self.client.log_artifacts(self.run_id, str(path), artifact_path)
                else:
                    self.client.log_artifact(self.run_id, str(path), artifact_path)
            except Exception as err:  # a dead server: keep it for later, don't fail the step
                say(f"could not upload {path} to MLflow ({err}); kept for later")
                self.unsent.append([str(path.resolve()), artifact_path or ""])

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

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
        if metrics or tags or self.unsent or not answers(self.uri):
            return  # the status can wait; the pending file is the record
        try:
            # Its "View run at" lines go to stderr: stdout is the step's JSON summary.
            with contextlib.redirect_stdout(sys.stderr):
                self.client.set_terminated(self.run_id, status)
        except Exception as err:  # the status is cosmetic; the data is already in
            say(f"could not mark run {self.run_id} {status}: {err}")

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, kind, value, tb) -> None:
        self.close("FAILED" if kind else "FINISHED")


def tracked(step: Callable[..., Any], run: Literal["start", "join", "batch"] = "join", *,
            run_id: str | None = None, run_id_out: str | Path | None = None,
            pending_dir: str | Path | None = None, run_name: str | None = None,
            run_tags: dict[str, str] | None = None) -> Callable[[Params], Any]:
    """`step(params, tracker=...)` with the pipeline's MLflow run attached, closed with the
    step's outcome: the one way every entry point (the command line, a flow's task) tracks a step.
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
    path = Path(params.paths.train) / outputs.RUN
    return json.loads(path.read_text()) if path.is_file() else None


def _numbers(metrics: dict[str, Any], prefix: str = "") -> Iterable[tuple[str, float]]:
    for key, value in metrics.items():
        if isinstance(value, dict):
            yield from _numbers(value, f"{prefix}{key}.")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            yield f"{prefix}{key}", float(value)  # NaN too: MLflow stores it as such

