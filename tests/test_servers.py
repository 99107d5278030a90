"""The pinned environment runs the real servers: the session's Prefect server and MLflow tracking
server (conftest's `stack`, started from this environment on loopback by tests/support/servers.py,
as for
every end-to-end test) answer API calls (the newest fastapi breaks Prefect 3.8's server)."""

import json
import subprocess
import urllib.request

import pytest

from tests.support.servers import BIN, answers

pytestmark = pytest.mark.slow


def test_prefect_server_answers(stack, tmp_path):
    api = stack.env["PREFECT_API_URL"]
    assert answers(f"{api}/health") == "true"
    version = json.loads(answers(f"{api}/admin/version"))
    assert version.startswith("3.")
    request = urllib.request.Request(f"{api}/work_pools/filter", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as reply:  # its database, queried for real
        assert {"local", "gpu"} <= {pool["name"] for pool in json.loads(reply.read())}
    # Prefect's own client sends JSON nulls for unset filters; fastapi >= 0.151 answers 422.
    env = {**stack.env, "PREFECT_HOME": str(tmp_path / "client")}
    for cmd in (["deployment", "ls"], ["flow-run", "ls"], ["work-pool", "ls"]):
        done = subprocess.run([str(BIN / "prefect"), *cmd], env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, f"prefect {' '.join(cmd)}:\n{done.stdout}{done.stderr}"


def test_mlflow_server_answers(stack):
    assert answers(f"{stack.mlflow}/health") == "OK"
    body = answers(f"{stack.mlflow}/api/2.0/mlflow/experiments/get-by-name?"
                   "experiment_name=Default")
    assert json.loads(body)["experiment"]["name"] == "Default"
