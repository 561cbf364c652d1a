"""The memory and I/O machinery of a conversion, behind one seam.

A fuser needs to know one thing about it: ``Fuser.fuse`` gets a ``done`` callback, to be
called with the input tensors of each part it has finished. Everything else lives here:

- page release: a memory-mapped checkpoint counts in resident memory once read; ``release_pages``
  lets the OS drop the pages behind tensors the pipeline is done with (Linux: madvise on
  whole, never-written pages of the file's own mappings; elsewhere a no-op), and
  ``releasing`` does it for a model's weights as a forward pass goes through its modules;
- ``in_background``: the source file's hash, read in a thread while the work goes on;
- ``StagedWrite``: the output written in a thread to a hidden temp file while verification
  runs, and moved into place only if the caller keeps it.
"""

from __future__ import annotations

import ctypes
import functools
import os
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import torch
from torch import Tensor, nn

from .errors import OutputError, first_line
from .fuser import Done

T = TypeVar("T")


_MADV_DONTNEED = 4  # linux/mman.h
_PM_FILE, _PM_SWAP = 1 << 61, 1 << 62  # /proc/self/pagemap entry bits; bit 63 (present) is the sign bit


def file_mappings(path: Path, tensors: Iterable[Tensor]) -> tuple[tuple[int, int], ...]:
    """The (start, end) address ranges of this process's mappings of ``path`` that hold
    ``tensors`` (only those: another, older mapping of the same file may be unmapped and its
    addresses reused while ours lives); () where that cannot be told (not Linux, no /proc)."""
    try:
        ino = str(path.stat().st_ino)
        maps = []
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[4] == ino:
                    start, end = (int(a, 16) for a in fields[0].split("-"))
                    maps.append((start, end))
    except (OSError, ValueError):
        return ()
    ptrs = {
        t.untyped_storage().data_ptr()
        for t in tensors
        if isinstance(t, Tensor) and t.device.type == "cpu" and t.numel()
    }
    return tuple(m for m in maps if any(m[0] <= p < m[1] for p in ptrs))


@functools.cache
def _madvise() -> Any:
    try:
        f = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):  # no C library to call, or no madvise in it
        return None
    f.argtypes, f.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return f


def _unwritten_runs(lo: int, hi: int, page: int) -> list[tuple[int, int]]:
    """The runs of pages in [lo, hi) that still show the file: mapped from the page cache, or
    not mapped at all. A page written in a private mapping is an anonymous copy (no file bit);
    dropping it would bring back the file's bytes, so such pages are never in a run."""
    n = (hi - lo) // page
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(lo // page * 8)
        raw = f.read(n * 8)
    if len(raw) != n * 8:
        return []
    e = torch.frombuffer(bytearray(raw), dtype=torch.int64)
    written = ((e & _PM_FILE) == 0) & ((e < 0) | ((e & _PM_SWAP) != 0))  # anonymous, and present or swapped
    runs, first = [], 0
    for i in [*written.nonzero().flatten().tolist(), n]:
        if i > first:
            runs.append((lo + first * page, lo + i * page))
        first = i + 1
    return runs


def release_pages(tensors: Iterable[Tensor | None], ranges: tuple[tuple[int, int], ...]) -> int:
    """``madvise(MADV_DONTNEED)`` the whole pages of each tensor's storage that lie inside one
    of ``ranges`` (file mappings: such pages are read from the file again when touched) and
    that were never written (see :func:`_unwritten_runs`). Returns the bytes released; 0 where
    madvise or /proc/self/pagemap is unavailable."""
    madvise = _madvise()
    if madvise is None or not ranges:
        return 0
    page = os.sysconf("SC_PAGE_SIZE")
    released = 0
    for t in tensors:
        if t is None or t.device.type != "cpu" or not t.numel():
            continue
        storage = t.untyped_storage()
        start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
        lo, hi = -(-start // page) * page, end // page * page
        if hi <= lo or not any(a <= lo and hi <= b for a, b in ranges):
            continue
        try:
            runs = _unwritten_runs(lo, hi, page)
        except OSError:
            return released
        for a, b in runs:
            if madvise(a, b - a, _MADV_DONTNEED) == 0:
                released += b - a
    return released


@contextmanager
def releasing(model: nn.Module, done: Done) -> Iterator[None]:
    """While inside, each module of ``model`` hands its own weights to ``done`` once it has run
    (so a training model on a memory-mapped checkpoint, run on the CPU in its own dtype, never has
    all its pages resident; a forward in another dtype or on a GPU copies every weight first)."""
    own = {m: [*m.parameters(recurse=False), *m.buffers(recurse=False)] for m in model.modules()}

    def hook(mod: nn.Module, args: Any, out: Any) -> None:
        done(own[mod])

    handles = [m.register_forward_hook(hook) for m, t in own.items() if t]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def in_background(fn: Callable[[], T]) -> Future[T]:
    """Run ``fn`` in a thread of its own; the caller takes the result (or its error) when needed."""
    pool = ThreadPoolExecutor(1)
    future = pool.submit(fn)
    pool.shutdown(wait=False)  # the running call finishes; the pool takes no more work
    return future


Writer = Callable[[BinaryIO, threading.Event], None]


class StagedWrite:
    """A file written in a background thread to a hidden temp file beside ``out``.

    ``commit()`` waits for the write and renames the file into place; ``discard()`` (or leaving
    the ``with`` block without a commit) stops it and removes the temp file. So the write
    (and its fsync, which waits on the disk) overlaps the caller's verification, and ``out``
    only ever appears whole, after the caller decided to keep it. ``write(f, cancel)`` writes
    the content, in the thread (so it may wait, e.g. for a hash still being computed); it should
    stop early once ``cancel`` is set. Its OSErrors become one OutputError; others propagate.
    """

    def __init__(self, out: Path, force: bool, write: Writer) -> None:
        self.out, self.force = out, force
        self._cancel = threading.Event()
        self._state = "writing"  # then "committed" or "discarded"
        parent = out.parent if str(out.parent) else Path(".")
        try:
            fd, self.tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent)
        except OSError as e:
            raise OutputError(f"{out}: cannot create a file in {parent} ({first_line(e)}); nothing written") from None
        try:
            pool = ThreadPoolExecutor(1, thread_name_prefix="repfuse-write")
            self._future = pool.submit(self._write, fd, write)  # the thread owns fd from here
            pool.shutdown(wait=False)
        except BaseException:
            os.close(fd)
            Path(self.tmp).unlink(missing_ok=True)
            raise

    def _write(self, fd: int, write: Writer) -> None:
        with os.fdopen(fd, "wb") as f:
            if self._cancel.is_set():
                return
            try:
                write(f, self._cancel)
                f.flush()
                os.fsync(f.fileno())
                if hasattr(os, "fchmod"):  # mkstemp made it 0600
                    os.fchmod(f.fileno(), 0o644)
            except OSError as e:
                raise OutputError(f"{self.out}: cannot write the file ({first_line(e)}); nothing written") from None

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
                f"{self.out}: cannot move the file into place ({first_line(e)}); nothing written"
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

    def __exit__(self, *exc: object) -> None:
        self.discard()
