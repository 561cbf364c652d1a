"""Deploy speed: training model (eval) vs the deploy model repfuse builds, full-size, on one device.

Method:

* Each model is a full-size variant with seeded random weights and randomized BN statistics
  (bench/common.py), written as a training checkpoint to a temp dir and converted with
  ``repfuse_cli.pipeline.run_conversion(ckpt, out, verify=False)`` (what ``repfuse convert
  --no-verify`` does). This gives the training model and the in-memory deploy model (the pair
  ``repfuse bench CKPT`` times; the same fusion as ``load_pair(ckpt, None)``), and the deploy file,
  rebuilt with ``load_deploy`` (what a user runs; the pair ``repfuse bench CKPT FILE`` times).
* Train vs deploy: ``repfuse_cli.benchmark.bench_models`` (the ``repfuse bench`` method; CUDA: CUDA
  events, TF32 off, cudnn.benchmark on), 224x224, float32, the in-memory deploy model. The machine
  is shared, so instead of one call with N back-to-back runs per model (which a burst of foreign
  load skews towards one model), it is called once with ``--warmup`` runs and then once per round
  with one timed run of each model (train, then deploy); reported: the medians over ``--rounds``
  and speedup = the median of the per-round train/deploy ratios (both runs of a round see the
  same machine load).
* All models are measured at the first batch size first; larger batch sizes follow, the cheapest
  (model, batch) pair first by its estimated time, while the ``--budget-s`` time budget lasts
  (skips are reported).
* Same weights, other construction (must not matter): the repfuse deploy models (in memory, and
  from the file) against an independently constructed deploy model (``build_vanillanet(cfg,
  deploy=True)`` / ``build_repvgg(config, deploy=True)`` on the CPU, then ``load_state_dict`` of the
  fused tensors). For VanillaNet also that model against itself with its merged 1x1 weights
  (``stages.i.conv``, ``cls.2``) stored transposed (same values, strides (1, O, ., .), not
  contiguous), a layout an in-place conversion can leave behind (the official in-place
  ``switch_to_deploy`` does). For every
  model: the loaded file against ``repfuse_cli.layout.fast_layout`` of it (1x1 weights with (I, 1, I, I)
  strides, the opt-in layout of ``load_deploy``) and against the loaded file with model and input in
  ``torch.channels_last`` (``model.to(memory_format=...)``, ``x.contiguous(memory_format=...)``). These
  pairs are timed interleaved (A B, then B A, per round, same input, after warm-up), which cancels
  drift in machine load better than back-to-back blocks; ratio = median over rounds of the paired
  A/B ratio, with a distribution-free 95% confidence interval of that median (ratio of medians and
  of minimums are kept in the JSON). Their
  outputs are compared too (max abs difference / max abs output). Strides of in-memory deploy tensors that differ from
  ``torch.empty(shape)``'s are listed.

Target: repfuse deploy / independent deploy latency ratio <= 1.03 (no slower; faster is fine),
in memory and from the file.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from repfuse_cli.benchmark import _time_once as _time  # noqa: E402  (the `repfuse bench` timer)
from repfuse_cli.benchmark import bench_models  # noqa: E402
from repfuse_cli.deployfile import load_deploy  # noqa: E402
from repfuse_cli.layout import fast_layout  # noqa: E402
from repfuse_cli.pipeline import run_conversion  # noqa: E402

MODELS = {"vanillanet_5": "vanillanet", "vanillanet_13": "vanillanet", "RepVGG-A0": "repvgg", "RepVGG-B3": "repvgg"}
SAME_TARGET = 1.03


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_ci(values: list[float], conf: float = 0.95) -> tuple[float, float]:
    """Distribution-free confidence interval of the median (order statistics, binomial(n, 1/2))."""
    v, n = sorted(values), len(values)
    k, cdf = 0, 0.0  # largest k with P(Binom(n, 1/2) <= k - 1) <= (1 - conf) / 2
    while k < n and cdf + math.comb(n, k) / 2**n <= (1 - conf) / 2:
        cdf += math.comb(n, k) / 2**n
        k += 1
    return (v[k - 1], v[n - k]) if k >= 1 else (v[0], v[-1])


def interleaved(
    a: nn.Module, b: nn.Module, x: torch.Tensor, device: str, warmup: int, rounds: int, xb: torch.Tensor | None = None
) -> dict:
    """Latency of a and b timed A B, B A, ... per round; ``ratio`` = median over rounds of the paired
    a/b ratio (both runs of a pair see the same machine load), plus medians, mins and output diff.
    ``xb``: b's input when it differs from a's (the same values in another memory format)."""
    ta: list[float] = []
    tb: list[float] = []
    xb = x if xb is None else xb
    with torch.inference_mode():
        for _ in range(warmup):
            a(x)
            b(xb)
        _sync(device)
        for r in range(rounds):
            pair = [(a, x, ta), (b, xb, tb)] if r % 2 == 0 else [(b, xb, tb), (a, x, ta)]
            for m, inp, acc in pair:
                acc.append(_time(m, inp, device))
        ya, yb = a(x).double(), b(xb).double()
        diff = ((ya - yb).abs().max() / ya.abs().max().clamp_min(1e-30)).item()
    ma, mb = statistics.median(ta), statistics.median(tb)
    ratios = [p / q for p, q in zip(ta, tb, strict=True)]
    lo, hi = median_ci(ratios)
    return {
        "a_ms": round(ma, 3),
        "b_ms": round(mb, 3),
        "ratio": round(statistics.median(ratios), 4),
        "ratio_ci95": [round(lo, 4), round(hi, 4)],
        "ratio_of_medians": round(ma / mb, 4),
        "ratio_of_mins": round(min(ta) / min(tb), 4),
        "max_rel_diff": diff,
    }


def independent_deploy(name: str, plan_config: dict, state: dict[str, torch.Tensor]) -> nn.Module:
    """A deploy-mode model built the ordinary way (CPU, random init), then loaded with the fused weights."""
    if common.is_vanillanet(name):
        from repfuse_cli.fusers.vanillanet import VanillaCfg, build_vanillanet

        model = build_vanillanet(VanillaCfg.from_config(plan_config), deploy=True)
    else:
        from repfuse_cli.fusers.repvgg import build_repvgg

        model = build_repvgg(plan_config, deploy=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def restride_1x1(model: nn.Module, layout: str) -> list[str]:
    """Give VanillaNet's merged 1x1 weights (O, I, 1, 1) another layout, same values; returns the names.

    ``transposed``: the (O, I) matrix stored column-major, strides (1, O, O, O): not contiguous.
    ``channels_last``: strides (I, 1, I, I), the layout an einsum-based merge produces: the same bytes as
    the standard layout (``is_contiguous()`` is True, size-1 dims are ignored), but the strides also
    read as channels_last, which changes the conv kernel PyTorch picks.
    """
    names = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d) and mod.kernel_size == (1, 1) and mod.groups == 1:
            w = mod.weight.detach()
            o, i = w.shape[:2]
            if layout == "transposed":
                wt = w.reshape(o, i).t().contiguous().t().reshape(o, i, 1, 1)
            else:
                wt = w.reshape(o, 1, 1, i).clone().permute(0, 3, 1, 2)
            assert torch.equal(wt, w) and wt.stride() != w.stride(), (name, wt.stride())
            mod.weight = nn.Parameter(wt, requires_grad=False)
            names.append(name)
    return names


def train_vs_deploy(
    train: nn.Module, deploy: nn.Module, size: tuple[int, int, int], b: int, device: str, warmup: int, rounds: int
) -> dict:
    """``bench_models`` once with warm-up, then once per round with one timed run each (train, then
    deploy: interleaved per run); the medians over rounds, and the median of the per-round ratios."""
    bench_models(train, deploy, size, batches=(b,), device=device, warmup=warmup, repeats=1)
    t_ms, d_ms = [], []
    for r in range(rounds):
        row = bench_models(train, deploy, size, batches=(b,), device=device, warmup=0, repeats=1, seed=r)[0]
        t_ms.append(row.train_ms)
        d_ms.append(row.deploy_ms)
    mt, md = statistics.median(t_ms), statistics.median(d_ms)
    return {
        "batch": b,
        "train_ms": round(mt, 3),
        "deploy_ms": round(md, 3),
        "speedup": round(statistics.median(t / d for t, d in zip(t_ms, d_ms, strict=True)), 3),
        "speedup_of_medians": round(mt / md, 3),
        "train_min_ms": round(min(t_ms), 3),
        "deploy_min_ms": round(min(d_ms), 3),
        "rounds": rounds,
    }


def prepare(name: str, tmp: str, device: str) -> dict:
    """Convert a seeded full-size checkpoint; return the models to time."""
    arch = MODELS[name]
    t0 = time.perf_counter()
    ckpt, out = Path(tmp) / f"{name}.pth", Path(tmp) / f"{name}.deploy.safetensors"
    common.write_checkpoint(name, ckpt)
    # what `repfuse convert --no-verify` does; .train/.deploy are the models `repfuse bench CKPT` times
    conv = run_conversion(ckpt, out, arch=arch, verify=False, force=True)
    deploy_file = load_deploy(out)  # what a user runs: the written file, rebuilt
    ckpt.unlink()  # the training model keeps its (mmap'ed) tensors alive
    state = {k: v.detach().clone() for k, v in conv.deploy.state_dict().items()}
    m = {
        "train": conv.train,
        "memory": conv.deploy,
        "file": deploy_file,
        "indep": independent_deploy(name, conv.plan.config, state),
        # the opt-in fastest layout of a loaded file (repfuse_cli.layout.fast_layout: 1x1 weights with
        # (I, 1, I, I) strides), and the loaded file with model and input in torch.channels_last
        "fast_layout": fast_layout(load_deploy(out), inplace=True),
        "channels_last_model": load_deploy(out).to(memory_format=torch.channels_last),
        "size": conv.plan.input_size,
    }
    info: dict = {"arch": arch}
    if common.is_vanillanet(name):
        for layout in ("transposed", "channels_last"):
            m[layout] = independent_deploy(name, conv.plan.config, state)
            names = restride_1x1(m[layout], layout)
            p = dict(m[layout].named_parameters())[f"{names[0]}.weight"]
            info[layout] = {"weights": names, "example_stride": list(p.stride()), "example_shape": list(p.shape)}
    out.unlink()
    info["in_memory_noncanonical_strides"] = {
        k: list(v.stride()) for k, v in conv.deploy.state_dict().items() if v.dim() and not _canonical(v)
    }
    for k in ("train", "memory", "file", "indep", "transposed", "channels_last", "fast_layout", "channels_last_model"):
        if k in m:
            m[k].to(device)
    info["setup_s"] = round(time.perf_counter() - t0, 1)
    m["info"] = info
    return m


def measure_batch(name: str, m: dict, b: int, args: argparse.Namespace, rounds: int) -> tuple[dict, dict]:
    device, size = args.device, m["size"]
    row = train_vs_deploy(m["train"], m["memory"], size, b, device, args.warmup, rounds)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, *size, generator=g).to(device)
    same = {
        "batch": b,
        "memory_vs_independent": interleaved(m["memory"], m["indep"], x, device, args.warmup, rounds),
        "file_vs_independent": interleaved(m["file"], m["indep"], x, device, args.warmup, rounds),
    }
    for layout in ("transposed", "channels_last"):
        if layout in m:
            same[f"independent_vs_{layout}_1x1"] = interleaved(m["indep"], m[layout], x, device, args.warmup, rounds)
    same["file_vs_fast_layout"] = interleaved(m["file"], m["fast_layout"], x, device, args.warmup, rounds)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    same["file_vs_channels_last"] = interleaved(
        m["file"], m["channels_last_model"], x, device, args.warmup, rounds, xb=x_cl
    )
    line = (
        f"{name:15s} b{b:<2d} train {row['train_ms']:8.2f} ms  deploy {row['deploy_ms']:8.2f} ms "
        f"x{row['speedup']:.2f} | mem/indep {same['memory_vs_independent']['ratio']:.3f} "
        f"file/indep {same['file_vs_independent']['ratio']:.3f}"
    )
    line += (
        f" file/fast_layout {same['file_vs_fast_layout']['ratio']:.3f}"
        f" file/channels_last {same['file_vs_channels_last']['ratio']:.3f}"
    )
    if "transposed" in m:
        line += (
            f" indep/transposed {same['independent_vs_transposed_1x1']['ratio']:.3f}"
            f" indep/cl {same['independent_vs_channels_last_1x1']['ratio']:.3f}"
        )
    print(line, flush=True)
    return row, same


def run(args: argparse.Namespace) -> dict:
    device = args.device
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device here")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
    t_start = time.perf_counter()
    meter = common.CpuMeter()
    tmp = tempfile.mkdtemp(prefix="repfuse-speed-", dir=args.tmp)
    first, later = args.batches[0], args.batches[1:]
    res: dict = {
        "device": device if device == "cpu" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "resolution": 224,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "rounds_large": args.rounds_large,
        "batches": args.batches,
        "budget_s": args.budget_s,
        "loadavg_before": os.getloadavg(),
        "models": {},
        "skipped": [],
    }
    models: dict[str, dict] = {}
    try:
        # phase 1: every model at the first batch size
        for name in args.models:
            models[name] = prepare(name, tmp, device)
            row, same = measure_batch(name, models[name], first, args, args.rounds)
            res["models"][name] = {**models[name]["info"], "rows": [row], "same": [same]}

        # phase 2: larger batches, cheapest (model, batch) first by its estimated time, while the
        # time budget lasts (so a cheap model's batch 64 is not crowded out by a costly batch 8)
        def estimate(name: str, b: int) -> float:
            r0 = res["models"][name]["rows"][0]
            per_round = (r0["train_ms"] + r0["deploy_ms"] * (11 if "transposed" in models[name] else 7)) / 1000
            return per_round * b / r0["batch"] * (args.rounds_large + 3 * args.warmup)

        for est, name, b in sorted((estimate(n, b), n, b) for b in later for n in args.models):
            left = args.budget_s - (time.perf_counter() - t_start)
            if est > left:
                res["skipped"].append(
                    f"{name} batch {b} (estimated {est:.0f} s, {max(left, 0):.0f} s left "
                    f"of the {args.budget_s:.0f} s budget)"
                )
                continue
            row, same = measure_batch(name, models[name], b, args, args.rounds_large)
            res["models"][name]["rows"].append(row)
            res["models"][name]["same"].append(same)
        for e in res["models"].values():  # rows in batch order
            e["rows"].sort(key=lambda r: r["batch"])
            e["same"].sort(key=lambda r: r["batch"])
    finally:
        models.clear()
        gc.collect()
        shutil.rmtree(tmp, ignore_errors=True)
    for e in res["models"].values():
        for key in ("memory_vs_independent", "file_vs_independent"):
            ratios = [s[key]["ratio"] for s in e["same"]]
            # "as fast as the official deploy model": no slower than SAME_TARGET (faster is fine)
            e[f"{key}_target_met"] = bool(ratios) and all(r <= SAME_TARGET for r in ratios)
    res["loadavg_after"] = os.getloadavg()
    res["cpu"] = meter.read()
    res["seconds"] = round(time.perf_counter() - t_start, 1)
    return res


def _canonical(t: torch.Tensor) -> bool:
    """Strides exactly those of torch.empty(t.shape) (size-1 dims included)."""
    expect, acc = [], 1
    for n in reversed(t.shape):
        expect.append(acc)
        acc *= n
    return list(t.stride()) == expect[::-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda (TF32 off, cudnn.benchmark on)")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=31, help="timed rounds per model and pair at the first batch size")
    ap.add_argument("--rounds-large", type=int, default=9, help="--rounds for the batch sizes after the first")
    ap.add_argument("--budget-s", type=float, default=400, help="larger batches are skipped beyond this time")
    ap.add_argument("--tmp", help="directory for the temp checkpoints")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    res = run(args)
    common.dump_json(res, args.json)
    for s in res["skipped"]:
        print("skipped:", s)
    print(f"total {res['seconds']} s")


if __name__ == "__main__":
    main()
