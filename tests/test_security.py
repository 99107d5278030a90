"""Security: no credential in the settings or in what tracking logs from them, local servers on
loopback only, and no load path that runs pickled code.

- Secrets: a setting named like a credential, or whose text carries one (user:password@ in an
  address), is refused before any work, in params.yaml, in --set overrides and in the flow's
  parameters, with a message that names the key, repeats no secret and points to the
  environment. A tracked run's params and tags are checked for both with a real MLflow server.
- Servers: the servers and the worker that tests/support/servers.py starts (as `make stack-up`
  does) are asked which sockets they listen on (/proc/net/tcp and tcp6, by socket inode of their
  processes).
- Pickles: a "checkpoint" whose unpickling creates a canary file, with a matching .sha256 beside
  it (so it is the loader that must refuse, not the hash), is fed to every public load path; each
  raises a UserError and the canary never appears. Likewise an object-array .npy as prepared
  data, a crafted CIFAR batch, and a registered model whose MLmodel would import planted code.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import ipaddress
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from components.core import outputs
from components.core.params import ParamsError, UserError, flatten, load_params
from components.core.secrets import credential_name, redact, secrets_in, shown
from components.training import checkpoint as ckpt

PROJECT = Path(__file__).resolve().parents[1]
SECRET = "hunter2-canary"  # never to appear in a message, a param or a tag


# --- secrets in settings ------------------------------------------------------------------------


def refusal(tmp_path: Path, text: str, overrides: list[str] = ()) -> str:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError) as info:
        load_params(path, list(overrides))
    message = str(info.value)
    assert SECRET not in message, message
    assert "unknown key" not in message  # this message, not the generic one
    assert "environment" in message and "MLFLOW_TRACKING_PASSWORD" in message
    assert "AWS_SECRET_ACCESS_KEY" in message
    return message


@pytest.mark.parametrize(("text", "key"), [
    (f"model:\n  api_token: {SECRET}\n", "model.api_token"),
    (f"register:\n  mlflow_password: {SECRET}\n", "register.mlflow_password"),
    (f"data:\n  AccessKeyId: {SECRET}\n", "data.AccessKeyId"),
    (f"aws_secret_access_key: {SECRET}\n", "aws_secret_access_key"),
    (f"train:\n  epochs: 2\n  auth: {{user: me, pass: {SECRET}}}\n", "train.auth"),
])
def test_a_credential_named_setting_in_the_file_is_refused(tmp_path, key, text):
    assert key in refusal(tmp_path, text)


@pytest.mark.parametrize(("override", "key"), [
    (f"train.password={SECRET}", "train.password"),
    (f"model.private_key={SECRET}", "model.private_key"),
    (f"model.checkpoint=http://bob:{SECRET}@mlflow.example:5000/{outputs.MODEL}",
     "model.checkpoint"),
    (f"model.checkpoint=https://{SECRET}@models.example/m.pt", "model.checkpoint"),  # a token
    (f"register.experiment=-----BEGIN RSA PRIVATE KEY-----{SECRET}", "register.experiment"),
])
def test_a_credential_in_an_override_is_refused(tmp_path, override, key):
    assert key in refusal(tmp_path, "train:\n  epochs: 2\n", [override])


def test_a_credential_in_a_file_value_is_refused(tmp_path):
    message = refusal(tmp_path, f"data:\n  root: s3://bob:{SECRET}@bucket/raw\n")
    assert "data.root" in message and "s3://***@bucket/raw" in message
    message = refusal(tmp_path, f"data:\n  root: /data/AKIAABCDEFGHIJKLMNOP/{SECRET}\n")
    assert "data.root" in message and "AWS access key" in message


def test_names_are_judged_by_whole_words():
    for name in ("api_token", "mlflowPassword", "APIKey", "access_key_id", "client_secret",
                 "passwd", "credentials", "oauth_token", "auth"):
        assert credential_name(name), name
    for name in ("author", "tokenizer", "max_tokens", "keyword", "checkpoint", "model_name",
                 "primary_metric", "secretary", "authority"):
        assert not credential_name(name), name
    # Addresses without a user part are settings like any other.
    assert secrets_in({"model": {"checkpoint": "models:/digits@champion"},
                       "data": {"root": "https://example.org/data@v2/x"}}) == []


RAN: list = []


def _record(params) -> dict:
    """A stand-in step for the command line: records that it ran."""
    RAN.append(params)
    return {}


def test_the_command_line_refuses_before_any_work(tmp_path, capsys):
    from cnn_pipeline import cli
    from cnn_pipeline.commands import Command

    (tmp_path / "params.yaml").write_text("train:\n  epochs: 2\n")
    with pytest.raises(SystemExit) as info:
        cli.main(["record", "--params", str(tmp_path / "params.yaml"),
                  "--set", f"model.api_key={SECRET}"],
                 {"record": Command(f"{__name__}:_record", "records that it ran", step=True)})
    err = capsys.readouterr().err
    assert info.value.code == 2 and not RAN
    assert "model.api_key" in err and SECRET not in err


def test_the_flow_parameters_are_refused_the_same_way(tmp_path):
    """The flow's typed overrides (what Prefect validates a run's parameters against) and the
    merge into the file (flows.parameters.resolve, what the flow calls) both refuse."""
    from prefect.exceptions import ParameterTypeError

    from flows.parameters import resolve
    from flows.pipeline import training_pipeline

    for model in ({"api_token": SECRET}, {"checkpoint": f"http://u:{SECRET}@host/m.pt"},
                  {"checkpoint": f"https://host/m.pt?token={SECRET}"}):
        with pytest.raises(ParameterTypeError) as info:
            training_pipeline.validate_parameters({"model": model})
        message = str(info.value)
        assert "MLFLOW_TRACKING_PASSWORD" in message and SECRET not in message
    (tmp_path / "params.yaml").write_text(f"model:\n  checkpoint: http://u:{SECRET}@h/m.pt\n")
    with pytest.raises(ParamsError, match="model.checkpoint"):
        resolve(tmp_path / "params.yaml")


# --- secrets in addresses: one definition, refused in settings, masked in every message -------

# A value holding SECRET, and the part of it a message may keep.
PLANTED = [
    (f"https://bob:p@{SECRET}@models.example/m.pt", "models.example"),  # an @ in the password
    (f"https://bob:pa/{SECRET}@models.example/m.pt", "https://"),  # SQLAlchemy's reading
    (f"https://data.example/raw?password={SECRET}&v=2", "v=2"),
    (f"https://models.example/m.pt?token={SECRET}", "models.example"),
    (f"https://models.example/m.pt?X-Amz-Signature={SECRET}", "models.example"),
    (f"https://models.example/m.pt?api_key={SECRET}#top", "#top"),
    (f"postgresql+psycopg2://optuna:{SECRET}@db.example/optuna", "db.example/optuna"),
    (f"postgresql+psycopg2://db.example/optuna?password={SECRET}", "db.example/optuna"),
    (f"postgresql://optuna:{SECRET}@/optuna?host=/run/postgresql", "host=/run/postgresql"),
    (f"host=/run/postgresql dbname=optuna password={SECRET}", "dbname=optuna"),
]


@pytest.mark.parametrize(("text", "kept"), PLANTED)
def test_redact_and_shown_remove_the_secret_and_keep_the_rest(text, kept):
    for out in (redact(text), shown(text), redact(f"error: cannot open {text!r}: refused")):
        assert SECRET not in out and kept in out, out
    assert redact(redact(text)) == redact(text)  # a message redacted twice reads the same
    assert secrets_in({"data": {"root": text}}), text  # the one definition refuses it too


@pytest.mark.parametrize("text", [
    "https://example.org/data@v2/x", "http://localhost:5000/#/models/digits@champion",
    "https://host:8080/data@v2?rev=3", "s3://bucket/table/key=3/part-0", "sqlite:////a/study.db",
    "models:/digits-classifier@champion", "https://h/x?max_tokens=5&tokenizer=bpe",
])
def test_addresses_without_a_secret_are_left_alone(text):
    assert redact(text) == shown(text) == text and secrets_in({"data": {"root": text}}) == []


def test_a_user_error_never_carries_a_secret():
    """Every UserError, wherever it is printed or logged, is redacted when it is made."""
    for text, _ in PLANTED:
        assert SECRET not in str(UserError(f"cannot open {text}"))


@pytest.mark.parametrize("url", [
    f"postgresql+psycopg2://optuna:{SECRET}@127.0.0.1:9/optuna",  # nothing listens on port 9
    f"postgresql+psycopg2://optuna:p@{SECRET}@127.0.0.1:9/optuna",
    f"postgresql+psycopg2://127.0.0.1:9/optuna?password={SECRET}",
    f"postgresql://optuna:{SECRET}@/optuna?host=/nonexistent/socket-dir",  # a unix socket
    f"postgresql+psycopg2://optuna:{SECRET}@/optuna?host=/nonexistent/socket-dir",
])
def test_a_search_storage_that_cannot_be_opened_is_named_without_its_password(url, monkeypatch):
    """CNN_PIPELINE_SEARCH_STORAGE may hold a password (search.storage may not): a real Optuna
    storage on a database that is not there fails with a UserError that names it, redacted."""
    from flows.search import study

    monkeypatch.setenv(study.STORAGE_ENV, url)
    with pytest.raises(UserError) as info:
        study.open_storage(study.storage_url(load_params(overrides=[])))
    assert SECRET not in str(info.value) and shown(url) in str(info.value)


def test_an_unreachable_tracking_server_is_named_without_its_password():
    from components.tracking.store import check_reachable

    for uri in (f"http://bob:{SECRET}@127.0.0.1:9", f"http://127.0.0.1:9/?token={SECRET}"):
        with pytest.raises(UserError) as info:
            check_reachable(uri)
        assert SECRET not in str(info.value) and "127.0.0.1:9" in str(info.value)


def _files_holding(root: Path, secret: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


@pytest.mark.parametrize(("override", "key"), [
    (f"model.checkpoint={PLANTED[0][0]}", "model.checkpoint"),
    (f"data.root={PLANTED[2][0]}", "data.root"),
    (f"model.checkpoint={PLANTED[3][0]}", "model.checkpoint"),
    (f"search.storage={PLANTED[6][0]}", "search.storage"),
    (f"search.storage={PLANTED[7][0]}", "search.storage"),
    (f"register.experiment=runs?api_key={SECRET}", "register.experiment"),
])
def test_a_planted_secret_reaches_no_message_log_or_mlflow(tmp_path, digits, override, key):
    """The real train command on prepared digits, tracked into an MLflow store in tmp_path, with a
    secret in one setting: refused (exit 2, naming the key), and the secret is in neither its
    stderr nor any file it leaves (logs, the MLflow database and artifacts, outputs)."""
    from mlflow import MlflowClient

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "paths": {"prepared": str(digits / "prepared"), "augment": str(digits / "augment_none"),
                  "train": str(tmp_path / "train")},
        "train": {"epochs": 1, "device": "cpu"}}))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    proc = subprocess.run([sys.executable, "-m", "cnn_pipeline", "train", "--set", override],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert SECRET not in proc.stderr + proc.stdout
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and key in proc.stderr
    assert _files_holding(tmp_path, SECRET) == []
    if (tmp_path / "mlflow.db").exists():
        client = MlflowClient(env["MLFLOW_TRACKING_URI"])
        for run in client.search_runs([e.experiment_id for e in client.search_experiments()]):
            assert SECRET not in str(run.data.params) + str(run.data.tags)


def test_a_tag_quoting_an_address_is_redacted(tmp_path, monkeypatch):
    """What a step tags its run with (predict: the model's URI, which is not a setting) passes
    the one redaction, into a real SQLite-backed MLflow store."""
    from mlflow import MlflowClient

    from components.tracking.run import Tracker
    from tests.support.projects import make_project

    monkeypatch.chdir(make_project(tmp_path / "project", dvc=False))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with Tracker.start(load_params(overrides=["register.model_name=redacted-tags"])) as tracker:
        tracker.on_train_start(0)
        tracker.set_tags({"batch.model": f"https://models.example/m.pt?token={SECRET}"})
    tags = MlflowClient().get_run(tracker.run_id).data.tags
    assert tags["batch.model"] == "https://models.example/m.pt?token=***"
    assert _files_holding(tmp_path, SECRET) == []


# --- servers on loopback ------------------------------------------------------------------------


def _session_pids(sid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                # The fields after the command's closing parenthesis: state, ppid, pgrp, session.
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[3]) == sid:
                    pids.append(int(entry.name))
    return pids


def _socket_inodes(pids: list[int]) -> set[str]:
    inodes = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    found = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(fd))
                    if found:
                        inodes.add(found.group(1))
    return inodes


def _address(hex_addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(hex_addr)
    # /proc/net prints each 32-bit word in host (little-endian) order.
    return ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)))


def listening(sid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket that the processes of session `sid` listen on."""
    inodes = _socket_inodes(_session_pids(sid))
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                addr, port = cols[1].split(":")
                found.append((str(_address(addr)), int(port, 16)))
    return found


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def _server_session(port: int) -> int:
    """The session of the server process started with `--port <port>` (servers.py starts each
    server in a session of its own, so its workers share it)."""
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
            if b"--port" in cmd and cmd[cmd.index(b"--port") + 1] == str(port).encode():
                return os.getsid(int(entry.name))
    raise AssertionError(f"no process started with --port {port}")


@pytest.mark.slow
def test_local_servers_and_worker_listen_on_loopback_only(stack):
    """The session's servers and a worker (started as tests/support/servers.py starts them, which
    test_the_stack_commands_bind_loopback below holds to the Makefile's way)."""
    with stack.worker("sec-worker") as worker:
        seen = {}
        for name, base in (("prefect", stack.env["PREFECT_API_URL"]), ("mlflow", stack.mlflow)):
            port = int(re.search(r":(\d+)", base.split("//")[1]).group(1))
            seen[name] = listening(_server_session(port))
            assert ("127.0.0.1", port) in seen[name], seen  # the reading itself works
        seen["worker"] = listening(worker.pid)
    exposed = {name: [s for s in socks if not _loopback(s[0])] for name, socks in seen.items()}
    assert not any(exposed.values()), f"listening beyond loopback: {exposed}"


def test_the_stack_commands_bind_loopback():
    """`make stack-up` (and tests/support/servers.py) name --host 127.0.0.1 on every server they
    start."""
    sources = [(PROJECT / path).read_text() for path in ("Makefile", "tests/support/servers.py")]
    starts = [line for text in sources for line in text.splitlines()
              if re.search(r"server start|mlflow server|\"server\"", line)]
    assert len(starts) >= 4, starts
    for line in starts:
        assert re.search(r"--host\W+127\.0\.0\.1", line), line
    everything = "\n".join(sources + [(PROJECT / "prefect.yaml").read_text()])
    assert "0.0.0.0" not in everything


# --- pickled code -------------------------------------------------------------------------------


class Canary:
    """Unpickling this opens (so creates) the canary file: the least any payload could do."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return builtins.open, (self.path, "w")


def _seal(path: Path) -> Path:
    """The .sha256 beside `path`, as checkpoint.save writes it: the hash check passes."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    ckpt.sha256_path(path).write_text(f"{digest}  {path.name}\n")
    return path


def _model_file(canary: Path) -> dict:
    return {"format": ckpt.MODEL_FORMAT, "model": {"name": "simple_cnn", "kwargs": {}},
            "classes": ["0", "1"], "image_size": [8, 8], "channels": 1,
            "mean": [0.5], "std": [0.5], "state_dict": Canary(canary)}


WRITERS = {  # every format torch.load accepts, each carrying the payload
    "zip": lambda obj, path: torch.save(obj, path),
    "legacy": lambda obj, path: torch.save(obj, path, _use_new_zipfile_serialization=False),
    "pickle": lambda obj, path: path.write_bytes(pickle.dumps(obj, protocol=2)),
}


@pytest.fixture(params=list(WRITERS))
def malicious(request, tmp_path) -> tuple[Path, Path]:
    """(model.pt with the payload and a matching .sha256, the canary it would create)."""
    canary = tmp_path / "canary"
    path = tmp_path / "bad" / outputs.MODEL
    path.parent.mkdir()
    WRITERS[request.param](_model_file(canary), path)
    return _seal(path), canary


def test_the_payload_works_when_unpickled(tmp_path):
    """So that the canary staying away below means the loader refused."""
    canary = tmp_path / "canary"
    for kind, write in WRITERS.items():
        write(_model_file(canary), tmp_path / "m.pt")
        if kind == "pickle":
            pickle.loads((tmp_path / "m.pt").read_bytes())
        else:
            torch.load(tmp_path / "m.pt", weights_only=False)
        assert canary.exists(), kind
        canary.unlink()


def _refused(load, canary: Path) -> str:
    with pytest.raises(UserError) as info:
        load()
    assert not canary.exists(), "the pickled code ran"
    return str(info.value)


def test_checkpoint_load_refuses_pickled_code(malicious):
    path, canary = malicious
    assert "cannot be read safely" in _refused(lambda: ckpt.load(path), canary)
    # as train's resume reads checkpoints/last.pt
    path.rename(path.with_name(outputs.LAST))
    _seal(path.with_name(outputs.LAST))
    _refused(lambda: ckpt.load(path.with_name(outputs.LAST)), canary)


def test_load_model_refuses_pickled_code(malicious):
    path, canary = malicious
    assert str(path) in _refused(lambda: ckpt.load_model(path), canary)
    ckpt.sha256_path(path).unlink()  # model files may come without one: the loader alone
    _refused(lambda: ckpt.load_model(path), canary)


def test_train_start_checkpoint_refuses_pickled_code(malicious):
    """model.checkpoint goes through checkpoint.init_from (what train calls to start from it)."""
    path, canary = malicious
    message = _refused(lambda: ckpt.init_from(str(path), "simple_cnn",
                                              {"in_chans": 1, "img_size": 8}, ["0", "1"]),
                       canary)
    assert "model.checkpoint" in message


def test_predict_refuses_pickled_code(malicious, tmp_path):
    from components.predict import predict

    path, canary = malicious
    params = load_params(PROJECT / "params.yaml",
                         [f"paths.predictions={tmp_path / 'predictions'}"])
    (tmp_path / "inbox").mkdir()
    _refused(lambda: predict(params, tmp_path / "inbox", model_uri=str(path)), canary)
    assert not (tmp_path / "predictions").exists()


def test_prepared_data_refuses_object_arrays(tmp_path):
    from components.data.dataset import load_split, x_path, y_path

    canary = tmp_path / "canary"
    root = tmp_path / "prepared"
    root.mkdir()
    np.save(x_path(root, "train"), np.array([Canary(canary), 1], dtype=object), allow_pickle=True)
    np.save(y_path(root, "train"), np.zeros(2, np.int64))
    for mmap in (True, False):
        assert "train_x.npy" in _refused(lambda m=mmap: load_split(root, "train", mmap=m), canary)


def test_cifar_files_refuse_pickled_code(tmp_path):
    from components.prepare import prepare
    from tests.support.formats import write_cifar10

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    write_cifar10(tmp_path / "raw", (images, np.arange(20) % 10), (images[:10], np.arange(10)))
    batch = tmp_path / "raw/cifar-10-batches-py/data_batch_1"
    assert batch.is_file()
    canary = tmp_path / "canary"
    batch.write_bytes(pickle.dumps({"data": Canary(canary), "labels": [0]}, protocol=2))
    params = load_params(PROJECT / "params.yaml", [
        "data.source=cifar10", f"data.root={tmp_path / 'raw'}", "data.download=false",
        f"paths.prepared={tmp_path / 'prepared'}"])
    message = _refused(lambda: prepare(params), canary)
    assert "data_batch_1" in message and "io.open" in message


@pytest.mark.slow
def test_register_rescores_a_champion_without_running_its_code(tmp_path, monkeypatch):
    """A registered version whose MLmodel names planted code as its pyfunc loader (which
    mlflow.pyfunc.load_model would import, no pickle needed) and whose model.pt carries the
    payload: the gate's rescoring of it runs neither."""
    from mlflow import MlflowClient

    from components.data.dataset import Split
    from components.register import Scores, _champion_scores

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    canary, imported = tmp_path / "canary", tmp_path / "imported"
    model = tmp_path / "model"
    (model / "code").mkdir(parents=True)
    (model / "code" / "planted_loader.py").write_text(
        f"open({str(imported)!r}, 'w')\n\ndef _load_pyfunc(path):\n    raise SystemExit\n")
    (model / "MLmodel").write_text(yaml.safe_dump({"flavors": {"python_function": {
        "loader_module": "planted_loader", "code": "code", "python_version": "3.11"}}}))
    (model / "extra_files").mkdir()
    torch.save(_model_file(canary), model / "extra_files" / outputs.MODEL)
    _seal(model / "extra_files" / outputs.MODEL)

    client = MlflowClient(uri)
    experiment = client.create_experiment("sec", artifact_location=(tmp_path / "art").as_uri())
    run = client.create_run(experiment).info.run_id
    client.log_artifacts(run, str(model), "model")
    client.create_registered_model("sec")
    client.create_model_version("sec", source=f"runs:/{run}/model", run_id=run)

    test = Split(np.zeros((2, 8, 8, 1), np.uint8), np.zeros(2, np.int64))
    ours = Scores("this-test-split", ["0", "1"], {"accuracy": 1.0}, [1.0, 1.0])
    with pytest.raises(UserError):
        _champion_scores(client, "sec", "1", ours, test)
    assert not canary.exists() and not imported.exists()


# --- what tracking logs -------------------------------------------------------------------------


@pytest.mark.slow
def test_tracked_params_and_tags_carry_no_credential(tmp_path, monkeypatch, stack):
    """A run started the way train starts it, against a real server (the session's), with the
    credentials where the refusal says they go (the environment): its params are exactly the
    validated settings, and no param, tag or file the run leaves behind holds the password."""
    from components.tracking.run import Tracker
    from tests.support.projects import make_project

    root = make_project(tmp_path / "project", dvc=False)
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack.mlflow)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "bob")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
    params = load_params(overrides=["register.model_name=no-credential"])
    with Tracker.start(params) as tracker:
        tracker.on_train_start(0)
    data = tracker.client.get_run(tracker.run_id).data
    assert data.params == {k: str(v) for k, v in flatten(params).items()}
    assert secrets_in(data.params) == [] and secrets_in(data.tags) == []
    logged = [*data.params.items(), *data.tags.items()]
    assert not [kv for kv in logged if SECRET in str(kv)]
    assert SECRET not in (Path(params.paths.train) / outputs.RUN).read_text()
