"""Writers of the real file formats the prepare step reads, so tests build their own data offline.

- `write_mnist` / `write_fashion_mnist`: IDX files in torchvision's raw layout
  (`<root>/MNIST/raw/train-images-idx3-ubyte`, ...), as a torchvision download leaves them.
- `write_cifar10` / `write_cifar100`: the python pickle batches of `cifar-10-batches-py` and
  `cifar-100-python`, pickled the way the originals were (by Python 2: keys and names are byte
  strings, so `encoding="latin1"` reads them as str and `encoding="bytes"` as b"data").
- `make_messy_folder`: an image folder with every case a user's folder has, and what the prepare
  step must make of each file.
- `write_image`, `noise`, `png_bilevel`, `png_blank`: single files.
- `special_file`: a FIFO or a device node where an image file would be; `raw_name` and
  `unescape_name`: file names that are not UTF-8, and the bytes an escaped name stands for.

Import from a test as `from tests.support.formats import ...`.
"""

from __future__ import annotations

import gzip
import os
import pickle
import re
import stat
import struct
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

# ---------------------------------------------------------------------------------------------
# MNIST IDX


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX: two zero bytes, type 0x08 (uint8), the number of dims, each dim big-endian uint32.

    So images (3 dims) start with the magic number 2051 and labels (1 dim) with 2049.
    """
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def patterned(n: int, size: int, channels: int, classes: int, seed: int) -> tuple:
    """n distinct uint8 images (N×size×size×channels) whose look depends on their label, and labels.

    Every class appears (labels cycle through them before shuffling), each image is unique.
    """
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % classes).astype(np.int64)
    x = rng.integers(0, 64, size=(n, size, size, channels), dtype=np.uint8)
    rows = (np.arange(size) * classes // size)[None, :, None, None]
    x = x + np.where(rows == y[:, None, None, None], 160, 0).astype(np.uint8)
    x[:, 0, 0, 0] = np.arange(n) % 256  # keeps images apart even if the noise repeated
    x[:, 0, 1, 0] = np.arange(n) // 256
    return x, y


def write_mnist(root: str | Path, train: tuple, test: tuple, folder: str = "MNIST",
                with_gz: bool = True) -> Path:
    """Write `train` and `test` (x N×28×28 or N×28×28×1 uint8, y) as IDX files in
    `<root>/<folder>/raw/`.

    torchvision reads the uncompressed files; a download also leaves the .gz archives beside them,
    which `with_gz` reproduces.
    """
    raw = Path(root) / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, (x, y) in (("train", train), ("t10k", test)):
        x = np.asarray(x, dtype=np.uint8)
        if x.ndim == 4:
            x = x[..., 0]
        for name, array in ((f"{prefix}-images-idx3-ubyte", x),
                            (f"{prefix}-labels-idx1-ubyte", np.asarray(y, dtype=np.uint8))):
            data = idx_bytes(array)
            (raw / name).write_bytes(data)
            if with_gz:
                (raw / f"{name}.gz").write_bytes(gzip.compress(data, mtime=0))
    return raw


def write_fashion_mnist(root: str | Path, train: tuple, test: tuple) -> Path:
    """FashionMNIST has MNIST's layout and file names, under `<root>/FashionMNIST/raw/`."""
    return write_mnist(root, train, test, folder="FashionMNIST")


# ---------------------------------------------------------------------------------------------
# CIFAR pickles

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer",
                 "dog", "frog", "horse", "ship", "truck"]


