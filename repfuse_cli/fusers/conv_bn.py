"""conv-bn: fold every BatchNorm into the convolution or linear layer that feeds it, for any model.

Pairs are found from the real dataflow of one forward pass, not from module order: a BN folds
into a conv/linear only when the BN's input *is* that layer's output tensor and nothing else
uses that tensor. Two more exact folds follow the same rule: a BN after a channel concatenation
of conv outputs (MixNet's MixedConv2d, Inception-style concats) folds each channel slice into
the conv that produced it, and a BN whose only consumer is a Linear (or a conv without padding)
folds into that layer's weights and bias. timm models are first re-parameterized with timm's own
``reparameterize_model`` (RepVGG/MobileOne/FastViT/RepViT/LeViT blocks), then BN-folded.

The deploy model is rebuilt anywhere from the metadata: construct the training model on the
meta device, re-parameterize if timm did, then apply the recorded folds structurally (give the
conv a bias, replace the BN by what it did after normalizing: nothing, or timm's drop+act).
"""

from __future__ import annotations

import copy
import importlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

from ..checkpoint import Checkpoint, float_dtype, load_strict
from ..errors import BadInput, RepfuseError, UnsafeCheckpoint, first_line
from ..fold import bn_scale_shift, fold_bn, fold_bn_into_next
from ..fuser import Done, EvalTransform, Fused, Fuser, NotThisArch, Options, Plan, timm_eval_transform
from ..stats import is_bn

PRODUCERS = (nn.modules.conv._ConvNd, nn.Linear)
_PLAIN_FORWARDS = {
    nn.Conv1d.forward,
    nn.Conv2d.forward,
    nn.Conv3d.forward,
    nn.Linear.forward,
    nn.ConvTranspose1d.forward,
    nn.ConvTranspose2d.forward,
    nn.ConvTranspose3d.forward,
}
# BN classes whose forward is exactly "normalize with running stats, then (drop, act)" in eval.
_FOLDABLE_BN_NAMES = {
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "SyncBatchNorm",
    "BatchNormAct2d",
    "SyncBatchNormAct",
    "FrozenBatchNorm2d",
    "FrozenBatchNormAct2d",
}
_CAT_OPS = {"cat", "concat", "concatenate"}
_ACTIVATION_OPS = {
    "relu", "relu6", "leaky_relu", "prelu", "rrelu", "elu", "selu", "celu", "gelu", "silu", "mish", "hardswish",
    "hardsigmoid", "hardtanh", "sigmoid", "tanh", "softplus", "threshold",
}  # fmt: skip
_REPARAM_METHODS = ("fuse", "reparameterize", "switch_to_deploy")
_TIMM_KWARGS = ("num_classes", "in_chans")  # the only constructor arguments a deploy file may carry
_METADATA_ATTRS = {
    "shape",
    "dtype",
    "device",
    "ndim",
    "is_cuda",
    "requires_grad",
    "layout",
    "is_meta",
    "is_sparse",
    "is_quantized",
    "names",
    "grad_fn",
    "grad",
    "is_leaf",
    "is_nested",
}
_METADATA_FUNCS = {
    "size",
    "dim",
    "numel",
    "stride",
    "is_contiguous",
    "is_floating_point",
    "is_complex",
    "__len__",
    "__format__",
    "__repr__",
    "element_size",
    "get_device",
    "nelement",
    "data_ptr",
    "storage_offset",
}


class FoldedNormAct(nn.Module):
    """What a timm BatchNormAct2d still does once its normalization is folded away: drop, act.

    Keeps the attribute names ``drop`` and ``act`` so parameterized activations keep their keys.
    """

    def __init__(self, drop: nn.Module, act: nn.Module):
        super().__init__()
        self.drop = drop
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(x))


# --- building models -------------------------------------------------------------------------


def _timm_name(spec: str) -> str | None:
    return spec[len("timm:") :] if spec.startswith("timm:") else None


