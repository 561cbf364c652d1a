"""MobileOne (apple/ml-mobileone ``mobileone.py`` and timm's ``mobileone_*``): branches into one conv.

A MobileOne block sums, before its SE and activation, ``num_conv_branches`` conv+BN branches of
its kernel size, a 1x1 conv+BN "scale" branch (kernels above 1x1) and a BN "skip" branch (same
width, stride 1). In eval mode every branch is an affine map of the input, so their sum is one
conv with a bias. The block is also FastViT's building block (``fold_block`` is shared with
``fastvit.py``), where it has a GELU, may have no activation, no scale branch or no conv branch.

The whole network is read from the tensors: pairs of blocks per stage from the keys (a depthwise
3x3 then a pointwise 1x1), widths from the weight shapes, conv branches from the branch keys, SE
from its keys, classes from the classifier. Strides follow MobileOne's convention (2 at stage0 and
at each stage's first depthwise block) and are checked against the skip branches the weights have.

Two layouts, the same model under other names:
- ``official``: ``stage0``, ``stage1.0`` ... ``stage4.N``, ``rbr_conv.K|rbr_scale|rbr_skip``,
  ``se.reduce|expand``, ``linear``; deploy ``reparam_conv`` (``mobileone(inference_mode=True)``).
- ``timm``: ``stem``, ``stages.0.0`` ..., ``conv_kxk.K|conv_scale|identity``, ``attn.fc1|fc2``,
  ``head.fc``; deploy ``reparam_conv`` (timm's ``reparameterize_model`` output).
"""

from __future__ import annotations

import dataclasses
import re
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..checkpoint import Checkpoint, float_dtype, load_strict
from ..errors import BadInput, KeyMismatch
from ..fold import add_centered, add_identity, bn_scale_shift, fold_bn
from ..fuser import Done, EvalTransform, Fused, Fuser, NotThisArch, Options, Plan, recorded_transform

_STRIDE = 2  # stage0 and the first depthwise block of every stage


# --------------------------------------------------------------------------- the block


@dataclass(frozen=True)
class BlockNames:
    """The attribute names of a MobileOne block in one layout."""

    conv: str  # ModuleList of conv+BN branches
    scale: str  # the 1x1 conv+BN branch
    skip: str  # the BN identity branch
    reparam: str  # the deploy conv
    se: str
    se_down: str
    se_up: str


OFFICIAL_BLOCK = BlockNames("rbr_conv", "rbr_scale", "rbr_skip", "reparam_conv", "se", "reduce", "expand")
TIMM_BLOCK = BlockNames("conv_kxk", "conv_scale", "identity", "reparam_conv", "attn", "fc1", "fc2")
TIMM_FASTVIT_BLOCK = BlockNames("conv_kxk", "conv_scale", "identity", "reparam_conv", "se", "fc1", "fc2")

ACTIVATIONS = ("relu", "gelu", "none")


def activation(name: str) -> nn.Module:
    if name == "relu":
        return nn.ReLU()
    if name == "gelu":
        return nn.GELU()
    if name == "none":
        return nn.Identity()
    raise BadInput(f"unknown activation `{name}` (known: {', '.join(ACTIVATIONS)})")


class SqueezeExcite(nn.Module):
    """MobileOne's SE: global average pool -> 1x1 down -> ReLU -> 1x1 up -> sigmoid -> scale."""

    def __init__(self, channels: int, hidden: int, names: BlockNames) -> None:
        super().__init__()
        self._down, self._up = names.se_down, names.se_up
        self.add_module(names.se_down, nn.Conv2d(channels, hidden, 1, bias=True))
        self.add_module(names.se_up, nn.Conv2d(hidden, channels, 1, bias=True))

    def forward(self, x: Tensor) -> Tensor:
        s = torch.relu(getattr(self, self._down)(x.mean((2, 3), keepdim=True)))
        return x * torch.sigmoid(getattr(self, self._up)(s))


def conv_bn(cin: int, cout: int, k: int, stride: int, groups: int) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
            bn=nn.BatchNorm2d(cout),
        )
    )


