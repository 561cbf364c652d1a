"""conv-bn: the fold math over random configurations, the dataflow rules, and timm end to end."""

from __future__ import annotations

import argparse
import copy
import json

import pytest
import timm
import torch
from conftest import randomize_bn, rel_diff
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from typer.testing import CliRunner

from repfuse_cli import load_deploy
from repfuse_cli.cli import app
from repfuse_cli.fusers.conv_bn import apply_folds, find_pairs
from repfuse_cli.pipeline import run_conversion
from repfuse_cli.verification import run

runner = CliRunner()


def fold_copy(model: nn.Module, input_shape) -> tuple[nn.Module, list, list]:
    work = copy.deepcopy(model).eval()
    pairs, unfused = find_pairs(work, input_shape)
    apply_folds(work, [list(p) for p in pairs], compute=True)
    return work, pairs, unfused


# --- property test: one conv (any kind) followed by one BN ---------------------------------

conv_cfg = st.fixed_dictionaries(
    {
        "dims": st.sampled_from([1, 2, 3]),
        "transposed": st.booleans(),
        "groups": st.sampled_from([1, 2, 4]),
        "cin_per_group": st.integers(1, 3),
        "cout_per_group": st.integers(1, 3),
        "k": st.sampled_from([1, 2, 3]),
        "stride": st.sampled_from([1, 2]),
        "dilation": st.sampled_from([1, 2]),
        "padding": st.sampled_from([0, 1]),
        "padding_mode": st.sampled_from(["zeros", "reflect", "circular", "replicate"]),
        "bias": st.booleans(),
        "affine": st.booleans(),
        "eps": st.sampled_from([1e-5, 1e-3, 1e-6, 0.1]),
        "dtype": st.sampled_from([torch.float32, torch.float64]),
        "seed": st.integers(0, 2**16),
    }
)


def make_conv(c):
    g = c["groups"]
    cin, cout = c["cin_per_group"] * g, c["cout_per_group"] * g
    kw = dict(stride=c["stride"], dilation=c["dilation"], padding=c["padding"], groups=g, bias=c["bias"])
    if c["transposed"]:
        cls = [nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d][c["dims"] - 1]
        conv = cls(cin, cout, c["k"], **kw)  # transposed convs support zero padding only
    else:
        cls = [nn.Conv1d, nn.Conv2d, nn.Conv3d][c["dims"] - 1]
        conv = cls(cin, cout, c["k"], padding_mode=c["padding_mode"], **kw)
    bn = [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d][c["dims"] - 1](cout, eps=c["eps"], affine=c["affine"])
    return nn.Sequential(conv, bn), cin


@settings(max_examples=60, deadline=None)
@given(conv_cfg)
def test_fold_matches_unfused_for_random_conv_bn(c):
    torch.manual_seed(c["seed"])
    model, cin = make_conv(c)
    randomize_bn(model, seed=c["seed"])
    model = model.to(c["dtype"]).eval()
    shape = (2, cin, *([7] * c["dims"]))
    fused, pairs, unfused = fold_copy(model, shape)
    assert pairs == [("0", "1")] and unfused == []
    assert isinstance(fused[1], nn.Identity) and fused[0].bias is not None
    x = torch.randn(shape, dtype=c["dtype"])
    with torch.no_grad():
        ref, out = model(x), fused(x)
    tol = 1e-5 if c["dtype"] == torch.float32 else 1e-12
    assert rel_diff(ref, out) < tol


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_half_precision_folds_in_float64_and_keeps_dtype(dtype, tol):
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8)), seed=3).eval()
    half = copy.deepcopy(model).to(dtype)
    fused, pairs, _ = fold_copy(half, (1, 4, 8, 8))
    assert fused[0].weight.dtype == dtype and fused[0].bias.dtype == dtype
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        ref = model.double()(x.double())
        out = run(fused, x, torch.float32)
    assert rel_diff(ref, out) < tol


def test_grouped_transposed_conv_folds():
    from toy_models import Transposed

    model = randomize_bn(Transposed(groups=2), seed=1).eval()
    fused, pairs, _ = fold_copy(model, (1, 4, 5, 5))
    assert pairs == [("up", "bn")]
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        assert rel_diff(model(x), fused(x)) < 1e-5


# --- the dataflow rules ----------------------------------------------------------------------


def test_pairs_follow_dataflow_not_module_order():
    from toy_models import ReversedOrder

    model = randomize_bn(ReversedOrder()).eval()
    fused, pairs, unfused = fold_copy(model, (1, 3, 16, 16))
    assert pairs == [("conv", "bn")] and unfused == []
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert rel_diff(model(x), fused(x)) < 1e-5


def test_what_cannot_fold_exactly_is_left_alone_with_a_reason():
    from toy_models import Tricky

    model = randomize_bn(Tricky(), seed=2).eval()
    fused, pairs, unfused = fold_copy(model, (1, 3, 16, 16))
    assert sorted(pairs) == [("conv_ok", "bn_ok"), ("fc", "bn1d")]
    reasons = dict(unfused)
    assert set(reasons) == {"bn_shared", "bn_cat", "bn_pre", "bn_nostats", "bn_seq"}
    assert "other users" in reasons["bn_shared"]
    assert "cat" in reasons["bn_cat"]
    assert "relu" in reasons["bn_pre"]
    assert "running statistics" in reasons["bn_nostats"]
    assert "normalizes a 3-D input" in reasons["bn_seq"]
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert rel_diff(model(x), fused(x)) < 1e-5


def test_in_place_change_of_the_conv_output_blocks_the_fold():
    from toy_models import InPlace

    model = randomize_bn(InPlace()).eval()
    _, pairs, unfused = fold_copy(model, (1, 3, 8, 8))
    assert pairs == [] and "other users" in dict(unfused)["bn"]


