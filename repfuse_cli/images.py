"""Image folders as model inputs: listing (class folders, class maps), the model's own evaluation
transform, decoding, and batches.

    list_images -> (decode + EvalTransform, in threads) -> batches

Images are decoded in threads, one batch ahead of the consumer, so memory stays flat whatever the
folder's size. ``imagecheck.py`` runs two models over these batches and compares them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .errors import BadInput, first_line
from .fuser import EvalTransform

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from .checkpoint import Checkpoint
    from .fuser import Fuser, Plan

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
SKIPPED_NAMES = 5  # how many unreadable images the result names

# (images done, images in all, images per second); called after every batch
Progress = Callable[[int, int, float], None]


# --------------------------------------------------------------------------- listing


@dataclass
class ImageSet:
    """The images of a folder, in a stable (sorted) order, and their labels if it has classes."""

    root: Path
    files: list[str]  # paths relative to root, POSIX style, sorted
    labels: list[int] | None  # None: a flat folder
    classes: list[str] | None  # class index -> folder name (the class map's order when given)
    total: int  # images in the folder before --limit

    def describe(self) -> str:
        n = len(self.files)
        what = f"{n} images from {self.root.name or self.root}"
        if self.total > n:
            what += f" (first {n} of {self.total})"
        if self.classes is not None:
            what += f" in {len(self.classes)} classes"
        return what


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _images_under(folder: Path) -> list[Path]:
    """Image files anywhere below ``folder`` (links followed, hidden entries skipped), unsorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        out += [Path(dirpath, f) for f in filenames if _is_image(f)]
    return out


