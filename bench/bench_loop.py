"""The inner loop, each figure beside the floor `python -c "import torch"` measured in the same run.

In a fresh committed copy of this project (digits, params.yaml as committed, the embedded MLflow
store), each figure warm (one untimed pass first) and the median of --repeats, with its ratio to
the floor (the median of --repeats `python -c "import torch"`, measured first and last):
- steps: each step alone as DVC runs it (`python -m components.<step>`): wall, its own work (the
  `seconds` and `cpu_seconds` its command line prints; train's wall: `train_seconds`, its
  epochs) and the difference, the overhead; targets: overhead <= floor + 1.5 s (prepare,
  augment), floor + 3.5 s (train, evaluate, register), also judged on CPU seconds. train starts
  fresh each time (its checkpoints removed).
- pictures: each of evaluate's pictures drawn and saved in this process, as evaluate draws it;
  target <= 0.3 s.
- refusals: a bad setting, an unknown key, a missing data folder; target <= 1.0 s.
- dvc: the main job, `dvc repro --force` with fresh outputs; target <= 12 floors and test
  accuracy >= 97%; also each stage's share (from its "Running stage" line to the next's).
- exp: `dvc exp run -S train.lr=...` (0.002 and next to it: a value run before would come back
  from DVC's run cache); target <= train's own work + 8 floors.
- prefect: the Makefile's stack on free ports: `make stack-up` on existing databases (<= 30 s),
  `make stack-down`, and a warm worker's `prefect deployment run 'training-pipeline/digits'
  --watch` (<= 35 s), with another train.lr each time (training afresh, the main job's work),
  and as it is (the settings of the run before: train resumes its finished run, nothing to
  train). The worker's environment is this one: where it has requirements.lock
  installed (pip freeze says so), the pull step's record of that is written first, so no run
  pip-installs.

The steps run as they do by default, in the warm runner (components/warm.py; its servers in a
folder of this run's, stopped at the end): the untimed first pass starts its server. `--warm off`
measures them each in a process of its own, as before it (CNN_PIPELINE_WARM=0).

Each figure is wall seconds, and beside it CPU seconds (user + system of the command and the
children it waited for, and of the warm runner's server and its children; of this process for the
pictures), each also in floors (the floor's own wall or CPU seconds): on a machine shared with
other work the CPU figures move less.

    .venv/bin/python bench/bench_loop.py [--repeats 3] [--only steps,pictures,refusals,dvc,exp]
                                         [--warm on|off]
    .venv/bin/python bench/bench_loop.py --only prefect
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT))

from tests.projects import committed_copy  # noqa: E402
from tests.servers import free_port  # noqa: E402

STEPS = ("prepare", "augment", "train", "evaluate", "register")
TRACKED = {"train", "evaluate", "register"}
PARTS = ("steps", "pictures", "refusals", "dvc", "exp", "prefect")
REFUSALS = {
    "bad setting": ["components.train", "--set", "train.optimizer=adam"],
    "unknown key": ["components.train", "--set", "train.optimiser=adamw"],
    "missing data folder": ["components.prepare", "--set", "data.source=imagefolder",
                            "--set", "data.image_size=32", "--set", "data.root=no/such/folder"],
}


WARM = {"CNN_PIPELINE_WARM": "1", "CNN_PIPELINE_WARM_DIR": ""}  # set in main()


def env() -> dict[str, str]:
    """This environment's executables first, the embedded MLflow store, the project's own code,
    the warm runner as main() says."""
    out = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "PYTHONPATH", "PREFECT_API_URL")}
    return {**out, "PATH": f"{BIN}:{out['PATH']}", "DVC_NO_ANALYTICS": "1", **WARM}


@dataclass(frozen=True)
class Took:
    wall: float
    cpu: float

    def __sub__(self, other: Took) -> Took:
        return Took(self.wall - other.wall, self.cpu - other.cpu)


def _cpu() -> float:
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime + _servers_cpu()


def _servers_cpu() -> float:
    """CPU seconds of the warm runner's servers and the children they ran (the steps)."""
    from components import warm

    total = 0.0
    for server in warm.servers(Path(WARM["CNN_PIPELINE_WARM_DIR"])):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{server['pid']}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    return total