def test_timm_batchnormact_keeps_its_activation():
    from timm.layers import BatchNormAct2d

    model = nn.Sequential(nn.Conv2d(3, 8, 3), BatchNormAct2d(8, act_layer=nn.PReLU))
    randomize_bn(model, seed=5).eval()
    fused, pairs, _ = fold_copy(model, (1, 3, 9, 9))
    assert pairs == [("0", "1")]
    assert "1.act.weight" in fused.state_dict()  # PReLU keeps its key
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        assert rel_diff(model(x), fused(x)) < 1e-5


def test_frozen_batchnorm_folds():
    from torchvision.ops import FrozenBatchNorm2d

    bn = FrozenBatchNorm2d(8)
    bn.running_mean.copy_(torch.randn(8))
    bn.running_var.copy_(torch.rand(8) + 0.5)
    bn.weight.copy_(torch.rand(8) + 0.5)
    bn.bias.copy_(torch.randn(8))
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), bn).eval()
    fused, pairs, _ = fold_copy(model, (1, 3, 9, 9))
    assert pairs == [("0", "1")]
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        assert rel_diff(model(x), fused(x)) < 1e-5


# --- timm models end to end through the CLI --------------------------------------------------

TIMM_MODELS = ["resnet18", "efficientnet_b0", "mobilenetv3_small_100", "repvgg_a0", "densenet121", "convnext_atto"]


def save_like_timm_train(name: str, path, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = randomize_bn(timm.create_model(name, pretrained=False, num_classes=10), seed=seed).eval()
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    ema = {k: v.clone() for k, v in sd.items()}
    torch.save(
        {
            "epoch": 9,
            "arch": name,
            "version": 2,
            "state_dict": sd,
            "state_dict_ema": ema,
            "args": argparse.Namespace(model=name, num_classes=10, lr=0.05, epochs=10),
            "metric": 12.5,
        },
        path,
    )
    return model


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_checkpoint_converts_end_to_end(name, tmp_path):
    ckpt = tmp_path / "model_best.pth.tar"
    model = save_like_timm_train(name, ckpt)
    r = runner.invoke(app, ["convert", str(ckpt), "--json"])
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    out = tmp_path / "model_best.deploy.safetensors"
    assert res["output"] == str(out) and out.exists()
    assert res["arch"] in ("conv-bn", "repvgg") and res["key"] == "state_dict"
    assert res["ema_available"] == ["state_dict_ema"]
    assert res["verify"]["passed"]
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert res["before"]["bn_layers"] == n_bn
    assert res["after"]["bn_layers"] == len(res["unfused"])
    if name == "densenet121":  # partly foldable: BNs after concatenations stay, with the reason
        assert res["bn_folded"] > 0 and res["unfused"]
        assert all("`cat`" in u["reason"] or "not the direct output" in u["reason"] for u in res["unfused"])
    elif name == "repvgg_a0":
        assert res["fused"].get("timm_reparameterized", 0) > 0 or res["fused"]["branch_merges"] > 0
    elif name == "convnext_atto":  # nothing to fold
        assert res["bn_folded"] == 0 and res["before"]["bn_layers"] == 0
    else:
        assert res["bn_folded"] == n_bn and not res["unfused"]

    deploy = load_deploy(out)
    assert not deploy.training
    assert find_pairs(copy.deepcopy(deploy), (1, 3, 224, 224))[0] == []  # no foldable BN left
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(7))
    ref64 = run(model, x, torch.float64)
    train32, deploy32 = run(model, x, torch.float32), run(deploy, x, torch.float32)
    if name == "efficientnet_b0":
        # With randomized BN stats this net is so ill-conditioned that float32 itself is off by
        # ~1e-5 from float64: the fused model must agree with the unfused one to within a few
        # times float32's own error on it.
        noise = rel_diff(ref64, train32)
        assert noise > 1e-6
        assert rel_diff(train32, deploy32) < max(1e-5, 4 * noise)
    else:
        assert rel_diff(train32, deploy32) < 1e-5


def test_conversion_is_deterministic(tmp_path):
    ckpt = tmp_path / "r.pth.tar"
    save_like_timm_train("resnet18", ckpt)
    a = runner.invoke(app, ["convert", str(ckpt), "-o", str(tmp_path / "a.safetensors"), "-q"])
    b = runner.invoke(app, ["convert", str(ckpt), "-o", str(tmp_path / "b.safetensors"), "-q"])
    assert a.exit_code == b.exit_code == 0 and a.stdout == ""
    from safetensors.torch import load_file

    ta, tb = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_checkpoint_keeps_dtype(dtype, tmp_path):
    ckpt = tmp_path / "half.pth"
    save_like_timm_train("resnet18", ckpt, dtype=dtype)
    res = run_conversion(ckpt, tmp_path / "half.safetensors").result.to_dict()
    assert res["dtype"] == str(dtype).replace("torch.", "") and res["verify"]["passed"]
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "half.safetensors")
    assert {v.dtype for v in tensors.values() if v.is_floating_point()} == {dtype}


def test_custom_model_via_module_callable(tmp_path):
    from toy_models import Tricky

    model = randomize_bn(Tricky(), seed=4).eval()
    ckpt = tmp_path / "tricky.pt"
    torch.save({"model": model.state_dict()}, ckpt)
    r = runner.invoke(app, ["convert", str(ckpt), "--model", "toy_models:tricky", "--resolution", "16", "--json"])
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["bn_folded"] == 2 and len(res["unfused"]) == 5
    deploy = load_deploy(res["output"], model="toy_models:tricky")
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert rel_diff(model(x), deploy(x)) < 1e-5
