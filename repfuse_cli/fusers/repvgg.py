"""RepVGG (DingXiaoH/RepVGG ``repvgg.py`` and timm's ``repvgg_*``): three branches into one 3x3.

Every block of a training checkpoint holds a 3x3 conv + BN, a 1x1 conv + BN and, when its input
and output match (same width, stride 1), a BN on the identity. In eval mode the block computes
``ReLU(SE(bn(conv3x3(x)) + bn(conv1x1(x)) + bn(x)))``; each branch is an affine map of ``x``, so
their sum is one 3x3 conv with a bias (Ding et al., "RepVGG", CVPR 2021, Sec. 3.3). SE, when
present, is not linear and stays.

The whole architecture is read from the tensors: block counts from the keys, widths and groups
from the conv weight shapes, SE from its keys, classes from the classifier. Strides are not
stored anywhere and follow RepVGG's convention (2 at stage0 and at each stage's first block).

Two layouts, the same model under other names (``_Names``):
- ``official``: ``stage0``, ``stage1.0`` ... ``stage4.0``, ``rbr_dense|rbr_1x1|rbr_identity``,
  ``se.down|up``, ``linear``; deploy ``rbr_reparam``.
- ``timm``: ``stem``, ``stages.0.0`` ..., ``conv_kxk|conv_1x1|identity``, ``attn.fc1|fc2``,
  ``head.fc``; deploy ``reparam_conv`` (timm's ``reparameterize_model`` output).
"""

from __future__ import annotations

import dataclasses
import re
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..checkpoint import Checkpoint, float_dtype, load_strict
from ..errors import BadInput, KeyMismatch
from ..fold import add_centered, add_identity, bn_scale_shift, fold_bn
from ..fuser import (
    Done,
    EvalTransform,
    Fused,
    Fuser,
    NotThisArch,
    Options,
    Plan,
    recorded_transform,
    timm_eval_transform,
)

# Global block indices (stage0 = 0) that the official g2/g4 variants make group-wise.
GROUPWISE_LAYERS = tuple(range(2, 27, 2))
_STRIDE = 2  # stage0 and the first block of every stage; every other block has stride 1


def groups_map(groups: int) -> dict[int, int]:
    """The official ``g2_map`` / ``g4_map``: ``groups`` on layers 2, 4, ..., 26."""
    return {layer: groups for layer in GROUPWISE_LAYERS}


