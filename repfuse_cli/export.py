"""Exporting a deploy model to ONNX, proven under onnxruntime before the file is kept.

    load -> (fuse) -> export (torch.onnx, dynamo) -> check -> stage -> run under onnxruntime
         -> compare with the training model -> move into place

The optional extra ``repfuse[onnx]`` (onnx, onnxruntime, onnxscript) is imported only here and in
the modules this one is built from (``onnxgraph.py``: the graph and the staged write;
``onnxcheck.py``: the proof; ``onnxbench.py``: latency), inside functions, so every other
command works without it. Like the pipeline, this module prints nothing and raises RepfuseError
subclasses (exit 2) for bad input and VerifyFailed (exit 1) when onnxruntime's outputs differ;
in both cases no file is left behind.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .errors import BadInput, VerifyFailed, first_line
from .onnxcheck import DescribedBatches, Inputs, ort_session, prove
from .onnxgraph import (
    DEFAULT_OPSET,
    EXTERNAL_DATA_THRESHOLD,
    INPUT_NAME,
    OUTPUT_NAME,
    StagedOnnx,
    as_float32,
    check_onnx_output,
    check_opset,
    export_graph,
    initializer_bytes,
    op_counts,
    require_onnx,
)
from .pipeline import Source
from .results import ExportResult
from .verification import check_tolerances

SEEDED_BATCH = 3  # the second batch size of the seeded check (the first is 1)

Step = Callable[[str], None]


def _noop(_: str) -> None:
    pass


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
