"""Every GPU path of the train step, once each, on real MNIST: does it run, how fast, how well.

CI has no GPU, so this is where the CUDA code is exercised: run it on a machine with one (the
figures go to bench/RESULTS.md). Each variant is `train(params)` for `--epochs` epochs from
configs/mnist_fast.yaml (simple_cnn, batch 128, AdamW) with the changes its name says:

- bf16 channels_last: the recipe as shipped; train+val resident on the GPU as uint8
- fp16: autocast to float16 with a gradient scaler (GPUs without bf16)
- fp32 contiguous: no autocast, NCHW
- streamed: train.device_data_mb=0, batches read from the memory map, copied from pinned memory
- ema + basic augment + mixup/cutmix: weight EMA and the batched augmentation on the GPU
- cudnn_benchmark: cuDNN's autotuning on (train.cudnn_benchmark, off by default)
- compile: torch.compile of the model (Triton kernels)
- nccl 1 rank: the DDP worker path under torchrun (`--nproc-per-node 1`): the NCCL process group is
  made and torn down on a real GPU. With one GPU there is no second rank to all-reduce with.

Prints one JSON line per variant (images/s of the last epoch, validation accuracy, device and
precision the run resolved) and exits non-zero if any variant failed.

    python bench/bench_cuda.py [--mnist ../shared/datasets/mnist] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: components/ is importable

from components.augment import augment  # noqa: E402
from components.core.params import validate  # noqa: E402
from components.prepare import prepare  # noqa: E402
from components.train import train  # noqa: E402

RECIPE = ROOT / "configs" / "mnist_fast.yaml"
VARIANTS = {
    "bf16 channels_last": {},
    "fp16": {"train": {"precision": "fp16"}},
    "fp32 contiguous": {"train": {"precision": "fp32", "channels_last": False}},
    "streamed": {"train": {"device_data_mb": 0}},
    "ema + basic augment + mixup/cutmix": {
        "train": {"ema": 0.999},
        "augment": {"preset": "basic", "mixup_alpha": 0.2, "cutmix_alpha": 1.0}},
    "cudnn_benchmark": {"train": {"cudnn_benchmark": True}},
    "compile": {"train": {"compile": True}},
}


def emit(row: dict) -> dict:
    print(json.dumps(row), flush=True)
    return row


def settings(folder: Path, mnist: Path, name: str, changes: dict, epochs: int) -> dict:
    raw = yaml.safe_load(RECIPE.read_text())
    for section, values in changes.items():
        raw.setdefault(section, {}).update(values)
    slug = "".join(c if c.isalnum() else "-" for c in name)
    raw["paths"] = {"prepared": str(folder / "prepared"), "augment": str(folder / f"aug-{slug}"),
                    "train": str(folder / f"train-{slug}")}
    raw["data"].update(root=str(mnist), download=False, val_fraction=0.1)
    raw["train"].update(epochs=epochs, device="cuda", resume="never")
    return raw


def in_process(params) -> dict:
    return vars(train(params))


def under_torchrun(params) -> dict:
    """The DDP worker path: torchrun with one rank; the result the worker printed."""
    path = Path(f"{params.paths.train}.yaml")
    path.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
         "-m", "cnn_pipeline", "train", "--params", str(path)],
        cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"torchrun exited with {proc.returncode}: {proc.stderr[-3000:]}")
    out = "\n" + proc.stdout  # the step prints its result last, as indented JSON
    return json.loads(out[out.rindex("\n{") + 1:])


def one(folder: Path, mnist: Path, name: str, changes: dict, epochs: int,
        run=in_process) -> bool:
    try:
        params = validate(settings(folder, mnist, name, changes, epochs))
        if not Path(params.paths.prepared).exists():
            prepare(params)
        augment(params)
        t0 = time.perf_counter()
        result = run(params)
        wall = time.perf_counter() - t0
        rows = json.loads(Path(result["history_path"]).read_text())
        emit({"variant": name, "ok": True, "images_per_s": [r["images_per_s"] for r in rows],
              "val_acc": rows[-1]["val_acc"], "device": result["device"],
              "precision": result["precision"], "wall_s": round(wall, 1)})
        return True
    except Exception as exc:  # a bench of many paths: report each failure and go on
        emit({"variant": name, "ok": False, "error": f"{type(exc).__name__}: {exc}",
              "traceback": traceback.format_exc()[-2000:]})
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnist", type=Path, default=ROOT.parent / "shared/datasets/mnist")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_cuda.py: torch sees no CUDA GPU here; nothing to check")
    emit({"torch": torch.__version__, "cuda": torch.version.cuda,
          "device": torch.cuda.get_device_name(), "bf16": torch.cuda.is_bf16_supported()})
    with tempfile.TemporaryDirectory(prefix="bench_cuda-") as tmp:
        folder = Path(tmp)
        mnist = args.mnist.resolve()
        ok = [one(folder, mnist, name, changes, args.epochs)
              for name, changes in VARIANTS.items()]
        ok.append(one(folder, mnist, "nccl 1 rank", {}, args.epochs, run=under_torchrun))
    sys.exit(0 if all(ok) else 1)


if __name__ == "__main__":
    main()
