"""FastViT (apple/ml-fastvit ``models/fastvit.py`` and timm's ``fastvit_*``): structural re-param.

What folds, per part of the network (each part is affine in its input in eval mode):
- MobileOne blocks (stem, the 1x1 of each patch embedding, ``conv_exp``): branches into one conv
  (``mobileone.fold_block``).
- RepMixer: ``x + layer_scale * (mixer(x) - norm(x))`` into one depthwise conv (identity kernel
  plus the scaled difference of the two folded MobileOne blocks).
- Large-kernel patch embedding (RepLKNet style): 7x7 conv+BN + 3x3 conv+BN into one 7x7 conv. The
  official forward computes its GELU and throws it away (``self.activation(out)``), so there is none.
- RepCPE positional encoding: ``pe(x) + x`` into one depthwise conv.

What stays, as in the official inference-mode model: each ConvFFN's ``conv.bn`` (its depthwise
conv has no bias to take it), each attention block's ``norm`` BatchNorm (it feeds the attention,
not a conv), the layer scales of the FFN and attention branches, and ``conv_exp``'s SE.

The network is read from the tensors: stage depths from the keys, widths and kernel sizes from
the weight shapes, token mixers from which keys a stage has, where RepCPE and patch embeddings
sit from the ``network.N`` entries they occupy (a RepCPE takes its own slot and shifts the later
indices). Not stored and taken from the official code: the 2-stride of the patch embeddings and
the stem, and the attention head width (32).

Two layouts, the same model under other names (timm's ``checkpoint_filter_fn`` documents the map):
- ``official``: ``patch_embed.{0,1,2}``, ``network.N`` (a stage, a ``PatchEmbed`` ``.proj`` or a
  ``RepCPE`` ``.pe``), ``convffn``, ``layer_scale``, ``lkb_origin``, ``conv_exp``, ``head``;
  deploy ``reparam_conv`` / ``lkb_reparam`` (``fastvit_XX(inference_mode=True)``).
- ``timm``: ``stem``, ``stages.S.{downsample.proj,pos_emb.pos_enc,blocks.J}``, ``mlp``,
  ``layer_scale.gamma``, ``large_conv``, ``final_conv``, ``head.fc``; deploy ``reparam_conv``.
"""

from __future__ import annotations

import dataclasses
import re
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..checkpoint import Checkpoint, float_dtype, load_strict
from ..errors import BadInput, KeyMismatch
from ..fold import add_centered, fold_bn, identity_kernel
from ..fuser import Done, EvalTransform, Fused, Fuser, NotThisArch, Options, Plan, recorded_transform
from .mobileone import (
    OFFICIAL_BLOCK,
    TIMM_FASTVIT_BLOCK,
    BlockNames,
    MobileOneBlock,
    SqueezeExcite,
    bn_count,
    bn_of,
    fold_block,
    timm_layout_under_auto,
)

_STRIDE = 2  # the stem's first two blocks and every patch embedding
HEAD_DIM = 32  # MHSA head width in the official code (not stored in the weights)
FFN_KERNEL = 7  # ConvFFN's depthwise conv


# --------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class _Names:
    block: BlockNames
    stem: str
    ffn: str
    large: str  # the large-kernel branch of a patch embedding
    large_reparam: str
    pe: str  # RepCPE's conv
    exp: str
    head: str
    gamma: bool  # layer scales are LayerScale modules holding `gamma` (timm) or bare parameters


LAYOUTS = {
    "official": _Names(
        OFFICIAL_BLOCK, "patch_embed", "convffn", "lkb_origin", "lkb_reparam", "pe", "conv_exp", "head", False
    ),
    "timm": _Names(
        TIMM_FASTVIT_BLOCK, "stem", "mlp", "large_conv", "reparam_conv", "pos_enc", "final_conv", "head.fc", True
    ),
}


# --------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class FastViTCfg:
    """A FastViT variant as the official constructors (``fastvit_t8`` ...) define it."""

    layers: tuple[int, ...]
    embed_dims: tuple[int, ...]
    mlp_ratios: tuple[float, ...]
    token_mixers: tuple[str, ...]
    pos_embs: tuple[int, ...] = (0, 0, 0, 0)  # RepCPE kernel per stage (0: none)
    downsamples: tuple[bool, ...] = (True, True, True, True)
    repmixer_kernel_size: int = 3
    down_patch_size: int = 7
    cls_ratio: float = 2.0
    num_classes: int = 1000
    in_chans: int = 3
    crop_pct: float = 0.9  # the official default_cfg's crop_pct (validate.py)

    def resolve(self) -> dict[str, Any]:
        n = len(self.layers)
        exp = int(self.embed_dims[-1] * self.cls_ratio)
        return check_config(
            {
                "layers": list(self.layers),
                "embed_dims": list(self.embed_dims),
                "mlp_hidden": [int(d * r) for d, r in zip(self.embed_dims, self.mlp_ratios, strict=True)],
                "token_mixers": list(self.token_mixers),
                "pos_embs": list(self.pos_embs),
                "downsamples": [
                    bool(self.downsamples[i] or self.embed_dims[i] != self.embed_dims[i + 1]) for i in range(n - 1)
                ],
                "repmixer_kernel_size": self.repmixer_kernel_size,
                "down_patch_size": self.down_patch_size,
                "down_small_kernel": 3,
                "layer_scale": True,
                "qkv_bias": False,
                "head_dim": HEAD_DIM,
                "exp_dim": exp,
                "se_hidden": int(exp * 0.0625),
                "num_classes": int(self.num_classes),
                "in_chans": int(self.in_chans),
            }
        )