def _factory(config: dict[str, Any]) -> Callable[[], nn.Module]:
    """The zero-argument constructor ``config`` names; BadInput if it cannot be imported or called."""
    spec, kwargs = config["model"], config.get("kwargs", {})
    name = _timm_name(spec)
    if name is not None:
        import timm

        return lambda: timm.create_model(name, pretrained=False, **kwargs)
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:  # like `python -m`, modules in the working directory import
        sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except Exception as e:  # ImportError, AttributeError, or the module's own code failing
        raise BadInput(f"--model {spec}: cannot import ({type(e).__name__}: {first_line(e)})") from None
    if not callable(factory):
        raise BadInput(f"--model {spec}: `{attr}` is a {type(factory).__name__}, not a callable that builds the model")
    return lambda: factory(**kwargs)


def _construct(config: dict[str, Any], device: str | torch.device) -> nn.Module:
    """Call the model's constructor under ``device``. Exceptions from the user's code propagate."""
    make = _factory(config)
    with torch.device(device):
        model = make()
    if not isinstance(model, nn.Module):
        raise BadInput(f"--model {config['model']}: returned a {type(model).__name__}, not an nn.Module")
    return model.eval()


def _has_unsaved_buffers(model: nn.Module) -> bool:
    saved = set(model.state_dict())
    return any(n not in saved for n, _ in model.named_buffers())


def _build(
    config: dict[str, Any], sd: dict[str, Tensor] | None, where: str, notes: list[str] | None = None
) -> nn.Module:
    """Construct on the meta device (no initialisation cost) unless the model has buffers that are
    not in its state_dict (computed at init) or its constructor computes on tensors (the meta
    build fails): those need a real construction; the latter is said in ``notes``."""
    spec = config["model"]
    model = None
    try:
        model = _construct(config, "meta")
    except RepfuseError:
        raise
    except Exception as e:  # e.g. torchvision regnet: "Cannot copy out of meta tensor"
        meta_error: Exception | None = e
    else:
        meta_error = None
    if model is None or _has_unsaved_buffers(model):
        try:
            model = _construct(config, "cpu")
        except RepfuseError:
            raise
        except Exception as e:  # the user's constructor (or timm's, with the checkpoint's kwargs) failed
            raise BadInput(f"--model {spec}: building the model failed ({type(e).__name__}: {first_line(e)})") from None
        if meta_error is not None and notes is not None:
            note = (
                f"`{spec}` cannot be built on the meta device ({type(meta_error).__name__}: "
                f"{first_line(meta_error, 100)}); it was built with real, randomly initialised tensors instead"
            )
            if note not in notes:
                notes.append(note)
    if sd is not None:
        load_strict(model, sd, where)
    return model


def _reparam_candidates(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if n and any(hasattr(m, a) for a in _REPARAM_METHODS)]


