"""Conversion cost on the CPU: `repfuse convert` against the I/O floor, in one run.

Method (all ratios are taken within this one run):

* Two full-size training checkpoints are generated, seeded, in a temp dir (by a child process):
  ``vanillanet_13_x1_5`` (~949 MB, huawei-noah main.py layout: model + epoch 299 + args with
  decay_epochs 100) and ``RepVGG-B3`` (~493 MB, ``{'state_dict': {'module.' + k: v}}``).
* Every measured command is a fresh subprocess; wall time is taken around spawn..reap and peak
  RSS is that child's own ``ru_maxrss`` from ``os.wait4(pid)``. This driver never imports torch
  (a vfork'ed child inherits the parent's RSS high-water mark at exec, so a fat driver would
  inflate every child's figure); its own peak RSS is reported for that reason.
* Page cache cannot be dropped here: each checkpoint is read once before timing (warm cache),
  so all figures are warm-cache figures.
* Commands, interleaved per repetition (so that machine-load drift hits all of them alike). The floors
  (issue #17's definitions) run each in its own Python process that imports nothing but torch and
  safetensors (and the standard library), like the command they are compared with:
  - ``floor`` (the I/O floor): ``torch.load(path, mmap=True, weights_only=True)``,
    ``float(t.float().sum())`` over every floating tensor, and ``safetensors.torch.save_file`` of the
    deploy file's tensors, loaded (``safetensors.torch.load_file``) from repfuse's own output for this
    checkpoint (written once by the generator, before timing).
  - ``floor+gemm64`` (VanillaNet only): the floor plus, for every VanillaNet block (and the stem and
    head chains, which repfuse merges the same way), ``(W2.double().flatten(1) @
    W1.double().flatten(1)).float()`` on whole matrices, written in place of the deploy tensor it
    becomes: the float64 products repfuse computes for its correctly rounded weights. ``floor+gemm``:
    the same in float32 (``W2.flatten(1) @ W1.flatten(1)``), what giving those up would leave.
  - ``repfuse --no-verify`` and ``repfuse`` (default, with verification):
    ``.venv/bin/repfuse convert CKPT -o OUT --arch A --force --quiet [--no-verify]``;
    ``repfuse (verify, report)``: the same without ``--quiet``, i.e. the default command, which
    also counts parameters/FLOPs for the report it prints (to a pipe here).
  - ``what-if --no-verify``: the same CLI command in a process where bench/whatif.py patched the
    fusion arithmetic to float32 (what giving up correctly rounded weights would buy).
  The median of ``--reps`` repetitions is reported.
* A breakdown run (in-process ``run_conversion`` with verification, one per model) records the
  wall time and VmRSS/VmHWM at every pipeline step and the time of the suspected hot spots.

Targets (issue #17): ``repfuse --no-verify`` wall <= 1.10x its floor (``floor+gemm64`` for
vanillanet_13_x1_5, ``floor`` for RepVGG-B3); the default command (``repfuse (verify, report)``)
<= 1.10x the same command with ``--quiet`` (``repfuse (verify)``); its peak RSS <= 1.0x the floor's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

MODELS = {  # name -> (--arch, checkpoint file name)
    "vanillanet_13_x1_5": ("vanillanet", "vanillanet_13_x1_5.pth"),
    "RepVGG-B3": ("repvgg", "RepVGG-B3.pth.tar"),
}
WALL_TARGET, REPORT_TARGET, RSS_TARGET = 1.10, 1.10, 1.0


# --------------------------------------------------------------------------- children (import torch)


def child_generate(tmp: str, names: list[str]) -> None:
    """Write each checkpoint, then repfuse's deploy file of it (``CKPT.deploy.safetensors``), whose
    tensors the floors write."""
    from repfuse_cli import convert

    for name in names:
        t0 = time.perf_counter()
        arch, fname = MODELS[name]
        path = Path(tmp) / fname
        size = common.write_checkpoint(name, path)
        convert(path, str(path) + ".deploy.safetensors", arch=arch, verify=False, report=False, force=True)
        print(f"generated {path.name}: {size / 1e6:.1f} MB and its deploy file in {time.perf_counter() - t0:.1f} s")


def _tensors(obj, out: list) -> list:
    import torch

    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _tensors(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _tensors(v, out)
    return out


def child_floor(ckpt: str, out: str, gemm: str | None) -> None:
    """The I/O floor of issue #17: mmap-load ``ckpt`` and sum every floating tensor, then write the
    deploy file's tensors to ``out``; ``gemm`` ("float64"/"float32"): with VanillaNet's 1x1-chain
    products in that dtype, on whole matrices, written in place of the tensors they become."""
    import torch
    from safetensors.torch import load_file, save_file

    with torch.serialization.safe_globals([argparse.Namespace]):
        obj = torch.load(ckpt, map_location="cpu", mmap=True, weights_only=True)
    tensors = _tensors(obj, [])
    touched = sum(float(t.float().sum()) for t in tensors if t.is_floating_point())
    result = load_file(ckpt + ".deploy.safetensors")
    if gemm:  # the VanillaNet 1x1-chain products: the math every conversion must do
        sd = obj["model"]

        def product(w2: str, w1: str) -> torch.Tensor:
            a, b = sd[w2].flatten(1), sd[w1].flatten(1)
            if gemm == "float64":
                return (a.double() @ b.double()).float()
            return a.float() @ b.float()

        chains = {
            "stem.0.weight": ("stem2.0.weight", "stem1.0.weight"),
            "cls.2.weight": ("cls2.0.weight", "cls1.2.weight"),
        }
        stages = sorted({int(k.split(".")[1]) for k in sd if k.startswith("stages.")})
        chains.update(
            {f"stages.{i}.conv.weight": (f"stages.{i}.conv2.0.weight", f"stages.{i}.conv1.0.weight") for i in stages}
        )
        for key, (w2, w1) in chains.items():
            result[key] = product(w2, w1).reshape(result[key].shape)
    save_file(result, out)
    print(f"floor: {len(tensors)} tensors read (sum {touched:.3g}), {len(result)} written", flush=True)


def _status() -> dict[str, int]:
    vals = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS", "VmHWM")):
            k, v = line.split(":")
            vals[k] = int(v.split()[0]) // 1024  # MB
    return vals


def child_whatif(argv: list[str]) -> None:
    """`repfuse convert ...` with the what-if patches (float32 math, no FLOP report)."""
    import whatif

    whatif.apply(fp32_math=True, no_stats=True)
    from repfuse_cli.cli import main as cli_main

    sys.argv = ["repfuse", *argv]
    cli_main()


def child_breakdown(ckpt: str, out: str, arch: str, verify: bool, json_out: str, patched: bool) -> None:
    """In-process run_conversion: wall time and VmRSS/VmHWM at each pipeline step, hot-spot timers."""
    t_start = time.perf_counter()
    import torch

    t_torch = time.perf_counter() - t_start
    import repfuse_cli.pipeline as pipeline

    t_import = time.perf_counter() - t_start
    if patched:
        import whatif

        whatif.apply(fp32_math=True, no_stats=True)
    timers: dict[str, float] = {}

    def timed(owner, attr: str, label: str) -> None:
        fn = getattr(owner, attr, None)
        if fn is None:
            return

        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                timers[label] = timers.get(label, 0.0) + time.perf_counter() - t

        setattr(owner, attr, wrapper)

    from repfuse_cli import checkpoint, deployfile, fold, memory
    from repfuse_cli.fusers import repvgg, vanillanet

    timed(pipeline, "check_finite", "check_finite (reads the mmap'd file)")
    timed(pipeline, "model_stats", "model_stats (FLOP counting, 2 models)")
    timed(pipeline, "verify_models", "verify_models (2 forward passes)")
    timed(deployfile, "write_safetensors_to", "writing the deploy file (a thread, during verification)")
    timed(memory.os, "fsync", "its fsync (waits on the disk)")
    timed(memory.StagedWrite, "commit", "save step: waiting for that write, then rename")
    timed(checkpoint.Checkpoint, "sha256", "sha256 of the source file")
    timed(vanillanet, "merge_1x1", "merge_1x1 (1x1-chain matrix products)")
    timed(vanillanet, "fold_bn", "fold_bn (VanillaNet weights)")
    timed(repvgg, "merge_block", "merge_block (RepVGG branch sums)")
    del fold

    steps: list[dict] = [{"step": "start (after imports)", "t": 0.0, **_status()}]
    t0 = time.perf_counter()

    def on_step(step: str) -> None:
        steps.append({"step": step, "t": round(time.perf_counter() - t0, 3), **_status()})

    conv = pipeline.run_conversion(ckpt, out, arch=arch, force=True, verify=verify, on_step=on_step)
    steps.append({"step": "end", "t": round(time.perf_counter() - t0, 3), **_status()})
    for a, b in zip(steps, steps[1:], strict=False):
        a["seconds"] = round(b["t"] - a["t"], 3)
        a["hwm_rise_mb"] = b["VmHWM"] - a["VmHWM"]
    res = {
        "torch_import_s": round(t_torch, 3),
        "import_s": round(t_import, 3),
        "run_conversion_s": round(time.perf_counter() - t0, 3),
        "steps": steps,
        "timers": {k: round(v, 3) for k, v in timers.items()},
        "verify": conv.result.verify.to_dict() if conv.result.verify else None,
        "torch_threads": torch.get_num_threads(),
    }
    Path(json_out).write_text(json.dumps(res, indent=2))


# --------------------------------------------------------------------------- driver (no torch)


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Wall seconds and this child's own peak RSS (MB), from os.wait4."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    out = p.stdout.read() if p.stdout else b""
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{out.decode(errors='replace')[-2000:]}")
    return {"wall_s": round(wall, 3), "rss_mb": round(ru.ru_maxrss / 1024, 1)}


def targets_for(med: dict, bound: str) -> list[dict]:
    """Issue #17's targets from the medians: each command's wall against ``bound`` (floor+gemm64 for
    VanillaNet, whose float64 products stay; the I/O floor otherwise), the report's cost, peak RSS."""
    rows = []

    def target(what: str, limit: float, value: float) -> None:
        rows.append({"what": what, "target": limit, "measured": round(value, 3), "met": value <= limit})

    target(
        f"repfuse --no-verify (--quiet), wall / {bound}",
        WALL_TARGET,
        med["repfuse --no-verify"]["wall_s"] / med[bound]["wall_s"],
    )
    for label in med:  # the other commands against the same floor: for reference, no target
        if label.startswith(("repfuse (", "what-if")):
            rows.append(
                {
                    "what": f"{label}, wall / {bound}",
                    "target": None,
                    "measured": round(med[label]["wall_s"] / med[bound]["wall_s"], 3),
                    "met": None,
                }
            )
    default, quiet = med["repfuse (verify, report)"], med["repfuse (verify)"]
    target(
        "default command (verify, report) wall / the same with --quiet",
        REPORT_TARGET,
        default["wall_s"] / quiet["wall_s"],
    )
    target("default command (verify, report) peak RSS / floor", RSS_TARGET, default["rss_mb"] / med["floor"]["rss_mb"])
    return rows