class _Py2Pickler(pickle._Pickler):
    """Pickles `bytes` with Python 2's str opcodes, as the CIFAR files (written by cPickle) have
    them: `pickle.load(f, encoding="latin1")` gives str keys (torchvision), `encoding="bytes"`
    gives b"data" (the CIFAR web page's recipe). numpy arrays load either way."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def _py2(value):
    """str -> bytes throughout, so the pickler writes Python 2 strings."""
    if isinstance(value, str):
        return value.encode("latin1")
    if isinstance(value, dict):
        return {_py2(k): _py2(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_py2(v) for v in value]
    return value


def _dump_py2(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(_py2(obj))


def cifar_rows(x: np.ndarray) -> np.ndarray:
    """N×32×32×3 -> N×3072, channel-major (1024 red, 1024 green, 1024 blue), as CIFAR stores it."""
    x = np.asarray(x, dtype=np.uint8)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2).reshape(len(x), 3 * 32 * 32))


def write_cifar10(root: str | Path, train: tuple, test: tuple,
                  names: list[str] = CIFAR10_NAMES) -> Path:
    """`<root>/cifar-10-batches-py/`: data_batch_1..5 (train in five), test_batch, batches.meta."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    x, y = train
    for i, rows in enumerate(np.array_split(np.arange(len(y)), 5), start=1):
        _dump_py2(folder / f"data_batch_{i}", {
            "batch_label": f"training batch {i} of 5",
            "labels": [int(v) for v in y[rows]],
            "data": cifar_rows(x[rows]),
            "filenames": [f"img_{i}_{j}.png" for j in rows],
        })
    _dump_py2(folder / "test_batch", {
        "batch_label": "testing batch 1 of 1",
        "labels": [int(v) for v in test[1]],
        "data": cifar_rows(test[0]),
        "filenames": [f"test_{j}.png" for j in range(len(test[1]))],
    })
    _dump_py2(folder / "batches.meta",
              {"num_cases_per_batch": 10000, "label_names": list(names), "num_vis": 3072})
    return folder