def _timm_reparameterize(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """timm's ``reparameterize_model``, with the layers its ``fuse()`` methods create (LeViT,
    EfficientViT-M, RepViT build new Conv2d/Linear in the default dtype) made in ``dtype``:
    on the float64 working copy they must be float64 too, or the model is mixed-dtype and the
    fused weights rounded to float32."""
    from timm.utils.model import reparameterize_model

    previous = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        return reparameterize_model(model, inplace=True)
    finally:
        torch.set_default_dtype(previous)


# --- finding conv -> BN pairs from the dataflow ------------------------------------------------


def _modules_by_id(model: nn.Module) -> dict[int, str]:
    return {id(m): n for n, m in model.named_modules()}


class _DataflowTrace(TorchFunctionMode):
    """Records, for every tensor, which module produced it and who used it, during one forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.names = _modules_by_id(model)
        self.stack: list[str] = []
        self.keep: list[Tensor] = []  # keeps traced tensors alive so their ids stay unique
        self.produced_by: dict[int, str] = {}  # tensor id -> producer module name
        self.op_of: dict[int, str] = {}  # tensor id -> name of the torch function that made it
        self.uses: dict[int, list[str]] = {}  # tensor id -> module contexts that used it
        self.use_ops: dict[int, list[str]] = {}  # tensor id -> the torch functions that used it
        self.cat_parts: dict[int, tuple[list[Tensor], int]] = {}  # concat output id -> (parts, dim)
        self.bn_input: dict[str, Tensor] = {}
        self.bn_output: dict[str, Tensor] = {}
        self.layer_input: dict[str, Tensor] = {}  # conv/linear name -> its input
        self.calls: dict[str, int] = {}
        self.hooks = []
        for m in model.modules():
            self.hooks.append(m.register_forward_pre_hook(self._pre))
            self.hooks.append(m.register_forward_hook(self._post))

    def _pre(self, m: nn.Module, args: tuple) -> None:
        name = self.names[id(m)]
        self.calls[name] = self.calls.get(name, 0) + 1
        if args and isinstance(args[0], Tensor):
            if is_bn(m) and name not in self.bn_input:
                self.bn_input[name] = args[0]
                self.keep.append(args[0])
            if isinstance(m, PRODUCERS) and name not in self.layer_input:
                self.layer_input[name] = args[0]
                self.keep.append(args[0])
        self.stack.append(name)

    def _post(self, m: nn.Module, args: tuple, out: Any) -> None:
        self.stack.pop()
        if not isinstance(out, Tensor):
            return
        name = self.names[id(m)]
        if isinstance(m, PRODUCERS):
            self.produced_by.setdefault(id(out), name)
            self.keep.append(out)
        if is_bn(m) and name not in self.bn_output:
            self.bn_output[name] = out
            self.keep.append(out)

    def __torch_function__(
        self, func: Callable[..., Any], types: tuple[type, ...], args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "__get__":
            name = getattr(getattr(func, "__self__", None), "__name__", "")
            metadata = name in _METADATA_ATTRS
        else:
            metadata = name in _METADATA_FUNCS
        if not metadata:
            where = self.stack[-1] if self.stack else ""
            for t in _tensors_in((args, kwargs)):
                self.uses.setdefault(id(t), []).append(where)
                self.use_ops.setdefault(id(t), []).append(name)
        out = func(*args, **kwargs)
        if not metadata:
            for t in _tensors_in(out):
                self.op_of.setdefault(id(t), name)
                self.keep.append(t)
            if name in _CAT_OPS and isinstance(out, Tensor) and args and isinstance(args[0], (list, tuple)):
                dim = args[1] if len(args) > 1 else kwargs.get("dim", kwargs.get("axis", 0))
                if isinstance(dim, int):
                    self.cat_parts[id(out)] = (list(args[0]), dim % max(out.dim(), 1))
        return out

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


def _tensors_in(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors_in(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors_in(o)


def _run_forward(model: nn.Module, x: Tensor, meta: bool) -> None:
    with torch.no_grad():
        if meta:
            state = {
                n: torch.empty_like(t, device="meta")
                for n, t in list(model.named_parameters()) + list(model.named_buffers())
            }
            functional_call(model, state, (x.to("meta"),))
        else:
            model(x)


@dataclass
class Folds:
    """Every exact BN fold one forward pass shows, by direction, and the BNs that stay (with why)."""

    after: list[tuple[str, str]] = field(default_factory=list)  # (conv/linear, bn): BN follows the layer
    concat: list[tuple[list[str], str]] = field(default_factory=list)  # ([convs, in order], bn): BN follows a cat
    before: list[tuple[str, str]] = field(default_factory=list)  # (bn, linear/conv): BN's only consumer
    unfused: list[tuple[str, str]] = field(default_factory=list)  # (bn, reason)

    def __len__(self) -> int:
        return len(self.after) + len(self.concat) + len(self.before)

    def config(self) -> dict[str, Any]:
        """The deploy-config entries (JSON); the two newer kinds only when present, so files
        without them stay as earlier versions wrote them."""
        cfg: dict[str, Any] = {"folds": [list(p) for p in self.after]}
        if self.concat:
            cfg["folds_concat"] = [[list(ps), bn] for ps, bn in self.concat]
        if self.before:
            cfg["folds_into_next"] = [list(p) for p in self.before]
        return cfg

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> Folds:
        return cls(
            after=[(p, bn) for p, bn in cfg.get("folds", [])],
            concat=[(list(ps), bn) for ps, bn in cfg.get("folds_concat", [])],
            before=[(bn, c) for bn, c in cfg.get("folds_into_next", [])],
        )

    def changed_outputs(self) -> list[str]:
        """Modules whose output differs between the training and the deploy model."""
        return [p for p, _ in self.after] + [p for ps, _ in self.concat for p in ps] + [bn for bn, _ in self.before]


def find_folds(model: nn.Module, input_shape: tuple[int, ...]) -> Folds:
    """Trace one forward pass of ``model`` on an ``input_shape`` input and classify every BN."""
    modules = dict(model.named_modules())
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    x = torch.randn(input_shape, dtype=dtype)
    trace = None
    for meta in (True, False):  # meta first (no compute); a data-dependent forward needs real tensors
        trace = _DataflowTrace(model)
        try:
            with trace:
                _run_forward(model, x, meta)
            break
        except Exception as e:
            if not meta:
                raise BadInput(f"model forward failed on a {tuple(input_shape)} input: {e}") from None
        finally:
            trace.close()
    assert trace is not None

    folds = Folds()
    for name, m in modules.items():
        if not is_bn(m):
            continue
        reason = _cannot_fold(name, m, trace)
        if reason:
            folds.unfused.append((name, reason))
            continue
        after, why_after = _fold_after(name, m, modules, trace)
        if isinstance(after, str):
            folds.after.append((after, name))
            continue
        if isinstance(after, list):
            folds.concat.append((after, name))
            continue
        consumer, why_before = _fold_before(name, m, modules, trace)
        if consumer is not None:
            folds.before.append((name, consumer))
        else:
            folds.unfused.append((name, f"{why_after}; {why_before}"))
    return folds


def find_pairs(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Return ([(producer, bn)] that fold into the layer before them, [(bn, reason)] that do not
    fold at all). See :func:`find_folds` for the folds across concatenations and into the next layer."""
    folds = find_folds(model, input_shape)
    return folds.after, folds.unfused


def _cannot_fold(name: str, bn: Any, trace: _DataflowTrace) -> str | None:
    """Why this BN cannot fold in any direction, or None."""
    if type(bn).__name__ not in _FOLDABLE_BN_NAMES:
        return f"{type(bn).__name__} has its own forward; not folded"
    if getattr(bn, "running_mean", None) is None or getattr(bn, "running_var", None) is None:
        return "no running statistics (track_running_stats=False): normalizes with batch stats"
    if trace.calls.get(name, 0) == 0:
        return "not used in the forward pass"
    if trace.calls[name] > 1:
        return "called more than once per forward pass"
    if trace.bn_input.get(name) is None:
        return "input is not a tensor"
    return None


def _plain_layer(producer: str, p: nn.Module, trace: _DataflowTrace) -> str | None:
    """Why conv/linear ``p`` cannot take a fold (None: it can)."""
    if trace.calls.get(producer, 0) != 1:
        return f"`{producer}` is called more than once per forward pass"
    if type(p).forward not in _PLAIN_FORWARDS and type(p).__name__ != "Conv2dSame":
        return f"`{producer}` is a {type(p).__name__}, not a plain linear convolution"
    return None


def _out_channels(p: nn.Module) -> int:
    return int(p.out_features if isinstance(p, nn.Linear) else cast(Any, p).out_channels)


def _only_use(t: Tensor, trace: _DataflowTrace, by: str) -> list[str]:
    """The module contexts other than ``by`` (and its children) that used ``t``."""
    return [u for u in trace.uses.get(id(t), []) if u != by and not u.startswith(by + ".")]


def _fold_after(
    name: str, bn: Any, modules: dict[str, nn.Module], trace: _DataflowTrace
) -> tuple[str | list[str] | None, str]:
    """The layer (str) or the concatenated convs (list) this BN folds into, else (None, why)."""
    x = trace.bn_input[name]
    outside = _only_use(x, trace, name)
    producer = trace.produced_by.get(id(x))
    if producer is None and id(x) in trace.cat_parts:
        return _fold_after_concat(name, bn, x, modules, trace, outside)
    if producer is None:
        op = trace.op_of.get(id(x))
        src = f" (it comes from `{op}`)" if op else ""
        return None, f"input is not the direct output of a conv/linear layer{src}"
    p = modules[producer]
    why = _plain_layer(producer, p, trace)
    if why:
        return None, why
    if outside:
        return None, f"`{producer}`'s output has other users ({outside[0] or 'top level'})"
    if isinstance(p, nn.Linear) and x.dim() != 2:
        return None, f"BN after `{producer}` normalizes a {x.dim()}-D input, not the linear's features"
    if bn.running_mean.numel() != _out_channels(p):
        return None, f"channel count differs from `{producer}`"
    return producer, ""


def _fold_after_concat(
    name: str, bn: Any, x: Tensor, modules: dict[str, nn.Module], trace: _DataflowTrace, outside: list[str]
) -> tuple[list[str] | None, str]:
    """A BN on ``cat([conv_a(...), conv_b(...), ...], dim=1)``: each channel slice folds into the
    conv that produced it, when every part is a conv's output used by nothing but this cat."""
    parts, dim = trace.cat_parts[id(x)]
    what = "input is a `cat`"
    if outside:
        return None, f"{what} whose result has other users ({outside[0] or 'top level'})"
    if dim != 1:
        return None, f"{what} along dim {dim}, not the channels"
    producers = []
    for i, t in enumerate(parts):
        producer = trace.produced_by.get(id(t))
        if producer is None:
            op = trace.op_of.get(id(t))
            src = f" (it comes from `{op}`)" if op else ""
            return None, f"{what} whose part {i} is not a conv/linear output{src}"
        p = modules[producer]
        why = _plain_layer(producer, p, trace)
        if why:
            return None, f"{what}: {why}"
        if len(trace.uses.get(id(t), [])) != 1 or producer in producers:
            return None, f"{what} whose part {i}, `{producer}`'s output, has other users"
        if isinstance(p, nn.Linear) and t.dim() != 2:
            return None, f"{what} of `{producer}`'s {t.dim()}-D outputs, not the linear's features"
        producers.append(producer)
    if sum(_out_channels(modules[p]) for p in producers) != bn.running_mean.numel():
        return None, f"{what} whose channel count differs from the BN's"
    return producers, ""


def _fold_before(name: str, bn: Any, modules: dict[str, nn.Module], trace: _DataflowTrace) -> tuple[str | None, str]:
    """The Linear (or unpadded conv) that is this BN's only consumer, else (None, why)."""
    act = [getattr(bn, a) for a in ("drop", "act") if isinstance(getattr(bn, a, None), nn.Module)]
    acting = [type(m).__name__ for m in act if not isinstance(m, nn.Identity)]
    if acting:
        return None, f"pre-activation: it applies its {acting[-1]} before the next layer"
    y = trace.bn_output.get(name)
    uses = trace.uses.get(id(y), []) if y is not None else []
    if y is None or not uses:
        return None, "its output is not used by a layer"
    ops = trace.use_ops.get(id(y), [])
    act_op = next((op for op in ops if op.rstrip("_") in _ACTIVATION_OPS), None)
    if act_op:  # in place (torchvision's ReLU(inplace=True)) or not: the layer after sees the activation
        return None, f"pre-activation: its output goes through `{act_op}` before any conv/linear"
    if len(uses) > 1:
        return None, f"its output has {len(uses)} users"
    consumer = uses[0]
    c = modules.get(consumer)
    if not isinstance(c, PRODUCERS) or trace.layer_input.get(consumer) is not y:
        return None, f"its output goes to `{ops[0] if ops else '?'}`, not straight into a linear or unpadded conv"
    why = _plain_layer(consumer, c, trace)
    if why:
        return None, why
    if isinstance(c, nn.modules.conv._ConvTransposeNd):
        return None, f"its output feeds `{consumer}`, a transposed conv (a fold into it is inexact at the borders)"
    if isinstance(c, nn.Linear):
        if y.dim() != 2:
            return None, f"it normalizes a {y.dim()}-D input of `{consumer}`, not the linear's features"
        cin = c.in_features
    else:
        if type(c).__name__ == "Conv2dSame":  # pads with zeros inside its forward ("same" padding)
            return None, f"its output feeds `{consumer}`, which pads with zeros (inexact at the borders)"
        # Reflect/replicate/circular padding repeats real inputs, which carry the BN's affine: exact.
        if c.padding_mode == "zeros" and c.padding != "valid" and any(c.padding):
            return None, (
                f"its output feeds `{consumer}`, a padded conv: the padding reads zeros where the unfolded "
                "model reads the BN's shift, so a fold into it is inexact at the borders"
            )
        cin = c.in_channels
    if bn.running_mean.numel() != cin:
        return None, f"channel count differs from `{consumer}`'s input"
    return consumer, ""


# --- folding ---------------------------------------------------------------------------------


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _after_fold(bn: Any) -> nn.Module:
    if hasattr(bn, "act"):
        return FoldedNormAct(getattr(bn, "drop", nn.Identity()), bn.act)
    return nn.Identity()


def _scale_shift(bn: Any, name: str) -> tuple[Tensor, Tensor]:
    return bn_scale_shift(
        bn.running_mean,
        bn.running_var,
        getattr(bn, "weight", None),
        getattr(bn, "bias", None),
        float(bn.eps),
        name=name,
    )


def _assign(p: nn.Module, w: Tensor, b: Tensor) -> None:
    dtype = cast(Tensor, p.weight).dtype
    p.weight = nn.Parameter(w.to(dtype), requires_grad=False)
    p.bias = nn.Parameter(b.to(dtype), requires_grad=False)


def _give_bias(p: nn.Module) -> None:
    if p.bias is None:
        p.bias = nn.Parameter(torch.empty(_out_channels(p), dtype=p.weight.dtype, device=p.weight.device))


def apply_folds(
    model: nn.Module,
    folds: Sequence[Sequence[str]],
    compute: bool,
    concat: Sequence[tuple[Sequence[str], str]] = (),
    before: Sequence[Sequence[str]] = (),
) -> None:
    """Fold each BN in ``model`` in place (``model`` is always a private copy): ``folds``
    (producer, bn) into the layer before it, ``concat`` ([producers], bn) slice by slice into
    the concatenated convs, ``before`` (bn, consumer) into the layer after it.

    ``compute=True`` computes the folded weights; ``False`` only makes the structure (for an
    empty model the deploy tensors are loaded into).
    """
    for producer, bn_name in folds:
        p: Any = model.get_submodule(producer)
        bn: Any = model.get_submodule(bn_name)
        if compute:
            scale, shift = _scale_shift(bn, bn_name)
            transposed = isinstance(p, nn.modules.conv._ConvTransposeNd)
            _assign(p, *fold_bn(p.weight, p.bias, scale, shift, transposed=transposed, groups=getattr(p, "groups", 1)))
        else:
            _give_bias(p)
        _set(model, bn_name, _after_fold(bn))
    for producers, bn_name in concat:
        bn = model.get_submodule(bn_name)
        start = 0
        if compute:
            scale, shift = _scale_shift(bn, bn_name)
        for producer in producers:
            p = model.get_submodule(producer)
            n = _out_channels(p)
            if compute:
                transposed = isinstance(p, nn.modules.conv._ConvTransposeNd)
                s, t = scale[start : start + n], shift[start : start + n]
                _assign(p, *fold_bn(p.weight, p.bias, s, t, transposed=transposed, groups=getattr(p, "groups", 1)))
            else:
                _give_bias(p)
            start += n
        _set(model, bn_name, _after_fold(bn))
    for bn_name, consumer in before:
        c: Any = model.get_submodule(consumer)
        bn = model.get_submodule(bn_name)
        if compute:
            scale, shift = _scale_shift(bn, bn_name)
            _assign(c, *fold_bn_into_next(c.weight, c.bias, scale, shift, groups=getattr(c, "groups", 1)))
        else:
            _give_bias(c)
        _set(model, bn_name, _after_fold(bn))


class ConvBnFuser(Fuser):
    name = "conv-bn"
    summary = "Any network: fold every BatchNorm into the conv/linear feeding it (timm models re-parameterized too)"

    def detect(self, ckpt: Checkpoint, options: Options) -> Plan:
        spec = options.model
        recorded = ckpt.extras.get("arch")
        if spec is None and isinstance(recorded, str):
            import timm

            if timm.is_model(recorded):
                spec = f"timm:{recorded}"
        if spec is None:
            raise NotThisArch(
                "no model definition: the checkpoint records no timm `arch`; "
                "pass --model timm:NAME or --model pkg.module:callable"
            )
        sd = ckpt.state_dict
        name = _timm_name(spec)
        if name is not None:
            return self._timm_plan(name, sd, options)
        if ":" not in spec:
            raise BadInput(f"--model {spec}: expected timm:NAME or pkg.module:callable")
        first = next((v for k, v in sd.items() if k.endswith("weight") and v.dim() >= 3), None)
        in_chans = int(first.shape[1]) if first is not None else 3
        return Plan(
            "conv-bn", options.variant or spec, "custom", {"model": spec, "kwargs": {}}, input_size=(in_chans, 224, 224)
        )

    def _timm_plan(self, name: str, sd: dict[str, Tensor], options: Options) -> Plan:
        import timm
        from timm.models import get_pretrained_cfg

        if not timm.is_model(name):
            raise BadInput(f"--model timm:{name}: timm {timm.__version__} has no model named `{name}`")
        cfg = get_pretrained_cfg(name)
        kwargs: dict[str, Any] = {}
        notes: list[str] = []
        classifier = getattr(cfg, "classifier", None) if cfg else None
        heads = [classifier] if isinstance(classifier, str) else list(classifier or [])  # LeViT: head, head_dist
        if heads and all(isinstance(h, str) for h in heads):
            w = next((sd[f"{h}.weight"] for h in heads if f"{h}.weight" in sd), None)
            kwargs["num_classes"] = int(w.shape[0]) if w is not None else 0
        first_conv = getattr(cfg, "first_conv", None) if cfg else None
        if isinstance(first_conv, str) and f"{first_conv}.weight" in sd:
            kwargs["in_chans"] = int(sd[f"{first_conv}.weight"].shape[1])
        size = tuple(cfg.input_size) if cfg and cfg.input_size else (3, 224, 224)
        input_size = (kwargs.get("in_chans", size[0]), size[1], size[2])
        return Plan(
            "conv-bn",
            options.variant or name,
            "timm",
            {"model": f"timm:{name}", "kwargs": kwargs},
            notes=notes,
            input_size=input_size,
            num_classes=kwargs.get("num_classes") or None,
        )

    def build_train(self, plan: Plan, state_dict: dict[str, Tensor]) -> nn.Module:
        return _build(plan.config, state_dict, f"{plan.config['model']}", plan.notes)

    def folded_modules(self, plan: Plan) -> list[str]:
        return list(plan.config.get("fused_modules", []))

    def fuse(self, plan: Plan, state_dict: dict[str, Tensor], train: nn.Module, done: Done | None = None) -> Fused:
        # All arithmetic (timm's re-parameterization included) on a float64 copy; cast once at the end.
        work = copy.deepcopy(train).to(torch.float64)
        config = dict(plan.config)
        counts = {"bn_folded": 0, "branch_merges": 0, "chain_merges": 0}
        if _timm_name(config["model"]) is not None and _reparam_candidates(work):
            before = set(work.state_dict())
            n_modules = len(_reparam_candidates(work))
            work = _timm_reparameterize(work, torch.float64)
            work = work.to(torch.float64)  # anything a fuse() still made in another dtype
            if set(work.state_dict()) != before:
                config["timm_reparam"] = True
                counts["timm_reparameterized"] = n_modules  # modules with fuse()/reparameterize()
        folds = find_folds(work, (1, *plan.input_size))
        apply_folds(work, folds.after, compute=True, concat=folds.concat, before=folds.before)
        counts["bn_folded"] = len(folds)
        if folds.concat:  # the directions beyond "into the layer before it", reported when they occur
            counts["bn_folded_across_concat"] = len(folds.concat)
        if folds.before:
            counts["bn_folded_into_next"] = len(folds.before)
        config.update(folds.config())
        config["fused_modules"] = folds.changed_outputs()
        dtype = float_dtype(state_dict)
        tensors = {
            k: (v.to(state_dict[k].dtype if k in state_dict else dtype) if v.is_floating_point() else v)
            .detach()
            .contiguous()
            for k, v in work.state_dict().items()
        }
        return Fused(tensors, config, counts, folds.unfused)

    def check_config(self, plan: Plan, model: str | None, where: str) -> None:
        cfg = plan.config
        spec, kwargs = cfg.get("model"), cfg.get("kwargs", {})
        pairs_ok = all(_str_lists(cfg.get(k, []), 2) is not None for k in ("folds", "folds_into_next"))
        concat = cfg.get("folds_concat", [])
        concat_ok = isinstance(concat, list) and all(
            isinstance(f, list) and len(f) == 2 and isinstance(f[1], str) and _str_lists(f[:1], None) is not None
            for f in concat
        )
        ok = (
            isinstance(spec, str)
            and isinstance(kwargs, dict)
            and set(kwargs) <= set(_TIMM_KWARGS)
            and all(type(v) is int for v in kwargs.values())
            and pairs_ok
            and concat_ok
            and isinstance(cfg.get("timm_reparam", False), bool)
        )
        if not ok:
            raise BadInput(f"{where}: conv-bn metadata is not one repfuse writes (model {spec!r}, kwargs {kwargs!r})")
        name = _timm_name(cast(str, spec))
        if name is None and spec != model:
            raise UnsafeCheckpoint(
                f"{where}: building this model imports and calls `{spec}`; pass --model {spec} "
                "(load_deploy(path, model=...)) if you trust that code"
            )
        if name is not None:
            import timm

            if not timm.is_model(name):
                raise BadInput(f"{where}: timm {timm.__version__} has no model named `{name}`")

    def build_deploy(self, plan: Plan) -> nn.Module:
        model = _build(plan.config, None, plan.config["model"])
        if plan.config.get("timm_reparam"):
            try:
                model = _timm_reparameterize(model)
            except RuntimeError:  # some timm blocks build their fused kernel on the CPU: no meta
                model = _timm_reparameterize(_construct(plan.config, "cpu"))
        folds = Folds.from_config(plan.config)
        apply_folds(model, folds.after, compute=False, concat=folds.concat, before=folds.before)
        return model.eval()

    def eval_transform(self, plan: Plan, ckpt: Checkpoint) -> EvalTransform:
        """timm models: timm's own data config (``resolve_data_config``: input size, interpolation,
        crop_pct, crop_mode, mean, std from the model's ``pretrained_cfg``), with what the
        checkpoint's timm train.py ``args`` record taking precedence. Other models: ImageNet
        defaults, with recorded args (``Fuser.eval_transform``)."""
        name = _timm_name(plan.config.get("model", ""))
        if name is None:
            return super().eval_transform(plan, ckpt)
        return timm_eval_transform(name, ckpt.args, plan.input_size[0])


def _str_lists(value: Any, length: int | None) -> list[list[str]] | None:
    """``value`` if it is a list of non-empty lists of strings (of ``length`` each, if given), else None."""
    if not isinstance(value, list):
        return None
    for f in value:
        if not (isinstance(f, list) and f and all(isinstance(n, str) for n in f)):
            return None
        if length is not None and len(f) != length:
            return None
    return value
