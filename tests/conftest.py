"""What tests share: fixtures for prepared digits, the Prefect + MLflow stack with the project
deployed, a digits model registered there, and tiny models that misbehave on purpose.

Test modules never import each other; what two of them need is here or in a helper module
(tests/support/projects.py, servers.py, formats.py, postgres.py).

The fake models are registered with timm when pytest loads this file, so train creates them by
name like any other model; a torchrun worker imports this module for them (ddp names the module
that registered a model), and so does a subprocess that needs them (`import tests.conftest`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from timm.models import register_model

from components.core.params import Params
from tests.support.projects import BIN, Stack, committed_copy, tracking_into

FAULT_ENV = "TEST_DDP_FAULT"  # error | oom | hang: what fake_fails_on_rank_1 does on rank 1


# --- tiny models, some failing on purpose ------------------------------------------------------


class Tiny(nn.Module):
    """A convolution and a linear head: trains in milliseconds; counts its training calls."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, **_):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)
        self.calls = 0

    def forward(self, x):
        self.calls += self.training
        return self.fc(self.conv(x).relu().mean((2, 3)))


class NaNAfter(Tiny):
    def forward(self, x):
        out = super().forward(x)
        return out * float("nan") if self.calls > 25 else out


class NaNEvery4th(Tiny):
    def forward(self, x):
        out = super().forward(x)
        return out * float("nan") if self.calls % 4 == 0 else out


class OutOfMemoryAlways(Tiny):
    def forward(self, x):
        raise torch.OutOfMemoryError("simulated: nothing fits")


class OutOfMemoryAbove16(Tiny):
    def forward(self, x):
        if x.shape[0] > 16:
            raise torch.OutOfMemoryError(f"simulated: batch of {x.shape[0]} does not fit")
        return super().forward(x)


class FailsOnRank1(Tiny):
    def forward(self, x):
        out = super().forward(x)  # counts the training calls
        fault = os.environ.get(FAULT_ENV)
        if fault and os.environ.get("RANK") == "1" and self.calls > 25:
            if fault == "oom":
                raise torch.OutOfMemoryError("simulated: the batch does not fit")
            if fault == "hang":
                time.sleep(3600)
            raise RuntimeError("injected failure on rank 1")
        return out


@register_model
def fake_nan_after_25_steps(pretrained=False, **kwargs):
    return NaNAfter(**kwargs)


@register_model
def fake_nan_every_4th_step(pretrained=False, **kwargs):
    return NaNEvery4th(**kwargs)


@register_model
def fake_oom_above_16(pretrained=False, **kwargs):
    return OutOfMemoryAbove16(**kwargs)


@register_model
def fake_oom_always(pretrained=False, **kwargs):
    return OutOfMemoryAlways(**kwargs)


@register_model
def fake_fails_on_rank_1(pretrained=False, **kwargs):
    return FailsOnRank1(**kwargs)


# --- data --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> Path:
    """Digits prepared once by the real steps, and two policies: augment_none, augment_basic."""
    from components.augment import augment
    from components.core.params import load_params
    from components.prepare import prepare

    root = tmp_path_factory.mktemp("digits")
    for preset in ("none", "basic"):
        path = root / f"{preset}.yaml"
        path.write_text(f"paths:\n  prepared: {root / 'prepared'}\n"
                        f"  augment: {root / ('augment_' + preset)}\n")
        params = load_params(path, [f"augment.preset={preset}"])
        if preset == "none":
            prepare(params)
        augment(params)
    return root


@pytest.fixture(scope="session")
def imbalanced(digits: Path, tmp_path_factory) -> Path:
    """Digits with classes 3, 8 and 9 cut to 5% of their train and val images, as
    bench/bench_imbalance.py makes them (tests/support/projects.py imbalanced_digits, seed 0):
    written as an image folder (`folder`), then prepared (`prepared`) and augmented (`augment`, the
    default
    policy) by the real steps."""
    from components.augment import augment
    from components.core.params import validate
    from components.prepare import prepare
    from tests.support.projects import IMBALANCED_DATA, imbalanced_digits

    root = tmp_path_factory.mktemp("imbalanced")
    folder = imbalanced_digits(digits / "prepared", root / "folder")
    params = validate({"paths": {"prepared": str(root / "prepared"),
                                 "augment": str(root / "augment")},
                       "data": IMBALANCED_DATA | {"root": str(folder)}})
    prepare(params)
    augment(params)
    return root


# --- the stack ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """A Prefect server and an MLflow server on loopback, work pools `local` and `gpu`, and the
    committed project deployed with `prefect deploy --all`; start workers with `stack.worker`.
    Shared by every end-to-end test of the session: use your own model names."""
    from tests.support.servers import mlflow_server, prefect_server

    root = tmp_path_factory.mktemp("stack")
    repo, workers = committed_copy(root / "repo"), root / "workers"
    (workers / ".stack/workspace").mkdir(parents=True)
    with prefect_server(root / "prefect") as api, mlflow_server(root / "mlflow") as mlflow:
        env = {**os.environ, "PREFECT_API_URL": api, "MLFLOW_TRACKING_URI": mlflow,
               "PREFECT_HOME": str(root / "home"), "DVC_NO_ANALYTICS": "1",
               "PATH": f"{BIN}:{os.environ['PATH']}"}
        s = Stack(root, repo, workers, env, mlflow)
        for pool in ("local", "gpu"):
            s.prefect("work-pool", "create", pool, "--type", "process")
        s.prefect("--no-prompt", "deploy", "--all")
        yield s


# --- a registered model ------------------------------------------------------------------------


# The served model's settings, fixed at registration: small, so the serving tests reach them.
SERVED = {"top_k": 3, "max_batch": 32, "max_request_mb": 1.0, "max_image_mp": 1.0,
          "max_request_mp": 1.5}


@dataclass
class Registered:
    params: Params  # the pipeline's settings (its paths are under root)
    mlflow: str  # the tracking server's address
    name: str  # the registered model
    version: str  # its version, the champion
    root: Path


@pytest.fixture(scope="session")
def registered(stack, digits, tmp_path_factory) -> Registered:
    """One digits pipeline (two epochs) run by the real steps and registered, with the SERVED
    settings, as `served-digits` on the stack's MLflow server: what the serving, export and model
    card tests share. MLFLOW_TRACKING_URI points there only while it runs."""
    from components.core.params import validate
    from components.evaluate import evaluate
    from components.register import register
    from components.tracking.run import tracked
    from components.train import train

    root = tmp_path_factory.mktemp("registered")
    paths = {"prepared": str(digits / "prepared"), "augment": str(digits / "augment_basic")}
    paths |= {k: str(root / k) for k in ("train", "evaluate", "register", "predictions", "export")}
    params = validate({"paths": paths, "train": {"epochs": 2, "device": "cpu"},
                       "evaluate": {"device": "cpu", "mistakes": 4}, "predict": SERVED,
                       "register": {"model_name": "served-digits", "flush_timeout_s": 10}})
    with tracking_into(stack.mlflow):
        tracked(train, "start")(params)
        tracked(evaluate)(params)
        result = tracked(register)(params)
    assert result.promoted
    return Registered(params, stack.mlflow, result.model_name, result.version, root)
