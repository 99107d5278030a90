"""What pruning buys a search: a 12-point grid against an Optuna search of 12 trials on digits.

One space, 3 learning rates × 2 models × 2 weight decays:
- grid: every point of it once (search.sampler grid, no pruning);
- optuna: 12 trials of TPE with the median pruner (search.startup_trials, search.min_epochs as
  given) over the same space: `--space ranges` (default) samples learning rate and weight decay
  log-uniform between the grid's ends, `--space values` picks among the grid's own values (the
  grid's best point is then one TPE can find exactly).
Both run as `cnn-pipeline search` does for a user: `parallel` worker processes optimizing one
study, each trial in a process of its own, the same epochs, in a fresh folder with the embedded
MLflow store. Printed side by side: the best validation accuracy of each, their total training
time (the trials' epoch seconds, from each trial's history.json, summed) and wall time, the
ratio optuna/grid, and the share of the 12 × epochs trial-epochs that pruning saved. Targets:
optuna's best >= the grid's, training time <= 0.75× the grid's.

    .venv/bin/python bench/bench_search.py [--epochs 15] [--parallel 2] [--startup-trials 4]
        [--min-epochs 3] [--space ranges|values] [--set train.batch_size=64 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_flow import in_folder  # noqa: E402 (this folder: a fresh working folder)

LRS = [0.001, 0.003, 0.01]
MODELS = ["simple_cnn", "cifar_cnn"]
WEIGHT_DECAYS = [0.005, 0.05]
TRIALS = 12


def grid_space() -> dict:
    return {"train.lr": {"choice": LRS}, "model.name": {"choice": MODELS},
            "train.weight_decay": {"choice": WEIGHT_DECAYS}}


def optuna_space() -> dict:
    return {"train.lr": {"log_uniform": [min(LRS), max(LRS)]}, "model.name": {"choice": MODELS},
            "train.weight_decay": {"log_uniform": [min(WEIGHT_DECAYS), max(WEIGHT_DECAYS)]}}


def search(name: str, space: dict, overrides: list[str]) -> dict:
    """One search, `cnn-pipeline search` here; its best, training seconds, trial-epochs, wall."""
    given = [*overrides, f"search.study={name}", f"register.model_name={name}",
             f"search.space={json.dumps(space)}"]
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "cnn_pipeline", "search",
                           *(f"--set={o}" for o in given)], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout)
    seconds = epochs = 0
    for history in Path("outputs/search", name).glob("trial-*/train/history.json"):
        rows = json.loads(history.read_text())
        seconds += sum(row["epoch_s"] for row in rows)
        epochs += len(rows)
    return {"best": result["best"]["value"], "params": result["best"]["params"],
            "trials": result["trials"], "train_s": seconds, "epochs": epochs, "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--startup-trials", type=int, default=4)
    parser.add_argument("--min-epochs", type=int, default=3)
    parser.add_argument("--space", choices=("ranges", "values"), default="ranges",
                        help="optuna's space: ranges between the grid's ends, or its values")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args()
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # the embedded store in the bench's folder
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT),
                                                             os.environ.get("PYTHONPATH")]))
    common = [f"search.trials={TRIALS}", f"search.parallel={args.parallel}",
              f"train.epochs={args.epochs}", "evaluate.mistakes=4", *args.overrides]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    with tempfile.TemporaryDirectory() as tmp, in_folder(Path(tmp) / "project"):
        grid = search(f"grid-{stamp}", grid_space(),
                      [*common, "search.sampler=grid", "search.pruner=none"])
        space = optuna_space() if args.space == "ranges" else grid_space()
        tuned = search(f"optuna-{stamp}", space, [
            *common, "search.sampler=tpe", "search.pruner=median",
            f"search.startup_trials={args.startup_trials}",
            f"search.min_epochs={args.min_epochs}"])
    budget = TRIALS * args.epochs
    for name, r in (("grid", grid), ("optuna", tuned)):
        print(f"{name:6s}: {r['trials']}, best val_acc {r['best']:.4f} {r['params']}, "
              f"training {r['train_s']:.1f} s over {r['epochs']} trial-epochs, "
              f"wall {r['wall_s']:.0f} s")
    print(f"optuna/grid: best val_acc {tuned['best'] - grid['best']:+.4f} (target >= 0), "
          f"training time {tuned['train_s'] / grid['train_s']:.2f}x (target <= 0.75x), "
          f"wall {tuned['wall_s'] / grid['wall_s']:.2f}x; pruning saved "
          f"{1 - tuned['epochs'] / budget:.0%} of the {budget} trial-epochs")


if __name__ == "__main__":
    main()
