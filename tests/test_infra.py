"""infra/ checked offline: compose against the Compose specification's schema, Kubernetes
manifests against the Kubernetes schemas (strict: an unknown field fails), the work pool's base
job template as Prefect reads and renders it, the Dockerfile, and the MLflow server's start script
with a real server. Each check is also run on a copy with a typo and must reject it.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import secrets
import shlex
import subprocess
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path

import check_jsonschema
import jsonschema
import kubernetes_validate
import prefect
import pytest
import yaml
from prefect.server.schemas.actions import validate_base_job_template
from prefect.utilities.schema_tools import is_valid_schema, validate
from prefect.utilities.templating import (
    PlaceholderType,
    apply_values,
    find_placeholders,
    resolve_block_document_references,
    resolve_variables,
)
from prefect.workers.base import BaseJobConfiguration

from tests.support.servers import BIN, _server, free_port, prefect_server

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
COMPOSE_SCHEMA = (Path(check_jsonschema.__file__).parent
                  / "builtin_schemas/vendor/compose-spec.json")
# The oldest Kubernetes minor still commonly run and the newest the schemas know: a manifest must
# be valid on both.
K8S_VERSIONS = ("1.30", kubernetes_validate.utils.latest_version())
UI_PORTS = {"mlflow": 5000, "prefect-server": 4200}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|AUTH_STRING|_KEY$", re.IGNORECASE)
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:?[-?+])?([^}]*)\}")
# scheme://user:PASSWORD@host: the password part of a URL with credentials
URL_PASSWORD = re.compile(r"://[^:/@\s]+:([^@\s]+)@")


# --- compose ---------------------------------------------------------------------------------

def compose_problems(compose: dict) -> list[str]:
    """What is wrong with a loaded compose file: the schema's errors, then the project's rules."""
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    found = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
             for e in jsonschema.Draft202012Validator(schema).iter_errors(compose)]
    services = compose.get("services", {})
    for name, service in services.items():
        found += _published_port_problems(name, service)
        found += _secret_problems(name, service)
        if service.get("network_mode") == "host":
            found.append(f"{name}: network_mode host publishes every port")
    if "postgres" in services and services["postgres"].get("ports"):
        found.append("postgres: PostgreSQL must not be published")
    worker = services.get("worker", {})
    devices = (worker.get("deploy", {}).get("resources", {}).get("reservations", {})
               .get("devices", []))
    if not any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])
               for d in devices):
        found.append("worker: reserves no NVIDIA GPU (deploy.resources.reservations.devices)")
    if "--app-name basic-auth" not in _mlflow_command(compose):
        found.append("mlflow: not started with --app-name basic-auth")
    return found


def _published_port_problems(name: str, service: dict) -> list[str]:
    found = []
    for port in service.get("ports", []):
        if name not in UI_PORTS:
            found.append(f"{name}: publishes {port}, but only the UIs may be published")
        elif not isinstance(port, dict):
            found.append(f"{name}: write ports in the long form, with host_ip 127.0.0.1")
        elif port.get("host_ip") != "127.0.0.1" or port.get("target") != UI_PORTS[name]:
            found.append(f"{name}: publishes {port}; only port {UI_PORTS[name]} on 127.0.0.1")
    return found


def _secret_problems(name: str, service: dict) -> list[str]:
    """A secret-looking variable or URL password must be `${NAME:?message}`: required, no default,
    and never a literal."""
    found = []
    for key, value in _environment(service).items():
        value = str(value)
        for var, op, _ in INTERPOLATION.findall(value):
            if SECRET_NAME.search(var) and op != ":?":
                found.append(f"{name}.{key}: ${{{var}}} must be required (${{{var}:?...}})")
        literal = INTERPOLATION.sub("", value)
        # What may stay once the interpolations are gone: nothing, or a `user:` before them.
        if SECRET_NAME.search(key) and not re.fullmatch(r"([A-Za-z0-9_.-]+:)?", literal):
            found.append(f"{name}.{key}: a literal secret; take it from ${{NAME:?...}}")
        for password in URL_PASSWORD.findall(value):
            if not re.fullmatch(r"\$\{[A-Za-z0-9_]+:\?[^}]*\}", password):
                found.append(f"{name}.{key}: the URL's password is a literal")
    return found


def _environment(service: dict) -> dict:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return env


def _mlflow_command(compose: dict) -> str:
    """The MLflow service's command, with its start script read in when it runs one."""
    command = compose.get("services", {}).get("mlflow", {}).get("command", "")
    command = command if isinstance(command, str) else shlex.join(command)
    script = re.search(r"/home/app/cnn-pipeline/(\S+\.sh)", command)
    if script:
        command += "\n" + re.sub(r"\\\n\s*", " ", (ROOT / script.group(1)).read_text())
    return command


