"""`repfuse verify` and `repfuse inspect`, and the report's figures against hand counts."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import timm
import torch
from conftest import randomize_bn
from safetensors import safe_open
from safetensors.torch import save_file
from toy_models import ReversedOrder
from typer.testing import CliRunner

from repfuse_cli.cli import app
from repfuse_cli.stats import model_stats

runner = CliRunner()
TOY = ["--model", "toy_models:reversed_order", "--resolution", "16"]


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    d = tmp_path_factory.mktemp("resnet")
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model("resnet18", num_classes=10), seed=3).eval()
    ckpt = d / "checkpoint-9.pth.tar"
    torch.save(
        {
            "epoch": 9,
            "arch": "resnet18",
            "args": argparse.Namespace(model="resnet18"),
            "state_dict": model.state_dict(),
            "state_dict_ema": model.state_dict(),
        },
        ckpt,
    )
    r = cli("convert", ckpt, "-q")
    assert r.exit_code == 0, r.stderr
    return model, ckpt, d / "checkpoint-9.deploy.safetensors"


def tamper(src, dst, key, delta):
    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    w = tensors[key].clone()
    w.view(-1)[0] += delta
    tensors[key] = w
    save_file(tensors, str(dst), metadata=meta)


def test_verify_passes_on_a_correct_deploy_file(resnet):
    _, ckpt, deploy = resnet
    r = cli("verify", ckpt, deploy, "--json")
    assert r.exit_code == 0, r.stderr
    v = json.loads(r.stdout)["verify"]
    assert v["passed"] and v["max_rel_diff"] < 1e-5 and v["cosine"] > 0.999999 and v["top1_agreement"] == 1.0
    assert v["device"] == "cpu" and "batch 4" in v["inputs"]
    r = cli("verify", ckpt, deploy)
    assert "verification: PASSED" in r.stdout


def test_tampered_deploy_file_fails_and_names_the_block(resnet, tmp_path):
    _, ckpt, deploy = resnet
    bad = tmp_path / "tampered.safetensors"
    tamper(deploy, bad, "layer4.1.conv2.weight", 0.05)  # one weight, a small change (~5e-4 of the output)
    r = cli("verify", ckpt, bad, "--json")
    assert r.exit_code == 1, r.stderr
    res = json.loads(r.stdout)
    assert res["verify"]["passed"] is False and res["exit_code"] == 1
    assert 1e-4 < res["verify"]["max_rel_diff"] < 1e-2
    assert res["verify"]["diverges_at"].startswith("layer4 (first at layer4.1.")
    assert "diverge at `layer4" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_verify_accepts_a_plain_deploy_state_dict_from_another_tool(resnet, tmp_path):
    _, ckpt, deploy = resnet
    with safe_open(str(deploy), framework="pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    torch.save({"model": sd}, tmp_path / "official_style.pth")
    r = cli("verify", ckpt, tmp_path / "official_style.pth")
    assert r.exit_code == 0, r.stderr


def test_verify_with_real_inputs_and_labels(resnet, tmp_path):
    model, ckpt, deploy = resnet
    x = torch.randn(6, 3, 64, 64)
    with torch.no_grad():
        labels = model(x).argmax(1)
    labels[0] = (labels[0] + 1) % 10  # one wrong label: accuracy 5/6 for both models
    torch.save({"images": x, "labels": labels}, tmp_path / "batch.pt")
    r = cli("verify", ckpt, deploy, "--inputs", tmp_path / "batch.pt", "--json")
    assert r.exit_code == 0, r.stderr
    v = json.loads(r.stdout)["verify"]
    assert v["accuracy_train"] == pytest.approx(5 / 6) and v["accuracy_deploy"] == pytest.approx(5 / 6)
    assert "6 images from batch.pt with labels" == v["inputs"]
    import numpy as np

    np.save(tmp_path / "x.npy", x.numpy())
    assert cli("verify", ckpt, deploy, "--inputs", tmp_path / "x.npy").exit_code == 0


@pytest.mark.parametrize(
    "args, needle",
    [
        (["{ckpt}", "{tmp}/missing.safetensors"], "no such file"),
        (["{ckpt}", "{ckpt}"], "do not match"),  # a training file is not a deploy file of this layout
        (["{ckpt}", "{deploy}", "--inputs", "{tmp}/nope.pt"], "no such inputs file"),
        (["{ckpt}", "{deploy}", "--device", "cuda"], "cuda"),
    ],
)
def test_verify_bad_input_exits_2(resnet, tmp_path, args, needle):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    _, ckpt, deploy = resnet
    r = cli("verify", *[a.format(ckpt=ckpt, deploy=deploy, tmp=tmp_path) for a in args])
    assert r.exit_code == 2, (r.stdout, r.stderr)
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_inspect_reports_entries_arch_and_warnings(resnet):
    _, ckpt, deploy = resnet
    r = cli("inspect", ckpt, "--json")
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["mode"] == "train" and res["arch"] == "conv-bn" and res["variant"] == "resnet18"
    assert res["entries"]["args"].startswith("argparse.Namespace") and res["epoch"] == 9
    assert res["would_fuse"]["bn_folded"] == 20 and res["params"] - res["params_after"] == 9600 - 4800
    assert any("EMA" in w for w in res["warnings"])
    res = json.loads(cli("inspect", deploy, "--json").stdout)
    assert res["mode"].startswith("deploy") and res["variant"] == "resnet18"
    assert "would fuse" in cli("inspect", ckpt).stdout


def test_inspect_refuses_unsafe_files(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("ran",))

    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    r = cli("inspect", tmp_path / "evil.pth")
    assert r.exit_code == 2 and "builtins.print" in r.stderr and "ran" not in r.stdout


def test_report_figures_against_hand_counts():
    model = ReversedOrder().eval()  # conv 3->8 3x3 pad 1, BN, ReLU, mean, linear 8->4
    s = model_stats(model, (1, 3, 16, 16))
    macs = 8 * 3 * 3 * 3 * 16 * 16 + 8 * 4
    assert s.flops == 2 * macs
    assert s.params == (8 * 3 * 9) + (8 + 8) + (8 * 4 + 4)
    assert (s.conv_layers, s.linear_layers, s.bn_layers, s.norm_ops) == (1, 1, 1, 1)
    assert s.weight_bytes == 4 * (8 * 27 + 16 + 36 + 16) + 8  # + num_batches_tracked (int64)


def test_convert_report_and_json_hold_the_same_facts(tmp_path):
    path = tmp_path / "toy.pth"
    torch.save({"model": randomize_bn(ReversedOrder()).state_dict()}, path)
    r = cli("convert", path, *TOY, "--json")
    res = json.loads(r.stdout)
    assert res["before"]["norm_ops"] == 1 and res["after"]["norm_ops"] == 0
    assert res["flops_before"] == res["flops_after"] == 2 * (8 * 27 * 256 + 32)
    assert res["after"]["bn_layers"] == 0 and res["fused"]["bn_folded"] == 1
    r = cli("convert", path, *TOY, "--force", "--resolution", "16")
    for text in (
        "Parameters",
        "FLOPs (2 x MACs)",
        "BatchNorm layers",
        "Norm ops / forward",
        "-100.00%",
        "Weight bytes",
        "input 16x16",
        "1 BN folds",
        "verification: PASSED",
        "wrote",
    ):
        assert text in r.stdout, text


def test_bench_reports_latency_per_batch(tmp_path):
    path = tmp_path / "toy.pth"
    torch.save({"model": randomize_bn(ReversedOrder()).state_dict()}, path)
    r = cli("bench", path, *TOY, "--batch", 1, "--batch", 4, "--warmup", 1, "--repeats", 3, "--json")
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    assert [row["batch"] for row in res["rows"]] == [1, 4] and res["deploy"] == "(fused in memory)"
    for row in res["rows"]:
        assert row["train_ms"] > 0 and row["deploy_ms"] > 0 and row["mode"] == "eager"
        assert row["speedup"] == pytest.approx(row["train_ms"] / row["deploy_ms"], rel=1e-2)
    text = cli("bench", path, *TOY, "--repeats", 2).stdout
    assert "speedup" in text and "median of 2" in text
    r = cli("bench", path, *TOY, "--device", "cuda")
    if not torch.cuda.is_available():
        assert r.exit_code == 2 and "no CUDA device" in r.stderr


@pytest.mark.parametrize(
    "family, variant, train_m, deploy_m, deploy_gmacs",
    [
        ("vanillanet", "vanillanet_5", 22.33, 15.52, 5.16),
        ("vanillanet", "vanillanet_13", 107.70, 58.59, 11.94),
        ("repvgg", "RepVGG-A0", 9.11, 8.31, 1.36),
        ("repvgg", "RepVGG-D2se", 133.33, 120.39, None),
    ],
)
def test_report_figures_match_the_reference_tables(family, variant, train_m, deploy_m, deploy_gmacs):
    """Params (REFERENCE §1-2 tables) and the paper's deploy GMACs at 224, counted on meta tensors."""
    from repfuse_cli.fusers.repvgg import build_repvgg
    from repfuse_cli.fusers.vanillanet import build_vanillanet

    build = build_vanillanet if family == "vanillanet" else build_repvgg
    with torch.device("meta"):
        train, deploy = build(variant, deploy=False), build(variant, deploy=True)
    before, after = model_stats(train, (1, 3, 224, 224)), model_stats(deploy, (1, 3, 224, 224))
    assert round(before.params / 1e6, 2) == pytest.approx(train_m, abs=0.011)
    assert round(after.params / 1e6, 2) == pytest.approx(deploy_m, abs=0.011)
    if deploy_gmacs is not None:
        assert after.flops / 2 / 1e9 == pytest.approx(deploy_gmacs, abs=0.01)
    assert after.bn_layers == 0 and after.norm_ops == 0 and before.norm_ops == before.bn_layers


