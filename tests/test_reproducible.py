"""Reproducible bytes: one checkpoint converted with 1 and with 2 BLAS threads gives the same file.

The fusion arithmetic is float64 and rounded once to the checkpoint dtype, so a product whose
summation order changes with the thread count changes in float64 noise (~1e-16 relative), far
below a float32 rounding step: the written weights are the same bits, except where an exact
result lies within that noise of a float32 rounding boundary (then one element moves by one ulp).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from repfuse_cli.deploydiff import diff_files

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_checkpoints"

CONVERT = """
import json, sys, torch
threads = int(sys.argv[1])
torch.set_num_threads(threads)
from repfuse_cli import convert
for src, out, arch in json.loads(sys.argv[2]):
    convert(src, out, arch=arch, verify=False, report=False)
print(torch.get_num_threads())
"""


def _wide_vanillanet(path: Path) -> Path:
    """A VanillaNet-5 at 1/4 width (1x1 chains of 1024 x 1024 and 2048 x 1024: BLAS splits those
    products over threads), seeded weights and BN statistics, annealing finished."""
    from conftest import randomize_bn

    from repfuse_cli.fusers.vanillanet import VARIANTS, build_vanillanet

    torch.manual_seed(0)
    model = randomize_bn(build_vanillanet(VARIANTS["vanillanet_5"].shrink(128), deploy=False, num_classes=100))
    torch.save({"model": model.state_dict(), "epoch": 299, "args": {"decay_epochs": 100}}, path)
    return path


def _convert_all(jobs: list[tuple[str, str, str]], threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    r = subprocess.run(
        [sys.executable, "-c", CONVERT, str(threads), json.dumps(jobs)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-1] == str(threads)


def test_one_and_two_threads_write_the_same_deploy_tensors(tmp_path):
    sources = [
        (SAMPLES / "vanillanet_tiny.pth", "vanillanet"),
        (SAMPLES / "repvgg_tiny.pth.tar", "repvgg"),
        (_wide_vanillanet(tmp_path / "wide_vanillanet.pth"), "vanillanet"),
    ]
    outs = {}
    for threads in (1, 2):
        jobs = [(str(src), str(tmp_path / f"{i}-{threads}.safetensors"), arch) for i, (src, arch) in enumerate(sources)]
        _convert_all(jobs, threads)
        outs[threads] = [Path(out) for _, out, _ in jobs]
    for (src, _), one, two in zip(sources, outs[1], outs[2], strict=True):
        res = diff_files(one, two)
        assert res.metadata_differs == [] and not res.mismatched and not res.only_in_a and not res.only_in_b
        # the guarantee: identical, or a few elements one ulp apart
        assert res.max_ulps <= 1, (src.name, res.summary())
        assert res.differing_elements <= max(1, res.elements // 100_000), (src.name, res.summary())
