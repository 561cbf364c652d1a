"""The `repfuse` command: parse, call the library, render. Nothing else lives here.

torch is imported inside commands only, so `repfuse --help` and `repfuse archs` start fast.
Errors become one line on stderr and the documented exit code in one place: `_errors`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Protocol, TypeVar

import typer
from rich.console import Console, RenderableType

from .errors import RepfuseError, first_line

if TYPE_CHECKING:  # pragma: no cover
    from .pipeline import Source

app = typer.Typer(
    name="repfuse",
    help="Fuse re-parameterized CNN checkpoints (VanillaNet, RepVGG, any conv-BN network) into "
    "verified deploy-mode safetensors. Exit codes: 0 ok, 1 verification failed, 2 bad input.",
    no_args_is_help=True,
    add_completion=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)

# Shared options (one definition each, reused by every command).
KeyOpt = Annotated[
    str | None,
    typer.Option(
        "--key",
        help="Entry holding the weights (model, model_ema, "
        "state_dict, state_dict_ema, ...). Default: the non-EMA weights.",
    ),
]
ArchOpt = Annotated[str, typer.Option("--arch", help="auto, a fuser name (see `repfuse archs`), or timm:NAME.")]
ModelOpt = Annotated[str | None, typer.Option("--model", help="conv-bn network: timm:NAME or pkg.module:callable.")]
VariantOpt = Annotated[str | None, typer.Option("--variant", help="Override the detected variant name.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print exactly one JSON object on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")]
TrustOpt = Annotated[
    bool,
    typer.Option(
        "--trust-checkpoint",
        rich_help_panel="Safety",
        help="DANGER: unpickle arbitrary code from the checkpoint. Only for files you trust.",
    ),
]
AnnealOpt = Annotated[
    bool,
    typer.Option(
        "--assume-annealed",
        rich_help_panel="Safety",
        help="VanillaNet: convert although the checkpoint records unfinished deep-training annealing.",
    ),
]
ResOpt = Annotated[
    int | None,
    typer.Option(
        "--resolution", help="Input height/width for verification and FLOPs (default: the model's, usually 224).", min=8
    ),
]
BatchOpt = Annotated[int, typer.Option("--batch", help="Batch size of the seeded random inputs.", min=1)]
ImgBatchOpt = Annotated[
    int | None,
    typer.Option(
        "--batch",
        help="Batch size: of the seeded random inputs (default 1 for convert, 4 for verify), or images "
        "per forward pass with an --inputs folder (default 32).",
        min=1,
    ),
]
InputsOpt = Annotated[
    Path | None,
    typer.Option(
        "--inputs",
        help="Real inputs: a folder of images (JPEG/PNG/WebP/BMP; DIR/<class>/* gives labels) run through the "
        "model's own evaluation transform, or a tensor file (N,C,H,W) in .pt, .npy or .safetensors, optionally "
        "with `labels`.",
    ),
]
_IMG = "Image folders (--inputs DIR)"
ClassMapOpt = Annotated[
    Path | None,
    typer.Option(
        "--class-map", rich_help_panel=_IMG,
        help="Class folder names, one a line, in the model's class order (default: the sorted folder names).",
    ),
]  # fmt: skip
LimitOpt = Annotated[
    int | None, typer.Option("--limit", rich_help_panel=_IMG, help="Only the first N images (sorted order).", min=1)
]
MeanOpt = Annotated[
    str | None,
    typer.Option("--mean", rich_help_panel=_IMG, help="Normalization mean, e.g. 0.485,0.456,0.406 (overrides)."),
]
StdOpt = Annotated[
    str | None, typer.Option("--std", rich_help_panel=_IMG, help="Normalization std, e.g. 0.229,0.224,0.225.")
]
CropPctOpt = Annotated[
    float | None,
    typer.Option("--crop-pct", rich_help_panel=_IMG, help="Center-crop fraction in (0, 1]: resize to size/crop-pct."),
]
InterpOpt = Annotated[
    str | None,
    typer.Option("--interpolation", rich_help_panel=_IMG, help="Resize filter: bilinear, bicubic, nearest, ..."),
]
MinAgreeOpt = Annotated[
    float | None,
    typer.Option(
        "--min-agreement", rich_help_panel=_IMG,
        help="Fail (exit 1) when the top-1 agreement of train and deploy is below this fraction, e.g. 0.999.",
    ),
]  # fmt: skip
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the random inputs.")]
AtolOpt = Annotated[float | None, typer.Option("--atol", help="Absolute tolerance (default per dtype).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda or cuda:N (TF32 off; bench: cudnn.benchmark on).")]
RtolOpt = Annotated[
    float | None,
    typer.Option(
        "--rtol", help="Tolerance relative to max|output| (default per dtype: fp32 1e-4, fp16 1e-2, bf16 5e-2)."
    ),
]

out_console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


INTERNAL_ERROR = 3  # any exit code other than 0, 1, 2 means a bug in repfuse


def _sanitize(obj: Any) -> Any:
    """NaN and infinities become null: strict JSON parsers (jq) reject them."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_sanitize(v) for v in obj]
    return obj


