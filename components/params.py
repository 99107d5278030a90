"""The settings: params.yaml loaded into validated models, and the command line every step shares.

Every step runs as `python -m components.<step> [--params FILE] [--set section.key=value ...]`.
The file and the overrides are validated together before any work starts: an unknown key, a value
of the wrong type or out of range fails with the key, the value and what is allowed.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from components.credentials import SECRET_ADVICE, no_secrets, secrets_in

DEFAULT_PARAMS = "params.yaml"


class UserError(Exception):
    """Something the user can fix; the message names the thing and what to do."""


class ParamsError(UserError):
    """A settings file or override that does not validate."""


# `register` is a step's name; pydantic warns that it shadows ABCMeta.register, which instances
# never reach.
warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)


class Section(BaseModel):
    # Unknown keys are typos until proven otherwise; frozen so a step cannot change its settings.
    model_config = ConfigDict(extra="forbid", frozen=True)


class Paths(Section):
    prepared: Path = Path("data/prepared")
    augment: Path = Path("outputs/augment")
    train: Path = Path("outputs/train")
    evaluate: Path = Path("outputs/evaluate")
    register: Path = Path("outputs/register")
    predictions: Path = Path("outputs/predictions")


Source = Literal["digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "imagefolder"]


class Data(Section):
    source: Source = "digits"
    root: Path = Path("data/raw")
    download: bool = True
    image_size: int | None = Field(None, ge=8, le=1024)
    channels: Literal[1, 3] | None = None
    resize: Literal["crop", "pad", "stretch"] = "crop"
    min_side: int = Field(8, ge=1, le=4096)
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    resplit: bool = False
    drop_duplicates: bool = False
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> Data:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction:g} "
                "leaves nothing to train on; their sum must be below 1"
            )
        if self.source == "imagefolder" and self.image_size is None:
            raise ValueError(
                "image_size is required for source imagefolder (its images have many sizes); "
                "set data.image_size, e.g. 64"
            )
        return self


class Augment(Section):
    """Training-time augmentation; components/augment.py and components/transforms.py say more."""

    preset: Literal["none", "basic", "standard", "randaugment", "trivialaugment", "autoaugment"] = (
        "basic"
    )
    flip: bool = False
    crop_padding: float = Field(0.125, ge=0.0, le=0.5)  # of the side; >0 means at least 1 px
    resized_crop_scale: tuple[float, float] = (0.35, 1.0)
    color_jitter: float = Field(0.4, ge=0.0, le=1.0)
    randaugment_ops: int = Field(2, ge=1, le=10)
    randaugment_magnitude: int = Field(9, ge=0, le=30)
    autoaugment_policy: Literal["cifar10", "svhn", "imagenet"] = "cifar10"
    erasing: float = Field(0.0, ge=0.0, le=1.0)
    mixup_alpha: float = Field(0.0, ge=0.0, le=10.0)
    cutmix_alpha: float = Field(0.0, ge=0.0, le=10.0)
    preview_images: int = Field(10, ge=1, le=64)
    preview_views: int = Field(6, ge=1, le=16)

    @model_validator(mode="after")
    def _check_scale(self) -> Augment:
        low, high = self.resized_crop_scale
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(
                f"resized_crop_scale = [{low:g}, {high:g}]: need 0 < low <= high <= 1 "
                "(fractions of the image area kept by the crop)"
            )
        return self


class Model(Section):
    name: str = Field("simple_cnn", min_length=1)
    pretrained: bool = False
    checkpoint: str | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _check_model(self) -> Model:
        if self.pretrained and self.checkpoint:
            raise ValueError(
                "pretrained and checkpoint are both set: the weights would come from two places; "
                "set model.pretrained: false to start from the checkpoint"
            )
        return self


class Train(Section):
    epochs: int = Field(30, ge=1, le=10_000)
    batch_size: int = Field(64, ge=1, le=65_536)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(3e-3, gt=0.0, le=1e6)
    weight_decay: float = Field(0.05, ge=0.0, le=1.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    warmup_epochs: float = Field(1.0, ge=0.0, le=1000.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    grad_clip: float = Field(0.0, ge=0.0, le=1e6)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: bool = False
    compile: bool = False
    cudnn_benchmark: bool = False
    ema: float = Field(0.0, ge=0.0, lt=1.0)
    early_stopping_patience: int = Field(0, ge=0, le=10_000)
    early_stopping_metric: Literal["val_acc", "val_loss"] = "val_loss"
    freeze_epochs: int = Field(0, ge=0, le=10_000)
    devices: Annotated[int, Field(ge=1, le=1024)] | Literal["auto"] = 1
    device: Literal["auto", "cpu", "cuda"] = "auto"
    resume: Literal["auto", "never"] = "auto"
    max_bad_steps: int = Field(10, ge=1, le=1_000_000)
    device_data_mb: int = Field(4096, ge=0, le=10_000_000)
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _check_train(self) -> Train:
        if self.freeze_epochs > self.epochs:
            raise ValueError(
                f"freeze_epochs = {self.freeze_epochs} is more than epochs = {self.epochs}"
            )
        if self.devices != "auto" and self.batch_size % self.devices:
            # batch_size is the global batch: each of the devices takes an equal share of it.
            raise ValueError(
                f"batch_size = {self.batch_size} (the global batch) does not split evenly over "
                f"devices = {self.devices}; set train.batch_size to a multiple of train.devices"
            )
        return self


class Evaluate(Section):
    """Scoring the test split; components/evaluate.py says more. Batch prediction
    (components/predict.py) scores with the same batch_size, device and tta_flip."""

    mistakes: int = Field(16, ge=0, le=64)
    calibration_bins: int = Field(15, ge=2, le=100)
    tta_flip: bool = False
    batch_size: int = Field(512, ge=1, le=65_536)
    device: Literal["auto", "cpu", "cuda"] = "auto"


class Register(Section):
    """The registry gate and the MLflow run; components/register.py and tracking.py say more."""

    model_name: str = Field("digits-classifier", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    primary_metric: Literal["accuracy", "balanced_accuracy", "f1_macro"] = "accuracy"
    min_improvement: float = Field(0.0, ge=0.0, le=1.0)
    max_class_drop: float = Field(0.05, ge=0.0, le=1.0)
    experiment: str | None = Field(None, min_length=1, max_length=500)
    flush_timeout_s: float = Field(60.0, ge=0.0, le=3600.0)


def refuse_secrets(raw: Any, source: str = "params") -> None:
    """Raise ParamsError, before any other check, when `raw` holds a credential."""
    found = secrets_in(raw)
    if found:
        raise ParamsError(f"refused settings in {source}:\n  " + "\n  ".join(found)
                          + f"\n{SECRET_ADVICE}")


class Params(Section):
    paths: Paths = Paths()
    data: Data = Data()
    augment: Augment = Augment()
    model: Model = Model()
    train: Train = Train()
    evaluate: Evaluate = Evaluate()
    register: Register = Register()

    # Any Params, however built, has passed this: what tracking logs from it is clean. Its errors
    # do not repeat the input, which would repeat the secret.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)
    _no_secrets = model_validator(mode="before")(no_secrets)


def _describe(error: dict[str, Any], raw: dict[str, Any]) -> str:
    """One line per problem: where, what was given, what is allowed."""
    loc = [str(part) for part in error["loc"]]
    key = ".".join(loc) or "(top level)"
    given = json.dumps(error.get("input"), default=str)
    if error["type"] == "extra_forbidden":
        section = _lookup_model(loc[:-1])
        allowed = ", ".join(section.model_fields) if section else ""
        return f"{key} = {given}: unknown key; allowed here: {allowed}"
    if error["type"] == "value_error" and len(loc) <= 1:
        # A cross-field check: its message already names the keys.
        return f"{key}: {error['msg'].removeprefix('Value error, ')}"
    return f"{key} = {given}: {error['msg']}"


def _lookup_model(loc: list[str]) -> type[BaseModel] | None:
    model: type[BaseModel] = Params
    for part in loc:
        field = model.model_fields.get(part)
        if field is None or not isinstance(field.annotation, type):
            return None
        if not issubclass(field.annotation, BaseModel):
            return None
        model = field.annotation
    return model


def _parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or "." not in key:
        raise ParamsError(f"--set {text!r}: expected section.key=value, e.g. train.epochs=5")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value  # not YAML: let validation judge it as a string
    return key.strip().split("."), parsed


def load_params(path: str | Path = DEFAULT_PARAMS, overrides: list[str] = ()) -> Params:
    """Read `path`, apply `section.key=value` overrides, validate everything at once."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: settings file not found; pass --params FILE or create {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections, found {type(raw).__name__}")
    for text in overrides:
        keys, value = _parse_override(text)
        node = raw
        for part in keys[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ParamsError(f"--set {text!r}: {part} is not a section")
        node[keys[-1]] = value
    refuse_secrets(raw, str(path) + (" and --set" if overrides else ""))  # before any echo
    source = str(path) + (f" with --set {' '.join(overrides)}" if overrides else "")
    return validate(raw, source=source)


def validate(raw: dict[str, Any], source: str = "params") -> Params:
    refuse_secrets(raw, source)
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        lines = [_describe(e, raw) for e in err.errors(include_url=False)]
        raise ParamsError(f"invalid settings in {source}:\n  " + "\n  ".join(lines)) from None


def flatten(params: Params) -> dict[str, Any]:
    """`section.key: value` pairs, e.g. for experiment trackers."""
    out: dict[str, Any] = {}
    for section, values in params.model_dump(mode="json").items():
        for key, value in values.items():
            out[f"{section}.{key}"] = value
    return out


def run_step(step: Callable[[Params], Any], argv: list[str] | None = None) -> None:
    """The shared `main()` of every step: parse the command line, validate, run, print a summary."""
    parser = argparse.ArgumentParser(prog=f"python -m {step.__module__}", description=step.__doc__)
    parser.add_argument("--params", default=DEFAULT_PARAMS, help="settings file (params.yaml)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one setting; repeatable; validated like the file",
    )
    args = parser.parse_args(argv)
    try:
        result = step(load_params(args.params, args.set))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if is_dataclass(result):
        result = asdict(result)
    print(json.dumps(result, indent=2, default=str))