@dataclass(frozen=True)
class RepVGGCfg:
    """A RepVGG variant as the official constructor takes it (``RepVGG(num_blocks, ...)``)."""

    num_blocks: tuple[int, int, int, int]
    width_multiplier: tuple[float, float, float, float]
    override_groups_map: dict[int, int] = field(default_factory=dict)
    use_se: bool = False
    se_reduction: int = 16  # SE hidden width = out // se_reduction
    num_classes: int = 1000
    in_chans: int = 3

    def resolve(self) -> dict[str, Any]:
        """The explicit, JSON-ready config: widths and per-block groups/SE widths spelled out."""
        if len(self.num_blocks) != 4 or len(self.width_multiplier) != 4:
            raise BadInput("RepVGG needs 4 stages: num_blocks and width_multiplier of length 4")
        if 0 in self.override_groups_map:
            raise BadInput("RepVGG: stage0 (layer 0) cannot be group-wise")
        wm = self.width_multiplier
        widths = [min(64, int(64 * wm[0])), int(64 * wm[0]), int(128 * wm[1]), int(256 * wm[2]), int(512 * wm[3])]
        outs = [widths[0]] + [widths[s] for s in range(1, 5) for _ in range(self.num_blocks[s - 1])]
        if self.use_se and min(outs) < self.se_reduction:
            raise BadInput(f"RepVGG: SE needs >= {self.se_reduction} channels per block, got {min(outs)}")
        return check_config(
            {
                "num_blocks": [int(n) for n in self.num_blocks],
                "widths": widths,
                "groups": [int(self.override_groups_map.get(i, 1)) for i in range(len(outs))],
                "se_channels": [c // self.se_reduction if self.use_se else 0 for c in outs],
                "use_se": bool(self.use_se),
                "num_classes": int(self.num_classes),
                "in_chans": int(self.in_chans),
            }
        )


_A = (2, 4, 14, 1)
_B = (4, 6, 16, 1)
VARIANTS: dict[str, RepVGGCfg] = {
    "RepVGG-A0": RepVGGCfg(_A, (0.75, 0.75, 0.75, 2.5)),
    "RepVGG-A1": RepVGGCfg(_A, (1, 1, 1, 2.5)),
    "RepVGG-A2": RepVGGCfg(_A, (1.5, 1.5, 1.5, 2.75)),
    "RepVGG-B0": RepVGGCfg(_B, (1, 1, 1, 2.5)),
    "RepVGG-B1": RepVGGCfg(_B, (2, 2, 2, 4)),
    "RepVGG-B1g2": RepVGGCfg(_B, (2, 2, 2, 4), groups_map(2)),
    "RepVGG-B1g4": RepVGGCfg(_B, (2, 2, 2, 4), groups_map(4)),
    "RepVGG-B2": RepVGGCfg(_B, (2.5, 2.5, 2.5, 5)),
    "RepVGG-B2g2": RepVGGCfg(_B, (2.5, 2.5, 2.5, 5), groups_map(2)),
    "RepVGG-B2g4": RepVGGCfg(_B, (2.5, 2.5, 2.5, 5), groups_map(4)),
    "RepVGG-B3": RepVGGCfg(_B, (3, 3, 3, 5)),
    "RepVGG-B3g2": RepVGGCfg(_B, (3, 3, 3, 5), groups_map(2)),
    "RepVGG-B3g4": RepVGGCfg(_B, (3, 3, 3, 5), groups_map(4)),
    "RepVGG-D2se": RepVGGCfg((8, 14, 24, 1), (2.5, 2.5, 2.5, 5), use_se=True),
}
CUSTOM = "RepVGG-custom"
# timm registers these (no g2 variants); its g4 maps group the same blocks as the official ones.
TIMM_MODELS = {n: "repvgg_" + n.split("-")[1].lower() for n in VARIANTS if "g2" not in n}


def _short(name: str) -> str:
    s = name.strip().lower().replace("-", "").replace("_", "")
    return s[len("repvgg") :] if s.startswith("repvgg") else s


def lookup_variant(name: str) -> str:
    """The official name of ``name`` ("A0", "repvgg_a0", "RepVGG-A0" -> "RepVGG-A0")."""
    for official in VARIANTS:
        if _short(official) == _short(name):
            return official
    raise BadInput(f"unknown RepVGG variant `{name}` (known: {', '.join(VARIANTS)})")


def check_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Validate an explicit config (``RepVGGCfg.resolve`` / ``Plan.config``); return a plain copy."""
    try:
        cfg = {k: config[k] for k in ("num_blocks", "widths", "groups", "se_channels", "num_classes", "in_chans")}
    except KeyError as e:
        raise BadInput(f"RepVGG config lacks {e}") from None
    cfg = {**dict(config), **cfg}
    nb, widths = list(cfg["num_blocks"]), list(cfg["widths"])
    if len(nb) != 4 or len(widths) != 5 or min(nb) < 1:
        raise BadInput(f"RepVGG config: need 4 stages of >= 1 block and 5 widths, got {nb}, {widths}")
    n = 1 + sum(nb)
    if len(cfg["groups"]) != n or len(cfg["se_channels"]) != n:
        raise BadInput(f"RepVGG config: groups and se_channels need one entry per block ({n})")
    for i, (cin, cout, _) in enumerate(_block_shapes(cfg)):
        g = cfg["groups"][i]
        if g < 1 or cin % g or cout % g:
            raise BadInput(f"RepVGG config: block {i} ({cin} -> {cout}) cannot have {g} groups")
    cfg["use_se"] = any(c > 0 for c in cfg["se_channels"])
    return cfg


def _block_shapes(cfg: Mapping[str, Any]) -> Iterator[tuple[int, int, int]]:
    """(in, out, stride) of every block, stage0 first."""
    cin = cfg["in_chans"]
    yield cin, cfg["widths"][0], _STRIDE
    cin = cfg["widths"][0]
    for s, n in enumerate(cfg["num_blocks"], 1):
        for i in range(n):
            yield cin, cfg["widths"][s], _STRIDE if i == 0 else 1
            cin = cfg["widths"][s]


# --------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class _Names:
    dense: str
    one: str
    identity: str
    reparam: str
    se: str
    se_down: str
    se_up: str
    classifier: str

    def block_prefixes(self, num_blocks: list[int]) -> list[str]:
        if self is LAYOUTS["official"]:
            return ["stage0"] + [f"stage{s}.{i}" for s, n in enumerate(num_blocks, 1) for i in range(n)]
        return ["stem"] + [f"stages.{s}.{i}" for s, n in enumerate(num_blocks) for i in range(n)]


LAYOUTS = {
    "official": _Names("rbr_dense", "rbr_1x1", "rbr_identity", "rbr_reparam", "se", "down", "up", "linear"),
    "timm": _Names("conv_kxk", "conv_1x1", "identity", "reparam_conv", "attn", "fc1", "fc2", "head.fc"),
}
_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"


def _key_pattern(n: _Names) -> re.Pattern:
    block = r"stage0|stage[1-4]\.\d+" if n is LAYOUTS["official"] else r"stem|stages\.[0-3]\.\d+"
    branch = (
        rf"({n.dense}|{n.one})\.(conv\.weight|bn\.{_BN})|{n.identity}\.{_BN}"
        rf"|{n.se}\.({n.se_down}|{n.se_up})\.(weight|bias)"
    )
    return re.compile(rf"({block})\.({branch})|{re.escape(n.classifier)}\.(weight|bias)")


# --------------------------------------------------------------------------- modules


class SqueezeExcite(nn.Module):
    """RepVGG's SE: global average pool -> 1x1 down -> ReLU -> 1x1 up -> sigmoid -> scale."""

    def __init__(self, channels: int, hidden: int, names: _Names):
        super().__init__()
        self._down, self._up = names.se_down, names.se_up
        self.add_module(names.se_down, nn.Conv2d(channels, hidden, 1, bias=True))
        self.add_module(names.se_up, nn.Conv2d(hidden, channels, 1, bias=True))

    def forward(self, x: Tensor) -> Tensor:
        s = torch.relu(getattr(self, self._down)(x.mean((2, 3), keepdim=True)))
        return x * torch.sigmoid(getattr(self, self._up)(s))


def _conv_bn(cin: int, cout: int, k: int, stride: int, padding: int, groups: int) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=False),
            bn=nn.BatchNorm2d(cout),
        )
    )


