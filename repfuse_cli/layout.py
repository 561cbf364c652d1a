"""The fastest weight layout at inference, given to a loaded deploy model (the file never changes).

Deploy files hold every tensor in the standard layout (``torch.empty(shape)``'s strides, see
``fold.standard_layout``). On the CPU, PyTorch picks another conv kernel when a 1x1 weight
(O, I, 1, 1) has strides (I, 1, I, I) instead of (I, 1, 1, 1): the same bytes in the same order
(``is_contiguous()`` holds for both), but they also read as channels_last, and oneDNN then runs
the 1x1 conv as a plain GEMM. bench/RESULTS.md measured VanillaNet's deploy model 1.06-1.37x faster
that way (its merged 1x1 chains are most of its FLOPs), with NCHW inputs and NCHW outputs.

:func:`fast_layout` gives every groups=1 1x1 Conv2d weight those strides, as a view of the same
storage (no copy of the weights when ``inplace=True``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def channels_last_1x1(w: torch.Tensor) -> torch.Tensor:
    """``w`` (O, I, 1, 1), standard strides, viewed with strides (I, 1, I, I): same storage, same values."""
    o, i = w.shape[:2]
    if w.shape[2:] != (1, 1) or w.stride() != (i, 1, 1, 1):
        raise ValueError(f"expected a (O, I, 1, 1) weight with standard strides, got {tuple(w.shape)} {w.stride()}")
    return w.as_strided(w.shape, (i, 1, i, i), w.storage_offset())


def fast_layout(model: nn.Module, inplace: bool = False) -> nn.Module:
    """``model`` (a copy unless ``inplace``) with every 1x1, groups=1 Conv2d weight in the (I, 1, I, I)
    layout (:func:`channels_last_1x1`). Values and outputs' meaning are unchanged; the file is not touched.

    Example::

        model = fast_layout(load_deploy("vanillanet_13.deploy.safetensors"), inplace=True)
    """
    if not inplace:
        model = copy.deepcopy(model)
    for m in model.modules():
        if (
            isinstance(m, nn.Conv2d)
            and m.kernel_size == (1, 1)
            and m.groups == 1
            and m.weight.shape[2:] == (1, 1)
            and m.weight.stride() == (m.weight.shape[1], 1, 1, 1)
        ):
            w = m.weight
            with torch.no_grad():
                m.weight = nn.Parameter(channels_last_1x1(w.detach()), requires_grad=w.requires_grad)
    return model
