"""What-if patches for the conversion benchmark: NOT used by repfuse, only by bench_convert.py.

They show what the suggested package changes would buy, measured in the same run:

* ``fp32_math``: the big fusion arithmetic in float32 instead of float64 (BN scale/shift vectors
  stay float64, only the per-weight products and the 1x1-chain matrix products run in float32;
  no float64 copy of any weight). VanillaNet: ``W = (s2*W2) @ (s1*W1)`` in float32 GEMMs, biases
  from a float32 mat-vec. RepVGG: the 1x1 and identity branches are added in place into the
  centre tap of the folded 3x3 kernel (no padded 1x1 kernel, no identity kernel materialised).
* ``no_stats``: the FLOP/params report skipped (``model_stats`` returns zeros; the CLI's ``--quiet``
  already skips it, so this matters only to the in-process breakdown).

(An earlier ``fast_finite`` patch, a sum-first finiteness check, was adopted by repfuse itself.)

Verification still runs when asked (it compares the training model with the patched deploy
model), so the accuracy cost of float32 math is measured, not assumed.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _fold_bn_fp32(weight: Tensor, bias: Tensor | None, scale: Tensor, shift: Tensor, **_kw):
    w = weight.detach().float() * scale.to(torch.float32).reshape(-1, *([1] * (weight.dim() - 1)))
    b = shift if bias is None else bias.detach().double() * scale + shift
    return w, b


def _merge_1x1_fp32(
    outer_w: Tensor,
    outer_b: Tensor | None,
    inner_w: Tensor,
    inner_b: Tensor | None,
    *,
    outer_scale: Tensor | None = None,
    outer_shift: Tensor | None = None,
    inner_scale: Tensor | None = None,
    inner_shift: Tensor | None = None,
    **_kw,
):
    """repfuse's merge_1x1 (both BNs folded on the way), with float32 products."""
    wo = outer_w.float().reshape(outer_w.shape[0], outer_w.shape[1])
    if outer_scale is not None:
        wo = wo * outer_scale.float()[:, None]
    wi = inner_w.float().reshape(inner_w.shape[0], -1)
    if inner_scale is not None:
        wi = wi * inner_scale.float()[:, None]
    w = (wo @ wi).reshape(wo.shape[0], *inner_w.shape[1:])
    bi = None if inner_b is None else inner_b.double() * (1.0 if inner_scale is None else inner_scale.double())
    if inner_shift is not None:
        bi = inner_shift.double() if bi is None else bi + inner_shift.double()
    b = torch.zeros(wo.shape[0], dtype=torch.float64) if outer_b is None else outer_b.double()
    if outer_b is not None and outer_scale is not None:
        b = b * outer_scale.double()
    if outer_shift is not None:
        b = b + outer_shift.double()
    if bi is not None:
        b = b + (wo @ bi.float()).double()
    return w, b


def _merge_block_fp32(block, name: str = "block", **_kw):
    from repfuse_cli.fold import bn_scale_shift

    dense, one, ident = block.branches()
    groups = dense.conv.groups

    def ss(bn, what):
        return bn_scale_shift(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps, f"{name}.{what}")

    s, t = ss(dense.bn, "dense")
    kernel = dense.conv.weight.detach().float() * s.float().reshape(-1, 1, 1, 1)
    c = kernel.shape[-1] // 2
    s1, t1 = ss(one.bn, "1x1")
    kernel[:, :, c, c] += one.conv.weight.detach()[:, :, 0, 0].float() * s1.float().reshape(-1, 1)
    bias = t + t1
    if ident is not None:
        si, ti = ss(ident, "identity")
        idx = torch.arange(ident.num_features)
        kernel[idx, idx % (ident.num_features // groups), c, c] += si.float()
        bias = bias + ti
    return kernel, bias


def _patch(module: object, name: str, new: object) -> None:
    """Replace ``module.name``, refusing loudly if repfuse no longer has it (a rename would
    otherwise leave the patch unused and the what-if row silently measuring repfuse itself)."""
    if not callable(getattr(module, name, None)):
        raise SystemExit(f"bench/whatif.py: {getattr(module, '__name__', module)}.{name} is gone; update the patch")
    setattr(module, name, new)


def apply(fp32_math: bool = False, no_stats: bool = False) -> None:
    import repfuse_cli.pipeline as pipeline
    from repfuse_cli.fusers import repvgg, vanillanet

    if fp32_math:
        _patch(vanillanet, "fold_bn", _fold_bn_fp32)
        _patch(vanillanet, "merge_1x1", _merge_1x1_fp32)
        _patch(repvgg, "merge_block", _merge_block_fp32)
    if no_stats:
        from repfuse_cli.stats import ModelStats

        _patch(pipeline, "model_stats", lambda model, shape: ModelStats(0, 0, 0, 0, 0, 0, 0, 0))
