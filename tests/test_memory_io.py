"""Memory and file I/O of a conversion: the pages of a memory-mapped checkpoint are let go as the
pipeline finishes with them, the deploy file is written without copying the tensors, and it is
staged beside the output while verification runs, appearing only when kept."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from conftest import randomize_bn
from safetensors import safe_open
from safetensors.torch import load_file

import repfuse_cli.deployfile as deployfile
from repfuse_cli.checkpoint import Checkpoint, check_finite, load_checkpoint
from repfuse_cli.deployfile import stage_deploy, write_safetensors, write_safetensors_to
from repfuse_cli.errors import OutputError
from repfuse_cli.fuser import Options
from repfuse_cli.memory import release_pages, releasing
from repfuse_cli.pipeline import run_conversion

LINUX = os.path.exists("/proc/self/maps")


def resident_mb(ranges) -> float:
    """Resident memory of this process inside the mappings ``ranges`` (from /proc/self/smaps), MB."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(maxsplit=1)[0]
        if "-" in head and ":" not in head:  # a mapping's header line: start-end perms ...
            start, end = (int(a, 16) for a in head.split("-"))
            inside = any(a <= start and end <= b for a, b in ranges)
        elif inside and head == "Rss:":
            total += int(line.split()[1])
    return total / 1024


def mapped(path: Path):
    ckpt = load_checkpoint(path)
    if not ckpt.mapped:  # e.g. overlayfs on older kernels shows another inode: no release there
        pytest.skip("this file system does not show the checkpoint's mapping in /proc/self/maps")
    return ckpt


def tensors_of_every_dtype() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, generator=g)
    return {
        "f32": x,
        "f64": x.double() / 3,
        "f16": x.half(),
        "bf16": x.bfloat16(),
        "i64": torch.randint(-(2**40), 2**40, (6,), generator=g),
        "i32": torch.randint(-1000, 1000, (2, 3), generator=g, dtype=torch.int32),
        "i8": torch.randint(-100, 100, (9,), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 255, (3,), generator=g, dtype=torch.uint8),
        "bool": torch.rand(4, generator=g) > 0.5,
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "conv": torch.randn(16, 8, 3, 3, generator=g),
    }


# --------------------------------------------------------------------------- the writer


def test_writer_round_trips_every_dtype_through_the_safetensors_library(tmp_path):
    tensors = tensors_of_every_dtype()
    out = tmp_path / "t.safetensors"
    write_safetensors(tensors, out, {"arch": "x", "config": '{"a": 1}'}, force=False)
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata() == {"arch": "x", "config": '{"a": 1}'}
        assert set(f.keys()) == set(tensors)
        for k, v in tensors.items():
            got = f.get_tensor(k)
            assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(got, v), k
    assert all(torch.equal(load_file(str(out))[k], v) for k, v in tensors.items())
    # the layout: 8-byte header length, JSON header padded to 8 bytes, then the data, no gap
    raw = out.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    assert (8 + n) % 8 == 0 and raw[8:9] == b"{"
    ends = sorted(e for k, v in header.items() if k != "__metadata__" for e in v["data_offsets"])
    assert ends[0] == 0 and ends[-1] == len(raw) - 8 - n
    assert header["bf16"]["dtype"] == "BF16" and header["bool"]["dtype"] == "BOOL"


def test_writer_takes_tied_and_strided_tensors_and_refuses_what_it_cannot_write(tmp_path):
    base = torch.randn(4, 6)
    tensors = {"a": base, "tied": base, "view": base[1:3], "t": base.t()}  # safetensors' save_file refuses ties
    write_safetensors(tensors, tmp_path / "t.safetensors", {}, force=False)
    back = load_file(str(tmp_path / "t.safetensors"))
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    with pytest.raises(OutputError, match="contiguous"), open(tmp_path / "raw", "wb") as f:
        write_safetensors_to(f, {"t": base.t()}, {})
    with pytest.raises(OutputError, match="complex"), open(tmp_path / "raw", "wb") as f:
        write_safetensors_to(f, {"c": torch.zeros(2, dtype=torch.complex64)}, {})


# --------------------------------------------------------------------------- staged writes


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_staged_write_appears_only_when_committed(tmp_path):
    tensors = tensors_of_every_dtype()
    out = tmp_path / "d.safetensors"
    staged = stage_deploy(tensors, out, lambda: {"k": "v"}, force=False)
    assert not out.exists()
    staged.commit()
    assert leftovers(tmp_path) == ["d.safetensors"] and oct(out.stat().st_mode & 0o777) == "0o644"
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata() == {"k": "v"} and torch.equal(f.get_tensor("conv"), tensors["conv"])

    with stage_deploy(tensors, tmp_path / "gone.safetensors", {}, force=False):
        pass  # leaving the block without a commit discards it
    assert leftovers(tmp_path) == ["d.safetensors"]