def warm(path: Path) -> float:
    t0 = time.perf_counter()
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass
    return time.perf_counter() - t0


def run(args: argparse.Namespace) -> dict:
    names = args.models
    py, repfuse = sys.executable, str(common.VENV_BIN / "repfuse")
    me = str(Path(__file__).resolve())
    tmp_parent = args.tmp or tempfile.gettempdir()
    free_gb = shutil.disk_usage(tmp_parent).free / 1e9
    need_gb = 4.5  # the checkpoints, repfuse's deploy files of them (the floors' tensors), one output
    if free_gb < need_gb:
        raise SystemExit(f"bench_convert: {tmp_parent} has {free_gb:.1f} GB free, need {need_gb} GB")
    tmp = tempfile.mkdtemp(prefix="repfuse-bench-", dir=tmp_parent)
    result: dict = {"tmp_free_gb_before": round(free_gb, 1), "reps": args.reps, "models": {}}
    meter = common.CpuMeter()
    try:
        t0 = time.perf_counter()
        gen = measure([py, me, "_generate", tmp, *names])
        result["generate"] = {**gen, "note": "seeded random weights, BN stats randomized"}
        print(f"generated checkpoints in {time.perf_counter() - t0:.1f} s", flush=True)
        for name in names:
            arch, fname = MODELS[name]
            ckpt = Path(tmp) / fname
            out = str(Path(tmp) / "out.safetensors")
            cmds = {"floor": [py, me, "_floor", str(ckpt), out]}
            if arch == "vanillanet":
                cmds["floor+gemm"] = [py, me, "_floor", str(ckpt), out, "--gemm", "float32"]
                cmds["floor+gemm64"] = [py, me, "_floor", str(ckpt), out, "--gemm", "float64"]
            base = [repfuse, "convert", str(ckpt), "-o", out, "--arch", arch, "--force", "--quiet"]
            cmds["repfuse --no-verify"] = [*base, "--no-verify"]
            cmds["repfuse (verify)"] = base
            cmds["repfuse (verify, report)"] = [a for a in base if a != "--quiet"]  # the default command
            if not args.no_whatif:
                cmds["what-if --no-verify"] = [py, me, "_whatif", *base[1:], "--no-verify"]
            warm_s = warm(ckpt) + warm(Path(str(ckpt) + ".deploy.safetensors"))
            runs: dict[str, list[dict]] = {k: [] for k in cmds}
            for rep in range(args.reps):
                for label, cmd in cmds.items():
                    r = measure(cmd)
                    runs[label].append(r)
                    print(
                        f"  {name:20s} rep {rep + 1}  {label:20s} {r['wall_s']:7.2f} s  {r['rss_mb']:7.0f} MB",
                        flush=True,
                    )
            med = {
                k: {
                    "wall_s": round(statistics.median(r["wall_s"] for r in v), 3),
                    "rss_mb": round(statistics.median(r["rss_mb"] for r in v), 1),
                    "wall_all": [r["wall_s"] for r in v],
                    "rss_all": [r["rss_mb"] for r in v],
                }
                for k, v in runs.items()
            }
            floor = med["floor"]
            for _k, v in med.items():
                v["wall_ratio"] = round(v["wall_s"] / floor["wall_s"], 2)
                v["rss_ratio"] = round(v["rss_mb"] / floor["rss_mb"], 2)
            bound = "floor+gemm64" if "floor+gemm64" in med else "floor"
            targets = targets_for(med, bound)
            entry = {
                "arch": arch,
                "checkpoint_mb": round(ckpt.stat().st_size / 1e6, 1),
                "deploy_mb": round(Path(out).stat().st_size / 1e6, 1),
                "warm_read_s": round(warm_s, 2),
                "bound": bound,
                "median": med,
                "targets": targets,
            }
            if not args.no_breakdown:
                bjson = str(Path(tmp) / "breakdown.json")
                r = measure([py, me, "_breakdown", str(ckpt), out, arch, bjson])
                entry["breakdown"] = {**json.loads(Path(bjson).read_text()), **r}
                if not args.no_whatif:
                    r = measure([py, me, "_breakdown", str(ckpt), out, arch, bjson, "--whatif"])
                    entry["breakdown_whatif"] = {**json.loads(Path(bjson).read_text()), **r}
            result["models"][name] = entry
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["cpu"] = meter.read()
    result["driver_peak_rss_mb"] = round(__import__("resource").getrusage(0).ru_maxrss / 1024, 1)
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):  # child modes
        mode, rest = sys.argv[1], sys.argv[2:]
        sys.path.insert(0, str(common.ROOT))
        if mode == "_generate":
            child_generate(rest[0], rest[1:])
        elif mode == "_floor":
            child_floor(rest[0], rest[1], gemm=rest[rest.index("--gemm") + 1] if "--gemm" in rest else None)
        elif mode == "_breakdown":
            child_breakdown(rest[0], rest[1], rest[2], True, rest[3], patched="--whatif" in rest)
        elif mode == "_whatif":
            child_whatif(rest)
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tmp", help="directory for the temp checkpoints (default: $TMPDIR or /tmp)")
    ap.add_argument("--no-breakdown", action="store_true")
    ap.add_argument("--no-whatif", action="store_true", help="skip the what-if runs (bench/whatif.py)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    res = run(args)
    common.dump_json(res, args.json)
    print()
    for name, e in res["models"].items():
        print(f"{name}: checkpoint {e['checkpoint_mb']} MB -> deploy {e['deploy_mb']} MB")
        for label, m in e["median"].items():
            print(
                f"  {label:20s} {m['wall_s']:7.2f} s ({m['wall_ratio']:.2f}x)  {m['rss_mb']:7.0f} MB "
                f"({m['rss_ratio']:.2f}x)"
            )


if __name__ == "__main__":
    main()
