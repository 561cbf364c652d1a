"""What each command returns, typed: one dataclass per result and one ``to_dict()`` each.

The JSON the CLI prints (``--json``), the dicts the Python API returns and the rich tables
(``report.py``) all come from these objects, so the schema lives here and nowhere else.
A field that has no meaning for a given input is None (null), never absent.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .benchmark import LatencyRow
from .stats import ModelStats
from .verification import VerifyResult


def _plain(obj: Any) -> Any:
    """Dataclasses (and the lists/dicts holding them) as JSON-ready values, field order kept."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


class Result:
    """Base of the typed results: ``to_dict()`` is the JSON object the CLI prints."""

    def to_dict(self) -> dict[str, Any]:
        out = _plain(self)
        assert isinstance(out, dict)
        return out


@dataclass
class Unfused(Result):
    """A module a conversion leaves in the deploy model, and why."""

    module: str
    reason: str


@dataclass
class ConversionResult(Result):
    """``repfuse convert`` / ``repfuse_cli.convert``."""

    input: str
    output: str | None  # None when nothing was written (no write, or verification failed)
    arch: str
    variant: str
    layout: str
    key: str | None
    weight_keys: list[str]
    ema_available: list[str]
    stripped_prefixes: list[str]
    dtype: str
    resolution: int
    params_before: int | None
    params_after: int | None
    flops_before: int | None
    flops_after: int | None
    bn_folded: int
    fused: dict[str, int]
    unfused: list[Unfused]
    notes: list[str]
    before: ModelStats | None  # None when the report was not counted (--quiet)
    after: ModelStats | None
    verify: VerifyResult | None  # None with --no-verify
    repfuse_version: str
    seconds: float | None = None


@dataclass
class VerifyReport(Result):
    """``repfuse verify`` / ``repfuse_cli.verify``."""

    checkpoint: str
    deploy: str
    arch: str
    variant: str
    layout: str
    key: str | None
    notes: list[str]
    verify: VerifyResult
    seconds: float | None = None


@dataclass
class InspectReport(Result):
    """``repfuse inspect`` / ``repfuse_cli.inspect``: what a file holds, before converting."""

    file: str
    format: str
    size_bytes: int
    entries: dict[str, str]
    key: str | None
    weight_keys: list[str]
    epoch: int | None
    recorded_arch: str | None
    dtype: str
    tensors: int
    stripped_prefixes: list[str]
    warnings: list[str] = field(default_factory=list)
    mode: str = "unknown"  # "train", "deploy (written by repfuse)" or "unknown"
    arch: str | None = None
    variant: str | None = None
    layout: str | None = None
    params: int | None = None
    params_after: int | None = None  # train mode: after a conversion
    would_fuse: dict[str, int] | None = None  # train mode: the fuser's counts and `unfused`
    unfused: list[Unfused] | None = None  # train mode
    source: str | None = None  # deploy mode: the file it was converted from
    repfuse_version: str | None = None  # deploy mode: the repfuse that wrote it


@dataclass
class BenchReport(Result):
    """``repfuse bench``: latency of the training model against the deploy model."""

    checkpoint: str
    deploy: str
    arch: str
    variant: str
    device: str
    threads: int
    resolution: int
    warmup: int
    repeats: int
    rows: list[LatencyRow]
    torch: str
    runtime: str = "torch"  # "torch", or e.g. "onnxruntime 1.32.0" (`--runtime onnxruntime`: exported graphs)


@dataclass
class OnnxCheck(Result):
    """One comparison of ``repfuse export``'s proof: onnxruntime on the written graph against PyTorch."""

    inputs: str
    batch: int
    max_abs_diff: float
    max_rel_diff: float
    passed: bool
    error: str | None = None  # why onnxruntime could not run the graph on these (well-formed) inputs


@dataclass
class OnnxVerifyResult(VerifyResult):
    """``verify``'s figures for the graph, over all checks (``diverges_at`` is always None: a graph
    has no module boundaries), plus the runtime and each check."""

    runtime: str = ""  # e.g. "onnxruntime 1.32.0"
    checks: list[OnnxCheck] = field(default_factory=list)


@dataclass
class ExportResult(Result):
    """``repfuse export`` / ``repfuse_cli.export.export``."""

    input: str  # the source file (training checkpoint or repfuse deploy file)
    deploy: str | None  # the DEPLOY file whose weights were exported; None: fused in memory, or the source
    output: str | None  # the .onnx written; None when verification failed
    data_file: str | None  # external data beside it (models near protobuf's 2 GB limit), else None
    arch: str
    variant: str
    layout: str
    key: str | None
    source_kind: str  # "checkpoint" or "deploy file"
    dtype: str  # the source weights' dtype
    export_dtype: str  # always "float32"
    input_name: str  # "input"
    output_name: str  # "output"
    input_shape: list[int | str]  # e.g. ["batch", 3, 224, 224]
    output_shape: list[int | str]
    opset: int
    dynamic_batch: bool
    ops_before: dict[str, int] | None  # the training model exported the same way; None for a deploy file alone
    ops_after: dict[str, int]
    nodes_before: int | None
    nodes_after: int
    bytes: int  # the .onnx plus its external data
    external_data: bool
    verify: OnnxVerifyResult
    metadata: dict[str, str]  # the ONNX metadata props written
    notes: list[str]
    exporter: str
    repfuse_version: str
    seconds: float | None = None
