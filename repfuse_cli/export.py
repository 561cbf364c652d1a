"""Exporting a deploy model to ONNX, proven under onnxruntime before the file is kept.

    load -> (fuse) -> export (torch.onnx, dynamo) -> check -> stage -> run under onnxruntime
         -> compare with the training model -> move into place

The optional extra ``repfuse[onnx]`` (onnx, onnxruntime, onnxscript) is imported here only,
inside functions, so every other command works without it. Like the pipeline, this module
prints nothing and raises RepfuseError subclasses (exit 2) for bad input and VerifyFailed
(exit 1) when onnxruntime's outputs differ; in both cases no file is left behind.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import io
import os
import re
import shutil
import statistics
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from . import __version__
from .errors import BadInput, OutputError, RepfuseError, VerifyFailed, first_line
from .pipeline import Source
from .results import ExportResult, OnnxCheck, OnnxVerifyResult
from .verification import TOLERANCES, check_tolerances, compare_outputs, run, seeded_inputs

if TYPE_CHECKING:  # pragma: no cover
    import onnx

    from .benchmark import LatencyRow
    from .results import BenchReport

# The packages `repfuse[onnx]` installs: (import name, pip name).
ONNX_PACKAGES = (("onnx", "onnx"), ("onnxruntime", "onnxruntime"), ("onnxscript", "onnxscript"))
INSTALL_HINT = "pip install 'repfuse[onnx]'"
DEFAULT_OPSET = 20  # torch 2.14's exporter default
MIN_OPSET = 18  # the dynamo exporter silently writes 18 when asked for less
# protobuf cannot serialize a message of 2 GiB or more; leave room for the graph itself.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26
INPUT_NAME, OUTPUT_NAME = "input", "output"
SEEDED_BATCH = 3  # the second batch size of the seeded check (the first is 1)

Step = Callable[[str], None]


@dataclass
class DescribedBatches:
    """Extra inputs as batches of (N, C, H, W), with what they are for the report."""

    desc: str
    batches: Iterable[Tensor]


Inputs = Tensor | Iterable[Tensor] | DescribedBatches | str | Path | None


def _noop(_: str) -> None:
    pass


class MissingExtra(BadInput):
    """An optional dependency (the `repfuse[onnx]` extra) is not installed."""


def require_onnx() -> None:
    """Import-check the `repfuse[onnx]` extra; MissingExtra (exit 2) names the first missing package."""
    for module, pip_name in ONNX_PACKAGES:
        try:
            importlib.import_module(module)
        except ImportError:
            raise MissingExtra(
                f"repfuse export needs the `{pip_name}` package, which is not installed: {INSTALL_HINT}"
            ) from None


def runtime_name() -> str:
    import onnxruntime

    return f"onnxruntime {onnxruntime.__version__}"


# ---------------------------------------------------------------------------------------------
# Export


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_OP = re.compile(r"OpOverload\(op='([\w.]+)'|target=torch\.ops\.([\w.]+?)(?:\.default)?[(\s,]|aten::(\w+)")


def exporter_failure(e: BaseException, which: str) -> BadInput:
    """One line for an exporter failure: the first op it names (best effort) and its own message."""
    texts: list[str] = []
    cur: BaseException | None = e
    while cur is not None and len(texts) < 8:
        texts.append(_ANSI.sub("", str(cur)))
        cur = cur.__cause__ or cur.__context__
    text = "\n".join(texts)
    m = _OP.search(text)
    op = next((g for g in m.groups() if g), None) if m else None
    summary = None
    for line in text.splitlines():  # the exporter's own summary: "<class '...DispatchError'>: No ONNX function ..."
        line = line.strip()
        if line.startswith("<class "):
            summary = re.sub(r"^<class '[\w.]*?(\w+)'>:\s*", r"\1: ", line)
            break
    msg = (summary or first_line(e, 300))[:300]
    where = f" on `{op}`" if op else ""
    if re.search(r"Constraints violated|specializ", text):
        msg += " (the batch dimension could not stay dynamic: try --static-batch)"
    return BadInput(f"the ONNX exporter failed{where} while exporting the {which} model: {msg}")


def _one_line(e: BaseException, limit: int = 300) -> str:
    """An exception's first non-empty line without terminal colour codes."""
    lines = [line.strip() for line in _ANSI.sub("", str(e)).splitlines() if line.strip()]
    return (lines[0] if lines else type(e).__name__)[:limit]


