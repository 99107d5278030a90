"""prepare: a data source in, fixed-size uint8 arrays per split and a manifest out.

Reads `data` settings: the source (digits, a torchvision dataset under data.root, or an image
folder at data.root), image size, channels and split ratios. Writes under `paths.prepared`
(format: components/data/dataset.py) the train/val/test arrays, manifest.json and quarantine.json,
into a temporary folder that replaces the old one only when complete. When the largest class of
train has more than IMBALANCE times the images of the smallest, it warns on stderr and says so
in manifest.json (`imbalance`), naming the settings that train for it.

    cnn-pipeline prepare [--params params.yaml] [--set data.source=mnist ...]
"""

from __future__ import annotations

import hashlib
import io
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from components.core import outputs
from components.core.atomic import atomic_dir, write_json
from components.core.params import Data, Params
from components.data.dataset import SPLITS, x_path, y_path
from components.data.sources import NO_SPLIT, SPLIT_IDS, Pool, load_source

TRAIN, VAL, TEST = (SPLIT_IDS[s] for s in SPLITS)
DROPPED = -2
# Bytes of pixels handled at a time (rounded to whole images): memory stays flat for a folder
# larger than RAM, and a chunk of small images still stays in cache while it is hashed.
CHUNK_BYTES = 8 << 20


@dataclass
class PrepareResult:
    path: str
    classes: list[str]
    counts: dict[str, int]
    files: dict[str, int]
    duplicates: int


def prepare(params: Params) -> PrepareResult:
    """Prepare `params.data` into `params.paths.prepared`."""
    cfg = params.data
    with atomic_dir(params.paths.prepared) as out, ThreadPoolExecutor(max_workers=1) as lane:
        pool = load_source(cfg, out)
        split = assign_splits(pool.y, pool.given, cfg)
        # The train statistics need only train's rows, which duplicates never change (they are
        # dropped from the later split): the other core computes them while this one goes on.
        stats = lane.submit(channel_stats, pool.x, pool.rows[split == TRAIN])
        fingerprints = _row_hashes(pool.x, pool.rows)
        duplicates = find_duplicates(pool, split, fingerprints, cfg.drop_duplicates)
        manifest = _manifest(cfg, pool, split, duplicates)
        manifest |= _write_splits(out, pool, split, fingerprints)
        manifest["imbalance"] = imbalance(manifest["counts"]["train"])
        manifest |= stats.result()
        (out / outputs.POOL).unlink(missing_ok=True)
        write_json(out / outputs.MANIFEST, manifest)
        write_json(out / outputs.QUARANTINE, pool.quarantine)
    if manifest["imbalance"]["warning"]:
        print(f"warning: {manifest['imbalance']['warning']}", file=sys.stderr)
    return PrepareResult(
        path=str(params.paths.prepared),
        classes=pool.classes,
        counts=manifest["num"],
        files=manifest["files"],
        duplicates=duplicates["count"],
    )


def assign_splits(y: np.ndarray, given: np.ndarray, cfg: Data) -> np.ndarray:
    """Split id per sample: the source's own splits kept (unless resplit), the rest carved out
    per class, so every split has each class in proportion. Depends on data.seed alone."""
    split = np.full_like(given, NO_SPLIT) if cfg.resplit else given.copy()
    rng = np.random.default_rng(cfg.seed)
    if not (split == TEST).any():
        _carve(split, y, split != VAL, TEST, cfg.test_fraction, rng)
    if not (split == VAL).any():
        _carve(split, y, (split == NO_SPLIT) | (split == TRAIN), VAL, cfg.val_fraction, rng)
    split[split == NO_SPLIT] = TRAIN
    return split


def _carve(split, y, eligible, target: int, fraction: float, rng) -> None:
    # Per class rather than sklearn's StratifiedShuffleSplit: that refuses classes with one
    # image, which real folders have.
    members = [np.flatnonzero(eligible & (y == label)) for label in np.unique(y)]
    quota = np.array([len(idx) * fraction for idx in members])
    take = np.floor(quota).astype(int)
    # The largest remainders get the rest, so the split holds its share even when every class
    # is small (rounding each class alone left val empty); a class always keeps one image.
    room = np.flatnonzero(take + 1 < np.array([len(idx) for idx in members]))
    short = max(int(round(quota.sum())) - int(take.sum()), 0)
    take[room[np.argsort(take[room] - quota[room], kind="stable")[:short]]] += 1
    for idx, k in zip(members, take, strict=True):
        split[rng.permutation(idx)[:k]] = target


