"""What orchestration costs: the training-pipeline flow against the six steps called directly,
`cnn-pipeline pipeline` against `dvc repro`, `make run` on digits, and a `dvc repro` with
nothing to do.

1. Orchestration tax (target: the flow at most 3 s slower). With a warm Prefect server (the one in
   PREFECT_API_URL, else one started here on loopback), in fresh working folders with the same
   params: (a) prepare, augment, train, evaluate, register, export called as the command line
   calls them (MLflow-tracked, embedded store); (b) `training_pipeline(...)` in this process,
   with an empty prepare cache so prepare runs in both. Imports, a first tiny flow run and one
   untimed pair happen before timing; the two alternate `--repeats` times; medians, minimums and
   the differences are printed.
2. The command line without a server (target: ratio at most 1.1): `cnn-pipeline pipeline`
   (Prefect's temporary server, in a PREFECT_HOME that one untimed run made, as on a user's
   machine after the first run) against `dvc repro` of the same six stages, each in a fresh copy
   of a committed project (params.yaml with the settings), alternating `--repeats` times after
   one untimed pair: wall seconds, medians and their ratio, and whether the flow printed
   anything but its own lines (a traceback).
3. `make run` on digits in a clone of the project (a temporary git repo) with this installed
   environment as the clone's own `.venv`, where `make install` puts it (a link to this one;
   `make -o install run`: the install step is not redone), wall time.
4. A second `dvc repro` there: nothing changed, nothing runs (target: at most 1.5 s).

    .venv/bin/python bench/bench_flow.py [--repeats 3] [--set train.epochs=10 ...]
    .venv/bin/python bench/bench_flow.py --only cli --repeats 3      # part 2 alone
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT))


@contextlib.contextmanager
def in_folder(folder: Path):
    """A fresh working folder holding params.yaml; the embedded MLflow store lands in it."""
    folder.mkdir(parents=True)
    shutil.copy(ROOT / "params.yaml", folder / "params.yaml")
    (folder / "data/raw").mkdir(parents=True)
    before = Path.cwd()
    os.chdir(folder)
    try:
        yield folder
    finally:
        os.chdir(before)


def direct(overrides: list[str]) -> None:
    from components import augment, evaluate, export, prepare, register, train
    from components.core.params import load_params
    from components.tracking.run import tracked

    params = load_params("params.yaml", overrides)
    prepare.prepare(params)
    augment.augment(params)
    tracked(train.train, "start")(params)
    tracked(evaluate.evaluate)(params)
    tracked(register.register)(params)
    tracked(export.export)(params)


def flow(overrides: list[str]) -> None:
    import yaml

    from flows.pipeline import training_pipeline

    sections: dict[str, dict] = {}
    for text in overrides:
        key, _, value = text.partition("=")
        section, _, name = key.partition(".")
        sections.setdefault(section, {})[name] = yaml.safe_load(value)
    training_pipeline(**sections)


def orchestration_tax(work: Path, repeats: int, overrides: list[str]) -> dict:
    from prefect import flow as prefect_flow
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    import flows.pipeline  # noqa: F401  (imports outside the timing: both sides share them)

    @prefect_flow
    def warm_up() -> int:
        return 1

    warm_up()
    wall: dict[str, list[float]] = {"direct": [], "flow": []}
    cpu: dict[str, list[float]] = {"direct": [], "flow": []}
    for i in range(repeats + 1):  # the first pair warms both paths up (first uses of each store)
        for name, fn in (("direct", direct), ("flow", flow)):
            with in_folder(work / f"{name}-{i}"), temporary_settings(
                    {PREFECT_LOCAL_STORAGE_PATH: str(work / f"{name}-{i}" / "prefect-cache")}):
                t0, c0 = time.perf_counter(), time.process_time()
                fn(overrides)
                t1, c1 = time.perf_counter(), time.process_time()
            if i:
                wall[name].append(round(t1 - t0, 2))
                cpu[name].append(round(c1 - c0, 2))
    med = {k: statistics.median(v) for k, v in wall.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu.items()}
    return {"bench": "orchestration_tax", "settings": overrides,
            "direct_s": wall["direct"], "flow_s": wall["flow"],
            "direct_median_s": med["direct"], "flow_median_s": med["flow"],
            "tax_median_s": round(med["flow"] - med["direct"], 2),
            "tax_min_s": round(min(wall["flow"]) - min(wall["direct"]), 2),
            # CPU seconds of this process (all its threads): what other sessions' load hides.
            "direct_cpu_s": cpu["direct"], "flow_cpu_s": cpu["flow"],
            "tax_cpu_median_s": round(cpu_med["flow"] - cpu_med["direct"], 2),
            "target": "<= 3 s"}


def project_copy(repo: Path, settings: list[str] = ()) -> Path:
    """The project's files (no tests, no bench) in a committed git repo at `repo`, params.yaml
    with `settings` (section.key=value) written in."""
    import yaml

    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in listed:
        if (ROOT / name).is_file() and not name.startswith(("tests/", "bench/")):
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for text in settings:
        key, _, value = text.partition("=")
        section, _, name = key.partition(".")
        params[section][name] = yaml.safe_load(value)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.name=b", "-c", "user.email=b@b"]
    for args in (["init", "-q"], ["add", "."], ["commit", "-qm", "bench"]):
        subprocess.run(git + args, cwd=repo, check=True, capture_output=True)
    return repo


def quiet_env(**extra: str) -> dict[str, str]:
    """This environment first on PATH, the embedded MLflow store, no Prefect server named."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
    return {**env, "DVC_NO_ANALYTICS": "1", "PATH": f"{BIN}:{env['PATH']}", **extra}


