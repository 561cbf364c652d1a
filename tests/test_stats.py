"""The report's counts: FLOPs, norm ops and elementwise ops counted by shapes (stats.ShapeCounter)
equal torch's FlopCounterMode (and the aten-level op counts) on every family and on timm nets,
and the default command never imports torch._dynamo for them."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from repfuse_cli.fusers.conv_bn import apply_folds, find_pairs
from repfuse_cli.fusers.repvgg import build_repvgg
from repfuse_cli.fusers.vanillanet import build_vanillanet
from repfuse_cli.stats import FLOP_COUNTER, SHAPES, count_by_shapes, count_with_flop_counter, model_stats

TIMM = {  # name -> resolution (small where the model allows it: the reference count runs on meta)
    "fastvit_t8": 64,
    "fastvit_sa12": 64,  # attention stage (functional matmuls)
    "levit_128s": 224,  # attention biases are built for 224
    "efficientvit_m0": 224,
    "resnet50": 64,
    "efficientnet_b0": 64,
    "mobileone_s0": 64,
    "repvit_m1": 64,
    "convnext_atto": 64,  # LayerNorm2d, layer-scale muls
    "vit_tiny_patch16_224": 64,  # scaled_dot_product_attention, non-contiguous linears
    "repvgg_a0": 64,
    "mobilenetv3_small_100": 64,  # SE, hard-swish
    "regnety_002": 64,
}
ROOT = Path(__file__).resolve().parent.parent


def _timm(name: str, res: int) -> nn.Module:
    kw = {"img_size": res} if name.startswith("vit_") else {}
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, **kw).eval()


def _same(model: nn.Module, shape: tuple[int, ...]) -> None:
    ours = count_by_shapes(model, shape)
    reference = count_with_flop_counter(model, shape)
    assert ours == reference, f"(flops, norm ops, elementwise ops): ours {ours}, FlopCounterMode {reference}"
    assert ours[0] > 0


@pytest.mark.parametrize("name", list(TIMM))
def test_counts_equal_flop_counter_on_timm_nets(name):
    res = TIMM[name]
    _same(_timm(name, res), (1, 3, res, res))


@pytest.mark.parametrize("name", ["resnet50", "efficientnet_b0", "mobilenetv3_small_100"])
def test_counts_equal_flop_counter_on_conv_bn_deploy_models(name):
    model = copy.deepcopy(_timm(name, 64))
    pairs, _ = find_pairs(model, (1, 3, 64, 64))
    apply_folds(model, [list(p) for p in pairs], compute=False)
    _same(model, (1, 3, 64, 64))


@pytest.mark.parametrize("deploy", [False, True], ids=["train", "deploy"])
@pytest.mark.parametrize("variant", ["vanillanet_5", "vanillanet_8", "vanillanet_13_x1_5_ada_pool"])
def test_counts_equal_flop_counter_on_vanillanet(variant, deploy):
    with torch.device("meta"):
        model = build_vanillanet(variant, deploy=deploy).eval()
    _same(model, (1, 3, 64, 64))


@pytest.mark.parametrize(
    "variant, deploy",  # D2se's SE blocks: deploy only (its training model is slow to count on meta)
    [("RepVGG-A0", False), ("RepVGG-A0", True), ("RepVGG-B1g2", False), ("RepVGG-B1g2", True), ("RepVGG-D2se", True)],
)
def test_counts_equal_flop_counter_on_repvgg(variant, deploy):
    with torch.device("meta"):
        model = build_repvgg(variant, deploy=deploy).eval()
    _same(model, (1, 3, 64, 64))


class Functional(nn.Module):
    """Every call the counter has a formula for, in the forms models write them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding="valid", dilation=2)
        self.same = nn.Conv1d(8, 8, 5, padding="same", groups=2)
        self.up = nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.conv3d = nn.Conv3d(1, 2, (1, 3, 3), padding=(0, 1, 1))
        self.lin = nn.Linear(4, 6)
        self.gn = nn.GroupNorm(2, 4)
        self.inorm = nn.InstanceNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)  # (1, 8, 5, 5)
        b, c, h, w = x.shape
        x = self.same(x.flatten(2)).reshape(b, c, h, w) * 0.5
        x = self.inorm(self.gn(self.up(x)))  # (1, 4, 10, 10)
        t = self.lin(x.flatten(2).transpose(1, 2))  # non-contiguous 3-D input: matmul + add_
        t = self.lin(x.permute(0, 2, 3, 1).contiguous())
        q = t.reshape(1, 10, 10, 6).transpose(1, 2)
        a = (q @ q.transpose(-2, -1)).softmax(-1)
        y = torch.matmul(a, q) + torch.bmm(q[0], q[0].transpose(1, 2)).sum()
        y = y + torch.einsum("bhnd,bhmd->bhnm", q, q).mean() + torch.einsum("bhnd,bhnd->bhnd", q, q)
        y = torch.addmm(y.new_zeros(6), y[0, 0], y.new_ones(6, 6)).unsqueeze(0) - y.mean()
        y = y + torch.nn.functional.scaled_dot_product_attention(q, q, q)
        y = 1 - y / 2
        z = self.conv3d(x[:, :1].unsqueeze(1))
        return y.sum() + z.sum() + torch.mv(y.new_ones(3, 6), y[0, 0, 0])[0]


def test_counts_equal_flop_counter_on_every_formula():
    model = Functional().eval()
    _same(model, (1, 3, 13, 13))
    with torch.device("meta"):
        _same(Functional().eval(), (1, 3, 13, 13))


def test_unsupported_calls_fall_back_to_flop_counter_and_say_so():
    class MHA(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attn(x, x, x, need_weights=False)[0]

    model = MHA().eval()
    s = model_stats(model, (1, 5, 8))
    assert s.counted_with.startswith(FLOP_COUNTER) and "multi_head_attention_forward" in s.counted_with
    assert s.flops == count_with_flop_counter(model, (1, 5, 8))[0] > 0
    assert "counted_with" not in s.to_dict()
    s = model_stats(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval(), (1, 3, 8, 8))
    assert s.counted_with == SHAPES and s.flops == 2 * 4 * 27 * 36 and s.norm_ops == 1


def test_counting_reads_no_weight_and_leaves_the_model_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(144, 2))
    model.eval()
    with torch.no_grad():
        model[0].weight.fill_(float("nan"))  # a conv that ran would make every output NaN
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flops, norm, elementwise = count_by_shapes(model, (1, 3, 8, 8))
    assert flops == 2 * (4 * 27 * 36 + 144 * 2) and norm == 1 and elementwise == 0
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) or before[k].isnan().all() for k in before)


@pytest.mark.parametrize(
    "checkpoint, arch",
    [("vanillanet_tiny.pth", "vanillanet"), ("repvgg_tiny.pth.tar", "repvgg")],
)
def test_the_default_command_imports_neither_dynamo_nor_timm(checkpoint, arch):
    checkpoint = str(ROOT / "sample_checkpoints" / checkpoint)
    code = (
        "import sys, json; from repfuse_cli import convert; "
        f"r = convert({checkpoint!r}, arch={arch!r}, write=False); "
        "print(json.dumps([r['before'], r['after'], 'torch._dynamo' in sys.modules, 'timm' in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    before, after, dynamo, timm_imported = json.loads(out.stdout.splitlines()[-1])
    assert not dynamo and not timm_imported
    assert before["flops"] > 0 and before["flops"] >= after["flops"] and before["norm_ops"] > after["norm_ops"] == 0
