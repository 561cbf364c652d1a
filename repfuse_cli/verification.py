"""Proof that two models compute the same function: seeded inputs, max abs/rel diffs, and
when they disagree, the first shared module boundary whose output diverges."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .errors import BadInput, first_line

if TYPE_CHECKING:  # pragma: no cover
    from .imagecheck import ImageResult

# Default tolerances per checkpoint dtype: (atol, rtol). A result passes when
# max|train - deploy| <= atol + rtol * max|train| (differences relative to the output's scale).
# Half-precision models are compared computing in float32, so what is measured is the error
# of the fused weights, not of CPU half kernels.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (1e-6, 1e-4),
    torch.float16: (1e-4, 1e-2),
    torch.bfloat16: (1e-3, 5e-2),
}


@dataclass
class VerifyResult:
    max_abs_diff: float
    max_rel_diff: float  # max |a - b| / max |a|
    cosine: float
    top1_agreement: float | None  # classifiers only
    passed: bool
    atol: float
    rtol: float
    dtype: str  # the checkpoint dtype
    compute_dtype: str
    device: str
    inputs: str  # what the models were run on
    diverges_at: str | None = None  # first shared module whose output differs (on failure)
    accuracy_train: float | None = None  # with labelled inputs
    accuracy_deploy: float | None = None
    images: ImageResult | None = None  # --inputs DIR: the image folder's figures (repfuse_cli.images)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_tolerances(atol: float | None, rtol: float | None) -> None:
    """BadInput unless each given tolerance is finite and >= 0 (checked before any work)."""
    for name, v in (("atol", atol), ("rtol", rtol)):
        if v is not None and not (math.isfinite(v) and v >= 0):
            raise BadInput(f"--{name} {v}: tolerances must be finite and >= 0")


def looser(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """Of two weight dtypes, the one with the larger default tolerance (float16 over float32)."""
    return max(a, b, key=lambda d: TOLERANCES.get(d, TOLERANCES[torch.float32])[1])


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def seeded_inputs(batch: int, input_size: tuple[int, int, int], seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *input_size, generator=g)


def _state(model: nn.Module, dtype: torch.dtype, device: str) -> dict[str, Tensor]:
    out = {}
    for n, t in list(model.named_parameters()) + list(model.named_buffers()):
        out[n] = t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)
    return out


def run(model: nn.Module, x: Tensor, dtype: torch.dtype, device: str = "cpu") -> Tensor:
    """Forward ``model`` on ``x`` in ``dtype`` on ``device`` without modifying the module."""
    with torch.inference_mode():
        return functional_call(model, _state(model, dtype, device), (x.to(device=device, dtype=dtype),))


@contextmanager
def exact_float32(cudnn_benchmark: bool | None = None) -> Iterator[None]:
    """Inside: no TF32 on CUDA (matmuls and convolutions do real float32 arithmetic, which any
    comparison or fair timing needs), and cudnn.benchmark as given (None: unchanged). The
    global flags are restored on the way out."""
    flags: tuple[Any, Any] = (torch.backends.cuda.matmul, torch.backends.cudnn)  # cudnn's flags are untyped
    saved = (flags[0].allow_tf32, flags[1].allow_tf32, flags[1].benchmark)
    flags[0].allow_tf32 = flags[1].allow_tf32 = False
    if cudnn_benchmark is not None:
        flags[1].benchmark = cudnn_benchmark
    try:
        yield
    finally:
        flags[0].allow_tf32, flags[1].allow_tf32, flags[1].benchmark = saved


def compare_outputs(a: Tensor, b: Tensor) -> tuple[float, float, float, float | None]:
    a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
    diff = (a64 - b64).abs().max().item()
    scale = a64.abs().max().item()
    rel = diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
    cos = torch.nn.functional.cosine_similarity(a64.flatten(), b64.flatten(), dim=0).item()
    top1 = None
    if a64.dim() == 2 and a64.shape[1] > 1:
        top1 = (a64.argmax(1) == b64.argmax(1)).double().mean().item()
    return diff, rel, cos, top1


def boundaries(train: nn.Module, deploy: nn.Module, exclude: Iterable[str] = ()) -> list[str]:
    """Module names both models share (minus ``exclude``): where their outputs must agree."""
    excluded = set(exclude)
    d = dict(deploy.named_modules())
    return [n for n, _ in train.named_modules() if n and n in d and n not in excluded]


def _capture(
    model: nn.Module, names: list[str], x: Tensor, dtype: torch.dtype, device: str
) -> tuple[list[str], dict[str, Tensor]]:
    order: list[str] = []
    outs: dict[str, Tensor] = {}
    modules = dict(model.named_modules())
    hooks = []
    for n in names:

        def hook(_m: nn.Module, _i: Any, out: Any, n: str = n) -> None:
            if n not in outs and isinstance(out, Tensor):
                outs[n] = out.detach().double().cpu()
                order.append(n)

        hooks.append(modules[n].register_forward_hook(hook))
    try:
        run(model, x, dtype, device)
    finally:
        for h in hooks:
            h.remove()
    return order, outs


def locate_divergence(
    train: nn.Module,
    deploy: nn.Module,
    x: Tensor,
    dtype: torch.dtype,
    atol: float,
    rtol: float,
    device: str = "cpu",
    exclude: Iterable[str] = (),
) -> str | None:
    """Where the outputs first differ beyond tolerance: the outermost shared block that
    diverges, and inside it the first shared module (in execution order), e.g.
    ``"stages.1 (first at stages.1.pool)"``. None if every shared boundary agrees."""
    names = boundaries(train, deploy, exclude)
    order, a = _capture(train, names, x, dtype, device)
    _, b = _capture(deploy, names, x, dtype, device)

    def differs(n: str) -> bool:
        if n not in b or a[n].shape != b[n].shape:
            return False
        return (a[n] - b[n]).abs().max().item() > atol + rtol * a[n].abs().max().item()

    first = next((n for n in order if differs(n)), None)
    if first is None:
        return None
    ancestors = [n for n in order if first.startswith(n + ".") and differs(n)]
    block = min(ancestors, key=len) if ancestors else None
    return f"{block} (first at {first})" if block else first


def check_device(device: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N`` (with a GPU present); BadInput otherwise."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise BadInput(f"--device {device}: expected cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BadInput(f"--device {device}: no CUDA device is available here")
    return device


def _forward_train(model: nn.Module, x: Tensor, dtype: torch.dtype, device: str) -> Tensor:
    try:
        return run(model, x, dtype, device)
    except (RuntimeError, ValueError, IndexError) as e:  # inputs the network cannot take
        raise BadInput(f"the training model cannot run on inputs of shape {tuple(x.shape)}: {first_line(e)}") from None


def verify_models(
    train: nn.Module,
    deploy: nn.Module,
    x: Tensor,
    dtype: torch.dtype,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    device: str = "cpu",
    labels: Tensor | None = None,
    exclude: Iterable[str] = (),
    inputs_desc: str = "",
) -> VerifyResult:
    """Run both models on ``x``; pass when max|a-b| <= atol + rtol*max|a|."""
    check_tolerances(atol, rtol)
    d_atol, d_rtol = TOLERANCES.get(dtype, TOLERANCES[torch.float32])
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    cdt = compute_dtype(dtype)
    with exact_float32():
        a = _forward_train(train, x, cdt, device)
        b = run(deploy, x, cdt, device)  # the deploy model failing where the training model ran is a bug
        if a.shape != b.shape:
            raise BadInput(
                f"the deploy model's output has shape {tuple(b.shape)}, the training model's "
                f"{tuple(a.shape)}: not a deploy model of this checkpoint"
            )
        diff, rel, cos, top1 = compare_outputs(a, b)
        scale = a.detach().abs().max().item()
        passed = bool(diff <= atol + rtol * scale) and bool(torch.isfinite(b).all())
        where = None if passed else locate_divergence(train, deploy, x, cdt, atol, rtol, device, exclude)
    acc_a = acc_b = None
    if labels is not None and a.dim() == 2:
        if labels.numel() and int(labels.max()) >= a.shape[1]:
            n = a.shape[1]
            raise BadInput(f"labels go up to {int(labels.max())}, but the model has {n} classes (0-{n - 1})")
        lab = labels.to(a.device)
        acc_a = (a.argmax(1) == lab).double().mean().item()
        acc_b = (b.argmax(1) == lab).double().mean().item()
    return VerifyResult(
        max_abs_diff=diff,
        max_rel_diff=rel,
        cosine=cos,
        top1_agreement=top1,
        passed=passed,
        atol=atol,
        rtol=rtol,
        dtype=str(dtype).replace("torch.", ""),
        compute_dtype=str(cdt).replace("torch.", ""),
        device=device,
        inputs=inputs_desc,
        diverges_at=where,
        accuracy_train=acc_a,
        accuracy_deploy=acc_b,
    )


def load_inputs(path: str | Path) -> tuple[Tensor, Tensor | None]:
    """Images (N, C, H, W) and optional labels from a .pt, .npy or .safetensors file.

    .pt / .safetensors may hold one tensor or ``images`` (and ``labels``) entries; .pt is read
    with ``weights_only=True``; .npy with ``allow_pickle=False``.
    """
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: no such inputs file")
    try:
        if path.suffix == ".npy":
            import numpy as np

            obj: Any = torch.from_numpy(np.load(path, allow_pickle=False))
        elif path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(path)
        elif path.suffix in (".pt", ".pth"):
            obj = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise BadInput(f"{path}: inputs must be .pt, .npy or .safetensors")
    except BadInput:
        raise
    except Exception as e:
        raise BadInput(f"{path}: cannot read inputs ({first_line(e, 160)})") from None
    labels = None
    if isinstance(obj, dict):
        if "images" not in obj and len(obj) != 1:
            raise BadInput(f"{path}: expected one tensor or an `images` entry (found {', '.join(map(str, obj))})")
        labels = obj.get("labels")
        obj = obj["images"] if "images" in obj else next(iter(obj.values()))
    if not isinstance(obj, Tensor) or obj.dim() != 4 or not obj.is_floating_point() or obj.shape[0] == 0:
        raise BadInput(f"{path}: images must be a float tensor of shape (N, C, H, W) with N >= 1")
    if not torch.isfinite(obj).all():
        raise BadInput(f"{path}: images hold NaN or inf")
    if labels is not None and (
        not isinstance(labels, Tensor)
        or labels.shape != obj.shape[:1]
        or labels.is_floating_point()
        or labels.is_complex()
        or (labels < 0).any()
    ):
        raise BadInput(f"{path}: labels must be non-negative integers of shape ({obj.shape[0]},)")
    return obj.float(), labels
