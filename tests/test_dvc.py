"""The DVC pipeline for real: a temporary git repo holding the project's files, `dvc repro` runs."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from components.core import outputs
from tests.support.projects import sh

ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ["params.yaml", "dvc.yaml", ".dvcignore", ".dvc/config", "data/raw/.gitkeep"]

pytestmark = pytest.mark.slow


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git repo with the project's code and settings, as a user's clone would have them."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "components", repo / "components",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in PROJECT_FILES:
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, repo / name)
    sh(["git", "init", "-q"], repo)
    sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "."], repo)
    sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "project"], repo)
    return repo


def set_param(repo: Path, section: str, key: str, value) -> None:
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params[section][key] = value
    path.write_text(yaml.safe_dump(params))


def test_prepare_stage_runs_once_then_again_when_data_settings_change(repo):
    out = sh(["dvc", "repro", "prepare"], repo)
    assert "Running stage 'prepare'" in out
    manifest = repo / "data/prepared" / outputs.MANIFEST
    first = json.loads(manifest.read_text())
    assert first["source"] == "digits" and sum(first["num"].values()) == 1797
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert lock["stages"]["prepare"]["params"]["params.yaml"]["data"]["seed"] == 0

    stamp = manifest.stat().st_mtime_ns
    out = sh(["dvc", "repro", "prepare"], repo)
    assert "Running stage" not in out
    assert manifest.stat().st_mtime_ns == stamp  # nothing was written
    assert json.loads(sh(["dvc", "status", "prepare", "--json"], repo)) == {}

    set_param(repo, "data", "seed", 1)
    out = sh(["dvc", "repro", "prepare"], repo)
    assert "Running stage 'prepare'" in out
    second = json.loads(manifest.read_text())
    assert second["seed"] == 1 and second["hashes"]["train"] != first["hashes"]["train"]


def test_prepare_stage_reruns_when_the_image_folder_changes(repo):
    from PIL import Image

    folder = repo / "data/raw/shapes"
    for cls, colour in [("red", (200, 0, 0)), ("blue", (0, 0, 200))]:
        (folder / cls).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (20 + i, 20), colour).save(folder / cls / f"{i}.png")
    set_param(repo, "data", "source", "imagefolder")
    set_param(repo, "data", "root", "data/raw/shapes")
    set_param(repo, "data", "image_size", 16)
    assert "Running stage 'prepare'" in sh(["dvc", "repro", "prepare"], repo)
    assert "Running stage" not in sh(["dvc", "repro", "prepare"], repo)

    Image.new("RGB", (30, 30), (0, 0, 250)).save(folder / "blue" / "new.png")
    assert "Running stage 'prepare'" in sh(["dvc", "repro", "prepare"], repo)
    manifest = json.loads((repo / "data/prepared" / outputs.MANIFEST).read_text())
    assert manifest["files"]["prepared"] == 11


def test_whole_pipeline_runs_once_and_an_experiment_reruns_only_what_changed(repo):
    set_param(repo, "train", "epochs", 1)
    sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "one epoch"], repo)
    out = sh(["dvc", "repro"], repo)
    for stage in ("prepare", "augment", "train", "evaluate", "register", "export"):
        assert f"Running stage '{stage}'" in out
    metrics = json.loads((repo / "outputs/evaluate" / outputs.METRICS).read_text())
    assert 0.0 < metrics["accuracy"] <= 1.0
    decision = json.loads((repo / "outputs/register" / outputs.DECISION).read_text())
    assert decision["version"]
    exported = json.loads((repo / "outputs/export" / outputs.EXPORT).read_text())
    assert exported["version"] == decision["version"] and exported["passed"]

    assert "Running stage" not in sh(["dvc", "repro"], repo)

    sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "dvc.lock"], repo)
    sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "lock"], repo)
    # An experiment the gate refuses (nothing beats the champion by 1), then another.
    out = sh(["dvc", "exp", "run", "-n", "small-lr", "-S", "train.lr=0.001",
              "-S", "register.min_improvement=1"], repo)
    ran = {s for s in ("prepare", "augment", "train", "evaluate", "register", "export")
           if f"Running stage '{s}'" in out}
    assert ran == {"train", "evaluate", "register", "export"}
    refused = json.loads((repo / "outputs/register" / outputs.DECISION).read_text())
    exported = json.loads((repo / "outputs/export" / outputs.EXPORT).read_text())
    assert not refused["promoted"] and refused["version"] != decision["version"]
    assert exported["version"] == decision["version"] and "champion" in exported["aliases"]
    assert exported["registered_by_this_run"] == refused["version"]
    sh(["dvc", "exp", "run", "-n", "big-lr", "-S", "train.lr=0.01"], repo)

    table = exp_show(repo)
    header = next(line for line in table.splitlines() if "Experiment" in line).split()
    assert {"accuracy", "balanced_accuracy", "macro_f1", "loss", "train.lr"} <= set(header)
    assert not [c for c in header if "/" in c]  # no file hashes
    assert "…" not in table and max(map(len, table.splitlines())) <= 120, table
    assert "small-lr" in table and "big-lr" in table

    # Each run is named apart in MLflow; an experiment's carries its name as a tag.
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    runs = {r.info.run_name: r for r in client.search_runs(
        [client.get_experiment_by_name("digits-classifier").experiment_id])}
    assert set(runs) == {"simple_cnn-digits", "small-lr", "big-lr"}
    assert runs["small-lr"].data.tags["dvc.experiment"] == "small-lr"
    assert "dvc.experiment" not in runs["simple_cnn-digits"].data.tags


def exp_show(repo: Path) -> str:
    """The README's `dvc exp show` command, run as a user's terminal of 120 columns shows it."""
    import shlex

    readme = (ROOT / "README.md").read_text()
    [line] = [x for x in readme.splitlines() if x.startswith("dvc exp show ")]
    command = shlex.split(line.split("  #")[0])
    return sh([*command, "--no-pager"], repo, env={"COLUMNS": "120"})


def repro(repo: Path, *args: str) -> str:
    """`dvc repro` with its stdout and stderr together (the steps' messages are on stderr)."""
    return sh(["dvc", "repro", *args], repo, stderr=True)


def registry_state(repo: Path) -> tuple[str, list[str], str]:
    """(the pipeline's MLflow run, the model's versions, the challenger alias) in the project's
    embedded store."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    run_id = json.loads((repo / "outputs/train" / outputs.RUN).read_text())["run_id"]
    versions = sorted(v.version for v in client.search_model_versions(
        "name = 'digits-classifier'"))
    challenger = client.get_model_version_by_alias("digits-classifier", "challenger").version
    return run_id, versions, challenger


def test_a_finished_run_forced_again_is_reused_and_a_code_edit_retrains_saying_why(repo):
    set_param(repo, "train", "epochs", 2)
    sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "two epochs"], repo)
    repro(repo)
    metrics = (repo / "outputs/evaluate" / outputs.METRICS).read_text()
    state = registry_state(repo)
    assert state[1] == [state[2]]  # one version, the challenger

    for _ in range(2):  # what a user doubting the cache runs, as often as they like
        out = repro(repo, "--force")
        assert "after epoch 2: finished: nothing to train" in out
        assert (repo / "outputs/evaluate" / outputs.METRICS).read_text() == metrics
        assert registry_state(repo) == state  # no new run, no new version, challenger stays
    from mlflow import MlflowClient

    record = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}").get_run(state[0])
    assert record.data.metrics["train.seconds"] > 0  # the run's record of its training stands

    recipe = repo / "components/training/setup.py"
    recipe.write_text(recipe.read_text() + "# a one-line edit\n")
    out = repro(repo)
    assert "Running stage 'train'" in out
    assert "changed: code.components/training/setup.py); starting fresh" in out
    rows = json.loads((repo / "outputs/train" / outputs.HISTORY).read_text())
    assert [r["epoch"] for r in rows] == [1, 2]  # trained again from epoch 1
    run_id, versions, _ = registry_state(repo)
    assert run_id != state[0] and len(versions) == 2  # a new model: a new run and version
