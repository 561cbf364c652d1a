"""RepViT (THU-MIG/RepViT ``model/repvit.py`` and timm's ``repvit_*``): a deploy model it never had.

A RepViT is a conv stem, a chain of blocks and a BatchNorm1d + Linear classifier (two of them,
averaged in eval mode, when trained with distillation). Two kinds of block:
- ``mix`` (stride 1): token mixer ``RepVGGDW`` = BN(dw3x3-BN(x) + dw1x1(x) + x) [+ SE], then a
  residual MLP ``x + conv1x1-BN(GELU(conv1x1-BN(x)))``.
- ``down`` (stride 2): dw kxk-BN stride 2 [+ SE], 1x1-BN to the next width, then the residual MLP.

In eval mode every conv-BN, the RepVGGDW sum and each BN_Linear are affine maps, so the official
``utils.replace_batchnorm`` turns them into plain convs/linears and averages the two heads into
one ``classifier``. Its deploy keys are those of the *training* model after that in-place surgery:
RepViT has no deploy constructor. This module writes exactly those keys (fixtures in
``tests/fixtures/repvit``) and builds a deploy model of its own that loads them directly.
SE (ReLU/sigmoid) and GELU are not linear and stay.

The architecture is read from the tensors: block kinds from key names, widths, hidden widths, SE
widths and kernel sizes from shapes, classes and distillation from the head. Strides are not
stored: 2 for both stem convs and every ``down`` block, as in the official code.

Layouts (``Plan.layout``):
- ``official``: ``features.0.{0,2}`` stem, ``features.i`` blocks, ``classifier.classifier[_dist]``;
  deploy ``classifier``. Checkpoints of its DeiT-style ``main.py`` (``model``/``model_ema``).
- ``timm``: ``stem.conv1|conv2``, ``stages.S.downsample.{pre_block,spatial_downsample,
  channel_downsample,ffn}``, ``stages.S.blocks.J.{token_mixer,se,channel_mixer}``, ``head.head[_dist]``;
  deploy = timm's model after ``reparameterize_model`` (``...token_mixer.weight``, ``head.weight``).
  Only with an explicit ``--arch repvit``: under ``--arch auto`` timm's layout goes to conv-bn.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Mapping
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..checkpoint import Checkpoint, float_dtype, load_strict
from ..errors import BadInput, KeyMismatch
from ..fold import add_centered, add_identity, bn_scale_shift, fold_bn, fold_bn_into_next
from ..fuser import IMAGENET_MEAN, IMAGENET_STD, Done, EvalTransform, Fused, Fuser, NotThisArch, Options, Plan

LAYOUTS = ("official", "timm")
CUSTOM = "RepViT-custom"
SE_RATIO = 0.25  # timm SqueezeExcite(dim, 0.25): hidden = make_divisible(dim / 4, 8)

# Official variants as (widths, depths) per stage, in timm's terms: stage 0 has `depth` mix blocks;
# every later stage is a pre-block (mix, no SE), a down block, then `depth` mix blocks. SE is on
# every other mix block of a stage, starting with the first. This reproduces the official cfg
# tables (checked against tests/fixtures/repvit).
VARIANTS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "RepViT-M0.6": ((40, 80, 160, 320), (1, 1, 8, 1)),
    "RepViT-M0.9": ((48, 96, 192, 384), (2, 2, 14, 2)),
    "RepViT-M1.0": ((56, 112, 224, 448), (2, 2, 14, 2)),
    "RepViT-M1.1": ((64, 128, 256, 512), (2, 2, 12, 2)),
    "RepViT-M1.5": ((64, 128, 256, 512), (4, 4, 24, 4)),
    "RepViT-M2.3": ((80, 160, 320, 640), (6, 6, 34, 2)),
}
OFFICIAL_MODELS = {v: "repvit_m" + v.split("-M")[1].replace(".", "_").lower() for v in VARIANTS}  # repvit_m1_0
# timm's names: the same backbones (no m0_6), plus its "legacy" models (RepVGGDW's 1x1 with a BN,
# no outer BN: RepViT's first release) under older names.
TIMM_MODELS = {v: m for v, m in OFFICIAL_MODELS.items() if v != "RepViT-M0.6"}
TIMM_LEGACY: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "repvit_m1": ((48, 96, 192, 384), (2, 2, 14, 2)),
    "repvit_m2": ((64, 128, 256, 512), (2, 2, 12, 2)),
    "repvit_m3": ((64, 128, 256, 512), (4, 4, 18, 2)),
}


def make_divisible(v: float, divisor: int = 8) -> int:
    """timm's ``make_divisible(v, divisor, round_limit=0.)`` (SE hidden widths)."""
    return max(divisor, int(v + divisor / 2) // divisor * divisor)


def _mix(dim: int, se: bool, kernel: int = 3) -> dict[str, Any]:
    return {
        "kind": "mix",
        "dim": dim,
        "out": dim,
        "hidden": 2 * dim,
        "se": make_divisible(dim * SE_RATIO) if se else 0,
        "kernel": kernel,
    }


def config_from_stages(
    widths: tuple[int, ...],
    depths: tuple[int, ...],
    num_classes: int = 1000,
    distillation: bool = False,
    in_chans: int = 3,
    legacy: bool = False,
) -> dict[str, Any]:
    """The explicit config of a RepViT given per-stage widths and depths (timm's parameters)."""
    if len(widths) != len(depths) or not widths:
        raise BadInput(f"RepViT: widths {widths} and depths {depths} need one entry per stage")
    blocks: list[dict[str, Any]] = []
    for s, (w, d) in enumerate(zip(widths, depths, strict=True)):
        if s:
            prev = widths[s - 1]
            blocks.append(_mix(prev, se=False))  # timm's downsample.pre_block
            blocks.append({"kind": "down", "dim": prev, "out": w, "hidden": 2 * w, "se": 0, "kernel": 3})
        blocks += [_mix(w, se=j % 2 == 0) for j in range(d)]
    config = {
        "in_chans": in_chans,
        "stem": [widths[0] // 2, widths[0]],
        "blocks": blocks,
        "num_classes": num_classes,
        "distillation": bool(distillation and num_classes),
        "legacy": legacy,
    }
    return check_config(config, "timm" if legacy else "official")


def _short(name: str) -> str:
    s = re.sub(r"[-_.\s]", "", name.strip().lower())
    return s[len("repvit") :] if s.startswith("repvit") else s


def lookup_variant(name: str) -> str:
    """The official name of ``name`` ("m1_0", "repvit_m1_0", "RepViT-M1.0" -> "RepViT-M1.0")."""
    for official in VARIANTS:
        if _short(official) == _short(name):
            return official
    raise BadInput(f"unknown RepViT variant `{name}` (known: {', '.join(VARIANTS)})")


# --------------------------------------------------------------------------- config


_BLOCK_KEYS = ("kind", "dim", "out", "hidden", "se", "kernel")


def _int(v: Any, what: str, low: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise BadInput(f"RepViT config: {what} must be an integer >= {low}, got {v!r}")
    return v


def timm_stages(blocks: list[dict[str, Any]]) -> list[tuple[int | None, list[int]]]:
    """Group block indices as timm does: [(index of the down block or None, [block indices])].

    A down block's pre-block (the mix block just before it) is part of its downsample; the
    first stage has no downsample. Raises BadInput where timm's structure cannot hold the chain.
    """
    stages: list[tuple[int | None, list[int]]] = [(None, [])]
    for i, b in enumerate(blocks):
        if b["kind"] == "down":
            if i == 0 or blocks[i - 1]["kind"] != "mix" or not stages[-1][1] or stages[-1][1][-1] != i - 1:
                raise BadInput("RepViT config: in timm's layout every down block follows a mix block (its pre_block)")
            if b["se"]:
                raise BadInput("RepViT config: timm's layout has no SE in a down block")
            stages[-1][1].pop()
            stages.append((i, []))
        else:
            stages[-1][1].append(i)
    if not stages[0][1]:
        raise BadInput("RepViT config: timm's first stage needs at least one block")
    return stages


def check_config(config: Mapping[str, Any], layout: str) -> dict[str, Any]:
    """Validate an explicit config (``Plan.config``); return a plain copy. BadInput if invalid."""
    if layout not in LAYOUTS:
        raise BadInput(f"unknown RepViT layout `{layout}` (known: {', '.join(LAYOUTS)})")
    if not isinstance(config, Mapping):
        raise BadInput("RepViT config is not a mapping")
    try:
        cfg = {k: config[k] for k in ("in_chans", "stem", "blocks", "num_classes", "distillation", "legacy")}
    except KeyError as e:
        raise BadInput(f"RepViT config lacks {e}") from None
    extra = set(config) - set(cfg) - {"timm_model"}
    if extra:
        raise BadInput(f"RepViT config has unknown entries {sorted(extra)}")
    out: dict[str, Any] = {"in_chans": _int(cfg["in_chans"], "in_chans")}
    stem = cfg["stem"]
    if not isinstance(stem, (list, tuple)) or len(stem) != 2:
        raise BadInput(f"RepViT config: stem must be [half width, width], got {stem!r}")
    out["stem"] = [_int(stem[0], "stem[0]"), _int(stem[1], "stem[1]")]
    if not isinstance(cfg["blocks"], (list, tuple)) or not cfg["blocks"]:
        raise BadInput("RepViT config: blocks must be a non-empty list")
    blocks, width = [], out["stem"][1]
    for i, b in enumerate(cfg["blocks"]):
        if not isinstance(b, Mapping) or set(b) != set(_BLOCK_KEYS):
            raise BadInput(f"RepViT config: block {i} must have exactly {list(_BLOCK_KEYS)}")
        if b["kind"] not in ("mix", "down"):
            raise BadInput(f"RepViT config: block {i} kind {b['kind']!r} (known: mix, down)")
        nb = {"kind": b["kind"]}
        for k in ("dim", "out", "hidden", "kernel"):
            nb[k] = _int(b[k], f"block {i} {k}")
        nb["se"] = _int(b["se"], f"block {i} se", 0)
        if nb["dim"] != width:
            raise BadInput(f"RepViT config: block {i} takes {nb['dim']} channels but gets {width}")
        if nb["kind"] == "mix" and nb["out"] != nb["dim"]:
            raise BadInput(f"RepViT config: mix block {i} must keep its width ({nb['dim']} -> {nb['out']})")
        if nb["kernel"] % 2 == 0:
            raise BadInput(f"RepViT config: block {i} kernel {nb['kernel']} must be odd")
        blocks.append(nb)
        width = nb["out"]
    out["blocks"] = blocks
    out["num_classes"] = _int(cfg["num_classes"], "num_classes", 0)
    for k in ("distillation", "legacy"):
        if not isinstance(cfg[k], bool):
            raise BadInput(f"RepViT config: {k} must be true or false")
        out[k] = cfg[k]
    if out["distillation"] and not out["num_classes"]:
        raise BadInput("RepViT config: a distillation head needs num_classes > 0")
    if layout == "official" and out["legacy"]:
        raise BadInput("RepViT config: `legacy` (1x1 conv with BN) exists only in timm's layout")
    if layout == "timm":
        timm_stages(blocks)
    if "timm_model" in config:
        if layout != "timm" or not isinstance(config["timm_model"], str):
            raise BadInput("RepViT config: timm_model is a timm model name, for the timm layout only")
        out["timm_model"] = config["timm_model"]
    return out


# --------------------------------------------------------------------------- modules


class ConvBN(nn.Sequential):
    """Conv2d (no bias) + BatchNorm2d under the names ``c``/``bn`` (official Conv2d_BN, timm ConvNorm)."""

    def __init__(self, cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1):
        super().__init__()
        self.add_module("c", nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(cout))


class RepDW(nn.Module):
    """RepVGGDW: ``bn(dw_kxk_bn(x) + dw_1x1(x) + x)``; legacy (timm): the 1x1 has a BN, no outer BN."""

    def __init__(self, dim: int, k: int, legacy: bool = False):
        super().__init__()
        self.conv = ConvBN(dim, dim, k, 1, dim)
        self.conv1: nn.Module = ConvBN(dim, dim, 1, 1, dim) if legacy else nn.Conv2d(dim, dim, 1, groups=dim)
        self.bn = None if legacy else nn.BatchNorm2d(dim)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x) + self.conv1(x) + x
        return y if self.bn is None else self.bn(y)


class SqueezeExcite(nn.Module):
    """timm's SEModule as RepViT uses it: mean -> fc1 -> ReLU -> fc2 -> sigmoid -> scale."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        s = self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(s)


class NormLinear(nn.Sequential):
    """BatchNorm1d then Linear under the names ``bn``/``l`` (official BN_Linear, timm NormLinear)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.add_module("bn", nn.BatchNorm1d(dim))
        self.add_module("l", nn.Linear(dim, num_classes))


class Head(nn.Module):
    """The training head: one NormLinear, or two averaged (distillation, eval mode)."""

    def __init__(self, dim: int, num_classes: int, distillation: bool, names: tuple[str, str]):
        super().__init__()
        self.names = names
        self.add_module(names[0], NormLinear(dim, num_classes))
        if distillation:
            self.add_module(names[1], NormLinear(dim, num_classes))

    def heads(self) -> list[NormLinear]:
        return [getattr(self, n) for n in self.names if hasattr(self, n)]

    def forward(self, x: Tensor) -> Tensor:
        outs = [h(x) for h in self.heads()]
        return outs[0] if len(outs) == 1 else (outs[0] + outs[1]) / 2


class Residual(nn.Module):
    """``x + m(x)`` (official ``Residual``; the attribute is ``m``)."""

    def __init__(self, m: nn.Module):
        super().__init__()
        self.m = m

    def forward(self, x: Tensor) -> Tensor:
        return x + self.m(x)


class Mlp(nn.Module):
    """timm's RepVitMlp: ``conv2(GELU(conv1(x)))`` (no residual inside)."""

    def __init__(self, conv1: nn.Module, conv2: nn.Module):
        super().__init__()
        self.conv1, self.act, self.conv2 = conv1, nn.GELU(), conv2

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.act(self.conv1(x)))


class _Parts:
    """Makes the fusable parts, in training or deploy form (a deploy part is one conv/linear)."""

    def __init__(self, deploy: bool, legacy: bool):
        self.deploy, self.legacy = deploy, legacy

    def conv(self, cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1) -> nn.Module:
        if self.deploy:
            return nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=True)
        return ConvBN(cin, cout, k, stride, groups)

    def repdw(self, dim: int, k: int) -> nn.Module:
        return nn.Conv2d(dim, dim, k, 1, (k - 1) // 2, groups=dim) if self.deploy else RepDW(dim, k, self.legacy)

    def se(self, dim: int, hidden: int) -> nn.Module:
        return SqueezeExcite(dim, hidden) if hidden else nn.Identity()

    def mlp(self, b: dict[str, Any]) -> tuple[nn.Module, nn.Module]:
        return self.conv(b["out"], b["hidden"]), self.conv(b["hidden"], b["out"])

    def head(self, dim: int, cfg: dict[str, Any], names: tuple[str, str]) -> nn.Module:
        nc = cfg["num_classes"]
        if not nc:
            return nn.Identity()
        return nn.Linear(dim, nc) if self.deploy else Head(dim, nc, cfg["distillation"], names)


class OfficialBlock(nn.Module):
    """The official RepViTBlock's names: ``token_mixer`` (Sequential) then ``channel_mixer`` (Residual)."""

    def __init__(self, b: dict[str, Any], parts: _Parts):
        super().__init__()
        dim, k = b["dim"], b["kernel"]
        if b["kind"] == "mix":
            mixer = [parts.repdw(dim, k), parts.se(dim, b["se"])]
        else:
            mixer = [parts.conv(dim, dim, k, 2, dim), parts.se(dim, b["se"]), parts.conv(dim, b["out"])]
        self.token_mixer = nn.Sequential(*mixer)
        conv1, conv2 = parts.mlp(b)
        self.channel_mixer = Residual(nn.Sequential(conv1, nn.GELU(), conv2))

    def forward(self, x: Tensor) -> Tensor:
        return self.channel_mixer(self.token_mixer(x))


class TimmBlock(nn.Module):
    """timm's RepViTBlock: ``token_mixer``, ``se``, ``channel_mixer`` (an Mlp with a residual)."""

    def __init__(self, b: dict[str, Any], parts: _Parts):
        super().__init__()
        self.token_mixer = parts.repdw(b["dim"], b["kernel"])
        self.se = parts.se(b["dim"], b["se"])
        self.channel_mixer = Mlp(*parts.mlp(b))

    def forward(self, x: Tensor) -> Tensor:
        x = self.se(self.token_mixer(x))
        return x + self.channel_mixer(x)


class TimmDownsample(nn.Module):
    """timm's RepVitDownsample: ``pre_block``, ``spatial_downsample``, ``channel_downsample``, ``ffn``."""

    def __init__(self, pre: dict[str, Any], b: dict[str, Any], parts: _Parts):
        super().__init__()
        self.pre_block = TimmBlock(pre, parts)
        self.spatial_downsample = parts.conv(b["dim"], b["dim"], b["kernel"], 2, b["dim"])
        self.channel_downsample = parts.conv(b["dim"], b["out"])
        self.ffn = Mlp(*parts.mlp(b))

    def forward(self, x: Tensor) -> Tensor:
        x = self.channel_downsample(self.spatial_downsample(self.pre_block(x)))
        return x + self.ffn(x)


class TimmStage(nn.Module):
    def __init__(self, downsample: nn.Module, blocks: list[nn.Module]):
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.downsample(x))


