"""The register step against a real MLflow server: the gate's cases, exactly-once, and two
pipelines racing for `champion`.

Candidates are real model files: one digits model trained for an epoch, the same architecture
with random weights (worse), and copies of the trained one whose head never answers some classes
(a class regression at a better average).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from components.core import outputs
from components.core.params import Register, load_params
from components.data.dataset import class_names, load_split, read_manifest
from components.register import Classifier, Scores, decide, gate_metrics, register, score
from components.tracking.run import Tracker, tracked
from components.training import checkpoint as ckpt
from tests.support.projects import SETTINGS, get, make_project, pairs

# --- the decision alone --------------------------------------------------------------------------


def scores(accuracy: float, recall: list[float], classes=("a", "b", "c")) -> Scores:
    return Scores("h", list(classes), {"accuracy": accuracy}, recall)


@pytest.mark.parametrize("new, old, cfg, promoted, reason", [
    (scores(0.9, [0.9] * 3), None, {}, True, "no champion yet"),
    (scores(0.9, [0.9] * 3), scores(0.8, [0.8] * 3), {}, True, "beats it"),
    (scores(0.8, [0.8] * 3), scores(0.9, [0.9] * 3), {}, False, "does not beat it"),
    (scores(0.9, [0.9] * 3), scores(0.9, [0.9] * 3), {}, False, "does not beat it"),
    (scores(0.905, [0.9] * 3), scores(0.9, [0.9] * 3), {"min_improvement": 0.01}, False,
     "at least 0.01"),
    (scores(0.95, [1.0, 1.0, 0.8]), scores(0.9, [0.9] * 3), {"max_class_drop": 0.05}, False,
     "recall drops by more than 0.05 for: c 0.900->0.800"),
    (scores(0.95, [1.0, 1.0, 0.86]), scores(0.9, [0.9] * 3), {"max_class_drop": 0.05}, True,
     "no class's recall drops"),
    (scores(0.99, [1.0] * 3), scores(0.5, [0.5] * 3, ("x", "y", "z")), {}, False,
     "other classes"),
])
def test_decide(new, old, cfg, promoted, reason):
    got, reasons = decide(new, old, Register(**cfg))
    assert got is promoted and reason in " ".join(reasons)


@pytest.mark.parametrize("y, pred, n", [
    ([0, 1, 2, 0, 1, 2], [0, 1, 2, 0, 1, 2], 3),  # all right
    ([0, 1, 2, 0, 1, 2], [1, 2, 0, 1, 2, 0], 3),  # all wrong
    ([0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2], 3),  # uneven classes
    ([0, 0, 1, 1], [0, 0, 0, 2], 3),  # a class never in the test split, only predicted
    ([0, 0, 1, 2], [0, 0, 0, 0], 4),  # a class neither in the split nor predicted
    ([3], [3], 4),  # one image
    (list(np.random.default_rng(0).integers(0, 10, 500)),
     list(np.random.default_rng(1).integers(0, 10, 500)), 10),
])
def test_the_gate_metrics_are_scikit_learns(y, pred, n):
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, recall_score

    labels = list(range(n))
    metrics, recall = gate_metrics(np.array(y), np.array(pred), n)
    with warnings.catch_warnings():  # "y_pred contains classes not in y_true"
        warnings.simplefilter("ignore")
        expected = {
            "accuracy": accuracy_score(y, pred),
            "balanced_accuracy": balanced_accuracy_score(y, pred),
            "f1_macro": f1_score(y, pred, labels=labels, average="macro", zero_division=0),
        }
        expected_recall = recall_score(y, pred, labels=labels, average=None, zero_division=0)
    assert metrics == pytest.approx(expected, abs=1e-12)
    assert recall == pytest.approx(list(expected_recall), abs=1e-12)


# --- a registry ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(stack):
    """The session's MLflow server (conftest's stack; this module's model names are its own)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", stack.mlflow)
        yield stack.mlflow


