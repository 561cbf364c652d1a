"""Writing the deploy file: safetensors, atomically, never over an existing file unless forced."""

from __future__ import annotations

import ctypes
import json
import os
import struct
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import torch
from torch import Tensor

from .errors import OutputError, first_line

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
    (511 MB more at the peak for vanillanet_13_x1_5).
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


class StagedWrite:
    """A deploy file written in a background thread to a hidden temp file beside ``out``.

    ``commit()`` waits for the write and renames the file into place; ``discard()`` (or leaving
    the ``with`` block without a commit) stops it and removes the temp file. So the write
    (and its fsync, which waits on the disk) overlaps the caller's verification, and ``out``
    only ever appears whole, after the caller decided to keep it. ``metadata`` may be a
    callable, called in the thread (it may wait for a hash that is still being computed).
    """

    def __init__(
        self,
        tensors: Mapping[str, Tensor],
        out: Path,
        metadata: Mapping[str, str] | Callable[[], Mapping[str, str]],
        force: bool,
    ):
        self.out, self.force = out, force
        self._cancel = threading.Event()
        self._state = "writing"  # then "committed" or "discarded"
        clean = {k: v.detach().contiguous() for k, v in tensors.items()}  # tied weights: written twice
        parent = out.parent if str(out.parent) else Path(".")
        try:
            fd, self.tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent)
        except OSError as e:
            raise OutputError(f"{out}: cannot create a file in {parent} ({first_line(e)}); nothing written") from None
        try:
            pool = ThreadPoolExecutor(1, thread_name_prefix="repfuse-write")
            self._future = pool.submit(self._write, fd, clean, metadata)  # the thread owns fd from here
            pool.shutdown(wait=False)
        except BaseException:
            os.close(fd)
            Path(self.tmp).unlink(missing_ok=True)
            raise

    def _write(self, fd: int, tensors: dict[str, Tensor], metadata) -> None:
        with os.fdopen(fd, "wb") as f:
            meta = metadata() if callable(metadata) else metadata  # its own errors are not write errors
            if self._cancel.is_set():
                return
            try:
                write_safetensors_to(f, tensors, {k: str(v) for k, v in meta.items()}, self._cancel)
                f.flush()
                os.fsync(f.fileno())
                if hasattr(os, "fchmod"):  # mkstemp made it 0600
                    os.fchmod(f.fileno(), 0o644)
            except OSError as e:
                raise OutputError(
                    f"{self.out}: cannot write the deploy file ({first_line(e)}); nothing written"
                ) from None

    def commit(self) -> None:
        """Wait for the write, then move the file to ``out`` (OutputError if that went wrong)."""
        if self._state != "writing":
            raise RuntimeError(f"StagedWrite.commit after it was {self._state}")
        try:
            self._future.result()
            self._place()
            self._state = "committed"
        finally:
            self.discard()  # a no-op once committed

    def _place(self) -> None:
        appeared = OutputError(f"{self.out}: output appeared while converting; nothing written")
        try:
            if self.force:
                if self.out.exists() and not self.out.is_file():
                    raise appeared
                os.replace(self.tmp, self.out)
                return
            try:
                os.link(self.tmp, self.out)  # refuses, atomically, if something appeared at `out`
            except FileExistsError:
                raise appeared from None
            except OSError:  # no hard links on this file system: check, then rename
                if self.out.exists():
                    raise appeared from None
                os.replace(self.tmp, self.out)
                return
            Path(self.tmp).unlink(missing_ok=True)
        except OSError as e:
            raise OutputError(
                f"{self.out}: cannot move the deploy file into place ({first_line(e)}); nothing written"
            ) from None

    def discard(self) -> None:
        """Stop the write (if still running) and remove the temp file; a no-op after commit."""
        if self._state != "writing":
            return
        self._state = "discarded"
        Path(self.tmp).unlink(missing_ok=True)  # first, so that nothing is left if we are killed while waiting
        self._cancel.set()
        try:
            self._future.result()
        except BaseException:  # the write is abandoned: its error no longer matters
            pass

    def __enter__(self) -> StagedWrite:
        return self

    def __exit__(self, *exc) -> None:
        self.discard()


def write_safetensors(tensors: Mapping[str, Tensor], out: Path, metadata: Mapping[str, str], force: bool) -> None:
    """Write ``tensors`` to ``out`` atomically (temp file + fsync + rename; never a partial file).

    Callers check the output with :func:`check_output` before their work; the rename re-checks
    only that nothing appeared at ``out`` meanwhile.
    """
    StagedWrite(tensors, out, metadata, force).commit()