class TimmStem(nn.Module):
    def __init__(self, conv1: nn.Module, conv2: nn.Module):
        super().__init__()
        self.conv1, self.act1, self.conv2 = conv1, nn.GELU(), conv2

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.act1(self.conv1(x)))


class RepViT(nn.Module):
    """RepViT in either layout and form, built from an explicit config (``check_config``).

    ``deploy=True`` builds the deploy form directly: every conv-BN is a conv with bias, every
    RepVGGDW one depthwise conv with bias, the head one Linear. Its state_dict keys are the
    official model's after ``replace_batchnorm`` (timm layout: after ``reparameterize_model``).
    """

    def __init__(self, config: Mapping[str, Any], deploy: bool = False, layout: str = "official"):
        super().__init__()
        cfg = check_config(config, layout)
        self.layout, self.deploy = layout, deploy
        parts = _Parts(deploy, cfg["legacy"])
        half, width = cfg["stem"]
        conv1, conv2 = parts.conv(cfg["in_chans"], half, 3, 2), parts.conv(half, width, 3, 2)
        blocks = cfg["blocks"]
        dim = blocks[-1]["out"]
        if layout == "official":
            stem = nn.Sequential(conv1, nn.GELU(), conv2)
            self.features = nn.ModuleList([stem, *(OfficialBlock(b, parts) for b in blocks)])
            self.classifier = parts.head(dim, cfg, ("classifier", "classifier_dist"))
        else:
            self.stem = TimmStem(conv1, conv2)
            stages = []
            for down, idx in timm_stages(blocks):
                ds = nn.Identity() if down is None else TimmDownsample(blocks[down - 1], blocks[down], parts)
                stages.append(TimmStage(ds, [TimmBlock(blocks[i], parts) for i in idx]))
            self.stages = nn.Sequential(*stages)
            self.head = parts.head(dim, cfg, ("head", "head_dist"))

    def forward(self, x: Tensor) -> Tensor:
        if self.layout == "official":
            for f in self.features:
                x = f(x)
            return self.classifier(x.mean((2, 3)))
        return self.head(self.stages(self.stem(x)).mean((2, 3)))