def test_staged_write_errors_leave_nothing(tmp_path, monkeypatch):

    def full_disk(f, tensors, metadata, cancel=None):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(deployfile, "write_safetensors_to", full_disk)
    with pytest.raises(OutputError, match="No space left on device") as e:
        stage_deploy({"w": torch.ones(3)}, tmp_path / "d.safetensors", {}, force=False).commit()
    monkeypatch.undo()
    assert e.value.exit_code == 2 and leftovers(tmp_path) == []

    def unreadable_source():
        raise ValueError("not a write error")

    with pytest.raises(ValueError, match="not a write error"):
        stage_deploy({"w": torch.ones(3)}, tmp_path / "d.safetensors", unreadable_source, force=False).commit()
    assert leftovers(tmp_path) == []

    out = tmp_path / "late.safetensors"
    staged = stage_deploy({"w": torch.ones(3)}, out, {}, force=False)
    out.write_text("someone else's")  # appeared while we were converting
    with pytest.raises(OutputError, match="appeared while converting"):
        staged.commit()
    assert out.read_text() == "someone else's" and leftovers(tmp_path) == ["late.safetensors"]


def test_discard_while_writing_and_commit_misuse(tmp_path, monkeypatch):
    import threading

    gate = threading.Event()

    def slow_metadata():  # e.g. the source's hash, still being computed
        gate.wait(10)
        return {"k": "v"}

    out = tmp_path / "d.safetensors"
    staged = stage_deploy({"w": torch.ones(3)}, out, slow_metadata, force=False)
    assert len(leftovers(tmp_path)) == 1  # the hidden temp file
    threading.Timer(0.2, gate.set).start()
    staged.discard()  # removes the temp file at once, then waits for the writer
    assert leftovers(tmp_path) == []
    with pytest.raises(RuntimeError, match="discarded"):
        staged.commit()
    assert leftovers(tmp_path) == []

    def no_rename(*a):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(OutputError, match="cannot move the file into place .*Permission denied"):
        stage_deploy({"w": torch.ones(3)}, out, {}, force=True).commit()
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------- releasing checkpoint pages


@pytest.mark.skipif(not LINUX, reason="page release uses /proc/self/maps and madvise (Linux)")
def test_released_checkpoint_pages_leave_memory_and_come_back_intact(tmp_path):
    g = torch.Generator().manual_seed(1)
    sd = {f"w{i}": torch.randn(1024, 1024, generator=g) for i in range(16)}  # 64 MB
    torch.save({"model": sd}, tmp_path / "big.pth")
    ckpt = mapped(tmp_path / "big.pth")
    check_finite(ckpt.state_dict, "big.pth")  # reads every page
    assert resident_mb(ckpt.mapped) > 60
    ckpt.release(ckpt.state_dict.values())
    assert resident_mb(ckpt.mapped) < 2
    assert all(torch.equal(ckpt.state_dict[k], v) for k, v in sd.items())  # read again from the file
    assert resident_mb(ckpt.mapped) > 60


