r"""Image folders as users really have them: find the images, decode each to a fixed-size array.

`scan_folder` walks a folder (one folder per class, or train/ val/ test/ each holding class
folders) and sorts every file into a candidate image, an ignored file, or a rejected one (a link
out of the folder, a FIFO, socket or device node named like an image: never opened, whose read
could block forever). `list_images` walks a folder of images to score by the same rules, and
`decode_file` decodes a candidate or says why it goes to quarantine: prepare and batch prediction
share both, so a folder that one reads the other reads alike. `decode` turns one file (or its
bytes) into an H×W×C uint8 array or raises `BadImage` with a reason code; the served model
(components/serving/pyfunc.py) uses it too, so images are preprocessed exactly as in training.

Names: a file or folder name is kept as text (`file_name`): as it is when it is UTF-8, otherwise
with each byte that is not as an escape `\xNN`, and a backslash written `\\` (so every name
maps to one text and back: `bad\xff.png` is the file whose name holds the byte 0xFF, and
`bad\\xff.png` the one whose name holds a backslash). predictions.csv, quarantine.json and the
manifest stay valid UTF-8, and a class folder's name is its class name the same way.

Resize policy (`data.resize`): `crop` scales the shorter side to the target and cuts the centre
(torchvision's classic eval transform: no distortion, loses the borders); `pad` fits the whole
image inside and pads with white; `stretch` ignores the aspect ratio.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from components.core.params import UserError
from components.data.dataset import folder_to_score, image_folder

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
SPLIT_FOLDERS = {
    "train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test",
}
WHITE = (255, 255, 255)
COLOUR_LOOK_PX = 64  # the colour check looks at a copy about this small
COLOUR_TOLERANCE = 12  # JPEG leaves grey pictures a few levels apart across bands, not more


class BadImage(Exception):
    """A file that cannot become a training image; `reason` is a stable code for quarantine.json."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Seen:
    """An image file as it was before decoding: its size and whether it shows colour."""

    width: int
    height: int
    colour: bool


@dataclass
class Candidate:
    path: Path  # where to read it
    label: str  # class folder name
    split: str | None  # train / val / test when the folder is split, else None
    folder: str  # the class folder it belongs to, relative to the root


@dataclass
class Scan:
    root: Path
    candidates: list[Candidate] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)  # quarantine entries found by walking
    ignored: int = 0  # hidden files and other extensions
    class_folders: list[str] = field(default_factory=list)

    def reject(self, path: Path, reason: str, detail: str) -> None:
        self.rejected.append({"path": self.rel(path), "reason": reason, "detail": detail})

    def rel(self, path: Path) -> str:
        return file_name(os.path.relpath(path, self.root))


SURROGATE = re.compile("[\udc80-\udcff]")  # os.fsdecode's stand-ins for bytes that are not UTF-8


def file_name(name: str | os.PathLike) -> str:
    r"""A name as the OS gives it (undecodable bytes as surrogates), as text that names it
    unambiguously: backslashes doubled, bytes that are not UTF-8 written `\xNN`."""
    text = os.fsdecode(name).replace("\\", "\\\\")
    return SURROGATE.sub(lambda m: f"\\x{ord(m.group()) - 0xDC00:02x}", text)


def scan_folder(root: str | Path) -> Scan:
    """Every file under `root`, sorted into candidates, rejects and ignored, in a stable order."""
    root = image_folder(root)  # the check the command line makes before prepare's imports
    scan = Scan(root)
    real_root = os.path.realpath(root)
    seen: set[str] = {real_root}
    top = _entries(root, scan)
    folders = [e for e in top if _is_dir(e)]
    splits = {e.name.lower(): e for e in folders if e.name.lower() in SPLIT_FOLDERS}
    if splits:
        others = sorted(e.name for e in folders if e.name.lower() not in SPLIT_FOLDERS)
        if others:
            raise UserError(
                f"data.root = {str(root)!r} mixes split folders ({', '.join(sorted(splits))}) "
                f"with other folders ({', '.join(others)}); use either one folder per class, or "
                "train/ val/ test/ folders each holding class folders"
            )
        named = [SPLIT_FOLDERS[n] for n in splits]
        if len(set(named)) != len(named):
            raise UserError(f"data.root = {str(root)!r}: two folders name the same split: {named}")
        for name, entry in sorted(splits.items()):
            for cls in _entries(Path(entry.path), scan):
                if _is_dir(cls):
                    _scan_class(Path(cls.path), SPLIT_FOLDERS[name], scan, real_root, seen)
                else:
                    _loose_file(cls, scan, real_root)
    else:
        for cls in folders:
            _scan_class(Path(cls.path), None, scan, real_root, seen)
    for entry in top:
        if not _is_dir(entry):
            _loose_file(entry, scan, real_root)
    if not scan.class_folders:
        raise UserError(
            f"data.root = {str(root)!r} holds no class folders; put each class's images in a "
            "folder named after the class"
        )
    classes = sorted({Path(f).name for f in scan.class_folders})
    if len(classes) < 2:
        # A model of one class answers it for every image: "accuracy 1.0", and a champion.
        raise UserError(
            f"data.root = {str(root)!r} holds one class ({classes[0]}): a classifier needs at "
            "least two classes with images; add a folder of images for each other class"
        )
    return scan