def build_repvit(
    variant_or_config: str | Mapping[str, Any], deploy: bool = False, layout: str = "official", **overrides: Any
) -> RepViT:
    """A randomly initialised RepViT on the CPU (train mode, as ``torch.nn`` builds it).

    ``variant_or_config``: a variant name ("m1_0", "RepViT-M1.0") or an explicit config
    (``Plan.config``); ``overrides`` replace config entries (``num_classes``, ``distillation``, ...).

    Example::

        model = build_repvit("m0_6", num_classes=10, distillation=True)
    """
    if isinstance(variant_or_config, str):
        widths, depths = VARIANTS[lookup_variant(variant_or_config)]
        config = config_from_stages(widths, depths)
    else:
        config = dict(variant_or_config)
    config = {**config, **overrides}
    with torch.device("cpu"):
        return RepViT(config, deploy=deploy, layout=layout)


# --------------------------------------------------------------------------- detection


_OFFICIAL_HINT = "features.0.0.c.weight"
_TIMM_HINT = "stem.conv1.c.weight"


def find_layout(sd: Mapping[str, Tensor]) -> str:
    """``official`` or ``timm`` for a RepViT training state_dict; NotThisArch otherwise."""
    if _OFFICIAL_HINT in sd and any(k.startswith("features.1.token_mixer.") for k in sd):
        if "features.1.token_mixer.0.conv.c.weight" in sd or "features.1.token_mixer.2.c.weight" in sd:
            return "official"
    if _TIMM_HINT in sd and "stages.0.blocks.0.token_mixer.conv.c.weight" in sd:
        return "timm"
    if "features.0.0.weight" in sd and "features.1.token_mixer.0.weight" in sd:
        raise NotThisArch("already in deploy form (RepViT keys without BNs: `features.0.0.weight`): nothing to fuse")
    if "stem.conv1.weight" in sd and "stages.0.blocks.0.token_mixer.weight" in sd:
        raise NotThisArch("already in deploy form (timm RepViT keys without BNs): nothing to fuse")
    first = next(iter(sd), "")
    raise NotThisArch(
        f"no RepViT keys (`{_OFFICIAL_HINT}` + `features.1.token_mixer...`, or timm's `{_TIMM_HINT}`); "
        f"first key is `{first}`"
    )


