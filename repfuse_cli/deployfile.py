"""The deploy file: repfuse's safetensors format, written atomically and read back safely.

A deploy file is a safetensors file (https://huggingface.co/docs/safetensors) whose metadata
says ``format: repfuse-deploy`` and holds everything ``load_deploy`` needs to rebuild the model:
arch, variant, layout, the fuser's JSON config, input size and classes, plus provenance (the
repfuse version, the source file's name, sha256 and key, the dtype). The metadata is data: a
fuser checks it before anything is built from it.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO

import torch
from torch import Tensor, nn

from . import __version__
from .checkpoint import load_strict, read_file
from .errors import BadInput, OutputError, RepfuseError
from .fuser import Fuser, Plan
from .memory import StagedWrite
from .registry import get_fuser

DEPLOY_FORMAT = "repfuse-deploy"

DEPLOY_SUFFIX = ".deploy.safetensors"
TORCH_SUFFIXES = (".pth.tar", ".pth", ".pt", ".bin", ".tar", ".ckpt", ".safetensors")


def default_output(src: Path) -> Path:
    """``<input stem>.deploy.safetensors`` beside the input (``.pth.tar`` counts as one suffix)."""
    name = src.name
    for suf in TORCH_SUFFIXES:
        if name.endswith(suf) and len(name) > len(suf):
            name = name[: -len(suf)]
            break
    return src.with_name(name + DEPLOY_SUFFIX)


def check_output(out: Path, src: Path, force: bool) -> None:
    """Fail early, before any work, if ``out`` cannot or must not be written."""
    if out.exists() and src.exists() and out.resolve() == src.resolve():
        raise OutputError(f"{out}: output would overwrite the input checkpoint; choose another -o")
    if not out.name.endswith(".safetensors"):
        raise OutputError(f"{out}: the deploy file's name must end in .safetensors")
    if out.is_symlink() and not out.exists():  # a dangling link: --force replaces the link itself
        if not force:
            raise OutputError(f"{out}: output exists (a symbolic link to a missing file); pass --force to replace it")
        return _check_parent(out)
    if out.is_dir():
        raise OutputError(f"{out}: output is a directory")
    if out.exists() and not out.is_file():
        raise OutputError(f"{out}: output exists and is not a regular file")
    if out.exists() and not force:
        raise OutputError(f"{out}: output exists; pass --force to overwrite it")
    _check_parent(out)


def _check_parent(out: Path) -> None:
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"{out}: output directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{out}: output directory {parent} is not writable")


# safetensors' dtype names (https://huggingface.co/docs/safetensors: the format)
ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint64: "U64",
    torch.uint32: "U32",
    torch.uint16: "U16",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


def write_safetensors_to(
    f: BinaryIO, tensors: Mapping[str, Tensor], metadata: Mapping[str, str], cancel: threading.Event | None = None
) -> None:
    """Write ``tensors`` (contiguous, CPU, unshared) to ``f`` in the safetensors format, in order.

    The format: an 8-byte little-endian header length, a JSON header (per tensor: dtype, shape,
    byte offsets into the data; ``__metadata__``: str -> str) padded with spaces to a multiple
    of 8, then the tensors' bytes back to back. Each tensor's bytes go to the file straight from
    its memory; ``safetensors.torch.save_file`` first copies all of them into Python bytes
    (bench/RESULTS.md measures the difference).
    """
    if sys.byteorder != "little":  # pragma: no cover - the format is little-endian
        raise OutputError("writing safetensors needs a little-endian machine")
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for k, v in tensors.items():
        if k == "__metadata__":
            raise OutputError("a tensor may not be named `__metadata__` in a safetensors file")
        if v.dtype not in ST_DTYPES or v.device.type != "cpu" or not v.is_contiguous():
            raise OutputError(f"`{k}`: cannot write a {v.dtype} tensor on {v.device} (contiguous: {v.is_contiguous()})")
        n = v.numel() * v.element_size()
        header[k] = {"dtype": ST_DTYPES[v.dtype], "shape": list(v.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for v in tensors.values():
        if cancel is not None and cancel.is_set():
            raise OutputError("write cancelled")
        if v.numel():  # the tensor's own bytes, without a copy
            f.write((ctypes.c_char * (v.numel() * v.element_size())).from_address(v.data_ptr()))


def deploy_metadata(plan: Plan, source: Path, source_sha256: str, source_key: str | None, dtype: str) -> dict[str, str]:
    """The metadata of a deploy file of ``plan`` converted from ``source``."""
    return {
        "format": DEPLOY_FORMAT,
        "repfuse_version": __version__,
        "source": source.name,
        "source_sha256": source_sha256,
        "source_key": source_key or "",
        "dtype": dtype,
        **plan.to_metadata(),
    }


def stage_deploy(
    tensors: Mapping[str, Tensor],
    out: Path,
    metadata: Mapping[str, str] | Callable[[], Mapping[str, str]],
    force: bool,
) -> StagedWrite:
    """Start writing a deploy file to a hidden temp file beside ``out`` (see ``StagedWrite``);
    a callable ``metadata`` is called in the writing thread (it may wait for the source's hash)."""
    clean = {k: v.detach().contiguous() for k, v in tensors.items()}  # tied weights: written twice

    def write(f: BinaryIO, cancel: threading.Event) -> None:
        meta = metadata() if callable(metadata) else metadata
        if not cancel.is_set():
            write_safetensors_to(f, clean, {k: str(v) for k, v in meta.items()}, cancel)

    return StagedWrite(out, force, write)


def write_safetensors(tensors: Mapping[str, Tensor], out: Path, metadata: Mapping[str, str], force: bool) -> None:
    """Write ``tensors`` to ``out`` atomically (temp file + fsync + rename; never a partial file).

    Callers check the output with :func:`check_output` before their work; the rename re-checks
    only that nothing appeared at ``out`` meanwhile.
    """
    stage_deploy(tensors, out, metadata, force).commit()


def build_deploy_model(fuser: Fuser, plan: Plan, tensors: dict[str, Tensor], where: str) -> nn.Module:
    try:
        model = fuser.build_deploy(plan)
    except RepfuseError:
        raise
    except Exception as e:  # a config that parses but describes no buildable model
        raise BadInput(f"{where}: cannot build the {plan.arch} deploy model from its config ({e})") from None
    return load_strict(model, tensors, where)


def read_deploy(path: str | Path, model: str | None = None) -> tuple[Plan, dict[str, Tensor], dict[str, str]]:
    """Read a repfuse deploy file: its plan, tensors and metadata (BadInput if not one).

    The metadata is data from a file: its fuser checks it before anything is built from it
    (conv-bn imports a `pkg.module:callable` it names only when ``model`` names the same one).
    """
    path = Path(path)
    if not path.name.endswith(".safetensors"):
        raise BadInput(f"{path}: not a safetensors deploy file")
    tensors, _, meta = read_file(path)
    if meta.get("format") != DEPLOY_FORMAT or "arch" not in meta:
        raise BadInput(f"{path}: not written by repfuse (no `{DEPLOY_FORMAT}` metadata)")
    try:
        plan = Plan.from_metadata(meta)
    except (ValueError, KeyError, TypeError) as e:
        raise BadInput(f"{path}: damaged repfuse metadata ({e})") from None
    get_fuser(plan.arch).check_config(plan, model, str(path))
    return plan, tensors, meta


def load_deploy(path: str | Path, model: str | None = None, fast_layout: bool = False) -> nn.Module:
    """Rebuild the deploy model (eval mode) from any deploy file repfuse wrote.

    ``model``: for conv-bn files of a ``pkg.module:callable`` network, that spec, to allow
    importing it (a file's metadata alone never makes repfuse import code). ``fast_layout``:
    give each 1x1 conv weight the in-memory layout measured fastest on the CPU (same values,
    see ``repfuse_cli.layout``; the file is not changed).

    Example::

        model = repfuse_cli.load_deploy("resnet18.deploy.safetensors")
        logits = model(images)
    """
    plan, tensors, _ = read_deploy(path, model)
    deploy = build_deploy_model(get_fuser(plan.arch), plan, tensors, str(path))
    if fast_layout:
        from .layout import fast_layout as relayout

        relayout(deploy, inplace=True)
    return deploy
