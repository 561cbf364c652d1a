"""What a model costs: parameters, FLOPs, layers and ops per forward pass.

FLOPs are 2 x multiply-accumulates, counted exactly as torch's FlopCounterMode counts them
(convolutions, linear layers, matmul/bmm/einsum and scaled-dot-product attention; biases,
BatchNorm and elementwise ops are not FLOPs there). Those are counted separately as "norm ops"
and "elementwise ops" (add/sub/mul/div/addcmul/addcdiv calls): pure BN folding removes them
without changing FLOPs.

How: one forward pass at batch 1 on the model's own device under a ``TorchFunctionMode`` that
sees every torch call with its real shapes. Convolutions and linear layers are not computed:
their output shape is derived from their arguments and a zero tensor of that shape is returned,
so the pass costs only the cheap ops between them (BatchNorm, activations, residual adds,
attention on small token counts) and never reads a conv or linear weight. Matmuls and attention
run, and are counted from their operand shapes, so functional attention (FastViT's attention
stages, LeViT, EfficientViT) is counted too.

Why not FlopCounterMode on meta tensors: in torch 2.14 the first meta-tensor op imports
``torch._dynamo`` (the Python meta kernels are wrapped by ``torch._disable_dynamo``), 1-3 s of
imports; this counter imports nothing torch has not already imported. Models that call a
function the counter has no formula for (``nn.MultiheadAttention``, ``tensordot``, ...) and
forwards that fail on zeros fall back to FlopCounterMode on meta tensors, and say so
(``ModelStats.counted_with``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

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

SHAPES = "shapes"  # counted by this module's TorchFunctionMode (no dynamo)
FLOP_COUNTER = "FlopCounterMode"  # the fallback: torch's FlopCounterMode on meta tensors


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
    # how flops/norm_ops/elementwise_ops were counted: SHAPES, or FLOP_COUNTER with the reason
    # (not part of to_dict(): the report's fields stay as they were)
    counted_with: str = SHAPES

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_bn(m: nn.Module) -> bool:
    """BatchNorm-like: torch's BNs and subclasses (timm BatchNormAct2d), FrozenBatchNorm2d."""
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return True
    return "BatchNorm" in type(m).__name__ and hasattr(m, "running_mean")


# --------------------------------------------------------------------------- counting by shapes


class Unsupported(Exception):
    """A call the shape counter has no formula for (the caller falls back to FlopCounterMode)."""


# Python-level names of the calls that reach one of ELEMENTWISE_OPS at the aten level
_ELEMENTWISE = {
    *("add", "add_", "__add__", "__radd__", "__iadd__"),
    *("sub", "sub_", "__sub__", "__isub__", "subtract", "subtract_"),  # not rsub (`1 - x`): aten.rsub
    *("mul", "mul_", "__mul__", "__rmul__", "__imul__", "multiply", "multiply_"),
    *("div", "div_", "__truediv__", "__itruediv__", "__rtruediv__", "__div__", "__idiv__", "__rdiv__"),
    *("true_divide", "true_divide_", "divide", "divide_"),
    *("addcmul", "addcmul_", "addcdiv", "addcdiv_"),
}
_NORMS = {"batch_norm", "layer_norm", "group_norm", "instance_norm"}
_UNSUPPORTED = {  # calls that do FLOPs (or elementwise ops) the counter cannot see inside
    "multi_head_attention_forward",
    "tensordot",
    "bilinear",
    "chain_matmul",
    "multi_dot",
    "convolution",
    "_convolution",
    "conv_tbc",
    "addbmm",
    "addmv",
    "rms_norm",
    "local_response_norm",
    "embedding_bag",
    "lstm",
    "gru",
    "rnn_tanh",
    "rnn_relu",
    "flex_attention",
}


