"""The other commands, on the pipeline's steps: ``verify`` (a deploy file against its training
checkpoint), ``inspect`` (what a file holds and what a conversion would do) and ``bench``
(training model against deploy model, latency). Like the pipeline, they print nothing."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import Checkpoint, check_finite, float_dtype, load_checkpoint, read_file
from .deployfile import DEPLOY_FORMAT, build_deploy_model, read_deploy
from .errors import BadInput, KeyMismatch, UnknownArch, VerifyFailed
from .fuser import Fuser, Plan
from .imagecheck import verify_folder
from .images import ImageOptions, is_folder, list_for
from .memory import releasing
from .pipeline import Source, ckpt_dtype, dtype_name, failure, fuse, names_of, prepare, seeded, unfused_of
from .registry import get_fuser
from .results import BenchReport, InspectReport, VerifyReport
from .verification import check_device, check_tolerances, load_inputs, looser, verify_models


@dataclass
class ModelPair:
    ckpt: Checkpoint
    fuser: Fuser
    plan: Plan
    train: nn.Module
    deploy: nn.Module
    deploy_plan: Plan
    notes: list[str]
    dtype: torch.dtype  # the weights' dtype whose tolerances apply (the looser of the two files')


def load_pair(src: Source, deploy_path: str | Path | None) -> ModelPair:
    """The training model of ``src`` and a deploy model: read from ``deploy_path`` (a repfuse
    file, or a plain deploy state_dict in the layout the fuser writes), or fused in memory when None."""
    ckpt = src.load()
    fuser, plan, train = prepare(ckpt, src)
    notes = list(plan.notes)
    if deploy_path is None:
        fused = fuse(fuser, plan, ckpt.state_dict, train, done=ckpt.release)
        deploy_plan, tensors, where = plan.with_config(fused.config), fused.tensors, f"{fuser.name} deploy model"
    else:
        path = Path(deploy_path)
        where = str(path)
        meta = read_file(path)[2] if path.name.endswith(".safetensors") else {}
        if meta.get("format") == DEPLOY_FORMAT:
            deploy_plan, tensors, meta = read_deploy(path, src.options.model)
            if meta.get("source_sha256") and meta["source_sha256"] != ckpt.sha256():
                notes.insert(0, f"{path.name} was converted from another file ({meta.get('source', '?')})")
            if (deploy_plan.arch, deploy_plan.variant) != (plan.arch, plan.variant):
                raise BadInput(
                    f"{path}: holds a {deploy_plan.arch} {deploy_plan.variant} model, "
                    f"{ckpt.path.name} a {plan.arch} {plan.variant}: not its deploy file"
                )
        else:  # a deploy state_dict from another tool: rebuild the deploy model our fuser would write
            tensors = load_checkpoint(path, trust=src.trust).state_dict
            deploy_plan = plan.with_config(fuser.fuse(plan, ckpt.state_dict, train).config)
        check_finite(tensors, path)
    dtype = looser(ckpt.dtype, float_dtype(tensors))
    if dtype != ckpt.dtype:
        notes.append(
            f"the deploy weights are {dtype_name(float_dtype(tensors))}, the checkpoint's {dtype_name(ckpt.dtype)}: "
            f"compared with {dtype_name(dtype)} tolerances"
        )
    deploy = build_deploy_model(get_fuser(deploy_plan.arch), deploy_plan, tensors, where)
    return ModelPair(ckpt, fuser, plan, train, deploy, deploy_plan, notes, dtype)


def bench_file(
    checkpoint: Source | str | Path,
    deploy_path: str | Path | None = None,
    *,
    batches: tuple[int, ...] = (1,),
    device: str = "cpu",
    compile: bool = False,
    warmup: int = 3,
    repeats: int = 10,
    layouts: bool = False,
    **source: Any,
) -> BenchReport:
    """Latency of the training model (eval) against the deploy model (``repfuse bench``).
    ``source``: :class:`Source`'s fields."""
    from .benchmark import bench_models

    check_device(device)
    m = load_pair(Source.of(checkpoint, **source), deploy_path)
    c, h, w = m.plan.input_size
    rows = bench_models(
        m.train, m.deploy, (c, h, w), batches=batches, device=device, compile=compile, warmup=warmup,
        repeats=repeats, layouts=layouts,
    )  # fmt: skip
    return BenchReport(
        checkpoint=str(m.ckpt.path),
        deploy=str(deploy_path) if deploy_path else "(fused in memory)",
        arch=m.plan.arch,
        variant=m.plan.variant,
        device=device if device == "cpu" else torch.cuda.get_device_name(device),
        threads=torch.get_num_threads(),
        resolution=h,
        warmup=warmup,
        repeats=repeats,
        rows=rows,
        torch=torch.__version__,
    )


