"""The proof under onnxruntime: run the exported graph and the PyTorch reference on the same
inputs (seeded, then any given ones) and compare them with verify's tolerance rule.

onnxruntime is imported inside functions only (see ``onnxgraph.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import BadInput, first_line
from .onnxgraph import INPUT_NAME, OUTPUT_NAME, one_line, runtime_name
from .results import OnnxCheck, OnnxVerifyResult
from .verification import TOLERANCES, check_tolerances, compare_outputs, run, seeded_inputs


@dataclass
class DescribedBatches:
    """Extra inputs as batches of (N, C, H, W), with what they are for the report."""

    desc: str
    batches: Iterable[Tensor]


Inputs = Tensor | Iterable[Tensor] | DescribedBatches | str | Path | None


def ort_session(path: Path | str, threads: int | None = None) -> Any:
    """An onnxruntime CPU session on the file at ``path`` (its external data read beside it)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads or torch.get_num_threads()
    so.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise BadInput(f"{runtime_name()} cannot load the exported graph: {one_line(e)}") from None


def ort_run(session: Any, x: Tensor) -> Tensor:
    try:
        (y,) = session.run([OUTPUT_NAME], {INPUT_NAME: x.detach().float().contiguous().numpy()})
    except Exception as e:
        raise BadInput(
            f"{runtime_name()} cannot run the graph on inputs of shape {tuple(x.shape)}: {one_line(e)}"
        ) from None
    return torch.from_numpy(y)


def _batches(inputs: Inputs, input_size: tuple[int, int, int]) -> tuple[str, Iterator[Tensor]] | None:
    """The extra inputs as (description, batches of (N, C, H, W))."""
    if inputs is None:
        return None
    if isinstance(inputs, (str, Path)):
        path = Path(inputs)
        if path.is_dir():
            raise BadInput(f"--inputs {path}: an image folder needs a training checkpoint as SOURCE (export_file)")
        from .verification import load_inputs

        x, _ = load_inputs(path)
        return f"{x.shape[0]} images from {path.name}", iter([x])
    if isinstance(inputs, DescribedBatches):
        return inputs.desc, iter(inputs.batches)
    if isinstance(inputs, Tensor):
        return f"{inputs.shape[0]} given inputs", iter([inputs])
    return "given input batches", iter(inputs)


def _check_shape(x: Tensor, input_size: tuple[int, int, int]) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point() or x.shape[0] == 0:
        raise BadInput("inputs must be float tensors of shape (N, C, H, W) with N >= 1")
    if tuple(x.shape[1:]) != tuple(input_size):
        c, h, w = input_size
        raise BadInput(
            f"inputs are {'x'.join(map(str, x.shape[1:]))}, the graph takes {c}x{h}x{w}"
            + (f"; pass --resolution {x.shape[2]}" if x.shape[2] == x.shape[3] and x.shape[1] == c else "")
        )
    if not torch.isfinite(x).all():
        raise BadInput("inputs hold NaN or inf")
    return x.float()


def _static_chunks(x: Tensor, batch: int) -> Iterator[tuple[Tensor, int]]:
    """``x`` in pieces of exactly ``batch`` rows (the last one padded with zeros), with each piece's real row count."""
    for i in range(0, x.shape[0], batch):
        piece = x[i : i + batch]
        n = piece.shape[0]
        if n < batch:
            piece = torch.cat([piece, piece.new_zeros(batch - n, *piece.shape[1:])])
        yield piece, n


