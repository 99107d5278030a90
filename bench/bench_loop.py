"""The cold inner loop: each step in a fresh process, as DVC runs it, beside its floor.

In a fresh committed copy of this project (digits, params.yaml as committed, the embedded MLflow
store), after one untimed pass (disk caches warm), the median of --repeats:
- steps: each step's command (`python -m cnn_pipeline <step>`, as dvc.yaml runs it) in a process
  of its own. Its
  overhead is wall − own work (own work: the `seconds` its command line prints). Its *floor* is
  the wall time, in the same run, of a bare interpreter that imports the third-party top-level
  modules found in the step's `sys.modules` at its exit (but for those a bare interpreter
  starts with; printed) and, for the tracked steps, also opens an MlflowClient on the same store
  and starts and ends a run. Target: overhead <= floor × 1.15 + 0.5 s (what is left: settings,
  writing outputs, process exit).
- refusals: a bad setting, an unknown key, a missing data folder, `cnn-pipeline --help` and each
  step's `cnn-pipeline <step> --help`; target <= 1.0 s each.
- dvc: the main job, `dvc repro --force` with fresh outputs; target <= the sum over stages of
  (own work + floor) × 1.15 + 2 s (DVC's own), and test accuracy >= 0.97. Also each stage's share
  (from its "Running stage" line to the next's).

    .venv/bin/python bench/bench_loop.py [--repeats 3] [--only steps,refusals,dvc]
"""

from __future__ import annotations

import argparse
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

from components.core import outputs  # noqa: E402
from components.core.step_code import PACKAGES, STEPS  # noqa: E402
from tests.support.projects import committed_copy  # noqa: E402

TRACKED = {"train", "evaluate", "register", "export"}  # the steps that log to MLflow
PARTS = ("steps", "refusals", "dvc")
REFUSALS = {
    "bad setting": ["train", "--set", "train.optimizer=adam"],
    "unknown key": ["train", "--set", "train.optimiser=adamw"],
    "missing data folder": ["prepare", "--set", "data.source=imagefolder",
                            "--set", "data.image_size=32", "--set", "data.root=no/such/folder"],
}
# What a floor runs: the imports, then (tracked steps) one MLflow run on the step's store.
FLOOR = """
import importlib, sys
for name in sys.argv[2:]:
    try:
        importlib.import_module(name)
    except Exception:
        pass
if sys.argv[1]:
    from mlflow import MlflowClient
    client = MlflowClient(sys.argv[1])
    found = client.get_experiment_by_name("bench-floor")
    experiment = found.experiment_id if found else client.create_experiment("bench-floor")
    client.set_terminated(client.create_run(experiment).info.run_id)
"""


def env() -> dict[str, str]:
    """This environment's executables first, the embedded MLflow store, the project's own code."""
    out = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "PYTHONPATH", "PREFECT_API_URL")}
    return {**out, "PATH": f"{BIN}:{out['PATH']}", "DVC_NO_ANALYTICS": "1"}


def run(cmd: list[str], cwd: Path, check: bool = True) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True)
    took = time.perf_counter() - start
    if check and done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n"
                         f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return took, done


# Runs a step as `python -m` would and, at its exit (the first exit handler registered runs
# last), prints the top-level names of what is in sys.modules then, but for what a bare
# interpreter has at start-up, the standard library and the project.
MODULES_AT_EXIT = """
import atexit, json, runpy, sys
start = set(sys.modules)
def modules():
    names = {name.split(".")[0] for name in set(sys.modules) - start}
    names = {n for n in names if not n.startswith("__")
             and getattr(sys.modules.get(n), "__spec__", None) is not None}
    print("MODULES " + json.dumps(sorted(names - set(sys.stdlib_module_names))), file=sys.stderr)
atexit.register(modules)
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def show(name: str, took: float, target: float | None, extra: str = "") -> None:
    verdict = "" if target is None else (f"  target <= {target:.2f} s  "
                                         + ("met" if took <= target else "NOT met"))
    print(f"  {name:32s} {took:7.2f} s{verdict}{extra}", flush=True)


def step_modules(project: Path) -> dict[str, list[str]]:
    """Each step's third-party top-level modules at its exit (this run is untimed: it is also the
    pass that warms the disk caches)."""
    found = {}
    shutil.rmtree(project / "outputs/train" / outputs.CHECKPOINTS, ignore_errors=True)  # trains
    for step in STEPS:
        _, done = run([sys.executable, "-c", MODULES_AT_EXIT, "cnn_pipeline", step], project)
        line = next(x for x in done.stderr.splitlines() if x.startswith("MODULES "))
        found[step] = [n for n in json.loads(line.removeprefix("MODULES "))
                       if n not in (*PACKAGES, "cnn_pipeline") and not n.startswith("code_model_")]
    return found


def steps(project: Path, repeats: int, modules: dict[str, list[str]]) -> dict[str, float]:
    """Each step's wall, own work, overhead and floor (medians); returns own work + floor."""
    store = f"sqlite:///{project / 'mlflow.db'}"
    rounds = []
    for _ in range(repeats):
        shutil.rmtree(project / "outputs/train" / outputs.CHECKPOINTS, ignore_errors=True)
        row = {}
        for step in STEPS:
            wall, done = run([sys.executable, "-m", "cnn_pipeline", step], project)
            own = json.loads(done.stdout)["seconds"]
            floor, _ = run([sys.executable, "-c", FLOOR, store if step in TRACKED else "",
                            *modules[step]], project)
            row[step] = (wall, own, floor)
        rounds.append(row)
    print("steps (each a fresh `python -m cnn_pipeline <step>`, as DVC runs it; medians):",
          flush=True)
    budget = {}
    for step in STEPS:
        wall, own, floor = (statistics.median(r[step][i] for r in rounds) for i in range(3))
        over = statistics.median(r[step][0] - r[step][1] for r in rounds)
        budget[step] = own + floor
        print(f"  {step}: floor imports {', '.join(modules[step])}"
              + (" + an MLflow run" if step in TRACKED else ""), flush=True)
        show(f"{step} wall", wall, None)
        show(f"{step} own work", own, None)
        show(f"{step} floor", floor, None)
        show(f"{step} overhead (wall - own)", over, floor * 1.15 + 0.5,
             f"  ({over / floor:.2f} floors)")
    return budget