def list_images(root: str | Path) -> Scan:
    """Every image file under `root` at any depth, no class folders needed (batch prediction),
    with scan_folder's rules: hidden files ignored, links leaving the root rejected."""
    root = folder_to_score(root)
    scan = Scan(root)
    real_root = os.path.realpath(root)
    _scan_class(root, None, scan, real_root, {real_root})
    return scan


def _entries(folder: Path, scan: Scan) -> list[os.DirEntry]:
    """Visible entries in name order; hidden ones are counted as ignored (with what they hold)."""
    visible = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.startswith("."):
            scan.ignored += _count_files(Path(entry.path))
        else:
            visible.append(entry)
    return visible


def _count_files(path: Path) -> int:
    if path.is_symlink() or not path.is_dir():
        return 1
    return sum(len(files) for _, _, files in os.walk(path))


def _is_dir(entry: os.DirEntry) -> bool:
    return entry.is_dir(follow_symlinks=True)


def _link_ok(path: Path, scan: Scan, real_root: str) -> bool:
    """Links may point anywhere inside the root; outside it they are not the user's data."""
    if not path.is_symlink():
        return True
    target = os.path.realpath(path)
    if not os.path.exists(target):
        scan.reject(path, "broken_link", f"points to {os.readlink(path)}, which does not exist")
        return False
    if os.path.commonpath([target, real_root]) != real_root:
        scan.reject(path, "link_outside_root", f"points to {target}, outside data.root")
        return False
    return True


def _regular(entry: os.DirEntry, scan: Scan) -> bool:
    """Whether an image's entry is a plain file (through a link); a FIFO, socket or device node
    is rejected unopened: reading one can block forever or never end."""
    mode = entry.stat(follow_symlinks=True).st_mode
    if stat.S_ISREG(mode):
        return True
    kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else
            "a character device" if stat.S_ISCHR(mode) else
            "a block device" if stat.S_ISBLK(mode) else "not a file")
    scan.reject(Path(entry.path), "not_a_file", f"{kind}, not a file of image data")
    return False


def _loose_file(entry: os.DirEntry, scan: Scan, real_root: str) -> None:
    path = Path(entry.path)
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        scan.ignored += 1
    elif _link_ok(path, scan, real_root) and _regular(entry, scan):
        scan.reject(path, "outside_class_folder", "an image must sit inside its class's folder")


def _scan_class(folder: Path, split: str | None, scan: Scan, real_root: str, seen: set) -> None:
    if not _link_ok(folder, scan, real_root):
        return
    rel_folder = scan.rel(folder)
    scan.class_folders.append(rel_folder)
    label = file_name(folder.name)
    stack = [folder]
    while stack:  # nested folders inside a class belong to the class
        current = stack.pop()
        for entry in _entries(current, scan):
            path = Path(entry.path)
            if not _link_ok(path, scan, real_root):
                continue
            if _is_dir(entry):
                real = os.path.realpath(path)
                if real not in seen:  # a link loop or a second link to one folder
                    seen.add(real)
                    stack.append(path)
            elif path.suffix.lower() in IMAGE_EXTENSIONS:
                if _regular(entry, scan):
                    scan.candidates.append(Candidate(path, label, split, rel_folder))
            else:
                scan.ignored += 1


def decode_file(path: str | Path, look: bool = False, **settings) -> tuple[tuple | None,
                                                                           dict | None]:
    """A scanned candidate decoded (`decode_seen`'s pair), or None and its quarantine entry's
    reason and detail: a BadImage, or a file gone or unreadable since the scan."""
    try:
        return decode_seen(path, look=look, **settings), None
    except BadImage as bad:
        return None, {"reason": bad.reason, "detail": bad.detail}
    except OSError as err:  # the detail without the path: quarantine.json names the file
        return None, {"reason": "unreadable", "detail": f"{type(err).__name__}: {err.strerror}"}


def decode(source: str | Path | bytes, size: int, channels: int, resize: str, min_side: int,
           formats: tuple[str, ...] | None = None) -> np.ndarray:
    """One file (a path, or its bytes as a request carries them) as a size×size×channels uint8
    array, or BadImage saying why not. `formats` (Pillow's names, e.g. "PNG") limits what is
    opened; None: any format Pillow reads."""
    return decode_seen(source, size, channels, resize, min_side, formats, look=False)[0]


