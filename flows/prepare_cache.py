"""What decides the prepare step's output, as one key, and whether a cached output is still there.

The key hashes the data settings (all but `root`, a path string), the content of every file under
`data.root` (not sizes and times: a copy that keeps modification times still changes the key), the
code of the prepare step (components/core/step_code.py: its imports, as DVC's deps), and the
versions of the libraries that decode and resize. The digits source is bundled with scikit-learn, so
its files are not read.

A cached result is used only when the prepared folder is there with the manifest hashes recorded
in the result; otherwise prepare runs again.

DVC, where the project is a DVC project whose params.yaml asks for the same data (the flow's
data settings equal the file's): a prepared folder that `dvc status` finds to be what dvc.lock
records for the current inputs (e.g. fetched by a worker's `dvc pull` pull step) is used, not
made again. With a DVC remote as well, the stage goes through `dvc repro --pull`: DVC looks its
inputs' hashes up in the remote's run cache and, when another host already made this output,
checks it out from the remote instead of running prepare; otherwise it runs the stage's own
command (the same prepare), and the result is pushed with its run-cache entry for the next
host. No commit of dvc.lock has to travel between hosts for this. With other data settings the
flow's output is not the stage's, so DVC is left alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path
from typing import Any

import yaml

from components.core import outputs
from components.core.params import DEFAULT_PARAMS, Params, UserError, load_params
from components.core.step_code import code_hashes
from components.data import dataset

LIBRARIES = ("numpy", "pillow", "scikit-learn", "torchvision")


def cache_key(params: Params) -> str:
    data = params.data.model_dump(mode="json", exclude={"root"})
    parts = {
        "data": data,
        "raw": None if params.data.source == "digits" else folder_hash(params.data.root),
        "code": code_hashes("components.prepare"),
        "libraries": {name: version(name) for name in LIBRARIES},
    }
    blob = json.dumps(parts, sort_keys=True).encode()
    return "prepare-" + hashlib.sha256(blob).hexdigest()


def folder_hash(root: str | Path) -> str | None:
    """sha256 over (relative path, content sha256) of every file under `root`; None if absent.

    Contents are read in threads: hashlib releases the GIL, so reading and hashing overlap.
    """
    root = Path(root)
    if not root.exists():
        return None
    found = sorted(_files(root)) if root.is_dir() else [root]
    digest = hashlib.sha256()
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) + 2)) as pool:
        for path, content in zip(found, pool.map(_file_digest, found), strict=True):
            rel = path.relative_to(root).as_posix() if root.is_dir() else path.name
            digest.update(f"{rel}\0{content}\n".encode())
    return digest.hexdigest()


def _files(root: Path):
    seen = set()
    for folder, dirs, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a link loop
            dirs.clear()
            continue
        seen.add(real)
        for name in names:
            yield Path(folder) / name


def _file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def still_valid(cached: dict[str, Any], params: Params) -> bool:
    """The cached result's output is in place: same manifest hashes, array files present."""
    root = Path(params.paths.prepared)
    try:
        manifest = json.loads((root / outputs.MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    arrays = [f(root, s) for s in dataset.SPLITS for f in (dataset.x_path, dataset.y_path)]
    return manifest.get("hashes") == cached.get("hashes") and all(p.is_file() for p in arrays)


def _dvc(*args: str) -> subprocess.CompletedProcess:
    # Stage commands say `python`: this interpreter's, whatever PATH the worker was started with.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return subprocess.run([sys.executable, "-m", "dvc", *args], capture_output=True, text=True,
                          env={**os.environ, "PATH": path, "DVC_NO_ANALYTICS": "1"})


def dvc_stage(params: Params, stage: str = "prepare") -> bool:
    """This is a DVC project whose `stage` makes what these settings make: params.yaml (which
    DVC reads) has the same data settings and prepared path as the flow's."""
    if not (Path(".dvc").is_dir() and Path("dvc.yaml").is_file()):
        return False
    if stage not in (yaml.safe_load(Path("dvc.yaml").read_text()) or {}).get("stages", {}):
        return False
    try:
        pinned = load_params(DEFAULT_PARAMS)
    except UserError:
        return False
    return pinned.data == params.data and pinned.paths.prepared == params.paths.prepared


def dvc_remote() -> str | None:
    """The project's default DVC remote, if it has one."""
    done = _dvc("remote", "list")
    lines = done.stdout.split() if done.returncode == 0 else []
    return lines[0] if lines else None


def dvc_up_to_date(stage: str = "prepare") -> bool:
    """DVC finds the stage's output as dvc.lock records it for the current inputs (content
    hashes of the raw files and code, the data settings): e.g. just fetched by `dvc pull`."""
    done = _dvc("status", "--json", stage)
    return done.returncode == 0 and json.loads(done.stdout or "{}") == {}


def repro(stage: str = "prepare") -> str:
    """Bring the stage's output here by `dvc repro --pull`: "pulled" when DVC restored it from
    the remote's run cache by the hash of its inputs, "ran" when it had to run the command."""
    done = _dvc("repro", "--pull", "--single-item", stage)
    if done.returncode != 0:
        raise RuntimeError(f"dvc repro --pull {stage} failed:\n{done.stdout}{done.stderr}")
    # DVC says "Stage 'prepare' is cached - skipping run, checking out outputs" on a hit; the
    # wording only labels the log line, the output is correct either way.
    return "pulled" if "skipping run" in done.stdout else "ran"


def push(stage: str = "prepare") -> None:
    """Send the stage's output and its run-cache entry to the default remote."""
    done = _dvc("push", "--run-cache", stage)
    if done.returncode != 0:
        raise RuntimeError(f"dvc push --run-cache {stage} failed:\n{done.stdout}{done.stderr}")


def prepare_unless_made(params: Params, record: Path) -> None:
    """Prepare, unless the prepared folder holds what these settings make (the key and the
    manifest's hashes recorded in `record` by the last call): the local search's cache, where
    Prefect's task cache is not."""
    from components.core.atomic import write_json
    from components.prepare import prepare

    recorded = json.loads(record.read_text()) if record.is_file() else {}
    key = cache_key(params)
    if recorded.get("key") != key or not still_valid(recorded, params):
        prepare(params)
        write_json(record, {"key": key, "hashes": dataset.read_manifest(
            params.paths.prepared)["hashes"]})
