"""Delivery: metrics never slow training down or stop it, and nothing is lost while MLflow is away.

`Outbox` queues metrics and tags that a background thread delivers in batches (`log_batch`),
retrying with backoff while the server is away. At the end a step waits up to
`register.flush_timeout_s` for it; what is still undelivered (metrics, tags, artifacts) is parked
by `Pending` in `<folder>/mlflow-pending.json`, which the next step or run delivers first.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException

from components.core import outputs
from components.core.atomic import write_json
from components.core.secrets import shown
from components.tracking.store import PROBE_TIMEOUT_S, answers, say

BACKOFF_S = (0.5, 30.0)  # first and longest wait between delivery attempts
BATCH = 1000  # MLflow's limits per log_batch: metrics, and tags or params
TAG_BATCH = 100

def permanent(err: Exception) -> bool:
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
        if not answers(self.uri):
            self.last_error = ConnectionError(f"{shown(self.uri)} does not answer")
            return False
        try:
            self.client.log_batch(self.run_id, metrics=metrics, tags=tags, synchronous=True)
        except Exception as err:  # any failure: keep them unless they can never go in
            self.last_error = err
            if not permanent(err):
                return False
            say(f"MLflow refused {len(metrics)} metrics and {len(tags)} tags for run "
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
        self.path = Path(folder) / outputs.PENDING

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
        say(f"MLflow at {shown(uri)} is unreachable: {len(metrics)} metrics, {len(tags)} tags "
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
                if not permanent(err):
                    raise
                say(f"MLflow refused what waited for run {entry['run_id']}: {err}; dropped")
            if keep:
                continue
            del data[key]
            write_json(self.path, data)
        if mine and not data and not keep:
            self.path.unlink(missing_ok=True)

