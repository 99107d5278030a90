"""Throughput of the runtime augmentation (components/training/transforms.py), per preset.

Resolves each preset exactly as the augment step does (default strengths) for 32×32×3 and
28×28×1 batches of 256 random float images, then times `make_batch_augment(...)(x, y)`:
images/s, median of several timed repeats after warm-up. CPU always; CUDA too when available.
On the CPU it also reports images per CPU-second of this process, which stays meaningful when
other work shares the machine (wall-clock numbers then drop with the share this process gets).
Two reference rows time kornia's own RandomCrop+RandomHorizontalFlip and RandAugment on the same
batches, for comparison with `basic` and `randaugment`.

    .venv/bin/python bench/bench_augment.py [--batch 256] [--repeats 20] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import kornia.augmentation as K
import torch
from kornia.augmentation.auto import RandAugment
from kornia.augmentation.auto.rand_augment import rand_augment

from components.augment import resolve_policy
from components.core.params import Augment
from components.training.transforms import make_batch_augment

PRESETS = ["none", "basic", "standard", "randaugment", "trivialaugment", "autoaugment"]
EXTRAS = {"basic + erasing 0.25": {"erasing": 0.25}, "basic + mixup/cutmix": {
    "mixup_alpha": 0.2, "cutmix_alpha": 1.0}}
SHAPES = [(3, 32), (1, 28)]
CLASSES = 10


def kornia_crop_flip(channels: int, side: int):
    """Reference: kornia's own crop + flip, with the padding `basic` resolves to."""
    crop = K.RandomCrop((side, side), padding=max(1, round(side / 8)))
    flip = K.RandomHorizontalFlip()
    return lambda x, y: (flip(crop(x)), y)


def kornia_randaugment(channels: int, side: int):
    """Reference: kornia's RandAugment(2, 9), which draws one operation sequence per batch.

    Its saturation op rejects grey images, so for one channel it is left out of the candidates.
    """
    grey_ok = [sub for sub in rand_augment.default_policy if sub[0][0] != "color"]
    ra = RandAugment(n=2, m=9, policy=None if channels == 3 else grey_ok)
    return lambda x, y: (ra(x), y)


REFERENCES = {"ref: kornia crop+flip": kornia_crop_flip,
              "ref: kornia RandAugment": kornia_randaugment}


def manifest(channels: int, side: int) -> dict:
    return {"image_size": [side, side], "channels": channels,
            "classes": [{"index": i, "name": str(i)} for i in range(CLASSES)]}


def images_per_second(fn, x: torch.Tensor, y: torch.Tensor, repeats: int) -> tuple[float, float]:
    """(wall-clock images/s, images per CPU-second of this process), medians over `repeats`."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    for _ in range(3):
        fn(x, y)
    wall, cpu = [], []
    for _ in range(repeats):
        sync()
        start, start_cpu = time.perf_counter(), time.process_time()
        fn(x, y)
        sync()
        wall.append(time.perf_counter() - start)
        cpu.append(max(time.process_time() - start_cpu, 1e-9))
    n = x.shape[0]
    return n / statistics.median(wall), n / statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    cases = [(p, Augment(preset=p)) for p in PRESETS]
    cases += [(name, Augment(preset="basic", **kw)) for name, kw in EXTRAS.items()]
    cases += [(name, None) for name in REFERENCES]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, batch {args.batch}")
    columns = [f"{d} {c}x{s}x{s}" + (" wall" if d == "cpu" else "")
               for d in devices for c, s in SHAPES]
    columns[len(SHAPES):len(SHAPES)] = [f"cpu {c}x{s}x{s} per cpu-s" for c, s in SHAPES]
    print(f"{'preset':<24}" + " | ".join(f"{c:>22}" for c in columns) + "   (images/s)")
    torch.manual_seed(0)
    for name, cfg in cases:
        wall, cpu = [], []
        for device in devices:
            for channels, side in SHAPES:
                if name in REFERENCES:
                    fn = REFERENCES[name](channels, side)
                else:
                    fn = make_batch_augment(resolve_policy(cfg, manifest(channels, side)), CLASSES)
                x = torch.rand(args.batch, channels, side, side, device=device)
                y = torch.randint(CLASSES, (args.batch,), device=device)
                rate, per_cpu = images_per_second(fn, x, y, args.repeats)
                wall.append(rate)
                if device == "cpu":
                    cpu.append(per_cpu)
        cells = wall[:len(SHAPES)] + cpu + wall[len(SHAPES):]
        print(f"{name:<24}" + " | ".join(f"{v:>22,.0f}" for v in cells), flush=True)


if __name__ == "__main__":
    main()
