"""repfuse: turn training-time re-parameterized CNN checkpoints into verified deploy-mode files.

Python API (imports torch on first use, not at ``import repfuse_cli``)::

    from repfuse_cli import convert, load_deploy, verify
    result = convert("checkpoint.pth", arch="vanillanet")   # dict, as `repfuse convert --json`
    model = load_deploy(result["output"])                     # eval-mode nn.Module
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["convert", "load_deploy", "load_checkpoint", "verify", "inspect", "Options", "__version__"]

_LAZY = {
    "convert": ("repfuse_cli.pipeline", "convert"),
    "load_deploy": ("repfuse_cli.deployfile", "load_deploy"),
    "load_checkpoint": ("repfuse_cli.checkpoint", "load_checkpoint"),
    "verify": ("repfuse_cli.commands", "verify"),
    "inspect": ("repfuse_cli.commands", "inspect"),
    "Options": ("repfuse_cli.fuser", "Options"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'repfuse_cli' has no attribute {name!r}")
