"""Writing the deploy file: safetensors, atomically, never over an existing file unless forced."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor

from .errors import OutputError

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
    if out.is_dir():
        raise OutputError(f"{out}: output is a directory")
    if out.exists() and not out.is_file():
        raise OutputError(f"{out}: output exists and is not a regular file")
    if out.exists() and not force:
        raise OutputError(f"{out}: output exists; pass --force to overwrite it")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"{out}: output directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{out}: output directory {parent} is not writable")


def write_safetensors(tensors: Mapping[str, Tensor], out: Path, metadata: dict[str, str], force: bool) -> None:
    """Write contiguous, unshared tensors to ``out`` via a temp file + rename (no partial file).

    Callers check the output with :func:`check_output` before their work; the rename re-checks
    only that nothing appeared at ``out`` meanwhile.
    """
    from safetensors.torch import save_file

    seen: set[int] = set()
    clean: dict[str, Tensor] = {}
    for k, v in tensors.items():
        v = v.detach().contiguous()
        ptr = v.untyped_storage().data_ptr() if v.numel() else None
        if ptr is not None and ptr in seen:  # tied weights: safetensors forbids shared memory
            v = v.clone()
        elif ptr is not None:
            seen.add(ptr)
        clean[k] = v
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent if str(out.parent) else ".")
    os.close(fd)
    try:
        save_file(clean, tmp, metadata={k: str(v) for k, v in metadata.items()})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        if out.exists() and (not force or not out.is_file()):
            raise OutputError(f"{out}: output appeared while converting; nothing written")
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