@pytest.fixture(scope="module")
def projects(tmp_path_factory) -> dict[str, Path]:
    """Digits prepared twice (split seeds 0 and 1: other test data); a model trained on the
    first."""
    from components.train import train

    root = tmp_path_factory.mktemp("projects")
    a = make_project(root / "a", dvc=False)
    b = make_project(root / "b", {**SETTINGS, "data": {"seed": 1}}, dvc=False)
    # A model that knows every class (~95% on digits), so that suppressing classes in its head
    # (variant) costs accuracy in proportion: the gate tests reason from that.
    params = load_params(a / "params.yaml", [f"paths.{k}={a / v}" for k, v in (
        ("prepared", "data/prepared"), ("augment", "outputs/augment"), ("train", "trained"))]
        + ["train.epochs=6", "train.warmup_epochs=0.5"])
    train(params)
    return {"a": a, "b": b, "model": a / "trained" / outputs.MODEL}


def variant(src: Path, dst: Path, suppress: tuple[int, ...] = (), random: bool = False) -> Path:
    """A model file like `src`: random weights, or a head that never answers `suppress`."""
    from components.training.models import create_model

    saved = ckpt.load(src, what="model file")
    net, meta = ckpt.load_model(src)
    if random:
        torch.manual_seed(0)
        net = create_model(meta["model"]["name"], **meta["model"]["kwargs"])
    with torch.no_grad():
        for c in suppress:
            net.get_classifier().bias[c] -= 1e4
    return ckpt.save(dst, {**saved, "state_dict": net.state_dict()})


def scores_of(model: Path, prepared: Path) -> Scores:
    net, meta = ckpt.load_model(model)
    manifest = read_manifest(prepared)
    return score(Classifier(net, meta).probabilities, load_split(prepared, "test"),
                 class_names(manifest), manifest["hashes"]["test"])


def candidate(folder: Path, project: Path, model: Path, name: str, **cfg) -> Path:
    """A pipeline's outputs up to evaluate for `model` on `project`'s data; returns params.yaml."""
    shutil.copytree(project / "data", folder / "data")
    shutil.copytree(project / "outputs/augment", folder / "outputs/augment")
    (folder / "outputs/train").mkdir(parents=True)
    shutil.copy(model, folder / "outputs/train" / outputs.MODEL)
    shutil.copy(ckpt.sha256_path(model), folder / "outputs/train/model.pt.sha256")
    s = scores_of(model, folder / "data/prepared")
    metrics = {"accuracy": s.metrics["accuracy"], "n_test": len(s.recall)}
    (folder / "outputs/evaluate").mkdir(parents=True)
    (folder / "outputs/evaluate" / outputs.METRICS).write_text(json.dumps(metrics))
    settings = yaml.safe_load((project / "params.yaml").read_text())
    settings["register"] = {**settings["register"], "model_name": name, **cfg}
    (folder / "params.yaml").write_text(yaml.safe_dump(settings))
    return folder / "params.yaml"


def register_in(params_file: Path):
    os.chdir(params_file.parent)
    return tracked(register)(load_params(params_file))


@pytest.fixture(autouse=True)
def _keep_cwd():
    cwd = os.getcwd()
    yield
    os.chdir(cwd)


def aliases(uri: str, name: str) -> dict[str, str]:
    model = get(uri, "registered-models/get", name=name)["registered_model"]
    return {a["alias"]: a["version"] for a in model.get("aliases", [])}


# --- the gate ------------------------------------------------------------------------------------


# The primary metric alone here (max_class_drop 1): random weights answer mostly one class, so
# that class's recall would otherwise block the better model; the next test checks classes.
ANY_DROP = {"max_class_drop": 1.0}


