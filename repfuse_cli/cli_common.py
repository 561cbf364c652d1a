"""What every `repfuse` command shares: its options, its output (JSON, tables, progress bars) and
the one place where errors become a stderr line and an exit code (``_errors``).

``cli.py`` holds the commands. Like it, this module imports torch only inside functions, so
`repfuse --help` starts fast.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Protocol, TypeVar

import typer
from rich.console import Console, RenderableType

from .errors import RepfuseError, first_line

if TYPE_CHECKING:  # pragma: no cover
    from .pipeline import Source

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
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite an existing output file.")]
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


def _warn_trust(path: Path, warn: bool) -> None:
    """The one warning --trust-checkpoint earns (unless --quiet): unpickling may run the file's code."""
    if warn:
        print(f"repfuse: warning: --trust-checkpoint: unpickling {path} may run code from it", file=sys.stderr)
