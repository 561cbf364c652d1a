"""The registry of fusers: built-ins, decorated classes, and plugins via entry points.

Listing names and summaries imports no torch: built-ins are named here as strings and plugin
entry points are listed without loading them. A fuser's module is imported on first lookup.

A plugin package declares, in its pyproject.toml::

    [project.entry-points."repfuse.fusers"]
    mynet = "mypkg.fuser:MyNetFuser"

where ``MyNetFuser`` subclasses :class:`repfuse_cli.fuser.Fuser`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import UnknownArch

if TYPE_CHECKING:  # pragma: no cover
    from .fuser import Fuser

ENTRY_POINT_GROUP = "repfuse.fusers"
F = TypeVar("F", bound="Fuser")

# name -> (import target, one-line summary). Order is the order `--arch auto` tries them.
BUILTIN: dict[str, tuple[str, str]] = {
    "vanillanet": (
        "repfuse_cli.fusers.vanillanet:VanillaNetFuser",
        "VanillaNet (huawei-noah): all 11 variants; BN folds, deep-training 1x1 chains, series activations",
    ),
    "repvgg": (
        "repfuse_cli.fusers.repvgg:RepVGGFuser",
        "RepVGG (DingXiaoH and timm layouts): 3x3 + 1x1 + identity branches into one 3x3, SE kept",
    ),
    "mobileone": (
        "repfuse_cli.fusers.mobileone:MobileOneFuser",
        "MobileOne (apple/ml-mobileone and timm layouts): S0-S4, conv/scale/skip branches into one conv, SE kept",
    ),
    "fastvit": (
        "repfuse_cli.fusers.fastvit:FastViTFuser",
        "FastViT (apple/ml-fastvit and timm layouts): T8-MA36, MobileOne/RepMixer/RepCPE/large-kernel re-param",
    ),
    "repvit": (
        "repfuse_cli.fusers.repvit:RepViTFuser",
        "RepViT (THU-MIG official layout; timm's with --arch repvit): RepVGGDW, conv-BN, BN-Linear heads",
    ),
    "conv-bn": (
        "repfuse_cli.fusers.conv_bn:ConvBnFuser",
        "Any network (timm:NAME or pkg.module:callable): fold every BatchNorm into the conv/linear feeding it",
    ),
}

_REGISTERED: dict[str, type[Fuser]] = {}  # classes registered with @register_fuser


@dataclass(frozen=True)
class FuserInfo:
    name: str
    summary: str
    origin: str  # "built-in", "plugin: pkg.mod:Class" or "registered"


def register_fuser(cls: type[F]) -> type[F]:
    """Class decorator: make a Fuser subclass available under ``cls.name``."""
    name = getattr(cls, "name", None)
    if not name:
        raise ValueError(f"{cls.__name__} has no `name`")
    _REGISTERED[name] = cls
    return cls


def _plugins() -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def list_fusers() -> list[FuserInfo]:
    """Every fuser that can be named with --arch, without importing any of them."""
    infos = [FuserInfo(n, s, "built-in") for n, (_, s) in BUILTIN.items()]
    seen = set(BUILTIN)
    for name, cls in _REGISTERED.items():
        if name not in seen:
            infos.append(FuserInfo(name, getattr(cls, "summary", ""), "registered"))
            seen.add(name)
    for name, target in _plugins().items():
        if name not in seen:
            infos.append(FuserInfo(name, "", f"plugin: {target}"))
            seen.add(name)
    return infos


def _import(target: str) -> Any:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def get_fuser(name: str) -> Fuser:
    """Return an instance of the fuser registered as ``name``; UnknownArch if none is."""
    if name in _REGISTERED:
        return _REGISTERED[name]()
    if name in BUILTIN:
        return _import(BUILTIN[name][0])()
    plugins = _plugins()
    if name in plugins:
        try:
            cls = _import(plugins[name])
        except Exception as e:
            raise UnknownArch(f"fuser plugin `{name}` ({plugins[name]}) failed to load: {e}") from None
        return cls()
    names = [i.name for i in list_fusers()]
    raise UnknownArch(f"no fuser named `{name}` (available: {', '.join(names)})")


def all_fusers() -> list[Fuser]:
    """Instances of every fuser, in auto-detection order (built-ins first)."""
    return [get_fuser(i.name) for i in list_fusers()]
