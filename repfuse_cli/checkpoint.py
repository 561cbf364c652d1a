"""Safe checkpoint loading, weight-key choice and strict matching.

Loading never runs code from the file: ``torch.load(weights_only=True)`` with exactly the
harmless extra types that training scripts write (``argparse.Namespace``, numpy scalars).
A file that asks for anything else is refused, naming the globals it asks for (read without
running them). Only ``trust=True`` (the CLI's ``--trust-checkpoint``) loads such a file.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import re
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import BadInput, KeyMismatch, UnsafeCheckpoint, first_line
from .memory import file_mappings, release_pages

PREFIXES = ("module.", "_orig_mod.")
# Keys that hold non-EMA weights in the wild, in order of preference.
PREFERRED_KEYS = ("state_dict", "model", "module", "net", "network", "weights", "params")


@dataclass
class Checkpoint:
    """A loaded checkpoint: the chosen weights plus what else the file records."""

    path: Path
    format: str  # "torch" or "safetensors"
    state_dict: dict[str, Tensor]
    key: str | None  # the entry the weights came from; None for a bare state_dict
    weight_keys: list[str] = field(default_factory=list)  # every entry holding weights
    extras: dict[str, Any] = field(default_factory=dict)  # epoch, arch, args (as dict), ...
    metadata: dict[str, str] = field(default_factory=dict)  # safetensors metadata
    stripped_prefixes: list[str] = field(default_factory=list)
    entries: dict[str, str] = field(default_factory=dict)  # top-level entry -> what it holds
    # Address ranges where this process memory-maps the file (torch's zip format is loaded with
    # mmap); ``release`` drops resident pages only inside these.
    mapped: tuple[tuple[int, int], ...] = ()

    @property
    def ema_keys(self) -> list[str]:
        return [k for k in self.weight_keys if "ema" in k.lower()]

    @property
    def args(self) -> dict[str, Any]:
        """The training arguments (argparse.Namespace or dict) as a dict; {} if none or another type."""
        a = self.extras.get("args")
        return a if isinstance(a, dict) else {}

    @property
    def epoch(self) -> int | None:
        """The recorded epoch: an int, an integral float, a 0-d tensor or a numeric string."""
        e = self.extras.get("epoch")
        if isinstance(e, str) and e.strip().lstrip("-").isdigit():
            return int(e)
        if isinstance(e, (int, float)) and not isinstance(e, bool) and float(e).is_integer():
            return int(e)
        return None

    @property
    def dtype(self) -> torch.dtype:
        return float_dtype(self.state_dict)

    def sha256(self) -> str:
        return file_sha256(self.path)

    def release(self, tensors: Iterable[Tensor | None]) -> None:
        """Tell the OS it may drop the memory behind these checkpoint tensors.

        A memory-mapped checkpoint counts in the process's resident memory once read; a pipeline
        that is done with a tensor releases it so the whole file is not resident at once. The
        tensors stay valid: a later read maps the pages from the file again. Only whole pages
        inside this file's own mappings that still show the file are released: never other
        memory, and never a page that was written (torch byte-swaps a big-endian file in place).
        """
        release_pages(tensors, self.mapped)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def float_dtype(state_dict: Mapping[str, Tensor]) -> torch.dtype:
    """The dtype of the floating-point weights (the most common one)."""
    counts: dict[torch.dtype, int] = {}
    for t in state_dict.values():
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=lambda d: counts[d]) if counts else torch.float32


def _safe_globals() -> list[Any]:
    """The harmless non-tensor types that training scripts put into checkpoints."""
    allowed: list[Any] = [argparse.Namespace]
    try:
        import numpy as np
    except ImportError:  # no numpy: files with numpy scalars cannot be read anyway
        return allowed
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]
    # numpy 1 pickles scalars as numpy.core..., numpy 2 as numpy._core...: allow both spellings
    allowed += [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar")]
    allowed.append(np.dtype)
    allowed += [type(np.dtype(t)) for t in ("f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "b1")]
    return allowed


def _asked_globals(path: Path) -> list[str]:
    """The globals a torch file would import, read from its pickle without running it."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:
        names = []
    ok = {f"{g[1]}" if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in _safe_globals()}
    return sorted(n for n in names if n not in ok)


