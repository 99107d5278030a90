"""The settings: params.yaml loaded into validated models.

The file and the `section.key=value` overrides (cnn_pipeline/cli.py reads them off the command line;
the flows build them from their parameters) are validated together before any work starts: an
unknown key, a value of the wrong type or out of range fails with the key, the value and what is
allowed.

A section is one model below and one line in `Params`; `sections()` lists them for everything
else (the flows' parameters, the Kubeflow pipeline's, the command line): nothing else needs an
edit when a section is added.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from components.core.secrets import SECRET_ADVICE, no_secrets, redact, secrets_in

DEFAULT_PARAMS = "params.yaml"


class UserError(Exception):
    """Something the user can fix; the message names the thing and what to do. Its message is
    redacted (components/core/secrets.py): whatever address or setting it quotes, wherever it is
    printed or logged (the command line, Prefect's logs), carries no password, token or key."""

    def __init__(self, message: object = "", *args: object):
        super().__init__(redact(str(message)), *args)


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
    export: Path = Path("outputs/export")
    search: Path = Path("outputs/search")


# A seed goes to numpy's legacy seeding (np.random.seed, and the RandomState of Optuna's
# samplers), which takes 32 bits, to torch.manual_seed (64) and to numpy's Generator (any size):
# the narrowest rules.
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]
ClassWeight = Annotated[float, Field(gt=0.0, le=1e6, allow_inf_nan=False)]
Threshold = Annotated[float, Field(ge=0.0, le=1e6, allow_inf_nan=False)]
Share = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]

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
    seed: Seed = 0

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
    """Training-time augmentation; components/augment.py and components/training/transforms.py say
    more."""

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
    channels_last: bool | Literal["auto"] = "auto"
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
    seed: Seed = 0
    # Imbalanced classes (components/train.py, components/training/batches.py say how). A mapping's
    # keys are class names; classes it leaves out weigh 1.
    class_weights: Literal["none", "balanced"] | dict[str, ClassWeight] = "none"
    sampler: Literal["none", "balanced"] = "none"

    @field_validator("class_weights", mode="before")
    @classmethod
    def _class_names_are_text(cls, value: Any) -> Any:
        # YAML reads `{3: 2.0}` with an integer key; class names are text (digits' are "0".."9").
        return {str(k): v for k, v in value.items()} if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _check_train(self) -> Train:
        if self.class_weights == "balanced" and self.sampler == "balanced":
            raise ValueError(
                "class_weights and sampler are both balanced: each alone evens out the classes, "
                "together they favour the rare ones as much as the common ones were; set "
                "train.class_weights: none or train.sampler: none"
            )
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


class Predict(Section):
    """Scoring new images: components/predict.py, the batch-predict flow and the served model.
    They score with evaluate's batch_size, device and tta_flip."""

    top_k: int = Field(5, ge=1, le=1000)
    max_batch: int = Field(256, ge=1, le=100_000)  # served model: images per request
    max_request_mb: float = Field(32.0, gt=0.0, le=4096.0)  # served model: request body size
    # Served model: decoded megapixels of one image and of a request's images together, read from
    # the files' headers before anything is decoded. Decoding costs up to ~24 bytes a pixel and
    # ~20 MP/s here (lossless RGBA WebP): 24 takes a 6000×4000 photo and bounds a request to
    # ~0.8 GiB and ~1.5 s (bench/RESULTS.md). Above 89 MP, decode refuses an image as a bomb.
    max_image_mp: float = Field(24.0, gt=0.0, le=89.0)
    max_request_mp: float = Field(24.0, gt=0.0, le=100_000.0)
    # Drift: what batch prediction compares with the model's training and test data
    # (components/data/drift.py defines each figure; drift.json holds them with these thresholds).
    drift_channel_mean: Threshold = 0.25
    drift_channel_std: Threshold = 0.25
    drift_confidence_drop: Share = 0.1
    drift_low_confidence: Share = 0.2
    drift_class_distance: Share = 0.25
    drift_class_min_per_class: int = Field(20, ge=1, le=1_000_000)
    drift_upscaled: Share = 0.5
    drift_channel_mismatch: Share = 0.5
    fail_on_drift: bool = False