@pytest.mark.slow  # a real MLflow server
def test_gate_first_better_worse_equal(server, projects, tmp_path):
    trained, a = projects["model"], projects["a"]
    weak = variant(trained, tmp_path / "random.pt", random=True)
    first = register_in(candidate(tmp_path / "1", a, weak, "story", **ANY_DROP))
    assert first.promoted and first.reasons == ["no champion yet"]
    # The drift reference model.pt carries is on the version, readable without downloading it.
    version = get(server, "model-versions/get", name="story", version="1")["model_version"]
    carried = json.loads(pairs(version["tags"])["drift.reference"])
    saved = ckpt.load(weak, what="model file")
    assert carried["test"] == saved["reference"] and carried["mean"] == saved["mean"]
    assert aliases(server, "story") == {"champion": "1", "challenger": "1"}

    better = register_in(candidate(tmp_path / "2", a, trained, "story", **ANY_DROP))
    assert better.promoted and "beats it" in better.reasons[0]
    assert aliases(server, "story") == {"champion": "2", "challenger": "2",
                                        "previous-champion": "1"}

    worse = register_in(candidate(tmp_path / "3", a, weak, "story", **ANY_DROP))
    assert not worse.promoted and "does not beat it" in worse.reasons[0]
    assert aliases(server, "story") == {"champion": "2", "challenger": "3",
                                        "previous-champion": "1"}

    equal = register_in(candidate(tmp_path / "4", a, trained, "story", min_improvement=0.01,
                                  **ANY_DROP))
    assert not equal.promoted and "(+0.0000): does not beat it" in equal.reasons[0]
    assert aliases(server, "story")["champion"] == "2"

    decision = json.loads((tmp_path / "4/outputs/register" / outputs.DECISION).read_text())
    assert decision["compared_with"]["version"] == "2" and not decision["compared_with"]["rescored"]
    run = get(server, "runs/get", run_id=equal.run_id)["run"]
    assert pairs(run["data"]["tags"])["register.promoted"] == "False"


@pytest.mark.slow  # a real MLflow server
def test_gate_refuses_a_class_regression(server, projects, tmp_path):
    trained, a = projects["model"], projects["a"]
    recall = scores_of(trained, a / "data/prepared").recall
    k, j1, j2 = np.argsort(recall)[::-1][:3]  # the three best-recognised classes
    champion = variant(trained, tmp_path / "c.pt", suppress=(int(j1), int(j2)))
    challenger = variant(trained, tmp_path / "k.pt", suppress=(int(k),))
    # Better on average (one class lost instead of two), but class k collapses.
    assert (scores_of(challenger, a / "data/prepared").metrics["accuracy"]
            > scores_of(champion, a / "data/prepared").metrics["accuracy"])
    assert register_in(candidate(tmp_path / "1", a, champion, "classes")).promoted
    result = register_in(candidate(tmp_path / "2", a, challenger, "classes"))
    assert not result.promoted
    assert "beats it" in result.reasons[0]
    drops = result.reasons[1].removeprefix("recall drops by more than 0.05 for: ").split(", ")
    assert any(d.startswith(f"{k} ") and d.endswith("->0.000") for d in drops), drops
    assert aliases(server, "classes") == {"champion": "1", "challenger": "2"}


@pytest.mark.slow  # a real MLflow server
def test_gate_rescores_a_champion_of_other_data(server, projects, tmp_path):
    trained, a, b = projects["model"], projects["a"], projects["b"]
    assert register_in(candidate(tmp_path / "a", a, trained, "data")).promoted
    result = register_in(candidate(tmp_path / "b", b, trained, "data"))
    decision = json.loads(Path(result.decision_path).read_text())
    compared = decision["compared_with"]
    assert compared["rescored"]  # its recorded scores were on split seed 0's test data
    on_b = scores_of(trained, b / "data/prepared")
    assert compared["scores"]["test_hash"] == on_b.test_hash != scores_of(
        trained, a / "data/prepared").test_hash
    assert compared["scores"]["metrics"]["accuracy"] == pytest.approx(on_b.metrics["accuracy"])
    assert not result.promoted  # the same weights: equal, not better


# --- exactly once --------------------------------------------------------------------------------