def test_inspect_warns_about_unfinished_vanillanet_annealing(tmp_path):
    from repfuse_cli.fusers.vanillanet import VARIANTS, build_vanillanet

    model = randomize_bn(build_vanillanet(VARIANTS["vanillanet_5"].shrink(8), deploy=False, num_classes=5))
    path = tmp_path / "checkpoint-40.pth"
    torch.save(
        {"model": model.state_dict(), "epoch": 40, "args": argparse.Namespace(model="vanillanet_5", decay_epochs=100)},
        path,
    )
    r = cli("inspect", path, "--json")
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["arch"] == "vanillanet" and res["would_fuse"]["chain_merges"] == 5
    assert any("40" in w and "100" in w for w in res["warnings"])
    r = cli("convert", path)
    assert r.exit_code == 2 and "--assume-annealed" in r.stderr


def test_verify_against_another_models_deploy_file(resnet, tmp_path):
    model, ckpt, _ = resnet
    sample = Path(__file__).resolve().parents[1] / "sample_checkpoints" / "vanillanet_tiny.pth"
    assert cli("convert", sample, "-o", tmp_path / "v.safetensors", "-q").exit_code == 0
    r = cli("verify", ckpt, tmp_path / "v.safetensors", "--json")
    assert r.exit_code == 2 and "holds a vanillanet vanillanet_custom model" in r.stderr
    assert json.loads(r.stdout)["exit_code"] == 2
    # a plain deploy state_dict (no metadata) of another network: caught by its output shape
    sd = {k: v for k, v in model.state_dict().items()}
    sd["fc.weight"], sd["fc.bias"] = sd["fc.weight"][:3], sd["fc.bias"][:3]
    torch.save(sd, tmp_path / "three_classes.pth")
    r = cli("verify", ckpt, tmp_path / "three_classes.pth")
    assert r.exit_code == 2 and ("shape" in r.stderr), r.stderr