@contextlib.contextmanager
def _silenced() -> Iterator[None]:
    """No exporter chatter: its progress lines on stdout, its logged warnings and tracebacks."""
    import logging

    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR + 10)
        with (
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels, strict=True):
            lg.setLevel(lv)


def as_float32(model: nn.Module) -> tuple[nn.Module, bool]:
    """``model`` in eval mode with float32 weights: itself if it already is, else a converted copy
    (the caller's module is never changed). Also returns whether a conversion happened."""
    floats = [t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()]
    convert = any(t.dtype != torch.float32 for t in floats)
    if not convert and not model.training:
        return model, False
    model = copy.deepcopy(model)
    if convert:
        model = model.float()
    return model.eval(), convert


def export_graph(
    model: nn.Module,
    input_size: tuple[int, int, int],
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    batch: int = 1,
    which: str = "deploy",
) -> onnx.ModelProto:
    """``model`` (float32, eval) as an in-memory ONNX model: torch's recommended exporter
    (``dynamo=True``), input ``input`` (N, C, H, W) with N dynamic or ``batch``, output ``output``.

    BadInput (exit 2) when the exporter fails (naming the op) or writes another opset than asked.
    """
    import onnx

    check_opset(opset)
    # A dynamic dimension is traced at 2: a size-1 example would be specialized by torch.export.
    x = torch.zeros(2 if dynamic_batch else batch, *input_size)
    dynamic_shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    try:
        with _silenced(), torch.no_grad():
            program = torch.onnx.export(
                model,
                (x,),
                None,
                dynamo=True,
                verbose=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=dynamic_shapes,
                external_data=False,
                optimize=True,
            )
        if program is None:  # only when writing to a file, which we do not
            raise RuntimeError("torch.onnx.export returned no program")
        proto = program.model_proto
    except RepfuseError:
        raise
    except Exception as e:  # the exporter's errors have no common base class worth trusting
        raise exporter_failure(e, which) from None
    written = graph_opset(proto)
    if written != opset:
        raise BadInput(
            f"--opset {opset}: the exporter wrote opset {written} instead; choose an opset it writes "
            f"({MIN_OPSET} to {onnx.defs.onnx_opset_version()})"
        )
    if [i.name for i in proto.graph.input] != [INPUT_NAME] or not proto.graph.output:
        raise BadInput(
            f"the {which} model's ONNX graph does not have exactly one input (it has "
            f"{len(proto.graph.input)}): repfuse exports single-image-tensor models"
        )
    return proto


def check_opset(opset: int) -> None:
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise BadInput(
            f"--opset {opset}: the exporter writes opsets {MIN_OPSET} to {newest} (asked for less, it "
            f"silently writes {MIN_OPSET}); choose one of those"
        )


def graph_opset(proto: onnx.ModelProto) -> int | None:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def op_counts(proto: onnx.ModelProto) -> dict[str, int]:
    """Nodes of the graph by op type (local functions and subgraphs counted where they are used)."""
    functions = {(f.domain, f.name): f for f in proto.functions}
    counts: Counter[str] = Counter()

    def walk(nodes: Iterable[Any], depth: int = 0) -> None:
        for n in nodes:
            f = functions.get((n.domain, n.op_type))
            if f is not None and depth < 16:
                walk(f.node, depth + 1)
                continue
            counts[n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"] += 1
            for a in n.attribute:
                if a.HasField("g"):
                    walk(a.g.node, depth + 1)
                for g in a.graphs:
                    walk(g.node, depth + 1)

    walk(proto.graph.node)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def initializer_bytes(proto: onnx.ModelProto) -> int:
    from onnx.helper import tensor_dtype_to_np_dtype

    total = 0
    for t in proto.graph.initializer:
        n = 1
        for d in t.dims:
            n *= d
        total += n * tensor_dtype_to_np_dtype(t.data_type).itemsize
    return total


# ---------------------------------------------------------------------------------------------
# Staged write: a hidden directory beside the output holds the file(s) under their final names;
# after the proof, the external data (if any) is moved into place first and the .onnx last.


def data_name(out: Path) -> str:
    return out.name + ".data"


def check_onnx_output(out: Path, sources: Iterable[Path], force: bool) -> None:
    """Fail early, before any work, if ``out`` (or its external data file) cannot or must not be written."""
    for src in sources:
        if out.exists() and src.exists() and out.resolve() == src.resolve():
            raise OutputError(f"{out}: output would overwrite an input; choose another -o")
    if not out.name.endswith(".onnx") or out.name == ".onnx":
        raise OutputError(f"{out}: the ONNX file's name must end in .onnx")
    if out.is_dir():
        raise OutputError(f"{out}: output is a directory")
    if out.exists() and not out.is_file():
        raise OutputError(f"{out}: output exists and is not a regular file")
    if out.exists() and not force:
        raise OutputError(f"{out}: output exists; pass --force to overwrite it")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"{out}: output directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{out}: output directory {parent} is not writable")


