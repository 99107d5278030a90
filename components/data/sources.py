"""Where images come from: scikit-learn's digits, torchvision's datasets, or an image folder.

Each source gives a `Pool`: every usable image as one uint8 N×H×W×C array (a memory map for
folders, so a folder larger than RAM streams through), its labels, and the split the source
assigned it, if any. prepare decides the final splits and writes them.
"""

from __future__ import annotations

import errno
import os
import pickle
from dataclasses import dataclass, field
from functools import partial
from multiprocessing.pool import ThreadPool
from pathlib import Path

import numpy as np
from tqdm import tqdm

from components.core import outputs
from components.data.images import decode_file, scan_folder
from components.core.params import Data, UserError

SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
NO_SPLIT = -1
TORCHVISION = {
    "mnist": "MNIST",
    "fashion_mnist": "FashionMNIST",
    "cifar10": "CIFAR10",
    "cifar100": "CIFAR100",
}


@dataclass
class Pool:
    x: np.ndarray  # uint8 images, N×H×W×C; rows not listed in `rows` are unused
    rows: np.ndarray  # the rows of x that hold an image
    y: np.ndarray  # class index per row in `rows`
    given: np.ndarray  # split id the source gave per row in `rows`, or NO_SPLIT
    classes: list[str]
    names: list[str] | None = None  # file per row in `rows` (folders); arrays use split#index
    found: int = 0
    ignored: int = 0
    quarantine: list[dict] = field(default_factory=list)

    def name(self, i: int) -> str:
        if self.names is not None:
            return self.names[i]
        return f"{_SPLIT_NAMES.get(int(self.given[i]), 'all')}#{i}"


_SPLIT_NAMES = {v: k for k, v in SPLIT_IDS.items()}


def load_source(cfg: Data, workdir: Path) -> Pool:
    """The images of `cfg.source`; `workdir` holds the memory map of an image folder."""
    if cfg.source == "digits":
        pool = _digits()
    elif cfg.source == "imagefolder":
        return _folder(cfg, workdir)
    else:
        pool = _torchvision(cfg)
    pool.x = _conform(pool.x, cfg.image_size, cfg.channels)
    pool.found = len(pool.rows)
    return pool


def _digits() -> Pool:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # 8×8 values 0..16: scaled to the 0..255 of every other source.
    x = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    y = bunch.target.astype(np.int64)
    given = np.full(len(y), NO_SPLIT, np.int64)
    return Pool(x, np.arange(len(y)), y, given, [str(c) for c in bunch.target_names])


def _torchvision(cfg: Data) -> Pool:
    from torchvision import datasets

    cls = getattr(datasets, TORCHVISION[cfg.source])
    folder, expected = _expected_files(cls, cfg.root)
    missing = [f for f in expected if not (folder / f).is_file()]
    if missing and not cfg.download:
        raise UserError(_missing_message(cfg, folder, missing, "data.download is false"))
    try:
        parts = [_reader(cls)(str(cfg.root), train=t, download=bool(missing)) for t in (1, 0)]
    except Exception as err:  # torchvision raises RuntimeError, URLError, OSError, ...
        if not missing:  # the files are there but unreadable: naming no missing file misleads
            raise UserError(f"data.source = {cfg.source!r}: cannot read the files in {folder}: "
                            f"{type(err).__name__}: {err}") from None
        reason = f"download failed ({type(err).__name__}: {err})"
        raise UserError(_missing_message(cfg, folder, missing, reason)) from None
    xs = [np.asarray(p.data) for p in parts]
    x = np.concatenate([a[..., None] if a.ndim == 3 else a for a in xs])
    y = np.concatenate([np.asarray(p.targets, dtype=np.int64) for p in parts])
    given = np.repeat([SPLIT_IDS["train"], SPLIT_IDS["test"]], [len(a) for a in xs])
    return Pool(x, np.arange(len(y)), y, given.astype(np.int64), list(parts[0].classes))