def _shape(sd: Mapping[str, Tensor], key: str, dims: int | None = None) -> tuple[int, ...]:
    if key not in sd:
        raise KeyMismatch(f"RepViT checkpoint lacks `{key}`")
    shape = tuple(sd[key].shape)
    if dims is not None and len(shape) != dims:
        raise KeyMismatch(f"`{key}` has shape {shape}; expected {dims} dimensions")
    return shape


def _read_block(sd: Mapping[str, Tensor], kind: str, dw: str, se: str, pw: str | None, mlp1: str) -> dict[str, Any]:
    """One block's entry from the shapes under its parts' prefixes."""
    shape = _shape(sd, f"{dw}.c.weight" if kind == "down" else f"{dw}.conv.c.weight", 4)
    dim, k = shape[0], shape[-1]
    out = _shape(sd, f"{pw}.c.weight", 4)[0] if pw else dim
    hidden = _shape(sd, f"{mlp1}.c.weight", 4)[0]
    se_key = f"{se}.fc1.weight"
    return {
        "kind": kind,
        "dim": dim,
        "out": out,
        "hidden": hidden,
        "se": sd[se_key].shape[0] if se_key in sd else 0,
        "kernel": k,
    }


def _indices(sd: Mapping[str, Tensor], pattern: str) -> list[int]:
    rx = re.compile(pattern)
    found = sorted({int(m.group(1)) for k in sd if (m := rx.match(k))})
    if found != list(range(len(found))):
        missing = sorted(set(range(max(found) + 1)) - set(found))[0]
        raise KeyMismatch(f"RepViT checkpoint has no keys for index {missing} of `{pattern.split('(')[0]}`")
    return found