class Register(Section):
    """The registry gate and the MLflow run; components/register.py and tracking/ say more."""

    model_name: str = Field("digits-classifier", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    primary_metric: Literal["accuracy", "balanced_accuracy", "f1_macro"] = "accuracy"
    min_improvement: float = Field(0.0, ge=0.0, le=1.0)
    max_class_drop: float = Field(0.05, ge=0.0, le=1.0)
    experiment: str | None = Field(None, min_length=1, max_length=500)
    flush_timeout_s: float = Field(60.0, ge=0.0, le=3600.0)


class Export(Section):
    """The ONNX export of the registered version and its parity check; components/export.py."""

    opset: int = Field(18, ge=18, le=23)  # torch's exporter writes 18 and up
    max_abs_diff: float = Field(1e-4, ge=0.0, le=1.0)  # of any probability, ONNX vs PyTorch
    min_top1_agreement: float = Field(0.999, ge=0.0, le=1.0)  # share of test images


# A trial changes these sections; the others are the search's own (paths: where trials write;
# data: prepared once per search; evaluate, register, predict: no effect on a trial's metric).
SEARCHABLE = ("augment", "model", "train")
DISTRIBUTIONS = ("uniform", "log_uniform", "int", "log_int", "choice")
EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class Search(Section):
    """Hyperparameter search (flows/search/workers.py): `parallel` workers optimize one Optuna study
    of
    `space` until `trials` trials finished (a grid: until each of its points did once)."""

    study: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=200)
    storage: str | None = Field(None, min_length=1)  # a database URL; no password (environment)
    trials: int = Field(16, ge=1, le=100_000)
    parallel: int = Field(2, ge=1, le=1024)
    metric: Literal["val_acc", "val_loss"] = "val_acc"
    direction: Literal["maximize", "minimize"] = "maximize"
    sampler: Literal["tpe", "random", "grid"] = "tpe"
    pruner: Literal["median", "hyperband", "none"] = "median"
    startup_trials: int = Field(5, ge=0, le=100_000)
    min_epochs: int = Field(1, ge=1, le=10_000)
    seed: Seed = 0
    keep_checkpoints: bool = False
    space: dict[str, dict[str, list[Any]]] = {}  # pydantic copies it per instance

    @field_validator("space", mode="before")
    @classmethod
    def _exponent_numbers(cls, space: Any) -> Any:
        """PyYAML (YAML 1.1) reads 1e-6 as a string, wanting 1.0e-6; JSON, YAML 1.2 and every user
        mean a number. Typed settings convert it themselves; a space's values are untyped."""
        if not isinstance(space, dict):
            return space
        return {key: {kind: [float(v) if isinstance(v, str) and EXPONENT.fullmatch(v) else v
                             for v in values] if isinstance(values, list) else values
                      for kind, values in spec.items()} if isinstance(spec, dict) else spec
                for key, spec in space.items()}

    @model_validator(mode="after")
    def _check_search(self) -> Search:
        wanted = "maximize" if self.metric.endswith("acc") else "minimize"
        if self.direction != wanted:
            raise ValueError(f"search.direction = {self.direction} with search.metric = "
                             f"{self.metric}: an accuracy is maximized, a loss minimized; set "
                             f"search.direction={wanted}")
        problems = [p for key, spec in self.space.items() for p in space_problems(key, spec)]
        if self.sampler == "grid":
            problems += [f"search.space[{key!r}] = {json.dumps(spec)}: search.sampler grid takes "
                         "choices only; give {choice: [...]} or use sampler tpe or random"
                         for key, spec in self.space.items() if "choice" not in spec]
        if problems:
            raise ValueError("; ".join(problems))
        return self


