"""The fusion math, once: small pure functions on tensors that every fuser uses.

All functions compute in float64 and return float64 tensors; callers cast back to the
checkpoint's dtype once, at the very end (folding in fp16 and casting after loses more than the one final rounding).
No function mutates its arguments.
"""

from __future__ import annotations

from typing import overload

import torch
from torch import Tensor

from .errors import BadInput

F64 = torch.float64


def standard_layout(t: Tensor) -> Tensor:
    """``t`` with the strides ``torch.empty(t.shape)`` has (a copy only when they differ).

    ``is_contiguous()`` ignores the strides of size-1 dims, so a (O, I, 1, 1) kernel can be
    "contiguous" and channels_last at once; deploy tensors get one unambiguous layout.
    """
    if t.stride() == torch.empty(t.shape, device="meta").stride():
        return t
    return torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)


@overload
def _f64(t: Tensor) -> Tensor: ...
@overload
def _f64(t: None) -> None: ...
def _f64(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().to(F64)


def bn_scale_shift(
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    name: str = "BatchNorm",
) -> tuple[Tensor, Tensor]:
    """Return (scale, shift) such that BN(x) == x * scale + shift per channel (eval mode).

    ``scale = gamma / sqrt(var + eps)``, ``shift = beta - mean * scale``. ``weight``/``bias``
    None means ``affine=False`` (gamma 1, beta 0). Raises BadInput naming ``name`` when a
    variance is negative or a statistic is not finite or missing (``track_running_stats=False``).
    """
    if running_mean is None or running_var is None:
        raise BadInput(f"{name}: no running statistics to fold (track_running_stats=False)")
    mean, var = _f64(running_mean), _f64(running_var)
    if not torch.isfinite(var).all() or not torch.isfinite(mean).all():
        raise BadInput(f"{name}: running statistics are not finite")
    if (var < 0).any():
        raise BadInput(f"{name}: running_var has negative entries (min {var.min().item():.3g})")
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * _f64(weight)
    shift = -mean * scale
    if bias is not None:
        shift = shift + _f64(bias)
    return scale, shift


def fold_bn(
    weight: Tensor,
    bias: Tensor | None,
    scale: Tensor,
    shift: Tensor,
    *,
    transposed: bool = False,
    groups: int = 1,
) -> tuple[Tensor, Tensor]:
    """Fold a per-output-channel affine ``y*scale + shift`` that follows a conv/linear.

    ``weight`` is laid out as torch stores it: (out, in/groups, *k) for Conv and Linear,
    (in, out/groups, *k) for ConvTranspose (``transposed=True``, ``groups`` needed).
    Returns (W', b') in float64 with ``b' = b * scale + shift``.
    """
    w = _f64(weight)
    if not transposed:
        w = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
    else:
        cin, cout_g = w.shape[0], w.shape[1]
        k = w.shape[2:]
        w = w.reshape(groups, cin // groups, cout_g, *k)
        w = w * scale.reshape(groups, 1, cout_g, *([1] * len(k)))
        w = w.reshape(cin, cout_g, *k)
    b = shift if bias is None else _f64(bias) * scale + shift
    return w, b


def merge_1x1(
    outer_w: Tensor,
    outer_b: Tensor | None,
    inner_w: Tensor,
    inner_b: Tensor | None,
    *,
    outer_scale: Tensor | None = None,
    outer_shift: Tensor | None = None,
    inner_scale: Tensor | None = None,
    inner_shift: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    block_rows: int = 512,
) -> tuple[Tensor, Tensor]:
    """Compose ``outer(inner(x))`` where ``outer`` is a 1x1 conv (or Linear) with groups=1.

    ``inner_w`` may have any kernel (out_i, in, *k); ``outer_w`` is (out, out_i[, 1, 1...]).
    Returns ``W = Wo @ Wi`` (over the inner's output channels) and ``b = bo + Wo @ bi``, computed
    in float64. ``*_scale``/``*_shift`` (from :func:`bn_scale_shift`) fold the BN that follows
    each conv on the way, exactly as :func:`fold_bn` would. The product is computed in blocks of
    ``block_rows`` rows of both operands and written in ``out_dtype`` (default float64), so no
    whole float64 copy of either weight or of the product exists; the bias stays float64. 512
    rows keep each float64 block (25 MB at 6144 columns) under glibc's largest mmap threshold,
    so blocks are reused rather than mapped and zero-filled anew (bench/RESULTS.md measures it).
    """
    rows, mid = outer_w.shape[0], outer_w.shape[1]
    wo = outer_w.detach().reshape(rows, mid)
    wi = inner_w.detach().reshape(mid, -1)
    so, si = _f64(outer_scale), _f64(inner_scale)

    def outer_rows(r: slice) -> Tensor:
        w = _f64(wo[r])
        return w if so is None else w * so[r, None]

    def inner_rows(k: slice) -> Tensor:
        w = _f64(wi[k])
        return w if si is None else w * si[k, None]

    # folded biases: b' = b * scale + shift
    bi = _affine(inner_b, si, inner_shift)
    b = _affine(outer_b, so, outer_shift)
    if b is None:
        b = torch.zeros(rows, dtype=F64)

    # Plain matmuls into a row-major buffer, then a view: standard strides. (An einsum leaves a
    # merged 1x1 kernel with strides that also read as channels_last, which changes which conv
    # kernel runs: weight layout matters to speed.)
    w = torch.empty(rows, wi.shape[1], dtype=out_dtype or F64)
    inner_blocks = [slice(k, k + block_rows) for k in range(0, mid, block_rows)]
    for start in range(0, rows, block_rows):
        r = slice(start, start + block_rows)
        o = outer_rows(r)
        acc = o[:, inner_blocks[0]] @ inner_rows(inner_blocks[0])
        for k in inner_blocks[1:]:
            acc += o[:, k] @ inner_rows(k)
        w[r] = acc
        if bi is not None:
            b[r] += o @ bi
    return w.reshape(rows, *inner_w.shape[1:]), b


def _affine(bias: Tensor | None, scale: Tensor | None, shift: Tensor | None) -> Tensor | None:
    """``bias * scale + shift`` in float64, each part optional (None when all are); always a new
    tensor (the caller adds into it)."""
    out = None if bias is None else bias.detach().to(F64, copy=True)
    if out is not None and scale is not None:
        out = out * scale
    if shift is not None:
        out = shift.detach().to(F64, copy=True) if out is None else out + _f64(shift)
    return out


def pad_kernel(weight: Tensor, size: int | tuple[int, ...]) -> Tensor:
    """Zero-pad a conv kernel symmetrically to spatial ``size`` (e.g. a 1x1 to 3x3)."""
    k = weight.shape[2:]
    size = (size,) * len(k) if isinstance(size, int) else tuple(size)
    pads: list[int] = []
    for have, want in zip(reversed(k), reversed(size), strict=True):
        extra = want - have
        if extra < 0 or extra % 2:
            raise ValueError(f"cannot center a {tuple(k)} kernel in {size}")
        pads += [extra // 2, extra // 2]
    return torch.nn.functional.pad(_f64(weight), pads)


def identity_kernel(channels: int, groups: int = 1, size: int = 3, dims: int = 2) -> Tensor:
    """The kernel of a conv (channels -> channels, ``groups``) that returns its input.

    Shape (channels, channels // groups, size, ...): ``K[i, i % (channels // groups), c, c] = 1``.
    Built in float64, so it works for any model dtype once cast.
    """
    if channels % groups:
        raise ValueError(f"{channels} channels do not split into {groups} groups")
    per_group = channels // groups
    k = torch.zeros(channels, per_group, *([size] * dims), dtype=F64)
    c = size // 2
    idx = torch.arange(channels)
    k[(idx, idx % per_group) + (c,) * dims] = 1.0
    return k


def add_centered(kernel: Tensor, small: Tensor) -> Tensor:
    """``kernel + pad_kernel(small, kernel's size)``, added in place into ``kernel`` and returned.

    For big kernels this avoids two full-size temporaries. ``kernel`` must be a float64 tensor
    the caller owns (e.g. fresh from :func:`fold_bn`).
    """
    k, m = kernel.shape[2:], small.shape[2:]
    if any((a - b) % 2 or b > a for a, b in zip(k, m, strict=True)):
        raise ValueError(f"cannot center a {tuple(m)} kernel in {tuple(k)}")
    window = tuple(slice((a - b) // 2, (a - b) // 2 + b) for a, b in zip(k, m, strict=True))
    index: tuple[slice, ...] = (slice(None), slice(None), *window)
    kernel[index] += _f64(small)
    return kernel


def add_identity(kernel: Tensor, scale: Tensor, first_row: int = 0) -> Tensor:
    """``kernel + identity_kernel(...) * scale`` (per output channel), in place into ``kernel``.

    The identity branch of a (channels -> channels, groups) conv after its BN is folded:
    ``K[i, i % (channels // groups), center] += scale[i]``, where ``channels // groups`` is the
    kernel's second dimension. ``kernel`` (caller-owned float64) may be the block of output rows
    starting at ``first_row``; ``scale`` holds those rows' scales.
    """
    per_group = kernel.shape[1]
    idx = torch.arange(first_row, first_row + kernel.shape[0])
    center = [s // 2 for s in kernel.shape[2:]]
    index: tuple[Tensor | int, ...] = (idx - first_row, idx % per_group, *center)
    kernel[index] += _f64(scale)
    return kernel


def fold_bn_into_next(
    weight: Tensor, bias: Tensor | None, scale: Tensor, shift: Tensor, *, groups: int = 1
) -> tuple[Tensor, Tensor]:
    """Fold a per-input-channel affine ``x*scale + shift`` that *precedes* a Linear or a conv.

    ``weight`` is (out, in/groups, *k) as torch stores Linear and Conv weights. Returns (W', b')
    in float64: ``W'[o, j, ...] = W[o, j, ...] * scale[c]`` and ``b' = b + sum_{j,k} W[o, j, k] * shift[c]``,
    ``c`` being input channel ``j`` of output ``o``'s group. Exact only where every tap of the
    kernel reads a real input (a Linear, or a conv without padding): a zero-padded border would
    read 0 where the unfolded model reads ``shift``.
    """
    w = _f64(weight)
    out, per_group = w.shape[0], w.shape[1]
    if out % groups or scale.numel() != per_group * groups:
        raise ValueError(f"a ({out}, {per_group}, ...) weight in {groups} groups cannot take {scale.numel()} channels")
    wg = w.reshape(groups, out // groups, per_group, -1)
    s = _f64(scale).reshape(groups, 1, per_group, 1)
    t = _f64(shift).reshape(groups, 1, per_group, 1)
    new_w = (wg * s).reshape(w.shape)
    extra = (wg * t).sum((2, 3)).reshape(out)
    return new_w, extra if bias is None else _f64(bias) + extra