def _head(sd: Mapping[str, Tensor], prefix: str, dist_prefix: str) -> tuple[int, bool]:
    key = f"{prefix}.l.weight"
    if key not in sd:
        return 0, False
    return int(sd[key].shape[0]), f"{dist_prefix}.l.weight" in sd


def read_config(sd: Mapping[str, Tensor], layout: str) -> dict[str, Any]:
    """The explicit config of a training state_dict, from key names and shapes only."""
    if layout == "official":
        stem0 = "features.0.0"
        blocks = []
        for i in _indices(sd, r"features\.(\d+)\.")[1:]:
            p = f"features.{i}"
            kind = "down" if f"{p}.token_mixer.2.c.weight" in sd else "mix"
            mix = f"{p}.token_mixer"
            blocks.append(
                _read_block(
                    sd, kind, f"{mix}.0", f"{mix}.1", f"{mix}.2" if kind == "down" else None, f"{p}.channel_mixer.m.0"
                )
            )
        stem = [_shape(sd, f"{stem0}.c.weight", 4)[0], _shape(sd, "features.0.2.c.weight", 4)[0]]
        nc, dist = _head(sd, "classifier.classifier", "classifier.classifier_dist")
        legacy = False
    else:
        stem0 = "stem.conv1"
        blocks = []
        for s in _indices(sd, r"stages\.(\d+)\."):
            if s:
                d = f"stages.{s}.downsample"
                pre = f"{d}.pre_block"
                blocks.append(
                    _read_block(sd, "mix", f"{pre}.token_mixer", f"{pre}.se", None, f"{pre}.channel_mixer.conv1")
                )
                blocks.append(
                    _read_block(
                        sd, "down", f"{d}.spatial_downsample", f"{d}.se", f"{d}.channel_downsample", f"{d}.ffn.conv1"
                    )
                )
            for j in _indices(sd, rf"stages\.{s}\.blocks\.(\d+)\."):
                p = f"stages.{s}.blocks.{j}"
                blocks.append(_read_block(sd, "mix", f"{p}.token_mixer", f"{p}.se", None, f"{p}.channel_mixer.conv1"))
        stem = [_shape(sd, f"{stem0}.c.weight", 4)[0], _shape(sd, "stem.conv2.c.weight", 4)[0]]
        nc, dist = _head(sd, "head.head", "head.head_dist")
        legacy = "stages.0.blocks.0.token_mixer.conv1.c.weight" in sd
    try:
        return check_config(
            {
                "in_chans": _shape(sd, f"{stem0}.c.weight", 4)[1],
                "stem": stem,
                "blocks": blocks,
                "num_classes": nc,
                "distillation": dist,
                "legacy": legacy,
            },
            layout,
        )
    except BadInput as e:
        raise KeyMismatch(f"the RepViT weights do not chain: {e}") from None


