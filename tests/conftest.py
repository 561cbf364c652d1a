"""Shared test helpers. Fusion tests must randomize BN statistics and affine parameters:
default BN stats (mean 0, var 1, gamma 1, beta 0) hide most folding bugs."""

from __future__ import annotations

import torch
from torch import nn


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm-like module random running stats and affine parameters, in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            mean, var = getattr(m, "running_mean", None), getattr(m, "running_var", None)
            if isinstance(mean, torch.Tensor) and isinstance(var, torch.Tensor):
                n = mean.numel()
                mean.copy_(torch.randn(n, generator=g) * 0.5)
                var.copy_(torch.rand(n, generator=g) * 1.5 + 0.25)
                w, b = getattr(m, "weight", None), getattr(m, "bias", None)
                if isinstance(w, torch.Tensor):
                    w.copy_(torch.rand(n, generator=g) + 0.5)
                if isinstance(b, torch.Tensor):
                    b.copy_(torch.randn(n, generator=g) * 0.3)
    return model


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to the scale of a (max |a|)."""
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item()