def space_problems(key: str, spec: dict[str, list[Any]]) -> list[str]:
    """What is wrong with one `search.space` entry, each naming it; empty when it is good."""
    where = f"search.space[{key!r}]"
    section, _, name = key.partition(".")
    model = {"augment": Augment, "model": Model, "train": Train}.get(section)
    if model is None or name not in model.model_fields:
        known = sorted(sections()) if model is None and section not in sections() else None
        if known is not None or not name:
            return [f"{where}: not a setting (section.key, e.g. train.lr)"]
        if model is None:
            return [f"{where}: a trial cannot change {section} settings; searchable sections: "
                    f"{', '.join(SEARCHABLE)}"]
        return [f"{where}: unknown setting; {section} has {', '.join(model.model_fields)}"]
    if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        return [f"{where} = {json.dumps(spec)}: give one of {', '.join(DISTRIBUTIONS)}, e.g. "
                "{log_uniform: [0.0003, 0.01]} or {choice: [a, b]}"]
    kind, values = next(iter(spec.items()))
    if kind == "choice":
        if not values or len(set(map(json.dumps, values))) != len(values):
            return [f"{where}: choice needs one or more distinct values, got {values}"]
        candidates = values
    else:
        problem = _range_problem(kind, values)
        if problem:
            return [f"{where} = {{{kind}: {json.dumps(values)}}}: {problem}"]
        if not kind.endswith("int") and _whole_numbers(model, name):
            return [f"{where}: {key} is a whole number: use {{int: [low, high]}} or log_int"]
        candidates = values
    refused = []
    for value in candidates:
        try:
            model.model_validate({name: value})
        except ValidationError as err:
            msg = "; ".join(e["msg"] for e in err.errors(include_url=False))
            refused.append(f"{where}: {key} = {json.dumps(value)} is refused: {msg}")
    return refused[:1]


def _whole_numbers(model: type[Section], name: str) -> bool:
    """Whether the setting takes integers only (its type, without its range, refuses 0.5)."""
    try:
        TypeAdapter(model.model_fields[name].annotation).validate_python(0.5)
    except ValidationError as err:
        return any(e["type"] == "int_from_float" for e in err.errors())
    return False


def _range_problem(kind: str, values: list[Any]) -> str | None:
    if len(values) != 2 or not all(isinstance(v, int | float) and not isinstance(v, bool)
                                   for v in values):
        return "a range is two numbers [low, high]"
    low, high = values
    if kind.endswith("int") and not all(float(v).is_integer() for v in values):
        return "an integer range needs whole numbers"
    if not low < high:
        return "empty range: low must be below high (one value: {choice: [value]})"
    if kind.startswith("log") and low <= 0:
        return "a log range must be above 0 (it touches or crosses 0)"
    return None


def refuse_secrets(raw: Any, source: str = "params") -> None:
    """Raise ParamsError, before any other check, when `raw` holds a credential."""
    found = secrets_in(raw)
    if found:
        raise ParamsError(f"refused settings in {source}:\n  " + "\n  ".join(found)
                          + f"\n{SECRET_ADVICE}")


class Params(Section):
    # One line per section: sections() hands the list to the flows and the command line.
    paths: Paths = Paths()
    data: Data = Data()
    augment: Augment = Augment()
    model: Model = Model()
    train: Train = Train()
    evaluate: Evaluate = Evaluate()
    register: Register = Register()
    predict: Predict = Predict()
    export: Export = Export()
    search: Search = Search()

    # Any Params, however built, has passed this: what tracking logs from it is clean. Its errors
    # do not repeat the input, which would repeat the secret.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)
    _no_secrets = model_validator(mode="before")(no_secrets)


def sections() -> dict[str, type[Section]]:
    """The settings sections, in params.yaml's order: name -> model."""
    return {name: field.annotation for name, field in Params.model_fields.items()}


# pydantic names the branch of a union (`a | b`) in an error's location: not a key to the user.
UNION_BRANCH = re.compile(r"^(literal\[.*\]|constrained-\w+|dict\[.*\]|list\[.*\]|int|float|str"
                          r"|bool)$")


def _describe(error: dict[str, Any], raw: dict[str, Any]) -> str:
    """One line per problem: where, what was given, what is allowed."""
    loc = [str(part) for part in error["loc"] if not UNION_BRANCH.match(str(part))]
    key = ".".join(loc) or "(top level)"
    given = _shown_value(error.get("input"))
    if error["type"] == "extra_forbidden":
        section = _lookup_model(loc[:-1])
        allowed = ", ".join(section.model_fields) if section else ""
        return f"{key} = {given}: unknown key; allowed here: {allowed}"
    if error["type"] == "value_error" and len(loc) <= 1:
        # A cross-field check: its message already names the keys.
        return f"{key}: {error['msg'].removeprefix('Value error, ')}"
    return f"{key} = {given}: {error['msg']}"