def _emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(_sanitize(obj), indent=2, default=str, allow_nan=False) + "\n")
    sys.stdout.flush()


class _Result(Protocol):
    def to_dict(self) -> dict[str, Any]: ...


R = TypeVar("R", bound=_Result)


def _show(result: R, json_out: bool, quiet: bool, render: Callable[[R], RenderableType]) -> None:
    """A command's result: one JSON object with --json, else ``render``'s tables unless --quiet."""
    if json_out:
        _emit_json(result.to_dict())
    elif not quiet:
        out_console.print(render(result))


def _fail(msg: str, code: int, json_out: bool, result: dict[str, Any] | None = None) -> typer.Exit:
    print(f"repfuse: error: {msg}", file=sys.stderr)
    if json_out:
        _emit_json({**(result or {}), "error": msg, "exit_code": code})
    return typer.Exit(code)


@contextlib.contextmanager
def _errors(json_out: bool) -> Iterator[None]:
    """The one place where errors become a stderr line and an exit code."""
    try:
        yield
    except RepfuseError as e:
        msg = first_line(e, 10_000)
        raise _fail(msg, e.exit_code, json_out, getattr(e, "result", None)) from None
    except KeyboardInterrupt:
        raise _fail("interrupted; nothing written", 130, json_out) from None
    except Exception as e:  # a bug: still one line (and JSON) for pipelines, the traceback on request
        if os.environ.get("REPFUSE_DEBUG"):
            raise
        msg = (
            f"internal error: {type(e).__name__}: {first_line(e, 300)} (a bug in repfuse; "
            "rerun with REPFUSE_DEBUG=1 for the traceback)"
        )
        raise _fail(msg, INTERNAL_ERROR, json_out) from None


def _progress(enabled: bool, steps: int = 7) -> tuple[contextlib.AbstractContextManager[Any], Callable[[str], None]]:
    """A progress bar on stderr over the pipeline's steps; returns (context, on_step)."""
    if not enabled or not err_console.is_terminal:  # no bar (and no stray newline) in logs and pipes
        return contextlib.nullcontext(), lambda _step: None
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn("repfuse: {task.description:<8}"),
        BarColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    )
    task = progress.add_task("start", total=steps)
    seen: list[str] = []

    def on_step(step: str) -> None:
        if seen:
            progress.advance(task)
        seen.append(step)
        progress.update(task, description=step)

    return progress, on_step


def _images_task(ctx: Any) -> Callable[[int, int, float], None] | None:
    """A second bar, for the images of an --inputs folder, on the pipeline's progress bar (if shown)."""
    from rich.progress import Progress

    if not isinstance(ctx, Progress):
        return None
    task = ctx.add_task("images", total=None)

    def update(done: int, total: int, rate: float) -> None:
        ctx.update(task, completed=done, total=total, description=f"{done}/{total} images, {rate:.0f}/s")

    return update


def _image_options(
    inputs: Path | None,
    ctx: Any,
    class_map: Path | None,
    limit: int | None,
    mean: str | None,
    std: str | None,
    crop_pct: float | None,
    interpolation: str | None,
    min_agreement: float | None,
) -> Any:
    """The image flags as the library's ImageOptions (BadInput when given without an image folder)."""
    from .errors import BadInput
    from .images import ImageOptions, is_folder

    given = {
        "--class-map": class_map, "--limit": limit, "--mean": mean, "--std": std, "--crop-pct": crop_pct,
        "--interpolation": interpolation, "--min-agreement": min_agreement,
    }  # fmt: skip
    if not is_folder(inputs):
        flag = next((f for f, v in given.items() if v is not None), None)
        if flag:
            raise BadInput(f"{flag} applies to an image folder given with --inputs DIR")
        return None
    return ImageOptions(
        class_map=class_map, limit=limit, mean=mean, std=std, crop_pct=crop_pct, interpolation=interpolation,
        min_agreement=min_agreement, progress=_images_task(ctx),
    )  # fmt: skip


