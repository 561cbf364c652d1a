"""fast_layout: the (I, 1, I, I) layout for 1x1 weights of a loaded deploy model; same bytes, same outputs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from torch import nn

from repfuse_cli import convert, load_deploy
from repfuse_cli.layout import channels_last_1x1, fast_layout

SAMPLES = Path(__file__).resolve().parent.parent / "sample_checkpoints"


def test_channels_last_1x1_is_a_view_of_the_same_bytes():
    w = torch.randn(6, 4, 1, 1)
    v = channels_last_1x1(w)
    assert v.stride() == (4, 1, 4, 4) and v.data_ptr() == w.data_ptr() and torch.equal(v, w)
    assert v.is_contiguous() and v.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="standard strides"):
        channels_last_1x1(torch.randn(6, 4, 3, 3))


@pytest.mark.parametrize("inplace", [False, True])
def test_fast_layout_keeps_values_and_outputs(tmp_path, inplace):
    out = tmp_path / "v.safetensors"
    convert(SAMPLES / "vanillanet_tiny.pth", out, arch="vanillanet", verify=False, report=False)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    model = load_deploy(out)
    reference = load_deploy(out)
    fast = fast_layout(model, inplace=inplace)
    assert (fast is model) == inplace

    changed = {n for n, p in fast.named_parameters() if p.stride() != reference.get_parameter(n).stride()}
    one_by_one = {
        f"{n}.weight"
        for n, m in reference.named_modules()
        if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1
    }
    assert changed == one_by_one and len(changed) >= 4  # the merged 1x1 chains and the head
    for n, p in fast.named_parameters():
        r = reference.get_parameter(n)
        assert torch.equal(p, r)  # same values ...
        memory_order = p.detach().as_strided((p.numel(),), (1,), p.storage_offset())
        assert torch.equal(memory_order, r.detach().flatten())  # ... and the same bytes in memory order
        if n in changed:
            o, i = p.shape[:2]
            assert p.stride() == (i, 1, i, i) and p.is_contiguous()
    if not inplace:  # the model handed in is left as it was
        assert all(p.stride() == reference.get_parameter(n).stride() for n, p in model.named_parameters())

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        y, y_fast = reference(x), fast(x)
    # another conv kernel runs, so the float32 sums may round differently: equal within rounding
    assert y_fast.shape == y.shape and torch.allclose(y_fast, y, rtol=1e-5, atol=1e-5 * y.abs().max().item())
    assert hashlib.sha256(out.read_bytes()).hexdigest() == digest  # the file is never touched
