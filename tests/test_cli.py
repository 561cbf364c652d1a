"""The CLI contract: exit codes, one-line errors, --json, safety of loading and writing."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize_bn
from toy_models import ReversedOrder
from typer.testing import CliRunner

from repfuse_cli import load_deploy
from repfuse_cli.checkpoint import load_checkpoint, strip_prefixes
from repfuse_cli.cli import app

runner = CliRunner()
TOY = ["--model", "toy_models:reversed_order", "--resolution", "16"]
REPO = Path(__file__).resolve().parents[1]


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture
def toy(tmp_path) -> Path:
    model = randomize_bn(ReversedOrder(), seed=1).eval()
    path = tmp_path / "toy.pth"
    torch.save({"model": model.state_dict(), "epoch": np.int64(3), "metric": np.float64(0.5)}, path)
    return path


def convert(*args):
    return runner.invoke(app, ["convert", *map(str, args)])


def assert_one_line_error(r, code: int, *needles: str):
    assert r.exit_code == code, (r.exit_code, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("repfuse: error: "), r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_success_writes_default_output_and_leaves_input_untouched(toy):
    before = sha(toy)
    r = convert(toy, *TOY)
    assert r.exit_code == 0, r.stderr
    out = toy.with_name("toy.deploy.safetensors")
    assert out.exists() and sha(toy) == before
    assert "verification: PASSED" in r.stdout and "Parameters" in r.stdout
    assert not list(toy.parent.glob(".*.tmp"))  # no temp file left behind


def test_json_is_exactly_one_object_with_the_documented_fields(toy):
    r = convert(toy, *TOY, "--json")
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)  # the whole stdout parses as one object
    for field in (
        "input",
        "output",
        "arch",
        "variant",
        "key",
        "params_before",
        "params_after",
        "flops_before",
        "flops_after",
        "bn_folded",
        "verify",
        "seconds",
    ):
        assert field in res
    assert set(res["verify"]) >= {"max_abs_diff", "max_rel_diff", "passed"}
    assert res["params_before"] - res["params_after"] == 8  # BN gamma+beta (16) out, conv bias (8) in
    assert res["bn_folded"] == 1 and res["key"] == "model"


def test_quiet_prints_nothing(toy):
    r = convert(toy, *TOY, "--quiet")
    assert r.exit_code == 0 and r.stdout == "" and r.stderr == ""


def test_existing_output_needs_force_and_is_never_touched_without_it(toy):
    out = toy.with_name("custom.safetensors")
    out.write_bytes(b"precious")
    assert_one_line_error(convert(toy, *TOY, "-o", out), 2, "exists", "--force")
    assert out.read_bytes() == b"precious"
    r = convert(toy, *TOY, "-o", out, "--force")
    assert r.exit_code == 0 and out.read_bytes() != b"precious"


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: p.write_bytes(os.urandom(64)), "not a readable torch checkpoint"),
        (lambda p: p.mkdir(), "directory"),
        (lambda p: None, "no such file"),
    ],
)
def test_unreadable_inputs_exit_2(tmp_path, make, needle):
    p = tmp_path / "bad.pth"
    make(p)
    assert_one_line_error(convert(p, *TOY), 2, needle, "bad.pth")
    assert not list(tmp_path.glob("*.safetensors"))


def test_truncated_file_exits_2(toy):
    data = toy.read_bytes()
    trunc = toy.with_name("trunc.pth")
    trunc.write_bytes(data[: len(data) // 2])
    assert_one_line_error(convert(trunc, *TOY), 2, "trunc.pth")


MARKER_CODE = "import pathlib; pathlib.Path({path!r}).write_text('ran')"


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (MARKER_CODE.format(path=str(self.marker)),))


@pytest.mark.parametrize("zip_format", [True, False])
def test_pickle_that_runs_code_is_refused_and_never_run(tmp_path, zip_format):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    sd = ReversedOrder().state_dict()
    torch.save({"model": sd, "x": Payload(marker)}, evil, _use_new_zipfile_serialization=zip_format)
    r = convert(evil, *TOY)
    assert_one_line_error(r, 2, "refusing to unpickle", "--trust-checkpoint")
    if zip_format:
        assert "builtins.exec" in r.stderr  # named, read without running it
    assert not marker.exists()
    assert not list(tmp_path.glob("*.safetensors"))


def test_pickled_module_needs_trust_flag(tmp_path):
    path = tmp_path / "whole.pth"
    torch.save(randomize_bn(ReversedOrder()).eval(), path)
    assert_one_line_error(convert(path, *TOY), 2, "toy_models.ReversedOrder")
    r = convert(path, *TOY, "--trust-checkpoint")
    assert r.exit_code == 0, r.stderr
    assert "--trust-checkpoint" in r.stderr  # loud


def test_wrong_architecture_names_offending_keys(tmp_path):
    import timm

    path = tmp_path / "r18.pth"
    torch.save({"state_dict": timm.create_model("resnet18", num_classes=5).state_dict()}, path)
    assert_one_line_error(convert(path, "--arch", "timm:resnet34"), 2, "missing", "layer1.2")
    assert_one_line_error(convert(path, "--arch", "bogus"), 2, "no fuser named `bogus`")
    assert_one_line_error(convert(path), 2, "not recognized")


def test_shape_mismatch_and_unexpected_keys(toy, tmp_path):
    sd = load_checkpoint(toy).state_dict
    bad = dict(sd, **{"conv.weight": torch.zeros(8, 3, 5, 5)})
    torch.save(bad, tmp_path / "shape.pth")
    assert_one_line_error(convert(tmp_path / "shape.pth", *TOY), 2, "shape", "conv.weight")
    torch.save(dict(sd, extra=torch.zeros(1)), tmp_path / "extra.pth")
    assert_one_line_error(convert(tmp_path / "extra.pth", *TOY), 2, "unexpected", "extra")


def test_non_finite_weights_and_negative_variance(toy, tmp_path):
    sd = load_checkpoint(toy).state_dict
    w = sd["conv.weight"].clone()
    w[0, 0, 0, 0] = float("nan")
    torch.save(dict(sd, **{"conv.weight": w}), tmp_path / "nan.pth")
    assert_one_line_error(convert(tmp_path / "nan.pth", *TOY), 2, "conv.weight", "non-finite")
    var = sd["bn.running_var"].clone()
    var[3] = -0.5
    torch.save(dict(sd, **{"bn.running_var": var}), tmp_path / "neg.pth")
    assert_one_line_error(convert(tmp_path / "neg.pth", *TOY), 2, "bn", "negative")


def test_key_choice(tmp_path):
    a, b = randomize_bn(ReversedOrder(), 1).state_dict(), randomize_bn(ReversedOrder(), 2).state_dict()
    path = tmp_path / "ema.pth"
    torch.save({"model": a, "model_ema": b, "optimizer": {"state": {}, "param_groups": []}}, path)
    res = json.loads(convert(path, *TOY, "--json").stdout)
    assert res["key"] == "model" and res["ema_available"] == ["model_ema"]
    res = json.loads(convert(path, *TOY, "--json", "--key", "model_ema", "--force").stdout)
    assert res["key"] == "model_ema" and res["verify"]["passed"]
    ema_model = ReversedOrder().eval()
    ema_model.load_state_dict(b)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        deployed = load_deploy(res["output"], model="toy_models:reversed_order")
        assert torch.allclose(deployed(x), ema_model(x), rtol=1e-5, atol=1e-6)
    assert_one_line_error(convert(path, *TOY, "--key", "nope", "--force"), 2, "--key nope", "model, model_ema")
    torch.save(a, tmp_path / "bare.pth")
    assert_one_line_error(convert(tmp_path / "bare.pth", *TOY, "--key", "model"), 2, "bare state_dict")


def test_prefixes_are_stripped_only_at_the_start():
    t = torch.zeros(1)
    out, seen = strip_prefixes({"module._orig_mod.a.module.b": t, "module.c": t})
    assert list(out) == ["a.module.b", "c"] and seen == ["module.", "_orig_mod."]


def test_ddp_prefixed_bin_and_safetensors_inputs(tmp_path):
    from safetensors.torch import save_file

    sd = randomize_bn(ReversedOrder(), 3).state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "ddp.bin")
    r = convert(tmp_path / "ddp.bin", *TOY, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["stripped_prefixes"] == ["module."]
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "train.safetensors")
    r = convert(tmp_path / "train.safetensors", *TOY, "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["output"].endswith("train.deploy.safetensors")
    deploy_file = tmp_path / "train.deploy.safetensors"
    assert_one_line_error(
        convert(deploy_file, *TOY, "-o", tmp_path / "again.safetensors"), 2, "already a repfuse deploy file"
    )


def test_unwritable_output_exits_2(toy, tmp_path):
    assert_one_line_error(convert(toy, *TOY, "-o", tmp_path / "no" / "dir.safetensors"), 2, "does not exist")
    assert_one_line_error(convert(toy, *TOY, "-o", toy), 2, "overwrite the input")


def test_verification_failure_exits_1_and_writes_nothing(toy, monkeypatch):
    from repfuse_cli.fusers import conv_bn

    real_fuse = conv_bn.ConvBnFuser.fuse

    def broken(self, plan, sd, train, done=None):
        fused = real_fuse(self, plan, sd, train, done)
        fused.tensors["conv.bias"] = fused.tensors["conv.bias"] + 0.1  # a wrong fold
        return fused

    monkeypatch.setattr(conv_bn.ConvBnFuser, "fuse", broken)
    r = convert(toy, *TOY, "--json")
    assert_one_line_error(r, 1, "verification failed", "first diverge at `bn`", "no output written")
    res = json.loads(r.stdout)
    assert res["verify"]["passed"] is False and res["exit_code"] == 1 and res["output"] is None
    assert not toy.with_name("toy.deploy.safetensors").exists()
    assert not list(toy.parent.glob(".*.tmp"))  # the file staged during verification is gone


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "repfuse_cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )


def test_help_and_archs_do_not_import_torch():
    for args in (["--help"], ["archs"], ["convert", "--help"]):
        p = run_cli(*args)
        assert p.returncode == 0, p.stderr
        imported = {line.split("|")[-1].strip() for line in p.stderr.splitlines() if "|" in line}
        assert "torch" not in imported and "timm" not in imported, args
    assert "conv-bn" in run_cli("archs").stdout


def test_plugin_fuser_via_entry_point(tmp_path):
    """A third-party package registers a fuser through the `repfuse.fusers` entry-point group."""
    site = tmp_path / "site"
    (site / "myplugin-1.0.dist-info").mkdir(parents=True)
    (site / "myplugin-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: myplugin\nVersion: 1.0\n")
    (site / "myplugin-1.0.dist-info" / "entry_points.txt").write_text("[repfuse.fusers]\ntoynet = myplugin:ToyFuser\n")
    (site / "myplugin.py").write_text(
        textwrap.dedent("""
        from repfuse_cli.fuser import Plan
        from repfuse_cli.fusers.conv_bn import ConvBnFuser

        class ToyFuser(ConvBnFuser):
            name = "toynet"
            summary = "toy plugin"

            def detect(self, ckpt, options):
                return Plan("toynet", "toy", "custom", {"model": "toy_models:reversed_order", "kwargs": {}},
                            input_size=(3, 16, 16))
    """)
    )
    torch.save({"model": randomize_bn(ReversedOrder()).state_dict()}, tmp_path / "t.pth")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(REPO / "tests"), str(REPO)]))
    p = run_cli("archs", "--json", env=env)
    assert {"name": "toynet", "origin": "plugin: myplugin:ToyFuser", "summary": ""} in json.loads(p.stdout)["fusers"]
    p = run_cli("convert", str(tmp_path / "t.pth"), "--arch", "toynet", "--json", env=env)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["arch"] == "toynet" and res["verify"]["passed"]
    code = (
        f"import repfuse_cli; print(type(repfuse_cli.load_deploy({res['output']!r}, "
        "model='toy_models:reversed_order')).__name__)"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert p.stdout.strip() == "ReversedOrder", p.stderr


def test_version():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.stdout.startswith("repfuse ")


def test_deploy_tensors_have_standard_strides(tmp_path):
    """A merged 1x1 kernel whose strides also read as channels_last runs other conv kernels:
    the deploy tensors (in memory and in the file) must have plain row-major strides."""
    from repfuse_cli.fold import merge_1x1
    from repfuse_cli.fusers.vanillanet import VARIANTS, build_vanillanet
    from repfuse_cli.pipeline import run_conversion

    w, _ = merge_1x1(torch.randn(8, 4, 1, 1), None, torch.randn(4, 4, 1, 1), None)
    assert w.stride() == (4, 1, 1, 1)
    model = randomize_bn(build_vanillanet(VARIANTS["vanillanet_5"].shrink(8), deploy=False, num_classes=5))
    torch.save({"model": model.state_dict()}, tmp_path / "v.pth")
    conv = run_conversion(tmp_path / "v.pth", tmp_path / "v.safetensors")
    for tensors in (conv.fused.tensors, dict(load_deploy(tmp_path / "v.safetensors").state_dict())):
        for k, t in tensors.items():
            assert t.stride() == torch.empty(t.shape).stride(), k


def test_deploy_metadata_never_makes_repfuse_import_code(tmp_path):
    """A deploy file's metadata is data: it cannot name code to run (os:system) and names a
    user's `pkg.module:callable` network only with the user's consent (--model)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = tmp_path / "toy.pth"
    torch.save({"model": randomize_bn(ReversedOrder()).state_dict()}, path)
    assert convert(path, *TOY, "-q").exit_code == 0
    deploy = tmp_path / "toy.deploy.safetensors"
    with safe_open(str(deploy), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    marker = tmp_path / "pwned"
    evil = dict(meta, config=json.dumps({"model": "os:system", "kwargs": {"command": f"touch {marker}"}}))
    save_file(tensors, str(tmp_path / "evil.safetensors"), metadata=evil)
    for args in (["inspect", tmp_path / "evil.safetensors"], ["verify", path, tmp_path / "evil.safetensors", *TOY]):
        r = runner.invoke(app, list(map(str, args)))
        assert r.exit_code == 2 and "not one repfuse writes" in r.stderr and not marker.exists()

    r = runner.invoke(app, ["inspect", str(deploy)])  # a user's module: only with --model
    assert r.exit_code == 2 and "pass --model toy_models:reversed_order" in r.stderr
    r = runner.invoke(app, ["inspect", str(deploy), "--model", "toy_models:reversed_order"])
    assert r.exit_code == 0, r.stderr
    assert runner.invoke(app, ["verify", str(path), str(deploy), *TOY]).exit_code == 0


def test_deploy_metadata_records_the_source(toy):
    from safetensors import safe_open

    from repfuse_cli.pipeline import convert as library_convert

    assert convert(toy, *TOY, "-q").exit_code == 0
    with safe_open(str(toy.with_name("toy.deploy.safetensors")), framework="pt") as f:
        meta = f.metadata()
    assert meta["source_sha256"] == sha(toy) and meta["source"] == "toy.pth" and meta["arch"] == "conv-bn"
    assert meta["format"] == "repfuse-deploy" and meta["source_key"] == "model" and meta["dtype"] == "float32"
    from repfuse_cli.fuser import Options

    res = library_convert(
        toy,
        toy.with_name("again.safetensors"),
        options=Options(model="toy_models:reversed_order"),
        resolution=16,
        report=False,
    )
    assert res["params_before"] is None and res["before"] is None and res["verify"]["passed"]
