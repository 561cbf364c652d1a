"""What a model costs: parameters, FLOPs, layers and ops per forward pass.

FLOPs are 2 x multiply-accumulates, counted by torch's FlopCounterMode on meta tensors (no
real activations are allocated). FlopCounterMode ignores BatchNorm and elementwise ops, so
those are counted separately as "norm ops" and "elementwise ops": pure BN folding removes
them without changing FLOPs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
NORM_OPS = {
    "native_batch_norm",
    "_native_batch_norm_legit",
    "_native_batch_norm_legit_no_training",
    "batch_norm",
    "cudnn_batch_norm",
    "native_layer_norm",
    "native_group_norm",
}
ELEMENTWISE_OPS = {"add", "sub", "mul", "div", "addcmul", "addcdiv"}


@dataclass
class ModelStats:
    params: int  # learnable parameter elements (buffers excluded)
    flops: int | None  # 2 x MACs at the stated input size; None if the forward could not be counted
    conv_layers: int
    linear_layers: int
    bn_layers: int
    norm_ops: int | None  # normalization ops executed per forward pass
    elementwise_ops: int | None  # elementwise add/sub/mul/div ops per forward pass
    weight_bytes: int  # bytes of parameters and buffers (the state_dict)

    def to_dict(self) -> dict:
        return asdict(self)


def is_bn(m: nn.Module) -> bool:
    """BatchNorm-like: torch's BNs and subclasses (timm BatchNormAct2d), FrozenBatchNorm2d."""
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return True
    return "BatchNorm" in type(m).__name__ and hasattr(m, "running_mean")


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.norm = 0
        self.elementwise = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._overloadpacket.__name__.rstrip("_")
        if name in NORM_OPS:
            self.norm += 1
        elif name in ELEMENTWISE_OPS:
            self.elementwise += 1
        return func(*args, **(kwargs or {}))


def count_forward(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[int | None, int | None, int | None]:
    """(flops, norm ops, elementwise ops) of one forward pass, on meta tensors."""
    from torch.utils.flop_counter import FlopCounterMode  # 80 ms of imports (triton): only when counting

    state = {
        n: torch.empty_like(t, device="meta") for n, t in list(model.named_parameters()) + list(model.named_buffers())
    }
    dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    x = torch.empty(input_shape, device="meta", dtype=dtype)
    flop_counter = FlopCounterMode(display=False)
    ops = _OpCounter()
    try:
        with torch.no_grad(), flop_counter, ops:
            functional_call(model, state, (x,))
    except Exception:  # a forward that meta tensors cannot run (data-dependent control flow)
        return None, None, None
    return flop_counter.get_total_flops(), ops.norm, ops.elementwise


def model_stats(model: nn.Module, input_shape: tuple[int, ...]) -> ModelStats:
    convs = sum(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    bns = sum(is_bn(m) for m in model.modules())
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    flops, norm, elementwise = count_forward(model, input_shape)
    return ModelStats(params, flops, convs, linears, bns, norm, elementwise, weight_bytes)
