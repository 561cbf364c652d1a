"""The `repfuse` command: parse, call the library, render. Nothing else lives here.

torch is imported inside commands only, so `repfuse --help` and `repfuse archs` start fast.
Errors become one line on stderr and the documented exit code in one place: `_errors`
(cli_common.py, with the shared options, output and progress helpers).
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from .cli_common import (
    AnnealOpt,
    ArchOpt,
    AtolOpt,
    ClassMapOpt,
    CropPctOpt,
    DeviceOpt,
    ForceOpt,
    ImgBatchOpt,
    InputsOpt,
    InterpOpt,
    JsonOpt,
    KeyOpt,
    LimitOpt,
    MeanOpt,
    MinAgreeOpt,
    ModelOpt,
    QuietOpt,
    ResOpt,
    RtolOpt,
    SeedOpt,
    StdOpt,
    TrustOpt,
    VariantOpt,
    _batch,
    _emit_json,
    _errors,
    _fail,
    _image_options,
    _one_step,
    _progress,
    _show,
    _source,
    _warn_trust,
    out_console,
)

app = typer.Typer(
    name="repfuse",
    help="Fuse re-parameterized CNN checkpoints (VanillaNet, RepVGG, any conv-BN network) into "
    "verified deploy-mode safetensors. Exit codes: 0 ok, 1 verification failed, 2 bad input.",
    no_args_is_help=True,
    add_completion=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)


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
    force: ForceOpt = False,
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

        _warn_trust(checkpoint, trust_checkpoint and not quiet)
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
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    trust_checkpoint: TrustOpt = False,
    assume_annealed: AnnealOpt = False,
) -> None:
    """Export the deploy model to ONNX, proven equal to the training model under onnxruntime (needs repfuse[onnx])."""
    with _errors(json_out):
        from .export import export_file
        from .report import export_report

        _warn_trust(source, trust_checkpoint and not quiet)
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