@pytest.fixture
def compose() -> dict:
    return yaml.safe_load((INFRA / "compose.yaml").read_text())


def test_compose_is_valid_and_follows_the_rules(compose):
    assert compose_problems(compose) == []
    assert set(compose["services"]) == {"postgres", "mlflow", "prefect-server", "worker"}
    env = {name: _environment(s) for name, s in compose["services"].items()}
    assert env["prefect-server"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith(
        "postgresql+asyncpg://")
    # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3, which the image does not have.
    assert env["mlflow"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://")
    assert env["mlflow"]["MLFLOW_AUTH_DATABASE_URI"].startswith("postgresql+psycopg2://")
    assert "PREFECT_SERVER_API_AUTH_STRING" in env["prefect-server"]
    assert "--serve-artifacts" in _mlflow_command(compose)


@pytest.mark.parametrize("corrupt, expected", [
    (lambda c: c["services"]["worker"].__setitem__("imagee", c["services"]["worker"].pop("image")),
     "'imagee' was unexpected"),
    (lambda c: c["services"]["postgres"].__setitem__("ports", ["5432:5432"]),
     "PostgreSQL must not be published"),
    (lambda c: c["services"]["mlflow"]["ports"][0].__setitem__("host_ip", "0.0.0.0"),
     "only port 5000 on 127.0.0.1"),
    (lambda c: c["services"]["prefect-server"]["environment"].__setitem__(
        "PREFECT_SERVER_API_AUTH_STRING", "admin:${PREFECT_ADMIN_PASSWORD:-admin}"),
     "must be required"),
    (lambda c: c["services"]["postgres"]["environment"].__setitem__(
        "POSTGRES_PASSWORD", "hunter2"), "a literal secret"),
    (lambda c: c["services"]["mlflow"]["environment"].__setitem__(
        "MLFLOW_BACKEND_STORE_URI", "postgresql://pipeline:hunter2@postgres/mlflow"),
     "the URL's password is a literal"),
    (lambda c: c["services"]["worker"].pop("deploy"), "reserves no NVIDIA GPU"),
    (lambda c: c["services"]["mlflow"].__setitem__("command", ["mlflow", "server"]),
     "--app-name basic-auth"),
])
def test_compose_check_rejects_a_corrupted_copy(compose, corrupt, expected):
    broken = copy.deepcopy(compose)
    corrupt(broken)
    problems = compose_problems(broken)
    assert any(expected in p for p in problems), problems


def test_compose_secrets_are_listed_in_the_env_example(compose):
    required = {var for s in compose["services"].values() for v in _environment(s).values()
                for var, op, _ in INTERPOLATION.findall(str(v)) if op == ":?"}
    example = (INFRA / ".env.example").read_text()
    listed = set(re.findall(r"^([A-Z_]+)=$", example, re.MULTILINE))
    assert required == listed == {"POSTGRES_PASSWORD", "MLFLOW_ADMIN_PASSWORD",
                                  "MLFLOW_SECRET_KEY", "PREFECT_ADMIN_PASSWORD"}


# --- Kubernetes manifests --------------------------------------------------------------------

def manifests() -> list[tuple[str, dict]]:
    """Every Kubernetes object in infra/k8s (kustomization.yaml is kustomize's, not the API's)."""
    return [(f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc)
            for path in sorted(K8S.glob("*.yaml")) if path.name != "kustomization.yaml"
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def k8s_problems(doc: dict) -> list[str]:
    found = []
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            found.append(f"{version} {'/'.join(map(str, err.absolute_path))}: {err.message}")
    return found


@pytest.mark.parametrize("name, doc", manifests(), ids=[n for n, _ in manifests()])
def test_k8s_manifest_is_valid_strictly(name, doc):
    assert k8s_problems(doc) == []


def test_k8s_manifests_hold_no_secret_values_and_are_all_applied():
    kinds = {doc["kind"] for _, doc in manifests()}
    assert "Secret" not in kinds
    assert {"Deployment", "Service", "ServiceAccount", "Role", "RoleBinding"} <= kinds
    refs = {ref["secretKeyRef"]["name"] for _, doc in manifests() for ref in _env_sources(doc)}
    assert refs == {"mlflow-server", "prefect-api"}
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    generated = kustomization["configMapGenerator"][0]
    assert generated["files"] == ["base-job-template.json"]


def _env_sources(doc: dict) -> list[dict]:
    pod = doc.get("spec", {}).get("template", {}).get("spec", {})
    return [e["valueFrom"] for c in pod.get("containers", []) for e in c.get("env", [])
            if "valueFrom" in e]


def test_worker_role_can_create_jobs():
    role = next(doc for _, doc in manifests() if doc["kind"] == "Role")
    assert any("batch" in r["apiGroups"] and "jobs" in r["resources"] and "create" in r["verbs"]
               for r in role["rules"])


@pytest.mark.parametrize("corrupt", [
    lambda pod: pod.__setitem__("containres", pod.pop("containers")),
    lambda pod: pod["containers"][0].__setitem__("imagee", pod["containers"][0].pop("image")),
    lambda pod: pod["containers"][0]["securityContext"].__setitem__("runAsNonRot", True),
])
def test_k8s_check_rejects_a_typo(corrupt):
    deployment = next(doc for name, doc in manifests() if name.startswith("mlflow.yaml:Deploy"))
    broken = copy.deepcopy(deployment)
    corrupt(broken["spec"]["template"]["spec"])
    assert k8s_problems(broken)


# --- the Kubernetes work pool's base job template --------------------------------------------

# Prefect's own default template for the Kubernetes worker, as bundled with the server (what
# `prefect work-pool get-default-base-job-template --type kubernetes` prints offline).
PREFECT_DEFAULT = json.loads(
    (Path(prefect.__file__).parent
     / "server/api/collections_data/views/aggregate-worker-metadata.json").read_text()
)["prefect-kubernetes"]["kubernetes"]["default_base_job_configuration"]
SCHEMA_KEYWORDS = {"title", "description", "type", "default", "enum", "items", "minimum",
                   "maximum", "additionalProperties", "allOf", "anyOf", "$ref", "properties",
                   "required", "examples", "format", "pattern"}
# The Kubernetes worker requires these in the pod spec (prefect-kubernetes' own base manifest, and
# Prefect's default template, put them there); Kubernetes drops them as unknown fields.
WORKER_POD_FIELDS = ("parallelism", "completions")


@pytest.fixture
def template() -> dict:
    return json.loads((K8S / "base-job-template.json").read_text())


def template_problems(template: dict, values: dict | None = None) -> list[str]:
    """Problems of a base job template as Prefect's server and the Kubernetes worker read it,
    and of the Job it renders to with the variables' defaults (and `values`)."""
    found = []
    try:
        validate_base_job_template(template)  # the server's check: placeholders are variables
    except ValueError as err:
        found.append(str(err))
    variables = template["variables"]
    try:
        is_valid_schema(variables, preprocess=False)  # the server's check of a pool's variables
    except ValueError as err:
        found.append(f"variables: {err}")
        return found
    for name, prop in variables.get("properties", {}).items():
        found += [f"variables.{name}: unknown keyword {k!r}" for k in set(prop) - SCHEMA_KEYWORDS]
    missing = set(PREFECT_DEFAULT["job_configuration"]) - set(template["job_configuration"])
    found += [f"job_configuration: {k!r} missing" for k in sorted(missing)]
    unknown = set(template["job_configuration"]) - set(PREFECT_DEFAULT["job_configuration"])
    found += [f"job_configuration: {k!r} is not the Kubernetes worker's" for k in sorted(unknown)]
    if found:
        return found
    # The server's check of a flow run's job variables: the defaults overlaid with `values`.
    given = {**BaseJobConfiguration._get_base_config_defaults(variables["properties"]),
             **(values or {})}
    found += [f"job variables: {e.message}" for e in validate(
        given, variables, preprocess=True, ignore_required=True, allow_none_with_default=True)]
    job = render(template, values or {})["job_manifest"]
    return found + job_problems(job)


def render(template: dict, values: dict, client=None) -> dict:
    """The job configuration a Kubernetes worker builds for a flow run: Prefect's own steps of
    BaseJobConfiguration.from_template_and_values (defaults, then values, then the
    placeholders of blocks and Prefect variables, resolved through `client`)."""
    config = copy.deepcopy(template["job_configuration"])
    variables = BaseJobConfiguration._get_base_config_defaults(
        template["variables"].get("properties", {}))
    rendered = apply_values(config, {**variables, **values})
    if client is None:
        # Without a server there is nothing to resolve them with; the template must have none.
        kinds = {p.type for p in find_placeholders(json.dumps(template["job_configuration"]))}
        assert kinds <= {PlaceholderType.STANDARD}, kinds
        return rendered
    rendered = asyncio.run(resolve_block_document_references(rendered, client=client))
    return asyncio.run(resolve_variables(rendered, client=client))


def job_problems(job: dict) -> list[str]:
    """A rendered job manifest, as the worker submits it: it fills in generateName when the
    template left it empty, and sends the pod-spec fields it requires, which Kubernetes drops."""
    job = copy.deepcopy(job)
    if job.get("metadata", {}).get("generateName") in ("-", None):
        job.setdefault("metadata", {})["generateName"] = "prefect-job-"
    pod = job["spec"]["template"]["spec"]
    found = [f"pod spec: the Kubernetes worker needs {f}: 1" for f in WORKER_POD_FIELDS
             if pod.pop(f, None) != 1]
    found += k8s_problems(job)
    limits = pod["containers"][0].get("resources", {}).get("limits", {})
    if not limits.get("nvidia.com/gpu"):
        found.append("the job asks for no nvidia.com/gpu")
    return found


def test_base_job_template_renders_a_valid_gpu_job(template):
    assert template_problems(template) == []
    job = render(template, {})["job_manifest"]
    pod = job["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] and pod["tolerations"]
    assert pod["containers"][0]["image"] == template["variables"]["properties"]["image"]["default"]


def test_base_job_template_variables_reach_the_job(template):
    values = {"gpu_count": 4, "node_selector": {"gpu": "h100"}, "tolerations": [],
              "image": "registry.example/cnn-pipeline:1.2.3", "memory_limit": "64Gi"}
    assert template_problems(template, values) == []
    pod = render(template, values)["job_manifest"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 4, "memory": "64Gi"}
    assert pod["nodeSelector"] == {"gpu": "h100"} and pod["tolerations"] == []
    assert container["image"] == "registry.example/cnn-pipeline:1.2.3"


def _pod(template: dict) -> dict:
    return template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]


@pytest.mark.parametrize("corrupt, expected", [
    (lambda t: _pod(t)["containers"][0]["resources"]["limits"].__setitem__(
        "nvidia.com/gpu", "{{ gpu_cuont }}"), "gpu_cuont"),
    (lambda t: _pod(t).__setitem__("nodeSelectr", _pod(t).pop("nodeSelector")), "nodeSelectr"),
    (lambda t: _pod(t)["containers"][0].__setitem__("envFrm", {}), "envFrm"),
    (lambda t: t["variables"]["properties"]["gpu_count"].__setitem__(
        "defualt", t["variables"]["properties"]["gpu_count"].pop("default")), "defualt"),
    (lambda t: t["variables"]["properties"]["gpu_count"].__setitem__("type", "int"),
     "variables"),
    (lambda t: t["job_configuration"].__setitem__(
        "job_manifets", t["job_configuration"].pop("job_manifest")), "job_manifets"),
    (lambda t: _pod(t).pop("parallelism"), "needs parallelism"),
])
def test_base_job_template_check_rejects_a_corrupted_copy(template, corrupt, expected):
    broken = copy.deepcopy(template)
    corrupt(broken)
    problems = template_problems(broken)
    assert any(expected in p for p in problems), problems


@pytest.mark.slow
def test_prefect_server_takes_the_template_as_a_kubernetes_pool(template, tmp_path):
    """`prefect work-pool create --type kubernetes --base-job-template ...` on a real server
    (offline: the server falls back to its bundled worker registry), read back and rendered with
    a deployment's job variables through Prefect's own resolution steps."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    def prefect(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "prefect"), *args], env=env, capture_output=True,
                              text=True, timeout=300)

    with prefect_server(tmp_path / "prefect") as api:
        env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_HOME": str(tmp_path / "home")}
        done = prefect("work-pool", "create", "gpu-k8s", "--type", "kubernetes",
                       "--base-job-template", str(K8S / "base-job-template.json"))
        assert done.returncode == 0, done.stdout + done.stderr
        broken = copy.deepcopy(template)
        _pod(broken)["tolerations"] = "{{ toleration }}"
        (tmp_path / "broken.json").write_text(json.dumps(broken))
        refused = prefect("work-pool", "create", "broken", "--type", "kubernetes",
                          "--base-job-template", str(tmp_path / "broken.json"))
        assert refused.returncode != 0 and "toleration" in refused.stdout + refused.stderr

        async def read_back():
            async with get_client() as client:
                return (await client.read_work_pool("gpu-k8s")).base_job_template

        with temporary_settings({PREFECT_API_URL: api}):
            stored = asyncio.run(read_back())
            assert stored == template

            async def rendered():
                async with get_client() as client:
                    config = copy.deepcopy(stored["job_configuration"])
                    defaults = BaseJobConfiguration._get_base_config_defaults(
                        stored["variables"]["properties"])
                    config = apply_values(config, {**defaults, "gpu_count": 2})
                    config = await resolve_block_document_references(config, client=client)
                    return await resolve_variables(config, client=client)

            job = asyncio.run(rendered())["job_manifest"]
    assert job_problems(job) == []
    limits = job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 2


# --- Dockerfile ------------------------------------------------------------------------------

INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT",
                "VOLUME", "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK",
                "SHELL"}


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n(\s*#[^\n]*\n)*", " ", text)
    return [(line.split(None, 1)[0].upper(), (line.split(None, 1) + [""])[1].strip())
            for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def dockerfile_problems(text: str) -> list[str]:
    steps = dockerfile_instructions(text)
    found = [f"unknown instruction {i}" for i, _ in steps if i not in INSTRUCTIONS]
    bases = [args.split()[0] for i, args in steps if i == "FROM"]
    if not bases or not re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-runtime-[a-z]+\d+\.\d+",
                                     bases[-1]):
        found.append(f"base image {bases[-1:]} is not a pinned nvidia/cuda runtime tag")
    runs = [args for i, args in steps if i == "RUN"]
    lock = next((n for n, r in enumerate(runs) if re.search(r"pip install .*-r requirements\.lock",
                                                            r)), None)
    project = next((n for n, r in enumerate(runs) if re.search(r"pip install .*--no-deps \.", r)),
                   None)
    if lock is None or project is None or project < lock:
        found.append("not installed from requirements.lock, then `pip install --no-deps .`")
    users = [args for i, args in steps if i == "USER"]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        found.append("runs as root: the last USER must be a non-root user")
    return found


@pytest.fixture
def dockerfile() -> str:
    return (INFRA / "Dockerfile").read_text()


def test_dockerfile_is_a_pinned_cuda_runtime_installed_from_the_lock_run_as_non_root(dockerfile):
    assert dockerfile_problems(dockerfile) == []
    steps = dockerfile_instructions(dockerfile)
    assert ("USER", "10001:10001") in steps
    # The image runs the worker by default; the same image runs steps, DVC and both servers.
    assert "prefect worker start --pool gpu" in " ".join(json.loads(
        next(a for i, a in steps if i == "CMD")))
    assert "dvc" in (ROOT / "requirements.lock").read_text()


@pytest.mark.parametrize("old, new, expected", [
    ("FROM nvidia/cuda:13.0.2-runtime-ubuntu24.04", "FORM nvidia/cuda:13.0.2-runtime-ubuntu24.04",
     "unknown instruction FORM"),
    ("nvidia/cuda:13.0.2-runtime-ubuntu24.04", "nvidia/cuda:latest", "pinned"),
    ("nvidia/cuda:13.0.2-runtime-ubuntu24.04", "nvidia/cuda:13.0.2-devel-ubuntu24.04", "runtime"),
    ("-r requirements.lock", "-r requirements.txt", "requirements.lock"),
    ("USER 10001:10001", "USR 10001:10001", "unknown instruction USR"),
    ("USER 10001:10001", "USER root", "runs as root"),
])
def test_dockerfile_check_rejects_a_corrupted_copy(dockerfile, old, new, expected):
    assert old in dockerfile
    problems = dockerfile_problems(dockerfile.replace(old, new))
    assert any(expected in p for p in problems), problems


def test_docker_build_context_leaves_out_local_and_secret_files():
    ignored = (INFRA / "Dockerfile.dockerignore").read_text().split()
    assert {".git", ".venv", "**/.env", "mlflow.db", "data", "outputs"} <= set(ignored)


# --- the MLflow server's start script, run for real ------------------------------------------

def _status(url: str, user: str | None = None, password: str | None = None) -> int:
    request = urllib.request.Request(url)
    if user:
        token = b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status
    except urllib.error.HTTPError as err:
        return err.code


def _script_env(tmp_path: Path, port: int, password: str) -> dict:
    return {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "TMPDIR": str(tmp_path),
            "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "MLFLOW_AUTH_DATABASE_URI": f"sqlite:///{tmp_path / 'auth.db'}",
            "MLFLOW_AUTH_ADMIN_PASSWORD": password,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
            "MLFLOW_ARTIFACTS_DESTINATION": str(tmp_path / "artifacts"),
            "MLFLOW_HOST": "127.0.0.1", "MLFLOW_PORT": str(port), "MLFLOW_WORKERS": "1"}


# Through sh, as in the image (whose build makes it executable), whatever the checkout's mode.
MLFLOW_SCRIPT = ["sh", str(INFRA / "mlflow-server.sh")]


@pytest.mark.parametrize("variable", ["MLFLOW_BACKEND_STORE_URI", "MLFLOW_AUTH_DATABASE_URI",
                                      "MLFLOW_AUTH_ADMIN_PASSWORD",
                                      "MLFLOW_FLASK_SERVER_SECRET_KEY",
                                      "MLFLOW_ARTIFACTS_DESTINATION"])
def test_mlflow_start_script_refuses_to_start_without_a_setting(tmp_path, variable):
    env = _script_env(tmp_path, free_port(), secrets.token_hex(16))
    del env[variable]
    refused = subprocess.run(MLFLOW_SCRIPT, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and variable in refused.stderr
    assert not (tmp_path / "mlflow-auth").exists()


@pytest.mark.slow
def test_mlflow_start_script_serves_with_auth_and_no_default_password(tmp_path):
    # MLflow's basic-auth app needs the `mlflow[auth]` extra (Flask-WTF, for its CSRF checks).
    pytest.importorskip("flask_wtf", reason="install mlflow[auth]: the basic-auth app needs it")
    password, port = secrets.token_hex(16), free_port()
    env = _script_env(tmp_path, port, password)
    uri = f"http://127.0.0.1:{port}"
    api = f"{uri}/api/2.0/mlflow/experiments/search?max_results=1"
    with _server(MLFLOW_SCRIPT, f"{uri}/health", tmp_path / "server.log", env, timeout=180):
        assert _status(api) == 401
        assert _status(api, "admin", "password1234") == 401  # MLflow's old built-in default
        assert _status(api, "admin", password) == 200
    ini = (tmp_path / "mlflow-auth/basic_auth.ini").read_text()
    assert password not in ini and "auth.db" in ini
