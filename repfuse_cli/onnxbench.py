"""Latency under onnxruntime (`repfuse bench --runtime onnxruntime`): the exported training graph
against the exported deploy graph on onnxruntime's CPU provider.

onnx and onnxruntime are imported inside functions only (see ``onnxgraph.py``).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .onnxcheck import ort_session
from .onnxgraph import (
    DEFAULT_OPSET,
    EXTERNAL_DATA_THRESHOLD,
    INPUT_NAME,
    OUTPUT_NAME,
    as_float32,
    check_opset,
    export_graph,
    initializer_bytes,
    require_onnx,
    runtime_name,
)
from .pipeline import Source

if TYPE_CHECKING:  # pragma: no cover
    from .benchmark import LatencyRow
    from .results import BenchReport


def _ort_median_ms(session: Any, x: Tensor, warmup: int, repeats: int) -> float:
    feed = {INPUT_NAME: x.numpy()}
    for _ in range(warmup):
        session.run([OUTPUT_NAME], feed)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run([OUTPUT_NAME], feed)
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


def bench_onnxruntime(
    train: nn.Module,
    deploy: nn.Module,
    input_size: tuple[int, int, int],
    *,
    batches: tuple[int, ...] = (1,),
    opset: int = DEFAULT_OPSET,
    warmup: int = 3,
    repeats: int = 10,
    seed: int = 0,
    threads: int | None = None,
) -> list[LatencyRow]:
    """Latency of the training graph against the deploy graph under onnxruntime (CPU provider,
    all graph optimizations on: it fuses Conv + BatchNormalization itself), per batch size.

    Both graphs are exported as ``repfuse export`` does (dynamic batch, float32) and run with
    ``threads`` intra-op threads (default: torch's thread count); medians of ``repeats`` runs
    after ``warmup``, the two graphs alternating per batch size.
    """
    require_onnx()
    import onnx

    from .benchmark import LatencyRow

    sessions = []
    with tempfile.TemporaryDirectory(prefix="repfuse-bench-") as tmp:
        for which, model in (("training", train), ("deploy", deploy)):
            m32, _ = as_float32(model)
            proto = export_graph(m32, input_size, opset=opset, dynamic_batch=True, which=which)
            path = Path(tmp) / f"{which}.onnx"
            big = initializer_bytes(proto) >= EXTERNAL_DATA_THRESHOLD
            onnx.save_model(proto, str(path), save_as_external_data=big, location=f"{which}.onnx.data")
            sessions.append(ort_session(path, threads))
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b in batches:
        x = torch.randn(b, *input_size, generator=g)
        t_ms = _ort_median_ms(sessions[0], x, warmup, repeats)
        d_ms = _ort_median_ms(sessions[1], x, warmup, repeats)
        rows.append(LatencyRow(b, "onnxruntime", round(t_ms, 4), round(d_ms, 4), round(t_ms / d_ms, 3)))
    return rows


def bench_file_onnxruntime(
    checkpoint: Source | str | Path,
    deploy_path: str | Path | None = None,
    *,
    batches: tuple[int, ...] = (1,),
    opset: int = DEFAULT_OPSET,
    warmup: int = 3,
    repeats: int = 10,
    **source: Any,
) -> BenchReport:
    """``repfuse bench --runtime onnxruntime``: ``commands.bench_file``'s report with rows of mode
    ``onnxruntime`` (the exported training graph against the exported deploy graph) and ``runtime``
    set. ``source``: :class:`~repfuse_cli.pipeline.Source`'s fields."""
    require_onnx()
    from .commands import load_pair
    from .results import BenchReport

    check_opset(opset)
    m = load_pair(Source.of(checkpoint, **source), deploy_path)
    c, h, w = m.plan.input_size
    threads = torch.get_num_threads()
    rows = bench_onnxruntime(
        m.train, m.deploy, (c, h, w), batches=batches, opset=opset, warmup=warmup, repeats=repeats, threads=threads
    )
    return BenchReport(
        checkpoint=str(m.ckpt.path),
        deploy=str(deploy_path) if deploy_path else "(fused in memory)",
        arch=m.plan.arch,
        variant=m.plan.variant,
        device="cpu (onnxruntime CPUExecutionProvider)",
        threads=threads,
        resolution=h,
        warmup=warmup,
        repeats=repeats,
        rows=rows,
        torch=torch.__version__,
        runtime=runtime_name(),
    )