class StagedOnnx:
    """An ONNX model saved into a hidden temp directory beside ``out``, under ``out``'s own name
    (so the .onnx's reference to its external data already names the final data file).

    ``commit()`` moves the data file into place first and the .onnx last (the .onnx appearing is
    the commit); ``discard()`` removes everything, including a data file moved before a failed
    .onnx move.
    """

    def __init__(self, proto: onnx.ModelProto, out: Path, force: bool, external_data: bool):
        import onnx

        self.out, self.force, self.external = out, force, external_data
        parent = out.parent if str(out.parent) else Path(".")
        self.data_out = parent / data_name(out)
        if external_data and self.data_out.exists() and not force:
            raise OutputError(f"{self.data_out}: external data file exists; pass --force to overwrite it")
        try:
            self.dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent))
        except OSError as e:
            raise OutputError(f"{out}: cannot create a file in {parent} ({first_line(e)}); nothing written") from None
        self.path = self.dir / out.name
        self.data_path = self.dir / data_name(out)
        self._placed_data = False
        self._state = "staged"
        try:
            if external_data:
                onnx.save_model(
                    proto,
                    str(self.path),
                    save_as_external_data=True,
                    all_tensors_to_one_file=True,
                    location=self.data_path.name,
                    size_threshold=1024,
                    convert_attribute=False,
                )
            else:
                onnx.save_model(proto, str(self.path))
            for p in (self.data_path, self.path):  # the data first, then the graph that refers to it
                if p.exists():
                    _fsync(p)
                    p.chmod(0o644)
        except OSError as e:
            self.discard()
            raise OutputError(f"{out}: cannot write the ONNX file ({first_line(e)}); nothing written") from None
        except BaseException:
            self.discard()
            raise

    @property
    def bytes(self) -> int:
        return sum(p.stat().st_size for p in (self.path, self.data_path) if p.exists())

    def commit(self) -> None:
        if self._state != "staged":
            raise RuntimeError(f"StagedOnnx.commit after it was {self._state}")
        try:
            if self.data_path.exists():
                _place(self.data_path, self.data_out, self.force)
                self._placed_data = True
            _place(self.path, self.out, self.force)
            self._state = "committed"
        finally:
            self.discard()

    def discard(self) -> None:
        if self._state == "staged":
            if self._placed_data:  # the .onnx never appeared: its data must not stay either
                self.data_out.unlink(missing_ok=True)
            self._state = "discarded"
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> StagedOnnx:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _place(tmp: Path, out: Path, force: bool) -> None:
    appeared = OutputError(f"{out}: appeared while exporting; nothing written")
    try:
        if force:
            if out.exists() and not out.is_file():
                raise appeared
            os.replace(tmp, out)
            return
        try:
            os.link(tmp, out)  # refuses, atomically, if something appeared at `out`
        except FileExistsError:
            raise appeared from None
        except OSError:  # no hard links here: check, then rename
            if out.exists():
                raise appeared from None
            os.replace(tmp, out)
            return
        tmp.unlink(missing_ok=True)
    except OSError as e:
        raise OutputError(f"{out}: cannot move the ONNX file into place ({first_line(e)}); nothing written") from None