def verify_files(
    checkpoint: Source | str | Path,
    deploy_path: str | Path,
    *,
    inputs: str | Path | None = None,
    batch: int = 4,
    seed: int = 0,
    atol: float | None = None,
    rtol: float | None = None,
    device: str = "cpu",
    images: ImageOptions | None = None,
    **source: Any,
) -> VerifyReport:
    """Check that DEPLOY computes what CHECKPOINT's training model computes.

    DEPLOY is a file repfuse wrote, or any deploy state_dict in the layout the fuser writes
    (e.g. the official VanillaNet/RepVGG converters' output). ``inputs``: a tensor file, or a
    folder of images run through the model's own evaluation transform (``images``: the image
    flags, see :class:`repfuse_cli.images.ImageOptions`). ``source``: :class:`Source`'s
    fields. Raises VerifyFailed (exit 1) when outputs differ beyond tolerance (or top-1
    agreement is below ``images.min_agreement``), naming where they diverge.
    """
    t0 = time.perf_counter()
    check_device(device)
    check_tolerances(atol, rtol)
    src = Source.of(checkpoint, **source)
    # bad inputs fail before any work
    folder = list_for(inputs, images) if inputs is not None and is_folder(inputs) else None
    x_labels = load_inputs(inputs) if inputs is not None and folder is None else None
    m = load_pair(src, deploy_path)
    labels = None
    if folder is not None:
        with releasing(m.train, m.ckpt.release):
            verified = verify_folder(
                m.train, m.deploy, m.fuser, m.plan, m.ckpt, folder, dtype=m.dtype, batch=batch, device=device,
                atol=atol, rtol=rtol, resolution=src.resolution, exclude=m.fuser.folded_modules(m.deploy_plan),
                options=images,
            )  # fmt: skip
    else:
        if x_labels is not None and inputs is not None:
            x, labels = x_labels
            desc = f"{x.shape[0]} images from {Path(inputs).name}" + (" with labels" if labels is not None else "")
        else:
            x, desc = seeded(batch, m.plan, seed)
        with releasing(m.train, m.ckpt.release):
            verified = verify_models(
                m.train, m.deploy, x, m.dtype, atol=atol, rtol=rtol, device=device, labels=labels,
                exclude=m.fuser.folded_modules(m.deploy_plan), inputs_desc=desc,
            )  # fmt: skip
    result = VerifyReport(
        checkpoint=str(m.ckpt.path),
        deploy=str(deploy_path),
        arch=m.plan.arch,
        variant=m.plan.variant,
        layout=m.plan.layout,
        key=m.ckpt.key,
        notes=m.notes,
        verify=verified,
        seconds=round(time.perf_counter() - t0, 3),
    )
    if not verified.passed:
        what = f"{deploy_path}: does not match {m.ckpt.path.name}"
        msg = f"{what}: {verified.images.failure()}" if verified.images else failure(what, verified, tolerance=False)
        raise VerifyFailed(msg, result=result.to_dict())
    return result


def verify(checkpoint: Source | str | Path, deploy_path: str | Path, **options: Any) -> dict[str, Any]:
    """:func:`verify_files` as a JSON-ready dict (the object ``repfuse verify --json`` prints)."""
    return verify_files(checkpoint, deploy_path, **options).to_dict()


def inspect(path: Source | str | Path, **source: Any) -> dict[str, Any]:
    """:func:`inspect_file` as a JSON-ready dict (the object ``repfuse inspect --json`` prints)."""
    return inspect_file(path, **source).to_dict()


def inspect_file(path: Source | str | Path, **source: Any) -> InspectReport:
    """What is in a file before anything is converted (the `repfuse inspect` report).
    ``source``: :class:`Source`'s fields."""
    src = Source.of(path, **source)
    ckpt = src.load()
    result = InspectReport(
        file=str(src.path),
        format=ckpt.format,
        size_bytes=src.path.stat().st_size,
        entries=ckpt.entries,
        key=ckpt.key,
        weight_keys=ckpt.weight_keys,
        epoch=ckpt.epoch,
        recorded_arch=ckpt.extras.get("arch") or ckpt.args.get("model"),
        dtype=ckpt_dtype(ckpt),
        tensors=len(ckpt.state_dict),
        stripped_prefixes=ckpt.stripped_prefixes,
    )
    warnings = result.warnings
    if ckpt.ema_keys and ckpt.key not in ckpt.ema_keys:
        warnings.append(
            f"EMA weights present ({', '.join(ckpt.ema_keys)}) but not the default; convert with --key to use them"
        )
    if ckpt.metadata.get("format") == DEPLOY_FORMAT:
        plan, tensors, _ = read_deploy(src.path, src.options.model)
        deploy = build_deploy_model(get_fuser(plan.arch), plan, tensors, str(src.path))
        result.mode, result.arch, result.variant, result.layout = "deploy (written by repfuse)", *names_of(plan)
        result.params = sum(p.numel() for p in deploy.parameters())
        result.source, result.repfuse_version = ckpt.metadata.get("source"), ckpt.metadata.get("repfuse_version")
        return result
    try:
        # Describing a file never stops at unfinished annealing: it is a warning here.
        fuser, plan, train = prepare(ckpt, src, options=dataclasses.replace(src.options, assume_annealed=True))
    except (UnknownArch, KeyMismatch) as e:  # nor on what the file lacks
        warnings.append(str(e))
        return result
    fused = fuse(fuser, plan, ckpt.state_dict, train)
    warnings.extend(plan.notes)
    result.mode, result.arch, result.variant, result.layout = "train", *names_of(plan)
    result.params = sum(p.numel() for p in train.parameters())
    result.would_fuse = {**fused.counts, "unfused": len(fused.unfused)}
    result.unfused = unfused_of(fused)
    deploy = build_deploy_model(fuser, plan.with_config(fused.config), fused.tensors, f"{fuser.name} deploy model")
    result.params_after = sum(p.numel() for p in deploy.parameters())
    return result