def _batch(batch: int | None, inputs: Path | None, default: int) -> int:
    from .images import is_folder

    return batch if batch is not None else (32 if is_folder(inputs) else default)


def _one_step(step: str, progress: bool, call: Callable[[], Any]) -> Any:
    """``call()`` under a one-step progress bar (when ``progress`` and stderr is a terminal)."""
    ctx, on_step = _progress(progress, steps=1)
    with ctx:
        on_step(step)
        return call()


def _source(
    path: Path,
    arch: str,
    model: str | None,
    variant: str | None,
    key: str | None,
    trust: bool,
    assume_annealed: bool,
    resolution: int | None,
    extra_folds: bool = False,
) -> Source:
    """The options every command shares, as the one value the library takes."""
    from .fuser import Options
    from .pipeline import Source

    options = Options(variant=variant, model=model, assume_annealed=assume_annealed, extra_folds=extra_folds)
    return Source(path, arch=arch, key=key, options=options, trust=trust, resolution=resolution)


@app.command()
def convert(
    checkpoint: Annotated[Path, typer.Argument(help="Training checkpoint (.pth, .pt, .pth.tar, .bin, .safetensors).")],
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Deploy file. Default: <input stem>.deploy.safetensors beside the input."),
    ] = None,
    arch: ArchOpt = "auto",
    model: ModelOpt = None,
    variant: VariantOpt = None,
    key: KeyOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output file.")] = False,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip verification (not recommended).")] = False,
    resolution: ResOpt = None,
    inputs: InputsOpt = None,
    batch: ImgBatchOpt = None,
    seed: SeedOpt = 0,
    atol: AtolOpt = None,
    rtol: RtolOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    trust_checkpoint: TrustOpt = False,
    assume_annealed: AnnealOpt = False,
    extra_folds: Annotated[
        bool,
        typer.Option(
            "--extra-folds",
            help="FastViT: also fold the FFN BatchNorms, attention norms and layer scales the official deploy "
            "model keeps (the file then loads only with repfuse_cli.load_deploy).",
        ),
    ] = False,
    class_map: ClassMapOpt = None,
    limit: LimitOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    crop_pct: CropPctOpt = None,
    interpolation: InterpOpt = None,
    min_agreement: MinAgreeOpt = None,
) -> None:
    """Fuse a training checkpoint into a verified deploy-mode safetensors file."""
    with _errors(json_out):
        from .pipeline import run_conversion
        from .report import conversion_report

        if trust_checkpoint and not quiet:
            print(
                f"repfuse: warning: --trust-checkpoint: unpickling {checkpoint} may run code from it", file=sys.stderr
            )
        ctx, on_step = _progress(not (quiet or json_out))
        with ctx:
            images = _image_options(inputs, ctx, class_map, limit, mean, std, crop_pct, interpolation, min_agreement)
            conv = run_conversion(
                _source(checkpoint, arch, model, variant, key, trust_checkpoint, assume_annealed, resolution,
                        extra_folds),
                output, force=force, verify=not no_verify, batch=_batch(batch, inputs, 1), seed=seed, atol=atol,
                rtol=rtol, report=json_out or not quiet, on_step=on_step, inputs=inputs, images=images,
            )  # fmt: skip
        _show(conv.result, json_out, quiet, conversion_report)