def cli_against_dvc(work: Path, repeats: int, overrides: list[str]) -> dict:
    base = project_copy(work / "cli-base", overrides)
    home = work / "prefect-home"  # one untimed run makes its database, as a user's first run
    commands = {"flow": [str(BIN / "python"), "-m", "cnn_pipeline", "pipeline"],
                "dvc": [str(BIN / "dvc"), "repro"]}
    wall: dict[str, list[float]] = {"flow": [], "dvc": []}
    foreign: list[str] = []
    for i in range(repeats + 1):
        for name, cmd in commands.items():
            folder = work / f"cli-{name}-{i}"
            shutil.copytree(base, folder, symlinks=True)
            env = quiet_env(PREFECT_HOME=str(home),
                            PREFECT_LOCAL_STORAGE_PATH=str(folder / "prefect-storage"))
            t0 = time.perf_counter()
            done = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True)
            seconds = round(time.perf_counter() - t0, 2)
            if done.returncode != 0:
                raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}"
                                 f"{done.stderr[-3000:]}")
            if name == "flow" and "Traceback" in done.stderr:
                foreign.append(done.stderr[done.stderr.index("Traceback"):][:2000])
            if i:
                wall[name].append(seconds)
    med = {k: statistics.median(v) for k, v in wall.items()}
    return {"bench": "cli_flow_vs_dvc_repro", "settings": overrides,
            "flow_s": wall["flow"], "dvc_s": wall["dvc"], "flow_median_s": med["flow"],
            "dvc_median_s": med["dvc"], "ratio": round(med["flow"] / med["dvc"], 3),
            "tracebacks": len(foreign), "first_traceback": foreign[:1], "target": "<= 1.1"}


def make_run(work: Path) -> list[dict]:
    repo = project_copy(work / "repo")
    (repo / ".venv").symlink_to(BIN.parent, target_is_directory=True)  # inside, as a user's
    env = quiet_env()
    out = []
    for what, cmd in (("make_run", ["make", "-o", "install", "run"]),
                      ("dvc_repro_noop", [str(BIN / "dvc"), "repro"])):
        t0 = time.perf_counter()
        done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
        seconds = round(time.perf_counter() - t0, 2)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
        ran = done.stdout.count("Running stage")
        out.append({"bench": what, "seconds": seconds, "stages_run": ran,
                    "target": "<= 1.5 s" if what == "dvc_repro_noop" else None})
    return out


PARTS = ("tax", "cli", "make")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", action="append", default=None, metavar="SECTION.KEY=VALUE",
                        help="settings for both sides (default: train.epochs=1; the tax does not "
                             "grow with epochs, the noise of a shared machine does)")
    parser.add_argument("--only", default=",".join(PARTS),
                        help=f"comma-separated parts: {', '.join(PARTS)}")
    parser.add_argument("--skip-make", action="store_true", help="the same as leaving out make")
    args = parser.parse_args()
    parts = set(args.only.split(",")) - ({"make"} if args.skip_make else set())
    overrides = args.set if args.set is not None else ["train.epochs=1"]
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # both sides: the embedded store, same cost
    with tempfile.TemporaryDirectory(prefix="bench_flow_") as tmp:
        work = Path(tmp)
        if "tax" in parts:
            with contextlib.ExitStack() as stack:
                from prefect.settings import PREFECT_API_URL, temporary_settings

                api = os.environ.get("PREFECT_API_URL")
                if not api:
                    from tests.support.servers import prefect_server

                    api = stack.enter_context(prefect_server(work / "prefect-server"))
                stack.enter_context(temporary_settings({PREFECT_API_URL: api}))
                print(json.dumps(orchestration_tax(work, args.repeats, overrides)), flush=True)
        if "cli" in parts:
            print(json.dumps(cli_against_dvc(work, args.repeats, overrides)), flush=True)
        if "make" in parts:
            for row in make_run(work):
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