class MobileOneBlock(nn.Module):
    """Train: act(se(sum(conv branches) + scale(x) + skip(x))). Deploy: act(se(reparam(x))).

    ``branches``: number of k x k conv+BN branches (0 allowed: FastViT's RepMixer ``norm``);
    ``scale``: whether a k > 1 block has its 1x1 branch; the skip branch exists when
    ``cin == cout`` and ``stride == 1``, as in both official codes.
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        k: int,
        stride: int,
        groups: int,
        *,
        branches: int = 1,
        scale: bool = True,
        se_hidden: int = 0,
        act: str = "relu",
        deploy: bool = False,
        names: BlockNames = OFFICIAL_BLOCK,
    ) -> None:
        super().__init__()
        self.cin, self.cout, self.k, self.stride, self.groups = cin, cout, k, stride, groups
        self.deploy, self._n = deploy, names
        self.add_module(names.se, SqueezeExcite(cout, se_hidden, names) if se_hidden else nn.Identity())
        self.act = activation(act)
        if deploy:
            self.add_module(names.reparam, nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=True))
        else:
            self.add_module(names.skip, nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None)
            convs = [conv_bn(cin, cout, k, stride, groups) for _ in range(branches)]
            self.add_module(names.conv, nn.ModuleList(convs) if branches else None)
            self.add_module(names.scale, conv_bn(cin, cout, 1, stride, groups) if k > 1 and scale else None)

    def branches(self) -> tuple[list[Any], Any, Any]:
        """(conv+BN branches, the 1x1 scale branch or None, the skip BN or None): conv-BN holders
        with ``.conv``/``.bn``, typed Any as nn.Module attributes are."""
        n = self._n
        convs = getattr(self, n.conv)
        return list(convs) if convs is not None else [], getattr(self, n.scale), getattr(self, n.skip)

    def linear(self, x: Tensor) -> Tensor:
        """What the block computes before its SE and activation."""
        if self.deploy:
            return getattr(self, self._n.reparam)(x)
        convs, scale, skip = self.branches()
        out = torch.zeros((), dtype=x.dtype, device=x.device)
        for branch in convs:
            out = out + branch(x)
        if scale is not None:
            out = out + scale(x)
        if skip is not None:
            out = out + skip(x)
        return out

    def forward(self, x: Tensor) -> Tensor:
        return self.act(getattr(self, self._n.se)(self.linear(x)))


def bn_of(bn: Any, name: str) -> tuple[Tensor, Tensor]:
    """(scale, shift) of a BatchNorm module in eval mode, float64."""
    return bn_scale_shift(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps, name)


def fold_block(block: MobileOneBlock, name: str = "block") -> tuple[Tensor, Tensor]:
    """The float64 (kernel, bias) of the single conv equal to ``block``'s branches (before SE/act).

    ``kernel + sum_b fold(conv_b) + pad(fold(scale)) + identity * skip_scale``, biases summed.
    """
    if block.deploy:
        raise TypeError("fold_block needs a training-mode MobileOneBlock")
    n = block._n
    convs, scale, skip = block.branches()
    shape = (block.cout, block.cin // block.groups, block.k, block.k)
    kernel = torch.zeros(shape, dtype=torch.float64)
    bias = torch.zeros(block.cout, dtype=torch.float64)
    for i, branch in enumerate(convs):
        s, t = bn_of(branch.bn, f"{name}.{n.conv}.{i}.bn")
        w, b = fold_bn(branch.conv.weight, None, s, t)
        kernel += w
        bias += b
    if scale is not None:
        s, t = bn_of(scale.bn, f"{name}.{n.scale}.bn")
        w, b = fold_bn(scale.conv.weight, None, s, t)
        add_centered(kernel, w)
        bias += b
    if skip is not None:
        s, t = bn_of(skip, f"{name}.{n.skip}")
        add_identity(kernel, s)
        bias += t
    return kernel, bias


def bn_count(block: MobileOneBlock) -> int:
    convs, scale, skip = block.branches()
    return len(convs) + (scale is not None) + (skip is not None)


# --------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class MobileOneCfg:
    """A MobileOne variant as the official constructor takes it."""

    width_multipliers: tuple[float, float, float, float]
    num_conv_branches: int = 1
    use_se: bool = False
    num_blocks: tuple[int, int, int, int] = (2, 8, 10, 1)
    num_classes: int = 1000
    in_chans: int = 3

    def resolve(self) -> dict[str, Any]:
        """The explicit, JSON-ready config (widths and per-layer SE widths / branch counts)."""
        wm, nb = self.width_multipliers, self.num_blocks
        widths = [min(64, int(64 * wm[0])), int(64 * wm[0]), int(128 * wm[1]), int(256 * wm[2]), int(512 * wm[3])]
        se_blocks = [0, 0, nb[2] // 2 if self.use_se else 0, nb[3] if self.use_se else 0]
        se, branches, cin = [0], [1], widths[0]  # stage0: one conv branch, no SE (official)
        for s, n in enumerate(nb):
            for j in range(n):
                use = j >= n - se_blocks[s]
                for cout in (cin, widths[s + 1]):  # depthwise, then pointwise
                    se.append(int(cout * 0.0625) if use else 0)
                    branches.append(self.num_conv_branches)
                cin = widths[s + 1]
        return check_config(
            {
                "num_blocks": list(nb),
                "widths": widths,
                "se_channels": se,
                "conv_branches": branches,
                "num_classes": int(self.num_classes),
                "in_chans": int(self.in_chans),
            }
        )


VARIANTS: dict[str, MobileOneCfg] = {
    "MobileOne-S0": MobileOneCfg((0.75, 1.0, 1.0, 2.0), num_conv_branches=4),
    "MobileOne-S1": MobileOneCfg((1.5, 1.5, 2.0, 2.5)),
    "MobileOne-S2": MobileOneCfg((1.5, 2.0, 2.5, 4.0)),
    "MobileOne-S3": MobileOneCfg((2.0, 2.5, 3.0, 4.0)),
    "MobileOne-S4": MobileOneCfg((3.0, 3.5, 3.5, 4.0), use_se=True),
}
CUSTOM = "MobileOne-custom"
TIMM_MODELS = {n: "mobileone_" + n.split("-")[1].lower() for n in VARIANTS}
# timm's pretrained_cfg of the weights ported from apple/ml-mobileone (`mobileone_sN.apple_in1k`).
_CROP_PCT = {"MobileOne-S0": 0.875}


def lookup_variant(name: str) -> str:
    """The canonical name of ``name`` ("s0", "mobileone_s0", "MobileOne-S0" -> "MobileOne-S0")."""
    short = name.strip().lower().replace("-", "").replace("_", "").removeprefix("mobileone")
    for v in VARIANTS:
        if v.lower().replace("-", "").removeprefix("mobileone") == short:
            return v
    raise BadInput(f"unknown MobileOne variant `{name}` (known: {', '.join(VARIANTS)})")


def layer_shapes(cfg: Mapping[str, Any]) -> Iterator[tuple[int, int, int, int, int]]:
    """(in, out, kernel, stride, groups) of every block, stage0 first."""
    cin = cfg["in_chans"]
    yield cin, cfg["widths"][0], 3, _STRIDE, 1
    cin = cfg["widths"][0]
    for s, n in enumerate(cfg["num_blocks"], 1):
        for j in range(n):
            yield cin, cin, 3, _STRIDE if j == 0 else 1, cin
            yield cin, cfg["widths"][s], 1, 1, 1
            cin = cfg["widths"][s]


def check_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Validate an explicit config (``MobileOneCfg.resolve`` / ``Plan.config``); return a plain copy."""
    keys = ("num_blocks", "widths", "se_channels", "conv_branches", "num_classes", "in_chans")
    try:
        cfg = {**dict(config), **{k: config[k] for k in keys}}
    except KeyError as e:
        raise BadInput(f"MobileOne config lacks {e}") from None
    nb, widths = cfg["num_blocks"], cfg["widths"]
    ok = (
        isinstance(nb, list)
        and isinstance(widths, list)
        and len(nb) == 4
        and len(widths) == 5
        and all(type(v) is int and v >= 1 for v in [*nb, *widths, cfg["in_chans"]])
        and type(cfg["num_classes"]) is int
        and cfg["num_classes"] >= 0
    )
    if not ok:
        raise BadInput(f"MobileOne config: need 4 stages of >= 1 block pair and 5 widths, got {nb}, {widths}")
    n = 1 + 2 * sum(nb)
    for k in ("se_channels", "conv_branches"):
        v = cfg[k]
        if not isinstance(v, list) or len(v) != n or not all(type(c) is int and c >= 0 for c in v):
            raise BadInput(f"MobileOne config: {k} needs one count per block ({n})")
    if min(cfg["conv_branches"]) < 1:
        raise BadInput("MobileOne config: every block needs at least one conv branch")
    return cfg


