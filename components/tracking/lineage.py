"""Lineage: what ties a run and a model version to code, data and settings (MLflow tags).

The git commit and dirty flag (from CNN_PIPELINE_GIT_COMMIT and _DIRTY where there is no git: a
container; the Kubeflow pipeline records them when it is compiled), the prepared data's hash as
DVC records it (from dvc.lock when it describes the folder as it is, else computed as DVC does),
a hash of the validated settings, and the dataset's name.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
from pathlib import Path

import yaml

from components.core.params import Params
from components.data.dataset import read_manifest

GIT_ENV = ("CNN_PIPELINE_GIT_COMMIT", "CNN_PIPELINE_GIT_DIRTY")  # git_state where git is not

def git_state(cwd: str | Path = ".") -> tuple[str, str]:
    """(commit, dirty) of the working tree; without git or a repository, what GIT_ENV's variables
    say (a container built from a commit sets them), else 'unknown' for both."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                                text=True, timeout=30, check=True).stdout.strip()
        # Untracked files are run outputs and caches, not changes to the code.
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                                capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return os.environ.get(GIT_ENV[0], "unknown"), os.environ.get(GIT_ENV[1], "unknown")
    return commit, "true" if status.strip() else "false"


def params_hash(params: Params) -> str:
    canonical = json.dumps(params.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def data_hash(folder: str | Path, lock: str | Path = "dvc.lock") -> str:
    """The hash DVC records for a folder (`<md5>.dir`): from dvc.lock when it describes the folder
    as it is now, else computed as DVC computes it (dvc-data's tree hash)."""
    folder = Path(folder)
    recorded = _locked_hash(folder, Path(lock))
    return recorded or dvc_dir_hash(folder)


def _locked_hash(folder: Path, lock: Path) -> str | None:
    if not lock.is_file():
        return None
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    for stage in stages.values():
        for out in stage.get("outs", []):
            if (lock.parent / out["path"]).resolve() != folder.resolve():
                continue
            files = [p for p in folder.rglob("*") if p.is_file()]
            # A lock written before the folder was made again is stale: size and count tell.
            if out.get("nfiles") == len(files) and out.get("size") == sum(
                    p.stat().st_size for p in files):
                return out.get("md5")
    return None


def dvc_dir_hash(folder: str | Path) -> str:
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    fs = LocalFileSystem()
    with tempfile.TemporaryDirectory() as tmp:
        _, _, tree = build(HashFileDB(fs, tmp, hash_name="md5"), str(Path(folder).resolve()), fs,
                           "md5", dry_run=True)
    return tree.hash_info.value


def lineage(params: Params) -> dict[str, str]:
    """The tags that tie a run and a model version to code, data and settings."""
    commit, dirty = git_state()
    manifest = read_manifest(params.paths.prepared)
    return {
        "git.commit": commit, "git.dirty": dirty, "mlflow.source.git.commit": commit,
        "data.hash": data_hash(params.paths.prepared), "data.name": dataset_name(params, manifest),
        "data.test_hash": str(manifest.get("hashes", {}).get("test", "unknown")),
        "params.hash": params_hash(params),
    }


def dataset_name(params: Params, manifest: dict) -> str:
    source = manifest.get("source", params.data.source)
    return Path(params.data.root).name if source == "imagefolder" else str(source)

