"""The prepare step end to end on real formats written by the tests themselves
(tests/support/formats.py): digits, MNIST and FashionMNIST IDX files, CIFAR-10/100 pickles, and
image folders with every case
a user's folder has. Nothing is mocked; nothing here needs the network."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components import prepare as prepare_module
from components.core import outputs
from components.core.params import Params, UserError, validate
from components.data.dataset import SPLITS, class_names, load_split, read_manifest
from components.prepare import PrepareResult, prepare
from tests.support.disks import FILL, on_small_disk
from tests.support.formats import (
    CIFAR10_NAMES,
    make_messy_folder,
    noise,
    patterned,
    raw_name,
    special_file,
    unescape_name,
    write_cifar10,
    write_cifar100,
    write_fashion_mnist,
    write_image,
    write_mnist,
)
from tests.support.projects import IMBALANCED_DATA, REDUCED, imbalanced_digits

PROJECT = Path(__file__).resolve().parents[1]


# --- helpers --------------------------------------------------------------------------------


def params_for(out: Path, **data) -> Params:
    data = {k: str(v) if isinstance(v, Path) else v for k, v in data.items()}
    return validate({"paths": {"prepared": str(out)}, "data": data})


def run(out: Path, **data) -> tuple[PrepareResult, dict, dict]:
    """prepare() into `out`; the result, the manifest and each split loaded into memory."""
    result = prepare(params_for(out, **data))
    splits = {s: load_split(out, s, mmap=False) for s in SPLITS}
    return result, read_manifest(out), splits


def pairs(x: np.ndarray, y: np.ndarray) -> Counter:
    """The multiset of (label, image): equal multisets mean nothing lost, added or mislabelled."""
    return Counter((int(label), img.tobytes()) for img, label in zip(x, y, strict=True))


def union(splits: dict, names=SPLITS) -> Counter:
    total = Counter()
    for name in names:
        total += pairs(splits[name].x, splits[name].y)
    return total


def per_class(split, n_classes: int) -> np.ndarray:
    return np.bincount(split.y, minlength=n_classes)


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(array)).save(path)
    return path


def folder(root: Path, layout: dict[str, int], size: int = 16, seed: int = 0,
           mark: int | None = None) -> Path:
    """PNG files: layout maps 'class' or 'split/class' to a number of images, all distinct.

    `mark` sets the top-left pixel's red value, so a test can tell where an image came from.
    """
    rng = np.random.default_rng(seed)
    for where, n in layout.items():
        for i in range(n):
            a = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
            if mark is not None:
                a[0, 0, 0] = mark
            write_png(root / where / f"{i:03d}.png", a)
    return root


def check_consistent(out: Path, manifest: dict, splits: dict, result: PrepareResult) -> None:
    """What every prepared folder must satisfy, whatever the source."""
    h, w = manifest["image_size"]
    c = manifest["channels"]
    names = class_names(manifest)
    assert [cl["index"] for cl in manifest["classes"]] == list(range(len(names)))
    for name in SPLITS:
        x, y = splits[name].x, splits[name].y
        assert x.dtype == np.uint8 and x.shape[1:] == (h, w, c), (name, x.shape)
        assert y.dtype == np.int64 and y.shape == (len(x),)
        assert manifest["num"][name] == len(x) == result.counts[name]
        assert list(manifest["counts"][name]) == names
        counted = per_class(splits[name], len(names)).tolist()
        assert list(manifest["counts"][name].values()) == counted
        assert y.min(initial=0) >= 0 and y.max(initial=0) < len(names)
        assert len(manifest["hashes"][name]) == 64
        int(manifest["hashes"][name], 16)
    counted = manifest["files"]
    assert counted["found"] == counted["prepared"] + counted["quarantined"] + counted["ignored"]
    assert counted["prepared"] == sum(manifest["num"].values())
    quarantine = json.loads((out / outputs.QUARANTINE).read_text())
    assert counted["quarantined"] == len(quarantine)
    assert all(set(q) == {"path", "reason", "detail"} for q in quarantine)
    assert result.files == counted and result.classes == names
    assert result.duplicates == manifest["duplicates_across_splits"]["count"]
    x = splits["train"].x.reshape(-1, c).astype(np.float64) / 255
    np.testing.assert_allclose(manifest["mean"], x.mean(0), atol=1e-4)
    np.testing.assert_allclose(manifest["std"], x.std(0), atol=1e-4)
    assert {p.name for p in out.iterdir()} == {
        *(f(s) for s in SPLITS for f in (outputs.x_file, outputs.y_file)), outputs.MANIFEST,
        outputs.QUARANTINE}


def assert_stratified(splits: dict, n_classes: int, test_fraction: float, val_fraction: float):
    """Per class: test is test_fraction of all, val is val_fraction of the rest, within 1."""
    total = sum(per_class(splits[s], n_classes) for s in SPLITS)
    test, val = per_class(splits["test"], n_classes), per_class(splits["val"], n_classes)
    assert np.all(np.abs(test - test_fraction * total) <= 1), (test, total)
    assert np.all(np.abs(val - val_fraction * (total - test)) <= 1), (val, total - test)


# --- digits ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "prepared"
    return out, *run(out)


def test_digits_end_to_end(digits):
    out, result, manifest, splits = digits
    check_consistent(out, manifest, splits, result)
    assert manifest["source"] == "digits" and manifest["seed"] == 0
    assert manifest["image_size"] == [8, 8] and manifest["channels"] == 1
    assert class_names(manifest) == [str(d) for d in range(10)]
    assert manifest["files"] == {"found": 1797, "prepared": 1797, "quarantined": 0, "ignored": 0}
    assert sum(manifest["num"].values()) == 1797
    assert 0.1 < manifest["mean"][0] < 0.5 and 0.2 < manifest["std"][0] < 0.5
    assert json.loads((out / outputs.QUARANTINE).read_text()) == []
    assert result.path == str(out)


def test_imbalanced_train_classes_are_warned_about_naming_the_settings(digits, tmp_path,
                                                                       capsys):
    assert digits[2]["imbalance"]["warning"] is None and digits[2]["imbalance"]["ratio"] < 1.1
    folder = imbalanced_digits(digits[0], tmp_path / "folder")  # 3, 8, 9 at 5% of train
    prepare(validate({"paths": {"prepared": str(tmp_path / "prepared")},
                      "data": IMBALANCED_DATA | {"root": str(folder)}}))
    info = read_manifest(tmp_path / "prepared")["imbalance"]
    assert info["ratio"] > 10 and info["smallest"]["class"] in REDUCED and info["limit"] == 10
    assert info["largest"]["train"] / info["smallest"]["train"] == pytest.approx(info["ratio"],
                                                                                 abs=1e-3)
    err = capsys.readouterr().err
    assert f"warning: {info['warning']}" in err
    for setting in ("train.class_weights: balanced", "train.sampler: balanced",
                    "register.primary_metric: balanced_accuracy"):
        assert setting in info["warning"]


def test_digits_values_span_0_to_255_and_labels_are_right(digits):
    from sklearn.datasets import load_digits

    _, _, _, splits = digits
    x = np.concatenate([splits[s].x for s in SPLITS])
    assert x.min() == 0 and x.max() == 255
    # Back on sklearn's 0..16 scale, the images and their labels are exactly sklearn's.
    back = np.rint(x.astype(np.float64) * 16 / 255).astype(np.uint8)
    y = np.concatenate([splits[s].y for s in SPLITS])
    bunch = load_digits()
    assert pairs(back, y) == pairs(bunch.images.astype(np.uint8)[..., None], bunch.target)


def test_digits_splits_are_stratified(digits):
    _, _, manifest, splits = digits
    assert_stratified(splits, 10, 0.2, 0.1)
    assert abs(manifest["num"]["test"] - 0.2 * 1797) <= 10


def test_same_seed_gives_the_same_bytes_and_another_seed_another_split(digits, tmp_path):
    out, _, manifest, splits = digits
    _, again, splits2 = run(tmp_path / "again")
    assert again["hashes"] == manifest["hashes"]
    for s in SPLITS:
        np.testing.assert_array_equal(splits2[s].x, splits[s].x)
        np.testing.assert_array_equal(splits2[s].y, splits[s].y)
    _, other, splits3 = run(tmp_path / "other", seed=1)
    assert other["seed"] == 1
    assert all(other["hashes"][s] != manifest["hashes"][s] for s in SPLITS)
    assert pairs(splits3["test"].x, splits3["test"].y) != pairs(splits["test"].x, splits["test"].y)
    assert union(splits3) == union(splits)  # same images, dealt differently


def test_hash_is_of_the_split_contents(digits):
    """The manifest's hash can be checked against the files, and one changed pixel or label
    changes it."""
    out, _, manifest, _ = digits
    for s in SPLITS:
        x, y = np.load(out / f"{s}_x.npy"), np.load(out / f"{s}_y.npy")
        rows = np.arange(len(y))
        assert prepare_module._content_hash(
            prepare_module._row_hashes(x, rows), y, x.shape[1:]) == manifest["hashes"][s]
        x[0, 0, 0, 0] ^= 1
        assert prepare_module._content_hash(
            prepare_module._row_hashes(x, rows), y, x.shape[1:]) != manifest["hashes"][s]
        x[0, 0, 0, 0] ^= 1
        y[0] = (y[0] + 1) % 10
        assert prepare_module._content_hash(
            prepare_module._row_hashes(x, rows), y, x.shape[1:]) != manifest["hashes"][s]


def test_fractions_are_honoured(tmp_path):
    _, manifest, splits = run(tmp_path / "p", val_fraction=0.25, test_fraction=0.3)
    assert_stratified(splits, 10, 0.3, 0.25)
    _, manifest, splits = run(tmp_path / "q", val_fraction=0.0, test_fraction=0.0)
    assert manifest["num"] == {"train": 1797, "val": 0, "test": 0}


def test_array_source_can_be_resized_and_given_three_channels(tmp_path):
    _, manifest, splits = run(tmp_path / "p", image_size=16, channels=3)
    assert manifest["image_size"] == [16, 16] and manifest["channels"] == 3
    x = splits["train"].x
    assert x.shape[1:] == (16, 16, 3)
    np.testing.assert_array_equal(x[..., 0], x[..., 2])  # grey copied, not invented


# --- torchvision sources from files written here ----------------------------------------------


def test_mnist_from_idx_files(tmp_path):
    from torchvision.datasets import MNIST

    train, test = patterned(60, 28, 1, 10, seed=1), patterned(20, 28, 1, 10, seed=2)
    write_mnist(tmp_path / "raw", train, test)
    result, manifest, splits = run(tmp_path / "out", source="mnist", root=tmp_path / "raw",
                                   download=False)
    check_consistent(tmp_path / "out", manifest, splits, result)
    assert manifest["source"] == "mnist"
    assert manifest["image_size"] == [28, 28] and manifest["channels"] == 1
    assert class_names(manifest) == list(MNIST.classes)
    assert pairs(splits["test"].x, splits["test"].y) == pairs(*test)  # its own test split kept
    assert union(splits, ["train", "val"]) == pairs(*train)  # val carved from train
    assert manifest["num"]["val"] == 6  # 10% of 60, as close to 0.6 per class as can be
    assert set(manifest["counts"]["val"].values()) <= {0, 1}


def test_fashion_mnist_from_idx_files(tmp_path):
    from torchvision.datasets import FashionMNIST

    train, test = patterned(40, 28, 1, 10, seed=3), patterned(10, 28, 1, 10, seed=4)
    write_fashion_mnist(tmp_path / "raw", train, test)
    result, manifest, splits = run(tmp_path / "out", source="fashion_mnist",
                                   root=tmp_path / "raw", download=False)
    check_consistent(tmp_path / "out", manifest, splits, result)
    assert class_names(manifest) == list(FashionMNIST.classes)
    assert pairs(splits["test"].x, splits["test"].y) == pairs(*test)
    assert union(splits, ["train", "val"]) == pairs(*train)


def test_cifar10_from_pickle_batches(tmp_path):
    train, test = patterned(100, 32, 3, 10, seed=5), patterned(20, 32, 3, 10, seed=6)
    write_cifar10(tmp_path / "raw", train, test)
    result, manifest, splits = run(tmp_path / "out", source="cifar10", root=tmp_path / "raw",
                                   download=False)
    check_consistent(tmp_path / "out", manifest, splits, result)
    assert manifest["image_size"] == [32, 32] and manifest["channels"] == 3
    assert class_names(manifest) == CIFAR10_NAMES
    assert pairs(splits["test"].x, splits["test"].y) == pairs(*test)
    assert union(splits, ["train", "val"]) == pairs(*train)  # channel-major rows decoded right


def test_cifar100_uses_the_meta_file_order_and_fine_labels(tmp_path):
    names = [f"kind_{(i * 37) % 100:02d}" for i in range(100)]  # not alphabetical on purpose
    train, test = patterned(300, 32, 3, 100, seed=7), patterned(100, 32, 3, 100, seed=8)
    write_cifar100(tmp_path / "raw", train, test, names)
    result, manifest, splits = run(tmp_path / "out", source="cifar100", root=tmp_path / "raw",
                                   download=False)
    check_consistent(tmp_path / "out", manifest, splits, result)
    assert class_names(manifest) == names
    assert pairs(splits["test"].x, splits["test"].y) == pairs(*test)
    assert union(splits, ["train", "val"]) == pairs(*train)
    # 3 images per class: per-class rounding alone would leave val empty.
    assert abs(manifest["num"]["val"] - 30) <= 1


@pytest.mark.parametrize("source, folder, expected", [
    ("mnist", "MNIST/raw", ["train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]),
    ("fashion_mnist", "FashionMNIST/raw", ["train-images-idx3-ubyte"]),
    ("cifar10", "cifar-10-batches-py", ["data_batch_1", "test_batch", "batches.meta"]),
    ("cifar100", "cifar-100-python", ["train", "test", "meta"]),
])
def test_missing_files_name_the_folder_and_the_files(tmp_path, source, folder, expected):
    out = tmp_path / "out"
    with pytest.raises(UserError) as info:
        prepare(params_for(out, source=source, root=tmp_path / "empty", download=False))
    message = str(info.value)
    assert str(tmp_path / "empty" / folder) in message
    for name in expected:
        assert name in message
    assert "download" in message
    assert not out.exists()


def test_some_files_missing_names_those(tmp_path):
    write_mnist(tmp_path / "raw", patterned(20, 28, 1, 10, 0), patterned(10, 28, 1, 10, 1),
                with_gz=False)
    (tmp_path / "raw/MNIST/raw/t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(UserError, match="t10k-labels-idx1-ubyte") as info:
        prepare(params_for(tmp_path / "out", source="mnist", root=tmp_path / "raw",
                           download=False))
    assert "train-images-idx3-ubyte" not in str(info.value)


@pytest.mark.parametrize("damage", ["truncated", "not idx"])
def test_a_damaged_idx_file_is_a_clear_error(tmp_path, damage):
    raw = write_mnist(tmp_path / "raw", patterned(20, 28, 1, 10, 0), patterned(10, 28, 1, 10, 1))
    images = raw / "train-images-idx3-ubyte"
    data = images.read_bytes()
    images.write_bytes(data[:-100] if damage == "truncated" else b"<html>not found</html>")
    with pytest.raises(UserError) as info:
        prepare(params_for(tmp_path / "out", source="mnist", root=tmp_path / "raw",
                           download=False))
    message = str(info.value)
    assert "cannot read" in message and str(images) in message
    assert ("truncated" if damage == "truncated" else "not an IDX file") in message
    assert not (tmp_path / "out").exists()


def _online() -> bool:
    try:
        socket.getaddrinfo("ossci-datasets.s3.amazonaws.com", 443)
        return True
    except OSError:
        return False


def test_download_offline_fails_with_the_same_clear_error(tmp_path):
    # Measured here: with no network, torchvision's download fails in well under a second.
    if _online():
        pytest.skip("the network is reachable: this would download MNIST")
    with pytest.raises(UserError) as info:
        prepare(params_for(tmp_path / "out", source="mnist", root=tmp_path / "raw",
                           download=True))
    message = str(info.value)
    assert str(tmp_path / "raw" / "MNIST" / "raw") in message
    assert "train-images-idx3-ubyte" in message and "download" in message


# --- image folders --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    base = tmp_path_factory.mktemp("messy")
    expected = make_messy_folder(base / "root")
    out = base / "prepared"
    return expected, out, *run(out, source="imagefolder", root=expected.root, image_size=16)


def test_messy_folder_accounting(messy):
    expected, out, result, manifest, splits = messy
    check_consistent(out, manifest, splits, result)
    assert manifest["files"] == expected.files
    assert manifest["source"] == "imagefolder"
    assert manifest["image_size"] == [16, 16] and manifest["channels"] == 3


def test_messy_folder_quarantine_reasons(messy):
    expected, out, *_ = messy
    quarantine = json.loads((out / outputs.QUARANTINE).read_text())
    got = {q["path"]: q["reason"] for q in quarantine}
    assert got == expected.quarantined
    assert all(q["detail"] for q in quarantine)


def test_messy_folder_classes_and_counts(messy):
    expected, _, _, manifest, _ = messy
    assert class_names(manifest) == expected.classes == ["bird", "cat", "hot dog"]
    totals = Counter()
    for split in SPLITS:
        totals.update(manifest["counts"][split])
    assert dict(totals) == expected.per_class  # nested, upper-case, every mode: all kept


def test_flat_folder_is_split_per_class(tmp_path):
    root = folder(tmp_path / "raw", {"a": 20, "b": 30, "c": 10})
    _, manifest, splits = run(tmp_path / "out", source="imagefolder", root=root, image_size=16)
    assert manifest["counts"]["test"] == {"a": 4, "b": 6, "c": 2}
    assert_stratified(splits, 3, 0.2, 0.1)
    assert sum(manifest["num"].values()) == 60


def test_small_classes_still_give_each_split_its_share(tmp_path):
    # 12 classes of 4 images: rounding each class alone gives test 12 (asked: 9.6) and val 0.
    root = folder(tmp_path / "raw", {f"c{i:02d}": 4 for i in range(12)})
    _, manifest, splits = run(tmp_path / "out", source="imagefolder", root=root, image_size=16)
    assert_stratified(splits, 12, 0.2, 0.1)
    assert abs(manifest["num"]["test"] - 0.2 * 48) <= 1
    assert manifest["num"]["val"] >= 3
    assert all(n >= 1 for n in manifest["counts"]["train"].values())


def test_a_class_with_one_image_stays_in_train(tmp_path):
    root = folder(tmp_path / "raw", {"many": 20, "single": 1})
    _, manifest, _ = run(tmp_path / "out", source="imagefolder", root=root, image_size=16)
    assert manifest["counts"]["train"]["single"] == 1


@pytest.mark.parametrize("val_name", ["val", "valid", "validation"])
def test_split_folders_are_kept(tmp_path, val_name):
    root = folder(tmp_path / "raw", {"train/a": 6, "train/b": 5, f"{val_name}/a": 2,
                                     f"{val_name}/b": 2, "test/a": 3, "test/b": 1})
    _, manifest, _ = run(tmp_path / "out", source="imagefolder", root=root, image_size=16)
    assert manifest["counts"] == {"train": {"a": 6, "b": 5}, "val": {"a": 2, "b": 2},
                                  "test": {"a": 3, "b": 1}}


def test_split_folders_without_val_carve_val_from_train(tmp_path):
    root = folder(tmp_path / "raw", {"train/a": 20, "train/b": 20, "test/a": 5, "test/b": 5})
    _, manifest, _ = run(tmp_path / "out", source="imagefolder", root=root, image_size=16)
    assert manifest["counts"]["test"] == {"a": 5, "b": 5}
    assert manifest["counts"]["val"] == {"a": 2, "b": 2}
    assert manifest["counts"]["train"] == {"a": 18, "b": 18}


def test_a_class_in_one_split_only(tmp_path):
    root = folder(tmp_path / "raw", {"train/a": 10, "train/b": 10, "test/a": 3})
    _, manifest, _ = run(tmp_path / "out", source="imagefolder", root=root, image_size=16)
    assert manifest["counts"]["test"] == {"a": 3, "b": 0}


def test_split_folders_mixed_with_another_folder_is_an_error(tmp_path):
    root = folder(tmp_path / "raw", {"train/a": 3, "test/a": 2, "extras/a": 2})
    with pytest.raises(UserError, match="extras"):
        prepare(params_for(tmp_path / "out", source="imagefolder", root=root, image_size=16))


def test_image_directly_in_a_split_folder_is_quarantined(tmp_path):
    root = folder(tmp_path / "raw", {"train/a": 4, "train/b": 4, "test/a": 2, "test/b": 2})
    write_image(root / "train/loose.png", noise(16, 16, seed=3))
    _, manifest, _ = run(tmp_path / "out", source="imagefolder", root=root, image_size=16)
    quarantine = json.loads((tmp_path / "out" / outputs.QUARANTINE).read_text())
    assert [(q["path"], q["reason"]) for q in quarantine] == [
        ("train/loose.png", "outside_class_folder")]
    assert manifest["files"]["found"] == 13


def test_resplit_pools_the_given_splits(tmp_path):
    # Given train images are marked 0, given test images 255 (their backgrounds differ).
    root = tmp_path / "raw"
    folder(root, {"train/a": 20, "train/b": 20}, seed=1, mark=0)
    folder(root, {"test/a": 10, "test/b": 10}, seed=2, mark=255)
    _, kept, splits = run(tmp_path / "kept", source="imagefolder", root=root, image_size=16)
    assert kept["counts"]["test"] == {"a": 10, "b": 10}
    assert set(splits["test"].x[:, 0, 0, 0].tolist()) == {255}
    _, pooled, splits = run(tmp_path / "pooled", source="imagefolder", root=root, image_size=16,
                            resplit=True)
    assert pooled["counts"]["test"] == {"a": 6, "b": 6}
    assert_stratified(splits, 2, 0.2, 0.1)
    marks = Counter(splits["test"].x[:, 0, 0, 0].tolist())
    assert marks[0] > 0  # given train images now test
    assert Counter(splits["train"].x[:, 0, 0, 0].tolist())[255] > 0


def _duplicated_folder(root: Path) -> Path:
    folder(root, {"train/a": 5, "train/b": 5, "val/a": 2, "val/b": 2, "test/a": 3, "test/b": 3})
    same = np.asarray(Image.open(root / "train/a/001.png"))
    Image.fromarray(same).save(root / "test/a/copy.bmp")  # other bytes, same pixels
    (root / "val/b/again.png").write_bytes((root / "train/b/002.png").read_bytes())
    (root / "train/a/twin.png").write_bytes((root / "train/a/003.png").read_bytes())  # same split
    return root


def test_duplicates_across_splits_are_reported(tmp_path):
    root = _duplicated_folder(tmp_path / "raw")
    result, manifest, _ = run(tmp_path / "out", source="imagefolder", root=root, image_size=16)
    dup = manifest["duplicates_across_splits"]
    assert dup["count"] == 2 and dup["dropped"] == 0 and result.duplicates == 2
    assert {e["file"] for e in dup["examples"]} == {"test/a/copy.bmp", "val/b/again.png"}
    assert manifest["num"] == {"train": 11, "val": 5, "test": 7}
    assert manifest["files"]["quarantined"] == 0


def test_duplicates_are_dropped_from_the_later_split(tmp_path):
    root = _duplicated_folder(tmp_path / "raw")
    result, manifest, splits = run(tmp_path / "out", source="imagefolder", root=root,
                                   image_size=16, drop_duplicates=True)
    check_consistent(tmp_path / "out", manifest, splits, result)
    assert manifest["duplicates_across_splits"]["dropped"] == 2
    assert manifest["num"] == {"train": 11, "val": 4, "test": 6}  # train keeps its copies
    quarantine = json.loads((tmp_path / "out" / outputs.QUARANTINE).read_text())
    assert {(q["path"], q["reason"]) for q in quarantine} == {
        ("test/a/copy.bmp", "duplicate"), ("val/b/again.png", "duplicate")}
    assert manifest["files"] == {"found": 23, "prepared": 21, "quarantined": 2, "ignored": 0}
    seen = {x.tobytes() for x in splits["train"].x}
    assert not any(x.tobytes() in seen for s in ("val", "test") for x in splits[s].x)


@pytest.mark.parametrize("contents", [
    {"empty.png": b"", "text.jpg": b"not a picture"},
    {"notes.txt": b"only notes here"},
])
def test_a_class_with_no_usable_image_is_an_error(tmp_path, contents):
    root = folder(tmp_path / "raw", {"good": 3})
    (root / "hollow").mkdir()
    for name, data in contents.items():
        (root / "hollow" / name).write_bytes(data)
    with pytest.raises(UserError, match="hollow"):
        prepare(params_for(tmp_path / "out", source="imagefolder", root=root, image_size=16))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("layout", [{"only": 6}, {"train/only": 4, "test/only": 2}])
def test_an_image_folder_of_one_class_is_refused_naming_it(tmp_path, layout):
    """A model of one class answers it for every image ("accuracy 1.0", then a champion)."""
    root = folder(tmp_path / "raw", layout)
    with pytest.raises(UserError, match="one class") as info:
        prepare(params_for(tmp_path / "out", source="imagefolder", root=root, image_size=16))
    assert str(root) in str(info.value) and "only" in str(info.value)
    assert "two classes" in str(info.value) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_fifo_or_device_named_like_an_image_is_quarantined_unopened(tmp_path, kind):
    """Reading one could block forever (a FIFO) or never end (/dev/zero)."""
    root = folder(tmp_path / "raw", {"a": 5, "b": 5})
    special_file(root / "a" / "special.png", kind)
    special_file(root / "loose.png", kind)
    _, manifest, _ = run(tmp_path / "out", source="imagefolder", root=root, image_size=16)
    quarantine = json.loads((tmp_path / "out" / outputs.QUARANTINE).read_text())
    assert sorted((q["path"], q["reason"]) for q in quarantine) == [
        ("a/special.png", "not_a_file"), ("loose.png", "not_a_file")]
    assert manifest["num"]["train"] + manifest["num"]["val"] + manifest["num"]["test"] == 10


def test_names_that_are_not_utf8_are_kept_escaped(tmp_path):
    """A file and a class folder whose names are not UTF-8: prepared, and named in the manifest
    and quarantine.json as escaped bytes (components.data.images.file_name), valid UTF-8 JSON."""
    root = folder(tmp_path / "raw", {"a": 5, "b": 5})
    folder(raw_name(root, b"caf\xe9"), {"": 5}, seed=1)  # a Latin-1 name
    raw_name(root / "a", b"bad\xff.png").write_bytes(b"not an image")
    # A copy: when the split puts it apart from its original, the manifest names it as one.
    raw_name(root / "a", b"dup\xfe.png").write_bytes((root / "a/000.png").read_bytes())
    _, manifest, _ = run(tmp_path / "out", source="imagefolder", root=root, image_size=16)
    assert class_names(manifest) == ["a", "b", "caf\\xe9"]
    assert manifest["counts"]["train"]["caf\\xe9"] > 0
    quarantine = json.loads((tmp_path / "out" / outputs.QUARANTINE).read_text())
    assert [(q["path"], q["reason"]) for q in quarantine] == [("a/bad\\xff.png", "not_an_image")]
    for name in (outputs.MANIFEST, outputs.QUARANTINE):
        text = (tmp_path / "out" / name).read_bytes().decode("utf-8")
        assert "\\ud" not in text  # no lone surrogate escaped into the JSON
    assert raw_name(root, unescape_name(quarantine[0]["path"])).is_file()


def test_missing_root_is_an_error_naming_it(tmp_path):
    root = tmp_path / "no" / "such"
    with pytest.raises(UserError, match=str(root)):
        prepare(params_for(tmp_path / "out", source="imagefolder", root=root, image_size=16))


def test_one_channel_and_pad_for_an_image_folder(tmp_path):
    root = tmp_path / "raw"
    for i in range(5):
        write_image(root / "wide" / f"{i}.png", noise(32, 16, seed=i))
        write_image(root / "tall" / f"{i}.png", noise(16, 32, seed=10 + i))
    _, manifest, splits = run(tmp_path / "out", source="imagefolder", root=root, image_size=16,
                              channels=1, resize="pad", test_fraction=0.0, val_fraction=0.0)
    assert manifest["channels"] == 1 and len(manifest["mean"]) == 1
    x, y = splits["train"].x, splits["train"].y
    assert x.shape == (10, 16, 16, 1)
    wide = x[y == class_names(manifest).index("wide")]
    assert np.all(wide[:, :3] == 255) and np.all(wide[:, 13:] == 255)  # padded white


def test_image_folder_is_deterministic(tmp_path):
    root = folder(tmp_path / "raw", {"a": 15, "b": 15})
    _, first, s1 = run(tmp_path / "one", source="imagefolder", root=root, image_size=16)
    _, second, s2 = run(tmp_path / "two", source="imagefolder", root=root, image_size=16)
    assert first["hashes"] == second["hashes"]
    for s in SPLITS:
        np.testing.assert_array_equal(s1[s].x, s2[s].x)
    _, third, s3 = run(tmp_path / "three", source="imagefolder", root=root, image_size=16, seed=5)
    assert third["hashes"]["test"] != first["hashes"]["test"]
    assert union(s3) == union(s1)


def test_relative_paths_are_relative_to_the_working_directory(tmp_path, monkeypatch):
    folder(tmp_path / "raw", {"a": 5, "b": 5})
    monkeypatch.chdir(tmp_path)
    result = prepare(validate({"data": {"source": "imagefolder", "root": "raw", "image_size": 16},
                               "paths": {"prepared": "data/prepared"}}))
    assert (tmp_path / "data/prepared" / outputs.MANIFEST).is_file()
    assert sum(result.counts.values()) == 10


# --- kill safety ----------------------------------------------------------------------------


def test_a_replaced_output_folder_keeps_dvcs_gitignore(tmp_path):
    """A step run by hand replaces its folder whole; the .gitignore DVC wrote there stays, or git
    would offer to commit the cached outputs (and `dvc repro` then refuses them)."""
    from components.core.atomic import atomic_dir

    out = tmp_path / "outputs/evaluate"
    with atomic_dir(out) as tmp:
        (tmp / "report.json").write_text("{}")
    (out / ".gitignore").write_text("/report.json\n")  # what DVC adds after its run
    with atomic_dir(out) as tmp:
        (tmp / "report.json").write_text('{"new": 1}')
    assert (out / ".gitignore").read_text() == "/report.json\n"
    assert (out / "report.json").read_text() == '{"new": 1}'


def _slow_folder(tmp_path: Path) -> Path:
    """A folder slow enough to act on mid-way: 1200 copies of a 384×384 PNG, resized to 16."""
    big = tmp_path / "big"
    gradient = np.linspace(0, 255, 384 * 384 * 3).reshape(384, 384, 3).astype(np.uint8)
    data = write_png(tmp_path / "one.png", gradient).read_bytes()
    for i in range(1200):
        (big / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        (big / "ab"[i % 2] / f"{i:04d}.png").write_bytes(data)
    return big


def test_a_killed_run_leaves_the_previous_output_intact(tmp_path):
    small = folder(tmp_path / "small", {"a": 5, "b": 5})
    out = tmp_path / "data" / "prepared"
    prepare(params_for(out, source="imagefolder", root=small, image_size=16))
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    big = _slow_folder(tmp_path)
    (tmp_path / "params.yaml").write_text(
        f"paths:\n  prepared: {out}\n"
        f"data:\n  source: imagefolder\n  root: {big}\n  image_size: 16\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cnn_pipeline", "prepare", "--params", str(tmp_path /
        "params.yaml")], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the kill takes its workers too
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            partial = [p for p in out.parent.iterdir() if p.name != out.name and p.is_dir()
                       and any(p.iterdir())]
            if partial:
                time.sleep(0.2)  # well into decoding, output half-written
                break
            time.sleep(0.005)
        assert proc.poll() is None, "prepare ended before it could be killed: use more files"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    manifest = read_manifest(out)
    assert sum(manifest["num"].values()) == 10
    for s in SPLITS:
        split = load_split(out, s)
        assert len(split.x) == len(split.y) == manifest["num"][s]

    result = prepare(params_for(out, source="imagefolder", root=big, image_size=16))
    assert sum(result.counts.values()) == 1200
    assert sorted(p.name for p in out.parent.iterdir()) == ["prepared"]  # nothing left behind


def test_a_disk_that_fills_is_an_error_naming_it_and_the_output_stays_intact(tmp_path):
    """On a small tmpfs (tests/support/disks.py): prepared once; then, with the disk nearly full,
    again at a larger size (the memory-mapped pool no longer fits: a write into its pages would be
    SIGBUS), which fails with `error: no space left on <disk>` and leaves the first output as it
    was and nothing else; with the space freed, the same command works."""
    folder(tmp_path / "raw", {"a": 10, "b": 10}, size=32)
    (tmp_path / "params.yaml").write_text(
        "paths:\n  prepared: disk/prepared\n"
        "data:\n  source: imagefolder\n  root: raw\n  image_size: 16\n")
    listing = '(cd "$DISK/prepared" && sha256sum *)'
    done = on_small_disk(f"""
        $PY -m cnn_pipeline prepare > /dev/null 2>&1
        {listing} > before.txt
        {FILL}
        truncate -s -128k "$DISK/filler"
        $PY -m cnn_pipeline prepare --set data.image_size=64 2> full.err && echo 0 > full.rc \
            || echo $? > full.rc
        {listing} > during.txt
        ls -A "$DISK" > left.txt
        rm "$DISK/filler"
        $PY -m cnn_pipeline prepare --set data.image_size=64 > after.json 2> after.err
        """, tmp_path / "disk", tmp_path, "1m")
    assert done.returncode == 0, done.stderr
    err = (tmp_path / "full.err").read_text()
    assert (tmp_path / "full.rc").read_text().strip() == "2", err
    assert err.startswith(f"error: no space left on {tmp_path / 'disk'}") and "Free space" in err
    assert "Traceback" not in err
    assert (tmp_path / "during.txt").read_text() == (tmp_path / "before.txt").read_text()
    assert (tmp_path / "left.txt").read_text().split() == ["filler", "prepared"]
    assert json.loads((tmp_path / "after.json").read_text())["files"]["prepared"] == 20


def test_a_second_prepare_into_the_same_folder_waits_for_the_first(tmp_path):
    """Two prepares of one paths.prepared at once (search workers share it): the second waits,
    saying so, and writes after the first, which is not disturbed; both succeed."""
    big = _slow_folder(tmp_path)
    out = tmp_path / "data" / "prepared"
    (tmp_path / "params.yaml").write_text(
        f"paths:\n  prepared: {out}\n"
        f"data:\n  source: imagefolder\n  root: {big}\n  image_size: 16\n")
    cmd = [sys.executable, "-m", "cnn_pipeline", "prepare"]
    first = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.monotonic() + 120
        while not list(out.parent.glob(".prepared.tmp-*")) and time.monotonic() < deadline:
            time.sleep(0.01)  # the first holds the folder once its temporary folder is there
        second = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    finally:
        said = first.communicate(timeout=600)
    assert first.returncode == 0, said[1]
    assert second.returncode == 0, second.stderr
    assert "waiting: another process is writing" in second.stderr and str(out) in second.stderr
    assert read_manifest(out)["files"]["prepared"] == 1200
    assert sorted(p.name for p in out.parent.iterdir()) == ["prepared"]  # nothing left behind


# --- the command line -------------------------------------------------------------------------


def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cnn_pipeline", "prepare", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_cli_runs_with_set_overrides(tmp_path):
    folder(tmp_path / "raw", {"a": 10, "b": 10})
    (tmp_path / "params.yaml").write_text(
        "paths:\n  prepared: out/prepared\n"
        "data:\n  source: imagefolder\n  root: raw\n  image_size: 12\n  seed: 1\n")
    proc = _cli(tmp_path, "--set", "data.seed=3", "--set", "data.resize=pad",
                "--set", "data.test_fraction=0.5", "--set", "data.val_fraction=0.2")
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    assert printed["counts"] == {"train": 8, "val": 2, "test": 10}
    assert printed["files"]["prepared"] == 20
    manifest = read_manifest(tmp_path / "out/prepared")
    assert (manifest["seed"], manifest["resize"], manifest["image_size"]) == (3, "pad", [12, 12])
    assert "prepare" in proc.stderr  # the progress bar went to stderr, not into the JSON


def test_cli_default_params_is_params_yaml_in_the_working_directory(tmp_path):
    (tmp_path / "params.yaml").write_text("paths:\n  prepared: here\n")
    proc = _cli(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert read_manifest(tmp_path / "here")["source"] == "digits"


def test_cli_user_error_exits_2_without_traceback(tmp_path):
    (tmp_path / "params.yaml").write_text(
        "data:\n  source: imagefolder\n  root: nowhere\n  image_size: 16\n")
    proc = _cli(tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "nowhere" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").rglob("*.npy"))


def test_memory_stays_flat_for_a_folder_larger_than_the_chunks(tmp_path, monkeypatch):
    """Images stream through the memory-mapped pool into the split files: the process's own
    (anonymous) memory does not grow with the folder. Chunks are made small here so that a
    folder of a few megabytes stands for one larger than RAM."""
    n, size = 1200, 48
    for i in range(n):
        write_image(tmp_path / "raw" / f"c{i % 3}" / f"{i:05d}.png", noise(size, size, seed=i))
    monkeypatch.setattr(prepare_module, "CHUNK_BYTES", 64 << 10)
    for i in range(30):  # imports and first-use allocations first, outside the measurement
        write_image(tmp_path / "warm" / f"c{i % 3}" / f"{i}.png", noise(size, size, seed=i))
    prepare(params_for(tmp_path / "warm-out", source="imagefolder", root=tmp_path / "warm",
                       image_size=size))
    peak, baseline, done = [0], _anon_kib(), threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _anon_kib())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        prepare(params_for(tmp_path / "out", source="imagefolder", root=tmp_path / "raw",
                           image_size=size))
    finally:
        done.set()
        sampler.join()
    manifest = read_manifest(tmp_path / "out")
    assert manifest["files"]["prepared"] == n
    assert sum(manifest["num"].values()) == n
    pixels_kib = n * size * size * 3 // 1024
    # The whole set is 8.1 MiB of pixels; a copy of it in memory would show as >= that much.
    assert peak[0] - baseline < pixels_kib // 4, (peak[0] - baseline, pixels_kib)


def _anon_kib() -> int:
    """This process's anonymous resident memory (not the page cache of files it maps)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    raise AssertionError("no RssAnon in /proc/self/status")
