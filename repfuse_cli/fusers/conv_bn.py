"""conv-bn: fold every BatchNorm into the convolution or linear layer that feeds it, for any model.

Pairs are found from the real dataflow of one forward pass, not from module order: a BN folds
into a conv/linear only when the BN's input *is* that layer's output tensor and nothing else
uses that tensor. timm models are first re-parameterized with timm's own
``reparameterize_model`` (RepVGG/MobileOne/FastViT/RepViT blocks), then BN-folded.

The deploy model is rebuilt anywhere from the metadata: construct the training model on the
meta device, re-parameterize if timm did, then apply the recorded folds structurally (give the
conv a bias, replace the BN by what it did after normalizing: nothing, or timm's drop+act).
"""

from __future__ import annotations

import copy
import importlib
import os
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

from ..checkpoint import Checkpoint, float_dtype, load_strict
from ..errors import BadInput, UnsafeCheckpoint
from ..fold import bn_scale_shift, fold_bn
from ..fuser import Done, Fused, Fuser, NotThisArch, Options, Plan
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


def _construct(config: dict[str, Any], device: str | torch.device) -> nn.Module:
    spec, kwargs = config["model"], config.get("kwargs", {})
    with torch.device(device):
        name = _timm_name(spec)
        if name is not None:
            import timm

            model = timm.create_model(name, pretrained=False, **kwargs)
        else:
            module_name, _, attr = spec.partition(":")
            if os.getcwd() not in sys.path:  # like `python -m`, modules in the working directory import
                sys.path.insert(0, os.getcwd())
            try:
                factory = getattr(importlib.import_module(module_name), attr)
            except (ImportError, AttributeError) as e:
                raise BadInput(f"--model {spec}: cannot import ({e})") from None
            model = factory(**kwargs)
            if not isinstance(model, nn.Module):
                raise BadInput(f"--model {spec}: returned a {type(model).__name__}, not an nn.Module")
    return model.eval()


def _has_unsaved_buffers(model: nn.Module) -> bool:
    saved = set(model.state_dict())
    return any(n not in saved for n, _ in model.named_buffers())


def _build(config: dict[str, Any], sd: dict[str, Tensor] | None, where: str) -> nn.Module:
    """Construct on the meta device (no initialisation cost) unless the model has buffers that are
    not in its state_dict (computed at init): those need a real construction."""
    model = _construct(config, "meta")
    if _has_unsaved_buffers(model):
        model = _construct(config, "cpu")
    if sd is not None:
        load_strict(model, sd, where)
    return model


def _reparam_candidates(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if n and any(hasattr(m, a) for a in _REPARAM_METHODS)]


def _timm_reparameterize(model: nn.Module) -> nn.Module:
    from timm.utils.model import reparameterize_model

    return reparameterize_model(model, inplace=True)


# --- finding conv -> BN pairs from the dataflow ------------------------------------------------


def _modules_by_id(model: nn.Module) -> dict[int, str]:
    return {id(m): n for n, m in model.named_modules()}


class _DataflowTrace(TorchFunctionMode):
    """Records, for every tensor, which module produced it and who used it, during one forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.names = _modules_by_id(model)
        self.stack: list[str] = []
        self.keep: list[Tensor] = []  # keeps traced tensors alive so their ids stay unique
        self.produced_by: dict[int, str] = {}  # tensor id -> producer module name
        self.op_of: dict[int, str] = {}  # tensor id -> name of the torch function that made it
        self.uses: dict[int, list[str]] = {}  # tensor id -> module contexts that used it
        self.bn_input: dict[str, Tensor] = {}
        self.calls: dict[str, int] = {}
        self.hooks = []
        for m in model.modules():
            self.hooks.append(m.register_forward_pre_hook(self._pre))
            self.hooks.append(m.register_forward_hook(self._post))

    def _pre(self, m, args):
        name = self.names[id(m)]
        self.calls[name] = self.calls.get(name, 0) + 1
        if is_bn(m) and args and isinstance(args[0], Tensor) and name not in self.bn_input:
            self.bn_input[name] = args[0]
            self.keep.append(args[0])
        self.stack.append(name)

    def _post(self, m, args, out):
        self.stack.pop()
        if isinstance(m, PRODUCERS) and isinstance(out, Tensor):
            self.produced_by.setdefault(id(out), self.names[id(m)])
            self.keep.append(out)

    def __torch_function__(self, func, types, args=(), kwargs=None):
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
        out = func(*args, **kwargs)
        if not metadata:
            for t in _tensors_in(out):
                self.op_of.setdefault(id(t), name)
                self.keep.append(t)
        return out

    def close(self):
        for h in self.hooks:
            h.remove()


def _tensors_in(obj) -> Iterator[Tensor]:
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


def find_pairs(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Return ([(producer, bn)] that fold exactly, [(bn, reason)] that do not)."""
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

    pairs, unfused = [], []
    for name, m in modules.items():
        if not is_bn(m):
            continue
        reason, producer = _why_not(name, m, modules, trace)
        if reason:
            unfused.append((name, reason))
        else:
            pairs.append((producer, name))
    return pairs, unfused


