"""The conversion pipeline, in one place a reader can follow:

    load -> detect -> build -> fuse -> verify -> report -> save

Everything the CLI does is a call into this module; it prints nothing and raises
RepfuseError subclasses (with exit codes) for bad input and VerifyFailed when the numbers
don't match. No output file is written unless verification passed.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import __version__
from .checkpoint import Checkpoint, check_finite, load_checkpoint, load_strict
from .errors import BadInput, KeyMismatch, RepfuseError, UnknownArch, VerifyFailed, first_line
from .fold import standard_layout
from .fuser import Done, Fused, Fuser, NotThisArch, Options, Plan
from .registry import all_fusers, get_fuser
from .save import StagedWrite, check_output, default_output
from .stats import model_stats
from .verification import VerifyResult, check_device, seeded_inputs, verify_models

DEPLOY_FORMAT = "repfuse-deploy"
Step = Callable[[str], None]


def _noop(_: str) -> None:
    pass


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
    for fuser in all_fusers():
        try:
            return fuser, fuser.detect(ckpt, options)
        except NotThisArch as e:
            reasons.append(f"{fuser.name}: {e}")
    raise UnknownArch(
        f"{ckpt.path}: architecture not recognized; name it with --arch "
        f"(vanillanet, repvgg, timm:NAME, or conv-bn with --model) [{'; '.join(reasons)[:300]}]"
    )


def at_resolution(plan: Plan, resolution: int | None) -> Plan:
    """The plan with square inputs of ``resolution`` (for verification, FLOPs and conv-bn's trace)."""
    if not resolution:
        return plan
    return dataclasses.replace(plan, input_size=(plan.input_size[0], resolution, resolution))


def prepare(
    ckpt: Checkpoint, arch: str, options: Options | None, resolution: int | None, on_step: Step = _noop
) -> tuple[Fuser, Plan, nn.Module]:
    """check -> detect -> build: the fuser, its plan (at ``resolution``) and the training model."""
    # A memory-mapped checkpoint's pages are let go as soon as each step is done with them
    # (Checkpoint.release), so the file is not resident all at once next to the deploy tensors.
    check_finite(ckpt.state_dict, ckpt.path, done=ckpt.release)
    on_step("detect")
    fuser, plan = detect(ckpt, arch, options)
    plan = at_resolution(plan, resolution)
    on_step("build")
    return fuser, plan, fuser.build_train(plan, ckpt.state_dict)


def fuse(fuser: Fuser, plan: Plan, state_dict: dict[str, Tensor], train: nn.Module, done: Done | None = None) -> Fused:
    """Run the fuser; give every deploy tensor the standard layout the file will hold, so the
    deploy model that is verified and timed is the one users load. ``done`` goes to fusers
    that take it (see ``Fuser.fuse``)."""
    fused = fuser.fuse(plan, state_dict, train, done=done)
    fused.tensors = {k: standard_layout(v) for k, v in fused.tensors.items()}
    return fused


@contextmanager
def releasing(model: nn.Module, done: Done) -> Iterator[None]:
    """While inside, each module of ``model`` hands its own weights to ``done`` once it has run
    (so a training model on a memory-mapped checkpoint, run on the CPU in its own dtype, never has
    all its pages resident; a forward in another dtype or on a GPU copies every weight first)."""
    own = {m: [*m.parameters(recurse=False), *m.buffers(recurse=False)] for m in model.modules()}
    handles = [m.register_forward_hook(lambda mod, args, out: done(own[mod])) for m, t in own.items() if t]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def build_deploy_model(fuser: Fuser, plan: Plan, tensors: dict[str, Tensor], where: str) -> nn.Module:
    try:
        model = fuser.build_deploy(plan)
    except RepfuseError:
        raise
    except Exception as e:  # a config that parses but describes no buildable model
        raise BadInput(f"{where}: cannot build the {plan.arch} deploy model from its config ({e})") from None
    return load_strict(model, tensors, where)


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
    result: dict[str, Any]


def convert(path: str | Path, output: str | Path | None = None, **options: Any) -> dict[str, Any]:
    """Convert a training checkpoint into a verified deploy-mode safetensors file.

    ``options`` are :func:`run_conversion`'s keywords (``arch``, ``key``, ``options``, ``force``,
    ``trust``, ``verify``, ``resolution``, ``batch``, ``seed``, ``atol``, ``rtol``, ``write``).
    Returns the result as a JSON-ready dict (the object ``repfuse convert --json`` prints).
    Raises RepfuseError (exit code 2) for bad input and VerifyFailed (exit 1) when the deploy
    model's outputs differ; in both cases nothing is written.

    Example::

        from repfuse_cli import convert, load_deploy
        res = convert("checkpoint-299.pth", arch="vanillanet")
        model = load_deploy(res["output"])
    """
    options.pop("quiet", None)  # the library never prints; accepted for symmetry with the CLI
    return run_conversion(path, output, **options).result


def run_conversion(
    path: str | Path,
    output: str | Path | None = None,
    *,
    arch: str = "auto",
    key: str | None = None,
    options: Options | None = None,
    force: bool = False,
    trust: bool = False,
    verify: bool = True,
    resolution: int | None = None,
    batch: int = 1,
    seed: int = 0,
    atol: float | None = None,
    rtol: float | None = None,
    write: bool = True,
    report: bool = True,
    on_step: Step = _noop,
) -> Conversion:
    """:func:`convert`, returning the models and intermediate results as well.

    ``arch``: "auto", a fuser name or "timm:NAME"; ``key``: the checkpoint entry holding the
    weights; ``options``: variant/model/assume_annealed; ``force``: overwrite ``output``;
    ``trust``: unpickle arbitrary code (dangerous); ``verify``: compare the two models on
    ``batch`` seeded inputs at ``resolution`` within ``atol``/``rtol``; ``write``: save the file;
    ``report``: count params/FLOPs/layers (about a second of first-use imports; the CLI skips it
    when nothing is shown); ``on_step``: called with each pipeline step's name (for progress).
    """
    t0 = time.perf_counter()
    src = Path(path)
    out = Path(output) if output is not None else default_output(src)
    if write:
        check_output(out, src, force)

    on_step("load")
    ckpt = load_checkpoint(src, key=key, trust=trust)
    # the source's sha256 (for the deploy metadata) is read in a thread while the work goes on
    sha256 = None
    if write:
        hasher = ThreadPoolExecutor(1)
        sha256 = hasher.submit(ckpt.sha256)
        hasher.shutdown(wait=False)  # the running hash finishes; the pool takes no more work
    fuser, plan, train = prepare(ckpt, arch, options, resolution, on_step)

    on_step("fuse")
    fused = fuse(fuser, plan, ckpt.state_dict, train, done=ckpt.release)
    deploy_plan = plan.with_config(fused.config)
    deploy = build_deploy_model(fuser, deploy_plan, fused.tensors, f"{fuser.name} deploy model")

    dtype = str(ckpt.dtype).replace("torch.", "")

    def source_sha256() -> str:
        try:
            return sha256.result()
        except OSError as e:  # the checkpoint vanished or became unreadable while we worked
            raise BadInput(f"{src}: cannot read the checkpoint again to hash it ({first_line(e)})") from None

    def metadata() -> dict[str, str]:
        return {
            "format": DEPLOY_FORMAT,
            "repfuse_version": __version__,
            "source": src.name,
            "source_sha256": source_sha256(),
            "source_key": ckpt.key or "",
            "dtype": dtype,
            **deploy_plan.to_metadata(),
        }

    # The file is written to a hidden temp file while verification runs, and moved into place
    # only if it passes (the disk's fsync wait overlaps the forward passes).
    staged = None
    try:
        if write:
            staged = StagedWrite(fused.tensors, out, metadata, force)
        c, h, w = plan.input_size
        result_verify = None
        if verify:
            on_step("verify")
            x = seeded_inputs(batch, (c, h, w), seed)
            with releasing(train, ckpt.release):
                result_verify = verify_models(
                    train,
                    deploy,
                    x,
                    ckpt.dtype,
                    atol=atol,
                    rtol=rtol,
                    exclude=fused.config.get("fused_modules", []),
                    inputs_desc=f"seeded random normal, batch {batch}, {c}x{h}x{w}, seed {seed}",
                )

        on_step("report")
        before = model_stats(train, (1, c, h, w)) if report else None
        after = model_stats(deploy, (1, c, h, w)) if report else None
        result: dict[str, Any] = {
            "input": str(src),
            "output": str(out) if write else None,
            "arch": plan.arch,
            "variant": plan.variant,
            "layout": plan.layout,
            "key": ckpt.key,
            "weight_keys": ckpt.weight_keys,
            "ema_available": ckpt.ema_keys,
            "stripped_prefixes": ckpt.stripped_prefixes,
            "dtype": dtype,
            "resolution": h,
            "params_before": before.params if before else None,
            "params_after": after.params if after else None,
            "flops_before": before.flops if before else None,
            "flops_after": after.flops if after else None,
            "bn_folded": fused.counts.get("bn_folded", 0),
            "fused": dict(fused.counts),
            "unfused": [{"module": m, "reason": r} for m, r in fused.unfused],
            "notes": list(plan.notes),
            "before": before.to_dict() if before else None,
            "after": after.to_dict() if after else None,
            "verify": result_verify.to_dict() if result_verify else None,
            "repfuse_version": __version__,
        }
        conv = Conversion(ckpt, fuser, deploy_plan, fused, train, deploy, result_verify, result)
        if result_verify is not None and not result_verify.passed:
            result["output"] = None
            result["seconds"] = round(time.perf_counter() - t0, 3)
            where = f"; outputs first diverge at `{result_verify.diverges_at}`" if result_verify.diverges_at else ""
            raise VerifyFailed(
                f"{src}: verification failed: max abs diff {result_verify.max_abs_diff:.3g}, "
                f"max rel diff {result_verify.max_rel_diff:.3g} (tolerance atol {result_verify.atol:g}, "
                f"rtol {result_verify.rtol:g}){where}; no output written",
                result=result,
            )

        if staged is not None:
            on_step("save")
            staged.commit()
    finally:
        if staged is not None:
            staged.discard()  # a no-op after the commit
    result["seconds"] = round(time.perf_counter() - t0, 3)
    return conv


def read_deploy(path: str | Path, model: str | None = None) -> tuple[Plan, dict[str, Tensor], dict[str, str]]:
    """Read a repfuse deploy file: its plan, tensors and metadata (BadInput if not one).

    The metadata is data from a file: its fuser checks it before anything is built from it
    (conv-bn imports a `pkg.module:callable` it names only when ``model`` names the same one).
    """
    from .checkpoint import read_file

    path = Path(path)
    if not path.name.endswith(".safetensors"):
        raise BadInput(f"{path}: not a safetensors deploy file")
    tensors, _, meta = read_file(path)
    if meta.get("format") != DEPLOY_FORMAT or "arch" not in meta:
        raise BadInput(f"{path}: not written by repfuse (no `{DEPLOY_FORMAT}` metadata)")
    try:
        plan = Plan.from_metadata(meta)
    except (ValueError, KeyError, TypeError) as e:
        raise BadInput(f"{path}: damaged repfuse metadata ({e})") from None
    get_fuser(plan.arch).check_config(plan, model, str(path))
    return plan, tensors, meta


def load_deploy(path: str | Path, model: str | None = None) -> nn.Module:
    """Rebuild the deploy model (eval mode) from any deploy file repfuse wrote.

    ``model``: for conv-bn files of a ``pkg.module:callable`` network, that spec, to allow
    importing it (a file's metadata alone never makes repfuse import code).

    Example::

        model = repfuse_cli.load_deploy("resnet18.deploy.safetensors")
        logits = model(images)
    """
    plan, tensors, _ = read_deploy(path, model)
    return build_deploy_model(get_fuser(plan.arch), plan, tensors, str(path))


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


@dataclass
class ModelPair:
    ckpt: Checkpoint
    plan: Plan
    train: nn.Module
    deploy: nn.Module
    deploy_plan: Plan
    notes: list[str]


def load_pair(
    checkpoint: str | Path,
    deploy_path: str | Path | None,
    *,
    arch: str = "auto",
    key: str | None = None,
    options: Options | None = None,
    trust: bool = False,
    resolution: int | None = None,
) -> ModelPair:
    """The training model of CHECKPOINT and a deploy model: read from DEPLOY (a repfuse file, or
    a plain deploy state_dict in the layout the fuser writes), or fused in memory when None."""
    ckpt = load_checkpoint(checkpoint, key=key, trust=trust)
    fuser, plan, train = prepare(ckpt, arch, options, resolution)
    notes = list(plan.notes)
    if deploy_path is None:
        fused = fuse(fuser, plan, ckpt.state_dict, train, done=ckpt.release)
        deploy_plan, tensors, where = plan.with_config(fused.config), fused.tensors, f"{fuser.name} deploy model"
    else:
        deploy_path = where = Path(deploy_path)
        meta: dict[str, str] = {}
        if deploy_path.name.endswith(".safetensors"):
            from .checkpoint import read_file

            _, _, meta = read_file(deploy_path)
        if meta.get("format") == DEPLOY_FORMAT:
            deploy_plan, tensors, meta = read_deploy(deploy_path, (options or Options()).model)
            if meta.get("source_sha256") and meta["source_sha256"] != ckpt.sha256():
                notes.insert(0, f"{deploy_path.name} was converted from another file ({meta.get('source', '?')})")
            if (deploy_plan.arch, deploy_plan.variant) != (plan.arch, plan.variant):
                raise BadInput(
                    f"{deploy_path}: holds a {deploy_plan.arch} {deploy_plan.variant} model, "
                    f"{ckpt.path.name} a {plan.arch} {plan.variant}: not its deploy file"
                )
        else:  # a deploy state_dict from another tool: rebuild the deploy model our fuser would write
            tensors = load_checkpoint(deploy_path, trust=trust).state_dict
            deploy_plan = plan.with_config(fuser.fuse(plan, ckpt.state_dict, train).config)
        check_finite(tensors, deploy_path)
    deploy = build_deploy_model(get_fuser(deploy_plan.arch), deploy_plan, tensors, str(where))
    return ModelPair(ckpt, plan, train, deploy, deploy_plan, notes)


def bench_file(
    checkpoint: str | Path,
    deploy_path: str | Path | None = None,
    *,
    arch: str = "auto",
    key: str | None = None,
    options: Options | None = None,
    trust: bool = False,
    batches: tuple[int, ...] = (1,),
    resolution: int | None = None,
    device: str = "cpu",
    compile: bool = False,
    warmup: int = 3,
    repeats: int = 10,
) -> dict[str, Any]:
    """Latency of the training model (eval) against the deploy model (``repfuse bench``)."""
    from .benchmark import bench_models

    check_device(device)
    m = load_pair(checkpoint, deploy_path, arch=arch, key=key, options=options, trust=trust, resolution=resolution)
    c, h, w = m.plan.input_size
    rows = bench_models(
        m.train, m.deploy, (c, h, w), batches=batches, device=device, compile=compile, warmup=warmup, repeats=repeats
    )
    return {
        "checkpoint": str(m.ckpt.path),
        "deploy": str(deploy_path) if deploy_path else "(fused in memory)",
        "arch": m.plan.arch,
        "variant": m.plan.variant,
        "device": device if device == "cpu" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "resolution": h,
        "warmup": warmup,
        "repeats": repeats,
        "rows": [r.to_dict() for r in rows],
        "torch": torch.__version__,
    }


def verify_files(
    checkpoint: str | Path,
    deploy_path: str | Path,
    *,
    arch: str = "auto",
    key: str | None = None,
    options: Options | None = None,
    trust: bool = False,
    inputs: str | Path | None = None,
    batch: int = 4,
    resolution: int | None = None,
    seed: int = 0,
    atol: float | None = None,
    rtol: float | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Check that DEPLOY computes what CHECKPOINT's training model computes.

    DEPLOY is a file repfuse wrote, or any deploy state_dict in the layout the fuser writes
    (e.g. the official VanillaNet/RepVGG converters' output). Returns the result dict; raises
    VerifyFailed (exit 1) when outputs differ beyond tolerance, naming where they diverge.
    """
    t0 = time.perf_counter()
    check_device(device)
    m = load_pair(checkpoint, deploy_path, arch=arch, key=key, options=options, trust=trust, resolution=resolution)
    ckpt, plan, train, deploy, deploy_plan = m.ckpt, m.plan, m.train, m.deploy, m.deploy_plan

    labels = None
    if inputs is not None:
        x, labels = load_inputs(inputs)
        desc = f"{x.shape[0]} images from {Path(inputs).name}" + (" with labels" if labels is not None else "")
    else:
        c, h, w = plan.input_size
        x = seeded_inputs(batch, (c, h, w), seed)
        desc = f"seeded random normal, batch {batch}, {c}x{h}x{w}, seed {seed}"
    with releasing(train, ckpt.release):
        result_verify = verify_models(
            train,
            deploy,
            x,
            ckpt.dtype,
            atol=atol,
            rtol=rtol,
            device=device,
            labels=labels,
            exclude=deploy_plan.config.get("fused_modules", []),
            inputs_desc=desc,
        )
    result = {
        "checkpoint": str(ckpt.path),
        "deploy": str(deploy_path),
        "arch": plan.arch,
        "variant": plan.variant,
        "layout": plan.layout,
        "key": ckpt.key,
        "notes": m.notes,
        "verify": result_verify.to_dict(),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if not result_verify.passed:
        where = f"; outputs first diverge at `{result_verify.diverges_at}`" if result_verify.diverges_at else ""
        raise VerifyFailed(
            f"{deploy_path}: does not match {ckpt.path.name}: max abs diff {result_verify.max_abs_diff:.3g}, "
            f"max rel diff {result_verify.max_rel_diff:.3g}{where}",
            result=result,
        )
    return result


def inspect_file(
    path: str | Path, *, key: str | None = None, arch: str = "auto", options: Options | None = None, trust: bool = False
) -> dict[str, Any]:
    """What is in a file before anything is converted (the `repfuse inspect` report)."""
    from .errors import AnnealingUnfinished

    path = Path(path)
    options = options or Options()
    ckpt = load_checkpoint(path, key=key, trust=trust)
    result: dict[str, Any] = {
        "file": str(path),
        "format": ckpt.format,
        "size_bytes": path.stat().st_size,
        "entries": ckpt.entries,
        "key": ckpt.key,
        "weight_keys": ckpt.weight_keys,
        "epoch": ckpt.epoch,
        "recorded_arch": ckpt.extras.get("arch") or ckpt.args.get("model"),
        "dtype": str(ckpt.dtype).replace("torch.", ""),
        "tensors": len(ckpt.state_dict),
        "stripped_prefixes": ckpt.stripped_prefixes,
        "warnings": [],
    }
    warnings = result["warnings"]
    ema = ckpt.ema_keys
    if ema and ckpt.key not in ema:
        warnings.append(f"EMA weights present ({', '.join(ema)}) but not the default; convert with --key to use them")
    if ckpt.metadata.get("format") == DEPLOY_FORMAT:
        plan, tensors, _ = read_deploy(path, options.model)
        deploy = build_deploy_model(get_fuser(plan.arch), plan, tensors, str(path))
        result.update(
            mode="deploy (written by repfuse)",
            arch=plan.arch,
            variant=plan.variant,
            layout=plan.layout,
            params=sum(p.numel() for p in deploy.parameters()),
            would_fuse=None,
            source=ckpt.metadata.get("source"),
            repfuse_version=ckpt.metadata.get("repfuse_version"),
        )
        return result
    try:
        fuser, plan = detect(ckpt, arch, options)
    except AnnealingUnfinished as e:
        warnings.append(str(e))
        fuser, plan = detect(ckpt, arch, dataclasses.replace(options, assume_annealed=True))
    except (UnknownArch, KeyMismatch) as e:  # describing a file never fails on what it lacks
        result.update(mode="unknown", arch=None, variant=None, params=None, would_fuse=None)
        warnings.append(str(e))
        return result
    check_finite(ckpt.state_dict, path)
    train = fuser.build_train(plan, ckpt.state_dict)
    fused = fuse(fuser, plan, ckpt.state_dict, train)
    warnings.extend(plan.notes)
    result.update(
        mode="train",
        arch=plan.arch,
        variant=plan.variant,
        layout=plan.layout,
        params=sum(p.numel() for p in train.parameters()),
        would_fuse={**fused.counts, "unfused": len(fused.unfused)},
        unfused=[{"module": m, "reason": r} for m, r in fused.unfused],
    )
    deploy = build_deploy_model(fuser, plan.with_config(fused.config), fused.tensors, f"{fuser.name} deploy model")
    result["params_after"] = sum(p.numel() for p in deploy.parameters())
    return result
