"""What a fuser is: the contract every architecture module fulfils.

The pipeline (``repfuse_cli.pipeline``) drives a fuser through
    detect -> build_train -> fuse -> build_deploy
and does the rest (verify, report, save) itself, the same way for every architecture.
A fuser never mutates the state_dict or model it is given; it returns new tensors.
"""

from __future__ import annotations

import dataclasses
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from .errors import BadInput, RepfuseError

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor, nn

    from .checkpoint import Checkpoint


# What a fuser may call with input tensors it has finished with (see ``Fuser.fuse``).
Done = Callable[[list["Tensor"]], None]


class NotThisArch(RepfuseError):
    """Raised by ``Fuser.detect`` when the checkpoint is not of the fuser's architecture.

    ``--arch auto`` moves on to the next fuser; an explicit ``--arch`` reports the reason.
    """


@dataclass
class Options:
    """User choices that steer detection and fusion (CLI flags map 1:1)."""

    variant: str | None = None  # override the detected variant
    model: str | None = None  # conv-bn: "timm:NAME" or "pkg.module:callable"
    assume_annealed: bool = False  # VanillaNet: go on although records say annealing is unfinished
    extra_folds: bool = False  # FastViT: also fold what the official deploy model keeps (load_deploy only)
    # Set by ``--arch auto``'s detection loop, not a flag: a fuser may decline under auto what it
    # converts only when the user names it (e.g. a timm layout that auto leaves to conv-bn).
    under_auto: bool = False


@dataclass
class Plan:
    """What detection found: enough to build the training and the deploy model.

    ``config`` must be JSON-serializable: it is stored in the deploy file's metadata and is
    all ``load_deploy`` has to rebuild the deploy model.
    """

    arch: str
    variant: str
    layout: str = "official"
    config: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # assumptions and warnings for the report
    input_size: tuple[int, int, int] = (3, 224, 224)  # (C, H, W) the model expects
    num_classes: int | None = None  # classifier outputs, for top-1 agreement

    def with_config(self, config: dict[str, Any]) -> Plan:
        """This plan with the deploy config a fuser returned (``Fused.config``)."""
        return dataclasses.replace(self, config=config)

    def to_metadata(self) -> dict[str, str]:
        return {
            "arch": self.arch,
            "variant": self.variant,
            "layout": self.layout,
            "config": json.dumps(self.config, sort_keys=True),
            "input_size": json.dumps(list(self.input_size)),
            "num_classes": "" if self.num_classes is None else str(self.num_classes),
        }

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> Plan:
        nc = meta.get("num_classes", "")
        return cls(
            arch=meta["arch"],
            variant=meta.get("variant", ""),
            layout=meta.get("layout", "official"),
            config=json.loads(meta.get("config", "{}")),
            input_size=tuple(json.loads(meta.get("input_size", "[3, 224, 224]"))),
            num_classes=int(nc) if nc else None,
        )


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
CROP_MODES = ("center", "squash", "border")