def _expected_files(cls: type, root: Path) -> tuple[Path, list[str]]:
    """The files torchvision reads for `cls`, from its own class attributes."""
    if hasattr(cls, "resources"):  # MNIST family: raw IDX files, unpacked
        names = [os.path.splitext(os.path.basename(url))[0] for url, _ in cls.resources]
        return Path(root) / cls.__name__ / "raw", names
    names = [n for n, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    return Path(root) / cls.base_folder, names


def _reader(cls: type) -> type:
    """torchvision's dataset class, reading its files our way where that matters.

    CIFAR: checks that its files exist rather than their md5 sums. The sums pin one upstream
    copy; files a user exported or rebuilt are just as valid, and the manifest records the
    content hash of what was read. Downloads still check the archive.
    The MNIST family: reads its IDX files as memory maps. torchvision's reader copies every file
    twice (read(), then bytearray) before prepare copies it into the pool: 79 ms for MNIST here,
    against 10 ms mapped, the pixels copied once, straight into the pool.
    """
    if hasattr(cls, "resources"):

        class Mapped(cls):
            def _load_data(self) -> tuple[np.ndarray, np.ndarray]:
                prefix = Path(self.raw_folder) / ("train" if self.train else "t10k")
                return (_read_idx(f"{prefix}-images-idx3-ubyte", dims=3),
                        _read_idx(f"{prefix}-labels-idx1-ubyte", dims=1))

        Mapped.__name__ = cls.__name__  # torchvision finds the files under <root>/<class name>
        return Mapped
    folder_of = partial(_expected_files, cls)

    class Trusting(cls):
        def _check_integrity(self) -> bool:
            folder, names = folder_of(self.root)
            if not all((folder / n).is_file() for n in names):
                return False
            for name in names:  # CIFAR's files are pickles, read with pickle.load
                _check_plain_pickle(folder / name)
            return True

        def _load_meta(self) -> None:
            # CIFAR checks the meta file's md5 here, apart from _check_integrity; md5 None: exists.
            self.meta = {**self.meta, "md5": None}
            super()._load_meta()

    return Trusting


def _read_idx(path: str, dims: int) -> np.ndarray:
    """An IDX file of uint8 (MNIST's format: two zero bytes, type 0x08, the number of dims, each
    dim as a big-endian uint32, then the values) as a read-only memory map."""
    with open(path, "rb") as f:
        head = f.read(4 + 4 * dims)
    if len(head) < 4 + 4 * dims or head[:4] != bytes([0, 0, 0x08, dims]):
        raise ValueError(f"{path} is not an IDX file of uint8 values in {dims} dimension(s)")
    shape = tuple(int(d) for d in np.frombuffer(head, ">u4", offset=4))
    size = os.path.getsize(path) - len(head)
    if size != np.prod(shape):
        raise ValueError(f"{path} holds {size} bytes of values where its header says "
                         f"{' x '.join(map(str, shape))}: truncated or not an MNIST file")
    return np.memmap(path, np.uint8, mode="r", offset=len(head), shape=shape)


# What CIFAR's pickles may name: numpy arrays and their dtypes (old and new numpy module paths)
# and the codec Python 3 uses for Python 2 strings. Dicts, lists, strings and numbers need none.
PLAIN_PICKLE_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
})


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in PLAIN_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which data never needs")
        return super().find_class(module, name)


def _check_plain_pickle(path: Path) -> None:
    """Refuse a pickle that would run code when loaded: without the upstream md5 sums (see
    `_reader`) nothing else stops a crafted file, so each file is read once first by an
    unpickler that builds only numpy arrays and plain values, and never calls anything else."""
    try:
        with open(path, "rb") as f:
            _PlainUnpickler(f, encoding="latin1").load()
    except Exception as err:  # UnpicklingError, EOFError, ...: not a data file either way
        raise UserError(f"{path}: not loaded: not a plain data pickle ({err}). Replace it with "
                        "the dataset's own file") from None