def _check_keys(sd: Mapping[str, Tensor], config: dict[str, Any], layout: str) -> None:
    """Every key of ``sd`` is one the config's training model has, with the same shape."""
    with torch.device("meta"):
        expected = RepViT(config, deploy=False, layout=layout).state_dict()
    foreign = [k for k in sd if k not in expected]
    if foreign:
        raise NotThisArch(f"{len(foreign)} keys are not RepViT's ({layout} layout), e.g. `{foreign[0]}`")
    for k, v in expected.items():
        if k not in sd:
            if k.endswith("num_batches_tracked"):
                continue  # exporters drop it; load_strict fills it in
            raise KeyMismatch(f"RepViT checkpoint lacks `{k}`")
        if tuple(sd[k].shape) != tuple(v.shape):
            raise KeyMismatch(f"`{k}` has shape {tuple(sd[k].shape)}, expected {tuple(v.shape)} for this RepViT")


_BACKBONE = ("in_chans", "stem", "blocks")


@functools.cache
def _variant_configs() -> dict[str, dict[str, Any]]:
    return {name: config_from_stages(*stages) for name, stages in VARIANTS.items()}


def match_variant(config: Mapping[str, Any]) -> str:
    """The official name of the backbone ``config`` describes, or ``RepViT-custom``."""
    for name, ref in _variant_configs().items():
        if all(config[k] == ref[k] for k in _BACKBONE):
            return name
    return CUSTOM


def _timm_name(config: Mapping[str, Any], variant: str) -> str | None:
    if config["legacy"]:
        for name, stages in TIMM_LEGACY.items():
            ref = config_from_stages(*stages, legacy=True)
            if all(config[k] == ref[k] for k in _BACKBONE):
                return name
        return None
    return TIMM_MODELS.get(variant)


def _recorded_model(args: Mapping[str, Any], extras: Mapping[str, Any]) -> str | None:
    for v in (args.get("model"), extras.get("arch")):
        if isinstance(v, str) and "repvit" in v.lower():
            return v
    return None


# --------------------------------------------------------------------------- fusion


def _bn(bn: Any, name: str) -> tuple[Tensor, Tensor]:
    return bn_scale_shift(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps, name)


def fold_conv_bn(m: ConvBN, name: str) -> tuple[Tensor, Tensor]:
    """(weight, bias) in float64 of the conv equal to a ConvBN in eval mode."""
    conv: Any = m.c
    s, t = _bn(m.bn, f"{name}.bn")
    return fold_bn(conv.weight, None, s, t)


