"""Batched, per-sample image augmentation on the training device, rebuilt from `policy.json`.

The augment step resolves params into `policy.json` (components/augment.py); train calls

    augment = make_batch_augment(load_policy(paths.augment / "policy.json"), num_classes)
    x, target = augment(x, y)   # x float N×C×H×W in [0, 1] on any device, y int64 N

every step. `target` is `y` itself, or soft targets N×num_classes when mixup or cutmix is on.
With nothing to do (preset none, no erasing, no mixing) the function is `identity`, which
returns its arguments untouched: no copy, no cost. A batch in channels_last comes back so.

Every image of a batch draws its own parameters: its own crop, flip and, for the policy presets,
its own operations. kornia's augmentations draw per sample; its RandAugment, TrivialAugment and
AutoAugment draw ONE operation sequence per batch, so the policy presets are run here instead:
each image picks its operation, the geometric ones (rotate, shear, translate) go through one
batched affine warp and every other operation runs once on the rows that picked it (kornia and
torchvision functionals with per-row magnitudes). Magnitudes follow torchvision's RandAugment.
Mixup and cutmix (torchvision's) draw one mixing weight per batch and pair each image with its
neighbour in the (shuffled) batch, as the papers do.

Randomness comes from torch's global CPU generator (kornia samples there too, and the
per-sample choices here are drawn there and moved to the device), so `torch.manual_seed` makes
a run repeatable, and CPU and CUDA runs draw the same parameters.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kornia.augmentation as K
import kornia.enhance as KE
import torch
from kornia.augmentation.auto.autoaugment import autoaugment as kornia_autoaugment
from kornia.geometry.transform import get_affine_matrix2d, warp_affine

from components.core import outputs
from components.core.params import UserError

POLICY_VERSION = 1

BatchAugment = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

# name: (magnitude at full strength, signed). Units: rotate degrees; shear the shear factor;
# translate a fraction of the side (torchvision's 150 px of 331); brightness, color, contrast and
# sharpness an offset of the enhancement factor (1 ± m); posterize the bits removed of 8;
# solarize 1 - threshold. A signed operation gets a random sign per image.
OPS: dict[str, tuple[float, bool]] = {
    "identity": (0.0, False),
    "shear_x": (0.3, True),
    "shear_y": (0.3, True),
    "translate_x": (150 / 331, True),
    "translate_y": (150 / 331, True),
    "rotate": (30.0, True),
    "brightness": (0.9, True),
    "color": (0.9, True),
    "contrast": (0.9, True),
    "sharpness": (0.9, True),
    "posterize": (4.0, False),
    "solarize": (1.0, False),
    "auto_contrast": (0.0, False),
    "equalize": (0.0, False),
    "invert": (0.0, False),
}
UNITS = {
    "rotate": "degrees", "shear_x": "shear factor", "shear_y": "shear factor",
    "translate_x": "fraction of the width", "translate_y": "fraction of the height",
    "brightness": "factor 1 ± m", "color": "factor 1 ± m", "contrast": "factor 1 ± m",
    "sharpness": "factor 1 ± m", "posterize": "bits removed of 8", "solarize": "1 - threshold",
}
# torchvision's RandAugment set (no invert); TrivialAugment draws from the same set.
RANDAUGMENT_OPS = tuple(name for name in OPS if name != "invert")
GEOMETRIC_OPS = {"shear_x", "shear_y", "translate_x", "translate_y", "rotate"}
# Saturation needs colour; on a grey image it changes nothing, so it is left out for 1 channel.
COLOUR_ONLY_OPS = {"color"}
AUTOAUGMENT_TABLES = {
    "cifar10": kornia_autoaugment.cifar10_policy,
    "svhn": kornia_autoaugment.svhn_policy,
    "imagenet": kornia_autoaugment.imagenet_policy,
}


def op_magnitude(name: str, fraction: float) -> float:
    """The magnitude of `name` at `fraction` (0–1) of full strength; posterize in whole bits."""
    full, _ = OPS[name]
    value = full * fraction
    return float(math.floor(value + 0.5)) if name == "posterize" else round(value, 6)


def load_policy(path: str | Path) -> dict[str, Any]:
    """Read policy.json (or the folder holding it) as written by the augment step."""
    path = Path(path)
    if path.is_dir() or path.suffix != ".json":
        path = path / outputs.POLICY
    if not path.is_file():
        raise UserError(
            f"{path}: no augmentation policy; run the augment step first "
            "(cnn-pipeline augment, or dvc repro augment)"
        )
    policy = json.loads(path.read_text())
    if policy.get("version") != POLICY_VERSION:
        raise UserError(
            f"{path}: policy version {policy.get('version')!r}, this code reads {POLICY_VERSION}; "
            "run the augment step again"
        )
    return policy


def make_batch_augment(policy: dict[str, Any], num_classes: int) -> BatchAugment:
    """The training-time augmentation described by `policy`, as `(x, y) -> (x_aug, target)`."""
    if policy["num_classes"] != num_classes:
        raise UserError(
            f"{outputs.POLICY} was made for {policy['num_classes']} classes, the data has "
            f"{num_classes}; run the augment step again"
        )
    stages = _stages(policy)
    mix = _mix(policy, num_classes)
    shape = (policy["channels"], *policy["image_size"])
    expected = "N×" + "×".join(map(str, shape))
    if not stages and mix is None:
        return identity

    @torch.no_grad()
    def augment(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if tuple(x.shape[1:]) != shape:
            raise UserError(
                f"batch of shape {tuple(x.shape)} but {outputs.POLICY} is for {expected}; "
                "run the augment step again after prepare"
            )
        # C=1 tensors are both contiguous and channels_last; only a real channels_last is kept.
        channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        for stage in stages:
            x = stage(x)
        if mix is not None:
            x, y = mix(x, y)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    return augment


def identity(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What make_batch_augment returns when the policy changes nothing; callers may skip it."""
    return x, y