def decode_seen(source: str | Path | bytes, size: int, channels: int, resize: str,
                min_side: int, formats: tuple[str, ...] | None = None,
                look: bool = True) -> tuple[np.ndarray, Seen | None]:
    """`decode`, and what the file was before it (batch prediction's drift check needs both);
    without `look`, None: prepare does not pay for the colour check."""
    opened = _opened(source)
    try:
        with Image.open(opened, formats=formats) as img:
            w, h = img.size
            # Pillow only warns between 1x and 2x its pixel limit; a bomb is a bomb. (Checked
            # here rather than by turning the warning into an error: decoding runs in threads,
            # and the warning filters are global.)
            if Image.MAX_IMAGE_PIXELS and w * h > Image.MAX_IMAGE_PIXELS:
                raise BadImage("decompression_bomb", f"{w}x{h} = {w * h} pixels is over "
                               f"Pillow's limit of {Image.MAX_IMAGE_PIXELS}")
            if min(w, h) < min_side:
                raise BadImage("too_small", f"{w}x{h} is below data.min_side = {min_side}")
            mode = img.mode
            if resize != "stretch":
                img.draft("RGB" if channels == 3 else "L", (size, size))  # JPEG: decode smaller
            ImageOps.exif_transpose(img, in_place=True)  # loads; without in_place it copies
            img.load()
            # A colour JPEG drafted straight to grey no longer shows its colours: look again.
            seen = None if not look else Seen(
                w, h, _is_colour(img) if img.mode == mode else _file_is_colour(source))
            img = _to_mode(img, channels)
    except BadImage:
        raise
    except Image.DecompressionBombError as err:
        raise BadImage("decompression_bomb", str(err)) from None
    except UnidentifiedImageError:
        what = f"a {', '.join(formats)} image" if formats else "an image Pillow can read"
        raise BadImage("not_an_image", f"not {what}") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as err:
        raise BadImage("corrupt", f"{type(err).__name__}: {err}") from None
    img = _resize(img, size, resize)
    return np.asarray(img, dtype=np.uint8).reshape(size, size, channels), seen


def _is_colour(img: Image.Image) -> bool:
    """Whether the picture shows colour: its bands differ somewhere (a grey picture saved as RGB
    is grey). Looked at on a copy reduced to ~64 px a side, so a large photo costs little."""
    if img.mode not in ("P", "PA") and Image.getmodebase(img.mode) == "L":
        return False
    small = img
    if min(img.size) > 2 * COLOUR_LOOK_PX and img.mode not in ("P", "PA"):
        with contextlib.suppress(ValueError):  # a mode reduce() does not take: look at it whole
            small = img.reduce(min(img.size) // COLOUR_LOOK_PX)
    rgb = np.asarray(small.convert("RGB"), dtype=np.int16)
    return int((rgb.max(2) - rgb.min(2)).max(initial=0)) > COLOUR_TOLERANCE


def _opened(source: str | Path | bytes) -> Path | io.BytesIO:
    """What Image.open reads `source` from, after refusing an empty one."""
    if isinstance(source, bytes | bytearray | memoryview):
        if not len(source):
            raise BadImage("empty", "zero bytes")
        return io.BytesIO(source)
    path = Path(source)
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):  # put there since the scan: never opened (module doc)
        raise BadImage("not_a_file", "not a file of image data")
    if info.st_size == 0:
        raise BadImage("empty", "zero-byte file")
    return path


def _file_is_colour(source: str | Path | bytes) -> bool:
    with Image.open(_opened(source)) as img:
        img.draft("RGB", (COLOUR_LOOK_PX, COLOUR_LOOK_PX))  # JPEG: decoded at 1/8 scale at most
        img.load()
        return _is_colour(img)


def _to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Convert to L or RGB the way a person would see the image, not the way bytes truncate."""
    if img.mode.startswith("I") or img.mode == "F":
        img = _scale_to_8bit(img)
    if "A" in img.getbands() or "a" in img.getbands() or "transparency" in img.info:
        # palette and grey transparency too; an RGBA image as it is (convert would copy it)
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE + (255,)), rgba)
    return img.convert("L" if channels == 1 else "RGB")  # CMYK, YCbCr, P, 1: Pillow's conversions


def _scale_to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and float images scaled into 0..255; converting them directly would clip."""
    if img.mode.startswith("I;16"):  # the float path's rint(v * 255 / 65535), in integers (it
        # has no ties to round), at 7 bytes a pixel rather than 26: a served request's bound
        a = np.asarray(img).astype(np.uint32)
        a *= 255
        a += 32767
        a //= 65535
        return Image.fromarray(a.astype(np.uint8), "L")
    a = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        top = 1.0 if a.max(initial=0) <= 1.0 else 255.0
    else:  # I;16* and I (which 16-bit PNGs open as)
        top = 65535.0 if a.max(initial=0) <= 65535 else float(a.max())
    return Image.fromarray(np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8), "L")


def _resize(img: Image.Image, size: int, policy: str) -> Image.Image:
    box, method = (size, size), Image.Resampling.BICUBIC
    if img.size == box:
        return img
    if policy == "crop":
        return ImageOps.fit(img, box, method)
    if policy == "pad":
        fill = WHITE if img.mode == "RGB" else 255
        return ImageOps.pad(img, box, method, color=fill)
    return img.resize(box, method)
