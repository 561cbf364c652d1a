"""The result schema: what --json prints is each typed result's to_dict(), the same keys in every
case, documented in the README; and register_fuser, the in-process registry the README documents."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import randomize_bn
from test_cli import TOY, runner
from toy_models import ReversedOrder

from repfuse_cli import registry
from repfuse_cli.cli import app
from repfuse_cli.fuser import NotThisArch, Plan
from repfuse_cli.fusers.conv_bn import ConvBnFuser
from repfuse_cli.results import BenchReport, ConversionResult, InspectReport, VerifyReport
from repfuse_cli.stats import ModelStats
from repfuse_cli.verification import VerifyResult

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def run_json(*args: object) -> dict:
    r = runner.invoke(app, [*map(str, args), "--json"])
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture
def toy(tmp_path):
    path = tmp_path / "toy.pth"
    torch.save({"model": randomize_bn(ReversedOrder(), seed=5).eval().state_dict()}, path)
    return path


def test_json_is_the_typed_results_to_dict(toy, tmp_path):
    out = tmp_path / "toy.safetensors"
    conv = run_json("convert", toy, *TOY, "-o", out)
    assert list(conv) == names(ConversionResult)
    assert list(conv["verify"]) == names(VerifyResult) and list(conv["before"]) == names(ModelStats)
    assert conv["unfused"] == [] or set(conv["unfused"][0]) == {"module", "reason"}
    ver = run_json("verify", toy, out, *TOY)
    assert list(ver) == names(VerifyReport) and list(ver["verify"]) == names(VerifyResult)
    bench = run_json("bench", toy, out, *TOY, "--repeats", "1", "--warmup", "0")
    assert list(bench) == names(BenchReport) and set(bench["rows"][0]) == {
        "batch", "mode", "train_ms", "deploy_ms", "speedup"
    }  # fmt: skip


def test_inspect_has_the_same_keys_whatever_the_file(toy, tmp_path):
    out = tmp_path / "toy.safetensors"
    run_json("convert", toy, *TOY, "-o", out)
    unknown = tmp_path / "unknown.pth"
    torch.save({"model": {"mystery.weight": torch.randn(3, 3)}}, unknown)
    reports = {
        "train": run_json("inspect", toy, "--model", "toy_models:reversed_order"),
        "deploy": run_json("inspect", out, "--model", "toy_models:reversed_order"),
        "unknown": run_json("inspect", unknown),
    }
    for mode, r in reports.items():
        assert list(r) == names(InspectReport), mode
    assert reports["train"]["mode"] == "train" and reports["train"]["params_after"] is not None
    assert reports["deploy"]["mode"].startswith("deploy") and reports["deploy"]["would_fuse"] is None
    assert reports["unknown"]["mode"] == "unknown" and reports["unknown"]["arch"] is None


@pytest.mark.parametrize("cls", [ConversionResult, VerifyReport, VerifyResult, ModelStats])
def test_readme_documents_every_json_field(cls):
    section = README[README.index("### `--json`") :]
    section = section[: section.index("\n## ")]
    documented = set(re.findall(r"`(\w+)`", section))
    missing = [n for n in names(cls) if n not in documented]
    assert not missing, f"README's --json section does not name {missing}"


class ToyFuser(ConvBnFuser):
    name = "toy-registered"
    summary = "a fuser registered in-process"

    def detect(self, ckpt, options):  # noqa: ANN001, ANN201 - the plugin example's shape
        if "conv.weight" not in ckpt.state_dict:
            raise NotThisArch("no `conv.weight`")
        return Plan(self.name, "toy", "custom", {"model": "toy_models:reversed_order", "kwargs": {}},
                    input_size=(3, 16, 16))  # fmt: skip


def test_register_fuser_makes_a_class_available(toy, tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "_REGISTERED", {})
    assert registry.register_fuser(ToyFuser) is ToyFuser
    listed = run_json("archs")["fusers"]
    assert {"name": "toy-registered", "origin": "registered", "summary": ToyFuser.summary} in listed
    assert isinstance(registry.get_fuser("toy-registered"), ToyFuser)
    res = run_json("convert", toy, "--arch", "toy-registered", "--model", "toy_models:reversed_order",
                   "-o", tmp_path / "r.safetensors")  # fmt: skip
    assert res["arch"] == "toy-registered" and res["verify"]["passed"]
    with pytest.raises(ValueError, match="no `name`"):
        registry.register_fuser(type("Nameless", (ConvBnFuser,), {"name": ""}))