def refusals(project: Path, repeats: int) -> None:
    print("refusals and --help (each a fresh `cnn-pipeline ...`, the console script; medians):",
          flush=True)
    cases = {**{what: (args, 2) for what, args in REFUSALS.items()},
             "cnn-pipeline --help": (["--help"], 0),
             **{f"{step} --help": ([step, "--help"], 0) for step in STEPS}}
    for what, (args, code) in cases.items():
        def once(args=args, code=code, what=what) -> float:
            took, done = run([str(BIN / "cnn-pipeline"), *args], project, check=False)
            if done.returncode != code or (code == 2 and not done.stderr.startswith("error: ")):
                raise SystemExit(f"{what}: exit {done.returncode}\n{done.stderr[-2000:]}")
            return took
        once()
        show(what, statistics.median(once() for _ in range(repeats)), 1.0)


def stages(cmd: list[str], cwd: Path) -> tuple[float, dict[str, float]]:
    """Run a `dvc repro`-like command, timing each stage from its "Running stage" line to the
    next stage's (the last: to the command's end), DVC's own work between them included."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    starts, said = [], []
    for line in proc.stdout:
        said.append(line)
        if line.startswith("Running stage '"):
            starts.append((line.split("'")[1], time.perf_counter()))
    if proc.wait() != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{''.join(said)[-3000:]}")
    end = time.perf_counter()
    ends = [t for _, t in starts[1:]] + [end]
    return end - start, {name: t1 - t for (name, t), t1 in zip(starts, ends, strict=True)}


def main_job(project: Path, repeats: int, budget: dict[str, float] | None) -> None:
    def once() -> tuple[float, dict[str, float], float]:
        for folder in ("outputs", "data/prepared"):
            shutil.rmtree(project / folder, ignore_errors=True)
        took, spans = stages(["dvc", "repro", "--force"], project)
        metrics = json.loads((project / "outputs/evaluate" / outputs.METRICS).read_text())
        return took, spans, metrics["accuracy"]

    once()
    rounds = [once() for _ in range(repeats)]
    took = statistics.median(r[0] for r in rounds)
    accuracy = [r[2] for r in rounds]
    print("main job (dvc repro --force, fresh outputs; median):", flush=True)
    target = None if budget is None else sum(budget.values()) * 1.15 + 2
    show("dvc repro --force", took, target,
         f"; test accuracy {min(accuracy):.4f}-{max(accuracy):.4f} (target >= 0.97: "
         f"{'met' if min(accuracy) >= 0.97 else 'NOT met'})"
         + ("" if budget else " (run with steps for the time target)"))
    spans = {name: statistics.median(r[1][name] for r in rounds) for name in rounds[0][1]}
    print("    per stage: " + ", ".join(f"{k} {v:.2f} s" for k, v in spans.items()), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default=",".join(PARTS),
                        help=f"comma-separated parts: {', '.join(PARTS)}")
    args = parser.parse_args()
    parts = set(args.only.split(","))
    if parts - set(PARTS):
        parser.error(f"unknown parts: {', '.join(sorted(parts - set(PARTS)))}")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
          f"{time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_loop_") as tmp:
        project = committed_copy(Path(tmp) / "project")
        run(["dvc", "repro"], project)  # data, model and MLflow store in place
        budget = None
        if "steps" in parts:
            budget = steps(project, args.repeats, step_modules(project))
        if "refusals" in parts:
            refusals(project, args.repeats)
        if "dvc" in parts:
            main_job(project, args.repeats, budget)
    print(f"load average at the end {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
