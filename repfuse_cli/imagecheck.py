"""Verification on a folder of real images, through the model's own evaluation transform.

    images.list_images -> images.batches -> both models -> running figures -> ImageResult

Only running sums and a few per-image numbers are kept, so memory stays flat whatever the
folder's size. The figures are those a model card reports (top-1/top-5 agreement and, with
labels, accuracy of both models) plus the numbers the tolerance rule of
``verification.verify_models`` needs (max|train - deploy| and max|train| over every image), so the
pipeline can decide pass/fail exactly as it does for tensor inputs.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .errors import BadInput, first_line
from .fuser import EvalTransform
from .images import Batch, ImageOptions, ImageSet, Progress, Skipped, batches, list_images, resolve_transform
from .verification import TOLERANCES, VerifyResult, compute_dtype, exact_float32, locate_divergence, run

if TYPE_CHECKING:  # pragma: no cover
    from .checkpoint import Checkpoint
    from .fuser import Fuser, Plan

WORST = 5  # how many most-disagreeing images the result names
TOPK = 5


@dataclass
class Disagreement:
    file: str
    rel_diff: float  # max|train - deploy| / max|train| of this image
    max_abs_diff: float
    train_top1: int | None
    deploy_top1: int | None
    label: int | None


@dataclass
class ImageResult:
    """The figures of one image folder (the JSON ``verify.images`` object), plus what the
    tolerance rule needs (``max_abs_diff``, ``scale``) and its verdict."""

    folder: str
    transform: str  # EvalTransform.describe()
    images: int  # images evaluated
    skipped: int  # unreadable images left out
    skipped_names: list[str]
    classes: int | None  # None: a flat folder (no labels)
    top1_agreement: float | None  # classifiers only
    top5_agreement: float | None  # fraction of images whose top-5 sets are equal
    max_abs_diff: float
    max_rel_diff: float  # max|train - deploy| / max|train| over every image
    cosine: float
    scale: float  # max|train| over every image
    accuracy_train: float | None = None  # top-1, with labels
    accuracy_deploy: float | None = None
    top5_accuracy_train: float | None = None
    top5_accuracy_deploy: float | None = None
    disagree_most: list[Disagreement] = field(default_factory=list)  # worst first
    finite: bool = True  # every deploy output finite
    passed: bool = True  # the tolerance rule
    atol: float = 0.0
    rtol: float = 0.0
    min_agreement: float | None = None
    agreement_passed: bool = True  # top-1 agreement >= min_agreement (True without one)
    diverges_at: str | None = None  # first shared module that differs, on the worst image (on failure)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def verify_result(self, *, dtype: torch.dtype, device: str, inputs: str) -> VerifyResult:
        """The report's ``verify`` object: the tolerance rule's figures as ``verify_models`` gives
        them, this result as ``images``; ``passed`` also needs the --min-agreement check."""
        return VerifyResult(
            max_abs_diff=self.max_abs_diff,
            max_rel_diff=self.max_rel_diff,
            cosine=self.cosine,
            top1_agreement=self.top1_agreement,
            passed=self.passed and self.agreement_passed,
            atol=self.atol,
            rtol=self.rtol,
            dtype=str(dtype).replace("torch.", ""),
            compute_dtype=str(compute_dtype(dtype)).replace("torch.", ""),
            device=device,
            inputs=inputs,
            diverges_at=self.diverges_at,
            accuracy_train=self.accuracy_train,
            accuracy_deploy=self.accuracy_deploy,
            images=self,
        )

    def failure(self) -> str | None:
        """Why this result fails (one line), or None when it passes."""
        if not self.passed:
            where = f"; outputs first diverge at `{self.diverges_at}`" if self.diverges_at else ""
            worst = ", ".join(d.file for d in self.disagree_most[:3])
            return (
                f"max abs diff {self.max_abs_diff:.3g}, max rel diff {self.max_rel_diff:.3g} "
                f"(tolerance atol {self.atol:g}, rtol {self.rtol:g}) on {self.images} images{where}"
                + (f"; disagree most: {worst}" if worst else "")
            )
        if not self.agreement_passed:
            return (
                f"top-1 agreement {self.top1_agreement:.4f} on {self.images} images is below "
                f"--min-agreement {self.min_agreement:g}"
            )
        return None


class _Running:
    """Running sums over batches of (train, deploy) outputs: constant memory."""

    def __init__(self) -> None:
        self.n = 0
        self.diff = 0.0
        self.scale = 0.0
        self.dot = self.aa = self.bb = 0.0
        self.top1 = self.top5 = 0
        self.classifier: bool | None = None
        self.acc = [0, 0]
        self.acc5 = [0, 0]
        self.labelled = 0
        self.finite = True
        self.worst: list[tuple[float, int, Disagreement]] = []  # min-heap of the WORST largest
        self.worst_x: dict[str, Tensor] = {}

    def add(self, a: Tensor, b: Tensor, batch: Batch, x: Tensor) -> None:
        a, b = a.detach().double().cpu(), b.detach().double().cpu()
        n = a.shape[0]
        fa, fb = a.reshape(n, -1), b.reshape(n, -1)
        d = (fa - fb).abs()
        per_diff = d.amax(1)
        per_scale = fa.abs().amax(1)
        self.finite = self.finite and bool(torch.isfinite(b).all())
        self.diff = max(self.diff, per_diff.max().item())
        self.scale = max(self.scale, per_scale.max().item())
        self.dot += (fa * fb).sum().item()
        self.aa += (fa * fa).sum().item()
        self.bb += (fb * fb).sum().item()
        classifier = a.dim() == 2 and a.shape[1] > 1
        self.classifier = classifier if self.classifier is None else self.classifier and classifier
        t1a = t1b = None
        if classifier:
            k = min(TOPK, a.shape[1])
            ka, kb = a.topk(k, 1).indices, b.topk(k, 1).indices
            t1a, t1b = ka[:, 0], kb[:, 0]
            self.top1 += int((t1a == t1b).sum())
            self.top5 += int((ka.sort(1).values == kb.sort(1).values).all(1).sum())
            if batch.labels is not None:
                lab = batch.labels
                self.labelled += n
                for j, top in enumerate((ka, kb)):
                    self.acc[j] += int((top[:, 0] == lab).sum())
                    self.acc5[j] += int((top == lab[:, None]).any(1).sum())
        rel = torch.where(per_scale > 0, per_diff / per_scale.clamp_min(1e-300), per_diff * math.inf)
        rel = torch.nan_to_num(rel, nan=0.0)
        for j in range(n):
            entry = Disagreement(
                file=batch.names[j],
                rel_diff=float(rel[j]),
                max_abs_diff=float(per_diff[j]),
                train_top1=None if t1a is None else int(t1a[j]),
                deploy_top1=None if t1b is None else int(t1b[j]),
                label=None if batch.labels is None else int(batch.labels[j]),
            )
            key = (entry.rel_diff, -(self.n + j), entry)  # ties: the earlier image stays
            if len(self.worst) < WORST:
                heapq.heappush(self.worst, key)
                self.worst_x[entry.file] = x[j : j + 1].clone()
            elif key[:2] > self.worst[0][:2]:
                dropped = heapq.heappushpop(self.worst, key)[2]
                self.worst_x.pop(dropped.file, None)
                self.worst_x[entry.file] = x[j : j + 1].clone()
        self.n += n

    def disagree_most(self) -> list[Disagreement]:
        return [e for *_, e in sorted(self.worst, key=lambda k: k[:2], reverse=True)]


def _forward(model: nn.Module, x: Tensor, dtype: torch.dtype, device: str, which: str) -> Tensor:
    try:
        return run(model, x, dtype, device)
    except (RuntimeError, ValueError, IndexError) as e:  # inputs the network cannot take
        raise BadInput(
            f"the {which} model cannot run on images of shape {tuple(x.shape[1:])} "
            f"(check --resolution / the transform): {first_line(e)}"
        ) from None


def evaluate_images(
    train: nn.Module,
    deploy: nn.Module,
    folder: str | Path | ImageSet,
    transform: EvalTransform,
    *,
    batch: int = 32,
    limit: int | None = None,
    class_map: str | Path | Sequence[str] | None = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    atol: float | None = None,
    rtol: float | None = None,
    min_agreement: float | None = None,
    num_classes: int | None = None,
    channels: int = 3,
    exclude: Sequence[str] = (),
    progress: Progress | None = None,
) -> ImageResult:
    """Run both models over an image folder through ``transform`` and compare them.

    ``dtype``: the checkpoint's dtype (the models run in ``compute_dtype(dtype)``, and the
    default tolerances are that dtype's, as in ``verify_models``); pass when
    max|train - deploy| <= atol + rtol * max|train| over every image and every deploy output is
    finite. ``min_agreement``: top-1 agreement below it fails too (``agreement_passed``).
    """
    t0 = time.perf_counter()
    d_atol, d_rtol = TOLERANCES.get(dtype, TOLERANCES[torch.float32])
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    if not (math.isfinite(atol) and math.isfinite(rtol) and atol >= 0 and rtol >= 0):
        raise BadInput(f"tolerances must be finite and >= 0 (atol {atol}, rtol {rtol})")
    if min_agreement is not None and not (0 <= min_agreement <= 1):
        raise BadInput(f"--min-agreement {min_agreement}: must be between 0 and 1")
    images = (
        folder
        if isinstance(folder, ImageSet)
        else list_images(folder, class_map=class_map, limit=limit, num_classes=num_classes)
    )
    cdt = compute_dtype(dtype)
    skipped = Skipped()
    acc = _Running()
    total = len(images.files)
    with exact_float32():
        for b in batches(images, transform, batch, channels, skipped):
            a = _forward(train, b.x, cdt, device, "training")
            d = _forward(deploy, b.x, cdt, device, "deploy")
            if a.shape != d.shape:
                raise BadInput(
                    f"the deploy model's output has shape {tuple(d.shape)}, the training model's "
                    f"{tuple(a.shape)}: not a deploy model of this checkpoint"
                )
            if images.classes is not None and a.dim() == 2 and len(images.classes) > a.shape[1]:
                raise BadInput(
                    f"--inputs {images.root}: {len(images.classes)} classes, but the model has {a.shape[1]} outputs"
                )
            acc.add(a, d, b, b.x)
            if progress is not None:
                done = acc.n + skipped.count
                progress(done, total, acc.n / max(time.perf_counter() - t0, 1e-9))
    if acc.n == 0:
        raise BadInput(
            f"--inputs {images.root}: none of its {total} images could be read "
            f"(e.g. {skipped.names[0] if skipped.names else '?'})"
        )
    cls = bool(acc.classifier)
    if min_agreement is not None and not cls:
        raise BadInput("--min-agreement: the model's outputs are not class scores (no top-1 to agree on)")
    passed = bool(acc.diff <= atol + rtol * acc.scale) and acc.finite
    worst = [w for w in acc.disagree_most() if w.rel_diff > 0]
    where = None
    if not passed and worst:
        with exact_float32():
            where = locate_divergence(train, deploy, acc.worst_x[worst[0].file], cdt, atol, rtol, device, exclude)
    norm = math.sqrt(acc.aa) * math.sqrt(acc.bb)
    cosine = acc.dot / max(norm, 1e-8) if math.isfinite(norm) else float("nan")
    rel = acc.diff / acc.scale if acc.scale > 0 else (0.0 if acc.diff == 0 else math.inf)
    top1 = acc.top1 / acc.n if cls else None
    labelled = cls and acc.labelled > 0
    return ImageResult(
        folder=str(images.root),
        transform=transform.describe(),
        images=acc.n,
        skipped=skipped.count,
        skipped_names=skipped.names,
        classes=None if images.classes is None else len(images.classes),
        top1_agreement=top1,
        top5_agreement=acc.top5 / acc.n if cls else None,
        max_abs_diff=acc.diff,
        max_rel_diff=rel,
        cosine=cosine,
        scale=acc.scale,
        accuracy_train=acc.acc[0] / acc.labelled if labelled else None,
        accuracy_deploy=acc.acc[1] / acc.labelled if labelled else None,
        top5_accuracy_train=acc.acc5[0] / acc.labelled if labelled else None,
        top5_accuracy_deploy=acc.acc5[1] / acc.labelled if labelled else None,
        disagree_most=worst,
        finite=acc.finite,
        passed=passed,
        atol=atol,
        rtol=rtol,
        min_agreement=min_agreement,
        agreement_passed=min_agreement is None or (top1 is not None and top1 >= min_agreement),
        diverges_at=where,
        seconds=round(time.perf_counter() - t0, 3),
    )


def report_lines(images: dict[str, Any]) -> list[str]:
    """The ``verify.images`` object as the report's lines (plain text; report.py styles them)."""

    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{v * 100:.2f}%"

    lines = [f"  transform: {images['transform']}"]
    if images["skipped"]:
        lines.append(f"  {images['skipped']} unreadable images skipped: {', '.join(images['skipped_names'])}")
    if images["top1_agreement"] is not None:
        line = f"  agreement train/deploy: top-1 {pct(images['top1_agreement'])}, top-5 {pct(images['top5_agreement'])}"
        if images.get("min_agreement") is not None:
            verdict = "ok" if images["agreement_passed"] else "BELOW"
            line += f" (--min-agreement {images['min_agreement'] * 100:.2f}%: {verdict})"
        lines.append(line)
    if images["accuracy_train"] is not None:
        lines.append(
            f"  accuracy: train top-1 {pct(images['accuracy_train'])} top-5 {pct(images['top5_accuracy_train'])}; "
            f"deploy top-1 {pct(images['accuracy_deploy'])} top-5 {pct(images['top5_accuracy_deploy'])}"
        )
    worst = images.get("disagree_most") or []
    if worst:
        lines.append(
            "  disagree most: "
            + ", ".join(
                f"{d['file']} (rel {d['rel_diff']:.3g}"
                + (f", top-1 {d['train_top1']} vs {d['deploy_top1']}" if d["train_top1"] != d["deploy_top1"] else "")
                + ")"
                for d in worst
            )
        )
    return lines


def verify_folder(
    train: nn.Module,
    deploy: nn.Module,
    fuser: Fuser,
    plan: Plan,
    ckpt: Checkpoint,
    images: ImageSet,
    *,
    dtype: torch.dtype,
    batch: int,
    device: str = "cpu",
    atol: float | None = None,
    rtol: float | None = None,
    resolution: int | None = None,
    exclude: Sequence[str] = (),
    options: ImageOptions | None = None,
) -> VerifyResult:
    """What the pipeline runs for ``--inputs DIR``: the family's transform with the overrides,
    both models over the folder, the ``VerifyResult`` with ``images`` filled in."""
    o = options or ImageOptions()
    t = resolve_transform(
        fuser, plan, ckpt, resolution=resolution, crop_pct=o.crop_pct, interpolation=o.interpolation, mean=o.mean,
        std=o.std,
    )  # fmt: skip
    r = evaluate_images(
        train, deploy, images, t, batch=batch, dtype=dtype, device=device, atol=atol, rtol=rtol,
        min_agreement=o.min_agreement, channels=plan.input_size[0], exclude=exclude, progress=o.progress,
    )  # fmt: skip
    return r.verify_result(dtype=dtype, device=device, inputs=images.describe())