def _stages(policy: dict[str, Any]) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    size = tuple(policy["image_size"])
    stages: list[Callable[[torch.Tensor], torch.Tensor]] = []
    crop = policy.get("crop")
    if crop and crop["kind"] == "pad_crop":
        stages.append(PadCropFlip(crop["padding_px"], crop["fill"], policy["flip"]))
    else:
        if crop and crop["kind"] == "resized_crop":
            stages.append(
                K.RandomResizedCrop(size, scale=tuple(crop["scale"]), ratio=tuple(crop["ratio"]))
            )
        if policy["flip"]:
            stages.append(K.RandomHorizontalFlip(p=0.5))
    jitter = policy.get("color_jitter")
    if jitter:
        stages.append(K.ColorJitter(**jitter))
    ops = policy.get("ops")
    if ops:
        if any(entry["op"] == "auto_contrast" for entry in ops["entries"]):
            _autocontrast(torch.zeros(1, 1, 1, 1))  # torchvision loads now, not in a training step
        stages.append(PerSampleOps(ops))
    erasing = policy.get("erasing")
    if erasing:
        stages.append(
            K.RandomErasing(
                scale=tuple(erasing["scale"]), ratio=tuple(erasing["ratio"]),
                value=erasing["value"], p=erasing["p"],
            )
        )
    return stages


def _mix(policy: dict[str, Any], num_classes: int) -> BatchAugment | None:
    # One mixing weight per batch and partners by rolling the batch, as in the mixup and cutmix
    # papers; torchvision's transforms do exactly that and return the soft targets.
    if policy["mixup_alpha"] <= 0 and policy["cutmix_alpha"] <= 0:
        return None
    # Imported here: torchvision brings its models and ops along, seconds that only mixing uses.
    import torchvision.transforms.v2 as T

    mixes = []
    if policy["mixup_alpha"] > 0:
        mixes.append(T.MixUp(alpha=policy["mixup_alpha"], num_classes=num_classes))
    if policy["cutmix_alpha"] > 0:
        mixes.append(T.CutMix(alpha=policy["cutmix_alpha"], num_classes=num_classes))
    return mixes[0] if len(mixes) == 1 else T.RandomChoice(mixes)


class PadCropFlip:
    """Pad, crop back to size at a random offset and maybe mirror, per image, in one gather.

    The same result as kornia's RandomCrop(padding) + RandomHorizontalFlip, which slice the
    batch row by row in Python; one gather of precomputed pixel indices is 3.6× (32×32×3) to
    7.4× (28×28×1) faster on one core (bench/RESULTS.md, "augment").
    """

    def __init__(self, padding: int, fill: float, flip: bool):
        self.padding, self.fill, self.flip = padding, fill, flip

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        p = self.padding
        top = torch.randint(2 * p + 1, (n, 1))
        left = torch.randint(2 * p + 1, (n, 1))
        cols = torch.arange(w).expand(n, w)
        if self.flip:
            cols = torch.where(torch.rand(n, 1) < 0.5, cols.flip(1), cols)
        # Index of every output pixel in the flattened padded image, the same for all channels.
        source = (top + torch.arange(h))[:, :, None] * (w + 2 * p) + (left + cols)[:, None, :]
        source = source.view(n, 1, h * w).to(x.device, non_blocking=True)
        padded = torch.nn.functional.pad(x, (p, p, p, p), value=self.fill)
        return padded.flatten(2).gather(2, source.expand(n, c, h * w)).view(n, c, h, w)


