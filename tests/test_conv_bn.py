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

from repfuse_cli import convert, load_deploy
from repfuse_cli.cli import app
from repfuse_cli.fusers.conv_bn import ConvBnFuser, apply_folds, find_folds, find_pairs
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


class _BnThen(nn.Module):
    def __init__(self, bn: nn.Module, layer: nn.Module):
        super().__init__()
        self.bn, self.layer = bn, layer

    def forward(self, x):
        return self.layer(self.bn(x))


@settings(max_examples=40, deadline=None)
@given(conv_cfg, st.booleans())
def test_fold_into_the_next_linear_or_unpadded_conv_matches_unfused(c, linear):
    """BN -> Linear, and BN -> conv without zero padding (any kernel, stride, dilation, groups,
    reflect/replicate/circular padding): exact. Zero padding reads 0 where the BN would give its
    shift: not folded."""
    torch.manual_seed(c["seed"])
    g = c["groups"]
    cin, cout = c["cin_per_group"] * g, c["cout_per_group"] * g
    if linear:
        layer, bn, shape = nn.Linear(cin, cout, bias=c["bias"]), nn.BatchNorm1d(cin, eps=c["eps"]), (3, cin)
    else:
        cls = [nn.Conv1d, nn.Conv2d, nn.Conv3d][c["dims"] - 1]
        kw = dict(stride=c["stride"], dilation=c["dilation"], groups=g, bias=c["bias"])
        layer = cls(cin, cout, c["k"], padding=c["padding"], padding_mode=c["padding_mode"], **kw)
        bn = [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d][c["dims"] - 1](cin, eps=c["eps"], affine=c["affine"])
        shape = (2, cin, *([7] * c["dims"]))
    model = randomize_bn(_BnThen(bn, layer), seed=c["seed"]).double().eval()
    work = copy.deepcopy(model)
    folds = find_folds(work, shape)
    if not linear and c["padding"] and c["padding_mode"] == "zeros":
        assert folds.before == [] and "inexact at the borders" in dict(folds.unfused)["bn"]
        return
    assert folds.before == [("bn", "layer")] and folds.after == [] and folds.unfused == []
    apply_folds(work, [], compute=True, before=folds.before)
    x = torch.randn(shape, dtype=torch.float64)
    with torch.no_grad():
        assert rel_diff(model(x), work(x)) < 1e-12


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
    if name == "densenet121":  # partly foldable: pre-activation BNs after concatenations stay, with the reason
        assert res["bn_folded"] > 0 and res["unfused"]
        assert all("`cat`" in u["reason"] and "pre-activation" in u["reason"] for u in res["unfused"])
    elif name == "repvgg_a0":
        assert res["fused"].get("timm_reparameterized", 0) > 0 or res["fused"]["branch_merges"] > 0
    elif name == "convnext_atto":  # nothing to fold
        assert res["bn_folded"] == 0 and res["before"]["bn_layers"] == 0
    else:
        assert res["bn_folded"] == n_bn and not res["unfused"]

    deploy = load_deploy(out)
    assert not deploy.training
    assert len(find_folds(copy.deepcopy(deploy), (1, 3, 224, 224))) == 0  # no foldable BN left
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


# --- issue 12: networks users bring ------------------------------------------------------------


def fold_all(model: nn.Module, input_shape) -> tuple[nn.Module, object]:
    work = copy.deepcopy(model).eval()
    folds = find_folds(work, input_shape)
    apply_folds(work, folds.after, compute=True, concat=folds.concat, before=folds.before)
    return work, folds