@pytest.mark.skipif(not LINUX, reason="page release uses /proc/self/maps and madvise (Linux)")
def test_pages_written_in_the_mapping_are_never_released(tmp_path):
    torch.save({"a": torch.zeros(512, 1024), "b": torch.zeros(512, 1024)}, tmp_path / "w.pth")
    ckpt = mapped(tmp_path / "w.pth")
    a, b = ckpt.state_dict["a"], ckpt.state_dict["b"]
    a.add_(1)  # every page of `a` becomes a private copy (as torch's in-place byte swap would)
    b.view(-1)[:: 4096 // 4 * 4].add_(1)  # every 4th page of `b`
    released = release_pages([a, b], ckpt.mapped)
    assert torch.equal(a, torch.ones(512, 1024))  # not reverted to the file's zeros
    assert b.sum().item() == b.numel() // 4096
    assert 0.7 * b.numel() * 3 < released <= b.numel() * 3  # 3/4 of b's pages (4 bytes each), none of a's


@pytest.mark.skipif(not LINUX, reason="page release uses /proc/self/maps and madvise (Linux)")
def test_release_never_touches_memory_outside_the_file(tmp_path):
    torch.save({"w": torch.randn(256, 1024)}, tmp_path / "c.pth")
    ckpt = mapped(tmp_path / "c.pth")
    stale = load_checkpoint(tmp_path / "c.pth")  # a second mapping of the same file is not ours
    assert stale.mapped and not set(stale.mapped) & set(ckpt.mapped)
    own = torch.randn(512, 1024)  # anonymous memory: MADV_DONTNEED would zero it
    copy = ckpt.state_dict["w"].clone()
    expected = own.clone(), copy.clone()
    assert release_pages([own, copy, None], ckpt.mapped) == 0
    ckpt.release([own, copy])
    assert torch.equal(own, expected[0]) and torch.equal(copy, expected[1])
    assert release_pages([ckpt.state_dict["w"]], ckpt.mapped) > 0
    assert release_pages([ckpt.state_dict["w"]], ()) == 0  # no mapping, nothing released


def test_check_finite_hands_back_every_tensor():
    sd = {"a": torch.ones(3), "b": torch.zeros(2, dtype=torch.int64), "c": torch.ones(0)}
    seen: list[torch.Tensor] = []
    check_finite(sd, "x", done=seen.extend)
    assert [id(t) for t in seen] == [id(t) for t in sd.values()]


# --------------------------------------------------------------------------- fusers' `done`


def test_vanillanet_fuser_hands_back_every_input_and_fuses_the_same():
    from repfuse_cli.fusers.vanillanet import VARIANTS, build_vanillanet, fuse_tensors

    cfg = VARIANTS["vanillanet_6"].shrink(8)
    sd = randomize_bn(build_vanillanet(cfg, deploy=False)).state_dict()
    seen: list[torch.Tensor] = []
    streamed, _ = fuse_tensors(sd, cfg.depth, done=seen.extend)
    plain, _ = fuse_tensors(sd, cfg.depth)
    assert all(torch.equal(streamed[k], plain[k]) for k in plain)
    assert {id(t) for t in seen} == {id(t) for t in sd.values()}


def test_repvgg_fuser_hands_back_every_block_input():
    from repfuse_cli.fusers.repvgg import RepVGGFuser, build_repvgg

    model = randomize_bn(build_repvgg("RepVGG-A0", False, width_multiplier=(0.125,) * 4, num_classes=5)).eval()
    sd = model.state_dict()
    fuser = RepVGGFuser()
    plan = fuser.detect(Checkpoint(Path("m.pth"), "torch", sd, None), Options())
    train = fuser.build_train(plan, sd)
    seen: list[torch.Tensor] = []
    streamed = fuser.fuse(plan, sd, train, done=seen.extend)
    plain = fuser.fuse(plan, sd, train)
    assert all(torch.equal(streamed.tensors[k], plain.tensors[k]) for k in plain.tensors)
    ptrs = {t.data_ptr() for t in seen}
    missed = [k for k, v in sd.items() if v.data_ptr() not in ptrs]
    assert missed == ["linear.weight", "linear.bias"]  # the classifier is copied, not merged


def test_releasing_hooks_see_every_weight_change_nothing_and_go_away():
    from repfuse_cli.fusers.vanillanet import VARIANTS, build_vanillanet

    model = randomize_bn(build_vanillanet(VARIANTS["vanillanet_5"].shrink(8), deploy=False)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        seen: list[torch.Tensor] = []
        with releasing(model, seen.extend):
            out = model(x)
    assert torch.equal(ref, out)
    assert {id(t) for t in seen} == {id(t) for t in [*model.parameters(), *model.buffers()]}
    assert not any(m._forward_hooks for m in model.modules())


# --------------------------------------------------------------------------- the pipeline


def test_conversion_that_fails_verification_leaves_no_staged_file(tmp_path, monkeypatch):
    from repfuse_cli.errors import VerifyFailed
    from repfuse_cli.fusers.vanillanet import VARIANTS, VanillaNetFuser, build_vanillanet

    sd = randomize_bn(build_vanillanet(VARIANTS["vanillanet_5"].shrink(8), deploy=False)).state_dict()
    torch.save({"model": sd}, tmp_path / "v.pth")
    real = VanillaNetFuser.fuse

    def broken(self, plan, state_dict, train, done=None):
        fused = real(self, plan, state_dict, train, done)
        fused.tensors["cls.2.bias"] = fused.tensors["cls.2.bias"] + 1
        return fused

    monkeypatch.setattr(VanillaNetFuser, "fuse", broken)
    with pytest.raises(VerifyFailed):
        run_conversion(tmp_path / "v.pth", tmp_path / "v.safetensors", arch="vanillanet")
    assert leftovers(tmp_path) == ["v.pth"]