@pytest.mark.slow  # a real MLflow server
def test_a_retried_register_makes_no_second_version(server, projects, tmp_path):
    params_file = candidate(tmp_path / "1", projects["a"], projects["model"], "retry")
    first = register_in(params_file)
    assert first.created and first.version == "1"
    again = register_in(params_file)  # same run.json: the same training run
    assert (again.created, again.version, again.promoted) == (False, "1", True)

    # A crash after the aliases moved but before the decision was recorded: found, not remade.
    from mlflow import MlflowClient

    MlflowClient(server).delete_model_version_tag("retry", "1", "gate.decision")
    third = register_in(params_file)
    assert (third.created, third.version, third.reasons) == (False, "1", ["already the champion"])
    versions = get(server, "model-versions/search", filter="name = 'retry'")["model_versions"]
    assert [v["version"] for v in versions] == ["1"]

    import mlflow.pyfunc

    test = load_split(projects["a"] / "data/prepared", "test")
    served = mlflow.pyfunc.load_model("models:/retry@champion")  # arrays: the second form
    rows = served.unwrap_python_model().classify(np.array(test.x[:50]))
    probs = np.array(rows["probabilities"].tolist())
    assert probs.shape == (50, 10) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert list(rows["class"]) == [str(c) for c in probs.argmax(1)]

    # model.pt travels with the registered model: predict and model.checkpoint start from it.
    from components.training.checkpoint import load_model, prepare_input, resolve_model_uri

    model, meta = load_model(resolve_model_uri("models:/retry@champion"))
    with torch.inference_mode():
        mine = torch.softmax(model(prepare_input(test.x[:50], meta)), 1).numpy()
    assert np.allclose(mine, probs, atol=1e-4)


# --- concurrency ---------------------------------------------------------------------------------


@pytest.mark.slow  # a real MLflow server
@pytest.mark.parametrize("round_", range(3))
def test_two_pipelines_finishing_together_leave_the_better_champion(server, projects, tmp_path,
                                                                     round_):
    name = f"race-{round_}"
    weak = variant(projects["model"], tmp_path / "random.pt", random=True)
    pipelines = {"better": candidate(tmp_path / "better", projects["a"], projects["model"], name,
                                     **ANY_DROP),
                 "worse": candidate(tmp_path / "worse", projects["a"], weak, name, **ANY_DROP)}
    for params_file in pipelines.values():  # each its own training run, as two pipelines have
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(params_file.parent)
            with Tracker.start(load_params(params_file)) as tracker:
                tracker.on_train_start(0)  # the run a train would have opened
    env = {**os.environ, "MLFLOW_TRACKING_URI": server}
    procs = {k: subprocess.Popen([sys.executable, "-m", "cnn_pipeline", "register", "--params",
                                  str(f)], cwd=f.parent, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
             for k, f in pipelines.items()}
    results = {}
    for k, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        results[k] = json.loads(out)
    champion = get(server, "registered-models/alias", name=name, alias="champion")
    assert champion["model_version"]["run_id"] == results["better"]["run_id"]
    assert {r["version"] for r in results.values()} == {"1", "2"}


# Each process says it is ready once its imports are done and waits for the other, so that both
# ask for the lock at the same moment (imports take seconds, unevenly: without this a lock that
# does nothing could pass).
LOCK_SCRIPT = """
import pathlib, sys, time
from mlflow import MlflowClient
from components.register import RegistryLock
client = MlflowClient(tracking_uri=sys.argv[1])
folder = pathlib.Path(sys.argv[2])
(folder / f"ready-{sys.argv[3]}").touch()
while len(list(folder.glob("ready-*"))) < 2:
    time.sleep(0.01)
with RegistryLock(client, "race/0"):
    held = time.time()
    time.sleep(1.0)
    print(held, time.time())
"""


def test_pipelines_on_the_embedded_store_take_turns_through_a_file_lock(tmp_path):
    """Two processes locking one model of a SQLite registry hold the lock one after the other,
    through a lock file beside the store, not the registry's tag (the model is not even
    registered, which the tag lock would need)."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri).search_experiments()  # the store exists before both start
    procs = [subprocess.Popen([sys.executable, "-c", LOCK_SCRIPT, uri, str(tmp_path), str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    spans = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        spans.append(tuple(map(float, out.split())))
    first, second = sorted(spans)
    assert first[1] <= second[0]  # held one after the other
    assert (tmp_path / "mlflow.db.race%2F0.lock").exists()
