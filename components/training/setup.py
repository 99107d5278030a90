"""setup: how a training run is set up, apart from the loop that runs it (components/train.py).

The device and precision a run uses, deterministic kernels and memory reuse on CPU, seeding,
the model for the prepared data (new, pretrained, or from a model file), the optimizer with its
parameter groups, the learning-rate schedule, and torch.compile. Each reads the `model` or
`train` settings.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import random
from pathlib import Path

import numpy as np
import torch

from components.core.params import UserError
from components.data.dataset import class_names
from components.training import checkpoint as ckpt
from components.training import models


def runtime(cfg) -> tuple[torch.device, str]:
    """The device (train.device) and precision (train.precision, `auto` resolved) to train with."""
    cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not cuda:
        raise UserError("train.device = cuda but no CUDA GPU is visible; set train.device=auto")
    device = torch.device("cuda" if cuda and cfg.device != "cpu" else "cpu")
    precision = cfg.precision
    if precision == "auto":
        precision = auto_precision(device, cuda and torch.cuda.is_bf16_supported(),
                                   cpu_features())
    if precision == "fp16" and device.type != "cuda":
        raise UserError("train.precision = fp16 needs a CUDA GPU; use bf16 or fp32 on a CPU")
    return device, precision


# CPU features that compute bf16 in hardware, as the kernel names them in /proc/cpuinfo: x86's
# AVX-512 BF16 and AMX, Arm's BF16 extension.
NATIVE_BF16 = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def auto_precision(device: torch.device, gpu_bf16: bool, features: frozenset[str]) -> str:
    """train.precision: auto. GPUs: bf16 where supported, else fp16 with a grad scaler. CPUs: bf16
    only where the CPU computes it natively; elsewhere autocast emulates it, many times slower
    than fp32 (simple_cnn on MNIST, an AMD EPYC without it: 217 against 2,665 images/s)."""
    if device.type == "cuda":
        return "bf16" if gpu_bf16 else "fp16"
    return "bf16" if features & NATIVE_BF16 else "fp32"


def cpu_features(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags as the kernel reports them (x86 `flags`, Arm `Features`); empty
    where there is no such file (macOS, Windows): auto then stays with fp32."""
    try:
        text = Path(cpuinfo).read_text(encoding="ascii", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def memory_format(channels_last: bool | str, precision: str) -> torch.memory_format:
    """train.channels_last; `auto`: channels_last with bf16 or fp16, whose fast convolutions
    (tensor cores, oneDNN's AMX and AVX-512 BF16 kernels) take NHWC, contiguous with fp32."""
    if channels_last == "auto":
        channels_last = precision in ("bf16", "fp16")
    return torch.channels_last if channels_last else torch.contiguous_format


@contextlib.contextmanager
def deterministic(device: torch.device, cudnn_benchmark: bool = False):
    """Deterministic kernels on CPU (where they cost nothing); TF32 and, when asked
    (train.cudnn_benchmark), cuDNN autotuning on GPUs.

    Autotuning times every candidate kernel for each new input shape, in the first epoch: on an
    H200 that made epoch 1 of simple_cnn on MNIST 0.7-2.2 s longer than raw_loop.py's, and of
    resnet_cifar 5-13 s longer than its second (bench/RESULTS.md, "GPU"). Small models are
    bound by kernel launches, where the kernel chosen matters little; long runs of large ones
    can win it back."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_benchmark = torch.backends.cudnn.benchmark
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.backends.cudnn.benchmark = cudnn_benchmark
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.backends.cudnn.benchmark = was_benchmark


# mallopt's parameters, from glibc's malloc.h.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> None:
    """Let the C library keep freed memory for reuse instead of handing it back to the system.

    A CPU training step frees and allocates the same activation buffers of a few megabytes each
    step. By default glibc maps blocks that large afresh, or trims them off its heap, and every
    new page faults in zeroed: 7,300 page faults a step for simple_cnn on MNIST, a third of the
    step's time. Kept, the same pages serve the next step. Process-wide; what stays mapped is
    at most the process's peak use. Nothing happens where the C library has no mallopt."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, Windows)
        return
    mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's largest: smaller blocks come from the heap
    mallopt(M_TRIM_THRESHOLD, 1 << 30)


def seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def compiled(model: torch.nn.Module):
    # Where compiling fails (no C++ compiler, an unsupported op), dynamo falls back to eager
    # with a warning instead of stopping the run: compile is only ever a speed-up here.
    torch._dynamo.config.suppress_errors = True
    return torch.compile(model)


def create_model(mcfg, manifest) -> tuple[torch.nn.Module, dict]:
    """The model for this data: new, pretrained, or from a model file (new head if need be)."""
    h, w = manifest["image_size"]
    kwargs = {"num_classes": len(manifest["classes"]), "in_chans": manifest["channels"],
              "img_size": h if h == w else (h, w)}
    if mcfg.checkpoint:
        model = ckpt.init_from(mcfg.checkpoint, mcfg.name, kwargs, class_names(manifest))
    else:
        model = models.create_model(mcfg.name, pretrained=mcfg.pretrained, **kwargs)
    return model, {"name": mcfg.name, "kwargs": kwargs}


def optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    # No weight decay on biases and norm weights (the 1-d parameters): it only shrinks them.
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, fused=True)
    opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                          nesterov=cfg.momentum > 0, fused=True)
    if cfg.momentum > 0:
        # Fused SGD allocates a momentum buffer uninitialised and fills it on the first step; a
        # skipped first step would leave garbage. Zeros give the same first step.
        for p in params:
            opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
    return opt


def learning_rate(cfg, t: float) -> float:
    """Linear warmup for warmup_epochs, then cosine decay to zero at the end; t in epochs."""
    warm = min(cfg.warmup_epochs, cfg.epochs)
    if t < warm:
        return cfg.lr * t / warm
    if warm >= cfg.epochs:
        return cfg.lr
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * (t - warm) / (cfg.epochs - warm)))