def run(cmd: list[str], cwd: Path, check: bool = True,
        extra: dict | None = None) -> tuple[Took, subprocess.CompletedProcess]:
    t0, c0 = time.perf_counter(), _cpu()
    done = subprocess.run(cmd, cwd=cwd, env={**env(), **(extra or {})}, capture_output=True,
                          text=True)
    took = Took(time.perf_counter() - t0, _cpu() - c0)
    if check and done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n"
                         f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return took, done


def repeat(fn, repeats: int) -> list:
    """fn() once untimed (warm), then `repeats` times: their results."""
    fn()
    return [fn() for _ in range(repeats)]


def med(values: list[Took]) -> Took:
    return Took(statistics.median(v.wall for v in values), statistics.median(v.cpu for v in values))


def show(name: str, took: Took, floor: Took, target: str, ok: bool | None, extra: str = "") -> None:
    verdict = "" if ok is None else ("  met" if ok else "  NOT met")
    print(f"  {name:28s} {took.wall:7.2f} s {took.wall / floor.wall:6.2f} floors | cpu "
          f"{took.cpu:6.2f} s {took.cpu / floor.cpu:6.2f} floors | target {target}{verdict}{extra}",
          flush=True)


def floor(repeats: int) -> Took:
    return med(repeat(lambda: run([sys.executable, "-c", "import torch"], ROOT)[0], repeats))


def fresh_outputs(project: Path) -> None:
    for folder in ("outputs", "data/prepared"):
        shutil.rmtree(project / folder, ignore_errors=True)


def steps(project: Path, repeats: int, ref: Took) -> dict[str, float]:
    """Each step's wall, own work and overhead; returns each step's own work (medians)."""
    from components import files

    def once() -> dict[str, tuple[Took, Took]]:
        shutil.rmtree(project / "outputs/train" / files.CHECKPOINTS, ignore_errors=True)
        out = {}
        for step in STEPS:
            took, done = run([sys.executable, "-m", f"components.{step}"], project)
            result = json.loads(done.stdout)
            own = result["train_seconds"] if step == "train" else result["seconds"]
            out[step] = (took, Took(own, result["cpu_seconds"]))
        return out

    rounds = repeat(once, repeats)
    print("steps (python -m components.<step>, as DVC runs them):", flush=True)
    own_work = {}
    for step in STEPS:
        wall, own = med([r[step][0] for r in rounds]), med([r[step][1] for r in rounds])
        over = med([r[step][0] - r[step][1] for r in rounds])
        own_work[step] = own.wall
        budget = 3.5 if step in TRACKED else 1.5
        show(f"{step} wall", wall, ref, "-", None)
        show(f"{step} own work", own, ref, "-", None)
        on_cpu = "met" if over.cpu <= ref.cpu + budget else "NOT met"
        show(f"{step} overhead", over, ref, f"<= floor + {budget} s = {ref.wall + budget:.2f} s "
             f"(cpu: {ref.cpu + budget:.2f} s {on_cpu})", over.wall <= ref.wall + budget)
    return own_work


def pictures(project: Path, repeats: int, ref: Took) -> None:
    """Each picture as evaluate draws and saves it, from this run's model and test split."""
    import numpy as np

    from components import evaluate as ev
    from components import files
    from components.checkpoint import load_model
    from components.params import load_params
    from components.predict import score
    from components.prepared import class_names, load_split, read_manifest

    with contextlib.chdir(project):
        params = load_params()
        manifest = read_manifest(params.paths.prepared)
        names = class_names(manifest)
        test = load_split(params.paths.prepared, "test")
        model, meta = load_model(Path(params.paths.train) / files.MODEL)
        s = ev.Scores(np.asarray(test.y), score(model, meta, test.x, "cpu"))
        table = ev._calibration(s.confidence, s.pred == s.y, params.evaluate.calibration_bins)
        ece = float(table["gap"] @ table["count"] / len(s.y))
        history = ev._read_history(Path(params.paths.train) / files.HISTORY)
    draw = {
        files.CONFUSION_PNG: lambda: ev._confusion_figure(s, names, None),
        files.CONFUSION_NORMALIZED_PNG: lambda: ev._confusion_figure(s, names, "true"),
        files.CALIBRATION_PNG: lambda: ev._calibration_figure(table, ece),
        files.MISTAKES_PNG: lambda: ev._mistakes_figure(s, test.x, names,
                                                        params.evaluate.mistakes),
        files.CURVES_PNG: lambda: ev._curves_figure(history, meta.get("epoch")),
    }

    def timed(make) -> Took:
        t0, c0 = time.perf_counter(), time.process_time()
        make().savefig(io.BytesIO(), format="png", dpi=ev.DPI)
        return Took(time.perf_counter() - t0, time.process_time() - c0)

    print("pictures (drawn and saved as evaluate does, in this process):", flush=True)
    for name, make in draw.items():
        took = med(repeat(lambda make=make: timed(make), repeats))
        show(name, took, ref, "<= 0.3 s", took.wall <= 0.3)


