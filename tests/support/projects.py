"""Projects for tests: small prepared copies of this one, the committed copy a worker clones, and
reading an MLflow server back over plain REST.

Helpers, not tests: test modules import these (and the fixtures in conftest.py build on them);
no test module imports another.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
SETTINGS = {  # the defaults, made small: digits, one epoch, small pictures
    "data": {"seed": 0},  # DVC's params dependency needs the section present
    "train": {"epochs": 1, "batch_size": 64},
    "augment": {"preview_images": 2, "preview_views": 2},
    "evaluate": {"mistakes": 4},
    "register": {"model_name": "tracked", "flush_timeout_s": 2},
}
PREPARE_STAGE = {"stages": {"prepare": {"cmd": "python -m cnn_pipeline prepare",
                                        "params": ["data"], "outs": ["data/prepared"]}}}
SKIP = ("tests/", "bench/", "infra/", ".ci/")  # not what a worker needs to run the flows
CLONE = Path(".stack/workspace/cnn-pipeline")  # prefect.yaml: working_dir / clone name


def sh(cmd: list[str], cwd: Path, timeout: float = 600, stderr: bool = False,
       env: dict[str, str] | None = None) -> str:
    """`cmd` in `cwd` with this environment's executables first (and `env` added); its stdout
    (with `stderr`, then its stderr: where the steps write their messages), or a failed test."""
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           **(env or {})}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + (done.stderr if stderr else "")


def make_project(root: Path, settings: dict = SETTINGS, dvc: bool = True) -> Path:
    """params.yaml with prepared and augmented data; with `dvc`, a git repo with a DVC prepare
    stage, prepared by `dvc repro`."""
    from components.augment import augment
    from components.core.params import load_params
    from components.prepare import prepare

    root.mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(settings))
    if dvc:
        (root / "dvc.yaml").write_text(yaml.safe_dump(PREPARE_STAGE))
        sh(["git", "init", "-q"], root)
        sh(["dvc", "init", "-q"], root)
        sh([*GIT, "add", "."], root)
        sh([*GIT, "commit", "-qm", "project"], root)
        sh(["dvc", "repro", "-q"], root)
    with contextlib.chdir(root):
        if not dvc:
            prepare(load_params())
        augment(load_params())
    return root


def project_files() -> list[str]:
    """The files of this project that a worker needs: tracked or new, not ignored."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [f for f in listed if not f.startswith(SKIP) and (ROOT / f).is_file()]


def committed_copy(repo: Path) -> Path:
    """The project's files in a new git repository at `repo`, committed: what a worker's pull
    step clones."""
    for name in project_files():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, repo / name)
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "project")
    return repo


def git(repo: Path, *args: str) -> None:
    subprocess.run([*GIT, *args], cwd=repo, check=True, capture_output=True)


@dataclass
class Stack:
    """A Prefect server, an MLflow server and the project deployed to them, for workers."""

    root: Path
    repo: Path  # the project as committed: what `prefect deploy` ran in
    workers: Path  # where workers start; their clone is workers / CLONE
    env: dict
    mlflow: str

    def prefect(self, *args: str, timeout: float = 600) -> str:
        done = subprocess.run([str(BIN / "prefect"), *args], cwd=self.repo, env=self.env,
                              capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def run_deployment(self, name: str, params: dict, watch: bool = True) -> str:
        """The flow run's id; with `watch`, after it ended Completed."""
        args = ["deployment", "run", name, "--params", json.dumps(params)]
        out = self.prefect(*args, *(["--watch"] if watch else []))
        if watch:
            assert "Completed" in out, out[-3000:]
        return re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)

    def worker(self, name: str, limit: int | None = None):
        from tests.support.servers import prefect_worker

        return prefect_worker("local", self.workers, self.env, name, limit=limit)


# --- reading an MLflow server back: plain REST, not the mlflow client ------------------------


def get(uri: str, endpoint: str, **query) -> dict:
    url = f"{uri}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(url, timeout=30) as reply:
        return json.loads(reply.read())


def pairs(items: list[dict]) -> dict[str, str]:
    return {i["key"]: i["value"] for i in items}


@contextlib.contextmanager
def tracking_into(uri: str):
    """MLFLOW_TRACKING_URI and mlflow's own tracking address set to `uri` inside, both unset
    after (mlflow.set_tracking_uri, which register and export call, writes the environment too)."""
    import mlflow
    import pytest

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        try:
            yield uri
        finally:
            mlflow.set_tracking_uri(None)


# --- imbalanced digits: the benchmark's data and the imbalance tests' -------------------------

REDUCED = ("3", "8", "9")  # the digits a small model confuses most (3/5/8/9 share strokes)


def imbalanced_digits(prepared: Path, root: Path, keep: float = 0.05, seed: int = 0,
                      reduced: tuple[str, ...] = REDUCED) -> Path:
    """Prepared digits written out as an image folder with train/ val/ test/ folders (what the
    prepare step then reads, as a user's folder), with only `keep` of the `reduced` classes'
    train and val images (at least one each, drawn with `seed`); test untouched. Returns `root`."""
    import numpy as np
    from PIL import Image

    from components.data.dataset import class_names, load_split, read_manifest

    names = class_names(read_manifest(prepared))
    rng = np.random.default_rng(seed)
    for split in ("train", "val", "test"):
        data = load_split(prepared, split)
        rows = np.arange(len(data.y))
        if split != "test":
            kept = []
            for c, name in enumerate(names):
                members = rows[data.y == c]
                if name in reduced:
                    members = rng.choice(members, max(1, round(keep * len(members))),
                                         replace=False)
                kept.append(members)
            rows = np.sort(np.concatenate(kept))
        for i in rows:
            folder = root / split / names[data.y[i]]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.asarray(data.x[i])[..., 0]).save(folder / f"{i}.png")
    return root


IMBALANCED_DATA = {"source": "imagefolder", "image_size": 8, "channels": 1}  # with data.root