def find_duplicates(pool: Pool, split: np.ndarray, digest: np.ndarray, drop: bool) -> dict:
    """Exact duplicate images across splits (`digest`: _row_hashes); with `drop`, removed from
    the later split."""
    order = np.lexsort((split, digest))  # by content, then earliest split first
    starts = np.flatnonzero(np.r_[True, digest[order][1:] != digest[order][:-1]])
    sizes = np.diff(np.r_[starts, len(order)])
    examples, count = [], 0
    for start, size in zip(starts[sizes > 1], sizes[sizes > 1], strict=True):
        first = order[start]
        for later in order[start + 1 : start + size]:
            if split[later] == split[first]:
                continue  # within one split: no leak between train and test
            if not np.array_equal(pool.x[pool.rows[first]], pool.x[pool.rows[later]]):
                continue  # a 64-bit hash collision, not a duplicate
            count += 1
            where = f"{pool.name(first)} in {SPLITS[split[first]]}"
            if len(examples) < 20:
                examples.append({"file": pool.name(later), "split": SPLITS[split[later]],
                                 "same_as": where})
            if drop:
                pool.quarantine.append({"path": pool.name(later), "reason": "duplicate",
                                        "detail": f"same pixels as {where}"})
                split[later] = DROPPED
    return {"count": count, "dropped": count if drop else 0, "examples": examples}


