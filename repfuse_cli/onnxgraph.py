"""The ONNX graph: the `repfuse[onnx]` extra, torch's exporter, op counts and opsets, the staged .onnx write.

Used by ``export.py`` (the command's flow), ``onnxcheck.py`` (the proof under onnxruntime) and
``onnxbench.py``. onnx and onnxruntime are imported inside functions only, so importing this
module (or any other repfuse module) never loads them; only these four modules use them at all.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import io
import os
import re
import shutil
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import BadInput, OutputError, RepfuseError, first_line

if TYPE_CHECKING:  # pragma: no cover
    import onnx

# The packages `repfuse[onnx]` installs: (import name, pip name).
ONNX_PACKAGES = (("onnx", "onnx"), ("onnxruntime", "onnxruntime"), ("onnxscript", "onnxscript"))
INSTALL_HINT = "pip install 'repfuse[onnx]'"
DEFAULT_OPSET = 20  # torch 2.14's exporter default
MIN_OPSET = 18  # the dynamo exporter silently writes 18 when asked for less
# protobuf cannot serialize a message of 2 GiB or more; leave room for the graph itself.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26
INPUT_NAME, OUTPUT_NAME = "input", "output"


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


def one_line(e: BaseException, limit: int = 300) -> str:
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
