"""deploydiff: two deploy files compared key by key, bit by bit, with distances in ulps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from repfuse_cli.deploydiff import DIFFER, IDENTICAL, diff_files, ordered_bits, ulp_distance
from repfuse_cli.errors import BadInput

FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    save_file(tensors, str(path), metadata=metadata)
    return path


def _next_up(t: torch.Tensor, n: int = 1) -> torch.Tensor:
    """``t`` moved ``n`` representable values towards +inf (numpy's nextafter, bfloat16 by its bits)."""
    out = t.clone()
    for _ in range(n):
        if out.dtype == torch.bfloat16:  # bfloat16 has no numpy type: step the float32 with the same top bits
            f = out.float()
            up = torch.where(f >= 0, (f.view(torch.int32) + (1 << 16)), (f.view(torch.int32) - (1 << 16)))
            up = torch.where(f == 0, torch.tensor(1 << 16, dtype=torch.int32), up)  # +-0 -> smallest subnormal
            out = up.view(torch.float32).bfloat16()
        else:
            a = out.numpy()
            out = torch.from_numpy(np.nextafter(a, np.array(np.inf, dtype=a.dtype)))
    return out


@pytest.mark.parametrize("dtype", FLOATS)
def test_ulps_count_representable_values_across_zero(dtype):
    x = torch.tensor([-2.5, -1e-3, 0.0, 1.0, 3.0e4], dtype=dtype)
    for n in (1, 2, 7):
        assert ulp_distance(x, _next_up(x, n)).tolist() == [float(n)] * 5
    # -0.0 and +0.0: different bits, the same value, no ulp apart; the smallest subnormals around
    # zero are one ulp from zero each, so two apart from each other
    z = torch.tensor([0.0], dtype=dtype)
    assert ulp_distance(-z, z).item() == 0 and ordered_bits(-z).item() == 0
    tiny = _next_up(z)
    assert ulp_distance(-tiny, tiny).item() == 2
    # symmetric, monotonic in value
    y = torch.linspace(-4, 4, 101, dtype=torch.float64).to(dtype)
    k = ordered_bits(y)
    assert (k[1:] > k[:-1]).all()
    assert torch.equal(ulp_distance(y, y.flip(0)), ulp_distance(y.flip(0), y))


def test_ulps_of_float64_across_the_whole_range_do_not_overflow():
    big = torch.tensor([torch.finfo(torch.float64).max], dtype=torch.float64)
    d = ulp_distance(-big, big).item()
    assert d == pytest.approx(2 * 0x7FEFFFFFFFFFFFFF, rel=1e-15)


@pytest.mark.parametrize("dtype", FLOATS)
def test_identical_files_exit_0(tmp_path, dtype):
    t = {"a.weight": torch.randn(4, 3, 3, 3).to(dtype), "a.bias": torch.randn(4).to(dtype)}
    a = _write(tmp_path / "a.safetensors", t, {"source": "x.pth"})
    b = _write(tmp_path / "b.safetensors", {k: v.clone() for k, v in reversed(t.items())}, {"source": "y.pth"})
    res = diff_files(a, b)
    assert res.identical and res.exit_code == IDENTICAL == 0
    assert res.tensors == 2 and res.elements == 4 * 27 + 4 and res.metadata_differs == ["source"]
    assert res.summary().startswith("identical")
    d = res.to_dict()
    assert json.loads(json.dumps(d))["exit_code"] == 0 and d["max_ulps"] == 0


@pytest.mark.parametrize("dtype", FLOATS)
def test_values_one_ulp_apart_are_counted(tmp_path, dtype):
    w = torch.randn(64, 32).to(dtype)
    w2 = w.clone()
    w2.view(-1)[[3, 100, 2000]] = _next_up(w.view(-1)[[3, 100, 2000]])
    w2.view(-1)[5] = _next_up(w.view(-1)[5:6], 4)[0]
    a = _write(tmp_path / "a.safetensors", {"w": w, "b": torch.ones(3, dtype=dtype)})
    b = _write(tmp_path / "b.safetensors", {"w": w2, "b": torch.ones(3, dtype=dtype)})
    res = diff_files(a, b)
    assert res.exit_code == DIFFER == 1 and not res.identical
    assert res.differing_elements == 4 and res.max_ulps == 4 and res.elements == 64 * 32 + 3
    [d] = res.differing
    assert (d.key, d.dtype, d.shape, d.differing, d.max_ulps) == ("w", str(dtype)[6:], [64, 32], 4, 4)
    assert d.max_abs_diff == pytest.approx((w2.double() - w.double()).abs().max().item())
    assert "4 of 2,051 elements differ in 1 tensors, by at most 4 ulps (`w`)" in res.summary()


def test_signed_zero_differs_in_bits_but_not_in_ulps(tmp_path):
    a = _write(tmp_path / "a.safetensors", {"w": torch.tensor([0.0, 1.0])})
    b = _write(tmp_path / "b.safetensors", {"w": torch.tensor([-0.0, 1.0])})
    res = diff_files(a, b)
    assert res.exit_code == 1 and res.differing_elements == 1 and res.max_ulps == 0


def test_keys_dtypes_and_shapes_are_compared(tmp_path):
    a = _write(tmp_path / "a.safetensors", {"x": torch.zeros(2, 3), "y": torch.zeros(4), "only_a": torch.zeros(1)})
    b = _write(
        tmp_path / "b.safetensors",
        {"x": torch.zeros(3, 2), "y": torch.zeros(4, dtype=torch.float16), "only_b": torch.zeros(1)},
    )
    res = diff_files(a, b)
    assert res.exit_code == 1 and res.only_in_a == ["only_a"] and res.only_in_b == ["only_b"]
    assert [m["key"] for m in res.mismatched] == ["x", "y"] and res.mismatched[1]["b"] == "F16 [4]"
    assert "keys differ (1 only in A, 1 only in B); 2 tensors differ in dtype or shape" in res.summary()


def test_integer_tensors_differ_by_their_difference(tmp_path):
    a = _write(tmp_path / "a.safetensors", {"n": torch.tensor([5, 7]), "m": torch.tensor([True, False])})
    b = _write(tmp_path / "b.safetensors", {"n": torch.tensor([5, 10]), "m": torch.tensor([True, True])})
    res = diff_files(a, b)
    assert {d.key: (d.differing, d.max_ulps) for d in res.differing} == {"n": (1, 3), "m": (1, 1)}


@pytest.mark.parametrize("what", ["missing", "dir", "garbage", "empty"])
def test_bad_input_is_one_line_exit_2(tmp_path, what):
    good = _write(tmp_path / "good.safetensors", {"w": torch.zeros(2)})
    bad = tmp_path / "bad.safetensors"
    if what == "dir":
        bad.mkdir()
    elif what == "garbage":
        bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    elif what == "empty":
        bad.write_bytes(b"")
    for args in ((good, bad), (bad, good)):
        with pytest.raises(BadInput) as e:
            diff_files(*args)
        assert e.value.exit_code == 2 and "\n" not in str(e.value) and "bad.safetensors" in str(e.value)


def test_two_conversions_of_a_sample_checkpoint_are_identical(tmp_path):
    from repfuse_cli import convert

    ckpt = Path(__file__).resolve().parent.parent / "sample_checkpoints" / "repvgg_tiny.pth.tar"
    a = convert(ckpt, tmp_path / "a.safetensors", arch="repvgg", verify=False, report=False)["output"]
    b = convert(ckpt, tmp_path / "b.safetensors", arch="repvgg", verify=False, report=False)["output"]
    res = diff_files(a, b)
    assert res.exit_code == 0 and res.tensors > 10 and res.metadata_differs == []
