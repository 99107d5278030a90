"""What MLflow tracking costs the train step, against a real tracking server.

Prepares the data once (digits by default; `--source mnist` reads ../shared/datasets/mnist), starts
an MLflow server (SQLite backend, proxied artifacts: tests/support/servers.py) and times whole
`train(params)` calls without and with the Tracker (`tracker=`), alternating the two so that
changes in machine load hit both alike. Each call trains from scratch (train.resume=never).

Wall-clock differences between two training runs on a shared machine are noisier than 2%, so the
cost is also measured where it is paid: the seconds the training thread spends in the tracker's
epoch callback (`in_loop_s`: queueing metrics) plus the CPU
seconds of the delivery thread (`delivery_cpu_s`: the log_batch calls), all counted as if they
delayed training. `overhead` = (in_loop_s + delivery_cpu_s) / untracked training seconds; the
target is <= 0.02. Tracker.start (params, tags, dataset input) and close (the final flush) run
before and after training: reported apart as `start_s` and `close_s`; the inputs' and
history.json's uploads (train's own TrackedInputs) are inside the tracked training's seconds.

    .venv/bin/python bench/bench_tracking.py [--source digits] [--epochs 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from components.augment import augment  # noqa: E402
from components.core.params import validate  # noqa: E402
from components.prepare import prepare  # noqa: E402
from components.tracking.run import Tracker  # noqa: E402
from components.train import train  # noqa: E402
from tests.support.servers import mlflow_server  # noqa: E402

MNIST = ROOT.parent / "shared/datasets/mnist"


class Meter:
    """Seconds spent in wrapped calls: wall in the caller's thread, or that thread's CPU."""

    def __init__(self, clock=time.perf_counter):
        self.clock, self.total, self.calls = clock, 0.0, 0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            start = self.clock()
            try:
                return fn(*args, **kwargs)
            finally:
                self.total += self.clock() - start
                self.calls += 1
        return timed


def settings(args, root: Path) -> dict:
    data = {"source": args.source}
    if args.source == "mnist":
        data |= {"root": str(MNIST), "download": False}
    return {
        "paths": {"prepared": str(root / "prepared"), "augment": str(root / "augment"),
                  "train": str(root / "train")},
        "data": data,
        "augment": {"preview_images": 2, "preview_views": 2},
        "model": {"name": args.model},
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "resume": "never"},
        "register": {"model_name": "bench-tracking"},
    }


def timed_train(params, tracker=None) -> float:
    """Wall seconds of a whole train() call: epochs, validation, checkpoints, tracking."""
    start = time.perf_counter()
    train(params, tracker=tracker)
    return time.perf_counter() - start


def tracked_run(params) -> dict:
    """One tracked training: its seconds, and the tracker's costs by where they are paid."""
    in_loop, delivery = Meter(), Meter(time.thread_time)
    start = time.perf_counter()
    tracker = Tracker.start(params)
    tracker.on_train_start(0)  # the run, as train opens it when it starts fresh
    tracker.on_train_start = lambda resumed_from: None
    start_s = time.perf_counter() - start
    tracker.outbox._send = delivery.wrap(tracker.outbox._send)  # runs in the delivery thread
    tracker.on_epoch_end = in_loop.wrap(tracker.on_epoch_end)
    train_s = timed_train(params, tracker)
    close = time.perf_counter()
    tracker.close()
    return {"train_s": train_s, "start_s": start_s, "in_loop_s": in_loop.total,
            "delivery_cpu_s": delivery.total, "batches": delivery.calls,
            "close_s": time.perf_counter() - close}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="digits", choices=["digits", "mnist"])
    parser.add_argument("--model", default="simple_cnn")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
        root = Path(tmp)
        params = validate(settings(args, root))
        prepare(params)
        augment(params)
        warm = params.model_dump(mode="json")
        train(validate({**warm, "train": {**warm["train"], "epochs": 1}}))  # imports, allocator
        untracked, tracked = [], []
        with mlflow_server(root / "mlflow") as uri:
            os.environ["MLFLOW_TRACKING_URI"] = uri
            for _ in range(args.repeats):
                untracked.append(timed_train(params))
                tracked.append(tracked_run(params))
    report(args, untracked, tracked)


def report(args, untracked: list[float], tracked: list[dict]) -> None:
    med = {k: statistics.median(r[k] for r in tracked) for k in tracked[0]}
    base = statistics.median(untracked)
    print(json.dumps({
        "bench": "tracking", "source": args.source, "model": args.model, "epochs": args.epochs,
        "untracked_train_s": [round(s, 3) for s in untracked],
        "tracked_train_s": [round(r["train_s"], 3) for r in tracked],
        "in_loop_s": round(med["in_loop_s"], 4), "delivery_cpu_s": round(med["delivery_cpu_s"], 4),
        "log_batch_calls": med["batches"],
        "overhead": round((med["in_loop_s"] + med["delivery_cpu_s"]) / base, 4),
        "overhead_wall": round(med["train_s"] / base - 1, 4),
        "start_s": round(med["start_s"], 3), "close_s": round(med["close_s"], 3),
        "target": "overhead <= 0.02",
    }))


if __name__ == "__main__":
    main()