@app.command()
def verify(
    checkpoint: Annotated[Path, typer.Argument(help="Training checkpoint.")],
    deploy: Annotated[Path, typer.Argument(help="Deploy file (repfuse's, or a deploy state_dict in the same layout).")],
    arch: ArchOpt = "auto",
    model: ModelOpt = None,
    variant: VariantOpt = None,
    key: KeyOpt = None,
    inputs: InputsOpt = None,
    batch: ImgBatchOpt = None,
    resolution: ResOpt = None,
    seed: SeedOpt = 0,
    atol: AtolOpt = None,
    rtol: RtolOpt = None,
    device: DeviceOpt = "cpu",
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    trust_checkpoint: TrustOpt = False,
    assume_annealed: AnnealOpt = False,
    class_map: ClassMapOpt = None,
    limit: LimitOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    crop_pct: CropPctOpt = None,
    interpolation: InterpOpt = None,
    min_agreement: MinAgreeOpt = None,
) -> None:
    """Prove a deploy file computes what the training checkpoint computes (exit 0), or say where not (exit 1)."""
    with _errors(json_out):
        from .commands import verify_files
        from .report import verify_report

        ctx, on_step = _progress(not (quiet or json_out), steps=1)
        with ctx:
            on_step("verify")
            images = _image_options(inputs, ctx, class_map, limit, mean, std, crop_pct, interpolation, min_agreement)
            result = verify_files(
                _source(checkpoint, arch, model, variant, key, trust_checkpoint, assume_annealed, resolution),
                deploy, inputs=inputs, batch=_batch(batch, inputs, 4), seed=seed, atol=atol, rtol=rtol,
                device=device, images=images,
            )  # fmt: skip
        _show(result, json_out, quiet, verify_report)


@app.command()
def inspect(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint or deploy file.")],
    arch: ArchOpt = "auto",
    model: ModelOpt = None,
    key: KeyOpt = None,
    json_out: JsonOpt = False,
    trust_checkpoint: TrustOpt = False,
) -> None:
    """Show what a file holds and what a conversion would do, before converting."""
    with _errors(json_out):
        from .commands import inspect_file
        from .report import inspect_report

        result = inspect_file(_source(checkpoint, arch, model, None, key, trust_checkpoint, False, None))
        _show(result, json_out, False, inspect_report)


@app.command()
def bench(
    checkpoint: Annotated[Path, typer.Argument(help="Training checkpoint.")],
    deploy: Annotated[Path | None, typer.Argument(help="Deploy file; default: fuse in memory.")] = None,
    arch: ArchOpt = "auto",
    model: ModelOpt = None,
    key: KeyOpt = None,
    batch: Annotated[
        list[int] | None, typer.Option("--batch", help="Batch size; repeat for several (default 1).", min=1)
    ] = None,
    resolution: ResOpt = None,
    device: DeviceOpt = "cpu",
    compile: Annotated[bool, typer.Option("--compile", help="Also time torch.compile'd models.")] = False,
    runtime: Annotated[
        str,
        typer.Option(
            "--runtime",
            help="torch, or onnxruntime: time the exported training and deploy graphs on onnxruntime's CPU "
            "provider (needs repfuse[onnx]).",
        ),
    ] = "torch",
    warmup: Annotated[int, typer.Option("--warmup", min=0)] = 3,
    repeats: Annotated[int, typer.Option("--repeats", help="Timed runs; the median is reported.", min=1)] = 10,
    layouts: Annotated[
        bool,
        typer.Option("--layouts", help="Also time the deploy model's fast 1x1 layout and both models channels_last."),
    ] = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    trust_checkpoint: TrustOpt = False,
    assume_annealed: AnnealOpt = False,
) -> None:
    """Measure the training model (eval) against the deploy model: latency and speedup per batch size."""
    with _errors(json_out):
        from .commands import bench_file
        from .errors import BadInput
        from .report import bench_table

        src = _source(checkpoint, arch, model, None, key, trust_checkpoint, assume_annealed, resolution)
        if runtime == "onnxruntime":
            from .onnxbench import bench_file_onnxruntime

            if device != "cpu" or compile or layouts:
                raise BadInput("--runtime onnxruntime: runs on the CPU provider; drop --device/--compile/--layouts")
            result = _one_step(
                "bench",
                not (quiet or json_out),
                lambda: bench_file_onnxruntime(
                    src, deploy, batches=tuple(batch or [1]), warmup=warmup, repeats=repeats
                ),  # fmt: skip
            )
        elif runtime == "torch":
            result = _one_step(
                "bench",
                not (quiet or json_out),
                lambda: bench_file(
                    src,
                    deploy,
                    batches=tuple(batch or [1]),
                    device=device,
                    compile=compile,
                    warmup=warmup,
                    repeats=repeats,
                    layouts=layouts,
                ),  # fmt: skip
            )
        else:
            raise BadInput(f"--runtime {runtime}: expected torch or onnxruntime")
        _show(result, json_out, quiet, bench_table)


