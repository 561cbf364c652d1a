"""The conversion pipeline, in one place a reader can follow:

    load -> detect -> build -> fuse -> verify -> report -> save

Everything the CLI does is a call into this module; it prints nothing and raises
RepfuseError subclasses (with exit codes) for bad input and VerifyFailed when the numbers
don't match. No output file is written unless verification passed. The deploy-file format
is in ``deployfile.py``, the memory and I/O overlap in ``memory.py``, the typed results in
``results.py``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import __version__
from .checkpoint import Checkpoint, check_finite, load_checkpoint
from .deployfile import (
    DEPLOY_FORMAT,
    build_deploy_model,
    check_output,
    default_output,
    deploy_metadata,
    stage_deploy,
)
from .errors import BadInput, UnknownArch, VerifyFailed, first_line
from .fold import standard_layout
from .fuser import Done, Fused, Fuser, NotThisArch, Options, Plan
from .imagecheck import verify_folder
from .images import ImageOptions, is_folder, list_for
from .memory import StagedWrite, in_background, releasing
from .registry import all_fusers, get_fuser
from .results import ConversionResult, Unfused
from .stats import model_stats
from .verification import (
    VerifyResult,
    check_tolerances,
    load_inputs,
    seeded_inputs,
    verify_models,
)

Step = Callable[[str], None]


def _noop(_: str) -> None:
    pass


@dataclass(frozen=True)
class Source:
    """A training checkpoint and how to read it: what every command starts from.

    ``arch``: "auto", a fuser name or "timm:NAME"; ``key``: the entry holding the weights;
    ``options``: variant/model/assume_annealed; ``trust``: unpickle arbitrary code (dangerous);
    ``resolution``: square input size for verification, FLOPs and conv-bn's trace.
    """

    path: Path
    arch: str = "auto"
    key: str | None = None
    options: Options = field(default_factory=Options)
    trust: bool = False
    resolution: int | None = None

    @classmethod
    def of(cls, path: Source | str | Path, **kw: Any) -> Source:
        """``path`` as a Source; keyword arguments (Source's fields) override, None options -> defaults."""
        if kw.get("options") is None:
            kw.pop("options", None)
        if isinstance(path, Source):
            return dataclasses.replace(path, **kw)
        return cls(Path(path), **kw)

    def load(self) -> Checkpoint:
        return load_checkpoint(self.path, key=self.key, trust=self.trust)


def detect(ckpt: Checkpoint, arch: str = "auto", options: Options | None = None) -> tuple[Fuser, Plan]:
    """Pick the fuser for ``ckpt``: by name, ``timm:NAME``, or the first that recognizes it."""
    options = options or Options()
    if ckpt.metadata.get("format") == DEPLOY_FORMAT:
        raise BadInput(f"{ckpt.path}: is already a repfuse deploy file (nothing to fuse)")
    if arch.startswith("timm:"):
        options, arch = dataclasses.replace(options, model=arch), "conv-bn"  # the caller's Options stay as given
    if arch != "auto":
        fuser = get_fuser(arch)
        try:
            return fuser, fuser.detect(ckpt, options)
        except NotThisArch as e:
            raise UnknownArch(f"{ckpt.path}: not a {arch} checkpoint: {e}") from None
    if options.model:
        fuser = get_fuser("conv-bn")
        return fuser, fuser.detect(ckpt, options)
    reasons = []
    trying = dataclasses.replace(options, under_auto=True)
    for fuser in all_fusers():
        try:
            return fuser, fuser.detect(ckpt, trying)
        except NotThisArch as e:
            reasons.append(f"{fuser.name}: {e}")
    raise UnknownArch(
        f"{ckpt.path}: architecture not recognized; name it with --arch (vanillanet, repvgg, mobileone, "
        f"fastvit, repvit, timm:NAME, or conv-bn with --model) [{'; '.join(reasons)[:300]}]"
    )


def at_resolution(plan: Plan, resolution: int | None) -> Plan:
    """The plan with square inputs of ``resolution`` (for verification, FLOPs and conv-bn's trace)."""
    if not resolution:
        return plan
    return dataclasses.replace(plan, input_size=(plan.input_size[0], resolution, resolution))


def prepare(
    ckpt: Checkpoint, src: Source, on_step: Step = _noop, options: Options | None = None
) -> tuple[Fuser, Plan, nn.Module]:
    """check -> detect -> build: the fuser, its plan (at ``src.resolution``) and the training model.

    A memory-mapped checkpoint's pages are let go as soon as each step is done with them
    (``ckpt.release``), so the file is not resident all at once next to the deploy tensors.
    ``options`` overrides ``src.options``.
    """
    check_finite(ckpt.state_dict, ckpt.path, done=ckpt.release)
    on_step("detect")
    fuser, plan = detect(ckpt, src.arch, options or src.options)
    plan = at_resolution(plan, src.resolution)
    on_step("build")
    return fuser, plan, fuser.build_train(plan, ckpt.state_dict)


def fuse(fuser: Fuser, plan: Plan, state_dict: dict[str, Tensor], train: nn.Module, done: Done | None = None) -> Fused:
    """Run the fuser; give every deploy tensor the standard layout the file will hold, so the
    deploy model that is verified and timed is the one users load."""
    fused = fuser.fuse(plan, state_dict, train, done=done)
    fused.tensors = {k: standard_layout(v) for k, v in fused.tensors.items()}
    return fused


def unfused_of(fused: Fused) -> list[Unfused]:
    return [Unfused(m, r) for m, r in fused.unfused]


def names_of(plan: Plan) -> tuple[str, str, str]:
    return plan.arch, plan.variant, plan.layout


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def ckpt_dtype(ckpt: Checkpoint) -> str:
    return dtype_name(ckpt.dtype)


def seeded(batch: int, plan: Plan, seed: int) -> tuple[Tensor, str]:
    c, h, w = plan.input_size
    return seeded_inputs(batch, (c, h, w), seed), f"seeded random normal, batch {batch}, {c}x{h}x{w}, seed {seed}"


def failure(what: str, v: VerifyResult, tolerance: bool) -> str:
    where = f"; outputs first diverge at `{v.diverges_at}`" if v.diverges_at else ""
    tol = f" (tolerance atol {v.atol:g}, rtol {v.rtol:g})" if tolerance else ""
    return f"{what}: max abs diff {v.max_abs_diff:.3g}, max rel diff {v.max_rel_diff:.3g}{tol}{where}"


@dataclass
class Conversion:
    """Everything a conversion produced, for the caller to report or use."""

    ckpt: Checkpoint
    fuser: Fuser
    plan: Plan
    fused: Fused
    train: nn.Module
    deploy: nn.Module
    verify: VerifyResult | None
    result: ConversionResult


def convert(path: str | Path, output: str | Path | None = None, **options: Any) -> dict[str, Any]:
    """Convert a training checkpoint into a verified deploy-mode safetensors file.

    ``options`` are :class:`Source`'s fields (``arch``, ``key``, ``options``, ``trust``,
    ``resolution``) and :func:`run_conversion`'s other keywords (``force``, ``verify``, ``batch``,
    ``seed``, ``atol``, ``rtol``, ``write``). Returns the result as a JSON-ready dict (the
    object ``repfuse convert --json`` prints). Raises RepfuseError (exit code 2) for bad input
    and VerifyFailed (exit 1) when the deploy model's outputs differ; in both cases nothing is
    written.

    Example::

        from repfuse_cli import convert, load_deploy
        res = convert("checkpoint-299.pth", arch="vanillanet")
        model = load_deploy(res["output"])
    """
    options.pop("quiet", None)  # the library never prints; accepted for symmetry with the CLI
    return run_conversion(path, output, **options).result.to_dict()


def run_conversion(
    source: Source | str | Path,
    output: str | Path | None = None,
    *,
    force: bool = False,
    verify: bool = True,
    batch: int = 1,
    seed: int = 0,
    atol: float | None = None,
    rtol: float | None = None,
    write: bool = True,
    report: bool = True,
    on_step: Step = _noop,
    inputs: str | Path | None = None,
    images: ImageOptions | None = None,
    **fields: Any,
) -> Conversion:
    """:func:`convert`, returning the models and intermediate results as well.

    ``source``: a :class:`Source`, or a path and Source's ``fields``; ``force``: overwrite
    ``output``; ``verify``: compare the two models on ``batch`` seeded inputs within
    ``atol``/``rtol``; ``write``: save the file; ``report``: count params/FLOPs/layers (the CLI
    skips it when nothing is shown); ``on_step``: called with each pipeline step's name;
    ``inputs``: verify on a tensor file or a folder of images (through the model's own evaluation
    transform; ``images``: the image flags) instead of seeded inputs.
    """
    t0 = time.perf_counter()
    src = Source.of(source, **fields)
    check_tolerances(atol, rtol)
    out = Path(output) if output is not None else default_output(src.path)
    if write:
        check_output(out, src.path, force)
    # bad inputs fail before any work
    folder = list_for(inputs, images) if verify and inputs is not None and is_folder(inputs) else None
    x_labels = load_inputs(inputs) if verify and inputs is not None and folder is None else None

    on_step("load")
    ckpt = src.load()
    sha256 = in_background(ckpt.sha256) if write else None  # read while the work goes on
    fuser, plan, train = prepare(ckpt, src, on_step)

    on_step("fuse")
    fused = fuse(fuser, plan, ckpt.state_dict, train, done=ckpt.release)
    deploy_plan = plan.with_config(fused.config)
    deploy = build_deploy_model(fuser, deploy_plan, fused.tensors, f"{fuser.name} deploy model")

    def metadata() -> dict[str, str]:
        try:
            digest = sha256.result() if sha256 is not None else ""
        except OSError as e:  # the checkpoint vanished or became unreadable while we worked
            raise BadInput(f"{src.path}: cannot read the checkpoint again to hash it ({first_line(e)})") from None
        return deploy_metadata(deploy_plan, src.path, digest, ckpt.key, ckpt_dtype(ckpt))

    # The file is written to a hidden temp file while verification runs, and moved into place
    # only if it passes (the disk's fsync wait overlaps the forward passes).
    staged: StagedWrite | None = None
    try:
        if write:
            staged = stage_deploy(fused.tensors, out, metadata, force)
        verified = None
        if verify:
            on_step("verify")
            labels = None
            if x_labels is not None and inputs is not None:
                x, labels = x_labels
                desc = f"{x.shape[0]} images from {Path(inputs).name}" + (" with labels" if labels is not None else "")
            else:
                x, desc = seeded(batch, plan, seed)
            with releasing(train, ckpt.release):
                if folder is not None:
                    verified = verify_folder(
                        train, deploy, fuser, plan, ckpt, folder, dtype=ckpt.dtype, batch=batch, atol=atol,
                        rtol=rtol, resolution=src.resolution, exclude=fuser.folded_modules(deploy_plan),
                        options=images,
                    )  # fmt: skip
                else:
                    verified = verify_models(
                        train, deploy, x, ckpt.dtype, atol=atol, rtol=rtol, labels=labels,
                        exclude=fuser.folded_modules(deploy_plan), inputs_desc=desc,
                    )  # fmt: skip

        on_step("report")
        shape = (1, *plan.input_size)
        before = model_stats(train, shape) if report else None
        after = model_stats(deploy, shape) if report else None
        result = ConversionResult(
            input=str(src.path),
            output=str(out) if write else None,
            arch=plan.arch,
            variant=plan.variant,
            layout=plan.layout,
            key=ckpt.key,
            weight_keys=ckpt.weight_keys,
            ema_available=ckpt.ema_keys,
            stripped_prefixes=ckpt.stripped_prefixes,
            dtype=ckpt_dtype(ckpt),
            resolution=plan.input_size[1],
            params_before=before.params if before else None,
            params_after=after.params if after else None,
            flops_before=before.flops if before else None,
            flops_after=after.flops if after else None,
            bn_folded=fused.counts.get("bn_folded", 0),
            fused=dict(fused.counts),
            unfused=unfused_of(fused),
            notes=list(plan.notes),
            before=before,
            after=after,
            verify=verified,
            repfuse_version=__version__,
        )
        if verified is not None and not verified.passed:
            result.output = None
            result.seconds = round(time.perf_counter() - t0, 3)
            what = f"{src.path}: verification failed"
            msg = f"{what}: {verified.images.failure()}" if verified.images else failure(what, verified, tolerance=True)
            raise VerifyFailed(f"{msg}; no output written", result=result.to_dict())

        if staged is not None:
            on_step("save")
            staged.commit()
    finally:
        if staged is not None:
            staged.discard()  # a no-op after the commit
    result.seconds = round(time.perf_counter() - t0, 3)
    return Conversion(ckpt, fuser, deploy_plan, fused, train, deploy, verified, result)