_RM4 = ("repmixer",) * 4
_SA = ("repmixer", "repmixer", "repmixer", "attention")
_CPE = (0, 0, 0, 7)
VARIANTS: dict[str, FastViTCfg] = {
    "FastViT-T8": FastViTCfg((2, 2, 4, 2), (48, 96, 192, 384), (3, 3, 3, 3), _RM4),
    "FastViT-T12": FastViTCfg((2, 2, 6, 2), (64, 128, 256, 512), (3, 3, 3, 3), _RM4),
    "FastViT-S12": FastViTCfg((2, 2, 6, 2), (64, 128, 256, 512), (4, 4, 4, 4), _RM4),
    "FastViT-SA12": FastViTCfg((2, 2, 6, 2), (64, 128, 256, 512), (4, 4, 4, 4), _SA, _CPE),
    "FastViT-SA24": FastViTCfg((4, 4, 12, 4), (64, 128, 256, 512), (4, 4, 4, 4), _SA, _CPE),
    "FastViT-SA36": FastViTCfg((6, 6, 18, 6), (64, 128, 256, 512), (4, 4, 4, 4), _SA, _CPE, crop_pct=0.95),
    "FastViT-MA36": FastViTCfg((6, 6, 18, 6), (76, 152, 304, 608), (4, 4, 4, 4), _SA, _CPE, crop_pct=0.95),
}
CUSTOM = "FastViT-custom"
TIMM_MODELS = {n: "fastvit_" + n.split("-")[1].lower() for n in VARIANTS}


def lookup_variant(name: str) -> str:
    """The canonical name of ``name`` ("sa24", "fastvit_sa24", "FastViT-SA24" -> "FastViT-SA24")."""
    short = name.strip().lower().replace("-", "").replace("_", "").removeprefix("fastvit")
    for v in VARIANTS:
        if v.lower().replace("-", "").removeprefix("fastvit") == short:
            return v
    raise BadInput(f"unknown FastViT variant `{name}` (known: {', '.join(VARIANTS)})")


def check_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Validate an explicit config (``FastViTCfg.resolve`` / ``Plan.config``); return a plain copy."""
    keys = (
        "layers embed_dims mlp_hidden token_mixers pos_embs downsamples repmixer_kernel_size down_patch_size "
        "down_small_kernel layer_scale qkv_bias head_dim exp_dim se_hidden num_classes in_chans"
    ).split()
    try:
        cfg = {**dict(config), **{k: config[k] for k in keys}}
    except KeyError as e:
        raise BadInput(f"FastViT config lacks {e}") from None

    def ints(v: Any, n: int | None = None, low: int = 1) -> bool:
        return isinstance(v, list) and (n is None or len(v) == n) and all(type(i) is int and i >= low for i in v)

    n = len(cfg["layers"]) if isinstance(cfg["layers"], list) else 0
    ok = (
        n >= 1
        and ints(cfg["layers"])
        and ints(cfg["embed_dims"], n)
        and ints(cfg["mlp_hidden"], n)
        and ints(cfg["pos_embs"], n, 0)
        and isinstance(cfg["token_mixers"], list)
        and len(cfg["token_mixers"]) == n
        and all(t in ("repmixer", "attention") for t in cfg["token_mixers"])
        and isinstance(cfg["downsamples"], list)
        and len(cfg["downsamples"]) == n - 1
        and all(type(d) is bool for d in cfg["downsamples"])
        and all(type(cfg[k]) is bool for k in ("layer_scale", "qkv_bias"))
        and ints([cfg[k] for k in ("repmixer_kernel_size", "down_patch_size", "down_small_kernel", "head_dim")])
        and ints([cfg["exp_dim"], cfg["in_chans"]])
        and ints([cfg["se_hidden"], cfg["num_classes"]], low=0)
        and type(cfg.get("extra_folds", False)) is bool
    )
    if not ok:
        raise BadInput("FastViT config is not one repfuse writes (stage lists of unequal length or bad values)")
    dims = cfg["embed_dims"]
    for i, d in enumerate(cfg["downsamples"]):
        if not d and dims[i] != dims[i + 1]:
            raise BadInput(f"FastViT config: stages {i} and {i + 1} differ in width but have no patch embedding")
    for i, t in enumerate(cfg["token_mixers"]):
        if t == "attention" and dims[i] % cfg["head_dim"]:
            raise BadInput(
                f"FastViT config: attention stage {i} width {dims[i]} is not a multiple of {cfg['head_dim']}"
            )
    if cfg["exp_dim"] % dims[-1] or cfg["down_patch_size"] < cfg["down_small_kernel"]:
        raise BadInput("FastViT config: conv_exp width must be a multiple of the last stage's, small kernel <= patch")
    return cfg


# --------------------------------------------------------------------------- modules


def _conv_bn(cin: int, cout: int, k: int, stride: int, groups: int) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(conv=nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), bn=nn.BatchNorm2d(cout))
    )


class LayerScale(nn.Module):
    """timm's LayerScale2d-style holder: ``x * gamma`` with ``gamma`` of shape (dim, 1, 1)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


def _add_scale(module: nn.Module, name: str, dim: int, names: _Names) -> None:
    if names.gamma:
        module.add_module(name, LayerScale(dim))
    else:
        module.register_parameter(name, nn.Parameter(torch.ones(dim, 1, 1)))