def _arg(args: Sequence[Any], kwargs: dict[str, Any], i: int, name: str, default: Any = None) -> Any:
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _tuple(v: int | Sequence[int], n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (int(cast(int, v)),) * n


class ShapeCounter(TorchFunctionMode):
    """FLOPs (FlopCounterMode's formulas), norm ops and elementwise ops of the torch calls made
    while active; conv and linear calls return zeros of their output's shape (see the module doc)."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0
        self.norm = 0
        self.elementwise = 0
        self._outputs: dict[tuple[Any, ...], Tensor] = {}

    def output(self, x: Tensor, shape: tuple[int, ...]) -> Tensor:
        """A tensor standing for a conv's or linear's output (channels_last when its input is).

        Values do not matter, only shapes, so one zero-filled tensor per shape is handed out again
        and again: each new activation would otherwise cost a page-faulting allocation and a fill.
        """
        cl = len(shape) == 4 and x.dim() == 4 and not x.is_contiguous()
        cl = cl and x.is_contiguous(memory_format=torch.channels_last)
        fmt = torch.channels_last if cl else torch.contiguous_format
        key = (shape, x.dtype, x.device, fmt)
        if key not in self._outputs:
            self._outputs[key] = torch.zeros(shape, dtype=x.dtype, device=x.device).contiguous(memory_format=fmt)
        return self._outputs[key]

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        handler = _HANDLERS.get(name)
        if handler is not None:
            return handler(self, func, args, kwargs)
        if name in _ELEMENTWISE:
            self.elementwise += 1
        elif name in _NORMS:
            self.norm += 1
            x = _arg(args, kwargs, 0, "input")
            if isinstance(x, Tensor) and x.is_floating_point():
                return x  # values do not matter, only shapes: a normalization keeps its input's
        elif name in _UNSUPPORTED:
            raise Unsupported(f"no FLOP formula for `{name}`")
        return func(*args, **kwargs)

    # convolutions and linear layers: counted, not computed

    def conv(self, func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> Tensor:
        transposed = func.__name__.startswith("conv_transpose")
        x, w = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight")
        n = w.dim() - 2
        unbatched = x.dim() == n + 1
        xs = (1, *x.shape) if unbatched else tuple(x.shape)
        stride = _tuple(_arg(args, kwargs, 3, "stride", 1), n)
        if transposed:
            padding = _tuple(_arg(args, kwargs, 4, "padding", 0), n)
            out_pad = _tuple(_arg(args, kwargs, 5, "output_padding", 0), n)
            groups = int(_arg(args, kwargs, 6, "groups", 1))
            dilation = _tuple(_arg(args, kwargs, 7, "dilation", 1), n)
            k = w.shape[2:]
            spatial = tuple(
                (xs[2 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (k[i] - 1) + out_pad[i] + 1
                for i in range(n)
            )
            out = (xs[0], w.shape[1] * groups, *spatial)
            # FlopCounterMode: prod(input spatial) * prod(kernel) * batch * w.shape[0] * w.shape[1] * 2
            self.flops += math.prod(xs[2:]) * math.prod(w.shape) * xs[0] * 2
        else:
            padding = _arg(args, kwargs, 4, "padding", 0)
            dilation = _tuple(_arg(args, kwargs, 5, "dilation", 1), n)
            k = w.shape[2:]
            if isinstance(padding, str):
                if padding == "same":
                    spatial = tuple(xs[2:])
                elif padding == "valid":
                    spatial = tuple((xs[2 + i] - dilation[i] * (k[i] - 1) - 1) // stride[i] + 1 for i in range(n))
                else:
                    raise Unsupported(f"conv padding {padding!r}")
            else:
                pad = _tuple(padding, n)
                spatial = tuple(
                    (xs[2 + i] + 2 * pad[i] - dilation[i] * (k[i] - 1) - 1) // stride[i] + 1 for i in range(n)
                )
            out = (xs[0], w.shape[0], *spatial)
            self.flops += math.prod(spatial) * math.prod(w.shape) * xs[0] * 2
        return self.output(x, out[1:] if unbatched else out)

    def linear(self, func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> Tensor:
        x, w = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight")
        bias = _arg(args, kwargs, 2, "bias")
        self.flops += 2 * math.prod(x.shape[:-1]) * w.shape[0] * w.shape[1]
        if bias is not None and x.dim() != 2 and not x.is_contiguous():
            self.elementwise += 1  # aten.linear: matmul, then bias add_ (its fused paths need contiguous input)
        return self.output(x, (*x.shape[:-1], w.shape[0]))

    # products that run (on small operands) and are counted from their shapes

    def matmul(self, func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        name = func.__name__
        if name == "__rmatmul__":
            b, a = args[0], args[1]
        elif name in ("addmm", "baddbmm"):
            a, b = (
                _arg(args, kwargs, 1, "mat1" if name == "addmm" else "batch1"),
                _arg(args, kwargs, 2, "mat2" if name == "addmm" else "batch2"),
            )
        else:
            a, b = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "other" if "matmul" in name else "mat2")
        if a.dim() >= 1 and b.dim() >= 2:  # matrix-vector and dot products: mv/dot, not FLOPs to torch
            m = a.shape[-2] if a.dim() >= 2 else 1
            batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
            self.flops += 2 * math.prod(batch) * m * a.shape[-1] * b.shape[-1]
        return func(*args, **kwargs)

    def einsum(self, func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        eq, ops = args[0], args[1:]
        if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
            ops = tuple(ops[0])
        if not isinstance(eq, str) or len(ops) != 2 or "..." in eq or "->" not in eq:
            raise Unsupported("einsum other than two operands with an explicit output")
        lhs, out = eq.replace(" ", "").split("->")
        ia, ib = lhs.split(",")
        size = {c: s for t, idx in zip(ops, (ia, ib), strict=True) for c, s in zip(idx, t.shape, strict=True)}
        a_only = set(ia) - set(ib) - set(out)  # summed out alone before the product
        b_only = set(ib) - set(ia) - set(out)
        used = (set(ia) | set(ib)) - a_only - b_only
        if set(ia) & set(ib) - set(out):  # a contraction: one bmm over every index left
            self.flops += 2 * math.prod(size[c] for c in used)
        else:  # no index summed over both: torch multiplies (mul), no FLOPs
            self.elementwise += 1
        return func(*args, **kwargs)

    def sdpa(self, func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        q, k, v = (_arg(args, kwargs, i, n) for i, n in enumerate(("query", "key", "value")))
        if _arg(args, kwargs, 3, "attn_mask") is not None or kwargs.get("enable_gqa") or q.dim() < 3:
            raise Unsupported("scaled_dot_product_attention with a mask or GQA")
        batch = math.prod(q.shape[:-2])
        lq, e, s = q.shape[-2], q.shape[-1], k.shape[-2]
        self.flops += 2 * batch * lq * e * s + 2 * batch * lq * s * v.shape[-1]
        self.elementwise += _SDPA_ELEMENTWISE
        return func(*args, **kwargs)


_SDPA_ELEMENTWISE = 2  # the math path FlopCounterMode sees on meta tensors: q and k scaled by sqrt(scale)

_HANDLERS: dict[str, Callable[..., Any]] = {
    **dict.fromkeys(
        ("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"), ShapeCounter.conv
    ),
    "linear": ShapeCounter.linear,
    **dict.fromkeys(
        ("matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "addmm", "baddbmm"),
        ShapeCounter.matmul,
    ),
    "einsum": ShapeCounter.einsum,
    "scaled_dot_product_attention": ShapeCounter.sdpa,
}


def _input(model: nn.Module, input_shape: tuple[int, ...]) -> Tensor:
    first = next((t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()), None)
    dtype = first.dtype if first is not None else torch.float32
    device = first.device if first is not None else torch.device("cpu")
    return torch.zeros(input_shape, dtype=dtype, device=device)


def count_by_shapes(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(flops, norm ops, elementwise ops) of one forward pass; raises Unsupported (or whatever the
    forward raises) when it cannot count it."""
    counter = ShapeCounter()
    with torch.inference_mode(), counter:
        model(_input(model, input_shape))
    return counter.flops, counter.norm, counter.elementwise


# --------------------------------------------------------------------------- the fallback


def count_with_flop_counter(
    model: nn.Module, input_shape: tuple[int, ...]
) -> tuple[int | None, int | None, int | None]:
    """(flops, norm ops, elementwise ops) with torch's FlopCounterMode and a TorchDispatchMode, on
    meta tensors (imports torch._dynamo: about a second the first time)."""
    from torch.func import functional_call
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    class OpCounter(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.norm = 0
            self.elementwise = 0

        def __torch_dispatch__(
            self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None
        ) -> Any:
            name = func._overloadpacket.__name__.rstrip("_")
            if name in NORM_OPS:
                self.norm += 1
            elif name in ELEMENTWISE_OPS:
                self.elementwise += 1
            return func(*args, **(kwargs or {}))

    state = {
        n: torch.empty_like(t, device="meta") for n, t in list(model.named_parameters()) + list(model.named_buffers())
    }
    dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    x = torch.empty(input_shape, device="meta", dtype=dtype)
    flop_counter = FlopCounterMode(display=False)
    ops = OpCounter()
    try:
        with torch.no_grad(), flop_counter, ops:
            functional_call(model, state, (x,))
    except Exception:  # a forward that meta tensors cannot run (data-dependent control flow)
        return None, None, None
    return flop_counter.get_total_flops(), ops.norm, ops.elementwise


def count_forward(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[int | None, int | None, int | None, str]:
    """(flops, norm ops, elementwise ops, how they were counted) of one forward pass."""
    try:
        return (*count_by_shapes(model, input_shape), SHAPES)
    except Unsupported as e:
        why = str(e)
    except Exception as e:  # a forward that fails on zero activations: let meta tensors try
        why = f"the forward failed on zeros ({type(e).__name__})"
    return (*count_with_flop_counter(model, input_shape), f"{FLOP_COUNTER} ({why})")


def model_stats(model: nn.Module, input_shape: tuple[int, ...]) -> ModelStats:
    convs = sum(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    bns = sum(is_bn(m) for m in model.modules())
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    flops, norm, elementwise, how = count_forward(model, input_shape)
    return ModelStats(params, flops, convs, linears, bns, norm, elementwise, weight_bytes, how)