# --------------------------------------------------------------------------- the network


@dataclass(frozen=True)
class _Layout:
    block: BlockNames
    classifier: str

    def prefixes(self, num_blocks: list[int]) -> list[str]:
        if self is LAYOUTS["official"]:
            return ["stage0"] + [f"stage{s}.{i}" for s, n in enumerate(num_blocks, 1) for i in range(2 * n)]
        return ["stem"] + [f"stages.{s}.{i}" for s, n in enumerate(num_blocks) for i in range(2 * n)]


LAYOUTS = {"official": _Layout(OFFICIAL_BLOCK, "linear"), "timm": _Layout(TIMM_BLOCK, "head.fc")}


class MobileOne(nn.Module):
    """MobileOne in either layout, built from an explicit config (``check_config``).

    ``deploy=True`` builds the deploy form directly (one conv with bias per block).
    """

    def __init__(self, config: Mapping[str, Any], deploy: bool = False, layout: str = "official") -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise BadInput(f"unknown MobileOne layout `{layout}` (known: {', '.join(LAYOUTS)})")
        cfg = check_config(config)
        lay = LAYOUTS[layout]
        self.layout, self.deploy = layout, deploy
        self.block_names = lay.prefixes(cfg["num_blocks"])
        blocks = [
            MobileOneBlock(
                cin,
                cout,
                k,
                stride,
                groups,
                branches=cfg["conv_branches"][i],
                se_hidden=cfg["se_channels"][i],
                act="relu",
                deploy=deploy,
                names=lay.block,
            )
            for i, (cin, cout, k, stride, groups) in enumerate(layer_shapes(cfg))
        ]
        starts = [1 + 2 * sum(cfg["num_blocks"][:s]) for s in range(5)]
        stages = [blocks[starts[s] : starts[s + 1]] for s in range(4)]
        nc, feat = cfg["num_classes"], cfg["widths"][4]
        if layout == "official":
            self.stage0 = blocks[0]
            for s, stage in enumerate(stages, 1):
                setattr(self, f"stage{s}", nn.Sequential(*stage))
            if nc:
                self.linear = nn.Linear(feat, nc)
        else:
            self.stem = blocks[0]
            self.stages = nn.Sequential(*(nn.Sequential(*stage) for stage in stages))
            self.head = nn.ModuleDict({"fc": nn.Linear(feat, nc)} if nc else {})
        self._classifier = lay.classifier if nc else None

    def named_blocks(self) -> Iterator[tuple[str, MobileOneBlock]]:
        for name in self.block_names:
            yield name, cast(MobileOneBlock, self.get_submodule(name))

    def forward(self, x: Tensor) -> Tensor:
        for _, block in self.named_blocks():
            x = block(x)
        x = torch.flatten(x.mean((2, 3)), 1)
        return self.get_submodule(self._classifier)(x) if self._classifier else x