def _scale(module: nn.Module, name: str) -> Tensor | None:
    """The (dim, 1, 1) layer scale ``name`` of ``module`` in either layout, or None."""
    s = getattr(module, name, None)
    if isinstance(s, LayerScale):
        return s.gamma
    return s


class RepMixer(nn.Module):
    """Train: ``x + ls * (mixer(x) - norm(x))``. Deploy: one depthwise conv ``reparam_conv``."""

    def __init__(self, dim: int, k: int, layer_scale: bool, deploy: bool, names: _Names) -> None:
        super().__init__()
        self.dim, self.k, self.deploy = dim, k, deploy
        if deploy:
            self.reparam_conv = nn.Conv2d(dim, dim, k, 1, k // 2, groups=dim, bias=True)
            return
        self.norm = MobileOneBlock(dim, dim, k, 1, dim, branches=0, scale=False, act="none", names=names.block)
        self.mixer = MobileOneBlock(dim, dim, k, 1, dim, branches=1, scale=True, act="none", names=names.block)
        if layer_scale:
            _add_scale(self, "layer_scale", dim, names)

    def forward(self, x: Tensor) -> Tensor:
        if self.deploy:
            return self.reparam_conv(x)
        d = self.mixer(x) - self.norm(x)
        s = _scale(self, "layer_scale")
        return x + (d if s is None else s * d)


class ConvFFN(nn.Module):
    """depthwise 7x7 conv + BN -> 1x1 -> GELU -> 1x1 (kept as is in deploy; ``folded``: the
    BN folded into the depthwise conv, which then has a bias)."""

    def __init__(self, dim: int, hidden: int, folded: bool = False) -> None:
        super().__init__()
        if folded:
            conv = nn.Conv2d(dim, dim, FFN_KERNEL, 1, FFN_KERNEL // 2, groups=dim, bias=True)
            self.conv = nn.Sequential(OrderedDict(conv=conv))
        else:
            self.conv = _conv_bn(dim, dim, FFN_KERNEL, 1, dim)
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(self.conv(x))))


