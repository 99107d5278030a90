"""The pinned environment runs the real servers: a Prefect server and an MLflow tracking server
start from it on loopback and answer API calls (the newest fastapi breaks Prefect 3.8's server)."""

import json
import os
import subprocess
import urllib.request

import pytest

from tests.servers import BIN, answers, mlflow_server, prefect_server

pytestmark = pytest.mark.slow


def test_prefect_server_answers(tmp_path):
    with prefect_server(tmp_path / "prefect") as api:
        assert answers(f"{api}/health") == "true"
        version = json.loads(answers(f"{api}/admin/version"))
        assert version.startswith("3.")
        request = urllib.request.Request(f"{api}/flows/filter", data=b"{}", method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as reply:
            assert json.loads(reply.read()) == []  # a fresh database, queried for real
        # Prefect's own client sends JSON nulls for unset filters; fastapi >= 0.151 answers 422.
        env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_HOME": str(tmp_path / "client")}
        for cmd in (["deployment", "ls"], ["flow-run", "ls"], ["work-pool", "ls"]):
            done = subprocess.run([str(BIN / "prefect"), *cmd], env=env, capture_output=True,
                                  text=True, timeout=120)
            assert done.returncode == 0, f"prefect {' '.join(cmd)}:\n{done.stdout}{done.stderr}"


def test_mlflow_server_answers(tmp_path):
    with mlflow_server(tmp_path / "mlflow") as uri:
        assert answers(f"{uri}/health") == "OK"
        body = answers(f"{uri}/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default")
        assert json.loads(body)["experiment"]["name"] == "Default"
