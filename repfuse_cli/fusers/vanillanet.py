"""VanillaNet (huawei-noah/VanillaNet): training checkpoints to deploy-mode weights.

The modules below are written from the official layout (huawei-noah/VanillaNet
``models/vanillanet.py``: ``stem1``/``stem2``, ``stages.i.conv1``/``conv2``/``act``, ``cls1``/``cls2``,
deploy-mode ``stem``/``stages.i.conv``/``cls``) and use the official state_dict key names, so a
deploy file made here loads with ``strict=True`` into the official ``vanillanet_N(deploy=True)`` and
vice versa.

What fusion does, per model (all in float64 through ``repfuse_cli.fold``, cast once at the end):

- stem:   ``stem1`` (4x4 conv + BN) and ``stem2`` (1x1 conv + BN) become one 4x4 conv;
- block:  ``conv1`` (1x1 + BN) and ``conv2`` (1x1 + BN) become one 1x1 conv;
- head:   ``cls1`` (1x1 + BN) and ``cls2`` (1x1) become one 1x1 conv;
- every series activation's BN folds into its depthwise conv (which gains a bias).

The 1x1 chains are linear only because the ``leaky_relu`` between them has slope ``act_learn``
and training anneals ``act_learn`` to 1 (identity). See :func:`annealing_state`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoint import float_dtype, load_strict
from ..errors import AnnealingUnfinished, BadInput, KeyMismatch
from ..fold import bn_scale_shift, fold_bn, merge_1x1
from ..fuser import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    INCEPTION_MEAN,
    INCEPTION_STD,
    Done,
    EvalTransform,
    Fused,
    Fuser,
    NotThisArch,
    Options,
    Plan,
    recorded_transform,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..checkpoint import Checkpoint

EPS = 1e-6  # every BatchNorm in VanillaNet
CUSTOM = "vanillanet_custom"
DEFAULT_RESOLUTION = 224


# --------------------------------------------------------------------------- architecture as data


@dataclass(frozen=True)
class VanillaCfg:
    """One VanillaNet: ``len(dims) == len(strides) + 1``; stage i maps dims[i] -> dims[i+1].

    ``ada_pool`` (one entry per stage, 0 = unset) turns a stage's MaxPool2d(stride) into
    AdaptiveMaxPool2d(ada_pool[i]) and the stem into a stride-3, padding-1 conv.
    """

    dims: tuple[int, ...]
    strides: tuple[int, ...]
    act_num: int = 3
    num_classes: int = 1000
    in_chans: int = 3
    ada_pool: tuple[int, ...] | None = None
    drop_rate: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "dims", tuple(int(d) for d in self.dims))
        object.__setattr__(self, "strides", tuple(int(s) for s in self.strides))
        if self.ada_pool is not None:
            object.__setattr__(self, "ada_pool", tuple(int(a) for a in self.ada_pool))
        if len(self.dims) != len(self.strides) + 1 or not self.strides:
            raise ValueError(f"VanillaNet needs len(dims) == len(strides) + 1 >= 2, got {self.dims}, {self.strides}")
        if self.ada_pool is not None and len(self.ada_pool) != len(self.strides):
            raise ValueError(f"ada_pool needs one entry per stage ({len(self.strides)}), got {self.ada_pool}")
        if self.act_num < 0 or min(self.dims) < 1 or min(self.strides) < 1:
            raise ValueError(f"invalid VanillaNet config: {self}")

    @property
    def depth(self) -> int:
        return len(self.strides)

    @property
    def stem_stride_padding(self) -> tuple[int, int]:
        # Official rule: a (non-empty) ada_pool list switches the stem to stride 3, padding 1.
        return (3, 1) if self.ada_pool else (4, 0)

    def shrink(self, unit: int) -> VanillaCfg:
        """The same architecture with widths scaled so that dims[0] == ``unit`` (for tests)."""
        base = self.dims[0]
        if any(d * unit % base for d in self.dims):
            raise ValueError(f"dims {self.dims} do not scale to unit {unit}")
        return replace(self, dims=tuple(d * unit // base for d in self.dims))

    def to_config(self) -> dict[str, Any]:
        """JSON-serializable form (lists, not tuples); :meth:`from_config` reverses it."""
        cfg = asdict(self)
        cfg["dims"], cfg["strides"] = list(self.dims), list(self.strides)
        cfg["ada_pool"] = None if self.ada_pool is None else list(self.ada_pool)
        return cfg

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> VanillaCfg:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise BadInput(f"VanillaNet config has unknown fields: {', '.join(unknown)}")
        try:
            kwargs: dict[str, Any] = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items()}
            return cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise BadInput(f"invalid VanillaNet config {dict(config)}: {e}") from None


def _u(unit: int, mults: list[int]) -> tuple[int, ...]:
    return tuple(unit * m for m in mults)


_DEEP = [1, 1, 2]  # vanillanet_7 ... vanillanet_13 start 1,1,2,4,... and end 8,8
_V13_DIMS = [*_DEEP, *[4] * 7, 8, 8]
_V13_STRIDES = (1, 2, 2, *[1] * 6, 2, 1)

VARIANTS: dict[str, VanillaCfg] = {
    "vanillanet_5": VanillaCfg(_u(512, [1, 2, 4, 8]), (2, 2, 2)),
    "vanillanet_6": VanillaCfg(_u(512, [1, 2, 4, 8, 8]), (2, 2, 2, 1)),
    "vanillanet_7": VanillaCfg(_u(512, [*_DEEP, 4, 8, 8]), (1, 2, 2, 2, 1)),
    "vanillanet_8": VanillaCfg(_u(512, [*_DEEP, 4, 4, 8, 8]), (1, 2, 2, 1, 2, 1)),
    "vanillanet_9": VanillaCfg(_u(512, [*_DEEP, *[4] * 3, 8, 8]), (1, 2, 2, 1, 1, 2, 1)),
    "vanillanet_10": VanillaCfg(_u(512, [*_DEEP, *[4] * 4, 8, 8]), (1, 2, 2, 1, 1, 1, 2, 1)),
    "vanillanet_11": VanillaCfg(_u(512, [*_DEEP, *[4] * 5, 8, 8]), (1, 2, 2, *[1] * 4, 2, 1)),
    "vanillanet_12": VanillaCfg(_u(512, [*_DEEP, *[4] * 6, 8, 8]), (1, 2, 2, *[1] * 5, 2, 1)),
    "vanillanet_13": VanillaCfg(_u(512, _V13_DIMS), _V13_STRIDES),
    "vanillanet_13_x1_5": VanillaCfg(_u(768, _V13_DIMS), _V13_STRIDES),
    "vanillanet_13_x1_5_ada_pool": VanillaCfg(
        _u(768, _V13_DIMS), _V13_STRIDES, ada_pool=(0, 38, 19, 0, 0, 0, 0, 0, 0, 10, 0)
    ),
}


# --------------------------------------------------------------------------- modules (official key layout)


class SeriesAct(nn.Conv2d):
    """Series activation: ReLU, then a depthwise (2n+1)x(2n+1) conv, then BN (train) / bias (deploy).

    A Conv2d (dim -> dim, groups=dim, padding=n) so that tools counting conv layers see it;
    keys ``weight`` + ``bn.*`` in train form (no conv bias), ``weight`` + ``bias`` in deploy form.
    """

    def __init__(self, dim: int, act_num: int, deploy: bool) -> None:
        k = 2 * act_num + 1
        super().__init__(dim, dim, k, padding=act_num, groups=dim, bias=deploy)
        self.dim, self.act_num, self.deploy = dim, act_num, deploy
        if not deploy:
            self.bn = nn.BatchNorm2d(dim, eps=EPS)

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.weight, std=0.02)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        y = self._conv_forward(F.relu(x), self.weight, self.bias)
        return y if self.deploy else self.bn(y)


def _pool(stride: int, ada: int) -> nn.Module:
    # Official rule: stride 1 never pools; otherwise an ada_pool entry (non-zero) wins over MaxPool.
    if stride == 1:
        return nn.Identity()
    return nn.AdaptiveMaxPool2d((ada, ada)) if ada else nn.MaxPool2d(stride)


def _conv_bn(cin: int, cout: int, k: int = 1, stride: int = 1, padding: int = 0) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride=stride, padding=padding), nn.BatchNorm2d(cout, eps=EPS))


def _slope(x: Tensor, act_learn: float) -> Tensor:
    # Deep training's leaky_relu(x, act_learn); slope 1 is the identity, so skip the op there.
    return x if act_learn == 1 else F.leaky_relu(x, act_learn)


class TrainBlock(nn.Module):
    def __init__(self, dim: int, dim_out: int, stride: int, ada: int, act_num: int) -> None:
        super().__init__()
        self.act_learn = 1.0
        self.conv1 = _conv_bn(dim, dim)
        self.conv2 = _conv_bn(dim, dim_out)
        self.pool = _pool(stride, ada)
        self.act = SeriesAct(dim_out, act_num, deploy=False)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv2(_slope(self.conv1(x), self.act_learn))
        return self.act(self.pool(x))


class DeployBlock(nn.Module):
    def __init__(self, dim: int, dim_out: int, stride: int, ada: int, act_num: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim_out, 1)
        self.pool = _pool(stride, ada)
        self.act = SeriesAct(dim_out, act_num, deploy=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.pool(self.conv(x)))


def _stages(cfg: VanillaCfg, block: type[nn.Module]) -> nn.ModuleList:
    """The blocks of either mode: dims[i] -> dims[i+1] at strides[i], with ada_pool[i] if any."""
    ada = cfg.ada_pool or (0,) * cfg.depth
    return nn.ModuleList(
        block(cfg.dims[i], cfg.dims[i + 1], cfg.strides[i], ada[i], cfg.act_num) for i in range(cfg.depth)
    )


class VanillaNet(nn.Module):
    """Training-mode VanillaNet (keys ``stem1``, ``stem2``, ``stages.i.conv1|conv2|act``, ``cls1``, ``cls2``).

    ``act_learn`` is the deep-training slope (1 = annealing finished, the only state in which
    the deploy model computes the same function); set it with :meth:`set_act_learn`.
    """

    def __init__(self, cfg: VanillaCfg) -> None:
        super().__init__()
        self.cfg = cfg
        self.act_learn = 1.0
        d0 = cfg.dims[0]
        stride, padding = cfg.stem_stride_padding
        self.stem1 = _conv_bn(cfg.in_chans, d0, 4, stride, padding)
        self.stem2 = nn.Sequential(
            nn.Conv2d(d0, d0, 1), nn.BatchNorm2d(d0, eps=EPS), SeriesAct(d0, cfg.act_num, deploy=False)
        )
        self.stages = _stages(cfg, TrainBlock)
        self.cls1 = nn.Sequential(
            nn.AdaptiveAvgPool2d((1, 1)),
            nn.Dropout(cfg.drop_rate),
            nn.Conv2d(cfg.dims[-1], cfg.num_classes, 1),
            nn.BatchNorm2d(cfg.num_classes, eps=EPS),
        )
        self.cls2 = nn.Sequential(nn.Conv2d(cfg.num_classes, cfg.num_classes, 1))

    def set_act_learn(self, value: float) -> VanillaNet:
        self.act_learn = float(value)
        for block in self.stages:
            setattr(block, "act_learn", float(value))  # noqa: B010 - a TrainBlock attribute, not a submodule
        return self

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem2(_slope(self.stem1(x), self.act_learn))
        for block in self.stages:
            x = block(x)
        x = self.cls2(_slope(self.cls1(x), self.act_learn))
        return x.flatten(1)


class VanillaNetDeploy(nn.Module):
    """Deploy-mode VanillaNet (keys ``stem.0|1``, ``stages.i.conv``, ``stages.i.act``, ``cls.2``)."""

    def __init__(self, cfg: VanillaCfg) -> None:
        super().__init__()
        self.cfg = cfg
        stride, padding = cfg.stem_stride_padding
        self.stem = nn.Sequential(
            nn.Conv2d(cfg.in_chans, cfg.dims[0], 4, stride=stride, padding=padding),
            SeriesAct(cfg.dims[0], cfg.act_num, deploy=True),
        )
        self.stages = _stages(cfg, DeployBlock)
        self.cls = nn.Sequential(
            nn.AdaptiveAvgPool2d((1, 1)),
            nn.Dropout(cfg.drop_rate),
            nn.Conv2d(cfg.dims[-1], cfg.num_classes, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for block in self.stages:
            x = block(x)
        return self.cls(x).flatten(1)


def resolve_cfg(variant_or_config: str | VanillaCfg | Mapping[str, Any], **overrides: Any) -> VanillaCfg:
    """A VanillaCfg from a variant name, a VanillaCfg or a config dict, with fields overridden."""
    if isinstance(variant_or_config, VanillaCfg):
        cfg = variant_or_config
    elif isinstance(variant_or_config, str):
        if variant_or_config not in VARIANTS:
            raise BadInput(f"unknown VanillaNet variant `{variant_or_config}` (known: {', '.join(VARIANTS)})")
        cfg = VARIANTS[variant_or_config]
    else:
        cfg = VanillaCfg.from_config(variant_or_config)
    return replace(cfg, **overrides) if overrides else cfg


def build_vanillanet(
    variant_or_config: str | VanillaCfg | Mapping[str, Any], deploy: bool, **overrides: Any
) -> nn.Module:
    """Build a VanillaNet on the current default device (CPU: randomly initialised, eval mode).

    Args:
        variant_or_config: a name from ``VARIANTS``, a ``VanillaCfg`` or its ``to_config()`` dict.
        deploy: the deploy form (``VanillaNetDeploy``) instead of the training form (``VanillaNet``).
        overrides: ``VanillaCfg`` fields to replace (``dims``, ``num_classes``, ``act_num``, ...).

    Example:
        >>> cfg = VARIANTS["vanillanet_5"].shrink(8)
        >>> model = build_vanillanet(cfg, deploy=False, num_classes=10)
    """
    cfg = resolve_cfg(variant_or_config, **overrides)
    model = VanillaNetDeploy(cfg) if deploy else VanillaNet(cfg)
    return model.eval()


def input_size_for(cfg: VanillaCfg, resolution: int = DEFAULT_RESOLUTION) -> tuple[int, int, int]:
    """(C, H, W) for verification: ``resolution``, doubled until every pool gets >= 1 pixel."""
    stride, padding = cfg.stem_stride_padding
    ada = cfg.ada_pool or (0,) * cfg.depth
    res = resolution
    for _ in range(16):
        h = (res + 2 * padding - 4) // stride + 1
        for s, a in zip(cfg.strides, ada, strict=True):
            if s != 1:
                h = a if a else h // s
            if h < 1:
                break
        if h >= 1:
            return (cfg.in_chans, res, res)
        res *= 2
    return (cfg.in_chans, res, res)


# --------------------------------------------------------------------------- fusion (pure tensors)


def _bn(sd: Mapping[str, Tensor], prefix: str) -> tuple[Tensor, Tensor]:
    return bn_scale_shift(
        sd[f"{prefix}.running_mean"],
        sd[f"{prefix}.running_var"],
        sd.get(f"{prefix}.weight"),
        sd.get(f"{prefix}.bias"),
        EPS,
        name=prefix,
    )


def fuse_tensors(
    sd: Mapping[str, Tensor], depth: int, dtype: torch.dtype | None = None, done: Done | None = None
) -> tuple[dict[str, Tensor], dict[str, int]]:
    """Deploy weights from a training state_dict, computed in float64 and cast once to ``dtype``.

    ``dtype`` defaults to the state_dict's floating dtype (a float64 state_dict gives the exact
    float64 result). ``done`` is called with the input tensors of each part (stem, block, head)
    once that part's deploy tensors exist. Returns (tensors, counts); never modifies ``sd``.
    """
    dtype = dtype or float_dtype(sd)
    out: dict[str, Tensor] = {}
    bn_folded = chain_merges = 0

    def finished(*prefixes: str) -> None:
        if done is not None:
            done([v for k, v in sd.items() if k.startswith(prefixes)])

    def put(name: str, wb: tuple[Tensor, Tensor]) -> None:
        # The one rounding step: float64 -> dtype, per tensor as soon as it is final, so that
        # only one layer's float64 intermediates are alive at a time (237M params for x1_5).
        out[f"{name}.weight"], out[f"{name}.bias"] = (t.to(dtype).contiguous() for t in wb)

    def merged(outer: str, inner: str) -> tuple[Tensor, Tensor]:
        # Both convs' BNs are folded block by block inside merge_1x1, so no whole float64 copy
        # of either weight, nor of their product, is ever in memory.
        so, to = _bn(sd, f"{outer}.1")
        si, ti = _bn(sd, f"{inner}.1")
        return merge_1x1(
            sd[f"{outer}.0.weight"],
            sd.get(f"{outer}.0.bias"),
            sd[f"{inner}.0.weight"],
            sd.get(f"{inner}.0.bias"),
            outer_scale=so,
            outer_shift=to,
            inner_scale=si,
            inner_shift=ti,
            out_dtype=dtype,
        )

    def act(src: str, dst: str) -> None:
        nonlocal bn_folded
        put(dst, fold_bn(sd[f"{src}.weight"], None, *_bn(sd, f"{src}.bn")))
        bn_folded += 1

    # stem: 4x4 conv + BN, then 1x1 conv + BN  ->  one 4x4 conv
    put("stem.0", merged("stem2", "stem1"))
    act("stem2.2", "stem.1")
    finished("stem1.", "stem2.")
    bn_folded += 2
    chain_merges += 1

    for i in range(depth):
        p = f"stages.{i}"
        put(f"{p}.conv", merged(f"{p}.conv2", f"{p}.conv1"))
        act(f"{p}.act", f"{p}.act")
        finished(f"{p}.")
        bn_folded += 2
        chain_merges += 1

    # head: 1x1 conv + BN, then the 1x1 cls2 (no BN)  ->  one 1x1 conv
    si, ti = _bn(sd, "cls1.3")
    put(
        "cls.2",
        merge_1x1(
            sd["cls2.0.weight"],
            sd.get("cls2.0.bias"),
            sd["cls1.2.weight"],
            sd.get("cls1.2.bias"),
            inner_scale=si,
            inner_shift=ti,
            out_dtype=dtype,
        ),
    )
    finished("cls1.", "cls2.")
    bn_folded += 1
    chain_merges += 1

    return out, {"bn_folded": bn_folded, "chain_merges": chain_merges, "branch_merges": 0}


# --------------------------------------------------------------------------- detection


def act_learn_at(epoch: int, decay_epochs: int, linear: bool = True) -> float:
    """The ``act_learn`` the official ``main.py`` trained epoch ``epoch`` with.

    Their loop, at the start of each epoch ``e`` (0-based) with ``e <= decay_epochs``, sets
    ``act_learn = e / decay_epochs`` (``--decay_linear true``, the default) or
    ``0.5 * (1 - cos(pi * e / decay_epochs))``, and leaves it alone afterwards; the checkpoint
    saved after epoch ``e`` records ``epoch = e``. So act_learn reached 1 exactly when
    ``epoch >= decay_epochs``, and stayed 1 for every later epoch.
    """
    if decay_epochs <= 0 or epoch >= decay_epochs:
        return 1.0
    t = max(epoch, 0) / decay_epochs
    return t if linear else 0.5 * (1 - math.cos(math.pi * t))


def _int_or_none(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return None


def _shape(sd: Mapping[str, Tensor], key: str, where: str, ndim: int) -> tuple[int, ...]:
    t = sd.get(key)
    if t is None:
        raise KeyMismatch(f"{where}: VanillaNet key `{key}` is missing")
    if t.dim() != ndim:
        raise KeyMismatch(f"{where}: `{key}` has shape {tuple(t.shape)}, expected {ndim} dims")
    return tuple(t.shape)


def _read_shapes(sd: Mapping[str, Tensor], where: str) -> dict[str, Any]:
    """dims, act_num, in_chans, num_classes from the tensors' shapes (values are never read)."""
    stages = sorted({int(k.split(".")[1]) for k in sd if k.startswith("stages.") and k.split(".")[1].isdigit()})
    if not stages:
        raise KeyMismatch(f"{where}: VanillaNet stem and head found but no `stages.i.*` keys")
    if stages != list(range(len(stages))):
        raise KeyMismatch(f"{where}: stage indices are not 0..{len(stages) - 1}: {stages}")
    d0, in_chans, kh, kw = _shape(sd, "stem1.0.weight", where, 4)
    if (kh, kw) != (4, 4):
        raise KeyMismatch(f"{where}: `stem1.0.weight` has a {kh}x{kw} kernel, VanillaNet's stem is 4x4")
    kernels = {"stem2.2.weight": _shape(sd, "stem2.2.weight", where, 4)}
    dims = [d0]
    for i in stages:
        c1 = _shape(sd, f"stages.{i}.conv1.0.weight", where, 4)
        c2 = _shape(sd, f"stages.{i}.conv2.0.weight", where, 4)
        if c1 != (dims[-1], dims[-1], 1, 1) or c2[1:] != (dims[-1], 1, 1):
            raise KeyMismatch(
                f"{where}: stage {i} convs {c1}, {c2} do not continue from {dims[-1]} channels with 1x1 kernels"
            )
        dims.append(c2[0])
        kernels[f"stages.{i}.act.weight"] = _shape(sd, f"stages.{i}.act.weight", where, 4)
    for key, shape in kernels.items():
        dim = d0 if key.startswith("stem") else dims[int(key.split(".")[1]) + 1]
        k = shape[2]
        if shape[:2] != (dim, 1) or shape[3] != k or k % 2 == 0:
            raise KeyMismatch(f"{where}: `{key}` has shape {shape}, expected ({dim}, 1, k, k) with odd k")
    sizes = {shape[2] for shape in kernels.values()}
    if len(sizes) != 1:
        raise KeyMismatch(f"{where}: activation kernels differ in size ({sorted(sizes)}); VanillaNet uses one act_num")
    nc, dl, *ks = _shape(sd, "cls1.2.weight", where, 4)
    if dl != dims[-1] or ks != [1, 1]:
        shape = (nc, dl, *ks)
        raise KeyMismatch(f"{where}: `cls1.2.weight` {shape} does not take the last stage's {dims[-1]} channels")
    if _shape(sd, "cls2.0.weight", where, 4) != (nc, nc, 1, 1):
        raise KeyMismatch(
            f"{where}: `cls2.0.weight` is {tuple(sd['cls2.0.weight'].shape)}, expected ({nc}, {nc}, 1, 1)"
        )
    return {"dims": tuple(dims), "act_num": (sizes.pop() - 1) // 2, "in_chans": in_chans, "num_classes": nc}


def _infer_strides(dims: tuple[int, ...]) -> tuple[int, ...]:
    # Every official variant downsamples (stride 2) exactly where the width grows.
    return tuple(2 if b > a else 1 for a, b in zip(dims, dims[1:], strict=False))


def _pattern(dims: tuple[int, ...]) -> tuple[float, ...]:
    return tuple(d / dims[0] for d in dims)


class VanillaNetFuser(Fuser):
    name = "vanillanet"
    summary = "VanillaNet (huawei-noah): all 11 variants; BN folds, deep-training 1x1 chains, series activations"

    # -- detect ------------------------------------------------------------------------------

    def detect(self, ckpt: Checkpoint, options: Options) -> Plan:
        sd, where = ckpt.state_dict, str(ckpt.path)
        missing = [k for k in ("stem1.0.weight", "stem2.2.weight", "cls1.2.weight", "cls2.0.weight") if k not in sd]
        if missing:
            if all(k in sd for k in ("stem.0.weight", "stem.1.weight", "cls.2.weight")):
                raise NotThisArch(
                    f"{where}: already a deploy-mode VanillaNet (keys stem.0, stages.i.conv, cls.2): nothing to fuse"
                )
            if "stem1.0.weight" in sd and "stem2.2.weight" in sd and "stages.0.conv1.0.weight" in sd:
                raise KeyMismatch(  # unmistakably VanillaNet: say what is missing, don't try other fusers
                    f"{where}: a VanillaNet training state_dict without {', '.join(missing)} (a backbone without "
                    "the classifier head, or a truncated file?); repfuse converts the full classification model"
                )
            raise NotThisArch(
                f"{where}: not a VanillaNet training state_dict (no stem1.0/stem2.2/cls1.2/cls2.0 keys; "
                f"first keys: {', '.join(list(sd)[:3])})"
            )
        shapes = _read_shapes(sd, where)
        dims: tuple[int, ...] = shapes["dims"]
        notes: list[str] = []
        args = ckpt.args if isinstance(ckpt.args, Mapping) else {}

        template, source = self._template(dims, options, args, notes)
        if template is not None:
            cfg = VanillaCfg(dims, template[1].strides, ada_pool=template[1].ada_pool, **self._rest(shapes))
            exact = template[1].dims == dims
            variant = template[0] if exact else CUSTOM
            if not exact:
                notes.append(
                    f"dims {list(dims)} differ from {template[0]}'s; strides and pools taken from "
                    f"{template[0]} ({source})"
                )
        else:
            cfg = VanillaCfg(dims, _infer_strides(dims), **self._rest(shapes))
            variant = CUSTOM
            notes.append(
                f"dims {list(dims)} match no official variant: strides {list(cfg.strides)} inferred "
                "(stride 2 where the width grows, as in every official variant); pools hold no weights, "
                "so check them against your training code"
            )
        drop = args.get("drop")
        if isinstance(drop, (int, float)) and not isinstance(drop, bool) and 0 <= drop < 1:
            cfg = replace(cfg, drop_rate=float(drop))

        notes += self._annealing(ckpt, args, options)
        return Plan(
            arch=self.name,
            variant=variant,
            layout="official",
            config=cfg.to_config(),
            notes=notes,
            input_size=input_size_for(cfg),
            num_classes=cfg.num_classes,
        )

    @staticmethod
    def _rest(shapes: dict[str, Any]) -> dict[str, Any]:
        return {k: shapes[k] for k in ("act_num", "in_chans", "num_classes")}

    @staticmethod
    def _template(
        dims: tuple[int, ...], options: Options, args: Mapping[str, Any], notes: list[str]
    ) -> tuple[tuple[str, VanillaCfg] | None, str]:
        """The official variant whose structure (strides, pools, stem) the checkpoint has."""
        depth = len(dims) - 1
        if options.variant:
            if options.variant == CUSTOM:
                return None, "--variant"
            if options.variant not in VARIANTS:
                raise BadInput(f"--variant {options.variant}: unknown (known: {', '.join(VARIANTS)}, {CUSTOM})")
            cfg = VARIANTS[options.variant]
            if cfg.depth != depth:
                raise BadInput(
                    f"--variant {options.variant} has {cfg.depth} stages, the checkpoint has {depth} "
                    f"(dims {list(dims)})"
                )
            return (options.variant, cfg), "--variant"
        model = args.get("model")
        if isinstance(model, str) and model:
            name = model.split("/")[-1].split(":")[-1]
            named = VARIANTS.get(name)
            if named is not None and named.depth == depth:
                return (name, named), "args.model"
            if named is not None:
                notes.append(f"args.model `{model}` has {named.depth} stages but the weights have {depth}; ignored")
            else:
                notes.append(f"args.model `{model}` is not an official VanillaNet variant; structure read from shapes")
        exact = [(n, c) for n, c in VARIANTS.items() if c.dims == dims]
        if exact:
            if len(exact) > 1:  # vanillanet_13_x1_5 and its ada_pool twin have the same weights
                others = ", ".join(n for n, _ in exact[1:])
                notes.append(
                    f"weights fit {exact[0][0]} and {others} alike (pools hold no weights) and the "
                    f"checkpoint records no args.model; assuming {exact[0][0]}: pass --variant to choose"
                )
            return exact[0], "shapes"
        same = [(n, c) for n, c in VARIANTS.items() if _pattern(c.dims) == _pattern(dims) and c.ada_pool is None]
        return (same[0], "width pattern") if same else (None, "")

    @staticmethod
    def _annealing(ckpt: Checkpoint, args: Mapping[str, Any], options: Options) -> list[str]:
        epoch, decay = ckpt.epoch, _int_or_none(args.get("decay_epochs"))
        if epoch is None or decay is None:
            return [
                "no training records (epoch and args.decay_epochs) to check deep-training annealing: "
                "the 1x1 merges assume it finished (act_learn == 1)"
            ]
        if epoch >= decay:
            return [f"deep-training annealing finished: epoch {epoch} >= decay_epochs {decay} (act_learn == 1)"]
        linear = args.get("decay_linear", True) is not False
        slope = act_learn_at(epoch, decay, linear)
        msg = (
            f"checkpoint saved at epoch {epoch}, before deep-training annealing ends at decay_epochs {decay} "
            f"(act_learn was {slope:.3f}, not 1)"
        )
        if not options.assume_annealed:
            raise AnnealingUnfinished(
                f"{ckpt.path}: {msg}: merging the 1x1 chains would change the model's function; "
                "--assume-annealed overrides"
            )
        return [
            f"{msg}: conversion needs --assume-annealed, and then the deploy model computes the network with "
            "act_learn = 1 (as verified), not the slope it was last trained with"
        ]

    # -- build / fuse -------------------------------------------------------------------------

    def build_train(self, plan: Plan, state_dict: dict[str, Tensor]) -> nn.Module:
        cfg = VanillaCfg.from_config(plan.config)
        with torch.device("meta"):
            model = VanillaNet(cfg)
        return load_strict(model, state_dict, f"{plan.variant} (training layout)")

    def fuse(self, plan: Plan, state_dict: dict[str, Tensor], train: nn.Module, done: Done | None = None) -> Fused:
        cfg = VanillaCfg.from_config(plan.config)
        tensors, counts = fuse_tensors(state_dict, cfg.depth, done=done)
        return Fused(tensors=tensors, config=cfg.to_config(), counts=counts, unfused=[])

    def build_deploy(self, plan: Plan) -> nn.Module:
        cfg = VanillaCfg.from_config(plan.config)
        with torch.device("meta"):
            return VanillaNetDeploy(cfg).eval()

    # -- evaluation -----------------------------------------------------------------------------

    def eval_transform(self, plan: Plan, ckpt: Checkpoint) -> EvalTransform:
        """VanillaNet datasets.py ``build_transform`` (eval), from main.py's recorded ``args``:
        above 32 px and below 384 px ``Resize(int(input_size / crop_pct), bicubic)`` + center crop
        (``crop_pct`` 224/256 unless recorded); at 384 px and above a bicubic resize to the square
        with no crop; at 32 px and below no resize at all. ImageNet's mean/std, or Inception's
        0.5/0.5 when ``args.imagenet_default_mean_and_std`` is false; ``mean``/``std`` recorded
        in timm train.py's names take precedence."""
        args = ckpt.args
        size = _int_or_none(args.get("input_size"))
        used = ["input_size"] if size and size > 0 else []
        size = size if size and size > 0 else plan.input_size[-1]
        default_norm = args.get("imagenet_default_mean_and_std", True)
        if isinstance(default_norm, str):  # main.py parses it with str2bool
            default_norm = default_norm.strip().lower() not in ("false", "no", "0", "f", "n")
        if "imagenet_default_mean_and_std" in args:
            used.append("imagenet_default_mean_and_std")
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if default_norm is not False else (INCEPTION_MEAN, INCEPTION_STD)
        crop = args.get("crop_pct")
        crop_pct = 224 / 256
        if isinstance(crop, (int, float)) and not isinstance(crop, bool) and 0 < crop <= 1:
            used.append("crop_pct")
            crop_pct = float(crop)
        if size <= 32:  # resize_im is false: the image goes in as it is
            geometry: dict[str, Any] = {"crop_pct": 1.0, "resize": size}
            how = "no resize at 32 px or below"
        elif size >= 384:
            geometry, how = {"crop_pct": None}, "warped to the square at 384 px or above"
        else:
            geometry, how = {"crop_pct": crop_pct, "resize": int(size / crop_pct)}, "resize + center crop"
        base = EvalTransform(size=size, interpolation="bicubic", mean=mean, std=std, **geometry)
        # only the normalization in timm's names: size and crop follow main.py's own arguments
        t, extra = recorded_transform(base, {k: args[k] for k in ("mean", "std") if k in args})
        used += extra
        source = f"VanillaNet datasets.py eval ({how})" + (
            f", args.{'/'.join(used)} from the checkpoint" if used else ""
        )
        return replace(t, source=source)
