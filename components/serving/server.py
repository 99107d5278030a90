"""MLflow's own model server for a registered version: `cnn-pipeline serve` (and `make serve`)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from components.core.params import Params
from components.tracking.store import tracking_uri


def serve(params: Params, model: str | None = None, port: int = 5001) -> None:
    """Serve `model` (default models:/<register.model_name>@champion, from the registry that
    MLFLOW_TRACKING_URI names, else the embedded mlflow.db) with `mlflow models serve` on
    127.0.0.1:`port`: image files or uint8 arrays in, class names out (components/serving/
    pyfunc.py). The server takes this process's place (exec): its pid, signals and exit code are
    the command's. Loading the model runs the code it was logged with."""
    uri = model or f"models:/{params.register.model_name}@champion"
    beside = Path(sys.executable).with_name("mlflow")
    mlflow = str(beside) if beside.is_file() else shutil.which("mlflow") or "mlflow"
    argv = [mlflow, "models", "serve", "-m", uri, "--env-manager", "local",
            "--host", "127.0.0.1", "--port", str(port)]
    sys.stdout.flush()
    os.execvpe(mlflow, argv, {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri()})
