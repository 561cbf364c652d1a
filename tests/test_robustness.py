"""Hostile and odd inputs (from an adversarial review): every one is a clean, documented exit."""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import randomize_bn
from torch import nn
from toy_models import ReversedOrder
from typer.testing import CliRunner

from repfuse_cli.cli import app

runner = CliRunner()
TOY = ["--model", "toy_models:reversed_order", "--resolution", "16"]
REPO = Path(__file__).resolve().parents[1]


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line(r, code, needle):
    assert r.exit_code == code, (r.exit_code, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr


@pytest.fixture
def toy(tmp_path) -> Path:
    path = tmp_path / "toy.pth"
    torch.save({"model": randomize_bn(ReversedOrder(), 1).state_dict()}, path)
    return path


def main_cli(*args, **kw):
    return subprocess.run(
        [sys.executable, "-m", "repfuse_cli", *map(str, args)], capture_output=True, text=True, cwd=REPO / "tests", **kw
    )


def test_usage_errors_are_one_line_and_json():
    p = main_cli("convert", "--json")
    assert p.returncode == 2 and json.loads(p.stdout)["exit_code"] == 2
    assert p.stderr.strip().splitlines() == [
        "repfuse: error: Missing argument 'checkpoint'. (see `repfuse convert --help`)"
    ]
    p = main_cli("verify", "a.pth", "b.safetensors", "--bogus")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "--bogus" in p.stderr


def test_unexpected_exceptions_are_one_line_exit_3(toy, monkeypatch):
    from repfuse_cli import pipeline

    def boom(*a, **k):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(pipeline, "model_stats", boom)
    r = cli("convert", toy, *TOY, "--json")
    one_line(r, 3, "internal error: ZeroDivisionError: boom")
    assert json.loads(r.stdout)["exit_code"] == 3
    assert not toy.with_name("toy.deploy.safetensors").exists()


def test_malformed_pickle_stream_in_a_zip(toy, tmp_path):
    bad = tmp_path / "bad.pth"
    with zipfile.ZipFile(toy) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            dst.writestr(item, data[: len(data) // 2] if item.filename.endswith("data.pkl") else data)
    one_line(cli("convert", bad, *TOY), 2, "not a readable torch checkpoint")


def test_integer_weights_are_a_dtype_mismatch(toy, tmp_path):
    sd = torch.load(toy, weights_only=True)["model"]
    sd["conv.weight"] = sd["conv.weight"].to(torch.int32)
    torch.save(sd, tmp_path / "int.pth")
    one_line(cli("convert", tmp_path / "int.pth", *TOY), 2, "conv.weight is torch.int32")


def test_resolution_reaches_the_dataflow_trace(tmp_path):
    """A network that takes exactly 16x16 inputs converts with --resolution 16."""

    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(4 * 16 * 16, 3)

        def forward(self, x):
            return self.fc(self.bn(self.conv(x)).flatten(1))

    import toy_models

    toy_models.fixed = Fixed
    torch.save({"model": randomize_bn(Fixed()).state_dict()}, tmp_path / "fixed.pth")
    r = cli("convert", tmp_path / "fixed.pth", "--model", "toy_models:fixed", "--resolution", 16, "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["bn_folded"] == 1
    one_line(
        cli("convert", tmp_path / "fixed.pth", "--model", "toy_models:fixed", "--force"), 2, "model forward failed"
    )


@pytest.mark.parametrize(
    "images, needle",
    [
        (torch.randn(2, 1, 16, 16), "cannot run on inputs"),  # wrong channel count
        (torch.full((2, 3, 16, 16), float("nan")), "NaN"),
        (torch.randn(0, 3, 16, 16), "N >= 1"),
    ],
)
def test_verify_rejects_inputs_the_model_cannot_take(toy, tmp_path, images, needle):
    assert cli("convert", toy, *TOY, "-q").exit_code == 0
    torch.save(images, tmp_path / "in.pt")
    r = cli("verify", toy, toy.with_name("toy.deploy.safetensors"), *TOY, "--inputs", tmp_path / "in.pt", "--json")
    one_line(r, 2, needle)
    assert json.loads(r.stdout)["exit_code"] == 2


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--device", "foo"], "expected cpu, cuda or cuda:N"),
        (["--atol", "nan"], "tolerances must be finite"),
    ],
)
def test_bad_option_values_exit_2(toy, args, needle):
    assert cli("convert", toy, *TOY, "-q").exit_code == 0
    one_line(cli("verify", toy, toy.with_name("toy.deploy.safetensors"), *TOY, *args), 2, needle)


def test_output_must_be_a_safetensors_regular_file(toy, tmp_path):
    one_line(cli("convert", toy, *TOY, "-o", tmp_path / "noext"), 2, "must end in .safetensors")
    fifo = tmp_path / "pipe.safetensors"
    import os

    os.mkfifo(fifo)
    one_line(cli("convert", toy, *TOY, "-o", fifo, "--force"), 2, "not a regular file")


def test_odd_training_records(tmp_path):
    from repfuse_cli.fusers.vanillanet import VARIANTS, build_vanillanet

    sd = randomize_bn(build_vanillanet(VARIANTS["vanillanet_5"].shrink(8), deploy=False, num_classes=4)).state_dict()
    torch.save({"model": sd, "epoch": torch.tensor(3), "args": {"decay_epochs": 100}}, tmp_path / "t.pth")
    one_line(cli("convert", tmp_path / "t.pth"), 2, "--assume-annealed")  # epoch as a tensor still counts
    torch.save({"model": sd, "epoch": "3", "args": "not a namespace"}, tmp_path / "s.pth")
    r = cli("inspect", tmp_path / "s.pth", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["epoch"] == 3


def test_sigterm_leaves_no_partial_file(tmp_path):
    import timm

    model = randomize_bn(timm.create_model("resnet18", num_classes=10))
    torch.save({"arch": "resnet18", "state_dict": model.state_dict()}, tmp_path / "r.pth")
    proc = subprocess.Popen(
        [sys.executable, "-m", "repfuse_cli", "convert", str(tmp_path / "r.pth"), "--batch", "64", "-q"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".*.tmp")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)  # the deploy file is staged while the (batch 64) verification runs
    assert list(tmp_path.glob(".*.tmp")), "the conversion never staged its output"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.pth"]  # no output, no temp file


def test_half_precision_timm_reparameterization_happens_in_float64(tmp_path):
    import timm
    from conftest import rel_diff

    from repfuse_cli.pipeline import run_conversion
    from repfuse_cli.verification import run

    torch.manual_seed(0)
    model = randomize_bn(timm.create_model("mobileone_s0", num_classes=10)).eval()
    half = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save({"arch": "mobileone_s0", "args": argparse.Namespace(), "state_dict": half}, tmp_path / "m.pth")
    conv = run_conversion(tmp_path / "m.pth", write=False)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    ref = run(model, x, torch.float64)
    # rounding the fused weights to fp16 once costs about what rounding the unfused ones does
    assert rel_diff(ref, run(conv.deploy, x, torch.float32)) < 2 * rel_diff(ref, run(conv.train, x, torch.float32))
    assert conv.result.fused["timm_reparameterized"] > 0