def _shown_value(value: Any) -> str:
    """A refused value for the message, shortened: a number of thousands of digits (which Python
    will not even print) or a long text is not repeated whole."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"(an integer of {value.bit_length()} bits)"
    given = json.dumps(value, default=str)
    return given if len(given) <= 200 else f"{given[:100]}... ({len(given)} characters)"


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


# Bounds of what the settings' YAML may hold: params.yaml is a few kB of a few hundred values.
# YAML aliases are shared when loaded, but everything after (validation, the secrets check,
# logging) walks them as copies: a "billion laughs" of nested anchors is a few hundred bytes that
# expand to 10**9 values. The loader counts values as if every alias were copied.
MAX_YAML_BYTES = 1 << 20
MAX_YAML_VALUES = 100_000
MAX_YAML_DEPTH = 50


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader (plain data only: tags that build objects are refused), counting."""

    def __init__(self, stream: str, where: str):
        super().__init__(stream)
        self.where, self.depth, self.sizes = where, 0, {}

    def _refuse(self, what: str) -> None:
        raise ParamsError(f"{self.where}: {what}; settings are a few hundred plain values")

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            node = self.anchors.get(self.peek_event().anchor)
            if node is not None and id(node) not in self.sizes:  # its anchor is still open
                self._refuse("an alias refers to a value that holds it")
        self.depth += 1
        if self.depth > MAX_YAML_DEPTH:
            self._refuse(f"nested more than {MAX_YAML_DEPTH} levels deep")
        try:
            node = super().compose_node(parent, index)
        finally:
            self.depth -= 1
        if id(node) not in self.sizes:  # new, not an alias: its children are counted already
            children = []
            if isinstance(node, yaml.SequenceNode):
                children = node.value
            elif isinstance(node, yaml.MappingNode):
                children = [n for pair in node.value for n in pair]
            self.sizes[id(node)] = 1 + sum(self.sizes[id(child)] for child in children)
        if self.sizes[id(node)] > MAX_YAML_VALUES:
            self._refuse(f"its aliases expand to more than {MAX_YAML_VALUES} values")
        return node


def read_yaml(text: str, where: str) -> Any:
    """The one reader of settings YAML (params.yaml, --set values): plain data, bounded in size,
    depth and expansion (a ParamsError naming `where`); malformed YAML raises yaml.YAMLError."""
    if len(text) > MAX_YAML_BYTES:
        raise ParamsError(f"{where}: {len(text)} characters, over the {MAX_YAML_BYTES} a "
                          "settings file may hold")
    loader = _BoundedLoader(text, where)
    try:
        return loader.get_single_data()
    except ValueError as err:  # a number Python will not read: over 4300 digits
        raise ParamsError(f"{where}: {str(err).split(';')[0]}") from None
    finally:
        loader.dispose()


def _parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value`, or a whole section as one mapping, `section={key: value, ...}` (its
    keys left out take their defaults; how the Kubeflow pipeline passes a section parameter)."""
    key, sep, value = text.partition("=")
    usage = (f"--set {text!r}: expected section.key=value, e.g. train.epochs=5, "
             "or a whole section, section={key: value, ...}")
    if not sep or not key.strip():
        raise ParamsError(usage)
    try:
        parsed = read_yaml(value, f"--set {key.strip()}") if value.strip() else None
    except yaml.YAMLError:
        parsed = value  # not YAML: let validation judge it as a string
    if "." not in key and not isinstance(parsed, dict):
        raise ParamsError(usage)
    return key.strip().split("."), parsed


def load_params(path: str | Path = DEFAULT_PARAMS, overrides: list[str] = ()) -> Params:
    """Read `path`, apply `section.key=value` overrides, validate everything at once."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: settings file not found; pass --params FILE or create {path}")
    try:
        raw = read_yaml(path.read_text(encoding="utf-8"), str(path)) or {}
    except UnicodeDecodeError as err:
        raise ParamsError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason}); save the "
                          "settings file as UTF-8") from None
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
    shown = " ".join(o if len(o) <= 200 else f"{o[:100]}..." for o in overrides)
    source = str(path) + (f" with --set {shown}" if overrides else "")
    return validate(raw, source=source)


def validate(raw: dict[str, Any], source: str = "params") -> Params:
    refuse_secrets(raw, source)
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        lines = list(dict.fromkeys(_describe(e, raw) for e in err.errors(include_url=False)))
        raise ParamsError(f"invalid settings in {source}:\n  " + "\n  ".join(lines)) from None


def flatten(params: Params) -> dict[str, Any]:
    """`section.key: value` pairs, e.g. for experiment trackers."""
    out: dict[str, Any] = {}
    for section, values in params.model_dump(mode="json").items():
        for key, value in values.items():
            out[f"{section}.{key}"] = value
    return out
