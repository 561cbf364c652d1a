"""Every command the README shows runs, so the README cannot rot."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from repfuse_cli.cli import app

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
BIN = Path(sys.executable).parent
BLOCKS = re.findall(r"```(\w*)\n(.*?)```", README, flags=re.S)


def blocks(lang: str) -> list[str]:
    return [body for tag, body in BLOCKS if tag == lang]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("readme")
    (d / "sample_checkpoints").symlink_to(REPO / "sample_checkpoints")
    return d


def env() -> dict[str, str]:
    return dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")


def test_readme_names_the_two_setup_commands():
    first = blocks("sh")[0]
    assert "make demo" in first and "make test" in first


def example_commands() -> list[str]:
    """The one-line commands of the README's shell blocks (the pipeline script runs as a whole)."""
    return [
        line
        for body in blocks("sh")
        if not body.startswith("#!")
        for line in body.splitlines()
        if line.startswith("repfuse ")
    ]


def test_example_commands_run_in_order(workdir):
    """One test, in README order: later commands use the files earlier ones wrote (and xdist
    would otherwise send them to workers with different working directories)."""
    commands = example_commands()
    assert len(commands) >= 6
    for command in commands:
        p = subprocess.run(command, shell=True, cwd=workdir, env=env(), capture_output=True, text=True)
        assert p.returncode == 0, (command, p.stdout[-2000:], p.stderr[-2000:])


def test_release_pipeline_script_runs_and_fails_on_mismatch(workdir, tmp_path):
    script = next(b for b in blocks("sh") if b.startswith("#!/usr/bin/env bash"))
    p = subprocess.run(["bash", "-c", script], cwd=workdir, env=env(), capture_output=True, text=True)
    assert p.returncode == 0, (p.stdout, p.stderr)
    assert "verified" in p.stdout and (workdir / "release" / "model.deploy.safetensors").exists()
    # the same script against a checkpoint of another network must fail the build
    bad = tmp_path / "sample_checkpoints"
    bad.mkdir()
    (bad / "repvgg_tiny.pth.tar").symlink_to(REPO / "sample_checkpoints" / "vanillanet_tiny.pth")
    (bad / "heldout.safetensors").symlink_to(REPO / "sample_checkpoints" / "heldout.safetensors")
    (bad / "heldout_images").symlink_to(REPO / "sample_checkpoints" / "heldout_images")
    p = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env(), capture_output=True, text=True)
    assert p.returncode != 0 and "conversion failed with exit code 2" in p.stderr


def test_python_api_example_runs(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    exec(compile(blocks("python")[0], "README-api", "exec"), {})
    assert (workdir / "vanillanet.safetensors").exists()


def test_plugin_example_is_a_working_fuser():
    ns: dict = {}
    exec(compile(blocks("python")[1], "README-plugin", "exec"), ns)
    from repfuse_cli.checkpoint import Checkpoint
    from repfuse_cli.fuser import NotThisArch, Options

    fuser = ns["MyNetFuser"]()
    with pytest.raises(NotThisArch):
        fuser.detect(Checkpoint(Path("x.pth"), "torch", {}, None), Options())
    toml = tomllib.loads(blocks("toml")[0])
    assert toml["project"]["entry-points"]["repfuse.fusers"]["mynet"] == "mynet_repfuse:MyNetFuser"


def test_cli_contract_flags_exist():
    contract = next(body for tag, body in BLOCKS if tag == "" and body.startswith("repfuse convert"))
    commands = re.split(r"\n(?=repfuse )", contract.strip())
    runner = CliRunner()
    for spec in commands:
        name = spec.split()[1]
        help_text = runner.invoke(app, [name, "--help"], env={"COLUMNS": "200"}).stdout
        for flag in re.findall(r"--[a-z-]+", spec):
            assert flag in help_text, (name, flag)
