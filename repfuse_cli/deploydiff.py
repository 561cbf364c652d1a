"""`repfuse diff A.safetensors B.safetensors`: are two deploy files the same bytes, and if not, by how much?

For a pipeline that rebuilds an artifact and checks it against the one it shipped. Compared:
the tensor keys, each tensor's dtype and shape, and its elements bit for bit. For elements that
differ, the distance in units in the last place (ulps): floats are read through integer views of
their bits, mapped to integers that count representable values in order (so a step across zero,
-0.0 to +0.0, or from the largest float to inf is one ulp like any other), for float16, bfloat16,
float32 and float64; integer tensors differ by their plain difference. Files are read with
safetensors' ``safe_open`` (memory-mapped), one tensor at a time.

The metadata (``source``, ``repfuse_version``, ...) is listed where it differs but does not
decide the result: two conversions of one checkpoint by two repfuse versions may hold the same
weights.

Exit codes: 0 identical tensors, 1 they differ (keys, dtypes, shapes or values), 2 bad input
(a file missing or not a readable safetensors file).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import BadInput, first_line

IDENTICAL, DIFFER = 0, 1

_INT_VIEW = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}


@dataclass
class TensorDiff:
    """One tensor whose values differ (same key, dtype and shape in both files)."""

    key: str
    dtype: str
    shape: list[int]
    differing: int  # elements whose bits differ
    max_ulps: int  # the largest distance between two elements, in ulps (integers: their difference)
    max_abs_diff: float  # the largest absolute difference (inf or nan where a value is not finite)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DiffResult:
    """What differs between deploy files ``a`` and ``b``."""

    a: str
    b: str
    tensors: int  # keys present in both
    elements: int  # elements compared (tensors of equal dtype and shape)
    only_in_a: list[str] = field(default_factory=list)
    only_in_b: list[str] = field(default_factory=list)
    mismatched: list[dict[str, Any]] = field(default_factory=list)  # {key, a: "F32 [3, 4]", b: ...}
    differing: list[TensorDiff] = field(default_factory=list)  # tensors whose values differ
    metadata_differs: list[str] = field(default_factory=list)  # metadata keys whose values differ

    @property
    def identical(self) -> bool:
        return not (self.only_in_a or self.only_in_b or self.mismatched or self.differing)

    @property
    def exit_code(self) -> int:
        return IDENTICAL if self.identical else DIFFER

    @property
    def differing_elements(self) -> int:
        return sum(d.differing for d in self.differing)

    @property
    def max_ulps(self) -> int:
        return max((d.max_ulps for d in self.differing), default=0)

    def summary(self) -> str:
        """One line for the terminal."""
        if self.identical:
            return f"identical: {self.tensors} tensors, {self.elements:,} elements, bit for bit"
        parts = []
        if self.only_in_a or self.only_in_b:
            parts.append(f"keys differ ({len(self.only_in_a)} only in A, {len(self.only_in_b)} only in B)")
        if self.mismatched:
            parts.append(f"{len(self.mismatched)} tensors differ in dtype or shape")
        if self.differing:
            worst = max(self.differing, key=lambda d: d.max_ulps)
            parts.append(
                f"{self.differing_elements:,} of {self.elements:,} elements differ in {len(self.differing)} tensors, "
                f"by at most {worst.max_ulps:,} ulp{'s' if worst.max_ulps != 1 else ''} (`{worst.key}`)"
            )
        return "differ: " + "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            identical=self.identical,
            differing_elements=self.differing_elements,
            max_ulps=self.max_ulps,
            exit_code=self.exit_code,
        )
        return d


def ordered_bits(t: Tensor) -> Tensor:
    """Integers (int64) in the order of the float values of ``t``, one apart per representable value.

    The sign-magnitude bit pattern becomes a two's-complement count: +x keeps its magnitude bits,
    -x becomes minus them, so -0.0 and +0.0 both map to 0 and neighbours differ by 1.
    """
    bits = t.view(_INT_VIEW[t.dtype]).to(torch.int64)
    width = t.element_size() * 8
    magnitude = bits & ((1 << (width - 1)) - 1)
    return torch.where(bits < 0, -magnitude, magnitude)


def ulp_distance(a: Tensor, b: Tensor) -> Tensor:
    """Element-wise distance in ulps between float tensors of one dtype, as float64 (exact below 2**53).

    Defined for every bit pattern: NaNs order beyond the infinities, by their payload."""
    if a.dtype != b.dtype or a.dtype not in _INT_VIEW:
        raise TypeError(f"ulp_distance: needs two float16/bfloat16/float32/float64 tensors, got {a.dtype}, {b.dtype}")
    ka, kb = ordered_bits(a), ordered_bits(b)
    if a.dtype == torch.float64:  # int64 differences can overflow across the sign: take those in float64
        same_sign = (ka >= 0) == (kb >= 0)
        d = torch.where(same_sign, (ka - kb).abs(), 0).double()
        d = torch.where(same_sign, d, ka.double().abs() + kb.double().abs())
    else:
        d = (ka - kb).abs().double()
    return d


def _compare(key: str, a: Tensor, b: Tensor) -> TensorDiff | None:
    if a.dtype in _INT_VIEW:
        ia, ib = a.view(_INT_VIEW[a.dtype]), b.view(_INT_VIEW[b.dtype])
    else:
        ia, ib = a, b
    if torch.equal(ia, ib):
        return None
    neq = ia != ib
    differing = int(neq.sum())
    if a.dtype in _INT_VIEW:
        xa, xb = a[neq], b[neq]
        max_ulps = int(ulp_distance(xa, xb).max().item())
        max_abs = (xa.double() - xb.double()).abs().max().item()
    elif a.dtype == torch.bool:
        max_ulps, max_abs = 1, 1.0
    else:
        delta = (a[neq].to(torch.int64) - b[neq].to(torch.int64)).abs().max().item()
        max_ulps, max_abs = int(delta), float(delta)
    return TensorDiff(key, str(a.dtype).replace("torch.", ""), list(a.shape), differing, max_ulps, max_abs)


def _open(path: Path) -> Any:
    from safetensors import SafetensorError, safe_open

    if not path.exists():
        raise BadInput(f"{path}: no such file")
    if path.is_dir():
        raise BadInput(f"{path}: is a directory, not a safetensors file")
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise BadInput(f"{path}: not a readable safetensors file ({first_line(e)})") from None


def diff_files(a: str | os.PathLike, b: str | os.PathLike) -> DiffResult:
    """Compare deploy files ``a`` and ``b`` (any safetensors files): keys, dtypes, shapes, then
    every element's bits. Raises BadInput (exit 2) when either cannot be read.

    Example::

        from repfuse_cli.deploydiff import diff_files
        res = diff_files("release/model.safetensors", "rebuilt/model.safetensors")
        print(res.summary()); raise SystemExit(res.exit_code)
    """
    pa, pb = Path(a), Path(b)
    from safetensors import SafetensorError

    fa, fb = _open(pa), _open(pb)
    with fa, fb:
        ka, kb = set(fa.keys()), set(fb.keys())
        common = sorted(ka & kb)
        res = DiffResult(str(pa), str(pb), tensors=len(common), elements=0)
        res.only_in_a, res.only_in_b = sorted(ka - kb), sorted(kb - ka)
        ma, mb = fa.metadata() or {}, fb.metadata() or {}
        res.metadata_differs = sorted(k for k in set(ma) | set(mb) if ma.get(k) != mb.get(k))
        for key in common:
            try:
                sa, sb = fa.get_slice(key), fb.get_slice(key)
                da, db = sa.get_dtype(), sb.get_dtype()
                shape_a, shape_b = list(sa.get_shape()), list(sb.get_shape())
                if (da, shape_a) != (db, shape_b):
                    res.mismatched.append({"key": key, "a": f"{da} {shape_a}", "b": f"{db} {shape_b}"})
                    continue
                ta, tb = fa.get_tensor(key), fb.get_tensor(key)
            except (SafetensorError, OSError, ValueError, TypeError) as e:
                raise BadInput(f"{pa} / {pb}: cannot read tensor `{key}` ({first_line(e)})") from None
            res.elements += ta.numel()
            d = _compare(key, ta, tb)
            if d is not None:
                res.differing.append(d)
    return res