def _torch_load(path: Path, trust: bool) -> Any:
    is_zip = zipfile.is_zipfile(path)
    if trust:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=is_zip)
    try:
        # A plain pickle (protocol > 2) makes torch warn before it refuses or reads the file: the
        # outcome is reported in one line of our own, so the warning is only noise.
        with torch.serialization.safe_globals(_safe_globals()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        text = str(e)
        asked = _asked_globals(path) if is_zip else re.findall(r"GLOBAL ([\w.]+)", text)
        if not asked:  # not a forbidden type: the pickle itself is broken
            reason = text.split("WeightsUnpickler error:")[-1].strip().splitlines()[0][:160]
            raise BadInput(f"{path}: not a readable torch checkpoint ({reason})") from None
        raise UnsafeCheckpoint(
            f"{path}: refusing to unpickle code from this checkpoint (it asks for: {', '.join(asked[:6])}); "
            "if you trust the file, pass --trust-checkpoint"
        ) from None


def read_file(path: str | os.PathLike, trust: bool = False) -> tuple[Any, str, dict[str, str]]:
    """Read a checkpoint file safely. Returns (object, format, safetensors metadata)."""
    path = Path(path)
    if not path.exists():
        raise BadInput(f"{path}: no such file")
    if path.is_dir():
        raise BadInput(f"{path}: is a directory, not a checkpoint file")
    if path.stat().st_size == 0:
        raise BadInput(f"{path}: file is empty")
    if path.name.endswith(".safetensors"):
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                return {k: f.get_tensor(k) for k in f.keys()}, "safetensors", meta
        except (SafetensorError, OSError, ValueError) as e:
            raise BadInput(f"{path}: not a readable safetensors file ({_first_line(e)})") from None
    try:
        return _torch_load(path, trust), "torch", {}
    except (UnsafeCheckpoint, BadInput):
        raise
    except MemoryError:
        raise
    except Exception as e:  # any malformed content: zip, pickle stream, storages (struct.error, ...)
        raise BadInput(f"{path}: not a readable torch checkpoint ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    """The first sentence of the first line: torch's reader errors go on for paragraphs."""
    return first_line(e, 10_000).split(". ")[0][:200]


def _is_weights(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and all(isinstance(v, Tensor) for v in obj.values())
    )


def _strip(k: str, seen: list[str], module_name: bool = False) -> str:
    changed = True
    while changed:
        changed = False
        for p in PREFIXES:
            # a metadata key names a module: `module` itself is the DDP wrapper (the root)
            if k.startswith(p) or (module_name and k == p[:-1]):
                k, changed = k[len(p) :], True
                if p not in seen:
                    seen.append(p)
    return k


def strip_prefixes(sd: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Remove DDP's ``module.`` and torch.compile's ``_orig_mod.``, only at the start of keys.

    A state_dict's ``_metadata`` (the per-module versions ``torch.save(model.state_dict())``
    keeps, which some ``_load_from_state_dict`` read) is kept, with the same prefixes removed.
    """
    out: dict[str, Tensor] = {}
    seen: list[str] = []
    for k, v in sd.items():
        k = _strip(k, seen)
        if k in out:
            raise BadInput(f"key `{k}` appears twice once `module.`/`_orig_mod.` prefixes are removed")
        out[k] = v
    meta = getattr(sd, "_metadata", None)
    if isinstance(meta, Mapping):
        out = OrderedDict(out)
        out._metadata = OrderedDict((_strip(str(k), [], True), v) for k, v in meta.items())  # type: ignore[attr-defined]
    return out, seen


def _plain(obj: Any) -> Any:
    """Namespaces and numpy scalars to plain Python values, for reports and decisions."""
    if isinstance(obj, argparse.Namespace):
        obj = vars(obj)
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "shape", None) in ((), torch.Size([])):  # numpy/0-d tensors
        return obj.item()
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return repr(obj)


def load_checkpoint(path: str | os.PathLike, key: str | None = None, trust: bool = False) -> Checkpoint:
    """Load ``path`` safely and pick its weights.

    ``key`` names the entry holding the weights (``model``, ``model_ema``, ``state_dict``, ...);
    by default the non-EMA weights are used. Raises BadInput / UnsafeCheckpoint.
    """
    path = Path(path)
    obj, fmt, meta = read_file(path, trust)
    if isinstance(obj, nn.Module):  # only reachable with trust=True
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise BadInput(f"{path}: holds a {type(obj).__name__}, not a dict of weights")

    if _is_weights(obj):
        weight_keys, chosen, sd = [], None, obj
        if key is not None:
            raise BadInput(f"{path}: --key {key}: the file is a bare state_dict with no entries to choose from")
    else:
        weight_keys = [k for k, v in obj.items() if _is_weights(v)]
        if isinstance(obj.get("model"), nn.Module) or isinstance(obj.get("model_ema"), nn.Module):
            for k in ("model", "model_ema"):
                if isinstance(obj.get(k), nn.Module):
                    obj = {**obj, k: obj[k].state_dict()}
                    weight_keys.append(k)
        if not weight_keys:
            raise BadInput(f"{path}: no weights found (entries: {', '.join(map(str, list(obj)[:8]))})")
        if key is not None:
            if key not in weight_keys:
                raise BadInput(f"{path}: no weights under --key {key} (found: {', '.join(weight_keys)})")
            chosen = key
        else:
            chosen = _default_key(path, weight_keys)
        sd = obj[chosen]
    sd, stripped = strip_prefixes(sd)
    extras = (
        {}
        if chosen is None and _is_weights(obj)
        else {k: _plain(v) for k, v in obj.items() if k in ("epoch", "arch", "args", "config", "version", "metric")}
    )
    entries = {} if chosen is None and _is_weights(obj) else {str(k): _describe(v) for k, v in obj.items()}
    mapped = file_mappings(path, sd.values()) if fmt == "torch" else ()
    return Checkpoint(path, fmt, sd, chosen, weight_keys, extras, dict(meta), stripped, entries, mapped)


def _describe(v: Any) -> str:
    if _is_weights(v):
        return f"weights ({len(v)} tensors)"
    if isinstance(v, argparse.Namespace):
        return f"argparse.Namespace ({len(vars(v))} fields)"
    if isinstance(v, Mapping):
        if "param_groups" in v:
            return "optimizer state"
        return f"dict ({len(v)} entries)"
    if isinstance(v, Tensor):
        return f"tensor {tuple(v.shape)}"
    if isinstance(v, (list, tuple)):
        return f"{type(v).__name__} ({len(v)} items)"
    text = repr(_plain(v))
    return f"{type(v).__name__} {text[:40]}"


def _default_key(path: Path, weight_keys: list[str]) -> str:
    plain = [k for k in weight_keys if "ema" not in k.lower()]
    for k in PREFERRED_KEYS:
        if k in plain:
            return k
    if len(plain) == 1:
        return plain[0]
    if not plain and len(weight_keys) == 1:
        return weight_keys[0]
    raise BadInput(f"{path}: several weight entries ({', '.join(weight_keys)}); choose one with --key")


def check_finite(
    sd: Mapping[str, Tensor], where: Path | str, done: Callable[[list[Tensor]], None] | None = None
) -> None:
    """Raise BadInput naming the first floating tensor with NaN or inf.

    ``done`` (e.g. ``Checkpoint.release``) is called with each tensor once it was checked.
    """
    for k, v in sd.items():
        # A finite sum proves every element finite (NaN and inf propagate) in one read without a
        # temporary; only a non-finite sum (maybe an overflow) needs the elementwise check.
        if v.is_floating_point() and v.numel() and not torch.isfinite(v.sum()):
            if not torch.isfinite(v).all():
                raise BadInput(f"{where}: `{k}` holds non-finite values (NaN or inf)")
        if done is not None:
            done([v])


def load_strict(model: nn.Module, sd: Mapping[str, Tensor], where: str) -> nn.Module:
    """Load ``sd`` into ``model`` (built on any device, meta included) strictly, by assignment.

    Missing, unexpected and mis-shaped keys raise KeyMismatch naming the first few of each.
    Tensors are assigned, not copied, so a meta-built model costs no initialisation.
    """
    expected = model.state_dict(keep_vars=True)
    # Exporters often drop BN's `num_batches_tracked` (unused in eval): torch itself fills in 0.
    counters = {
        k: torch.zeros((), dtype=torch.long)
        for k in expected
        if k.endswith("num_batches_tracked") and k not in sd and k[: -len("num_batches_tracked")] + "running_mean" in sd
    }
    # The module versions: the file's (kept by strip_prefixes), else the model's own (what saving
    # it now would record): some `_load_from_state_dict` (torchvision MNASNet) require one.
    metadata = getattr(sd, "_metadata", None)
    if not isinstance(metadata, Mapping):
        metadata = getattr(expected, "_metadata", None)
    if counters:
        sd = {**sd, **counters}
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [
        f"{k} {tuple(sd[k].shape)} vs expected {tuple(v.shape)}"
        for k, v in expected.items()
        if k in sd and tuple(sd[k].shape) != tuple(v.shape)
    ]
    shapes += [
        f"{k} is {sd[k].dtype}, expected {'floating point' if v.is_floating_point() else v.dtype}"
        for k, v in expected.items()
        if k in sd and sd[k].is_floating_point() != v.is_floating_point()
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys ({', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys ({', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} shape/dtype mismatches ({'; '.join(shapes[:2])})")
        raise KeyMismatch(f"{where}: weights do not match the architecture: {'; '.join(parts)}")
    to_load = OrderedDict(sd)
    if isinstance(metadata, Mapping):
        to_load._metadata = OrderedDict(metadata)  # type: ignore[attr-defined]
    try:
        model.load_state_dict(to_load, strict=True, assign=True)
    except Exception as e:  # the model's own `_load_from_state_dict` refused them (e.g. a version)
        raise KeyMismatch(f"{where}: the model refuses these weights ({first_line(e, 300)})") from None
    leftover = [n for n, t in _tensors(model) if t.is_meta]
    if leftover:  # non-persistent buffers of a meta-built model: the builder must fill them
        raise RuntimeError(f"tensors left uninitialised after loading: {leftover[:3]}")
    return model.eval()


def _tensors(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    yield from model.named_parameters()
    yield from model.named_buffers()
