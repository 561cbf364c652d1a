"""Rendering results as rich tables. Takes the typed results the library returns (the same
objects ``--json`` prints with ``to_dict()``), so the tables and the JSON always agree."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:  # pragma: no cover
    from .deploydiff import DiffResult
    from .registry import FuserInfo
    from .results import BenchReport, ConversionResult, ExportResult, InspectReport, VerifyReport
    from .stats import ModelStats
    from .verification import VerifyResult

ROWS = (
    ("params", "Parameters", "count"),
    ("flops", "FLOPs (2 x MACs)", "count"),
    ("conv_layers", "Conv layers", "int"),
    ("linear_layers", "Linear layers", "int"),
    ("bn_layers", "BatchNorm layers", "int"),
    ("norm_ops", "Norm ops / forward", "int"),
    ("elementwise_ops", "Elementwise ops / forward", "int"),
    ("weight_bytes", "Weight bytes", "bytes"),
)


def human(n: float | None, kind: str = "count") -> str:
    if n is None:
        return "n/a"
    if kind == "int":
        return f"{int(n):,}"
    units = ("", "K", "M", "G", "T") if kind == "count" else (" B", " KiB", " MiB", " GiB", " TiB")
    base = 1000.0 if kind == "count" else 1024.0
    x, i = float(n), 0
    while abs(x) >= base and i < len(units) - 1:
        x, i = x / base, i + 1
    if i == 0:
        return f"{int(x):,}{units[0]}"
    return f"{x:.2f}{units[i]}"


def change(before: float | None, after: float | None) -> str:
    if before is None or after is None:
        return ""
    if before == 0:
        return "" if after == 0 else "new"
    pct = (after - before) / before * 100
    return "0%" if abs(pct) < 0.005 else f"{pct:+.2f}%"


def stats_table(before: ModelStats | None, after: ModelStats | None, resolution: int) -> Table:
    t = Table(title=f"Training model vs deploy model (input {resolution}x{resolution}, batch 1)", title_justify="left")
    t.add_column("")
    t.add_column("train", justify="right")
    t.add_column("deploy", justify="right")
    t.add_column("change", justify="right")
    for key, label, kind in ROWS:
        b, a = getattr(before, key, None), getattr(after, key, None)
        t.add_row(label, human(b, kind), human(a, kind), change(b, a))
    return t


def verify_lines(v: VerifyResult | None) -> list[Text]:
    if v is None:
        return [Text("verification: skipped (--no-verify)", style="yellow")]
    ok = v.passed
    line = Text("verification: ")
    line.append("PASSED" if ok else "FAILED", style="bold green" if ok else "bold red")
    line.append(f"  max abs diff {v.max_abs_diff:.3g}, max rel diff {v.max_rel_diff:.3g}, cosine {v.cosine:.9f}")
    if v.top1_agreement is not None:
        line.append(f", top-1 agreement {v.top1_agreement * 100:.2f}%")
    lines = [
        line,
        Text(
            f"  on {v.inputs}; {v.dtype} weights computed in {v.compute_dtype} "
            f"on {v.device}; tolerance atol {v.atol:g} + rtol {v.rtol:g} x max|output|",
            style="dim",
        ),
    ]
    if v.accuracy_train is not None and v.accuracy_deploy is not None and v.images is None:
        lines.append(
            Text(
                f"  accuracy on the labelled inputs: train {v.accuracy_train * 100:.2f}%, "
                f"deploy {v.accuracy_deploy * 100:.2f}%"
            )
        )
    if v.images is not None:
        from .imagecheck import report_lines

        lines += [Text(line) for line in report_lines(v.images.to_dict())]
    if v.diverges_at:
        lines.append(Text(f"  outputs first diverge at `{v.diverges_at}`", style="red"))
    return lines


def conversion_report(r: ConversionResult) -> Group:
    parts: list[Any] = [stats_table(r.before, r.after, r.resolution)]
    key = r.key or "(bare state_dict)"
    if r.stripped_prefixes:
        key += f" (key prefixes {', '.join(f'`{p}`' for p in r.stripped_prefixes)} stripped)"
    if r.ema_available and r.key not in r.ema_available:
        key += f"  [yellow](EMA weights also present: {', '.join(r.ema_available)}; use --key to choose them)[/]"
    parts.append(
        Text.from_markup(
            f"architecture: [bold]{r.arch}[/]  variant: [bold]{r.variant}[/]  layout: {r.layout}  dtype: {r.dtype}"
        )
    )
    parts.append(Text.from_markup(f"weights: {key}"))
    desc = {
        "bn_folded": "BN folds",
        "branch_merges": "branch merges",
        "chain_merges": "1x1 chain merges",
        "timm_reparameterized": "modules re-parameterized by timm",
        "bn_folded_across_concat": "of them across a concat",
        "bn_folded_into_next": "of them into the next layer",
    }
    parts.append(Text("fused: " + ", ".join(f"{v} {desc.get(k, k)}" for k, v in r.fused.items())))
    if r.unfused:
        parts.append(Text(f"left unfused: {len(r.unfused)}", style="yellow"))
        for u in r.unfused[:8]:
            parts.append(Text(f"  {u.module}: {u.reason}", style="yellow"))
        if len(r.unfused) > 8:
            parts.append(Text(f"  ... and {len(r.unfused) - 8} more (see --json)", style="yellow"))
    parts += [Text(f"note: {n}", style="yellow") for n in r.notes]
    fallback = {s.counted_with for s in (r.before, r.after) if s is not None and s.counted_with != "shapes"}
    parts += [Text(f"note: figures counted with {c}", style="dim") for c in sorted(fallback)]
    parts.extend(verify_lines(r.verify))
    if r.output:
        parts.append(Text.from_markup(f"wrote [bold]{r.output}[/] in {r.seconds or 0:.2f} s"))
    return Group(*parts)


def archs_table(infos: Iterable[FuserInfo]) -> Table:
    t = Table(title="Registered fusers (--arch)", title_justify="left")
    t.add_column("name", style="bold")
    t.add_column("origin")
    t.add_column("what it fuses")
    for i in infos:
        t.add_row(i.name, i.origin, i.summary)
    return t


def verify_report(r: VerifyReport) -> Group:
    parts: list[Any] = [
        Text.from_markup(f"checkpoint: [bold]{r.checkpoint}[/] (weights: {r.key or 'bare state_dict'})"),
        Text.from_markup(f"deploy:     [bold]{r.deploy}[/]"),
        Text(f"architecture: {r.arch}  variant: {r.variant}  layout: {r.layout}"),
    ]
    parts += [Text(f"note: {n}", style="yellow") for n in r.notes]
    parts += verify_lines(r.verify)
    return Group(*parts)


def inspect_report(r: InspectReport) -> Group:
    t = Table(title=f"{r.file} ({r.format}, {human(r.size_bytes, 'bytes')})", title_justify="left")
    t.add_column("entry", style="bold")
    t.add_column("holds")
    for k, v in r.entries.items():
        mark = "  <- weights used" if k == r.key else ""
        t.add_row(k, v + mark)
    if not r.entries:
        t.add_row("(bare state_dict)", f"{r.tensors} tensors")
    parts: list[Any] = [t]
    parts.append(
        Text(
            f"mode: {r.mode}  architecture: {r.arch}  variant: {r.variant}  layout: {r.layout or '-'}  dtype: {r.dtype}"
        )
    )
    if r.epoch is not None or r.recorded_arch:
        parts.append(Text(f"recorded: epoch {r.epoch}, model {r.recorded_arch}"))
    if r.params is not None:
        line = f"parameters: {human(r.params)}"
        if r.params_after is not None:
            line += f" -> {human(r.params_after)} after fusion ({change(r.params, r.params_after)})"
        parts.append(Text(line))
    if r.would_fuse:
        wf = r.would_fuse
        parts.append(
            Text(
                f"a conversion would fuse: {wf.get('bn_folded', 0)} BN folds, "
                f"{wf.get('branch_merges', 0)} branch merges, {wf.get('chain_merges', 0)} 1x1 chain merges;"
                f" {wf.get('unfused', 0)} BN left unfused"
            )
        )
    parts += [Text(f"warning: {w}", style="yellow") for w in r.warnings]
    return Group(*parts)


def bench_table(r: BenchReport) -> Table:
    t = Table(
        title=f"{r.variant} ({r.arch}) on {r.device}, {r.threads} threads, "
        f"{r.resolution}x{r.resolution}, median of {r.repeats} after {r.warmup} warm-up",
        title_justify="left",
    )
    for col in ("batch", "mode", "train ms", "deploy ms", "speedup"):
        t.add_column(col, justify="right")
    for row in r.rows:
        t.add_row(str(row.batch), row.mode, f"{row.train_ms:.3f}", f"{row.deploy_ms:.3f}", f"{row.speedup:.2f}x")
    return t


def ops_table(r: ExportResult) -> Table:
    """ONNX nodes by op type: the training model exported the same way against the deploy graph."""
    before, after = r.ops_before, r.ops_after
    shape = "x".join(str(d) for d in r.input_shape)
    t = Table(title=f"ONNX graph: nodes by op type (opset {r.opset}, input {shape})", title_justify="left")
    t.add_column("op")
    if before is not None:
        t.add_column("train graph", justify="right")
    t.add_column("deploy graph", justify="right")
    if before is not None:
        t.add_column("change", justify="right")
    ops = list(before or {})
    ops += [op for op in after if op not in ops]
    for op in ops:
        a = after.get(op, 0)
        if before is None:
            t.add_row(op, str(a))
            continue
        b = before.get(op, 0)
        style = "green" if a < b else ("red" if a > b else None)
        t.add_row(op, str(b), str(a), f"{a - b:+d}" if a != b else "", style=style)
    if before is not None and r.nodes_before is not None:
        t.add_row("all nodes", str(r.nodes_before), str(r.nodes_after), f"{r.nodes_after - r.nodes_before:+d}")
    else:
        t.add_row("all nodes", str(r.nodes_after))
    return t


def export_report(r: ExportResult) -> Group:
    parts: list[Any] = [ops_table(r)]
    parts.append(
        Text.from_markup(
            f"architecture: [bold]{r.arch}[/]  variant: [bold]{r.variant}[/]  layout: {r.layout}  "
            f"from: {r.source_kind}  weights: {r.key or '(bare state_dict)'}"
        )
    )
    batch = "dynamic" if r.dynamic_batch else f"static ({r.input_shape[0]})"
    where = f" (weights in {r.data_file})" if r.data_file else ""
    parts.append(
        Text(
            f"graph: `{r.input_name}` {r.input_shape} -> `{r.output_name}` {r.output_shape}, batch {batch}, "
            f"{r.export_dtype}, {human(r.bytes, 'bytes')}{where}"
        )
    )
    for n in r.notes:
        parts.append(Text(f"note: {n}", style="yellow"))
    v = r.verify
    line = Text("verification under onnxruntime: ")
    line.append("PASSED" if v.passed else "FAILED", style="bold green" if v.passed else "bold red")
    line.append(f"  max abs diff {v.max_abs_diff:.3g}, max rel diff {v.max_rel_diff:.3g}, cosine {v.cosine:.9f}")
    if v.top1_agreement is not None:
        line.append(f", top-1 agreement {v.top1_agreement * 100:.2f}%")
    parts.append(line)
    reference = "training" if r.source_kind == "checkpoint" else "deploy"
    parts.append(
        Text(
            f"  {v.runtime} (CPU) against the PyTorch {reference} model on {v.inputs}; "
            f"tolerance atol {v.atol:g} + rtol {v.rtol:g} x max|output|",
            style="dim",
        )
    )
    for c in v.checks:
        if not c.passed:
            why = c.error or f"max rel diff {c.max_rel_diff:.3g}"
            parts.append(Text(f"  differs on {c.inputs}: {why}", style="red"))
    if r.output:
        parts.append(Text.from_markup(f"wrote [bold]{r.output}[/] in {r.seconds or 0:.2f} s"))
    return Group(*parts)


def diff_report(r: DiffResult) -> Group:
    parts: list[Any] = [Text(r.summary(), style="bold green" if r.identical else "bold red")]
    if r.differing or r.mismatched or r.only_in_a or r.only_in_b:
        t = Table(title=f"A: {r.a}\nB: {r.b}", title_justify="left")
        for col in ("tensor", "dtype", "shape", "elements differing", "max ulps", "max abs diff"):
            t.add_column(col, justify="left" if col == "tensor" else "right")
        for d in sorted(r.differing, key=lambda d: -d.max_ulps)[:20]:
            t.add_row(
                d.key, d.dtype, str(list(d.shape)), f"{d.differing:,}", f"{d.max_ulps:,}", f"{d.max_abs_diff:.3g}"
            )
        for m in r.mismatched[:10]:
            t.add_row(str(m["key"]), "", "", f"A {m['a']} vs B {m['b']}", "", "")
        for k in r.only_in_a[:10]:
            t.add_row(k, "", "", "only in A", "", "")
        for k in r.only_in_b[:10]:
            t.add_row(k, "", "", "only in B", "", "")
        parts.append(t)
    if r.metadata_differs:
        parts.append(Text(f"metadata differs (not compared): {', '.join(r.metadata_differs)}", style="dim"))
    return Group(*parts)
