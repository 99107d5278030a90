"""Where MLflow is: the tracking address, the embedded store, a server's reachability, the
experiment, and mlflow's process-wide default while a step runs.

The address comes from `MLFLOW_TRACKING_URI` alone. Unset, the embedded default is `mlflow.db`
(SQLite) in the working directory with artifacts in `mlartifacts/` beside it, so nothing has to be
started. The experiment is `register.experiment`, or `register.model_name` when that is null. An
unreachable server fails a step before any work, naming it (without its password).
"""

from __future__ import annotations

import contextlib
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import LifecycleStage
from mlflow.exceptions import MlflowException

from components.core.params import Params, UserError
from components.core.secrets import redact, shown

EMBEDDED_DB = "mlflow.db"
EMBEDDED_ARTIFACTS = "mlartifacts"
PROBE_TIMEOUT_S = 5.0  # a live server answers /health in milliseconds

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


def answers(uri: str) -> bool:
    try:
        check_reachable(uri)
        return True
    except UserError:
        return False


def connect() -> tuple[str, MlflowClient]:
    """The address and a client of it, once the server answers."""
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


def say(message: str) -> None:
    print(redact(message), file=sys.stderr)  # a server's error may quote its address
