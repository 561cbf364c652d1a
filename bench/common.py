"""Shared helpers for the benchmarks: seeded full-size training checkpoints and machine facts.

torch is imported inside functions only: the drivers that time subprocesses must stay small,
because a child's peak RSS (``ru_maxrss``) includes the parent's high-water mark when the child
is started with vfork (Linux folds the old mm's ``hiwater_rss`` into the child at exec).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
SEED = 0


def is_vanillanet(name: str) -> bool:
    return name.startswith("vanillanet")


def meta_models(name: str):
    """(train, deploy) modules of a full-size variant, built on the meta device (no memory, no init)."""
    import torch

    with torch.device("meta"):
        if is_vanillanet(name):
            from repfuse_cli.fusers.vanillanet import VARIANTS, VanillaNet, VanillaNetDeploy

            cfg = VARIANTS[name]
            return VanillaNet(cfg), VanillaNetDeploy(cfg)
        from repfuse_cli.fusers.repvgg import VARIANTS, RepVGG

        config = VARIANTS[name].resolve()
        return RepVGG(config, deploy=False), RepVGG(config, deploy=True)


def deploy_shapes(name: str) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Key -> (shape, dtype) of the deploy model's state_dict."""
    _, deploy = meta_models(name)
    return {k: (tuple(v.shape), v.dtype) for k, v in deploy.state_dict().items()}


def random_state_dict(name: str, seed: int = SEED) -> dict[str, Any]:
    """A training state_dict of the full-size variant with seeded values, filled cheaply.

    Conv/linear weights ~ N(0, 1/fan_in) (keeps activations O(1) through the depth), biases
    small; every BatchNorm gets random running statistics (var in [0.25, 1.75]) and affine
    parameters, so that folding is exercised (default BN stats hide folding bugs).
    """
    import torch
    from torch import nn

    train, _ = meta_models(name)
    bn_prefixes = {n + "." if n else "" for n, m in train.named_modules() if isinstance(m, nn.BatchNorm2d)}
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for k, t in train.state_dict().items():
        prefix, leaf = k.rsplit(".", 1)[0] + ".", k.rsplit(".", 1)[1]
        shape = tuple(t.shape)
        if leaf == "num_batches_tracked":
            sd[k] = torch.tensor(1000, dtype=torch.long)
        elif prefix in bn_prefixes:
            n = shape[0]
            sd[k] = {
                "running_mean": lambda n=n: torch.randn(n, generator=g) * 0.5,
                "running_var": lambda n=n: torch.rand(n, generator=g) * 1.5 + 0.25,
                "weight": lambda n=n: torch.rand(n, generator=g) + 0.5,
                "bias": lambda n=n: torch.randn(n, generator=g) * 0.3,
            }[leaf]()
        elif leaf == "bias":
            sd[k] = torch.randn(shape, generator=g) * 0.01
        else:
            fan_in = max(1, t.numel() // shape[0])
            sd[k] = torch.randn(shape, generator=g).mul_(fan_in**-0.5)
    return sd


def write_checkpoint(name: str, path: str | os.PathLike, seed: int = SEED) -> int:
    """Write a full-size training checkpoint in the layout its training script uses; returns bytes."""
    import argparse

    import torch

    sd = random_state_dict(name, seed)
    if is_vanillanet(name):  # huawei-noah/VanillaNet main.py: model + epoch + args, annealing finished
        obj: dict[str, Any] = {
            "model": sd,
            "epoch": 299,
            "args": argparse.Namespace(model=name, decay_epochs=100),
        }
    else:  # RepVGG training (DDP): state_dict with `module.` prefixes
        obj = {"state_dict": {"module." + k: v for k, v in sd.items()}}
    torch.save(obj, path)
    return Path(path).stat().st_size


def machine() -> dict[str, Any]:
    """CPU model, cores, memory, torch version, date (torch version read in a subprocess)."""
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gb = round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    code = "import torch, timm; print(torch.__version__, timm.__version__, torch.get_num_threads())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.split()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "mem_gb": mem_gb,
        "python": platform.python_version(),
        "torch": out[0] if out else "?",
        "timm": out[1] if len(out) > 1 else "?",
        "torch_threads": int(out[2]) if len(out) > 2 else None,
        "kernel": platform.release(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "load_avg": os.getloadavg(),
    }


def dump_json(obj: Any, path: str | os.PathLike | None) -> None:
    if path:
        Path(path).write_text(json.dumps(obj, indent=2, default=str) + "\n")


class CpuMeter:
    """How much CPU other processes took while a benchmark ran (the machine is shared).

    From /proc/stat (all CPUs) minus this process and its reaped children (getrusage):
    ``foreign_share`` = CPU time of other processes / (wall time x cores); ``steal_share`` likewise
    for time the hypervisor gave to other guests. 0 means the benchmark had the machine to itself.
    """

    def __init__(self) -> None:
        self.t0, self.stat0, self.own0 = self._now()

    @staticmethod
    def _now():
        import resource
        import time

        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        ticks = [int(x) for x in fields]
        hz = os.sysconf("SC_CLK_TCK")
        busy = (sum(ticks[:8]) - ticks[3] - ticks[4] - ticks[7]) / hz  # minus idle, iowait, steal
        steal = ticks[7] / hz
        own = sum(
            r.ru_utime + r.ru_stime
            for r in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
        )
        return time.perf_counter(), (busy, steal), own

    def read(self) -> dict[str, float]:
        t1, (busy1, steal1), own1 = self._now()
        wall = t1 - self.t0
        cap = wall * (os.cpu_count() or 1)
        foreign = max(0.0, (busy1 - self.stat0[0]) - (own1 - self.own0))
        return {
            "wall_s": round(wall, 1),
            "own_cpu_share": round((own1 - self.own0) / cap, 3),
            "foreign_share": round(foreign / cap, 3),
            "steal_share": round((steal1 - self.stat0[1]) / cap, 3),
        }


def wait_for_quiet(max_wait_s: float = 60, threshold: float = 0.15, window_s: float = 3) -> dict[str, float]:
    """Wait (at most ``max_wait_s``) until other processes use < ``threshold`` of the CPUs over a window."""
    import time

    t0 = time.perf_counter()
    share = 1.0
    while True:
        meter = CpuMeter()
        time.sleep(window_s)
        share = meter.read()["foreign_share"]
        waited = time.perf_counter() - t0
        if share < threshold or waited >= max_wait_s:
            return {"waited_s": round(waited, 1), "foreign_share": share}
