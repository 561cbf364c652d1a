"""CLI start-up: `repfuse --help` and `repfuse archs` against `python -c "import torch"`, in one run.

Method: each command is a fresh process of the installed console script (``.venv/bin/repfuse``) or
of the venv's python; the commands are interleaved round by round (so machine-load drift hits
all of them alike), output is discarded; wall time is taken around spawn..reap and peak RSS is
the child's own ``ru_maxrss`` from ``os.wait4``. One untimed warm-up round first (file cache).
Reported: median and min of ``--runs`` rounds; ratio = median(repfuse cmd) / median(import torch).

Target (issue #7): ratio <= 0.25.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TARGET = 0.25


def measure(cmd: list[str]) -> tuple[float, float]:
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}")
    return wall, ru.ru_maxrss / 1024


def run(runs: int) -> dict:
    py, repfuse = str(common.VENV_BIN / "python"), str(common.VENV_BIN / "repfuse")
    cmds = {
        "repfuse --help": [repfuse, "--help"],
        "repfuse archs": [repfuse, "archs"],
        'python -c "import torch"': [py, "-c", "import torch"],
        'python -c "pass"': [py, "-c", "pass"],
    }
    for cmd in cmds.values():  # warm-up round, not timed
        measure(cmd)
    walls: dict[str, list[float]] = {k: [] for k in cmds}
    rss: dict[str, list[float]] = {k: [] for k in cmds}
    load_before = os.getloadavg()
    meter = common.CpuMeter()
    for _ in range(runs):
        for k, cmd in cmds.items():
            w, r = measure(cmd)
            walls[k].append(w)
            rss[k].append(r)
    torch_med = statistics.median(walls['python -c "import torch"'])
    rows = {}
    for k in cmds:
        med = statistics.median(walls[k])
        rows[k] = {
            "median_s": round(med, 3),
            "min_s": round(min(walls[k]), 3),
            "all_s": [round(w, 3) for w in walls[k]],
            "rss_mb": round(statistics.median(rss[k]), 1),
            "ratio_vs_import_torch": round(med / torch_med, 3),
        }
    targets = {
        k: {"ratio": rows[k]["ratio_vs_import_torch"], "met": rows[k]["ratio_vs_import_torch"] <= TARGET}
        for k in ("repfuse --help", "repfuse archs")
    }
    return {
        "runs": runs,
        "rows": rows,
        "targets": targets,
        "target": TARGET,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "cpu": meter.read(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    res = run(args.runs)
    common.dump_json(res, args.json)
    for k, r in res["rows"].items():
        print(
            f"{k:28s} median {r['median_s']:.3f} s  min {r['min_s']:.3f} s  {r['rss_mb']:6.0f} MB  "
            f"ratio {r['ratio_vs_import_torch']:.3f}"
        )
    for k, t in res["targets"].items():
        print(f"{k}: {t['ratio']:.3f} <= {TARGET}: {'met' if t['met'] else 'NOT met'}")


if __name__ == "__main__":
    main()
