"""The CLI contract's small promises: short flags, completion, refusals before any work,
labels and dtypes checked against the model (each a defect found by trying repfuse as a user)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import randomize_bn
from safetensors.torch import load_file, save_file
from test_cli import TOY, assert_one_line_error, convert, runner
from toy_models import ReversedOrder

from repfuse_cli.cli import app


@pytest.fixture
def toy(tmp_path):
    path = tmp_path / "toy.pth"
    torch.save({"model": randomize_bn(ReversedOrder(), seed=3).eval().state_dict()}, path)
    return path


def test_short_help_and_version():
    h = runner.invoke(app, ["-h"])
    assert h.exit_code == 0 and "Usage: repfuse" in h.stdout and "convert" in h.stdout
    sub = runner.invoke(app, ["convert", "-h"])
    assert sub.exit_code == 0 and "--no-verify" in sub.stdout
    v = runner.invoke(app, ["-V"])
    assert v.exit_code == 0 and v.stdout.startswith("repfuse ")


def test_shell_completion_script_and_answers():
    # The script that `--install-completion` installs, asked for by name (no shell detection: CI has no
    # login shell to detect), then a completion answered the way that script asks.
    env = {**os.environ, "_REPFUSE_COMPLETE": "source_bash"}
    r = subprocess.run([sys.executable, "-m", "repfuse_cli"], env=env, capture_output=True, text=True,
                       stdin=subprocess.DEVNULL)  # fmt: skip
    assert r.returncode == 0 and "_repfuse_completion" in r.stdout, (r.stdout, r.stderr)
    env = {**os.environ, "_REPFUSE_COMPLETE": "complete_bash", "COMP_WORDS": "repfuse con", "COMP_CWORD": "1"}
    r = subprocess.run([sys.executable, "-c", "from repfuse_cli.cli import main; main()"], env=env,
                       capture_output=True, text=True, stdin=subprocess.DEVNULL)  # fmt: skip
    assert "convert" in r.stdout.split(), (r.stdout, r.stderr)
    h = runner.invoke(app, ["--help"])
    assert "--install-completion" in h.stdout and "--show-completion" in h.stdout


def test_dangling_output_symlink_is_an_existing_output(toy, tmp_path):
    link = tmp_path / "out.safetensors"
    link.symlink_to(tmp_path / "missing" / "target.safetensors")
    assert_one_line_error(convert(toy, *TOY, "-o", link), 2, "symbolic link", "--force")
    assert link.is_symlink() and not link.exists()
    r = convert(toy, *TOY, "-o", link, "--force")
    assert r.exit_code == 0, r.stderr
    assert not link.is_symlink() and link.is_file()  # the link was replaced, its target never created
    assert not (tmp_path / "missing").exists()


def test_output_symlink_to_a_file_is_replaced_not_its_target(toy, tmp_path):
    target = tmp_path / "keep.safetensors"
    save_file({"x": torch.ones(2)}, target)
    before = target.read_bytes()
    link = tmp_path / "out.safetensors"
    link.symlink_to(target)
    assert convert(toy, *TOY, "-o", link, "--force").exit_code == 0
    assert target.read_bytes() == before and not link.is_symlink()


@pytest.mark.parametrize("flag", ["--atol", "--rtol"])
def test_bad_tolerance_is_refused_before_any_work(tmp_path, flag, monkeypatch):
    import repfuse_cli.pipeline as pipeline

    def no_work(*a, **k):
        raise AssertionError("the checkpoint was loaded")

    monkeypatch.setattr(pipeline.Source, "load", no_work)
    missing = tmp_path / "never-read.pth"
    for value in ("nan", "-1", "inf"):
        for cmd in (["convert", str(missing)], ["verify", str(missing), str(tmp_path / "d.safetensors")]):
            r = runner.invoke(app, [*cmd, flag, value])
            assert_one_line_error(r, 2, f"{flag} ", "finite and >= 0")


def test_labels_beyond_the_models_classes_are_bad_input(toy, tmp_path):
    out = tmp_path / "toy.safetensors"
    assert convert(toy, *TOY, "-o", out).exit_code == 0
    inputs = tmp_path / "inputs.pt"
    torch.save({"images": torch.randn(3, 3, 16, 16), "labels": torch.tensor([0, 1, 4])}, inputs)  # 4 classes
    r = runner.invoke(app, ["verify", str(toy), str(out), *TOY, "--inputs", str(inputs)])
    assert_one_line_error(r, 2, "labels go up to 4", "4 classes")
    torch.save({"images": torch.randn(3, 3, 16, 16), "labels": torch.tensor([0, 1, 3])}, inputs)
    r = runner.invoke(app, ["verify", str(toy), str(out), *TOY, "--inputs", str(inputs), "--json"])
    assert r.exit_code == 0 and '"accuracy_train"' in r.stdout


def test_float16_deploy_file_is_verified_at_float16_tolerances(toy, tmp_path):
    import json

    out = tmp_path / "toy.safetensors"
    assert convert(toy, *TOY, "-o", out).exit_code == 0
    half = tmp_path / "half.safetensors"
    tensors = {k: v.half() if v.is_floating_point() else v for k, v in load_file(out).items()}
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    save_file(tensors, half, metadata=meta)
    r = runner.invoke(app, ["verify", str(toy), str(half), *TOY, "--json"])
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["verify"]["rtol"] == 1e-2 and res["verify"]["passed"]
    assert any("float16" in n and "float32" in n and "tolerances" in n for n in res["notes"])


def test_diff_command_exit_codes(toy, tmp_path):
    import json

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert convert(toy, *TOY, "-o", a).exit_code == 0
    assert convert(toy, *TOY, "-o", b).exit_code == 0  # a rebuild: the same bytes
    r = runner.invoke(app, ["diff", str(a), str(b)])
    assert r.exit_code == 0 and "identical" in r.stdout
    tensors = load_file(b)
    key = next(k for k, v in tensors.items() if v.is_floating_point())
    flat = tensors[key].flatten()
    flat[0] = torch.nextafter(flat[0], torch.tensor(float("inf")))  # one element, one ulp
    save_file(tensors, b)
    r = runner.invoke(app, ["diff", str(a), str(b), "--json"])
    res = json.loads(r.stdout)
    assert r.exit_code == 1 and res["max_ulps"] == 1 and res["differing_elements"] == 1
    r = runner.invoke(app, ["diff", str(a), str(tmp_path / "missing.safetensors")])
    assert_one_line_error(r, 2, "missing.safetensors")


def test_load_deploy_fast_layout_and_bench_layout_rows(toy, tmp_path):
    import json

    from repfuse_cli import load_deploy

    out = tmp_path / "toy.safetensors"
    assert convert(toy, *TOY, "-o", out).exit_code == 0
    plain = load_deploy(out, model="toy_models:reversed_order")
    fast = load_deploy(out, model="toy_models:reversed_order", fast_layout=True)
    for (n, p), (_, f) in zip(plain.state_dict().items(), fast.state_dict().items(), strict=True):
        assert torch.equal(p, f), n
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(plain(x), fast(x), rtol=1e-5, atol=1e-6)
    r = runner.invoke(
        app, ["bench", str(toy), str(out), *TOY, "--layouts", "--repeats", "1", "--warmup", "0", "--json"]
    )
    assert r.exit_code == 0, r.stderr
    assert [row["mode"] for row in json.loads(r.stdout)["rows"]] == ["eager", "fast-layout", "channels-last"]