@dataclass(frozen=True)
class EvalTransform:
    """How the family's own evaluation code turns an image into the model's input.

    Resize the shorter side to ``resize`` (None: ``floor(size / crop_pct)``, as timm and
    VanillaNet compute it) with ``interpolation``, center-crop ``size`` (``crop_pct`` None:
    resize straight to ``size x size``, no crop), scale to [0, 1], then normalize with
    ``mean``/``std``. ``crop_mode`` is timm's: "center" (as just said), "squash" (resize both
    sides to the scale size, then crop) or "border" (longest side to the scale size, pad, crop).
    ``source`` says where the numbers come from, in one line for the report (e.g. "VanillaNet
    datasets.py eval, args from the checkpoint").
    """

    size: int = 224
    interpolation: str = "bicubic"  # "bilinear", "bicubic", "nearest" (or box, hamming, lanczos)
    crop_pct: float | None = 0.875
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    source: str = "ImageNet defaults (resize 256, center crop 224, bicubic)"
    crop_mode: str = "center"
    resize: int | None = None  # the official code's own scale size, where it is not floor(size / crop_pct)

    @property
    def scale_size(self) -> int:
        """The side the image is resized to before the crop (``size`` when there is no crop)."""
        if self.crop_pct is None:
            return self.size
        return self.resize if self.resize is not None else math.floor(self.size / self.crop_pct)

    def describe(self) -> str:
        """One line for the report: what is done to each image, and where that comes from."""
        if self.crop_pct is None:
            geometry = f"resize to {self.size}x{self.size} ({self.interpolation}, no crop)"
        elif self.crop_mode == "squash":
            geometry = f"resize to {self.scale_size}x{self.scale_size} ({self.interpolation}), center crop {self.size}"
        elif self.crop_mode == "border":
            geometry = f"longest side to {self.scale_size} ({self.interpolation}), pad, center crop {self.size}"
        else:
            geometry = f"resize {self.scale_size} ({self.interpolation}), center crop {self.size}"

        def nums(v: tuple[float, ...]) -> str:
            return ", ".join(f"{x:.4g}" for x in v)

        return f"{geometry}, mean ({nums(self.mean)}), std ({nums(self.std)}); {self.source}"

    def with_overrides(
        self,
        *,
        size: int | None = None,
        crop_pct: float | None = None,
        interpolation: str | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        what: str = "command line",
    ) -> EvalTransform:
        """This transform with the user's overrides (None: keep), checked (BadInput if unusable).
        A new size or crop_pct drops the official scale size (it is recomputed as floor(size / crop_pct))."""
        changes: dict[str, Any] = {}
        said: list[str] = []
        if size is not None:
            if size < 1:
                raise BadInput(f"--resolution {size}: must be a positive number of pixels")
            changes.update(size=int(size), resize=None)
            said.append(f"size {size}")
        if crop_pct is not None:
            if not (math.isfinite(crop_pct) and 0 < crop_pct <= 1):
                raise BadInput(f"--crop-pct {crop_pct}: must be in (0, 1]")
            changes.update(crop_pct=float(crop_pct), resize=None)
            said.append(f"crop_pct {crop_pct:g}")
        if interpolation is not None:
            if interpolation not in INTERPOLATIONS:
                raise BadInput(f"--interpolation {interpolation}: expected one of {', '.join(INTERPOLATIONS)}")
            changes["interpolation"] = interpolation
            said.append(f"interpolation {interpolation}")
        for name, value in (("mean", mean), ("std", std)):
            if value is None:
                continue
            value = tuple(float(v) for v in value)
            channels = len(changes.get("mean" if name == "std" else "std", self.std if name == "mean" else self.mean))
            if len(value) == 1:
                value = value * channels
            if (
                len(value) != channels
                or not all(math.isfinite(v) for v in value)
                or (name == "std" and not all(v > 0 for v in value))
            ):
                raise BadInput(
                    f"--{name} {','.join(f'{v:g}' for v in value)}: expected 1 or {channels} finite numbers"
                    + (" > 0" if name == "std" else "")
                )
            changes[name] = value
            said.append(name)
        if not changes:
            return self
        return dataclasses.replace(self, **changes, source=f"{self.source}; {', '.join(said)} from the {what}")


def recorded_transform(base: EvalTransform, args: Mapping[str, Any]) -> tuple[EvalTransform, list[str]]:
    """``base`` with what a checkpoint's training arguments record in timm ``train.py``'s names
    (``input_size`` as an int or (C, H, W), ``img_size``, ``crop_pct``, ``crop_mode``,
    ``interpolation``, ``mean``, ``std``), and the names of the arguments used. Values that are
    not usable are ignored (the checkpoint is data, not an instruction)."""

    def number(v: Any) -> float | None:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        return float(v) if ok else None

    def channels(v: Any) -> tuple[float, ...] | None:
        if not isinstance(v, (list, tuple)) or not v or len(v) > 4:
            return None
        out = tuple(number(x) for x in v)
        return None if any(x is None for x in out) else out  # type: ignore[return-value]

    changes: dict[str, Any] = {}
    used: list[str] = []
    size = args.get("input_size")
    if isinstance(size, (list, tuple)) and len(size) == 3 and size[1] == size[2]:
        size = size[2]
    if not (isinstance(size, int) and not isinstance(size, bool) and size > 0):
        size, used_name = args.get("img_size"), "img_size"
    else:
        used_name = "input_size"
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        changes["size"] = size
        used.append(used_name)
    crop = number(args.get("crop_pct"))
    if crop is not None and 0 < crop <= 1:
        changes["crop_pct"] = crop
        used.append("crop_pct")
    if args.get("crop_mode") in CROP_MODES:
        changes["crop_mode"] = args["crop_mode"]
        used.append("crop_mode")
    if args.get("interpolation") in INTERPOLATIONS:
        changes["interpolation"] = args["interpolation"]
        used.append("interpolation")
    for name in ("mean", "std"):
        value = channels(args.get(name))
        if value is not None and len(value) == 1:
            value = value * len(base.mean)
        if value is not None and (name == "mean" or all(v > 0 for v in value)):
            changes[name] = value
            used.append(name)
    if changes.keys() & {"size", "crop_pct"}:
        changes["resize"] = None
    return (dataclasses.replace(base, **changes) if changes else base), used


@dataclass
class Fused:
    """A fuser's result: the deploy weights and an account of what was done."""

    tensors: dict[str, Tensor]  # deploy state_dict in the checkpoint's dtype
    config: dict[str, Any]  # deploy config (may extend plan.config); goes to metadata
    counts: dict[str, int] = field(default_factory=dict)  # e.g. bn_folded, branch_merges, chain_merges
    unfused: list[tuple[str, str]] = field(default_factory=list)  # (module, why it stays)