def write_cifar100(root: str | Path, train: tuple, test: tuple, fine_names: list[str]) -> Path:
    """`<root>/cifar-100-python/`: train, test (fine_labels and coarse_labels), meta."""
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name, (x, y) in (("train", train), ("test", test)):
        _dump_py2(folder / name, {
            "batch_label": f"{name}ing batch 1 of 1",
            "fine_labels": [int(v) for v in y],
            "coarse_labels": [int(v) // 5 for v in y],
            "data": cifar_rows(x),
            "filenames": [f"{name}_{j}.png" for j in range(len(y))],
        })
    _dump_py2(folder / "meta", {
        "fine_label_names": list(fine_names),
        "coarse_label_names": [f"superclass_{i}" for i in range(20)],
    })
    return folder


# ---------------------------------------------------------------------------------------------
# Single image files


def noise(w: int, h: int, seed: int, mode: str = "RGB") -> Image.Image:
    """A distinct image per seed: random blocks (so JPEG keeps them apart) of the given mode."""
    rng = np.random.default_rng(seed)
    base = "L" if mode == "1" else mode
    bands = len(Image.new(base, (1, 1)).getbands())
    blocks = rng.integers(0, 256, size=((h + 3) // 4, (w + 3) // 4, bands), dtype=np.uint8)
    a = np.repeat(np.repeat(blocks, 4, axis=0), 4, axis=1)[:h, :w]
    return Image.frombytes(base, (w, h), np.ascontiguousarray(a).tobytes()).convert(mode)


def write_image(path: str | Path, img: Image.Image, **save_args) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF"}.get(
        path.suffix.lower(), path.suffix.lstrip(".").upper())
    img.save(path, format=fmt, **save_args)
    return path


def png_bilevel(width: int, height: int) -> bytes:
    """A black 1-bit greyscale PNG of any size, built by hand: 9500×9500 is ~11 KB on disk but
    90 million pixels, above Pillow's decompression-bomb limit."""
    return png_blank(width, height, 1)


def png_blank(width: int, height: int, bits: int = 8, rows: int | None = None) -> bytes:
    """A black greyscale PNG of any size and bit depth (1, 8 or 16), compressed row by row so
    that no image is ever held: a 9400×9400 16-bit one is ~170 KB and 88 million pixels. With
    `rows`, only that many rows of pixel data follow the header, and the stream does not end (a
    truncated file: its size reads, it does not decode)."""
    row = b"\x00" * (1 + (width * bits + 7) // 8)  # filter byte 0, then the packed samples
    packer = zlib.compressobj(9)
    n = height if rows is None else rows
    idat = b"".join(packer.compress(row * min(256, n - y)) for y in range(0, n, 256))
    idat += packer.flush(zlib.Z_FINISH if rows is None else zlib.Z_SYNC_FLUSH)
    ihdr = struct.pack(">IIBBBBB", width, height, bits, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat)
            + _chunk(b"IEND", b""))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(
        ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_broken_stream(img: Image.Image) -> bytes:
    """A PNG whose chunks are intact but whose compressed pixel data is garbage."""
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    start = data.index(b"IDAT") + 4 + 2  # keep the zlib header, ruin the deflate blocks
    data[start:start + 40] = b"\xff" * 40
    return bytes(data)


def exif_rotated_jpeg(path: str | Path, img: Image.Image, orientation: int = 6) -> Path:
    """Save with an EXIF Orientation tag, as phone cameras do instead of rotating the pixels."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return write_image(path, img, exif=exif.tobytes(), quality=95)


# ---------------------------------------------------------------------------------------------
# The messy image folder

PREPARED, IGNORED = "prepared", "ignored"


@dataclass
class Expected:
    """What prepare must make of every file in a messy folder.

    `outcomes`: path relative to the root (POSIX) -> "prepared", "ignored" or a quarantine reason.
    `labels`: path -> class name, for prepared files.
    """

    root: Path
    outcomes: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.labels.values()))

    @property
    def quarantined(self) -> dict[str, str]:
        return {p: o for p, o in self.outcomes.items() if o not in (PREPARED, IGNORED)}

    @property
    def files(self) -> dict[str, int]:
        kinds = Counter(o if o in (PREPARED, IGNORED) else "quarantined"
                        for o in self.outcomes.values())
        return {"found": len(self.outcomes), "prepared": kinds[PREPARED],
                "quarantined": kinds["quarantined"], "ignored": kinds[IGNORED]}

    @property
    def per_class(self) -> dict[str, int]:
        return dict(Counter(self.labels.values()))


def make_messy_folder(root: str | Path, bomb: bool = True) -> Expected:
    """A flat image folder (one folder per class) with every case a user's folder has.

    Classes "bird" (every format and extension case, a nested folder), "cat" (every colour-mode
    case), "hot dog" (a space in the name; the broken files). A file outside the root
    (`<root>/../outside_root/real.png`) is the target of a link that must be refused.
    `bomb=False` leaves out the 9500×9500 decompression bomb (it is cheap, but not free).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    exp = Expected(root)
    seed = iter(range(1000, 10_000))

    def good(rel: str, img: Image.Image, **save_args) -> None:
        write_image(root / rel, img, **save_args)
        exp.outcomes[rel] = PREPARED
        exp.labels[rel] = rel.split("/")[0]

    def bad(rel: str, reason: str, data: bytes) -> None:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        exp.outcomes[rel] = reason

    def ignored(rel: str, data: bytes = b"x") -> None:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        exp.outcomes[rel] = IGNORED

    # Formats and extensions.
    good("bird/b01.png", noise(24, 20, next(seed)))
    good("bird/b02.JPG", noise(32, 24, next(seed)), quality=90)
    good("bird/b03.jpeg", noise(20, 28, next(seed)), quality=90)
    good("bird/b04.bmp", noise(16, 16, next(seed)))
    good("bird/b05.tif", noise(18, 18, next(seed)))
    good("bird/b06.TIFF", noise(18, 22, next(seed), "CMYK"))
    good("bird/b07.PNG", noise(40, 12, next(seed)))
    good("bird/nested/deeper/b08.png", noise(14, 30, next(seed)))
    if features.check("webp"):
        good("bird/b09.webp", noise(20, 20, next(seed)), lossless=True)
    # Colour modes.
    good("cat/rgba.png", noise(20, 20, next(seed), "RGBA"))
    good("cat/la.png", noise(20, 16, next(seed), "LA"))
    good("cat/grey.png", noise(16, 20, next(seed), "L"))
    good("cat/bilevel.png", noise(16, 16, next(seed), "1"))
    good("cat/palette.png", noise(20, 20, next(seed)).convert("P"))
    pal = noise(20, 20, next(seed)).convert("P")
    good("cat/palette_transparent.gif", pal, transparency=0)
    good("cat/cmyk.jpg", noise(24, 24, next(seed), "CMYK"), quality=90)
    grey16 = (np.asarray(noise(16, 16, next(seed), "L"), dtype=np.uint16) * 257)
    good("cat/grey16.png", Image.fromarray(grey16))
    exif_rotated_jpeg(root / "cat/exif.jpg", noise(24, 16, next(seed)))
    exp.outcomes["cat/exif.jpg"], exp.labels["cat/exif.jpg"] = PREPARED, "cat"
    # A link inside the root is fine (it may make a duplicate across splits: not asserted here).
    os.symlink("grey.png", root / "cat/alias.png")
    exp.outcomes["cat/alias.png"], exp.labels["cat/alias.png"] = PREPARED, "cat"
    # A space in a class name; the broken files live with good ones so the class survives.
    for i in range(4):
        good(f"hot dog/d{i}.png", noise(20, 20, next(seed)))
    bad("hot dog/empty.png", "empty", b"")
    bad("hot dog/text.jpg", "not_an_image", b"just some notes, not a JPEG\n" * 4)
    bad("hot dog/page.png", "not_an_image", b"<!doctype html><html><body>404</body></html>\n")
    whole_png = (root / "hot dog/d0.png").read_bytes()
    bad("hot dog/truncated.png", "corrupt", whole_png[: len(whole_png) // 2])
    write_image(root / "hot dog/full.jpg", noise(32, 32, next(seed)), quality=90)
    whole_jpg = (root / "hot dog/full.jpg").read_bytes()
    (root / "hot dog/full.jpg").unlink()
    bad("hot dog/truncated.jpg", "corrupt", whole_jpg[: len(whole_jpg) // 2])
    bad("hot dog/broken_stream.png", "corrupt", png_broken_stream(noise(20, 20, next(seed))))
    if bomb:
        bad("hot dog/bomb.png", "decompression_bomb", png_bilevel(9500, 9500))
    write_image(root / "hot dog/tiny.png", noise(5, 5, next(seed)))
    exp.outcomes["hot dog/tiny.png"] = "too_small"
    write_image(root / "hot dog/sliver.png", noise(40, 6, next(seed)))
    exp.outcomes["hot dog/sliver.png"] = "too_small"
    outside = write_image(root.parent / "outside_root" / "real.png", noise(20, 20, next(seed)))
    os.symlink(outside, root / "hot dog/outside.png")
    exp.outcomes["hot dog/outside.png"] = "link_outside_root"
    os.symlink(root / "hot dog/gone.png", root / "hot dog/broken.png")
    exp.outcomes["hot dog/broken.png"] = "broken_link"
    # Ignored: hidden files, a hidden folder (one file, so it counts 1 either way), other kinds.
    write_image(root / "hot dog/.hidden.png", noise(20, 20, next(seed)))
    exp.outcomes["hot dog/.hidden.png"] = IGNORED
    ignored("hot dog/notes.txt", b"labels checked by hand\n")
    ignored("bird/Thumbs.db")
    ignored(".DS_Store")
    ignored("README.md", b"# my birds, cats and hot dogs\n")
    write_image(root / ".cache/thumb.png", noise(20, 20, next(seed)))
    exp.outcomes[".cache/thumb.png"] = IGNORED
    # An image that belongs to no class.
    write_image(root / "stray.png", noise(20, 20, next(seed)))
    exp.outcomes["stray.png"] = "outside_class_folder"
    return exp


# ---------------------------------------------------------------------------------------------
# Hostile folder entries


def special_file(path: str | Path, kind: str) -> Path:
    """A FIFO (`fifo`) or a character device like /dev/null (`device`) at `path`; pytest.skip
    with the reason where this user may not make a device node (it takes root)."""
    if kind == "fifo":
        os.mkfifo(path)
    else:
        try:
            os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        except PermissionError:
            pytest.skip("making a device node needs root (CAP_MKNOD), which this user has not")
    return Path(path)


def raw_name(folder: str | Path, name: bytes) -> Path:
    """`folder`/`name` for a name of any bytes (os.fsdecode keeps those that are not UTF-8)."""
    return Path(folder) / os.fsdecode(name)


def unescape_name(text: str) -> bytes:
    """The bytes of the name that components.data.images.file_name wrote as `text` (its inverse)."""
    return re.sub(rb"\\(\\|x([0-9a-f]{2}))",
                  lambda m: bytes.fromhex(m.group(2).decode()) if m.group(2) else b"\\",
                  text.encode())
