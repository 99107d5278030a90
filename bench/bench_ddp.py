"""DDP step time on CPU: the train step on 2 gloo processes against 1 process, same global batch.

Real MNIST (60,000 training images, val_fraction 0) is prepared once into a temporary folder;
each run is `train(params)` with simple_cnn, no augmentation, fp32, the global batch
`--batch` (128, raw_loop.py's), for `--epochs` epochs: `train.devices=1` (one process, torch's
threads = the cores) and `train.devices=2` (torchrun, 2 gloo processes of cores // 2 threads each,
each computing half of every global batch and all-reducing the gradients). Runs alternate
(1, 2, 1, 2, ...) because the machine is shared and its speed drifts; the summary takes medians.

Step time = global batch / images per second of the training loop (history.json: no validation,
no checkpoints), per epoch. The first epoch of every run includes warm-up; the summary uses the
later ones when there are any. The DDP run's wall time also includes torchrun's start (fresh
Python processes importing torch); it is printed as `wall_s`, not counted in the step time.
Figures print as JSON lines; the last line is the summary. The load average (1 min) before each
run is in its line.

    .venv/bin/python bench/bench_ddp.py [--mnist ../shared/datasets/mnist] [--repeats 2]
        [--epochs 2] [--batch 128] [--devices 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: components/ is importable

from components.augment import augment  # noqa: E402
from components.core.params import validate  # noqa: E402
from components.prepare import prepare  # noqa: E402
from components.train import train  # noqa: E402


def emit(row: dict) -> dict:
    print(json.dumps(row), flush=True)
    return row


def settings(folder: Path, mnist: Path, run: str, devices: int, args) -> dict:
    return {
        "paths": {"prepared": str(folder / "prepared"), "augment": str(folder / "augment"),
                  "train": str(folder / run)},
        "data": {"source": "mnist", "root": str(mnist), "download": False, "val_fraction": 0.0},
        "model": {"name": "simple_cnn"},
        "augment": {"preset": "none"},
        "train": {"epochs": args.epochs, "batch_size": args.batch, "devices": devices,
                  "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.0, "warmup_epochs": 0.0,
                  "precision": "fp32", "resume": "never", "device": "cpu"},
    }


def one_run(folder: Path, mnist: Path, run: str, devices: int, args) -> dict:
    params = validate(settings(folder, mnist, run, devices, args))
    load1 = round(os.getloadavg()[0], 2)
    t0 = time.perf_counter()
    result = train(params)
    wall = time.perf_counter() - t0
    rows = json.loads(Path(result.history_path).read_text())
    step_ms = [round(1000 * args.batch / r["images_per_s"], 2) for r in rows]
    return emit({"case": "ddp", "devices": devices, "run": run, "load1": load1,
                 "step_ms": step_ms, "images_per_s": [r["images_per_s"] for r in rows],
                 "train_acc": rows[-1]["train_acc"], "wall_s": round(wall, 1)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnist", type=Path, default=ROOT.parent / "shared/datasets/mnist")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--devices", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_ddp-") as tmp:
        folder = Path(tmp)
        params = validate(settings(folder, args.mnist, "prep", 1, args))
        prepare(params)
        augment(params)
        runs: dict[int, list[dict]] = {1: [], args.devices: []}
        for r in range(args.repeats):
            for devices in (1, args.devices):
                runs[devices].append(one_run(folder, args.mnist, f"r{r}-d{devices}", devices,
                                             args))
    warm = slice(1, None) if args.epochs > 1 else slice(None)
    median = {d: statistics.median(ms for row in rows for ms in row["step_ms"][warm])
              for d, rows in runs.items()}
    emit({"case": "ddp", "summary": True, "cores": len(os.sched_getaffinity(0)),
          "global_batch": args.batch, "step_ms_1_process": median[1],
          f"step_ms_{args.devices}_processes": median[args.devices],
          "speedup": round(median[1] / median[args.devices], 3)})


if __name__ == "__main__":
    main()