class Fuser(ABC):
    """Base class for fusers. Subclass, set ``name``/``summary``, implement four methods."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""

    @abstractmethod
    def detect(self, ckpt: Checkpoint, options: Options) -> Plan:
        """Recognize the checkpoint's layout and variant; raise NotThisArch if it is not ours."""

    @abstractmethod
    def build_train(self, plan: Plan, state_dict: dict[str, Tensor]) -> nn.Module:
        """The training-mode model holding ``state_dict`` (strictly loaded), in eval mode."""

    @abstractmethod
    def fuse(self, plan: Plan, state_dict: dict[str, Tensor], train: nn.Module, done: Done | None = None) -> Fused:
        """Compute the deploy weights. Must not modify ``state_dict`` or ``train``.

        ``done``, when given, is called with the input tensors (``state_dict``'s or ``train``'s)
        of each part the fuser has finished, so the memory behind them can go (the pages of a
        memory-mapped checkpoint): a large checkpoint is then never resident all at once. The
        tensors stay valid after the call. A fuser that works in one piece may ignore it.
        """

    @abstractmethod
    def build_deploy(self, plan: Plan) -> nn.Module:
        """An empty deploy-mode model (meta device is fine) for ``plan`` (config from ``fuse``)."""

    def deploy_state(
        self, plan: Plan, computed: dict[str, Tensor], passthrough: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """The deploy state_dict in ``build_deploy(plan)``'s key order: the ``computed`` tensors, and
        every other deploy key taken from ``passthrough`` (e.g. the checkpoint's SE and classifier
        weights; own contiguous copies). A key left over or missing is a fuser bug (RuntimeError)."""
        keys = list(self.build_deploy(plan).state_dict())
        out = dict(computed)
        for k in keys:
            if k not in out and k in passthrough:
                out[k] = passthrough[k].contiguous().clone()
        if set(out) != set(keys):
            raise RuntimeError(f"{self.name} fuser bug: deploy keys differ ({sorted(set(out) ^ set(keys))[:3]})")
        return {k: out[k] for k in keys}

    def folded_modules(self, plan: Plan) -> list[str]:
        """Modules of the training model whose own output the deploy model does not reproduce
        (a conv whose BN was folded into it computes conv+BN): verification does not compare the
        two models at these when it looks for where they diverge. Default: none."""
        return []

    def eval_transform(self, plan: Plan, ckpt: Checkpoint) -> EvalTransform:
        """The evaluation transform of the family's official training code for this checkpoint
        (its recorded training arguments, e.g. ``ckpt.args``, take precedence over defaults).
        The default is the common ImageNet one at the plan's input size, with what ``ckpt.args``
        records in timm train.py's names (see ``recorded_transform``)."""
        size = plan.input_size[-1]
        base = EvalTransform(size=size, source="ImageNet defaults")
        t, used = recorded_transform(base, ckpt.args)
        return dataclasses.replace(
            t, source=t.source + (f", args.{'/'.join(used)} from the checkpoint" if used else "")
        )

    def check_config(self, plan: Plan, model: str | None, where: str) -> None:
        """Vet a plan read from a file's metadata before anything is built from it.

        Raise BadInput for a config this fuser never writes, and UnsafeCheckpoint where
        building it would import code the user did not name (``model``: the user's --model).
        The default accepts it: fusers whose config is plain data validate it while building.
        """
        return None


def timm_eval_transform(name: str | None, args: Mapping[str, Any], in_chans: int = 3) -> EvalTransform:
    """timm's own evaluation preprocessing for model ``name`` (None: a model with no pretrained
    config): ``timm.data.resolve_data_config`` with the checkpoint's train.py ``args`` over the
    model's ``pretrained_cfg``, as timm's validate.py / create_transform use it."""
    from timm.data import resolve_data_config
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name) if name else None
    pretrained = cfg.to_dict() if cfg is not None else {}
    # only recorded values timm's resolver accepts (it asserts on the rest): a file is data
    checked, used = recorded_transform(EvalTransform(), args)
    keys = {"input_size": "input_size", "img_size": "img_size"}
    targs: dict[str, Any] = {"in_chans": in_chans}
    for name_ in used:
        if name_ in keys:
            targs["img_size"] = checked.size
        elif name_ in ("mean", "std"):
            value = getattr(checked, name_)
            targs[name_] = value if len(value) == in_chans else value[:1] * in_chans
        else:
            targs[name_] = getattr(checked, name_)
    data = resolve_data_config(args=targs, pretrained_cfg=pretrained)
    _, h, w = data["input_size"]
    if h != w:
        raise BadInput(f"timm model {name}: non-square input size {h}x{w}; pass --resolution for square inputs")
    what = f"timm data config of {name}" if name else "timm default data config"
    return EvalTransform(
        size=int(h),
        interpolation=data["interpolation"] if data["interpolation"] in INTERPOLATIONS else "bicubic",
        crop_pct=float(data["crop_pct"]),
        mean=tuple(float(v) for v in data["mean"]),
        std=tuple(float(v) for v in data["std"]),
        crop_mode=data["crop_mode"] if data["crop_mode"] in CROP_MODES else "center",
        source=what + (f", args.{'/'.join(used)} from the checkpoint" if used else ""),
    )
