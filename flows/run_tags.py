"""The MLflow run a flow run fed: where to find it, and the tags that tie the two together.

components/tracking/run.py writes the run's id and address to `<paths.train>/run.json` when train
starts it; the flow reads that file rather than opening a second connection of its own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from prefect.runtime import deployment, flow_run

from components.core import outputs
from components.core.params import Params
from components.core.secrets import shown


def run_info(params: Params) -> dict[str, str] | None:
    """run_id, experiment_id, tracking_uri (without credentials) and a link to the run."""
    path = Path(params.paths.train) / outputs.RUN
    if not path.is_file():
        return None
    run = json.loads(path.read_text())
    uri = shown(run["tracking_uri"])
    if uri.startswith(("http://", "https://")):
        url = f"{uri.rstrip('/')}/#/experiments/{run['experiment_id']}/runs/{run['run_id']}"
    else:  # the embedded store: no address until a UI is started on it
        url = uri
    return {"run_id": run["run_id"], "experiment_id": run["experiment_id"],
            "tracking_uri": uri, "url": url}


def flow_run_tags() -> dict[str, str]:
    """Tags naming the Prefect flow run (and deployment) that made an MLflow run."""
    tags = {"prefect.flow_run_id": str(flow_run.id), "prefect.flow_run_name": str(flow_run.name)}
    if deployment.name:
        tags["prefect.deployment"] = f"{flow_run.flow_name}/{deployment.name}"
    return tags


def tag_run(params: Params, tags: dict[str, str]) -> None:
    path = Path(params.paths.train) / outputs.RUN
    if not tags or not path.is_file():
        return
    run = json.loads(path.read_text())
    client = MlflowClient(tracking_uri=run["tracking_uri"])
    for key, value in tags.items():
        client.set_tag(run["run_id"], key, value)


def describe_decision(decision: dict[str, Any]) -> str:
    """One line for a person: which version, which aliases, and why."""
    version = decision.get("version")
    name = decision.get("model_name") or decision.get("name", "model")
    promoted = decision.get("promoted", decision.get("champion"))
    verdict = "promoted to **champion**" if promoted else "kept as **challenger**"
    reasons = decision.get("reasons") or decision.get("reason") or ""
    if isinstance(reasons, list):
        reasons = "; ".join(map(str, reasons))
    return f"{name} version {version} {verdict}. {reasons}".strip()