def build_mobileone(variant: str | Mapping[str, Any], deploy: bool = False, **overrides: Any) -> MobileOne:
    """A randomly initialised MobileOne on the CPU: ``variant`` a name ("s0", "MobileOne-S4") or an
    explicit config; ``overrides`` replace fields of the ``MobileOneCfg`` (e.g. ``width_multipliers``,
    ``num_classes``) or keys of an explicit config; ``layout="timm"`` builds timm's names."""
    layout = overrides.pop("layout", "official")
    if isinstance(variant, str):
        import dataclasses

        try:
            config = dataclasses.replace(VARIANTS[lookup_variant(variant)], **overrides).resolve()
        except TypeError as e:
            raise BadInput(f"build_mobileone: {e}") from None
    else:
        config = {**dict(variant), **overrides}
    with torch.device("cpu"):
        return MobileOne(config, deploy=deploy, layout=layout)


# --------------------------------------------------------------------------- detection

_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"


def _key_pattern(layout: str) -> re.Pattern:
    lay = LAYOUTS[layout]
    n = lay.block
    block = r"stage0|stage[1-4]\.\d+" if layout == "official" else r"stem|stages\.[0-3]\.\d+"
    branch = (
        rf"{n.conv}\.\d+\.(conv\.weight|bn\.{_BN})|{n.scale}\.(conv\.weight|bn\.{_BN})|{n.skip}\.{_BN}"
        rf"|{n.se}\.({n.se_down}|{n.se_up})\.(weight|bias)"
    )
    return re.compile(rf"({block})\.({branch})|{re.escape(lay.classifier)}\.(weight|bias)")