def prove(
    session: Any,
    reference: nn.Module,
    input_size: tuple[int, int, int],
    *,
    dtype: torch.dtype,
    dynamic_batch: bool,
    batch: int,
    seed: int = 0,
    inputs: Inputs = None,
    atol: float | None = None,
    rtol: float | None = None,
    reference_name: str = "training model",
) -> tuple[OnnxVerifyResult, list[OnnxCheck]]:
    """Run the graph and ``reference`` (float32, eval, PyTorch) on the same inputs and compare with
    verify's rule: max|ref - onnx| <= atol + rtol * max|ref|, per check and overall.

    Seeded inputs at batch 1 and ``batch`` (dynamic graph; two sizes, so a broken batch axis
    fails), or twice at the static ``batch`` (seeds ``seed`` and ``seed + 1``); then ``inputs``.
    """
    check_tolerances(atol, rtol)
    d_atol, d_rtol = TOLERANCES.get(dtype, TOLERANCES[torch.float32])
    if dtype == torch.float64:  # the graph computes in float32
        d_atol, d_rtol = TOLERANCES[torch.float32]
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    c, h, w = input_size
    if dynamic_batch:
        if batch < 2:
            raise BadInput(f"--batch {batch}: a dynamic batch is checked at batch 1 and at --batch N, with N >= 2")
        seeded = [(seeded_inputs(1, input_size, seed), seed), (seeded_inputs(batch, input_size, seed + 1), seed + 1)]
    else:
        seeded = [(seeded_inputs(batch, input_size, s), s) for s in (seed, seed + 1)]
    checks: list[OnnxCheck] = []
    refs: list[Tensor] = []
    outs: list[Tensor] = []

    def compare(x: Tensor, desc: str, rows: int | None = None) -> None:
        try:
            a = run(reference, x, torch.float32)
        except (RuntimeError, ValueError, IndexError) as e:  # inputs the network itself cannot take
            raise BadInput(
                f"the PyTorch {reference_name} cannot run on inputs of shape {tuple(x.shape)}: {first_line(e)}"
            ) from None
        try:
            b = ort_run(session, x)
        except BadInput as e:  # the graph fails where the model runs (e.g. a batch axis fixed by mistake)
            checks.append(OnnxCheck(desc, x.shape[0], math.inf, math.inf, False, str(e)))
            return
        if rows is not None:
            a, b = a[:rows], b[:rows]
        if a.shape != b.shape:
            why = f"output shape {tuple(b.shape)}, expected {tuple(a.shape)}"
            checks.append(OnnxCheck(desc, x.shape[0], math.inf, math.inf, False, why))
            return
        diff, rel, _, _ = compare_outputs(a, b)
        ok = bool(diff <= atol + rtol * a.abs().max().item()) and bool(torch.isfinite(b).all())
        checks.append(OnnxCheck(desc, x.shape[0], diff, rel, ok))
        refs.append(a.flatten(1) if a.dim() > 1 else a[:, None])
        outs.append(b.flatten(1) if b.dim() > 1 else b[:, None])

    for x, s in seeded:
        compare(x, f"seeded random normal, batch {x.shape[0]}, {c}x{h}x{w}, seed {s}")
    descs = [f"seeded random normal, batch {'1 and ' + str(batch) if dynamic_batch else batch}, {c}x{h}x{w}"]
    given = _batches(inputs, input_size)
    if given is not None:
        desc, batches = given
        descs.append(desc)
        for x in batches:
            x = _check_shape(x, input_size)
            if dynamic_batch:
                compare(x, f"{desc}: batch of {x.shape[0]}")
            else:
                for piece, n in _static_chunks(x, batch):
                    compare(piece, f"{desc}: batch of {n}", rows=n)
    passed = all(ch.passed for ch in checks)
    if refs and all(r.shape[1:] == refs[0].shape[1:] for r in refs):
        a, b = torch.cat(refs), torch.cat(outs)
        diff, rel, cos, top1 = compare_outputs(a, b)
    else:
        diff = max(ch.max_abs_diff for ch in checks)
        rel = max(ch.max_rel_diff for ch in checks)
        cos, top1 = float("nan"), None
    result = OnnxVerifyResult(
        max_abs_diff=max(ch.max_abs_diff for ch in checks) if checks else diff,
        max_rel_diff=max(ch.max_rel_diff for ch in checks) if checks else rel,
        cosine=cos,
        top1_agreement=top1,
        passed=passed,
        atol=atol,
        rtol=rtol,
        dtype=str(dtype).replace("torch.", ""),
        compute_dtype="float32",
        device=f"cpu ({runtime_name()}, CPUExecutionProvider) vs the PyTorch {reference_name}",
        inputs=", ".join(descs) + f", seed {seed}",
        diverges_at=None,  # a graph has no module boundaries to locate a divergence at
        runtime=runtime_name(),
        checks=checks,
    )
    return result, checks
