"""The tutorials' four CNNs, registered with timm, and `create_model` for any model by name.

The built-ins `simple_cnn`, `lenet5`, `cifar_cnn` and `resnet_cifar` are in timm's registry, so
`timm.create_model("lenet5", num_classes=10, in_chans=1)` works like it does for `resnet18`. They
follow timm's conventions: `pretrained_cfg` (input size, mean/std, classifier name),
`forward_features`/`forward_head`, `get_classifier()`/`reset_classifier(n)`.

Importing this module does not import timm: timm imports torchvision's models and ops with it,
seconds that a step training or scoring a built-in never uses. `create_model` builds a built-in
here, with the arguments timm's `create_model` would pass it (the same modules, drawing the same
random numbers); timm is imported for timm models only (and for resnet_cifar, whose blocks are
timm's BasicBlock). The built-ins enter timm's registry when timm is imported, whoever imports
it: at once when it already is, else right after its own import (`_TimmHook`, a post-import hook
on the import system's meta path).

The train step calls `create_model(name, num_classes=, in_chans=, img_size=)` with the prepared
data's shape, `replace_head` when a checkpoint's classes differ, and `head_parameters` to train only
the head while the backbone is frozen. Reads and writes no files, except that `pretrained=True`
for a timm model reads weights from the Hugging Face cache (or downloads them when online).

    python -c "import components.training.models, timm; print(timm.create_model('resnet_cifar'))"
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.abc
import importlib.util
import sys
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from components.core.params import UserError

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def _cfg(input_size, mean, std, **kwargs):
    # No url/hf_hub_id: timm then knows there are no pretrained weights for these.
    return dict(input_size=input_size, mean=mean, std=std, num_classes=10, classifier="fc",
                interpolation="bilinear", crop_pct=1.0, **{"first_conv": "conv1", **kwargs})


# Read by timm's register_model (from this module, by name). fixed_input_size is timm's flag for
# "the constructor takes img_size": true where a dense layer sees the whole map.
default_cfgs = {
    "simple_cnn": _cfg((1, 28, 28), MNIST_MEAN, MNIST_STD, fixed_input_size=True),
    "lenet5": _cfg((1, 32, 32), MNIST_MEAN, MNIST_STD, fixed_input_size=True),
    "cifar_cnn": _cfg((3, 32, 32), CIFAR_MEAN, CIFAR_STD, first_conv="stages.0.0"),
    "resnet_cifar": _cfg((3, 32, 32), CIFAR_MEAN, CIFAR_STD),
}
BUILTINS = tuple(default_cfgs)


def _side(name: str, img_size, min_side: int) -> tuple[int, int]:
    h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if min(h, w) < min_side:
        others = ", ".join(n for n in BUILTINS if n != name)
        raise UserError(
            f"model {name} needs images of at least {min_side}x{min_side} px, got {h}x{w}; "
            f"set data.image_size >= {min_side} or use another model ({others})"
        )
    return h, w


class _Classifier(nn.Module):
    """timm's head API for models whose head is one Linear `fc` on `num_features` inputs."""

    num_classes: int
    num_features: int

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        # global_pool is accepted for timm's signature; these models have one fixed pooling.
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class SimpleCNN(_Classifier):
    """Flax MNIST tutorial: conv32-pool-conv64-pool-dense128-dense; same ops and parameter count
    as ../shared/bench/reference_model.py, so benchmarks against it compare like with like."""

    def __init__(self, num_classes=10, in_chans=1, img_size=28):
        super().__init__()
        h, w = _side("simple_cnn", img_size, 4)
        self.num_classes, self.num_features = num_classes, 128
        self.conv1 = nn.Conv2d(in_chans, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * (h // 4) * (w // 4), 128)
        self.reset_classifier(num_classes)

    def forward_features(self, x):
        # The tutorial's relu-then-pool, in the other order: ReLU and max pooling commute
        # (values and gradients), and after the pool the ReLU and its backward touch a quarter
        # of the values. Measured here: a training step 16% faster on a CPU.
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        return F.relu(F.max_pool2d(self.conv2(x), 2))

    def forward_head(self, x, pre_logits: bool = False):
        x = F.relu(self.fc1(x.flatten(1)))
        return x if pre_logits else self.fc(x)


class LeNet5(_Classifier):
    """LeCun et al. 1998: 5x5 convs, tanh, average pooling, dense 120-84. The paper's 28 px digits
    sat in a 32 px field; padding does the same, so 28 and 32 px inputs both give 5x5 maps."""

    def __init__(self, num_classes=10, in_chans=1, img_size=32):
        super().__init__()
        # Below 28 px the input would be mostly padding: not the model the tutorial describes.
        h, w = _side("lenet5", img_size, 28)
        pad = (max(0, 33 - h) // 2, max(0, 33 - w) // 2)
        h, w = ((h + 2 * pad[0] - 4) // 2 - 4) // 2, ((w + 2 * pad[1] - 4) // 2 - 4) // 2
        self.num_classes, self.num_features = num_classes, 84
        self.conv1 = nn.Conv2d(in_chans, 6, 5, padding=pad)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * h * w, 120)  # the paper's C5: a 5x5 conv over a 5x5 map
        self.fc2 = nn.Linear(120, 84)
        self.reset_classifier(num_classes)

    def forward_features(self, x):
        x = F.avg_pool2d(torch.tanh(self.conv1(x)), 2)
        return F.avg_pool2d(torch.tanh(self.conv2(x)), 2)

    def forward_head(self, x, pre_logits: bool = False):
        x = torch.tanh(self.fc2(torch.tanh(self.fc1(x.flatten(1)))))
        return x if pre_logits else self.fc(x)


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    # No conv bias: the batch norm right after it has its own.
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True)]


class CifarCNN(_Classifier):
    """The Keras CIFAR-10 tutorial's VGG-style net: three blocks of (conv-bn-relu) x2 + max pool,
    then global average pooling (any input >= 8 px) and dropout before the linear head."""

    def __init__(self, num_classes=10, in_chans=3, img_size=32, widths=(32, 64, 128),
                 drop_rate=0.2):
        super().__init__()
        _side("cifar_cnn", img_size, 2 ** len(widths))  # each block halves the map
        self.num_classes, self.num_features = num_classes, widths[-1]
        blocks, cin = [], in_chans
        for c in widths:
            # conv-bn-relu twice, then max pool; the last ReLU after the pool (they commute, and
            # the ReLU then sees a quarter of the values, as in SimpleCNN).
            *second, relu = _conv_bn_relu(c, c)
            blocks.append(nn.Sequential(*_conv_bn_relu(cin, c), *second, nn.MaxPool2d(2), relu))
            cin = c
        self.stages = nn.Sequential(*blocks)
        self.head_drop = nn.Dropout(drop_rate)
        self.reset_classifier(num_classes)

    def forward_features(self, x):
        return self.stages(x)

    def forward_head(self, x, pre_logits: bool = False):
        x = self.head_drop(x.mean((2, 3)))
        return x if pre_logits else self.fc(x)


def _stage(cin: int, cout: int, n: int, stride: int) -> nn.Sequential:
    from timm.models.resnet import BasicBlock

    down = None
    if stride != 1 or cin != cout:
        down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
    blocks = [BasicBlock(cin, cout, stride, down)]
    blocks += [BasicBlock(cout, cout) for _ in range(n - 1)]
    return nn.Sequential(*blocks)


class ResNetCifar(_Classifier):
    """He et al. 2015, section 4.2: a 3x3 stem and three stages of basic blocks at 16/32/64
    channels, 32x32 maps down to 8x8, global average pooling. depth = 6n + 2 (20, 32, 44, 56,
    110). Shortcuts that change shape are 1x1 conv + bn (the paper's option B)."""

    def __init__(self, num_classes=10, in_chans=3, img_size=32, depth=20, widths=(16, 32, 64),
                 drop_rate=0.0):
        super().__init__()
        _side("resnet_cifar", img_size, 2 ** (len(widths) - 1))
        if depth < 8 or (depth - 2) % 6:
            raise UserError(f"resnet_cifar depth must be 6n + 2 (20, 32, 44, 56, 110), got {depth}")
        n = (depth - 2) // 6
        self.num_classes, self.num_features = num_classes, widths[-1]
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        # The first stage keeps the stem's resolution; each later one halves it in its first block.
        stages, cin = [], widths[0]
        for i, c in enumerate(widths):
            stages.append(_stage(cin, c, n, stride=1 if i == 0 else 2))
            cin = c
        self.stages = nn.Sequential(*stages)
        self.head_drop = nn.Dropout(drop_rate)
        self.reset_classifier(num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        # Each residual branch starts at zero, so the net starts as a shallow one (Goyal et al.
        # 2017): steadier early training, which short runs on small data need most.
        for m in self.modules():
            if hasattr(m, "zero_init_last"):  # timm's BasicBlock
                m.zero_init_last()

    def forward_features(self, x):
        return self.stages(F.relu(self.bn1(self.conv1(x))))

    def forward_head(self, x, pre_logits: bool = False):
        x = self.head_drop(x.mean((2, 3)))
        return x if pre_logits else self.fc(x)


def _build(cls, name: str, pretrained: bool, **kwargs) -> nn.Module:
    from timm.models import build_model_with_cfg

    _refuse_pretrained(name, pretrained)
    return build_model_with_cfg(cls, name, False, **kwargs)


# timm's entry points (registered by _register_with_timm): timm.create_model calls them.
def simple_cnn(pretrained: bool = False, **kwargs) -> SimpleCNN:
    return _build(SimpleCNN, "simple_cnn", pretrained, **kwargs)


def lenet5(pretrained: bool = False, **kwargs) -> LeNet5:
    return _build(LeNet5, "lenet5", pretrained, **kwargs)


def cifar_cnn(pretrained: bool = False, **kwargs) -> CifarCNN:
    return _build(CifarCNN, "cifar_cnn", pretrained, **kwargs)


def resnet_cifar(pretrained: bool = False, **kwargs) -> ResNetCifar:
    return _build(ResNetCifar, "resnet_cifar", pretrained, **kwargs)


CLASSES = {"simple_cnn": SimpleCNN, "lenet5": LeNet5, "cifar_cnn": CifarCNN,
           "resnet_cifar": ResNetCifar}


def _refuse_pretrained(name: str, pretrained: bool) -> None:
    if pretrained:
        raise UserError(
            f"model {name} has no pretrained weights: it is one of the tutorial models built here. "
            "Set model.pretrained: false to train it from scratch, or model.checkpoint to start "
            "from weights you trained before"
        )


def _builtin(name: str, pretrained: bool, **kwargs) -> nn.Module:
    """A built-in as timm's create_model makes it: unset (None) arguments dropped, the class
    called with the rest, its cfg attached (timm's adds its defaults for the keys not set)."""
    _refuse_pretrained(name, pretrained)
    model = CLASSES[name](**{k: v for k, v in kwargs.items() if v is not None})
    model.pretrained_cfg = model.default_cfg = {"architecture": name, **default_cfgs[name]}
    return model


def _register_with_timm() -> None:
    from timm.models import is_model, model_entrypoint, register_model

    for fn in (simple_cnn, lenet5, cifar_cnn, resnet_cifar):
        # Once: a second registration would make timm warn that it overwrites one.
        if not is_model(fn.__name__) or model_entrypoint(fn.__name__) is not fn:
            register_model(fn)


class _TimmHook(importlib.abc.MetaPathFinder):
    """Registers the built-ins right after timm is imported. Python has no post-import hook; a
    finder on sys.meta_path (the import system's documented extension point) hands back timm's
    own spec with its loader wrapped: timm's runs, then the registration. A mere look-up
    (importlib.util.find_spec("timm"), which some libraries do to see what is installed) loads
    nothing, so the hook stays until timm is really imported."""

    searching = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "timm" or self.searching:
            return None
        self.searching = True  # the finders after this one, as if it were not there
        try:
            spec = importlib.util.find_spec("timm")
        finally:
            self.searching = False
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenRegister(spec.loader, self)
        return spec


class _ThenRegister(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader, hook: _TimmHook):
        self.loader, self.hook = loader, hook

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = module.__spec__.loader = self.loader  # timm's own, from now on
        self.loader.exec_module(module)
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self.hook)
        _register_with_timm()


if "timm" in sys.modules:
    _register_with_timm()
elif not any(type(f).__name__ == _TimmHook.__name__ for f in sys.meta_path):  # once, reloads too
    sys.meta_path.insert(0, _TimmHook())


def create_model(name: str, *, num_classes: int, in_chans: int, img_size: int | tuple[int, int],
                 pretrained: bool = False, **kwargs) -> nn.Module:
    """A built-in or any timm model by name, for `in_chans` x `img_size` inputs and `num_classes`.

    timm models get `img_size` only where their pretrained_cfg says they take it (ViTs and other
    fixed-size models); convolutional ones pool globally and take any size.
    """
    if name in BUILTINS:
        # pretrained=True raises a UserError here: there are no weights for these.
        return _builtin(name, pretrained, num_classes=num_classes, in_chans=in_chans,
                        img_size=img_size, **kwargs)
    import timm
    from timm.models import get_pretrained_cfg

    if problem := known_model(name):  # hf-hub:/local-dir: names go to timm as they are
        raise UserError(problem)
    cfg = get_pretrained_cfg(name)
    if cfg is not None and cfg.fixed_input_size:
        kwargs.setdefault("img_size", img_size)
    if pretrained and ":" not in name:
        kwargs.setdefault("pretrained_cfg_overlay", _pretrained_source(name, cfg))
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes,
                                 in_chans=in_chans, **kwargs)
    except OSError as err:  # a download that failed after all (the network went away)
        raise UserError(f"could not get the pretrained weights of {name}: {err}. "
                        f"{_HOW_TO_SUPPLY}") from err