def test_bn_after_a_concat_of_convs_folds_slice_by_slice():
    from toy_models import ConcatBN

    model = randomize_bn(ConcatBN(), seed=6).double().eval()
    fused, folds = fold_all(model, (1, 8, 9, 9))
    assert folds.concat == [(["a", "b", "c"], "bn")] and folds.after == [] and folds.before == []
    reasons = dict(folds.unfused)
    assert set(reasons) == {"bn_shared"} and "part 0, `d`'s output, has other users" in reasons["bn_shared"]
    assert isinstance(fused.bn, nn.Identity) and all(getattr(fused, n).bias is not None for n in "abc")
    x = torch.randn(3, 8, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        assert rel_diff(model(x), fused(x)) < 1e-12  # exact: float64 rounding only


def test_bn_around_linear_and_before_an_unpadded_conv_folds_in_both_directions():
    from toy_models import LinearBN

    model = randomize_bn(LinearBN(), seed=7).double().eval()
    fused, folds = fold_all(model, (1, 3, 12, 12))
    assert folds.after == [("fc1", "bn_fc1")]
    assert sorted(folds.before) == [("bn_fc2", "fc2"), ("bn_head", "fc1"), ("bn_in", "conv_valid")]
    reasons = dict(folds.unfused)
    assert set(reasons) == {"pre", "bn_pad"}
    assert "pre-activation" in reasons["pre"]  # BN -> ReLU -> conv can never fold
    assert "padded conv" in reasons["bn_pad"] and "inexact at the borders" in reasons["bn_pad"]
    assert fused.fc1.bias is not None  # fc1 had none: both its BNs live in it now
    x = torch.randn(4, 3, 12, 12, dtype=torch.float64)
    with torch.no_grad():
        assert rel_diff(model(x), fused(x)) < 1e-12


def test_linear_bn_network_converts_with_every_bn_folded_and_each_direction_reported(tmp_path):
    model = randomize_bn(_AllFoldable(), seed=8).eval()
    ckpt = tmp_path / "lin.pt"
    torch.save({"model": model.state_dict()}, ckpt)
    r = runner.invoke(
        app, ["convert", str(ckpt), "--model", "test_conv_bn:_AllFoldable", "--resolution", "12", "--json"]
    )
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["before"]["bn_layers"] == 4 and res["after"]["bn_layers"] == 0 and res["unfused"] == []
    assert res["fused"]["bn_folded"] == 4 and res["fused"]["bn_folded_into_next"] == 2
    assert res["verify"]["passed"]
    from safetensors import safe_open

    with safe_open(res["output"], "pt") as f:
        config = json.loads(f.metadata()["config"])
    assert sorted(config["folds"]) == [["fc1", "bn_fc1"], ["stem", "bn_stem"]]
    assert sorted(config["folds_into_next"]) == [["bn_fc2", "fc2"], ["bn_head", "fc1"]]
    deploy = load_deploy(res["output"], model="test_conv_bn:_AllFoldable")
    x = torch.randn(3, 3, 12, 12)
    with torch.no_grad():
        assert rel_diff(model(x), deploy(x)) < 1e-5


class _AllFoldable(nn.Module):
    """conv -> BN2d, pool, BN1d -> Linear -> BN1d -> ReLU -> BN1d -> Linear: every BN folds."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3)
        self.bn_stem = nn.BatchNorm2d(6)
        self.bn_head = nn.BatchNorm1d(6)
        self.fc1 = nn.Linear(6, 10)
        self.bn_fc1 = nn.BatchNorm1d(10)
        self.bn_fc2 = nn.BatchNorm1d(10)
        self.fc2 = nn.Linear(10, 4)

    def forward(self, x):
        v = torch.relu(self.bn_stem(self.stem(x))).mean((2, 3))
        v = torch.relu(self.bn_fc1(self.fc1(self.bn_head(v))))
        return self.fc2(self.bn_fc2(v))


def test_mixnet_concats_fold_to_zero_bn(tmp_path):
    ckpt = tmp_path / "mixnet.pth.tar"
    model = save_like_timm_train("mixnet_s", ckpt)
    res = convert(ckpt, tmp_path / "m.safetensors", resolution=64)
    assert res["before"]["bn_layers"] == 49 and res["after"]["bn_layers"] == 0 and res["unfused"] == []
    assert res["fused"]["bn_folded_across_concat"] > 0 and res["verify"]["passed"]
    # exact: in float64 the folded network computes the same function to float64 rounding
    fused, folds = fold_all(model.double(), (1, 3, 64, 64))
    assert len(folds.concat) == res["fused"]["bn_folded_across_concat"] and folds.unfused == []
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert rel_diff(model(x), fused(x)) < 1e-10


def test_timm_fuse_builds_its_new_layers_in_float64():
    """LeViT's ConvNorm/LinearNorm.fuse() make new layers in the default dtype: on the float64
    working copy they must come out float64 and exact, not float32 (a mixed-dtype model)."""
    from timm.models.levit import ConvNorm, LinearNorm

    from repfuse_cli.fusers.conv_bn import _timm_reparameterize

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = ConvNorm(3, 4, 3, padding=1)
            self.fc = LinearNorm(4, 5)

        def forward(self, x):
            return self.fc(self.conv(x).mean((2, 3))[:, None])  # LinearNorm takes (B, N, C)

    model = randomize_bn(Tiny(), seed=9).double().eval()
    work = _timm_reparameterize(copy.deepcopy(model), torch.float64)
    assert {p.dtype for p in work.parameters()} == {torch.float64}
    assert torch.get_default_dtype() == torch.float32  # restored
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        assert rel_diff(model(x), work(x)) < 1e-12


@pytest.mark.parametrize("name", ["efficientvit_m0", "levit_128s"])
def test_timm_nets_whose_fuse_builds_layers_convert(name, tmp_path):
    """Their fuse() makes new layers (float64 now); LeViT's classifier is two heads (head, head_dist)."""
    ckpt = tmp_path / "vit.pth.tar"
    save_like_timm_train(name, ckpt)
    r = runner.invoke(app, ["convert", str(ckpt), "--json"])
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["verify"]["passed"] and res["after"]["bn_layers"] == 0 and res["fused"]["timm_reparameterized"] > 0


@pytest.mark.parametrize("name", ["regnet_y_400mf", "mnasnet0_5"])
def test_torchvision_nets_that_failed_convert(name, tmp_path):
    """regnet_y_400mf cannot be built on the meta device; mnasnet0_5 needs its state_dict's
    `_metadata` versions: both are saved the way users save them, `torch.save(model.state_dict())`."""
    import torchvision

    torch.manual_seed(0)
    model = randomize_bn(getattr(torchvision.models, name)(), seed=2).eval()
    ckpt = tmp_path / f"{name}.pth"
    torch.save(model.state_dict(), ckpt)
    spec = f"torchvision.models:{name}"
    r = runner.invoke(app, ["convert", str(ckpt), "--model", spec, "--resolution", "64", "--json"])
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["verify"]["passed"] and res["after"]["bn_layers"] == 0
    meta_notes = [n for n in res["notes"] if "meta device" in n]
    assert bool(meta_notes) == (name == "regnet_y_400mf")
    deploy = load_deploy(res["output"], model=spec)
    x = torch.randn(2, 3, 64, 64)
    assert rel_diff(run(model, x, torch.float32), run(deploy, x, torch.float32)) < 1e-5


def test_meta_build_failure_falls_back_to_a_real_build_with_a_note(tmp_path):
    from toy_models import ComputedWidths

    model = randomize_bn(ComputedWidths(), seed=1).eval()
    ckpt = tmp_path / "cw.pt"
    torch.save(model.state_dict(), ckpt)
    res = convert(ckpt, tmp_path / "cw.safetensors", options=_opts("toy_models:computed_widths"), resolution=8)
    assert res["verify"]["passed"] and res["bn_folded"] == 1
    notes = [n for n in res["notes"] if "cannot be built on the meta device" in n]
    assert len(notes) == 1 and "Tensor.item() cannot be called on meta tensors" in notes[0]


def _opts(model: str):
    from repfuse_cli.fuser import Options

    return Options(model=model)


def test_state_dict_metadata_is_kept_through_loading(tmp_path):
    from toy_models import Versioned

    from repfuse_cli.checkpoint import load_checkpoint

    model = randomize_bn(Versioned(), seed=3).eval()
    sd = model.state_dict()  # saved as DDP would: `module.` keys and metadata
    ddp = type(sd)(("module." + k, v) for k, v in sd.items())
    ddp._metadata = type(sd._metadata)(("module" + ("." + k if k else ""), v) for k, v in sd._metadata.items())
    ckpt = tmp_path / "v.pt"
    torch.save(ddp, ckpt)
    loaded = load_checkpoint(ckpt)
    assert loaded.state_dict._metadata == sd._metadata  # `module` prefixes stripped there too
    res = convert(ckpt, tmp_path / "v.safetensors", options=_opts("toy_models:versioned"), resolution=8)
    assert res["verify"]["passed"] and res["bn_folded"] == 1
    assert not load_deploy(tmp_path / "v.safetensors", model="toy_models:versioned").training

    old = type(sd)(sd)
    old._metadata = type(sd._metadata)((k, {"version": 1}) for k in sd._metadata)
    torch.save(old, tmp_path / "old.pt")  # a version the model's own loader refuses: bad input, not a crash
    r = runner.invoke(app, ["convert", str(tmp_path / "old.pt"), "--model", "toy_models:versioned"])
    assert r.exit_code == 2 and "version 1 is not supported" in r.stderr


@pytest.mark.parametrize(
    "spec, says",
    [
        ("torchvision.models:ResNet", "TypeError"),
        ("math:pi", "is a float, not a callable"),
        ("toy_models:broken", "broken on purpose"),
        ("toy_models:no_such_thing", "cannot import"),
    ],
)
def test_errors_in_the_model_callable_are_bad_input(spec, says, tmp_path):
    ckpt = tmp_path / "w.pt"
    torch.save({"model": nn.Conv2d(3, 4, 3).state_dict()}, ckpt)
    r = runner.invoke(app, ["convert", str(ckpt), "--model", spec])
    assert r.exit_code == 2, r.stderr
    assert f"--model {spec}" in r.stderr and says in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_refused_plain_pickle_warns_nothing(tmp_path):
    import collections
    import pickle
    import warnings

    from repfuse_cli.checkpoint import load_checkpoint
    from repfuse_cli.errors import RepfuseError

    path = tmp_path / "plain.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"w": torch.zeros(2)}, "c": collections.Counter()}, f, protocol=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RepfuseError):
            load_checkpoint(path)
    assert [str(w.message) for w in caught] == []


def test_new_fold_kinds_in_a_config_are_vetted():
    from repfuse_cli.errors import BadInput
    from repfuse_cli.fuser import Plan

    fuser = ConvBnFuser()
    good = {"model": "timm:resnet18", "folds_concat": [[["a", "b"], "bn"]], "folds_into_next": [["bn", "fc"]]}
    fuser.check_config(Plan("conv-bn", "x", "timm", good), None, "f")
    for bad in ({"folds_concat": [["a", "bn"]]}, {"folds_concat": [[[], "bn"]]}, {"folds_into_next": [["bn"]]}):
        with pytest.raises(BadInput):
            fuser.check_config(Plan("conv-bn", "x", "timm", {**good, **bad}), None, "f")


def test_pre_activation_with_an_in_place_relu_keeps_its_reason():
    """torchvision's DenseNet: BN -> ReLU(inplace=True) -> conv. The in-place ReLU gives the conv
    the same tensor object the BN returned: it must not pass for the BN's only consumer."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.Conv2d(4, 4, 1), nn.Flatten()
    )
    model = randomize_bn(model, seed=11).eval()
    fused, folds = fold_all(model, (1, 3, 6, 6))
    assert len(folds) == 0 and [n for n, _ in folds.unfused] == ["2"]
    assert "pre-activation" in folds.unfused[0][1] and "relu" in folds.unfused[0][1]


def test_bn_before_a_same_padded_timm_conv_stays():
    from timm.layers import Conv2dSame

    model = randomize_bn(nn.Sequential(nn.BatchNorm2d(4), Conv2dSame(4, 4, 3, stride=2)), seed=12).eval()
    fused, folds = fold_all(model, (1, 4, 7, 7))
    assert len(folds) == 0 and "pads with zeros" in dict(folds.unfused)["0"]
