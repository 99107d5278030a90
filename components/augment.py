"""augment: the augmentation settings resolved into the policy train applies, and a picture of it.

Reads the `augment` settings and, under `paths.prepared`, manifest.json (image size, channels,
classes) and the train split. Writes under `paths.augment`, into a temporary folder that replaces
the old one only when complete:
- `policy.json`: every operation with its numeric strength, flip, erasing, mixup/cutmix, image
  size, channels and number of classes: all train needs to rebuild the augmentation with
  `components.training.transforms.make_batch_augment(load_policy(path), num_classes)`;
- `preview.png`: training images (rows, one class after another), each beside augmented views
  made by that same runtime code, so a person sees what the model will see.

Nothing augmented is stored: train augments every batch on its own device.

    cnn-pipeline augment [--params params.yaml] [--set augment.preset=randaugment ...]

Presets: none; basic (pad by `crop_padding` of the side, at least 1 px, then crop back to size;
horizontal flip only with `flip: true`); standard (random resized crop keeping
`resized_crop_scale` of the area, flip if allowed, colour jitter); randaugment, trivialaugment
and autoaugment, each on top of basic. Random erasing and mixup/cutmix add to any preset.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from components.core import outputs
from components.core.atomic import atomic_dir, write_json
from components.core.params import Augment, Params, UserError
from components.data.dataset import class_names, load_split, read_manifest
from components.report import gallery
from components.training.transforms import (
    AUTOAUGMENT_TABLES,
    COLOUR_ONLY_OPS,
    OPS,
    POLICY_VERSION,
    RANDAUGMENT_OPS,
    UNITS,
    make_batch_augment,
    op_magnitude,
)

CELL_INCHES = 1.0  # one image of the preview grid
LINE_INCHES = 0.17  # one line of the policy summary above the grid
DPI = 100
PREVIEW_SEED = 0  # the preview is the same picture every run, so DVC sees no change


@dataclass(frozen=True)
class AugmentResult:
    policy: Path
    preview: Path
    preset: str
    summary: str
    soft_targets: bool


def augment(params: Params) -> AugmentResult:
    """Resolve `params.augment` into policy.json and draw preview.png in `params.paths.augment`."""
    manifest = read_manifest(params.paths.prepared)
    train = load_split(params.paths.prepared, "train")
    if len(train.y) == 0:
        raise UserError(f"{params.paths.prepared}: empty train split; check the data settings")
    policy = resolve_policy(params.augment, manifest)
    summary = describe(policy)
    cfg = params.augment
    with atomic_dir(params.paths.augment) as out:
        write_json(out / outputs.POLICY, policy)
        render_preview(
            out / outputs.PREVIEW, train.x, train.y, class_names(manifest), policy,
            cfg.preview_images, cfg.preview_views,
        )
    folder = Path(params.paths.augment)
    return AugmentResult(
        policy=folder / outputs.POLICY,
        preview=folder / outputs.PREVIEW,
        preset=cfg.preset,
        summary=summary,
        soft_targets=policy["mixup_alpha"] > 0 or policy["cutmix_alpha"] > 0,
    )


def resolve_policy(cfg: Augment, manifest: dict[str, Any]) -> dict[str, Any]:
    """The settings made concrete for this data: pixels, ops and their strengths."""
    height, width = manifest["image_size"]
    channels = manifest["channels"]
    policy: dict[str, Any] = {
        "version": POLICY_VERSION,
        "preset": cfg.preset,
        "image_size": [height, width],
        "channels": channels,
        "num_classes": len(manifest["classes"]),
        "crop": None,
        "flip": cfg.flip and cfg.preset != "none",
        "color_jitter": None,
        "ops": None,
        "erasing": None,
        "mixup_alpha": cfg.mixup_alpha,
        "cutmix_alpha": cfg.cutmix_alpha,
    }
    if cfg.preset == "standard":
        policy["crop"] = {
            "kind": "resized_crop", "scale": list(cfg.resized_crop_scale), "ratio": [3 / 4, 4 / 3],
        }
        if cfg.color_jitter > 0:
            s = cfg.color_jitter
            policy["color_jitter"] = {
                "brightness": s, "contrast": s, "saturation": s if channels == 3 else 0.0,
                "hue": 0.0,
            }
    elif cfg.preset != "none" and cfg.crop_padding > 0:
        # Half a pixel rounds up, and any padding is at least 1 px: 8 px digits still shift.
        pixels = max(1, math.floor(cfg.crop_padding * min(height, width) + 0.5))
        policy["crop"] = {"kind": "pad_crop", "padding_px": pixels, "fill": 0.0}
    if cfg.preset in ("randaugment", "trivialaugment", "autoaugment"):
        policy["ops"] = _resolve_ops(cfg, channels)
        used = {e["op"] for e in policy["ops"]["entries"]}
        policy["ops"]["units"] = {op: unit for op, unit in UNITS.items() if op in used}
    if cfg.erasing > 0:
        policy["erasing"] = {"p": cfg.erasing, "scale": [0.02, 0.33], "ratio": [0.3, 3.3],
                             "value": 0.0}
    return policy


def _resolve_ops(cfg: Augment, channels: int) -> dict[str, Any]:
    def usable(name: str) -> bool:
        return channels == 3 or name not in COLOUR_ONLY_OPS

    def entry(name: str, fraction: float, p: float = 1.0) -> dict[str, Any]:
        return {"op": name, "magnitude": op_magnitude(name, fraction), "signed": OPS[name][1],
                "p": p}

    names = [n for n in RANDAUGMENT_OPS if usable(n)]
    if cfg.preset == "randaugment":
        fraction = cfg.randaugment_magnitude / 30
        entries = [entry(n, fraction) for n in names]
        return {"kind": "randaugment", "num_ops": cfg.randaugment_ops, "entries": entries}
    if cfg.preset == "trivialaugment":
        # Magnitudes here are the upper end; each image draws its own below it.
        return {"kind": "trivialaugment", "entries": [entry(n, 1.0) for n in names]}
    # AutoAugment magnitudes are bins 0-9 of the same ranges, as in torchvision.
    entries: list[dict[str, Any]] = []
    index: dict[tuple, int] = {}
    subpolicies = []
    for subpolicy in AUTOAUGMENT_TABLES[cfg.autoaugment_policy]:
        indices = []
        for name, p, bin_ in subpolicy:
            if not usable(name):
                continue  # saturation of a grey image is the image itself
            item = entry(name, (bin_ or 0) / 9, p)
            key = tuple(item.values())
            if key not in index:
                index[key] = len(entries)
                entries.append(item)
            indices.append(index[key])
        subpolicies.append(indices)
    return {"kind": "autoaugment", "table": cfg.autoaugment_policy, "entries": entries,
            "subpolicies": subpolicies}


def describe(policy: dict[str, Any]) -> str:
    """One line a person can read: what the preview shows."""
    parts = [policy["preset"]]
    crop = policy["crop"]
    if crop and crop["kind"] == "pad_crop":
        parts.append(f"pad {crop['padding_px']} px + crop")
    elif crop:
        parts.append("resized crop {:g}-{:g} of area".format(*crop["scale"]))
    parts.append("flip" if policy["flip"] else "no flip")
    if policy["color_jitter"]:
        parts.append(f"colour jitter {policy['color_jitter']['brightness']:g}")
    ops = policy["ops"]
    if ops and ops["kind"] == "randaugment":
        parts.append(f"{ops['num_ops']} of {len(ops['entries'])} ops per image")
    elif ops and ops["kind"] == "trivialaugment":
        parts.append(f"1 of {len(ops['entries'])} ops per image, random strength")
    elif ops:
        parts.append(f"{ops['table']} table, 1 of {len(ops['subpolicies'])} sub-policies per image")
    if policy["erasing"]:
        parts.append(f"erasing p={policy['erasing']['p']:g}")
    for mix in ("mixup", "cutmix"):
        if policy[f"{mix}_alpha"] > 0:
            parts.append(f"{mix} alpha={policy[f'{mix}_alpha']:g}")
    height, width = policy["image_size"]
    return " | ".join(parts) + f" ({height}x{width}x{policy['channels']})"


def preview_size(images: int, views: int, header_lines: int) -> tuple[int, int]:
    """Width and height in pixels of preview.png."""
    width = CELL_INCHES * (1 + views)
    height = CELL_INCHES * images + LINE_INCHES * (header_lines + 1)
    return round(width * DPI), round(height * DPI)


def pick_examples(y: np.ndarray, count: int) -> np.ndarray:
    """Indices of `count` train images, one class after another, so every class shows up."""
    by_class = [np.flatnonzero(y == c) for c in np.unique(y)]
    picked: list[int] = []
    for rank in range(max(len(rows) for rows in by_class)):
        picked += [int(rows[rank]) for rows in by_class if rank < len(rows)]
        if len(picked) >= count:
            break
    return np.array(picked[:count])


def render_preview(
    path: Path, x: np.ndarray, y: np.ndarray, names: list[str], policy: dict[str, Any],
    images: int, views: int,
) -> None:
    """Rows of one training image and `views` augmented versions, made by the runtime code."""
    rows = pick_examples(y, images)
    originals = torch.from_numpy(np.ascontiguousarray(x[rows])).permute(0, 3, 1, 2).float() / 255
    labels = torch.from_numpy(np.asarray(y[rows], dtype=np.int64))
    n = len(rows)
    run = make_batch_augment(policy, len(names))
    # Each column is one batch of the shown images, as train would see a batch of them: mixup
    # partners are the other images and mixing weights change from column to column.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(PREVIEW_SEED)
        columns = [run(originals, labels) for _ in range(views)]

    header = f"{describe(policy)}. Left: a training image; right: what the model sees."
    header = textwrap.fill(header, 13 * CELL_INCHES * (1 + views))  # about 13 characters an inch
    lines = header.count("\n") + 1
    width, height = preview_size(images, views, lines)
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    fig.suptitle(header, fontsize=8, y=1 - 0.5 * LINE_INCHES * DPI / height, va="top")
    top = 1 - LINE_INCHES * (lines + 1) * DPI / height
    cells: list[np.ndarray | None] = []
    captions: list[tuple[str, dict]] = []
    for i in range(images):
        if i >= n:
            cells += [None] * (1 + views)
            captions += [("", {})] * (1 + views)
            continue
        cells.append(_pixels(originals[i]))
        captions.append((names[int(labels[i])], {"fontsize": 8, "fontweight": "bold"}))
        for seen, target in columns:
            cells.append(_pixels(seen[i]))
            captions.append((_mixed(target[i], names) if target.dim() == 2 else "",
                             {"fontsize": 6}))
    gallery.draw(fig.add_axes((0.01, 0.01, 0.98, top - 0.01)), cells, captions, 1 + views,
                 caption_inches=LINE_INCHES)
    fig.savefig(path, format="png")


def _pixels(image: torch.Tensor) -> np.ndarray:
    """A C×H×W image in [0, 1] as H×W×C uint8."""
    return image.clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def _mixed(target: torch.Tensor, names: list[str]) -> str:
    weights, classes = target.topk(2)
    pairs = zip(weights.tolist(), classes.tolist(), strict=True)
    return " + ".join(f"{names[c]} {w:.0%}" for w, c in pairs if w > 0.005)