_HOW_TO_SUPPLY = (
    "To use pretrained weights offline, either set model.checkpoint to a local checkpoint file, "
    "or fill the Hugging Face cache on a machine that is online (python -c \"import timm; "
    "timm.create_model('NAME', pretrained=True)\"), copy it to HF_HOME (default ~/.cache/"
    "huggingface) here and set HF_HUB_OFFLINE=1; or set model.pretrained: false"
)


def _pretrained_source(name: str, cfg) -> dict:
    """pretrained_cfg_overlay that loads cached weights without touching the network.

    timm fetches weights with huggingface_hub, which retries an unreachable hub for about a minute
    per file; so look in the cache first, then ask the hub once with a short timeout.
    """
    import huggingface_hub
    import timm

    if cfg is None or not cfg.has_weights:
        tags = ", ".join(timm.list_pretrained(f"{name.split('.')[0]}.*")[:5]) or "none"
        raise UserError(f"timm has no pretrained weights for {name} (weights exist for: {tags}); "
                        "set model.pretrained: false or pick a tag with weights")
    if cfg.file:
        return {}
    how = _HOW_TO_SUPPLY.replace("NAME", name)
    if cfg.hf_hub_id:
        repo, _, revision = cfg.hf_hub_id.partition("@")
        names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else [
            "model.safetensors", "pytorch_model.bin"]
        for filename in names:
            path = huggingface_hub.try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(path, str):
                return {"file": path}
        if huggingface_hub.constants.HF_HUB_OFFLINE:
            raise UserError(f"the pretrained weights of {name} ({repo}) are not in the Hugging "
                            f"Face cache and HF_HUB_OFFLINE is set. {how}")
        try:  # one request, no retries: offline fails here in milliseconds, not minutes
            url = huggingface_hub.hf_hub_url(repo, names[0], revision=revision or None)
            huggingface_hub.get_hf_file_metadata(url, timeout=10)
        except Exception as err:  # whatever the failure, it means "cannot download now"
            raise UserError(f"the pretrained weights of {name} ({repo}) are not in the Hugging "
                            f"Face cache and the hub cannot be reached ({err}). {how}") from err
        return {}
    cached = Path(torch.hub.get_dir(), "checkpoints", Path(urlparse(cfg.url).path).name)
    return {"file": str(cached)} if cached.is_file() else {}


def known_model(name: str) -> str | None:
    """None when create_model knows `name` (a built-in, a timm model, an hf-hub:/local-dir:
    name); else what is wrong, with the names it may have meant."""
    import timm

    return None if name in BUILTINS or ":" in name or timm.is_model(name) else _unknown_model(name)


def _unknown_model(name: str) -> str:
    import timm  # the registry holds the built-ins too: importing timm registered them

    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return (f"unknown model {name!r}. Built in: {', '.join(BUILTINS)}; any timm model name works "
            f"too (list them with timm.list_models('*{name}*')).{hint}")


def replace_head(model: nn.Module, num_classes: int) -> bool:
    """Give the model a new, randomly initialised head when the class count differs (transfer
    learning from a checkpoint trained on other classes). Returns whether it replaced it."""
    if model.num_classes == num_classes:
        return False
    model.reset_classifier(num_classes)
    return True


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The classifier's parameters: what trains while the backbone is frozen."""
    heads = model.get_classifier()
    # A few timm models (distilled DeiT) return two heads.
    heads = heads if isinstance(heads, (tuple, list)) else (heads,)
    return [p for head in heads for p in head.parameters()]