# ---------------------------------------------------------------------------------------------
# Proof under onnxruntime


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
        raise BadInput(f"{runtime_name()} cannot load the exported graph: {_one_line(e)}") from None


def ort_run(session: Any, x: Tensor) -> Tensor:
    try:
        (y,) = session.run([OUTPUT_NAME], {INPUT_NAME: x.detach().float().contiguous().numpy()})
    except Exception as e:
        raise BadInput(
            f"{runtime_name()} cannot run the graph on inputs of shape {tuple(x.shape)}: {_one_line(e)}"
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
    import math

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


# ---------------------------------------------------------------------------------------------
# The export, end to end


def _shape(value_info: Any) -> list[int | str]:
    return [d.dim_param if d.dim_param else d.dim_value for d in value_info.type.tensor_type.shape.dim]


def export_model(
    deploy: nn.Module,
    output: str | Path,
    *,
    input_size: tuple[int, int, int],
    reference: nn.Module | None = None,
    train: nn.Module | None = None,
    dtype: torch.dtype | None = None,
    opset: int = DEFAULT_OPSET,
    static_batch: bool = False,
    batch: int | None = None,
    inputs: Inputs = None,
    seed: int = 0,
    atol: float | None = None,
    rtol: float | None = None,
    force: bool = False,
    metadata: dict[str, str] | None = None,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    info: dict[str, Any] | None = None,
    on_step: Step = _noop,
) -> ExportResult:
    """Export ``deploy`` to ``output`` (.onnx), proven under onnxruntime against ``reference``
    (default: ``train``, else ``deploy`` itself in PyTorch) before the file is moved into place.

    ``train``: the training model, exported the same way (in memory) for ``ops_before``;
    ``dtype``: the source weights' dtype (default: ``deploy``'s; it sets the default tolerances;
    non-float32 models are exported as float32 and the result says so); ``batch``: the second seeded batch size
    (dynamic; default 3) or the fixed batch (``static_batch``; default 1); ``inputs``: extra
    inputs (a tensor, an iterable of (N, C, H, W) tensors, or a .pt/.npy/.safetensors file);
    ``external_data_threshold``: initializer bytes from which weights go to ``<output>.data``;
    ``metadata``: ONNX metadata props; ``info``: fields for the result (arch, variant, ...).
    Raises BadInput/OutputError (exit 2) and VerifyFailed (exit 1); nothing is left on failure.
    """
    require_onnx()
    import onnx

    t0 = time.perf_counter()
    out = Path(output)
    check_opset(opset)
    check_onnx_output(out, [], force)
    info = dict(info or {})
    notes: list[str] = list(info.pop("notes", []))
    batch = batch or (1 if static_batch else SEEDED_BATCH)
    if batch < 1:
        raise BadInput(f"--batch {batch}: must be >= 1")

    on_step("export")
    if dtype is None:
        floats = (t.dtype for t in [*deploy.parameters(), *deploy.buffers()] if t.is_floating_point())
        dtype = next(floats, torch.float32)
    deploy32, _ = as_float32(deploy)
    if dtype != torch.float32:
        notes.append(
            f"{str(dtype).replace('torch.', '')} weights exported as float32 "
            "(onnxruntime's CPU provider cannot verify a half-precision graph well)"
        )
    proto = export_graph(deploy32, input_size, opset=opset, dynamic_batch=not static_batch, batch=batch)
    ops_after = op_counts(proto)
    for k, v in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, str(v)
    input_shape, output_shape = _shape(proto.graph.input[0]), _shape(proto.graph.output[0])
    external = initializer_bytes(proto) >= external_data_threshold

    ops_before = None
    if train is not None:
        on_step("export training graph")
        train32, _ = as_float32(train)
        try:
            ops_before = op_counts(
                export_graph(
                    train32, input_size, opset=opset, dynamic_batch=not static_batch, batch=batch, which="training"
                )
            )
        except BadInput as e:  # the deploy graph is what ships; say why the comparison is missing
            notes.append(f"no op counts for the training model: {e}")
        del train32

    with StagedOnnx(proto, out, force, external) as staged:
        del proto  # the file is the graph from here on
        on_step("check")
        try:
            onnx.checker.check_model(str(staged.path), full_check=True)
        except Exception as e:
            raise BadInput(f"the exported graph fails onnx.checker: {first_line(e, 300)}") from None
        on_step("verify")
        session = ort_session(staged.path)
        ref = reference if reference is not None else (train if train is not None else deploy32)
        ref_name = "training model" if (reference is not None or train is not None) else "deploy model"
        ref32 = ref if not ref.training else copy.deepcopy(ref).eval()  # `run` computes in float32 itself
        verify, checks = prove(
            session,
            ref32,
            input_size,
            dtype=dtype,
            dynamic_batch=not static_batch,
            batch=batch,
            seed=seed,
            inputs=inputs,
            atol=atol,
            rtol=rtol,
            reference_name=ref_name,
        )
        del session
        size = staged.bytes
        result = ExportResult(
            input=str(info.pop("input", "")),
            deploy=info.pop("deploy", None),
            output=str(out),
            data_file=str(staged.data_out) if external else None,
            arch=info.pop("arch", ""),
            variant=info.pop("variant", ""),
            layout=info.pop("layout", ""),
            key=info.pop("key", None),
            source_kind=info.pop("source_kind", "model"),
            dtype=str(dtype).replace("torch.", ""),
            export_dtype="float32",
            input_name=INPUT_NAME,
            output_name=OUTPUT_NAME,
            input_shape=input_shape,
            output_shape=output_shape,
            opset=opset,
            dynamic_batch=not static_batch,
            ops_before=ops_before,
            ops_after=ops_after,
            nodes_before=sum(ops_before.values()) if ops_before is not None else None,
            nodes_after=sum(ops_after.values()),
            bytes=size,
            external_data=external,
            verify=verify,
            metadata=dict(metadata or {}),
            notes=notes,
            exporter=f"torch.onnx.export(dynamo=True), torch {torch.__version__}",
            repfuse_version=__version__,
        )
        if not verify.passed:
            result.output = result.data_file = None
            failed = next(c for c in checks if not c.passed)
            detail = f"; on {failed.inputs}: {failed.error}" if failed.error else ""
            result.seconds = round(time.perf_counter() - t0, 3)
            raise VerifyFailed(
                f"{out}: onnxruntime's outputs differ from the PyTorch {ref_name}: max abs diff "
                f"{verify.max_abs_diff:.3g}, max rel diff {verify.max_rel_diff:.3g} (tolerance atol "
                f"{verify.atol:g}, rtol {verify.rtol:g}){detail}; no file written",
                result=result.to_dict(),
            )
        on_step("save")
        staged.commit()
    result.seconds = round(time.perf_counter() - t0, 3)
    return result


def _deploy_file_metadata(path: Path) -> dict[str, str] | None:
    """A repfuse deploy file's metadata, or None if ``path`` is not one."""
    if not path.name.endswith(".safetensors") or not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # unreadable: let the checkpoint loader say why
        return None
    from .pipeline import DEPLOY_FORMAT

    return meta if meta.get("format") == DEPLOY_FORMAT else None


def export_file(
    source: Source | str | Path,
    output: str | Path,
    deploy: str | Path | None = None,
    *,
    opset: int = DEFAULT_OPSET,
    static_batch: bool = False,
    batch: int | None = None,
    inputs: Inputs = None,
    seed: int = 0,
    atol: float | None = None,
    rtol: float | None = None,
    force: bool = False,
    compare_training: bool = True,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    on_step: Step = _noop,
    **source_fields: Any,
) -> ExportResult:
    """``repfuse export SOURCE [DEPLOY] -o OUT.onnx``.

    SOURCE is a training checkpoint (fused in memory with ``convert``'s detection and refusals,
    or, with DEPLOY, the weights of that deploy file; either way compared with the checkpoint's
    training model) or a deploy file repfuse wrote (compared with its PyTorch deploy model).
    ``source_fields``: :class:`~repfuse_cli.pipeline.Source`'s (arch, key, options, trust,
    resolution). ``compare_training``: also export the training model for ``ops_before``.
    """
    require_onnx()
    from .checkpoint import check_finite, file_sha256, float_dtype
    from .commands import load_pair
    from .deployfile import build_deploy_model, read_deploy
    from .pipeline import at_resolution
    from .registry import get_fuser

    src_spec = Source.of(source, **source_fields)
    src, out = src_spec.path, Path(output)
    check_opset(opset)
    check_tolerances(atol, rtol)
    check_onnx_output(out, [src] + ([Path(deploy)] if deploy else []), force)
    on_step("load")
    meta = _deploy_file_metadata(src)
    train = None
    extra: dict[str, str]
    if meta is not None:
        if deploy is not None:
            raise BadInput(f"{src}: is a deploy file; give a training checkpoint with DEPLOY, or the deploy file alone")
        plan, tensors, meta = read_deploy(src, src_spec.options.model)
        check_finite(tensors, src)
        plan = at_resolution(plan, src_spec.resolution)
        model = build_deploy_model(get_fuser(plan.arch), plan, tensors, str(src))
        dtype = float_dtype(tensors)
        notes: list[str] = []
        key = meta.get("source_key") or None
        source_kind = "deploy file"
        sha = file_sha256(src)
        extra = {"checkpoint_source": meta.get("source", ""), "checkpoint_sha256": meta.get("source_sha256", "")}
    else:
        pair = load_pair(src_spec, deploy)
        plan, model, train, dtype = pair.plan, pair.deploy, pair.train, pair.dtype
        notes, key, source_kind = list(pair.notes), pair.ckpt.key, "checkpoint"
        sha = pair.ckpt.sha256()
        extra = {"deploy_sha256": file_sha256(Path(deploy))} if deploy is not None else {}
        if inputs is not None and isinstance(inputs, (str, Path)) and Path(inputs).is_dir():
            # an image folder, through the family's own evaluation transform at the graph's size
            from .images import batches as image_batches
            from .images import list_images, resolve_transform

            folder = list_images(inputs, num_classes=plan.num_classes)
            t = resolve_transform(pair.fuser, plan, pair.ckpt, resolution=plan.input_size[1])
            inputs = DescribedBatches(
                f"{len(folder.files)} images from {Path(inputs).name}/ ({t.source})",
                (b.x for b in image_batches(folder, t, 32, channels=plan.input_size[0])),
            )
    metadata = {
        "repfuse_version": __version__,
        "source": src.name,
        "source_sha256": sha,
        "arch": plan.arch,
        "variant": plan.variant,
        "layout": plan.layout,
        "key": key or "",
        "dtype": str(dtype).replace("torch.", ""),
        **({"deploy": Path(deploy).name} if deploy is not None else {}),
        **extra,
    }
    info = {
        "input": str(src),
        "deploy": str(deploy) if deploy is not None else None,
        "arch": plan.arch,
        "variant": plan.variant,
        "layout": plan.layout,
        "key": key,
        "source_kind": source_kind,
        "notes": notes,
    }
    return export_model(
        model,
        out,
        input_size=(plan.input_size[0], plan.input_size[1], plan.input_size[2]),
        reference=train,
        train=train if compare_training else None,
        dtype=dtype,
        opset=opset,
        static_batch=static_batch,
        batch=batch,
        inputs=inputs,
        seed=seed,
        atol=atol,
        rtol=rtol,
        force=force,
        metadata=metadata,
        external_data_threshold=external_data_threshold,
        info=info,
        on_step=on_step,
    )


def export(source: str | Path, output: str | Path, deploy: str | Path | None = None, **options: Any) -> dict[str, Any]:
    """:func:`export_file`, returning the JSON-ready dict (the object ``repfuse export --json`` prints).

    Example::

        from repfuse_cli.export import export
        res = export("checkpoint.pth", "model.onnx", arch="repvgg")
        res["ops_before"]["BatchNormalization"], res["ops_after"].get("BatchNormalization", 0)
    """
    options.pop("quiet", None)
    return export_file(source, output, deploy, **options).to_dict()


# ---------------------------------------------------------------------------------------------
# Latency under onnxruntime (`repfuse bench --runtime onnxruntime`)


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
