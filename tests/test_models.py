"""components/training/models.py: timm's model-agnostic checks on the built-ins, and timm models by
name."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F

from components.core.params import UserError
from components.training.models import BUILTINS, create_model, head_parameters, replace_head

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT.parent / "shared" / "bench"

# lenet5 is defined for 28-32 px digits; the others take the 8 px sklearn digits as well.
SIZES = {"simple_cnn": (8, 28, 32), "lenet5": (28, 32), "cifar_cnn": (8, 28, 32),
         "resnet_cifar": (8, 28, 32)}
CASES = [(name, chans, side) for name in BUILTINS for chans in (1, 3) for side in SIZES[name]]


@pytest.mark.parametrize(("name", "chans", "side"), CASES)
def test_builtin_forward_backward(name, chans, side):
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, in_chans=chans, img_size=side).train()
    out = model(torch.randn(3, chans, side, side))
    assert out.shape == (3, 5)
    assert torch.isfinite(out).all()
    F.cross_entropy(out, torch.tensor([0, 1, 4])).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f"{name}: parameters outside the graph: {no_grad}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_channels_last_gives_same_output(name):
    # The train step runs channels_last; the result must not depend on the memory format.
    torch.manual_seed(0)
    model = create_model(name, num_classes=4, in_chans=3, img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        model = model.to(memory_format=torch.channels_last)
        got = model(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_lenet5_refuses_small_inputs_by_name_and_size():
    with pytest.raises(UserError, match=r"lenet5 needs images of at least 28x28 px, got 8x8"):
        create_model("lenet5", num_classes=10, in_chans=1, img_size=8)


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_created_by_timm_like_any_timm_model(name):
    assert name in timm.list_models()
    model = timm.create_model(name, num_classes=4, in_chans=1)
    cfg = model.pretrained_cfg
    assert cfg["architecture"] == name and cfg["num_classes"] == 10
    _, h, w = cfg["input_size"]  # the cfg's default size is one the model takes
    assert model(torch.randn(2, 1, h, w)).shape == (2, 4)
    assert not timm.is_model_pretrained(name)


def test_timm_models_work_through_create_model():
    model = create_model("resnet18", num_classes=5, in_chans=1, img_size=32)
    assert model.conv1.in_channels == 1
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 5)
    # A fixed-size model (a ViT, default 160 px) only works at 32 px if img_size reached it.
    vit = create_model("test_vit", num_classes=3, in_chans=3, img_size=32)
    assert vit(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_unknown_name_lists_builtins_and_suggests():
    with pytest.raises(UserError) as err:
        create_model("simplecnn", num_classes=10, in_chans=1, img_size=28)
    message = str(err.value)
    assert all(name in message for name in BUILTINS)
    assert "any timm model" in message and "Did you mean: simple_cnn" in message
    with pytest.raises(UserError, match="resnet18"):
        create_model("resnet181", num_classes=10, in_chans=1, img_size=28)


@pytest.mark.parametrize("name", BUILTINS)
def test_pretrained_builtin_is_a_clear_error(name):
    with pytest.raises(UserError, match=f"{name} has no pretrained weights"):
        create_model(name, num_classes=10, in_chans=1, img_size=32, pretrained=True)
    with pytest.raises(UserError, match="model.checkpoint"):
        timm.create_model(name, pretrained=True)


# Runs in a fresh interpreter: huggingface_hub reads HF_HUB_OFFLINE and HF_HUB_CACHE at import.
PRETRAINED_SCRIPT = """
import json, sys, safetensors.torch, torch
from components.training.models import create_model
from components.core.params import UserError
result = {}
try:
    create_model("test_efficientnet", num_classes=3, in_chans=3, img_size=32, pretrained=True)
except UserError as err:
    result["error"] = str(err)
model = create_model("test_resnet", num_classes=3, in_chans=3, img_size=32, pretrained=True)
cached = safetensors.torch.load_file(sys.argv[1])
ours = model.state_dict()
backbone = {k: v for k, v in cached.items() if not k.startswith("fc.")}
result["backbone_loaded"] = all(torch.equal(ours[k], v) for k, v in backbone.items())
result["head"] = model.fc.out_features
print(json.dumps(result))
"""


def test_pretrained_timm_model_offline(tmp_path):
    # Lay out the Hugging Face cache as hf_hub_download leaves it, for test_resnet only.
    repo = tmp_path / "hub" / "models--timm--test_resnet.r160_in1k"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    weights = snapshot / "model.safetensors"
    safetensors.torch.save_file(timm.create_model("test_resnet").state_dict(), weights)

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    # The timeout guards against the hang this code exists to avoid (hub retries for minutes).
    proc = subprocess.run([sys.executable, "-c", PRETRAINED_SCRIPT, str(weights)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    error = result["error"]
    assert "test_efficientnet" in error and "not in the Hugging Face cache" in error
    assert "model.checkpoint" in error and "HF_HUB_OFFLINE" in error
    assert result["backbone_loaded"] and result["head"] == 3


@pytest.mark.parametrize("name", ["simple_cnn", "resnet_cifar", "resnet18"])
def test_replace_head_and_head_parameters(name):
    model = create_model(name, num_classes=10, in_chans=3, img_size=32)
    assert not replace_head(model, 10)
    old_head = model.get_classifier()
    assert replace_head(model, 3)
    assert model.get_classifier() is not old_head and model.num_classes == 3
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    head = head_parameters(model)
    assert {id(p) for p in head} == {id(p) for p in model.get_classifier().parameters()}
    assert sum(p.numel() for p in head) == model.num_features * 3 + 3
    body = [p for p in model.parameters() if all(p is not h for h in head)]
    assert len(body) + len(head) == len(list(model.parameters())) and body


@pytest.mark.skipif(not BENCH.is_dir(), reason=f"{BENCH} (the reference scripts) is absent")
@pytest.mark.parametrize(("chans", "side"), [(1, 28), (3, 32), (1, 8)])
def test_simple_cnn_is_the_reference_model(monkeypatch, chans, side):
    monkeypatch.syspath_prepend(str(BENCH))
    reference = importlib.import_module("reference_model").SimpleCNN(10, chans, side)
    model = create_model("simple_cnn", num_classes=10, in_chans=chans, img_size=side)
    ref_params, params = list(reference.parameters()), list(model.parameters())
    assert [p.shape for p in params] == [p.shape for p in ref_params]
    assert sum(p.numel() for p in params) == sum(p.numel() for p in ref_params)
    # Same weights, same output and gradients: the same computation, not only the same size
    # (ours pools before its ReLUs, which commute with max pooling, on a quarter of the values).
    with torch.no_grad():
        for p, q in zip(params, ref_params, strict=True):
            p.copy_(q)
    x = torch.randn(8, chans, side, side)
    torch.testing.assert_close(model(x), reference(x))
    model(x).square().sum().backward()
    reference(x).square().sum().backward()
    for p, q in zip(params, ref_params, strict=True):
        torch.testing.assert_close(p.grad, q.grad)