def read_class_map(path: str | Path) -> list[str]:
    """Folder names, one a line, in the model's class order (blank lines and # comments ignored)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"--class-map {path}: cannot read it ({first_line(e, 120)})") from None
    names = [line.strip() for line in text.splitlines()]
    names = [n for n in names if n and not n.startswith("#")]
    if not names:
        raise BadInput(f"--class-map {path}: holds no class names (one folder name per line)")
    seen: set[str] = set()
    dup = next((n for n in names if n in seen or seen.add(n)), None)  # type: ignore[func-returns-value]
    if dup is not None:
        raise BadInput(f"--class-map {path}: `{dup}` appears twice")
    return names


def list_images(
    folder: str | Path,
    *,
    class_map: str | Path | Sequence[str] | None = None,
    limit: int | None = None,
    num_classes: int | None = None,
) -> ImageSet:
    """List an image folder: ``DIR/<class>/*`` (labels: sorted folder names' indices, or the
    line numbers of ``class_map``) or a flat ``DIR/*`` (no labels). ``limit``: the first N in
    sorted order. ``num_classes``: the model's outputs (more classes than that is BadInput)."""
    root = Path(folder)
    if not root.is_dir():
        raise BadInput(f"--inputs {root}: no such folder (or file)")
    if limit is not None and limit < 1:
        raise BadInput(f"--limit {limit}: must be at least 1")
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
        subdirs = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
        top = [e.name for e in entries if e.is_file() and _is_image(e.name)]
        per_class = {d: _images_under(root / d) for d in subdirs}
    except OSError as e:
        raise BadInput(f"--inputs {root}: cannot list it ({first_line(e, 120)})") from None
    labelled = any(per_class.values())
    if labelled and top:
        raise BadInput(
            f"--inputs {root}: holds both images ({top[0]}) and class folders; "
            "use one folder per class, or a flat folder of images"
        )
    if not labelled and not top:
        raise BadInput(f"--inputs {root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in it or in its class folders")

    files: list[tuple[str, int | None]]
    classes: list[str] | None = None
    if not labelled:
        if class_map is not None:
            raise BadInput(f"--class-map: {root} is a flat folder (no class folders), so it has no labels to map")
        files = [(name, None) for name in top]
    else:
        if class_map is None:
            classes = list(subdirs)  # torchvision ImageFolder: every class folder, sorted
        else:
            classes = list(class_map) if not isinstance(class_map, (str, Path)) else read_class_map(class_map)
            where = "--class-map" if isinstance(class_map, (str, Path)) else "class map"
            unknown = [d for d in subdirs if d not in classes]
            if unknown:
                raise BadInput(
                    f"{where} does not match the folders: {len(unknown)} class folder(s) of {root} "
                    f"are not in it (e.g. `{unknown[0]}`)"
                )
        index = {name: i for i, name in enumerate(classes)}
        files = [(p.relative_to(root).as_posix(), index[d]) for d, paths in per_class.items() for p in paths]
        if num_classes is not None and len(classes) > num_classes:
            raise BadInput(
                f"--inputs {root}: {len(classes)} classes"
                + (" in the class map" if class_map is not None else " (class folders)")
                + f", but the model has {num_classes} outputs"
            )
    files.sort(key=lambda f: f[0])
    total = len(files)
    if limit is not None:
        files = files[:limit]
    return ImageSet(
        root=root,
        files=[f for f, _ in files],
        labels=None if classes is None else [int(c) for _, c in files],  # type: ignore[arg-type]
        classes=classes,
        total=total,
    )


# --------------------------------------------------------------------------- the transform


def _interpolation(name: str) -> Any:
    from torchvision.transforms import InterpolationMode

    return InterpolationMode(name)


def apply_transform(img: Image.Image, t: EvalTransform) -> Tensor:
    """``t`` on one decoded PIL image: what torchvision/timm's eval pipelines compute
    (Resize -> CenterCrop -> ToTensor -> Normalize), as a float32 (C, size, size) tensor."""
    import torchvision.transforms.functional as F

    mode = _interpolation(t.interpolation)
    s = t.scale_size
    if t.crop_pct is None:  # warp to the square, no crop
        img = F.resize(img, [t.size, t.size], interpolation=mode)
    elif t.crop_mode == "squash":
        img = F.center_crop(F.resize(img, [s, s], interpolation=mode), [t.size, t.size])
    elif t.crop_mode == "border":  # timm's own classes: its longest-side rule and padding fill
        from timm.data.transforms import CenterCropOrPad, ResizeKeepRatio

        img = ResizeKeepRatio((s, s), interpolation=t.interpolation, longest=1.0)(img)
        fill: Any = tuple(round(255 * v) for v in t.mean)
        img = CenterCropOrPad(t.size, fill=fill)(img)
    else:  # shorter side to s, center crop
        img = F.center_crop(F.resize(img, s, interpolation=mode), [t.size, t.size])
    x = F.pil_to_tensor(img).float().div(255)
    return F.normalize(x, list(t.mean), list(t.std))


def decode(path: Path, t: EvalTransform, channels: int = 3) -> Tensor:
    """One image file through ``t``; any decoding problem raises (the caller skips the file)."""
    from PIL import Image

    with Image.open(path) as f:
        img = f.convert("L" if channels == 1 else "RGB")  # decodes the whole file
    return apply_transform(img, t)


# --------------------------------------------------------------------------- batches


@dataclass
class Batch:
    x: Tensor  # (B, C, size, size)
    labels: Tensor | None
    names: list[str]


@dataclass
class Skipped:
    count: int = 0
    names: list[str] = field(default_factory=list)  # the first few, with why

    def add(self, name: str, why: str) -> None:
        self.count += 1
        if len(self.names) < SKIPPED_NAMES:
            self.names.append(f"{name} ({why})")


def batches(
    images: ImageSet,
    t: EvalTransform,
    batch: int,
    channels: int = 3,
    skipped: Skipped | None = None,
    workers: int | None = None,
) -> Iterator[Batch]:
    """Decoded, transformed batches of ``images`` in order; unreadable files are counted in
    ``skipped`` and left out. Decoding runs in threads, one batch ahead of the consumer (so at
    most two batches of images are in memory)."""
    if batch < 1:
        raise BadInput(f"--batch {batch}: must be at least 1")
    skipped = skipped if skipped is not None else Skipped()
    workers = workers or max(1, min(8, (os.cpu_count() or 1)))
    chunks = [range(i, min(i + batch, len(images.files))) for i in range(0, len(images.files), batch)]

    def submit(pool: ThreadPoolExecutor, idx: range) -> list[Future]:
        return [pool.submit(decode, images.root / images.files[i], t, channels) for i in idx]

    with ThreadPoolExecutor(workers) as pool:
        pending = submit(pool, chunks[0]) if chunks else []
        for k, idx in enumerate(chunks):
            current, pending = pending, (submit(pool, chunks[k + 1]) if k + 1 < len(chunks) else [])
            xs, labels, names = [], [], []
            for i, fut in zip(idx, current, strict=True):
                try:
                    xs.append(fut.result())
                except Exception as e:  # noqa: BLE001 - PIL raises many types for a bad file
                    skipped.add(images.files[i], first_line(e, 80))
                    continue
                names.append(images.files[i])
                if images.labels is not None:
                    labels.append(images.labels[i])
            if xs:
                yield Batch(torch.stack(xs), torch.tensor(labels) if images.labels is not None else None, names)


# --------------------------------------------------------------------------- for the pipeline / CLI


def parse_floats(text: str | Sequence[float] | None, flag: str) -> tuple[float, ...] | None:
    """``--mean 0.5,0.5,0.5`` (or one number for every channel) as a tuple; None stays None."""
    if text is None or not isinstance(text, str):
        return None if text is None else tuple(float(v) for v in text)
    try:
        values = tuple(float(v) for v in text.replace(" ", ",").split(",") if v)
    except ValueError:
        raise BadInput(f"{flag} {text}: expected comma-separated numbers, e.g. 0.485,0.456,0.406") from None
    if not values:
        raise BadInput(f"{flag}: expected comma-separated numbers")
    return values


def resolve_transform(
    fuser: Fuser,
    plan: Plan,
    ckpt: Checkpoint,
    *,
    resolution: int | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
    mean: str | Sequence[float] | None = None,
    std: str | Sequence[float] | None = None,
) -> EvalTransform:
    """The family's evaluation transform for this checkpoint (``fuser.eval_transform``: the
    official code's, with the checkpoint's recorded args first), then the user's overrides
    (``--resolution``, ``--crop-pct``, ``--interpolation``, ``--mean``, ``--std``)."""
    t = fuser.eval_transform(plan, ckpt)
    return t.with_overrides(
        size=resolution,
        crop_pct=crop_pct,
        interpolation=interpolation,
        mean=parse_floats(mean, "--mean"),
        std=parse_floats(std, "--std"),
    )


@dataclass
class ImageOptions:
    """What the CLI's image flags ask for (``--class-map``, ``--limit``, transform overrides,
    ``--min-agreement``) and the progress callback; the defaults change nothing."""

    class_map: str | Path | None = None
    limit: int | None = None
    mean: str | Sequence[float] | None = None
    std: str | Sequence[float] | None = None
    crop_pct: float | None = None
    interpolation: str | None = None
    min_agreement: float | None = None
    progress: Progress | None = None


def is_folder(inputs: str | Path | None) -> bool:
    """``--inputs`` names an image folder (else a tensor file, or nothing)."""
    return inputs is not None and Path(inputs).is_dir()


def list_for(inputs: str | Path, options: ImageOptions | None = None) -> ImageSet:
    """``list_images`` with the CLI's ``--class-map`` and ``--limit`` (before any model is loaded)."""
    o = options or ImageOptions()
    if o.min_agreement is not None and not (0 <= o.min_agreement <= 1):
        raise BadInput(f"--min-agreement {o.min_agreement}: must be between 0 and 1")
    return list_images(inputs, class_map=o.class_map, limit=o.limit)
