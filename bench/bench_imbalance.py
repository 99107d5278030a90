"""What train.class_weights and train.sampler do for imbalanced classes.

The data: scikit-learn's digits prepared by the real prepare step, then written out as an image
folder (train/ val/ test/) with three classes (tests/support/projects.py REDUCED: 3, 8, 9) reduced
to 5% of their train and val images (about 7 and 1 of ~130 and ~14), the test split untouched, and
prepared again from that folder (prepare warns about the imbalance). Per seed the reduction is drawn
again and training starts from that seed, with the same settings and epochs for:

    none        train.class_weights: none, train.sampler: none (the reference)
    weights     train.class_weights: balanced
    sampler     train.sampler: balanced

Each model.pt scores the test split (as predict and evaluate score it); printed per seed and as
the mean over the seeds: balanced accuracy, mean recall of the reduced classes, accuracy, and
each option's mean against none's as a difference and a ratio.

    .venv/bin/python bench/bench_imbalance.py [--seeds 3] [--epochs 15]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import balanced_accuracy_score, recall_score  # noqa: E402

from components.augment import augment  # noqa: E402
from components.core import outputs  # noqa: E402
from components.core.params import validate  # noqa: E402
from components.data.dataset import class_names, load_split, read_manifest  # noqa: E402
from components.predict import score  # noqa: E402
from components.prepare import prepare  # noqa: E402
from components.train import train  # noqa: E402
from components.training.checkpoint import load_model  # noqa: E402
from tests.support.projects import IMBALANCED_DATA, REDUCED, imbalanced_digits  # noqa: E402

MODES = {
    "none": {},
    "weights": {"class_weights": "balanced"},
    "sampler": {"sampler": "balanced"},
}


def settings(root: Path, train_cfg: dict, data: dict | None = None) -> dict:
    return {
        "paths": {"prepared": str(root / "prepared"), "augment": str(root / "augment"),
                  "train": str(root / "train")},
        "data": data or {},
        "augment": {"preview_images": 2, "preview_views": 2},
        "train": {"device": "cpu", "resume": "never", **train_cfg},
    }


def test_scores(params) -> dict[str, float]:
    """Balanced accuracy, mean recall of REDUCED and accuracy of model.pt on the test split."""
    model, meta = load_model(Path(params.paths.train) / outputs.MODEL)
    test = load_split(params.paths.prepared, "test")
    pred = score(model, meta, test.x, torch.device("cpu")).argmax(1)
    names = class_names(read_manifest(params.paths.prepared))
    recall = recall_score(test.y, pred, labels=range(len(names)), average=None, zero_division=0)
    reduced = [recall[names.index(c)] for c in REDUCED]
    return {"balanced_accuracy": balanced_accuracy_score(test.y, pred),
            "reduced_recall": float(np.mean(reduced)), "accuracy": float(np.mean(pred == test.y))}


def run_seed(root: Path, digits: Path, seed: int, epochs: int) -> dict[str, dict]:
    folder = imbalanced_digits(digits, root / f"folder{seed}", seed=seed)
    base = root / f"seed{seed}"
    data = IMBALANCED_DATA | {"root": str(folder)}
    params = validate(settings(base, {}, data))
    prepare(params)
    augment(params)
    counts = read_manifest(params.paths.prepared)["counts"]["train"]
    print(f"seed {seed}: train counts {counts}", flush=True)
    out = {}
    for mode, extra in MODES.items():
        params = validate(settings(base, {"epochs": epochs, "seed": seed, **extra}, data))
        start = time.perf_counter()
        train(params)
        out[mode] = test_scores(params)
        print(f"  {mode:8s} " + "  ".join(f"{k} {v:.4f}" for k, v in out[mode].items())
              + f"  ({time.perf_counter() - start:.0f} s)", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        full = validate(settings(root / "digits", {}))
        prepare(full)
        results = [run_seed(root, Path(full.paths.prepared), seed, args.epochs)
                   for seed in range(args.seeds)]
    print(f"\nmean over {args.seeds} seeds, {args.epochs} epochs, reduced classes "
          f"{', '.join(REDUCED)} at 5% of train and val:")
    ref = {k: statistics.mean(r["none"][k] for r in results) for k in results[0]["none"]}
    for mode in MODES:
        means = {k: statistics.mean(r[mode][k] for r in results) for k in ref}
        gains = {k: min(r[mode][k] - r["none"][k] for r in results) for k in ref}
        print(f"  {mode:8s} " + "  ".join(
            f"{k} {v:.4f} ({v - ref[k]:+.4f}, x{v / ref[k] if ref[k] else math.inf:.3f}; "
            f"worst seed {gains[k]:+.4f})"
            for k, v in means.items()))


if __name__ == "__main__":
    main()