def _row_hashes(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """A 64-bit hash per image: its 64-bit words times fixed random odd multipliers, summed
    (one integer matrix product, ~20× faster than hashlib per row). An odd multiplier keeps two
    images that differ in any word from colliding except by chance; equal hashes are then
    compared byte for byte, so a collision costs a comparison, never a wrong answer."""
    width = int(np.prod(x.shape[1:]))
    pad = -width % 8
    multipliers = np.random.default_rng(0).integers(1, 2**63, (width + pad) // 8, np.uint64) | 1
    out = np.empty(len(rows), np.uint64)
    step = _chunk_rows(x)
    buffer = np.empty((min(step, len(rows)), *x.shape[1:]), x.dtype)
    for i in range(0, len(rows), step):
        chunk = _take(x, rows[i : i + step], buffer).reshape(-1, width)
        if pad:
            chunk = np.pad(chunk, ((0, 0), (0, pad)))
        out[i : i + step] = chunk.view(np.uint64) @ multipliers
    return out


def _chunk_rows(x: np.ndarray) -> int:
    return max(1, CHUNK_BYTES // max(1, int(np.prod(x.shape[1:])) * x.itemsize))


def _take(x: np.ndarray, rows: np.ndarray, buffer: np.ndarray | None = None) -> np.ndarray:
    """x[rows] for increasing `rows`: a view when they are consecutive (no copy at all), else
    copied into `buffer` (reused: a fresh array per small chunk faults in new pages each time,
    which cost as much as the copy itself) or, without one, a new array."""
    if len(rows) and rows[-1] - rows[0] + 1 == len(rows):
        return x[rows[0] : rows[-1] + 1]
    return np.take(x, rows, axis=0, out=None if buffer is None else buffer[: len(rows)])


def _write_splits(out: Path, pool: Pool, split: np.ndarray, fingerprints: np.ndarray) -> dict:
    """Each split's arrays, counts and content hash."""
    num, counts, hashes = {}, {}, {}
    for sid, name in enumerate(SPLITS):
        members = np.flatnonzero(split == sid)
        labels = pool.y[members]
        np.save(y_path(out, name), labels)
        _write_rows(pool.x, pool.rows[members], x_path(out, name))
        hashes[name] = _content_hash(fingerprints[members], labels, pool.x.shape[1:])
        num[name] = int(len(members))
        per_class = np.bincount(labels, minlength=len(pool.classes))
        counts[name] = {c: int(n) for c, n in zip(pool.classes, per_class, strict=True)}
    return {"num": num, "counts": counts, "hashes": hashes}


def _write_rows(images: np.ndarray, rows: np.ndarray, path: Path) -> None:
    """images[rows] saved at `path` as np.save would. A memory-mapped source (an image folder,
    possibly larger than RAM) goes in chunks so memory stays flat; an array already in memory
    goes in one piece, because one large write is much faster than several (the copy is no
    larger than the source itself)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {
        "descr": np.lib.format.dtype_to_descr(images.dtype), "fortran_order": False,
        "shape": (len(rows), *images.shape[1:])})
    chunked = isinstance(images, np.memmap)
    step = _chunk_rows(images) if chunked else max(1, len(rows))
    buffer = np.empty((min(step, len(rows)), *images.shape[1:]), images.dtype) if chunked else None
    with open(path, "wb") as f:
        f.write(header.getvalue())
        for i in range(0, len(rows), step):
            _take(images, rows[i : i + step], buffer).tofile(f)  # faster than f.write here


def _content_hash(fingerprints: np.ndarray, labels: np.ndarray, shape: tuple) -> str:
    digest = hashlib.sha256(repr((len(labels), *shape)).encode())
    digest.update(np.ascontiguousarray(fingerprints, "<u8").data)
    digest.update(np.ascontiguousarray(labels, "<i8").data)
    return digest.hexdigest()


# Images per block of the statistics: at most 256 (256 × 255 fits 16 bits, so a block's pixel
# sums add up in uint16), and few enough that the block stays in cache.
STATS_BLOCK_BYTES = 256 << 10


def channel_stats(x: np.ndarray, rows: np.ndarray) -> dict:
    """Per-channel mean and std of x[rows] on the 0-1 scale, exact: integer sums of pixels and
    their squares, per pixel position first (long contiguous adds), in cache-sized blocks."""
    channels, width = x.shape[-1], int(np.prod(x.shape[1:]))
    pixels = x.reshape(len(x), width)
    step = min(256, max(1, STATS_BLOCK_BYTES // width))
    sums = np.zeros((2, width), np.uint64)
    gathered = np.empty((step, width), np.uint8)
    block = np.empty((step, width), np.uint16)
    for i in range(0, len(rows), step):
        some = _take(pixels, rows[i : i + step], gathered)
        b = block[: len(some)]
        b[...] = some
        sums[0] += b.sum(0, dtype=np.uint16)
        b *= b  # 255² fits 16 bits
        sums[1] += b.sum(0, dtype=np.uint32)
    n = max(1, len(rows) * width // channels)
    total = sums.reshape(2, -1, channels).sum(1).astype(np.float64)
    mean = total[0] / n / 255
    std = np.sqrt(np.maximum(total[1] / n / 255**2 - mean**2, 0.0))
    return {"mean": [round(float(m), 6) for m in mean], "std": [round(float(v), 6) for v in std]}


IMBALANCE = 10.0  # largest / smallest train class above which prepare warns


def imbalance(counts: dict[str, int]) -> dict:
    """The train split's largest and smallest class, their ratio, and a warning above IMBALANCE
    (a class without any training image counts as infinitely rarer: ratio null)."""
    if not counts:
        return {"ratio": None, "limit": IMBALANCE, "warning": None}
    largest, smallest = max(counts, key=counts.get), min(counts, key=counts.get)
    big, small = counts[largest], counts[smallest]
    ratio = big / small if small else None
    warning = None
    if small == 0 or ratio > IMBALANCE:
        gap = (f"class {largest!r} has {big} training images, {ratio:.1f}x the {small} of class "
               f"{smallest!r}" if small else
               f"class {smallest!r} has no training image, class {largest!r} has {big}")
        warning = (
            f"imbalanced classes: {gap} (above {IMBALANCE:g}x, a model learns to ignore the rare "
            "classes). Train for it with train.class_weights: balanced or train.sampler: "
            "balanced, and gate on register.primary_metric: balanced_accuracy: with the default "
            "accuracy, a model trained for balance may never beat an unbalanced champion"
        )
    return {"ratio": None if ratio is None else round(ratio, 3), "limit": IMBALANCE,
            "largest": {"class": largest, "train": big},
            "smallest": {"class": smallest, "train": small}, "warning": warning}


def _manifest(cfg: Data, pool: Pool, split: np.ndarray, duplicates: dict) -> dict:
    h, w, c = pool.x.shape[1:]
    quarantined = len(pool.quarantine)
    return {
        "source": cfg.source,
        "root": str(cfg.root) if cfg.source != "digits" else None,
        "seed": cfg.seed,
        "image_size": [int(h), int(w)],
        "channels": int(c),
        "resize": cfg.resize,
        "min_side": cfg.min_side,
        "classes": [{"index": i, "name": name} for i, name in enumerate(pool.classes)],
        "files": {
            "found": pool.found,
            "prepared": int((split >= 0).sum()),
            "quarantined": quarantined,
            "ignored": pool.ignored,
        },
        "duplicates_across_splits": duplicates,
    }
