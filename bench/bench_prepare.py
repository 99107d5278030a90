"""Benchmark of the prepare step; prints one JSON line per measurement.

(a) Real MNIST: prepare (data.source=mnist, download false) against the plainest reference, reading
    it with torchvision.datasets.MNIST and saving the train/test arrays and labels with np.save.
    Both run in this process, alternating, after one untimed run of each (imports, page cache).
    Target: median prepare / median reference <= 1.5.
(b) An image folder of 10,000 small PNG files (10 classes of 32×32 RGB noise with a shape per
    class), generated once, prepared at image_size 32. Target: >= 1,000 images/s.

    .venv/bin/python bench/bench_prepare.py [MNIST_ROOT] [--repeats 5] [--images 10000]
        [--folder DIR] [--profile]

MNIST_ROOT defaults to ../shared/datasets/mnist relative to the repository. --folder keeps the
generated image folder there for the next run; --profile prints where one run of each spends its
time (cProfile of the main process; decoding workers show up as waiting on their results).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from components.core.params import validate  # noqa: E402
from components.prepare import prepare  # noqa: E402


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def reference(root: Path, out: Path) -> None:
    """What a tutorial does: torchvision reads MNIST, numpy saves the arrays."""
    from torchvision import datasets

    for name, train in (("train", True), ("test", False)):
        ds = datasets.MNIST(str(root), train=train, download=False)
        np.save(out / f"{name}_x.npy", ds.data.numpy()[..., None])
        np.save(out / f"{name}_y.npy", ds.targets.numpy())


def run_prepare(out: Path, **data) -> dict:
    result = prepare(validate({"paths": {"prepared": str(out)}, "data": data}))
    return result.counts


def timed(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def profile(fn, *args, **kwargs) -> str:
    prof = cProfile.Profile()
    prof.runcall(fn, *args, **kwargs)
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(25)
    return text.getvalue()


def bench_mnist(root: Path, repeats: int, show_profile: bool) -> None:
    data = {"source": "mnist", "root": str(root), "download": False}
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        tmp = Path(tmp)
        (tmp / "ref").mkdir()
        reference(root, tmp / "ref")  # untimed: imports and page cache for both
        run_prepare(tmp / "prepared", **data)
        ref, prep, ref_cpu, prep_cpu = [], [], [], []
        for _ in range(repeats):
            cpu = time.process_time()
            ref.append(timed(reference, root, tmp / "ref"))
            ref_cpu.append(time.process_time() - cpu)
            cpu = time.process_time()
            prep.append(timed(run_prepare, tmp / "prepared", **data))
            prep_cpu.append(time.process_time() - cpu)
        # Wall-clock medians are the figure; the fastest runs (which other processes can only
        # slow down) and CPU seconds (all threads) say how much of a ratio is the machine's load.
        emit(bench="prepare_mnist", load1=round(os.getloadavg()[0], 2),
             reference_s=[round(t, 3) for t in ref], prepare_s=[round(t, 3) for t in prep],
             reference_median_s=round(statistics.median(ref), 3),
             prepare_median_s=round(statistics.median(prep), 3),
             ratio=round(statistics.median(prep) / statistics.median(ref), 3),
             best_ratio=round(min(prep) / min(ref), 3),
             cpu_ratio=round(statistics.median(prep_cpu) / statistics.median(ref_cpu), 3),
             target="<= 1.5")
        if show_profile:
            print(profile(run_prepare, tmp / "prepared", **data), file=sys.stderr)


SHAPES = ("ellipse", "rectangle", "triangle", "cross", "hline", "vline", "diagonal", "ring",
          "dots", "chevron")


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, rng: np.random.Generator) -> None:
    x0, y0 = rng.integers(2, 12, size=2)
    x1, y1 = x0 + rng.integers(12, 18), y0 + rng.integers(12, 18)
    colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
    if kind == "ellipse":
        draw.ellipse((x0, y0, x1, y1), fill=colour)
    elif kind == "rectangle":
        draw.rectangle((x0, y0, x1, y1), fill=colour)
    elif kind == "triangle":
        draw.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=colour)
    elif kind == "cross":
        draw.line((x0, y0, x1, y1), fill=colour, width=3)
        draw.line((x0, y1, x1, y0), fill=colour, width=3)
    elif kind == "hline":
        draw.line((x0, (y0 + y1) // 2, x1, (y0 + y1) // 2), fill=colour, width=4)
    elif kind == "vline":
        draw.line(((x0 + x1) // 2, y0, (x0 + x1) // 2, y1), fill=colour, width=4)
    elif kind == "diagonal":
        draw.line((x0, y0, x1, y1), fill=colour, width=4)
    elif kind == "ring":
        draw.ellipse((x0, y0, x1, y1), outline=colour, width=3)
    elif kind == "dots":
        for dx in (0, 6, 12):
            draw.ellipse((x0 + dx, y0 + dx, x0 + dx + 4, y0 + dx + 4), fill=colour)
    else:
        draw.line([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=colour, width=3)


def make_folder(root: Path, n: int) -> Path:
    """n 32×32 RGB PNG files in 10 class folders: noise with the class's shape drawn on it."""
    marker = root / f".complete-{n}"
    if marker.exists():
        return root
    rng = np.random.default_rng(0)
    for i in range(n):
        kind = SHAPES[i % len(SHAPES)]
        img = Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8))
        draw_shape(ImageDraw.Draw(img), kind, rng)
        (root / kind).mkdir(parents=True, exist_ok=True)
        img.save(root / kind / f"{i:05d}.png")
    marker.touch()  # hidden: prepare ignores it
    return root


def bench_folder(folder: Path | None, n: int, repeats: int, show_profile: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        tmp = Path(tmp)
        root = folder or tmp / "images"
        start = time.perf_counter()
        make_folder(root, n)
        generated = time.perf_counter() - start
        data = {"source": "imagefolder", "root": str(root), "image_size": 32}
        run_prepare(tmp / "prepared", **data)  # untimed: page cache, as a second run would find it
        times = [timed(run_prepare, tmp / "prepared", **data) for _ in range(repeats)]
        median = statistics.median(times)
        emit(bench="prepare_imagefolder", images=n, image_size=32, generate_s=round(generated, 2),
             prepare_s=[round(t, 3) for t in times], prepare_median_s=round(median, 3),
             images_per_s=round(n / median), target=">= 1000")
        if show_profile:
            print(profile(run_prepare, tmp / "prepared", **data), file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mnist_root", nargs="?", default=str(REPO / ".." / "shared/datasets/mnist"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--folder", type=Path, default=None, help="keep the image folder here")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--only", choices=["mnist", "imagefolder"], default=None)
    args = parser.parse_args()
    emit(bench="environment", cpus=os.cpu_count(), python=sys.version.split()[0],
         numpy=np.__version__, pillow=Image.__version__)
    if args.only in (None, "mnist"):
        bench_mnist(Path(args.mnist_root).resolve(), args.repeats, args.profile)
    if args.only in (None, "imagefolder"):
        bench_folder(args.folder, args.images, args.repeats, args.profile)


if __name__ == "__main__":
    main()