class RepVGGBlock(nn.Module):
    """Train: ReLU(SE(dense(x) + 1x1(x) + identity(x))). Deploy: ReLU(SE(reparam(x)))."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int, se_hidden: int, deploy: bool, names: _Names):
        super().__init__()
        self.deploy, self._n = deploy, names
        self.add_module(names.se, SqueezeExcite(cout, se_hidden, names) if se_hidden else nn.Identity())
        if deploy:
            self.add_module(names.reparam, nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=True))
        else:
            ident = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
            self.add_module(names.identity, ident)
            self.add_module(names.dense, _conv_bn(cin, cout, 3, stride, 1, groups))
            self.add_module(names.one, _conv_bn(cin, cout, 1, stride, 0, groups))
        self.nonlinearity = nn.ReLU()

    def branches(self) -> tuple[nn.Sequential, nn.Sequential, nn.BatchNorm2d | None]:
        n = self._n
        return getattr(self, n.dense), getattr(self, n.one), getattr(self, n.identity)

    def forward(self, x: Tensor) -> Tensor:
        if self.deploy:
            y = getattr(self, self._n.reparam)(x)
        else:
            dense, one, ident = self.branches()
            y = dense(x) + one(x)
            if ident is not None:
                y = y + ident(x)
        return self.nonlinearity(getattr(self, self._n.se)(y))


class RepVGG(nn.Module):
    """RepVGG in either layout, built from an explicit config (``check_config``).

    ``deploy=True`` builds the deploy form directly (one 3x3 conv with bias per block).
    """

    def __init__(self, config: Mapping[str, Any], deploy: bool = False, layout: str = "official"):
        super().__init__()
        if layout not in LAYOUTS:
            raise BadInput(f"unknown RepVGG layout `{layout}` (known: {', '.join(LAYOUTS)})")
        cfg = check_config(config)
        names = LAYOUTS[layout]
        self.layout, self.deploy = layout, deploy
        self.block_names = names.block_prefixes(cfg["num_blocks"])
        blocks = [
            RepVGGBlock(cin, cout, stride, cfg["groups"][i], cfg["se_channels"][i], deploy, names)
            for i, (cin, cout, stride) in enumerate(_block_shapes(cfg))
        ]
        starts = [1 + sum(cfg["num_blocks"][:s]) for s in range(5)]
        stages = [blocks[starts[s] : starts[s + 1]] for s in range(4)]
        nc, feat = cfg["num_classes"], cfg["widths"][4]
        if layout == "official":
            self.stage0 = blocks[0]
            for s, stage in enumerate(stages, 1):
                setattr(self, f"stage{s}", nn.ModuleList(stage))
            self.gap = nn.AdaptiveAvgPool2d(1)
            if nc:
                self.linear = nn.Linear(feat, nc)
        else:
            self.stem = blocks[0]
            self.stages = nn.Sequential(*(nn.Sequential(*stage) for stage in stages))
            self.head = nn.ModuleDict({"fc": nn.Linear(feat, nc)} if nc else {})
        self._classifier = names.classifier if nc else None

    def named_blocks(self) -> Iterator[tuple[str, RepVGGBlock]]:
        for name in self.block_names:
            yield name, cast(RepVGGBlock, self.get_submodule(name))

    def forward(self, x: Tensor) -> Tensor:
        for _, block in self.named_blocks():
            x = block(x)
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.get_submodule(self._classifier)(x) if self._classifier else x


def build_repvgg(variant_or_config: str | RepVGGCfg | Mapping[str, Any], deploy: bool, **overrides: Any) -> RepVGG:
    """A randomly initialised RepVGG on the CPU (train mode, as ``torch.nn`` builds it).

    ``variant_or_config``: a variant name ("A0", "RepVGG-B1g4", "repvgg_d2se"), a ``RepVGGCfg``,
    or an explicit config (``Plan.config``). ``overrides`` replace fields of the ``RepVGGCfg``
    (e.g. ``width_multiplier``, ``num_classes``) or keys of the explicit config; ``layout="timm"``
    builds timm's names.

    Example::

        model = build_repvgg("A0", deploy=False, width_multiplier=(0.25, 0.25, 0.25, 0.5), num_classes=10)
    """
    layout = overrides.pop("layout", "official")
    if isinstance(variant_or_config, str):
        variant_or_config = VARIANTS[lookup_variant(variant_or_config)]
    if isinstance(variant_or_config, RepVGGCfg):
        try:
            config = dataclasses.replace(variant_or_config, **overrides).resolve()
        except TypeError as e:
            raise BadInput(f"build_repvgg: {e}") from None
    else:
        config = {**dict(variant_or_config), **overrides}
    with torch.device("cpu"):
        return RepVGG(config, deploy=deploy, layout=layout)


# --------------------------------------------------------------------------- detection


def _find_layout(sd: Mapping[str, Tensor]) -> str:
    if "stage0.rbr_dense.conv.weight" in sd:
        layout = "official"
    elif "stem.conv_kxk.conv.weight" in sd and "stem.conv_1x1.conv.weight" in sd:
        layout = "timm"
    elif "stage0.rbr_reparam.weight" in sd or (
        "stem.reparam_conv.weight" in sd
        and any(k.startswith("stages.") and k.endswith(".reparam_conv.weight") for k in sd)
    ):
        raise NotThisArch("already in deploy form (`rbr_reparam`/`reparam_conv` keys, no branches): nothing to fuse")
    else:
        first = next(iter(sd), "")
        raise NotThisArch(
            "no RepVGG branch keys (`stage0.rbr_dense.conv.weight` or timm's `stem.conv_kxk.conv.weight`); "
            f"first key is `{first}`"
        )
    pattern = _key_pattern(LAYOUTS[layout])
    foreign = [k for k in sd if not pattern.fullmatch(k)]
    if foreign:
        raise NotThisArch(f"{len(foreign)} keys are not RepVGG's ({layout} layout), e.g. `{foreign[0]}`")
    return layout


def _shape(sd: Mapping[str, Tensor], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise KeyMismatch(f"RepVGG checkpoint lacks `{key}`")
    return tuple(sd[key].shape)


def read_config(sd: Mapping[str, Tensor], layout: str) -> dict[str, Any]:
    """The explicit config of a training state_dict, from key names and shapes only."""
    n = LAYOUTS[layout]
    stage_re = re.compile(r"stage([1-4])\.(\d+)\.") if layout == "official" else re.compile(r"stages\.([0-3])\.(\d+)\.")
    offset = 0 if layout == "official" else 1
    seen: list[set[int]] = [set() for _ in range(4)]
    for k in sd:
        m = stage_re.match(k)
        if m:
            seen[int(m.group(1)) + offset - 1].add(int(m.group(2)))
    num_blocks = [max(s) + 1 if s else 0 for s in seen]
    if min(num_blocks) < 1:
        empty = num_blocks.index(0)
        where = f"stage{empty + 1}" if layout == "official" else f"stages.{empty}"
        raise KeyMismatch(f"RepVGG checkpoint has no blocks in `{where}`")

    prefixes = n.block_prefixes(num_blocks)
    w0 = _shape(sd, f"{prefixes[0]}.{n.dense}.conv.weight")
    cin = w0[1] if len(w0) == 4 else 0
    in_chans, outs, groups, se = cin, [], [], []
    for p in prefixes:
        key = f"{p}.{n.dense}.conv.weight"
        shape = _shape(sd, key)
        if len(shape) != 4 or shape[2:] != (3, 3):
            raise KeyMismatch(f"`{key}` has shape {shape}; a RepVGG dense branch is a 3x3 conv")
        cout, per_group = shape[0], shape[1]
        if per_group < 1 or cin % per_group or cout % (cin // per_group):
            raise KeyMismatch(f"`{key}` {shape} does not fit a {cin}-channel input")
        groups.append(cin // per_group)
        outs.append(cout)
        down = f"{p}.{n.se}.{n.se_down}.weight"
        se.append(sd[down].shape[0] if down in sd else 0)
        cin = cout

    widths = [outs[0]]
    start = 1
    for count in num_blocks:
        stage_outs = set(outs[start : start + count])
        if len(stage_outs) != 1:
            raise KeyMismatch(
                f"RepVGG `{prefixes[start].rsplit('.', 1)[0]}` has blocks of different widths "
                f"{sorted(stage_outs)}; every block of a stage has the same width"
            )
        widths.append(stage_outs.pop())
        start += count
    cls = f"{n.classifier}.weight"
    num_classes = sd[cls].shape[0] if cls in sd else 0
    return check_config(
        {
            "num_blocks": num_blocks,
            "widths": widths,
            "groups": groups,
            "se_channels": se,
            "num_classes": int(num_classes),
            "in_chans": int(in_chans),
        }
    )


_BACKBONE = ("num_blocks", "widths", "groups", "se_channels")


def _resolved_variants() -> dict[str, dict[str, Any]]:
    return {name: cfg.resolve() for name, cfg in VARIANTS.items()}


def _difference(a: Mapping[str, Any], b: Mapping[str, Any]) -> str:
    for k in _BACKBONE:
        if list(a[k]) != list(b[k]):
            return f"{k} {list(a[k])} vs {list(b[k])}"
    return ""


def match_variant(config: Mapping[str, Any]) -> str:
    """The official name of the backbone ``config`` describes, or ``RepVGG-custom``."""
    for name, ref in _resolved_variants().items():
        if not _difference(config, ref):
            return name
    return CUSTOM


# --------------------------------------------------------------------------- fusion


def merge_block(
    block: RepVGGBlock, name: str = "block", out_dtype: torch.dtype | None = None, block_rows: int = 64
) -> tuple[Tensor, Tensor]:
    """The (kernel, bias) of the single 3x3 conv equal to ``block``'s three branches.

    Computed in float64 a block of output channels at a time and written in ``out_dtype``
    (float64 by default): every output channel depends only on its own rows of the three
    branches, so no whole float64 kernel exists (236 MB for RepVGG-B3's last block). Small
    blocks keep the float64 temporaries in cache and under glibc's mmap threshold (larger ones
    are mapped and zero-filled anew on every allocation); bench/RESULTS.md measures the choice.
    """
    dense, one, ident = block.branches()
    n = block._n

    def bn(module: nn.Module | Tensor, what: str) -> tuple[Tensor, Tensor]:
        m = cast(nn.BatchNorm2d, module)
        return bn_scale_shift(m.running_mean, m.running_var, m.weight, m.bias, m.eps, f"{name}.{what}")

    s_d, t_d = bn(dense.bn, f"{n.dense}.bn")
    s_1, t_1 = bn(one.bn, f"{n.one}.bn")
    s_i, t_i = bn(ident, n.identity) if ident is not None else (None, None)
    weight, weight_1 = cast(nn.Conv2d, dense.conv).weight, cast(nn.Conv2d, one.conv).weight
    kernel = torch.empty(weight.shape, dtype=out_dtype or torch.float64)
    for start in range(0, weight.shape[0], block_rows):
        r = slice(start, start + block_rows)
        k, _ = fold_bn(weight[r], None, s_d[r], t_d[r])  # fresh float64 rows
        add_centered(k, fold_bn(weight_1[r], None, s_1[r], t_1[r])[0])  # == + pad_kernel(1x1, 3x3)
        if s_i is not None:  # a grouped identity: K[i, i % (in/groups), 1, 1] = 1, scaled by its BN
            add_identity(k, s_i[r], first_row=start)
        kernel[r] = k
    bias = t_d + t_1 + (t_i if t_i is not None else 0)
    return kernel, bias


def _recorded_variant(arch: Any) -> str | None:
    """The variant a training script recorded (timm's `repvgg_a0`, the official `RepVGG-A0`)."""
    if not isinstance(arch, str) or "repvgg" not in arch.lower():
        return None
    try:
        return lookup_variant(arch)
    except BadInput:
        return arch


class RepVGGFuser(Fuser):
    """RepVGG training checkpoints (official or timm names) -> deploy weights in the same layout."""

    name = "repvgg"
    summary = "RepVGG (DingXiaoH and timm layouts): 3x3 + 1x1 + identity branches into one 3x3, SE kept"

    def detect(self, ckpt: Checkpoint, options: Options) -> Plan:
        sd = ckpt.state_dict
        layout = _find_layout(sd)
        config = read_config(sd, layout)
        variant = match_variant(config)
        notes: list[str] = []
        if options.variant:
            wanted = lookup_variant(options.variant)
            diff = _difference(config, VARIANTS[wanted].resolve())
            if diff:
                raise BadInput(f"{ckpt.path}: --variant {wanted} does not fit the weights ({diff})")
            variant = wanted
        if layout == "timm":
            notes.append("timm layout (stem/stages/conv_kxk): the deploy file uses timm's names (reparam_conv)")
            if variant in TIMM_MODELS:
                config["timm_model"] = TIMM_MODELS[variant]
        recorded = _recorded_variant(ckpt.extras.get("arch"))
        if recorded and recorded != variant:
            notes.append(
                f"the checkpoint records arch `{ckpt.extras['arch']}` but its tensors are "
                f"{variant}; the tensors were followed"
            )
        if variant != CUSTOM and (config["num_classes"], config["in_chans"]) != (1000, 3):
            notes.append(
                f"{variant} backbone with {config['num_classes']} classes and {config['in_chans']} input channels"
            )
        if not config["num_classes"]:
            notes.append("no classifier in the checkpoint: the model outputs pooled features")
        if variant == CUSTOM:
            notes.append(
                "custom RepVGG: strides follow RepVGG's convention (2 at stage0 and each stage's "
                "first block); weights do not record them"
            )
        return Plan(
            arch=self.name,
            variant=variant,
            layout=layout,
            config=config,
            notes=notes,
            input_size=(config["in_chans"], 224, 224),
            num_classes=config["num_classes"] or None,
        )

    def build_train(self, plan: Plan, state_dict: dict[str, Tensor]) -> nn.Module:
        with torch.device("meta"):
            model = RepVGG(plan.config, deploy=False, layout=plan.layout)
        return load_strict(model, state_dict, f"RepVGG training model ({plan.variant}, {plan.layout} layout)")

    def fuse(self, plan: Plan, state_dict: dict[str, Tensor], train: nn.Module, done: Done | None = None) -> Fused:
        if not isinstance(train, RepVGG):
            raise TypeError(f"RepVGGFuser.fuse needs the model from build_train, got {type(train).__name__}")
        dtype = float_dtype(state_dict)
        n = LAYOUTS[plan.layout]
        out: dict[str, Tensor] = {}
        counts = {"bn_folded": 0, "branch_merges": 0, "chain_merges": 0}
        unfused: list[tuple[str, str]] = []
        for prefix, block in train.named_blocks():
            kernel, bias = merge_block(block, prefix, out_dtype=dtype)
            out[f"{prefix}.{n.reparam}.weight"] = kernel
            out[f"{prefix}.{n.reparam}.bias"] = bias.to(dtype).contiguous()
            counts["bn_folded"] += 2 + (block.branches()[2] is not None)
            counts["branch_merges"] += 1
            if isinstance(getattr(block, n.se), SqueezeExcite):
                unfused.append((f"{prefix}.{n.se}", "squeeze-excitation scales by its input: not linear, kept"))
            if done is not None:
                done([*block.parameters(), *block.buffers()])
        return Fused(self.deploy_state(plan, out, state_dict), dict(plan.config), counts, unfused)

    def build_deploy(self, plan: Plan) -> nn.Module:
        with torch.device("meta"):
            return RepVGG(plan.config, deploy=True, layout=plan.layout).eval()

    def eval_transform(self, plan: Plan, ckpt: Checkpoint) -> EvalTransform:
        """timm layout: timm's data config for the matching ``repvgg_*`` model. Official layout:
        DingXiaoH/RepVGG ``data/build.py`` (eval): ``Resize(TEST_SIZE, bilinear)`` + center crop
        ``TEST_SIZE`` (no margin), or ``Resize(int(256 / 224 * TEST_SIZE))`` with ``TEST.CROP``;
        no resize at 32 px or below; ImageNet mean/std. A main.py checkpoint's ``config``
        (DATA.TEST_SIZE / IMG_SIZE / INTERPOLATION, TEST.CROP) and ``args`` in timm train.py's
        names (input_size, crop_pct, interpolation, mean, std) take precedence."""
        args = ckpt.args
        if plan.layout == "timm":
            return timm_eval_transform(plan.config.get("timm_model"), args, plan.input_size[0])
        used: list[str] = []
        config = ckpt.extras.get("config")
        data = config.get("DATA", {}) if isinstance(config, Mapping) else {}
        test = config.get("TEST", {}) if isinstance(config, Mapping) else {}
        data = data if isinstance(data, Mapping) else {}
        size = next(
            (data[k] for k in ("TEST_SIZE", "IMG_SIZE") if type(data.get(k)) is int and data[k] > 0),
            plan.input_size[-1],
        )
        interpolation = data.get("INTERPOLATION") if data.get("INTERPOLATION") in ("bilinear", "bicubic") else None
        crop = isinstance(test, Mapping) and test.get("CROP") is True
        if data:
            used.append("config.DATA")
        base = EvalTransform(
            size=size,
            interpolation=interpolation or "bilinear",
            crop_pct=224 / 256 if crop else 1.0,
            resize=int((256 / 224) * size) if crop else size,
        )
        t, extra = recorded_transform(base, args)
        used += [f"args.{n}" for n in extra]
        if t.size <= 32 and "crop_pct" not in extra:  # resize_im is false: the image goes in as it is
            t = dataclasses.replace(t, crop_pct=1.0, resize=t.size)
        how = "no resize at 32 px or below" if t.size <= 32 else ("TEST.CROP" if crop else "resize + center crop")
        source = f"RepVGG data/build.py eval ({how})" + (f", {'/'.join(used)} from the checkpoint" if used else "")
        return dataclasses.replace(t, source=source)