def fold_repdw(m: RepDW, name: str) -> tuple[Tensor, Tensor]:
    """(weight, bias) in float64 of the depthwise conv equal to a RepVGGDW in eval mode:
    ``s * (W_kxk' + pad(W_1x1) + I)`` and ``s * (b_kxk' + b_1x1 - mean) + beta``."""
    kernel, bias = fold_conv_bn(m.conv, f"{name}.conv")
    if isinstance(m.conv1, ConvBN):
        w1, b1 = fold_conv_bn(m.conv1, f"{name}.conv1")
    else:
        conv1: Any = m.conv1
        w1 = conv1.weight.detach().to(torch.float64)
        b1 = torch.zeros(kernel.shape[0], dtype=torch.float64) if conv1.bias is None else conv1.bias.detach()
    add_centered(kernel, w1)
    add_identity(kernel, torch.ones(kernel.shape[0], dtype=torch.float64))
    bias = bias + b1.to(torch.float64)
    if m.bn is not None:
        s, t = _bn(m.bn, f"{name}.bn")
        kernel, bias = fold_bn(kernel, bias, s, t)
    return kernel, bias


def fold_head(m: Head, name: str) -> tuple[Tensor, Tensor]:
    """(weight, bias) in float64 of the Linear equal to the head: each BN folds into its Linear
    (input side); with distillation the two are averaged, as the official fusion does."""
    folded = []
    for sub, head in zip(m.names, m.heads(), strict=False):
        h: Any = head
        s, t = _bn(h.bn, f"{name}.{sub}.bn")
        folded.append(fold_bn_into_next(h.l.weight, h.l.bias, s, t))
    if len(folded) == 1:
        return folded[0]
    (w0, b0), (w1, b1) = folded
    return (w0 + w1) / 2, (b0 + b1) / 2


def _fusable(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """The fusable parts of a training RepViT (ConvBN, RepVGGDW, SE, head), in forward order,
    each once: the ConvBNs inside a RepVGGDW belong to it."""
    for name, child in module.named_children():
        if isinstance(child, (Head, RepDW, SqueezeExcite, ConvBN)):
            yield f"{prefix}{name}", child
        else:
            yield from _fusable(child, f"{prefix}{name}.")


# --------------------------------------------------------------------------- eval transform


def _positive_int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def official_eval_transform(args: Mapping[str, Any]) -> EvalTransform:
    """RepViT's ``data/datasets.py build_transform(is_train=False)`` for the recorded ``args``.

    Default: ``Resize(int(256 / 224 * input_size), bicubic)`` + ``CenterCrop(input_size)``;
    with ``args.finetune`` set: ``Resize((input_size, input_size), bicubic)``, no crop; at
    ``input_size <= 32`` no resize at all (the image is taken as it is: repfuse resizes to
    ``input_size`` square). ImageNet's default mean/std in every case.
    """
    size = _positive_int(args.get("input_size"))
    where = "args from the checkpoint" if size else "main.py defaults"
    size = size or 224
    if args.get("finetune"):
        crop_pct, how = None, f"resize {size}x{size}, no crop (finetune run)"
    elif size > 32:
        short = int(256 / 224 * size)
        crop_pct, how = size / short, f"resize {short}, center crop {size}"
    else:
        crop_pct, how = None, f"no resize at {size} px (images taken as {size}x{size})"
    return EvalTransform(
        size=size,
        interpolation="bicubic",
        crop_pct=crop_pct,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        source=f"RepViT data/datasets.py eval: {how}, bicubic, ImageNet mean/std ({where})",
    )


def timm_eval_transform(args: Mapping[str, Any]) -> EvalTransform:
    """timm's pretrained_cfg for repvit_* (224, crop_pct 0.95, bicubic, ImageNet mean/std),
    overridden by a timm ``train.py``'s recorded ``input_size``/``img_size``/``crop_pct``/
    ``interpolation``/``mean``/``std``."""
    size = 224
    shape = args.get("input_size")
    if isinstance(shape, (list, tuple)) and len(shape) == 3 and _positive_int(shape[-1]):
        size = shape[-1]
    elif _positive_int(args.get("img_size")):
        size = args["img_size"]
    crop = args.get("crop_pct")
    crop_pct = float(crop) if isinstance(crop, (int, float)) and not isinstance(crop, bool) and 0 < crop <= 1 else 0.95
    interp = args.get("interpolation")
    interp = interp if interp in ("bilinear", "bicubic", "nearest") else "bicubic"

    def triple(v: Any, default: tuple[float, ...]) -> tuple[float, ...]:
        ok = isinstance(v, (list, tuple)) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v)
        return tuple(float(x) for x in v) if ok else default

    recorded = [k for k in ("input_size", "img_size", "crop_pct", "interpolation", "mean", "std") if args.get(k)]
    return EvalTransform(
        size=size,
        interpolation=interp,
        crop_pct=crop_pct,
        mean=triple(args.get("mean"), IMAGENET_MEAN),
        std=triple(args.get("std"), IMAGENET_STD),
        source=f"timm repvit pretrained_cfg (resize {round(size / crop_pct)}, center crop {size}, {interp})"
        + (f", args from the checkpoint: {', '.join(recorded)}" if recorded else ""),
    )


# --------------------------------------------------------------------------- the fuser