def _missing_message(cfg: Data, folder: Path, missing: list[str], why: str) -> str:
    fetch = "run once where the network is reachable" if cfg.download else (
        "set data.download: true where the network is reachable")
    return (
        f"data.source = {cfg.source!r}: files missing in {folder} ({why}): {', '.join(missing)}. "
        f"Put the dataset's files there (data.root = {str(cfg.root)!r}), or {fetch}"
    )


def _conform(x: np.ndarray, size: int | None, channels: int | None) -> np.ndarray:
    """Resize and change channels of an array source, only when the settings ask for it."""
    n, h, w, c = x.shape
    if (size is None or size == h == w) and (channels is None or channels == c):
        return x
    import torch
    import torch.nn.functional as F

    out_c, out_s = channels or c, size or h
    out = np.empty((n, out_s, out_s, out_c), np.uint8)
    for i in range(0, n, 4096):  # chunks bound the float copies
        t = torch.from_numpy(x[i : i + 4096]).permute(0, 3, 1, 2).float()
        if out_c == 1 and c == 3:
            t = (t * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        elif out_c == 3 and c == 1:
            t = t.expand(-1, 3, -1, -1)
        if out_s != h or out_s != w:
            t = F.interpolate(t, size=(out_s, out_s), mode="bilinear", antialias=True)
        out[i : i + 4096] = t.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    return out


def _folder(cfg: Data, workdir: Path) -> Pool:
    scan = scan_folder(cfg.root)
    n, size, channels = len(scan.candidates), cfg.image_size, cfg.channels or 3
    shape = (max(n, 1), size, size, channels)
    x = np.lib.format.open_memmap(workdir / outputs.POOL, mode="w+", dtype=np.uint8, shape=shape)
    _reserve(workdir / outputs.POOL)
    ok = np.zeros(n, bool)
    quarantine = list(scan.rejected)
    job = partial(decode_file, size=size, channels=channels, resize=cfg.resize,
                  min_side=cfg.min_side)
    paths = [str(c.path) for c in scan.candidates]
    # Threads, not processes: Pillow decodes and resizes without holding the GIL, so two
    # threads keep two cores busy, and nothing is forked from a caller whose other threads may
    # hold locks (a decoder forked from a Prefect task once hung there, never exiting).
    with ThreadPool(os.cpu_count() or 1) as workers:
        results = workers.imap(job, paths, chunksize=16)
        for i, (image, bad) in enumerate(tqdm(results, total=n, desc="prepare", unit="img")):
            if bad is None:
                x[i], ok[i] = image[0], True
            else:
                quarantine.append({"path": scan.rel(scan.candidates[i].path), **bad})
    _check_every_class_has_images(scan, ok)
    classes = sorted({c.label for c in scan.candidates})
    index = {name: i for i, name in enumerate(classes)}
    rows = np.flatnonzero(ok)
    kept = [scan.candidates[i] for i in rows]
    return Pool(
        x=x,
        rows=rows,
        y=np.array([index[c.label] for c in kept], np.int64),
        given=np.array([SPLIT_IDS[c.split] if c.split else NO_SPLIT for c in kept], np.int64),
        classes=classes,
        names=[scan.rel(c.path) for c in kept],
        found=n + len(scan.rejected) + scan.ignored,
        ignored=scan.ignored,
        quarantine=quarantine,
    )


def _reserve(path: Path) -> None:
    """Allocate the memory-mapped pool's blocks now: on a disk that cannot hold it this is an
    OSError (ENOSPC) here, where a write into a mapped page the disk has no room for would kill
    the process with SIGBUS. Where the filesystem cannot say (EOPNOTSUPP), it is left sparse."""
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as err:
            if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise


def _check_every_class_has_images(scan, ok: np.ndarray) -> None:
    usable = {c.folder for c, good in zip(scan.candidates, ok, strict=True) if good}
    empty = [f for f in scan.class_folders if f not in usable]
    if empty:
        raise UserError(
            f"data.root = {str(scan.root)!r}: no usable image in class folder(s) "
            f"{', '.join(empty)}; add images (see quarantine reasons above) or remove the folder"
        )
