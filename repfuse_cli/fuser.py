"""What a fuser is: the contract every architecture module fulfils.

The pipeline (``repfuse_cli.pipeline``) drives a fuser through
    detect -> build_train -> fuse -> build_deploy
and does the rest (verify, report, save) itself, the same way for every architecture.
A fuser never mutates the state_dict or model it is given; it returns new tensors.
"""

from __future__ import annotations

import dataclasses
import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from .errors import RepfuseError

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


@dataclass(frozen=True)
class EvalTransform:
    """How the family's own evaluation code turns an image into the model's input.

    Resize the shorter side to ``round(size / crop_pct)`` with ``interpolation``, center-crop
    ``size`` (``crop_pct`` None: resize straight to ``size x size``, no crop), scale to [0, 1],
    then normalize with ``mean``/``std``. ``source`` says where the numbers come from, in one
    line for the report (e.g. "VanillaNet datasets.py eval, args from the checkpoint").
    """

    size: int = 224
    interpolation: str = "bicubic"  # "bilinear", "bicubic" or "nearest"
    crop_pct: float | None = 0.875
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    source: str = "ImageNet defaults (resize 256, center crop 224, bicubic)"


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

    def folded_modules(self, plan: Plan) -> list[str]:
        """Modules of the training model whose own output the deploy model does not reproduce
        (a conv whose BN was folded into it computes conv+BN): verification does not compare the
        two models at these when it looks for where they diverge. Default: none."""
        return []

    def eval_transform(self, plan: Plan, ckpt: Checkpoint) -> EvalTransform:
        """The evaluation transform of the family's official training code for this checkpoint
        (its recorded training arguments, e.g. ``ckpt.args``, take precedence over defaults).
        The default is the common ImageNet one at the plan's input size."""
        size = plan.input_size[-1]
        return EvalTransform(
            size=size, source=f"ImageNet defaults (resize {round(size / 0.875)}, center crop {size}, bicubic)"
        )

    def check_config(self, plan: Plan, model: str | None, where: str) -> None:
        """Vet a plan read from a file's metadata before anything is built from it.

        Raise BadInput for a config this fuser never writes, and UnsafeCheckpoint where
        building it would import code the user did not name (``model``: the user's --model).
        The default accepts it: fusers whose config is plain data validate it while building.
        """
        return None
