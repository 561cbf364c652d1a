"""Deploy speed: latency of the training model (eval) against the deploy model on this machine.

Method: for each batch size, both models get the same input; each is warmed up, then run
``repeats`` times; the median wall time is reported (CUDA: measured with CUDA events after
synchronizing). Models alternate per batch size so that drift in machine load hits both.
TF32 is off on CUDA, so both models do the same float32 arithmetic; cudnn.benchmark is on.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .verification import exact_float32


@dataclass
class LatencyRow:
    batch: int
    mode: str  # "eager", "fast-layout", "channels-last" or "compiled"
    train_ms: float
    deploy_ms: float
    speedup: float  # train_ms / deploy_ms

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _time_once(model: nn.Module, x: torch.Tensor, device: str) -> float:
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        model(x)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    model(x)
    return (time.perf_counter() - t0) * 1000.0


def median_latency(model: nn.Module, x: torch.Tensor, device: str, warmup: int, repeats: int) -> float:
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return statistics.median(_time_once(model, x, device) for _ in range(repeats))


def bench_models(
    train: nn.Module,
    deploy: nn.Module,
    input_size: tuple[int, int, int],
    *,
    batches: tuple[int, ...] = (1,),
    device: str = "cpu",
    compile: bool = False,
    warmup: int = 3,
    repeats: int = 10,
    seed: int = 0,
    layouts: bool = False,
) -> list[LatencyRow]:
    """Latency rows (eager; with ``layouts`` the deploy model in ``layout.fast_layout`` and both
    models channels_last with a channels_last input; compiled if asked) for each batch size.

    The models are moved to ``device`` in float32 (a copy is not made: pass models you own).
    """
    with exact_float32(cudnn_benchmark=True):
        return _bench(train, deploy, input_size, batches, device, compile, warmup, repeats, seed, layouts)


def _bench(
    train: nn.Module,
    deploy: nn.Module,
    input_size: tuple[int, int, int],
    batches: tuple[int, ...],
    device: str,
    compile: bool,
    warmup: int,
    repeats: int,
    seed: int,
    layouts: bool,
) -> list[LatencyRow]:
    train = train.to(device=device, dtype=torch.float32).eval()
    deploy = deploy.to(device=device, dtype=torch.float32).eval()
    plain = torch.contiguous_format
    variants: list[tuple[str, nn.Module, nn.Module, torch.memory_format]] = [("eager", train, deploy, plain)]
    if layouts:  # the deploy model in the layout measured fastest, and both models channels_last
        from .layout import fast_layout

        variants.append(("fast-layout", train, fast_layout(deploy), plain))
        last = torch.channels_last
        variants.append(("channels-last", copy.deepcopy(train).to(memory_format=last),
                         copy.deepcopy(deploy).to(memory_format=last), last))  # fmt: skip
    if compile:
        compiled = (torch.compile(train), torch.compile(deploy))
        variants.append(("compiled", *compiled, plain))  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(seed)
    rows = []
    for mode, t, d, fmt in variants:
        for b in batches:
            x = torch.randn(b, *input_size, generator=g).to(device).contiguous(memory_format=fmt)
            t_ms = median_latency(t, x, device, warmup, repeats)
            d_ms = median_latency(d, x, device, warmup, repeats)
            rows.append(LatencyRow(b, mode, round(t_ms, 4), round(d_ms, 4), round(t_ms / d_ms, 3)))
    return rows