def refusals(project: Path, repeats: int, ref: Took) -> None:
    print("refusals (python -m ..., exit code 2 and `error: ...`):", flush=True)
    for what, args in REFUSALS.items():
        def once(args=args, what=what) -> Took:
            took, done = run([sys.executable, "-m", *args], project, check=False)
            if done.returncode != 2 or not done.stderr.startswith("error: "):
                raise SystemExit(f"{what} was not refused: {done.returncode}\n{done.stderr}")
            return took
        took = med(repeat(once, repeats))
        show(what, took, ref, "<= 1.0 s", took.wall <= 1.0, f"  ({' '.join(args)})")


def stages(cmd: list[str], cwd: Path) -> tuple[Took, dict[str, float]]:
    """Run a `dvc repro`-like command, timing each stage from its "Running stage" line to the
    next stage's (the last: to the command's end), DVC's own work between them included."""
    t0, c0 = time.perf_counter(), _cpu()
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
    took = Took(end - t0, _cpu() - c0)
    ends = [t for _, t in starts[1:]] + [end]
    return took, {name: t1 - t for (name, t), t1 in zip(starts, ends, strict=True)}


def main_job(project: Path, repeats: int, ref: Took) -> None:
    from components import files

    def once() -> tuple[Took, dict[str, float], float]:
        fresh_outputs(project)
        took, spans = stages(["dvc", "repro", "--force"], project)
        metrics = json.loads((project / "outputs/evaluate" / files.METRICS).read_text())
        return took, {**spans, "before the first": took.wall - sum(spans.values())}, \
            metrics["accuracy"]

    rounds = repeat(once, repeats)
    took = med([r[0] for r in rounds])
    accuracy = [r[2] for r in rounds]
    print("main job:", flush=True)
    show("dvc repro --force", took, ref, "<= 12 floors, accuracy >= 0.97",
         took.wall <= 12 * ref.wall and min(accuracy) >= 0.97,
         f"; test accuracy {min(accuracy):.4f}-{max(accuracy):.4f} (target >= 0.97)")
    spans = {name: statistics.median(r[1][name] for r in rounds) for name in rounds[0][1]}
    print("    per stage (median of each): " + ", ".join(f"{k} {v:.2f} s"
                                                     for k, v in spans.items()), flush=True)


def experiment(project: Path, repeats: int, ref: Took, train_own: float | None) -> None:
    lrs = iter(["0.0019", "0.002", "0.0021", "0.0022", "0.0023", "0.0024", "0.0025"])

    def once() -> Took:
        return run(["dvc", "exp", "run", "-S", f"train.lr={next(lrs)}"], project)[0]

    took = med(repeat(once, repeats))
    print("experiment:", flush=True)
    if train_own is None:
        show("dvc exp run -S train.lr=...", took, ref, "train's own work + 8 floors (run "
             "with steps to compare)", None)
        return
    limit = train_own + 8 * ref.wall
    show("dvc exp run -S train.lr=...", took, ref,
         f"<= train's own work {train_own:.2f} s + 8 floors = {limit:.2f} s", took.wall <= limit)


def lock_recorded() -> None:
    """The pull step's record that this environment has requirements.lock, written when pip
    freeze shows exactly the lock's pins: the runs then skip pip, as a warm worker does."""
    stamp = Path(sys.prefix) / ".requirements.lock.sha256"
    lock = (ROOT / "requirements.lock").read_bytes()
    line = f"{hashlib.sha256(lock).hexdigest()}  -\n"
    if stamp.is_file() and stamp.read_text() == line:
        return
    freeze = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"],
                            capture_output=True, text=True, check=True).stdout.split()
    pins = [x for x in lock.decode().split() if x and not x.startswith("#")]
    if sorted(freeze) != sorted(pins):
        raise SystemExit(f"{sys.prefix} does not have requirements.lock installed (pip freeze "
                         "differs): a worker's pull step would install it. `make install` first.")
    stamp.write_text(line)
    print(f"(recorded in {stamp}: this environment has requirements.lock installed)")