@app.command()
def export(
    source: Annotated[
        Path, typer.Argument(help="Training checkpoint (anything `convert` takes), or a deploy file repfuse wrote.")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="The .onnx file to write (required).")],
    deploy: Annotated[
        Path | None,
        typer.Argument(help="Deploy weights to export, checked against SOURCE's training model. Default: fuse SOURCE."),
    ] = None,
    arch: ArchOpt = "auto",
    model: ModelOpt = None,
    variant: VariantOpt = None,
    key: KeyOpt = None,
    resolution: ResOpt = None,
    opset: Annotated[
        int, typer.Option("--opset", help="ONNX opset the exporter writes (18 or newer; default 20).")
    ] = 20,
    static_batch: Annotated[
        bool, typer.Option("--static-batch", help="Fix the batch dimension at --batch (default: dynamic).")
    ] = False,
    inputs: Annotated[
        Path | None,
        typer.Option(
            "--inputs",
            help="Also compare on these images: (N,C,H,W) in .pt, .npy or .safetensors, or an image folder "
            "(DIR/<class>/* or DIR/*, through the model's evaluation transform; checkpoint SOURCE only).",
        ),
    ] = None,
    batch: Annotated[
        int | None,
        typer.Option(
            "--batch",
            min=1,
            help="Seeded check: batch 1 and N (dynamic; default 3), or the fixed batch (--static-batch; default 1).",
        ),
    ] = None,
    seed: SeedOpt = 0,
    atol: AtolOpt = None,
    rtol: RtolOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output file.")] = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    trust_checkpoint: TrustOpt = False,
    assume_annealed: AnnealOpt = False,
) -> None:
    """Export the deploy model to ONNX, proven equal to the training model under onnxruntime (needs repfuse[onnx])."""
    with _errors(json_out):
        from .export import export_file
        from .report import export_report

        if trust_checkpoint and not quiet:
            print(f"repfuse: warning: --trust-checkpoint: unpickling {source} may run code from it", file=sys.stderr)
        ctx, on_step = _progress(not (quiet or json_out), steps=6)
        with ctx:
            result = export_file(
                _source(source, arch, model, variant, key, trust_checkpoint, assume_annealed, resolution),
                output,
                deploy,
                opset=opset,
                static_batch=static_batch,
                batch=batch,
                inputs=inputs,
                seed=seed,
                atol=atol,
                rtol=rtol,
                force=force,
                on_step=on_step,
            )
        _show(result, json_out, quiet, export_report)


@app.command()
def diff(
    a: Annotated[Path, typer.Argument(help="A deploy file (.safetensors).")],
    b: Annotated[Path, typer.Argument(help="Another deploy file, e.g. a rebuild of the first.")],
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Compare two deploy files tensor by tensor: exit 0 identical, 1 they differ (largest difference in ulps)."""
    with _errors(json_out):
        from .deploydiff import diff_files
        from .report import diff_report

        result = diff_files(a, b)
        _show(result, json_out, quiet, diff_report)
    raise typer.Exit(result.exit_code)


@app.command()
def archs(json_out: JsonOpt = False) -> None:
    """List the registered fusers (built-in and plugins)."""
    from .registry import list_fusers
    from .report import archs_table

    infos = list_fusers()
    if json_out:
        _emit_json({"fusers": [{"name": i.name, "origin": i.origin, "summary": i.summary} for i in infos]})
    else:
        out_console.print(archs_table(infos))


@app.callback(invoke_without_command=True)
def _root(
    version: Annotated[bool, typer.Option("--version", "-V", help="Print the version and exit.")] = False,
) -> None:
    if version:
        from . import __version__

        print(f"repfuse {__version__}")
        raise typer.Exit(0)


def _on_sigterm(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt  # CI cancellations send SIGTERM: clean up like Ctrl-C, no partial file


def main() -> None:
    """Entry point: usage errors, like every other error, become one stderr line (and JSON)."""
    try:  # typer >= 0.16 vendors click
        from typer._click import exceptions as cx
    except ImportError:  # pragma: no cover
        from click import exceptions as cx  # type: ignore[no-redef]

    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        code = app(standalone_mode=False, prog_name="repfuse")
    except cx.NoArgsIsHelpError as e:
        e.show()
        sys.exit(e.exit_code)
    except cx.UsageError as e:
        hint = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
        exc = _fail(e.format_message().splitlines()[0] + hint, 2, "--json" in sys.argv[1:])
        sys.exit(exc.exit_code)
    except typer.Abort:
        print("repfuse: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