def find_layout(sd: Mapping[str, Tensor]) -> str:
    """``official`` or ``timm``; NotThisArch for anything else (deploy-form MobileOne included)."""
    if "stage0.rbr_conv.0.conv.weight" in sd:
        layout = "official"
    elif "stem.conv_kxk.0.conv.weight" in sd and "stages.0.0.conv_kxk.0.conv.weight" in sd:
        layout = "timm"
    elif "stage0.reparam_conv.weight" in sd or (
        "stem.reparam_conv.weight" in sd and "stages.0.0.reparam_conv.weight" in sd
    ):
        raise NotThisArch("already in deploy form (`reparam_conv` keys, no branches): nothing to fuse")
    else:
        first = next(iter(sd), "")
        raise NotThisArch(
            "no MobileOne branch keys (`stage0.rbr_conv.0.conv.weight` or timm's "
            f"`stem.conv_kxk.0.conv.weight`); first key is `{first}`"
        )
    pattern = _key_pattern(layout)
    foreign = [k for k in sd if not pattern.fullmatch(k)]
    if foreign:
        raise NotThisArch(f"{len(foreign)} keys are not MobileOne's ({layout} layout), e.g. `{foreign[0]}`")
    return layout


def _shape(sd: Mapping[str, Tensor], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise KeyMismatch(f"MobileOne checkpoint lacks `{key}`")
    return tuple(sd[key].shape)


def read_config(sd: Mapping[str, Tensor], layout: str) -> dict[str, Any]:
    """The explicit config of a training state_dict, from key names and shapes only."""
    lay = LAYOUTS[layout]
    n = lay.block
    stage_re = re.compile(r"stage([1-4])\.(\d+)\.") if layout == "official" else re.compile(r"stages\.([0-3])\.(\d+)\.")
    offset = 0 if layout == "official" else 1
    seen: list[set[int]] = [set() for _ in range(4)]
    for k in sd:
        m = stage_re.match(k)
        if m:
            seen[int(m.group(1)) + offset - 1].add(int(m.group(2)))
    counts = [max(s) + 1 if s else 0 for s in seen]
    for s, c in enumerate(counts):
        where = f"stage{s + 1}" if layout == "official" else f"stages.{s}"
        if c == 0:
            raise KeyMismatch(f"MobileOne checkpoint has no blocks in `{where}`")
        if c % 2:
            raise KeyMismatch(f"MobileOne `{where}` has {c} blocks; a stage is pairs of depthwise + pointwise blocks")
    num_blocks = [c // 2 for c in counts]
    prefixes = lay.prefixes(num_blocks)
    branch_re = re.compile(rf"(.+)\.{n.conv}\.(\d+)\.conv\.weight")
    branches: dict[str, int] = {}
    for k in sd:
        m = branch_re.fullmatch(k)
        if m:
            branches[m.group(1)] = max(branches.get(m.group(1), 0), int(m.group(2)) + 1)
    w0 = _shape(sd, f"{prefixes[0]}.{n.conv}.0.conv.weight")
    in_chans = w0[1] if len(w0) == 4 else 0
    outs, se, nbranch = [], [], []
    cin = in_chans
    for i, p in enumerate(prefixes):
        key = f"{p}.{n.conv}.0.conv.weight"
        shape = _shape(sd, key)
        depthwise = i > 0 and i % 2 == 1
        want_k, want_in = (3, 1) if depthwise else ((3, cin) if i == 0 else (1, cin))
        if len(shape) != 4 or shape[2:] != (want_k, want_k) or shape[1] != want_in or (depthwise and shape[0] != cin):
            kind = "stem 3x3" if i == 0 else "depthwise 3x3" if depthwise else "pointwise 1x1"
            raise KeyMismatch(f"`{key}` has shape {shape}; here MobileOne has a {kind} conv from {cin} channels")
        for b in range(branches.get(p, 0)):
            _shape(sd, f"{p}.{n.conv}.{b}.conv.weight")
        outs.append(shape[0])
        nbranch.append(branches.get(p, 0))
        down = f"{p}.{n.se}.{n.se_down}.weight"
        se.append(sd[down].shape[0] if down in sd else 0)
        cin = shape[0]
    widths = [outs[0]]
    start = 1
    for s, count in enumerate(num_blocks):
        pw = set(outs[start + 1 : start + 2 * count : 2])
        if len(pw) != 1:
            raise KeyMismatch(f"MobileOne stage {s + 1} has blocks of different widths {sorted(pw)}")
        widths.append(pw.pop())
        start += 2 * count
    cls = f"{lay.classifier}.weight"
    cfg = check_config(
        {
            "num_blocks": num_blocks,
            "widths": widths,
            "se_channels": se,
            "conv_branches": nbranch,
            "num_classes": int(sd[cls].shape[0]) if cls in sd else 0,
            "in_chans": int(in_chans),
        }
    )
    # The skip branches the weights have must be the ones the convention's strides give.
    for p, (ci, co, _, stride, _) in zip(prefixes, layer_shapes(cfg), strict=True):
        has = f"{p}.{n.skip}.running_var" in sd
        if has != (ci == co and stride == 1):
            raise KeyMismatch(
                f"MobileOne `{p}` {'has' if has else 'lacks'} a skip branch (`{n.skip}`); with MobileOne's "
                f"strides (2 at each stage's first block) it should {'not ' if has else ''}have one"
            )
    return cfg


_BACKBONE = ("num_blocks", "widths", "se_channels", "conv_branches")


def _difference(a: Mapping[str, Any], b: Mapping[str, Any]) -> str:
    for k in _BACKBONE:
        if list(a[k]) != list(b[k]):
            return f"{k} {list(a[k])} vs {list(b[k])}"
    return ""


def match_variant(config: Mapping[str, Any]) -> str:
    for name, cfg in VARIANTS.items():
        if not _difference(config, cfg.resolve()):
            return name
    return CUSTOM


def timm_layout_under_auto(fuser: Fuser, family: str, timm_name: str | None) -> None:
    """Under ``--arch auto`` (``Options.under_auto``) a timm-layout checkpoint stays with conv-bn
    (which folds more): raise NotThisArch saying so. Named (``--arch NAME``), the fuser takes it."""
    model = f" --model timm:{timm_name}" if timm_name else ""
    raise NotThisArch(
        f"timm layout of {family}: --arch auto leaves it to conv-bn{model}, which folds more; "
        f"--arch {fuser.name} writes timm's re-parameterized layout"
    )


# --------------------------------------------------------------------------- the fuser


class MobileOneFuser(Fuser):
    """MobileOne training checkpoints (official or timm names) -> deploy weights in the same layout."""

    name = "mobileone"
    summary = "MobileOne (apple/ml-mobileone and timm layouts): S0-S4, conv/scale/skip branches into one conv, SE kept"

    def detect(self, ckpt: Checkpoint, options: Options) -> Plan:
        sd = ckpt.state_dict
        layout = find_layout(sd)
        if layout == "timm" and options.under_auto:  # before anything can fail: auto moves on to conv-bn
            try:
                name = TIMM_MODELS.get(match_variant(read_config(sd, layout)))
            except (BadInput, KeyMismatch):
                name = None
            timm_layout_under_auto(self, "MobileOne", name)
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
        recorded = ckpt.extras.get("arch")
        if isinstance(recorded, str) and "mobileone" in recorded.lower():
            try:
                same = lookup_variant(recorded) == variant
            except BadInput:
                same = False
            if not same:
                notes.append(f"the checkpoint records arch `{recorded}` but its tensors are {variant}; followed them")
        if variant != CUSTOM and (config["num_classes"], config["in_chans"]) != (1000, 3):
            notes.append(
                f"{variant} backbone with {config['num_classes']} classes and {config['in_chans']} input channels"
            )
        if not config["num_classes"]:
            notes.append("no classifier in the checkpoint: the model outputs pooled features")
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
            model = MobileOne(plan.config, deploy=False, layout=plan.layout)
        return load_strict(model, state_dict, f"MobileOne training model ({plan.variant}, {plan.layout} layout)").eval()

    def fuse(self, plan: Plan, state_dict: dict[str, Tensor], train: nn.Module, done: Done | None = None) -> Fused:
        if not isinstance(train, MobileOne):
            raise TypeError(f"MobileOneFuser.fuse needs the model from build_train, got {type(train).__name__}")
        dtype = float_dtype(state_dict)
        n = LAYOUTS[plan.layout].block
        out: dict[str, Tensor] = {}
        counts = {"bn_folded": 0, "branch_merges": 0, "chain_merges": 0}
        unfused: list[tuple[str, str]] = []
        for prefix, block in train.named_blocks():
            kernel, bias = fold_block(block, prefix)
            out[f"{prefix}.{n.reparam}.weight"] = kernel.to(dtype).contiguous()
            out[f"{prefix}.{n.reparam}.bias"] = bias.to(dtype).contiguous()
            counts["bn_folded"] += bn_count(block)
            counts["branch_merges"] += 1
            if isinstance(getattr(block, n.se), SqueezeExcite):
                unfused.append((f"{prefix}.{n.se}", "squeeze-excitation scales by its input: not linear, kept"))
            if done is not None:
                done([*block.parameters(), *block.buffers()])
        return Fused(self.deploy_state(plan, out, state_dict), dict(plan.config), counts, unfused)

    def build_deploy(self, plan: Plan) -> nn.Module:
        with torch.device("meta"):
            return MobileOne(plan.config, deploy=True, layout=plan.layout).eval()

    def check_config(self, plan: Plan, model: str | None, where: str) -> None:
        if plan.layout not in LAYOUTS:
            raise BadInput(f"{where}: MobileOne layout `{plan.layout}` is not one repfuse writes")
        try:
            check_config(plan.config)
        except BadInput as e:
            raise BadInput(f"{where}: {e}") from None

    def eval_transform(self, plan: Plan, ckpt: Checkpoint) -> EvalTransform:
        """apple/ml-mobileone ships no evaluation code; its released weights are evaluated in timm
        (``mobileone_sN.apple_in1k``): bilinear, crop_pct 0.875 (S0) / 0.9 (S1-S4), ImageNet
        mean/std. Training arguments recorded in the checkpoint take precedence."""
        crop = _CROP_PCT.get(plan.variant, 0.9 if plan.variant in VARIANTS else 0.875)
        base = EvalTransform(size=plan.input_size[-1], interpolation="bilinear", crop_pct=crop)
        t, used = recorded_transform(base, ckpt.args)
        source = "timm pretrained_cfg of the apple/ml-mobileone weights"
        if used:
            source += f", {', '.join(f'args.{n}' for n in used)} from the checkpoint"
        return dataclasses.replace(t, source=source)