def prefect(project: Path, repeats: int, ref: Took) -> None:
    lock_recorded()
    ports = {"PREFECT_PORT": str(free_port()), "MLFLOW_PORT": str(free_port())}
    make = ["make", "-o", "install", f"VENV={sys.prefix}", *(f"{k}={v}" for k, v in ports.items())]
    api = f"http://127.0.0.1:{ports['PREFECT_PORT']}/api"
    stack_env = {"PREFECT_HOME": str(project / ".stack/prefect"), "PREFECT_API_URL": api}
    try:
        run([*make, "stack-up"], project)  # creates the databases
        run([*make, "deploy"], project)
        pipeline = ["prefect", "deployment", "run", "training-pipeline/digits", "--watch"]
        lrs = iter(f"0.00{n}" for n in range(19, 40))

        def once(trains: bool = True) -> Took:
            # Another learning rate trains afresh: the main job's work. Without --params the run
            # takes the deployment's settings: the first such run (untimed) trains, the next ones
            # resume its finished training (nothing to train).
            more = ["--params", json.dumps({"train": {"lr": float(next(lrs))}})] if trains else []
            took, done = run([*pipeline, *more], project, extra=stack_env)
            if "Completed" not in done.stdout:
                raise SystemExit(f"the flow run did not complete:\n{done.stdout[-3000:]}")
            return took

        runs = med(repeat(once, repeats))
        resumed = med(repeat(lambda: once(trains=False), repeats))
        downs, ups = [], []
        for _ in range(repeats):
            downs.append(run([*make, "stack-down"], project)[0])
            ups.append(run([*make, "stack-up"], project)[0])
    finally:
        _, done = run([*make, "stack-down"], project, check=False)
        print(done.stdout.strip(), flush=True)
    print("prefect (the Makefile's stack; cpu: of the command alone, not the servers):",
          flush=True)
    show("deployment run --watch", runs, ref, "<= 35 s", runs.wall <= 35,
         "  (--params train.lr: trains afresh)")
    show("deployment run --watch", resumed, ref, "-", None,
         "  (the deployment's settings again: resumes its finished training)")
    show("make stack-up (existing dbs)", med(ups), ref, "<= 30 s", med(ups).wall <= 30)
    show("make stack-down", med(downs), ref, "-", None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default=",".join(p for p in PARTS if p != "prefect"),
                        help=f"comma-separated parts: {', '.join(PARTS)}")
    parser.add_argument("--warm", choices=["on", "off"], default="on",
                        help="the steps in the warm runner (the default) or each in a process of "
                             "its own")
    args = parser.parse_args()
    parts = set(args.only.split(","))
    if parts - set(PARTS):
        parser.error(f"unknown parts: {', '.join(sorted(parts - set(PARTS)))}")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    ref = floor(args.repeats)
    print(f"floor: python -c 'import torch' {ref.wall:.2f} s, cpu {ref.cpu:.2f} s (median of "
          f"{args.repeats})", flush=True)
    print(f"warm runner: {args.warm}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_loop_") as tmp:
        WARM.update(CNN_PIPELINE_WARM="1" if args.warm == "on" else "0",
                    CNN_PIPELINE_WARM_DIR=str(Path(tmp) / "warm"))
        try:
            measure(Path(tmp), parts, args.repeats, ref)
        finally:
            run([sys.executable, "-m", "components.warm", "stop"], ROOT, check=False)
    after = floor(args.repeats)
    print(f"floor again at the end: {after.wall:.2f} s, cpu {after.cpu:.2f} s; load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)


def measure(tmp: Path, parts: set[str], repeats: int, ref: Took) -> None:
    """The parts asked for, in a committed copy of the project."""
    project = committed_copy(tmp / "project")
    run(["dvc", "repro"], project)  # data, model and MLflow store in place, caches warm
    train_own = None
    if "steps" in parts:
        train_own = steps(project, repeats, ref)["train"]
    if "pictures" in parts:
        pictures(project, repeats, ref)
    if "refusals" in parts:
        refusals(project, repeats, ref)
    if "dvc" in parts:
        main_job(project, repeats, ref)
    if "exp" in parts:
        experiment(project, repeats, ref, train_own)
    if "prefect" in parts:
        prefect(project, repeats, ref)


if __name__ == "__main__":
    main()