class PerSampleOps:
    """RandAugment, TrivialAugment or AutoAugment with an independent draw for every image.

    `spec` (from policy.json) is a flat list of operation `entries` ({op, magnitude, signed, p})
    and a `kind` saying how each image picks from them: randaugment picks `num_ops` entries
    uniformly at a fixed magnitude; trivialaugment picks one and draws its magnitude uniformly
    up to the entry's; autoaugment picks a sub-policy (a list of entry indices) and applies each
    of its entries with probability p.
    """

    def __init__(self, spec: dict[str, Any]):
        self.kind = spec["kind"]
        entries = spec["entries"] + [{"op": "identity", "magnitude": 0.0, "signed": False}]
        self.names = [e["op"] for e in entries]
        self.identity = len(entries) - 1
        self.magnitude = torch.tensor([float(e["magnitude"]) for e in entries])
        self.signed = torch.tensor([bool(e["signed"]) for e in entries])
        self.p = torch.tensor([float(e.get("p", 1.0)) for e in entries])
        self.is_op = {g: torch.tensor([n == g for n in self.names]) for g in GEOMETRIC_OPS}
        self.geometric = torch.tensor([n in GEOMETRIC_OPS for n in self.names])
        # Entries that share an operation (AutoAugment's differ in p and strength) run together.
        self.ops = sorted(set(self.names) - GEOMETRIC_OPS - {"identity"})
        self.op_of = torch.tensor([self.ops.index(n) if n in self.ops else -1 for n in self.names])
        self.num_ops = spec.get("num_ops", 1)
        if self.kind == "autoaugment":
            # Ragged sub-policies padded with the identity entry.
            width = max(len(s) for s in spec["subpolicies"])
            self.table = torch.tensor(
                [s + [self.identity] * (width - len(s)) for s in spec["subpolicies"]]
            )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()  # written row by row below; the caller's batch stays as it was
        for choice in self._draw(x.shape[0]):
            magnitude = self.magnitude[choice]
            if self.kind == "trivialaugment":
                magnitude = magnitude * torch.rand(len(choice))
            sign = torch.where(torch.rand(len(choice)) < 0.5, -1.0, 1.0)
            magnitude = torch.where(self.signed[choice], magnitude * sign, magnitude)
            self._geometric(x, choice, magnitude)
            self._intensity(x, choice, magnitude)
        return x

    def _draw(self, n: int) -> list[torch.Tensor]:
        """Entry index per image for each round, drawn on the CPU (no device syncs)."""
        if self.kind == "autoaugment":
            rows = self.table[torch.randint(len(self.table), (n,))]
            rounds = [rows[:, j] for j in range(rows.shape[1])]
        else:
            rounds = [torch.randint(self.identity, (n,)) for _ in range(self.num_ops)]
        return [torch.where(torch.rand(n) < self.p[r], r, self.identity) for r in rounds]

    def _geometric(self, x: torch.Tensor, choice: torch.Tensor, mag: torch.Tensor) -> None:
        """Rotate, shear or translate each row that drew one, about the centre: one warp for all."""
        rows = torch.nonzero(self.geometric[choice]).flatten()
        if not len(rows):
            return
        choice, mag = choice[rows], mag[rows]
        n, (h, w) = len(rows), x.shape[-2:]
        zero = torch.zeros(n)

        def only(name: str, value: torch.Tensor) -> torch.Tensor:
            return torch.where(self.is_op[name][choice], value, zero)

        # kornia takes shear as an angle in radians; the magnitude is the factor, tan(angle).
        shift = torch.stack([only("translate_x", mag * w), only("translate_y", mag * h)], 1)
        matrix = get_affine_matrix2d(
            translations=shift,
            center=torch.tensor([(w - 1) / 2, (h - 1) / 2]).expand(n, 2),
            scale=torch.ones(n, 2),
            angle=only("rotate", mag),
            sx=only("shear_x", torch.atan(mag)),
            sy=only("shear_y", torch.atan(mag)),
        )
        dev_rows = rows.to(x.device, non_blocking=True)
        warped = warp_affine(
            x.index_select(0, dev_rows), matrix[:, :2].to(x.device, x.dtype), (h, w),
            align_corners=True,
        )
        x.index_copy_(0, dev_rows, warped)

    def _intensity(self, x: torch.Tensor, choice: torch.Tensor, mag: torch.Tensor) -> None:
        """Each other operation once, on the rows that drew it."""
        op = self.op_of[choice]
        for index in torch.unique(op).tolist():
            if index < 0:
                continue
            name = self.ops[index]
            rows = torch.nonzero(op == index).flatten()
            dev_rows = rows.to(x.device, non_blocking=True)
            out = _INTENSITY[name](x.index_select(0, dev_rows), mag[rows].to(x.device, x.dtype))
            x.index_copy_(0, dev_rows, out.to(x.dtype))


def _factor(mag: torch.Tensor) -> torch.Tensor:
    return 1.0 + mag


def _autocontrast(x: torch.Tensor) -> torch.Tensor:
    import torchvision.transforms.v2.functional as TF  # see _mix: where a policy uses it only

    return TF.autocontrast(x)


_INTENSITY: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "brightness": lambda x, m: (x * _factor(m).view(-1, 1, 1, 1)).clamp_(0.0, 1.0),
    "color": lambda x, m: KE.adjust_saturation_with_gray_subtraction(x, _factor(m)),
    "contrast": lambda x, m: KE.adjust_contrast_with_mean_subtraction(x, _factor(m)),
    "sharpness": lambda x, m: KE.sharpness(x, _factor(m)),
    "posterize": lambda x, m: KE.posterize(x, (8 - m.round()).long()),
    "solarize": lambda x, m: KE.solarize(x, thresholds=1.0 - m),
    "auto_contrast": lambda x, m: _autocontrast(x),
    "equalize": lambda x, m: KE.equalize(x),
    "invert": lambda x, m: 1.0 - x,
}