class RepViTFuser(Fuser):
    """RepViT training checkpoints (official or timm names) -> deploy weights in the same layout."""

    name = "repvit"
    summary = "RepViT (THU-MIG official layout; timm's with --arch repvit): RepVGGDW, conv-BN, BN-Linear heads"

    def detect(self, ckpt: Checkpoint, options: Options) -> Plan:
        sd = ckpt.state_dict
        layout = find_layout(sd)
        if layout == "timm" and options.under_auto:
            raise NotThisArch(
                "timm's RepViT layout (`stem.conv1.c`, `stages.S.blocks.J`): --arch auto leaves it to conv-bn; "
                "--arch repvit writes timm's re-parameterized layout"
            )
        config = read_config(sd, layout)
        _check_keys(sd, config, layout)
        variant = match_variant(config)
        notes: list[str] = []
        if options.variant:
            wanted = lookup_variant(options.variant)
            if variant != wanted:
                raise BadInput(f"{ckpt.path}: --variant {wanted} does not fit the weights (they are {variant})")
        if layout == "timm":
            notes.append("timm layout (stem/stages/head.head): the deploy file uses timm's re-parameterized names")
            timm_model = _timm_name(config, variant)
            if timm_model:
                config["timm_model"] = timm_model
            if config["legacy"]:
                notes.append("timm legacy RepViT (the RepVGGDW 1x1 has its own BN and there is no outer BN)")
        recorded = _recorded_model(ckpt.args, ckpt.extras)
        expected = {OFFICIAL_MODELS.get(variant), config.get("timm_model")} - {None}
        if recorded and expected and recorded not in expected:
            notes.append(
                f"the checkpoint records model `{recorded}` but its tensors are {variant}; the tensors were followed"
            )
        if config["distillation"]:
            notes.append("distillation head: classifier and classifier_dist are averaged into one linear (as in eval)")
        if not config["num_classes"]:
            notes.append("no classifier in the checkpoint: the model outputs pooled features")
        elif variant != CUSTOM and config["num_classes"] != 1000:
            notes.append(f"{variant} backbone with {config['num_classes']} classes")
        if variant == CUSTOM:
            notes.append("custom RepViT: strides follow RepViT's convention (2 in both stem convs and each down block)")
        size = _positive_int(ckpt.args.get("input_size")) if layout == "official" else None
        return Plan(
            arch=self.name,
            variant=variant,
            layout=layout,
            config=config,
            notes=notes,
            input_size=(config["in_chans"], size or 224, size or 224),
            num_classes=config["num_classes"] or None,
        )

    def build_train(self, plan: Plan, state_dict: dict[str, Tensor]) -> nn.Module:
        with torch.device("meta"):
            model = RepViT(plan.config, deploy=False, layout=plan.layout)
        return load_strict(model, state_dict, f"RepViT training model ({plan.variant}, {plan.layout} layout)")

    def fuse(self, plan: Plan, state_dict: dict[str, Tensor], train: nn.Module, done: Done | None = None) -> Fused:
        if not isinstance(train, RepViT):
            raise TypeError(f"RepViTFuser.fuse needs the model from build_train, got {type(train).__name__}")
        dtype = float_dtype(state_dict)
        out: dict[str, Tensor] = {}
        # branch merges: each RepVGGDW (kxk + 1x1 + identity) and the two averaged heads
        counts = {"bn_folded": 0, "branch_merges": 0, "chain_merges": 0}
        unfused: list[tuple[str, str]] = []
        for name, m in _fusable(train):
            if isinstance(m, SqueezeExcite):
                for k, v in m.state_dict().items():
                    out[f"{name}.{k}"] = v.contiguous().clone()
                unfused.append((name, "squeeze-excitation scales by its input: not linear, kept"))
            else:
                if isinstance(m, Head):
                    w, b = fold_head(m, name)
                    counts["bn_folded"] += len(m.heads())
                    counts["branch_merges"] += len(m.heads()) - 1
                elif isinstance(m, RepDW):
                    w, b = fold_repdw(m, name)
                    counts["bn_folded"] += 1 + (m.bn is not None) + isinstance(m.conv1, ConvBN)
                    counts["branch_merges"] += 1
                else:
                    w, b = fold_conv_bn(cast(ConvBN, m), name)
                    counts["bn_folded"] += 1
                out[f"{name}.weight"] = w.to(dtype).contiguous()
                out[f"{name}.bias"] = b.to(dtype).contiguous()
            if done is not None:
                done([*m.parameters(), *m.buffers()])
        return Fused(self.deploy_state(plan, out, {}), dict(plan.config), counts, unfused)

    def build_deploy(self, plan: Plan) -> nn.Module:
        with torch.device("meta"):
            return RepViT(plan.config, deploy=True, layout=plan.layout).eval()

    def check_config(self, plan: Plan, model: str | None, where: str) -> None:
        try:
            check_config(plan.config, plan.layout)
        except BadInput as e:
            raise BadInput(f"{where}: {e}") from None

    def eval_transform(self, plan: Plan, ckpt: Checkpoint) -> EvalTransform:
        if plan.layout == "timm":
            return timm_eval_transform(ckpt.args)
        return official_eval_transform(ckpt.args)
