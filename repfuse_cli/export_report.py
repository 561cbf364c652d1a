"""Rendering `repfuse export`'s result (the dict ``repfuse export --json`` prints) as rich output.

Kept beside report.py (which may move it in): it imports rich only, no torch and no onnx.
"""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from .report import human


def ops_table(r: dict[str, Any]) -> Table:
    """Operator counts by op type: the training model exported the same way against the deploy graph."""
    before, after = r.get("ops_before"), r["ops_after"]
    shape = "x".join(str(d) for d in r["input_shape"])
    t = Table(title=f"ONNX graph: nodes by op type (opset {r['opset']}, input {shape})", title_justify="left")
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
    if before is not None:
        b, a = r["nodes_before"], r["nodes_after"]
        t.add_row("all nodes", str(b), str(a), f"{a - b:+d}")
    else:
        t.add_row("all nodes", str(r["nodes_after"]))
    return t


def export_report(r: dict[str, Any]) -> Group:
    parts: list[Any] = [ops_table(r)]
    parts.append(
        Text.from_markup(
            f"architecture: [bold]{r['arch']}[/]  variant: [bold]{r['variant']}[/]  layout: {r['layout']}  "
            f"from: {r['source_kind']}  weights: {r['key'] or '(bare state_dict)'}"
        )
    )
    batch = "dynamic (N)" if r["dynamic_batch"] else f"static ({r['input_shape'][0]})"
    parts.append(
        Text(
            f"graph: `{r['input_name']}` {r['input_shape']} -> `{r['output_name']}` {r['output_shape']}, "
            f"batch {batch}, {r['export_dtype']}, {human(r['bytes'], 'bytes')}"
            + (f" (weights in {r['data_file']})" if r.get("data_file") else "")
        )
    )
    for n in r.get("notes") or []:
        parts.append(Text(f"note: {n}", style="yellow"))
    v = r["verify"]
    line = Text("verification under onnxruntime: ")
    line.append("PASSED" if v["passed"] else "FAILED", style="bold green" if v["passed"] else "bold red")
    line.append(f"  max abs diff {v['max_abs_diff']:.3g}, max rel diff {v['max_rel_diff']:.3g}")
    if v.get("cosine") is not None:
        line.append(f", cosine {v['cosine']:.9f}")
    if v.get("top1_agreement") is not None:
        line.append(f", top-1 agreement {v['top1_agreement'] * 100:.2f}%")
    parts.append(line)
    parts.append(
        Text(
            f"  {v['runtime']} (CPU) against the PyTorch "
            f"{'training' if r['source_kind'] == 'checkpoint' else 'deploy'} model on {v['inputs']}; "
            f"tolerance atol {v['atol']:g} + rtol {v['rtol']:g} x max|output|",
            style="dim",
        )
    )
    for c in v.get("checks") or []:
        if not c["passed"]:
            why = c.get("error") or f"max rel diff {c['max_rel_diff']:.3g}"
            parts.append(Text(f"  differs on {c['inputs']}: {why}", style="red"))
    if r.get("output"):
        parts.append(Text.from_markup(f"wrote [bold]{r['output']}[/] in {r['seconds']:.2f} s"))
    return Group(*parts)
