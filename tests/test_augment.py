"""The augment step and the runtime augmentation train applies (components/augment.py,
components/training/transforms.py): every preset on 1- and 3-channel batches, per-sample randomness,
flips only when allowed, soft targets, determinism, and the step on real prepared data (digits
and CIFAR-10 pickles the test writes), through its function and its command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from cnn_pipeline.cli import main as command
from components.augment import AugmentResult, augment, preview_size, resolve_policy
from components.core import outputs
from components.core.params import Augment, ParamsError, UserError, load_params, validate
from components.data.dataset import load_split, read_manifest
from components.prepare import prepare
from components.training.transforms import PerSampleOps, identity, load_policy, make_batch_augment
from tests.support.formats import patterned, write_cifar10

PROJECT = Path(__file__).resolve().parents[1]
PRESETS = ["none", "basic", "standard", "randaugment", "trivialaugment", "autoaugment"]
CLASSES = 10


def manifest(channels: int, side: int) -> dict:
    return {"image_size": [side, side], "channels": channels,
            "classes": [{"index": i, "name": f"c{i}"} for i in range(CLASSES)]}


def runtime(channels: int = 1, side: int = 8, **settings):
    """The batch augmentation train would build from these augment settings."""
    policy = resolve_policy(Augment(**settings), manifest(channels, side))
    return make_batch_augment(policy, CLASSES)


def batch(n: int = 64, channels: int = 1, side: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, channels, side, side, generator=g)
    return x, torch.randint(CLASSES, (n,), generator=g)


def distinct(x: torch.Tensor) -> int:
    return len({row.numpy().tobytes() for row in x})


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> dict:
    """Real prepared digits (scikit-learn's 8×8 set, via the prepare step)."""
    root = tmp_path_factory.mktemp("digits")
    raw = {"paths": {"prepared": str(root / "prepared"), "augment": str(root / "augment")}}
    prepare(validate(raw))
    return raw


# --- the runtime augmentation ----------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize(("channels", "side"), [(1, 8), (1, 28), (3, 32)])
def test_every_preset_runs_and_keeps_shape_dtype_and_range(preset, channels, side):
    torch.manual_seed(0)
    x, y = batch(32, channels, side)
    out, target = runtime(channels, side, preset=preset, flip=True, erasing=0.5)(x, y)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    assert target is y
    assert not torch.equal(out, x)  # erasing changes even preset none


def test_preset_none_is_the_identity_without_copies():
    x, y = batch()
    fn = runtime(preset="none")
    out, target = fn(x, y)
    assert fn is identity and out is x and target is y


def test_basic_crop_and_flip_are_drawn_per_image():
    # 256 copies of one image in one batch: a per-batch draw would give one output for all.
    torch.manual_seed(0)
    x, y = batch(1)
    fn = runtime(preset="basic", flip=True, crop_padding=0.125)
    out, _ = fn(x.repeat(256, 1, 1, 1), y.repeat(256))
    # 1 px of padding on 8 px: 9 offsets × 2 mirrorings, nearly all of them present.
    assert distinct(out) >= 15


def test_policy_operations_are_drawn_per_image():
    # Without the crop, an image that drew the identity comes out unchanged while others in the
    # same batch change: only a per-image draw of the operation gives both in one batch.
    torch.manual_seed(0)
    x, y = batch(1, 1, 28)
    many = x.repeat(256, 1, 1, 1)
    fn = runtime(1, 28, preset="randaugment", crop_padding=0, randaugment_ops=1)
    out, _ = fn(many, y.repeat(256))
    unchanged = (out == many).flatten(1).all(1)
    assert 0 < int(unchanged.sum()) < 64
    assert distinct(out[~unchanged]) >= 10


def shifted_copies(image: torch.Tensor, padding: int, mirrored: bool) -> set[bytes]:
    """Every crop of `image` padded by `padding`, optionally of its mirror image."""
    if mirrored:
        image = image.flip(-1)
    side = image.shape[-1]
    padded = F.pad(image, (padding,) * 4)
    return {
        padded[:, top:top + side, left:left + side].contiguous().numpy().tobytes()
        for top in range(2 * padding + 1) for left in range(2 * padding + 1)
    }


@pytest.mark.parametrize("flip", [False, True])
def test_flip_only_when_allowed(flip):
    torch.manual_seed(0)
    x, y = batch(1)  # random pixels: no crop of it equals a crop of its mirror
    out, _ = runtime(preset="basic", flip=flip)(x.repeat(200, 1, 1, 1), y.repeat(200))
    plain, mirrored = shifted_copies(x[0], 1, False), shifted_copies(x[0], 1, True)
    kinds = ["plain" if r.numpy().tobytes() in plain
             else "mirrored" if r.numpy().tobytes() in mirrored else "other" for r in out]
    assert "other" not in kinds
    assert ("mirrored" in kinds) == flip
    assert "plain" in kinds


@pytest.mark.parametrize("preset", PRESETS)
def test_flip_setting_reaches_the_policy(preset):
    for flip in (False, True):
        policy = resolve_policy(Augment(preset=preset, flip=flip), manifest(1, 28))
        assert policy["flip"] is (flip and preset != "none")


@pytest.mark.parametrize(("mixup", "cutmix"), [(0.4, 0.0), (0.0, 1.0), (0.4, 1.0)])
def test_mixup_and_cutmix_give_soft_targets_that_sum_to_one(mixup, cutmix):
    torch.manual_seed(0)
    x, y = batch(64, 3, 32)
    fn = runtime(3, 32, preset="basic", mixup_alpha=mixup, cutmix_alpha=cutmix)
    for _ in range(4):
        out, target = fn(x, y)
        assert target.shape == (64, CLASSES) and target.dtype.is_floating_point
        torch.testing.assert_close(target.sum(1), torch.ones(64))
        # The weight sits on the image's own class and its partner's (the batch rolled by one).
        partners = torch.stack([y, y.roll(1)], 1)
        outside = target.clone().scatter_(1, partners, 0.0)
        assert outside.abs().max() == 0
        assert torch.isfinite(out).all()


def test_same_seed_same_batch_different_seed_different():
    x, y = batch(64, 3, 32)
    fn = runtime(3, 32, preset="randaugment", flip=True, erasing=0.3, mixup_alpha=0.2)

    def run(seed):
        torch.manual_seed(seed)
        return fn(x, y)

    first, again, other = run(1), run(1), run(2)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


def test_channels_last_batches_stay_channels_last():
    x, y = batch(16, 3, 32)
    x = x.contiguous(memory_format=torch.channels_last)
    for preset in ("basic", "standard", "trivialaugment"):
        out, _ = runtime(3, 32, preset=preset)(x, y)
        assert out.is_contiguous(memory_format=torch.channels_last)


def test_grey_images_get_no_colour_only_operation():
    for preset in ("randaugment", "trivialaugment", "autoaugment"):
        grey = resolve_policy(Augment(preset=preset), manifest(1, 28))["ops"]["entries"]
        colour = resolve_policy(Augment(preset=preset), manifest(3, 32))["ops"]["entries"]
        assert "color" not in {e["op"] for e in grey}
        assert "color" in {e["op"] for e in colour}


def test_resolved_strengths_scale_with_the_settings():
    small = resolve_policy(Augment(crop_padding=0.125), manifest(1, 8))
    large = resolve_policy(Augment(crop_padding=0.125), manifest(3, 32))
    assert small["crop"]["padding_px"] == 1 and large["crop"]["padding_px"] == 4
    ra = resolve_policy(Augment(preset="randaugment", randaugment_magnitude=15), manifest(1, 28))
    ops = {e["op"]: e["magnitude"] for e in ra["ops"]["entries"]}
    assert ops["rotate"] == 15.0 and ops["posterize"] == 2.0  # half of 30 degrees, of 4 bits


def test_autoaugment_entries_and_subpolicies_agree():
    cfg = Augment(preset="autoaugment", autoaugment_policy="svhn")
    policy = resolve_policy(cfg, manifest(1, 28))
    ops = policy["ops"]
    assert len(ops["subpolicies"]) == 25
    assert all(0 <= i < len(ops["entries"]) for s in ops["subpolicies"] for i in s)
    rounds = PerSampleOps(ops)._draw(512)
    assert all(len(torch.unique(r)) > 5 for r in rounds)


# --- policy.json and the step ------------------------------------------------------------------


def test_step_writes_policy_and_preview_on_real_digits(digits):
    params = validate({**digits, "augment": {"preset": "randaugment", "preview_images": 5,
                                             "preview_views": 3}})
    result = augment(params)
    assert isinstance(result, AugmentResult)
    policy = load_policy(result.policy)
    assert policy["image_size"] == [8, 8] and policy["channels"] == 1
    assert policy["num_classes"] == 10 and policy["ops"]["kind"] == "randaugment"
    assert result.preview.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(result.preview) as png:
        png.verify()
    with Image.open(result.preview) as png:
        width, height = png.size
        # 5 rows of 1 + 3 cells under a header of a few lines
        assert (width, height) in {preview_size(5, 3, lines) for lines in range(1, 5)}
        assert np.asarray(png.convert("L")).std() > 10  # something is drawn

    # What train does with it: the runtime on a batch of the real train split.
    train = load_split(params.paths.prepared, "train")
    x = torch.from_numpy(np.array(train.x[:128])).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(train.y[:128])
    out, target = make_batch_augment(policy, 10)(x, y)
    assert out.shape == x.shape and target is y


def test_step_on_colour_images_with_every_extra(tmp_path):
    train, test = patterned(120, 32, 3, 10, seed=0), patterned(40, 32, 3, 10, seed=1)
    write_cifar10(tmp_path / "raw", train, test)
    params = validate({
        "paths": {"prepared": str(tmp_path / "prepared"), "augment": str(tmp_path / "augment")},
        "data": {"source": "cifar10", "root": str(tmp_path / "raw"), "download": False},
        "augment": {"preset": "standard", "flip": True, "erasing": 0.25, "mixup_alpha": 0.2,
                    "cutmix_alpha": 1.0, "preview_images": 3, "preview_views": 2},
    })
    prepare(params)
    result = augment(params)
    policy = load_policy(tmp_path / "augment")  # the folder works as well as the file
    assert policy["channels"] == 3 and policy["color_jitter"]["saturation"] > 0
    assert result.soft_targets and policy["flip"]
    with Image.open(result.preview) as png:
        assert png.size in {preview_size(3, 2, lines) for lines in range(1, 8)}


def test_command_line_on_tiny_data(digits, tmp_path):
    settings = tmp_path / "params.yaml"
    settings.write_text(json.dumps({"paths": {**digits["paths"], "augment": str(tmp_path / "a")}}))
    done = subprocess.run(
        [sys.executable, "-m", "cnn_pipeline", "augment", "--params", str(settings),
         "--set", "augment.preset=trivialaugment", "--set", "augment.preview_images=2"],
        cwd=PROJECT, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert printed["preset"] == "trivialaugment"
    assert load_policy(printed["policy"])["ops"]["kind"] == "trivialaugment"
    assert Path(printed["preview"]).is_file()


def test_main_without_prepared_data_says_what_to_run(tmp_path, capsys):
    settings = tmp_path / "params.yaml"
    settings.write_text(json.dumps({"paths": {"prepared": str(tmp_path / "none"),
                                              "augment": str(tmp_path / "a")}}))
    with pytest.raises(SystemExit) as exit_:
        command(["augment", "--params", str(settings)])
    assert exit_.value.code == 2
    assert "run the prepare step" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize(("override", "key"), [
    ("augment.preset=sharpen", "augment.preset"),
    ("augment.mixup_alpha=-0.1", "augment.mixup_alpha"),
    ("augment.cutmix_alpha=-1", "augment.cutmix_alpha"),
    ("augment.erasing=1.5", "augment.erasing"),
    ("augment.randaugment_magnitude=31", "augment.randaugment_magnitude"),
    ("augment.resized_crop_scale=[0.9,0.3]", "resized_crop_scale"),
    ("augment.crop_pad=2", "augment.crop_pad"),
])
def test_bad_settings_are_rejected_naming_the_key(override, key, tmp_path):
    settings = tmp_path / "params.yaml"
    settings.write_text("augment:\n  preset: basic\n")
    with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
        load_params(settings, [override])


def test_repository_defaults_are_basic_without_flip_or_mixing():
    section = yaml.safe_load((PROJECT / "params.yaml").read_text())["augment"]
    cfg = Augment.model_validate(section)
    assert cfg == Augment()  # params.yaml mirrors the code's defaults
    assert cfg.preset == "basic" and not cfg.flip and cfg.mixup_alpha == cfg.cutmix_alpha == 0


def test_missing_policy_tells_the_user_to_run_the_augment_step(tmp_path):
    with pytest.raises(UserError, match="run the augment step"):
        load_policy(tmp_path / "augment" / outputs.POLICY)


def test_stale_policy_is_refused(digits):
    policy = resolve_policy(Augment(), read_manifest(digits["paths"]["prepared"]))
    with pytest.raises(UserError, match="classes"):
        make_batch_augment(policy, 3)
    fn = make_batch_augment(policy, 10)
    with pytest.raises(UserError, match="augment step"):
        fn(*batch(4, 1, 28))


# --- the training device ---------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("preset", PRESETS)
def test_cuda_runs_and_draws_what_the_cpu_draws(preset):
    x, y = batch(64, 3, 32)
    fn = runtime(3, 32, preset=preset, flip=True, erasing=0.25, mixup_alpha=0.2)
    torch.manual_seed(3)
    on_cpu, target_cpu = fn(x, y)
    torch.manual_seed(3)
    on_gpu, target_gpu = fn(x.cuda(), y.cuda())
    assert on_gpu.is_cuda and target_gpu.is_cuda
    torch.testing.assert_close(target_gpu.cpu(), target_cpu)
    # Same parameters; kernels differ only in rounding (and equalize's histogram bins).
    assert (on_gpu.cpu() - on_cpu).abs().mean() < 1e-3