def _why_not(name: str, bn: nn.Module, modules: dict[str, nn.Module], trace: _DataflowTrace):
    if type(bn).__name__ not in _FOLDABLE_BN_NAMES:
        return f"{type(bn).__name__} has its own forward; not folded", None
    if getattr(bn, "running_mean", None) is None or getattr(bn, "running_var", None) is None:
        return "no running statistics (track_running_stats=False): normalizes with batch stats", None
    if trace.calls.get(name, 0) == 0:
        return "not used in the forward pass", None
    if trace.calls[name] > 1:
        return "called more than once per forward pass", None
    x = trace.bn_input.get(name)
    if x is None:
        return "input is not a tensor", None
    producer = trace.produced_by.get(id(x))
    if producer is None:
        op = trace.op_of.get(id(x))
        src = f" (it comes from `{op}`)" if op else ""
        return f"input is not the direct output of a conv/linear layer{src}", None
    p = modules[producer]
    if trace.calls.get(producer, 0) != 1:
        return f"`{producer}` is called more than once per forward pass", None
    if type(p).forward not in _PLAIN_FORWARDS and type(p).__name__ != "Conv2dSame":
        return f"`{producer}` is a {type(p).__name__}, not a plain linear convolution", None
    outside = [u for u in trace.uses.get(id(x), []) if u != name and not u.startswith(name + ".")]
    if outside:
        return f"`{producer}`'s output has other users ({outside[0] or 'top level'})", None
    if isinstance(p, nn.Linear) and x.dim() != 2:
        return f"BN after `{producer}` normalizes a {x.dim()}-D input, not the linear's features", None
    out_ch = p.out_features if isinstance(p, nn.Linear) else p.out_channels
    if bn.running_mean.numel() != out_ch:
        return f"channel count differs from `{producer}`", None
    return None, producer


# --- folding ---------------------------------------------------------------------------------


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _after_fold(bn: nn.Module) -> nn.Module:
    if hasattr(bn, "act"):
        return FoldedNormAct(getattr(bn, "drop", nn.Identity()), bn.act)
    return nn.Identity()


def apply_folds(model: nn.Module, folds: list[list[str]], compute: bool) -> None:
    """Fold each (producer, bn) in ``model`` in place (``model`` is always a private copy).

    ``compute=True`` computes the folded weights; ``False`` only makes the structure (for an
    empty model the deploy tensors are loaded into).
    """
    for producer, bn_name in folds:
        p, bn = model.get_submodule(producer), model.get_submodule(bn_name)
        if compute:
            scale, shift = bn_scale_shift(
                bn.running_mean,
                bn.running_var,
                getattr(bn, "weight", None),
                getattr(bn, "bias", None),
                float(bn.eps),
                name=bn_name,
            )
            transposed = isinstance(p, nn.modules.conv._ConvTransposeNd)
            w, b = fold_bn(p.weight, p.bias, scale, shift, transposed=transposed, groups=getattr(p, "groups", 1))
            dtype = p.weight.dtype
            p.weight = nn.Parameter(w.to(dtype), requires_grad=False)
            p.bias = nn.Parameter(b.to(dtype), requires_grad=False)
        elif p.bias is None:
            n = p.out_features if isinstance(p, nn.Linear) else p.out_channels
            p.bias = nn.Parameter(torch.empty(n, dtype=p.weight.dtype, device=p.weight.device))
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
        notes = []
        classifier = getattr(cfg, "classifier", None) if cfg else None
        if isinstance(classifier, str):
            w = sd.get(f"{classifier}.weight")
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
        return _build(plan.config, state_dict, f"{plan.config['model']}")

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
            work = _timm_reparameterize(work)
            if set(work.state_dict()) != before:
                config["timm_reparam"] = True
                counts["timm_reparameterized"] = n_modules  # modules with fuse()/reparameterize()
        pairs, unfused = find_pairs(work, (1, *plan.input_size))
        apply_folds(work, [list(p) for p in pairs], compute=True)
        counts["bn_folded"] = len(pairs)
        config["folds"] = [list(p) for p in pairs]
        config["fused_modules"] = [p for p, _ in pairs]
        dtype = float_dtype(state_dict)
        tensors = {
            k: (v.to(state_dict[k].dtype if k in state_dict else dtype) if v.is_floating_point() else v)
            .detach()
            .contiguous()
            for k, v in work.state_dict().items()
        }
        return Fused(tensors, config, counts, unfused)

    def check_config(self, plan: Plan, model: str | None, where: str) -> None:
        cfg = plan.config
        spec, kwargs = cfg.get("model"), cfg.get("kwargs", {})
        folds = cfg.get("folds", [])
        ok = (
            isinstance(spec, str)
            and isinstance(kwargs, dict)
            and set(kwargs) <= set(_TIMM_KWARGS)
            and all(type(v) is int for v in kwargs.values())
            and isinstance(folds, list)
            and all(isinstance(f, list) and len(f) == 2 and all(isinstance(n, str) for n in f) for f in folds)
            and isinstance(cfg.get("timm_reparam", False), bool)
        )
        if not ok:
            raise BadInput(f"{where}: conv-bn metadata is not one repfuse writes (model {spec!r}, kwargs {kwargs!r})")
        name = _timm_name(spec)
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
        apply_folds(model, plan.config.get("folds", []), compute=False)
        return model.eval()
