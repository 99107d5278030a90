"""Where the data is: an image folder's root, and the prepared-data format, read and written in
one place. Light on purpose (numpy only where arrays are read): the command line checks both before
a step's heavy imports.

Under `paths.prepared`:
- `{split}_x.npy`: uint8, N×H×W×C, for split in train, val, test (memory-mappable; N may be 0);
- `{split}_y.npy`: int64 class indices, N;
- `manifest.json`: classes (with indices), image_size [H, W], channels, per-channel mean and std
  of train (0–1 scale), counts per class per split, a content hash per split (sha256 over its
  images' 64-bit fingerprints in order, its labels and its shape: it changes when any pixel,
  label or order changes, and costs no extra pass over the pixels), source, seed, the file
  accounting of an image folder, and the exact duplicates found across splits;
- `quarantine.json`: every rejected file with its reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from components.core import outputs
from components.core.params import UserError

if TYPE_CHECKING:
    import numpy as np  # imported where arrays are read: the command line reads only the manifest

SPLITS = ("train", "val", "test")


def image_folder(root: str | Path) -> Path:
    """The image folder at `data.root`, or a UserError saying it is not there."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(
            f"data.root = {str(root)!r}: folder not found; point data.root at a folder holding "
            "one folder per class (or train/ val/ test/ folders each holding class folders)")
    return root


def folder_to_score(root: str | Path) -> Path:
    """The folder of images predict scores, or a UserError saying it is not there."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{str(root)!r}: folder not found; give the folder of images to score")
    return root


def x_path(root: Path, split: str) -> Path:
    return Path(root) / outputs.x_file(split)


def y_path(root: Path, split: str) -> Path:
    return Path(root) / outputs.y_file(split)


def read_manifest(root: str | Path) -> dict[str, Any]:
    path = Path(root) / outputs.MANIFEST
    if not path.is_file():
        raise UserError(f"{path}: no prepared data here; run the prepare step first")
    return json.loads(path.read_text())


@dataclass(frozen=True)
class Split:
    x: np.ndarray  # uint8 N×H×W×C (a read-only memory map unless loaded)
    y: np.ndarray  # int64 N


def load_split(root: str | Path, split: str, mmap: bool = True) -> Split:
    """One split's images and labels; memory-mapped by default so nothing is read until used."""
    mode = "r" if mmap else None
    return Split(_load_array(x_path(root, split), mode), _load_array(y_path(root, split)))


def _load_array(path: Path, mode: str | None = None) -> np.ndarray:
    import numpy as np

    # allow_pickle stays False: an object array would unpickle (and run) whatever it holds.
    try:
        return np.load(path, mmap_mode=mode, allow_pickle=False)
    except ValueError as err:
        raise UserError(f"{path}: not loaded: not a plain numeric array ({err}); run the prepare "
                        "step again") from None


def require_two_classes(manifest: dict[str, Any], root: str | Path) -> None:
    """A UserError unless two classes or more have training images: a model of one class
    answers it for every image (accuracy 1.0 on its own test split), and could become a champion.
    prepare refuses such a folder; this refuses prepared data made otherwise."""
    present = [name for name, n in manifest["counts"]["train"].items() if n]
    if len(present) < 2:
        raise UserError(f"{Path(root) / outputs.MANIFEST}: the train split holds images of "
                        f"{len(present)} class(es) ({', '.join(present) or 'none'}); a classifier "
                        "needs at least two: prepare data with images of each class")


def class_names(manifest: dict[str, Any]) -> list[str]:
    return [c["name"] for c in sorted(manifest["classes"], key=lambda c: c["index"])]