class MHSA(nn.Module):
    """Multi-head self attention over the H*W positions (qkv and proj are Linear layers)."""

    def __init__(self, dim: int, head_dim: int, qkv_bias: bool) -> None:
        super().__init__()
        self.head_dim, self.heads = head_dim, dim // head_dim
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)  # (B, N, C)
        q, k, v = self.qkv(t).reshape(b, h * w, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q * self.head_dim**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        t = self.proj((attn @ v).transpose(1, 2).reshape(b, h * w, c))
        return t.transpose(1, 2).reshape(b, c, h, w)


def _extra(cfg: Mapping[str, Any], deploy: bool) -> bool:
    """Whether this deploy model also has the folds the official one cannot hold."""
    return deploy and bool(cfg.get("extra_folds", False))


class RepMixerBlock(nn.Module):
    def __init__(self, dim: int, hidden: int, cfg: Mapping[str, Any], deploy: bool, names: _Names) -> None:
        super().__init__()
        extra = _extra(cfg, deploy)
        self.token_mixer = RepMixer(dim, cfg["repmixer_kernel_size"], cfg["layer_scale"], deploy, names)
        self._ffn = names.ffn
        self.add_module(names.ffn, ConvFFN(dim, hidden, extra))
        if cfg["layer_scale"] and not extra:
            _add_scale(self, "layer_scale", dim, names)

    def forward(self, x: Tensor) -> Tensor:
        x = self.token_mixer(x)
        y = getattr(self, self._ffn)(x)
        s = _scale(self, "layer_scale")
        return x + (y if s is None else s * y)


class AttentionBlock(nn.Module):
    def __init__(self, dim: int, hidden: int, cfg: Mapping[str, Any], names: _Names, deploy: bool = False) -> None:
        super().__init__()
        extra = _extra(cfg, deploy)
        self.norm: nn.Module = nn.Identity() if extra else nn.BatchNorm2d(dim)  # extra: folded into qkv
        self.token_mixer = MHSA(dim, cfg["head_dim"], cfg["qkv_bias"] or extra)
        self._ffn = names.ffn
        self.add_module(names.ffn, ConvFFN(dim, hidden, extra))
        if cfg["layer_scale"] and not extra:
            _add_scale(self, "layer_scale_1", dim, names)
            _add_scale(self, "layer_scale_2", dim, names)

    def forward(self, x: Tensor) -> Tensor:
        y = self.token_mixer(self.norm(x))
        s = _scale(self, "layer_scale_1")
        x = x + (y if s is None else s * y)
        y = getattr(self, self._ffn)(x)
        s = _scale(self, "layer_scale_2")
        return x + (y if s is None else s * y)


class LargeKernelConv(nn.Module):
    """Train: ``bn(conv_kxk(x)) + bn(conv_3x3(x))`` (no activation, as the official forward
    computes). Deploy: one conv with bias."""

    def __init__(self, cin: int, cout: int, k: int, small: int, stride: int, deploy: bool, names: _Names) -> None:
        super().__init__()
        self.cin, self.cout, self.k, self.small, self.stride, self.deploy = cin, cout, k, small, stride, deploy
        self._large, self._reparam = names.large, names.large_reparam
        if deploy:
            self.add_module(names.large_reparam, nn.Conv2d(cin, cout, k, stride, k // 2, groups=cin, bias=True))
        else:
            self.add_module(names.large, _conv_bn(cin, cout, k, stride, cin))
            self.small_conv = _conv_bn(cin, cout, small, stride, cin)

    def forward(self, x: Tensor) -> Tensor:
        if self.deploy:
            return getattr(self, self._reparam)(x)
        return getattr(self, self._large)(x) + self.small_conv(x)


class PatchEmbed(nn.Module):
    def __init__(self, cin: int, cout: int, cfg: Mapping[str, Any], deploy: bool, names: _Names) -> None:
        super().__init__()
        large = LargeKernelConv(cin, cout, cfg["down_patch_size"], cfg["down_small_kernel"], _STRIDE, deploy, names)
        block = MobileOneBlock(cout, cout, 1, 1, 1, act="gelu", deploy=deploy, names=names.block)
        self.proj = nn.Sequential(large, block)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class RepCPE(nn.Module):
    """Train: ``pe(x) + x`` (depthwise conv with bias). Deploy: one depthwise conv."""

    def __init__(self, dim: int, k: int, deploy: bool, names: _Names) -> None:
        super().__init__()
        self.dim, self.k, self.deploy = dim, k, deploy
        self._pe = "reparam_conv" if deploy else names.pe
        self.add_module(self._pe, nn.Conv2d(dim, dim, k, 1, k // 2, groups=dim, bias=True))

    def forward(self, x: Tensor) -> Tensor:
        y = getattr(self, self._pe)(x)
        return y if self.deploy else y + x


class _TimmStage(nn.Module):
    def __init__(self, downsample: nn.Module | None, pos_emb: nn.Module | None, blocks: nn.Sequential) -> None:
        super().__init__()
        if downsample is not None:
            self.downsample = downsample
        if pos_emb is not None:
            self.pos_emb = pos_emb
        self.blocks = blocks


class FastViT(nn.Module):
    """FastViT in either layout, built from an explicit config (``check_config``).

    ``deploy=True`` builds the official inference-mode form directly.
    """

    def __init__(self, config: Mapping[str, Any], deploy: bool = False, layout: str = "official") -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise BadInput(f"unknown FastViT layout `{layout}` (known: {', '.join(LAYOUTS)})")
        cfg = check_config(config)
        n = LAYOUTS[layout]
        self.layout, self.deploy = layout, deploy
        dims = cfg["embed_dims"]
        d0 = dims[0]

        def gelu_block(cin: int, cout: int, k: int, stride: int, groups: int, se: int = 0) -> MobileOneBlock:
            return MobileOneBlock(cin, cout, k, stride, groups, se_hidden=se, act="gelu", deploy=deploy, names=n.block)

        stem = nn.Sequential(
            gelu_block(cfg["in_chans"], d0, 3, _STRIDE, 1),
            gelu_block(d0, d0, 3, _STRIDE, d0),
            gelu_block(d0, d0, 1, 1, 1),
        )
        order: list[nn.Module] = [stem]
        network: list[nn.Module] = []
        timm_stages: list[nn.Module] = []
        for i, depth in enumerate(cfg["layers"]):
            down = PatchEmbed(dims[i - 1], dims[i], cfg, deploy, n) if i and cfg["downsamples"][i - 1] else None
            pos = RepCPE(dims[i], cfg["pos_embs"][i], deploy, n) if cfg["pos_embs"][i] else None
            blocks = nn.Sequential(
                *(
                    RepMixerBlock(dims[i], cfg["mlp_hidden"][i], cfg, deploy, n)
                    if cfg["token_mixers"][i] == "repmixer"
                    else AttentionBlock(dims[i], cfg["mlp_hidden"][i], cfg, n, deploy)
                    for _ in range(depth)
                )
            )
            parts = [m for m in (down, pos, blocks) if m is not None]
            network += parts
            order += parts
            timm_stages.append(_TimmStage(down, pos, blocks))
        exp = gelu_block(dims[-1], cfg["exp_dim"], 3, 1, dims[-1], cfg["se_hidden"])
        head = nn.Linear(cfg["exp_dim"], cfg["num_classes"]) if cfg["num_classes"] else None
        if layout == "official":
            self.patch_embed = stem
            self.network = nn.ModuleList(network)
            self.conv_exp = exp
            if head is not None:
                self.add_module("head", head)
        else:
            self.stem = stem
            self.stages = nn.Sequential(*timm_stages)
            self.final_conv = exp
            self.add_module("head", nn.ModuleDict({"fc": head} if head is not None else {}))
        # Plain lists, not registered twice: the forward order and the classifier.
        self._order: list[nn.Module] = [*order, exp]
        self._classifier: list[nn.Module] = [head] if head is not None else []

    def forward(self, x: Tensor) -> Tensor:
        for m in self._order:
            x = m(x)
        x = torch.flatten(x.mean((2, 3)), 1)
        for head in self._classifier:
            x = head(x)
        return x


def build_fastvit(variant: str | Mapping[str, Any], deploy: bool = False, **overrides: Any) -> FastViT:
    """A randomly initialised FastViT on the CPU: ``variant`` a name ("t8", "FastViT-SA24") or an
    explicit config; ``overrides`` replace fields of the ``FastViTCfg`` (``layers``, ``embed_dims``,
    ``num_classes``, ...) or keys of an explicit config; ``layout="timm"`` builds timm's names."""
    layout = overrides.pop("layout", "official")
    if isinstance(variant, str):
        try:
            config = dataclasses.replace(VARIANTS[lookup_variant(variant)], **overrides).resolve()
        except TypeError as e:
            raise BadInput(f"build_fastvit: {e}") from None
    else:
        config = {**dict(variant), **overrides}
    with torch.device("cpu"):
        return FastViT(config, deploy=deploy, layout=layout)


# --------------------------------------------------------------------------- detection


def find_layout(sd: Mapping[str, Tensor]) -> str:
    if "patch_embed.0.rbr_conv.0.conv.weight" in sd:
        return "official"
    if "stem.0.conv_kxk.0.conv.weight" in sd and any(k.startswith("stages.0.blocks.") for k in sd):
        return "timm"
    if "patch_embed.0.reparam_conv.weight" in sd or "stem.0.reparam_conv.weight" in sd:
        raise NotThisArch("already in deploy form (`reparam_conv` keys, no branches): nothing to fuse")
    first = next(iter(sd), "")
    raise NotThisArch(
        "no FastViT stem keys (`patch_embed.0.rbr_conv.0.conv.weight` or timm's `stem.0.conv_kxk.0.conv.weight`); "
        f"first key is `{first}`"
    )


_TIMM_RENAMES = (
    (r"\.conv_kxk\.", ".rbr_conv."),
    (r"\.conv_scale\.", ".rbr_scale."),
    (r"\.identity\.", ".rbr_skip."),
    (r"\.large_conv\.", ".lkb_origin."),
    (r"\.mlp\.", ".convffn."),
    (r"\.se\.fc1\.", ".se.reduce."),
    (r"\.se\.fc2\.", ".se.expand."),
    (r"\.(layer_scale(_\d)?)\.gamma$", r".\1"),
)


def official_names(keys: list[str]) -> dict[str, str]:
    """timm key -> the official key it stands for (the inverse of timm's ``checkpoint_filter_fn``)."""
    stage_re = re.compile(r"stages\.(\d+)\.(downsample\.proj|pos_emb\.pos_enc|blocks\.(\d+))\.")
    parts: dict[int, set[str]] = {}
    for k in keys:
        m = stage_re.match(k)
        if m:
            parts.setdefault(int(m.group(1)), set()).add(m.group(2).split(".")[0])
    index: dict[tuple[int, str], int] = {}
    i = 0
    for s in sorted(parts):
        for part in ("downsample", "pos_emb", "blocks"):
            if part in parts[s]:
                index[(s, part)] = i
                i += 1
    out = {}
    for k in keys:
        o = "." + k
        m = stage_re.match(k)
        if m:
            s, part = int(m.group(1)), m.group(2).split(".")[0]
            rest = k[m.end() :]
            net = f"network.{index[(s, part)]}"
            if part == "downsample":
                o = f".{net}.proj.{rest}"
            elif part == "pos_emb":
                o = f".{net}.pe.{rest}"
            else:
                o = f".{net}.{m.group(3)}.{rest}"
        elif k.startswith("stem."):
            o = ".patch_embed." + k[len("stem.") :]
        elif k.startswith("final_conv."):
            o = ".conv_exp." + k[len("final_conv.") :]
        elif k.startswith("head.fc."):
            o = ".head." + k[len("head.fc.") :]
        for a, b in _TIMM_RENAMES:
            o = re.sub(a, b, o)
        out[k] = o[1:]
    return out


def _shape(shapes: Mapping[str, tuple[int, ...]], key: str, what: str = "") -> tuple[int, ...]:
    if key not in shapes:
        raise KeyMismatch(f"FastViT checkpoint lacks `{key}`{what}")
    return shapes[key]


def read_config(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """The explicit config of a training state_dict, from its (official) key names and shapes."""
    if any(re.fullmatch(r"norm\d+\.\w+", k) for k in shapes) or "conv_exp.rbr_conv.0.conv.weight" not in shapes:
        raise NotThisArch(
            "a FastViT feature backbone (fork_feat: `normN` outputs, no `conv_exp`/head) is not supported"
        )
    w = _shape(shapes, "patch_embed.0.rbr_conv.0.conv.weight")
    in_chans = w[1]
    slots: dict[int, str] = {}
    depth: dict[int, int] = {}
    for k in shapes:
        m = re.match(r"network\.(\d+)\.(proj|pe|\d+)\.", k)
        if not m:
            continue
        i, what = int(m.group(1)), m.group(2)
        kind = "down" if what == "proj" else "pos" if what == "pe" else "stage"
        if slots.setdefault(i, kind) != kind:
            raise KeyMismatch(f"FastViT `network.{i}` holds keys of both a {slots[i]} and a {kind}")
        if kind == "stage":
            depth[i] = max(depth.get(i, 0), int(what) + 1)
    if not slots or sorted(slots) != list(range(len(slots))):
        raise KeyMismatch(f"FastViT `network` entries are not numbered 0..N-1: {sorted(slots)[:8]}")
    cfg: dict[str, Any] = {k: [] for k in ("layers", "embed_dims", "mlp_hidden", "token_mixers", "pos_embs")}
    cfg["downsamples"] = []
    kernels: set[int] = set()
    down_k: set[int] = set()
    small_k: set[int] = set()
    qkv_bias: set[bool] = set()
    scales: set[bool] = set()
    pending_down, pending_pos = False, 0
    for i in range(len(slots)):
        kind, p = slots[i], f"network.{i}"
        if kind == "down":
            if pending_down or pending_pos or not cfg["layers"]:
                raise KeyMismatch(f"FastViT `{p}`: a patch embedding must follow a stage")
            lk = _shape(shapes, f"{p}.proj.0.lkb_origin.conv.weight")
            down_k.add(lk[2])
            small_k.add(_shape(shapes, f"{p}.proj.0.small_conv.conv.weight")[2])
            pending_down = True
        elif kind == "pos":
            if pending_pos:
                raise KeyMismatch(f"FastViT `{p}`: two positional encodings in a row")
            pending_pos = _shape(shapes, f"{p}.pe.weight")[2]
        else:
            if cfg["layers"]:
                cfg["downsamples"].append(pending_down)
            dim, _, _, _ = _shape(shapes, f"{p}.0.convffn.conv.conv.weight")
            hidden = _shape(shapes, f"{p}.0.convffn.fc1.weight")[0]
            mixer = "attention" if f"{p}.0.token_mixer.qkv.weight" in shapes else "repmixer"
            for j in range(depth[i]):
                b = f"{p}.{j}"
                if ("attention" if f"{b}.token_mixer.qkv.weight" in shapes else "repmixer") != mixer:
                    raise KeyMismatch(f"FastViT `{p}` mixes RepMixer and attention blocks")
                if _shape(shapes, f"{b}.convffn.fc1.weight") != (hidden, dim, 1, 1):
                    raise KeyMismatch(f"FastViT `{b}.convffn.fc1.weight` differs from the stage's first block")
                if mixer == "repmixer":
                    kernels.add(_shape(shapes, f"{b}.token_mixer.mixer.rbr_conv.0.conv.weight")[2])
                    scales.add(f"{b}.token_mixer.layer_scale" in shapes)
                    scales.add(f"{b}.layer_scale" in shapes)
                else:
                    qkv_bias.add(f"{b}.token_mixer.qkv.bias" in shapes)
                    scales.add(f"{b}.layer_scale_1" in shapes)
            cfg["layers"].append(depth[i])
            cfg["embed_dims"].append(dim)
            cfg["mlp_hidden"].append(hidden)
            cfg["token_mixers"].append(mixer)
            cfg["pos_embs"].append(pending_pos)
            pending_down, pending_pos = False, 0
    if pending_down or pending_pos:
        raise KeyMismatch("FastViT `network` ends with a patch embedding or positional encoding, not a stage")
    for what, found in (("layer scales", scales), ("qkv biases", qkv_bias)):
        if len(found) > 1:
            raise KeyMismatch(f"FastViT checkpoint has {what} on some blocks only")
    for what, sizes in (("RepMixer kernel", kernels), ("patch-embedding kernel", down_k), ("small kernel", small_k)):
        if len(sizes) > 1:
            raise KeyMismatch(f"FastViT checkpoint mixes {what} sizes {sorted(sizes)}")
    exp = _shape(shapes, "conv_exp.rbr_conv.0.conv.weight")
    se = shapes.get("conv_exp.se.reduce.weight", (0,))
    cfg.update(
        repmixer_kernel_size=kernels.pop() if kernels else 3,
        down_patch_size=down_k.pop() if down_k else 7,
        down_small_kernel=small_k.pop() if small_k else 3,
        layer_scale=scales.pop() if scales else True,
        qkv_bias=qkv_bias.pop() if qkv_bias else False,
        head_dim=HEAD_DIM,
        exp_dim=exp[0],
        se_hidden=se[0],
        num_classes=shapes["head.weight"][0] if "head.weight" in shapes else 0,
        in_chans=in_chans,
    )
    return check_config(cfg)


_BACKBONE = (
    "layers embed_dims mlp_hidden token_mixers pos_embs downsamples repmixer_kernel_size down_patch_size "
    "down_small_kernel layer_scale qkv_bias exp_dim se_hidden"
).split()


def _difference(a: Mapping[str, Any], b: Mapping[str, Any]) -> str:
    for k in _BACKBONE:
        if a[k] != b[k]:
            return f"{k} {a[k]} vs {b[k]}"
    return ""


def match_variant(config: Mapping[str, Any]) -> str:
    for name, cfg in VARIANTS.items():
        if not _difference(config, cfg.resolve()):
            return name
    return CUSTOM


# --------------------------------------------------------------------------- fusion


def fold_large(m: LargeKernelConv, name: str) -> tuple[Tensor, Tensor]:
    """float64 (kernel, bias) of the large-kernel conv + BN plus the centered small-kernel conv + BN."""
    large: Any = getattr(m, m._large)
    small: Any = m.small_conv
    s, t = bn_of(large.bn, f"{name}.{m._large}.bn")
    kernel, bias = fold_bn(large.conv.weight, None, s, t)
    s, t = bn_of(small.bn, f"{name}.small_conv.bn")
    small_kernel, small_bias = fold_bn(small.conv.weight, None, s, t)
    return add_centered(kernel, small_kernel), bias + small_bias


def fold_repmixer(m: RepMixer, name: str) -> tuple[Tensor, Tensor]:
    """float64 (kernel, bias) of ``x + ls * (mixer(x) - norm(x))`` as one depthwise conv."""
    wm, bm = fold_block(m.mixer, f"{name}.mixer")
    wn, bn = fold_block(m.norm, f"{name}.norm")
    s = _scale(m, "layer_scale")
    ls = torch.ones(m.dim, dtype=torch.float64) if s is None else s.detach().to(torch.float64).reshape(-1)
    kernel = identity_kernel(m.dim, m.dim, m.k) + ls.reshape(-1, 1, 1, 1) * (wm - wn)
    return kernel, ls * (bm - bn)


def fold_cpe(m: RepCPE) -> tuple[Tensor, Tensor]:
    conv = getattr(m, m._pe)
    kernel = identity_kernel(m.dim, m.dim, m.k) + conv.weight.detach().to(torch.float64)
    return kernel, conv.bias.detach().to(torch.float64)


def fold_extra(block: RepMixerBlock | AttentionBlock, name: str, n: _Names, put: Any) -> int:
    """The folds the official inference-mode model cannot hold, for one block (``put(key, tensor)``
    receives float64 tensors): the FFN's BN into its depthwise conv (which gains a bias), the FFN's
    layer scale into ``fc2``, and for attention the ``norm`` BN into ``qkv`` (a per-channel affine map
    of the Linear's input: exact, no padding) and ``layer_scale_1`` into ``proj``. Returns the BNs folded."""
    f64 = torch.float64
    ffn = getattr(block, n.ffn)
    p = f"{name}.{n.ffn}"
    s, t = bn_of(ffn.conv.bn, f"{p}.conv.bn")
    w, b = fold_bn(ffn.conv.conv.weight, None, s, t)
    put(f"{p}.conv.conv.weight", w)
    put(f"{p}.conv.conv.bias", b)
    ls = _scale(block, "layer_scale" if isinstance(block, RepMixerBlock) else "layer_scale_2")
    g = torch.ones(ffn.fc2.weight.shape[0], dtype=f64) if ls is None else ls.detach().to(f64).reshape(-1)
    put(f"{p}.fc2.weight", ffn.fc2.weight.detach().to(f64) * g.reshape(-1, 1, 1, 1))
    put(f"{p}.fc2.bias", ffn.fc2.bias.detach().to(f64) * g)
    if isinstance(block, RepMixerBlock):
        return 1
    s, t = bn_of(block.norm, f"{name}.norm")
    qkv, proj = block.token_mixer.qkv, block.token_mixer.proj
    wq = qkv.weight.detach().to(f64)
    put(f"{name}.token_mixer.qkv.weight", wq * s.reshape(1, -1))
    put(f"{name}.token_mixer.qkv.bias", wq @ t + (0 if qkv.bias is None else qkv.bias.detach().to(f64)))
    ls = _scale(block, "layer_scale_1")
    g = torch.ones(proj.weight.shape[0], dtype=f64) if ls is None else ls.detach().to(f64).reshape(-1)
    put(f"{name}.token_mixer.proj.weight", proj.weight.detach().to(f64) * g.reshape(-1, 1))
    put(f"{name}.token_mixer.proj.bias", proj.bias.detach().to(f64) * g)
    return 2


def _timm_recorded(arch: Any) -> str | None:
    if isinstance(arch, str) and arch.lower().startswith("fastvit"):
        try:
            return lookup_variant(arch)
        except BadInput:
            return None
    return None


class FastViTFuser(Fuser):
    """FastViT training checkpoints (official or timm names) -> the inference-mode weights."""

    name = "fastvit"
    summary = "FastViT (apple/ml-fastvit and timm layouts): T8-MA36, MobileOne/RepMixer/RepCPE/large-kernel re-param"

    def detect(self, ckpt: Checkpoint, options: Options) -> Plan:
        sd = ckpt.state_dict
        layout = find_layout(sd)
        if layout == "timm":
            names = official_names(list(sd))
            shapes = {names[k]: tuple(v.shape) for k, v in sd.items()}
        else:
            shapes = {k: tuple(v.shape) for k, v in sd.items()}
        if layout == "timm" and options.under_auto:  # before anything can fail: auto moves on to conv-bn
            try:
                name = TIMM_MODELS.get(match_variant(read_config(shapes)))
            except (BadInput, KeyMismatch, NotThisArch):
                name = None
            timm_layout_under_auto(self, "FastViT", name)
        config = read_config(shapes)
        variant = match_variant(config)
        with torch.device("meta"):
            expected = FastViT(config, deploy=False, layout=layout).state_dict()
        foreign = [k for k in sd if k not in expected]
        if foreign:
            raise NotThisArch(f"{len(foreign)} keys are not FastViT's ({layout} layout), e.g. `{foreign[0]}`")
        notes: list[str] = []
        if options.variant:
            wanted = lookup_variant(options.variant)
            diff = _difference(config, VARIANTS[wanted].resolve())
            if diff:
                raise BadInput(f"{ckpt.path}: --variant {wanted} does not fit the weights ({diff})")
            variant = wanted
        if options.extra_folds:
            config["extra_folds"] = True
            notes.append(
                "extra folds: FFN BatchNorms, attention norms and layer scales are folded too; the file "
                "loads with repfuse_cli.load_deploy, not into the official (or timm's) inference-mode model"
            )
        if layout == "timm":
            notes.append("timm layout (stem/stages/mlp): the deploy file uses timm's reparameterized names")
            if variant in TIMM_MODELS:
                config["timm_model"] = TIMM_MODELS[variant]
        recorded = _timm_recorded(ckpt.extras.get("arch"))
        if recorded and recorded != variant:
            notes.append(
                f"the checkpoint records arch `{ckpt.extras['arch']}` but its tensors are {variant}; followed them"
            )
        if variant != CUSTOM and (config["num_classes"], config["in_chans"]) != (1000, 3):
            notes.append(
                f"{variant} backbone with {config['num_classes']} classes and {config['in_chans']} input channels"
            )
        if not config["num_classes"]:
            notes.append("no classifier in the checkpoint: the model outputs pooled conv_exp features")
        if variant == CUSTOM:
            notes.append("custom FastViT: strides (2) and attention head width (32) follow the official code")
        return Plan(
            arch=self.name,
            variant=variant,
            layout=layout,
            config=config,
            notes=notes,
            input_size=(config["in_chans"], 256, 256),
            num_classes=config["num_classes"] or None,
        )

    def build_train(self, plan: Plan, state_dict: dict[str, Tensor]) -> nn.Module:
        with torch.device("meta"):
            model = FastViT(plan.config, deploy=False, layout=plan.layout)
        return load_strict(model, state_dict, f"FastViT training model ({plan.variant}, {plan.layout} layout)").eval()

    def fuse(self, plan: Plan, state_dict: dict[str, Tensor], train: nn.Module, done: Done | None = None) -> Fused:
        if not isinstance(train, FastViT):
            raise TypeError(f"FastViTFuser.fuse needs the model from build_train, got {type(train).__name__}")
        dtype = float_dtype(state_dict)
        n = LAYOUTS[plan.layout]
        out: dict[str, Tensor] = {}
        counts = {"bn_folded": 0, "branch_merges": 0, "chain_merges": 0}
        unfused: list[tuple[str, str]] = []

        def put(key: str, kernel: Tensor, bias: Tensor, module: nn.Module) -> None:
            out[f"{key}.weight"] = kernel.to(dtype).contiguous()
            out[f"{key}.bias"] = bias.to(dtype).contiguous()
            counts["branch_merges"] += 1
            if done is not None:
                done([*module.parameters(), *module.buffers()])

        def put_plain(key: str, t: Tensor) -> None:
            out[key] = t.to(dtype).contiguous()

        extra = bool(plan.config.get("extra_folds", False))
        inside_mixer: set[str] = set()
        for name, m in train.named_modules():
            if isinstance(m, RepMixer):
                inside_mixer |= {f"{name}.norm", f"{name}.mixer"}
                put(f"{name}.reparam_conv", *fold_repmixer(m, name), m)
                counts["bn_folded"] += bn_count(m.mixer) + bn_count(m.norm)
            elif isinstance(m, MobileOneBlock) and name not in inside_mixer:
                put(f"{name}.{n.block.reparam}", *fold_block(m, name), m)
                counts["bn_folded"] += bn_count(m)
                if isinstance(getattr(m, n.block.se), SqueezeExcite):
                    unfused.append((f"{name}.{n.block.se}", "squeeze-excitation scales by its input: not linear, kept"))
            elif isinstance(m, LargeKernelConv):
                put(f"{name}.{n.large_reparam}", *fold_large(m, name), m)
                counts["bn_folded"] += 2
            elif isinstance(m, RepCPE):
                put(f"{name}.reparam_conv", *fold_cpe(m), m)
            elif extra and isinstance(m, (RepMixerBlock, AttentionBlock)):
                counts["bn_folded"] += fold_extra(m, name, n, put_plain)
                counts["layer_scales_folded"] = counts.get("layer_scales_folded", 0) + sum(
                    _scale(m, ls) is not None for ls in ("layer_scale", "layer_scale_1", "layer_scale_2")
                )
                continue
            elif isinstance(m, ConvFFN) and not extra:
                unfused.append(
                    (f"{name}.conv.bn", "BatchNorm after the FFN's depthwise conv: the official deploy model keeps it")
                )
            elif isinstance(m, AttentionBlock):
                unfused.append(
                    (f"{name}.norm", "BatchNorm before attention: not after a conv, the official model keeps it")
                )
            if isinstance(m, (RepMixerBlock, AttentionBlock)):
                for ls in ("layer_scale", "layer_scale_1", "layer_scale_2"):
                    if _scale(m, ls) is not None:
                        unfused.append((f"{name}.{ls}", "layer scale of a residual branch: kept by the official model"))
        return Fused(self.deploy_state(plan, out, state_dict), dict(plan.config), counts, unfused)

    def build_deploy(self, plan: Plan) -> nn.Module:
        with torch.device("meta"):
            return FastViT(plan.config, deploy=True, layout=plan.layout).eval()

    def check_config(self, plan: Plan, model: str | None, where: str) -> None:
        if plan.layout not in LAYOUTS:
            raise BadInput(f"{where}: FastViT layout `{plan.layout}` is not one repfuse writes")
        try:
            check_config(plan.config)
        except BadInput as e:
            raise BadInput(f"{where}: {e}") from None

    def eval_transform(self, plan: Plan, ckpt: Checkpoint) -> EvalTransform:
        """apple/ml-fastvit's validate.py: timm's ``resolve_data_config`` over the model's
        ``default_cfg`` (256 px, bicubic, crop_pct 0.9 for T/S/SA12/SA24 and 0.95 for SA36/MA36,
        ImageNet mean/std); training arguments recorded in the checkpoint take precedence."""
        cfg = VARIANTS.get(plan.variant)
        base = EvalTransform(size=plan.input_size[-1], interpolation="bicubic", crop_pct=cfg.crop_pct if cfg else 0.9)
        t, used = recorded_transform(base, ckpt.args)
        source = "apple/ml-fastvit validate.py default_cfg"
        if used:
            source += f", {', '.join(f'args.{n}' for n in used)} from the checkpoint"
        return dataclasses.replace(t, source=source)


def named_parts(model: FastViT) -> Iterator[tuple[str, nn.Module]]:
    """The re-parameterizable modules of ``model`` with their names (for tests and reports)."""
    for name, m in model.named_modules():
        if isinstance(m, (MobileOneBlock, RepMixer, LargeKernelConv, RepCPE)):
            yield name, m
