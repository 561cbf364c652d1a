"""The pure fold functions against their definitions, in float64 with random values."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from repfuse_cli.fold import add_centered, add_identity, identity_kernel, merge_1x1, pad_kernel

F64 = torch.float64


@pytest.mark.parametrize("channels, groups, size", [(6, 1, 3), (8, 2, 3), (8, 4, 5), (4, 4, 1)])
def test_identity_kernel_is_the_identity(channels, groups, size):
    x = torch.randn(2, channels, 7, 7, dtype=F64)
    k = identity_kernel(channels, groups, size)
    assert torch.equal(F.conv2d(x, k, padding=size // 2, groups=groups), x)


def test_pad_kernel_keeps_the_function():
    x, w = torch.randn(2, 4, 9, 9, dtype=F64), torch.randn(5, 4, 1, 1, dtype=F64)
    assert torch.allclose(F.conv2d(x, w), F.conv2d(x, pad_kernel(w, 3), padding=1), atol=1e-12)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_in_place_adds_equal_their_definitions(groups):
    g = torch.Generator().manual_seed(groups)
    kernel = torch.randn(8, 8 // groups, 3, 3, dtype=F64, generator=g)
    small = torch.randn(8, 8 // groups, 1, 1, dtype=F64, generator=g)
    scale = torch.randn(8, dtype=F64, generator=g)
    expected = kernel + pad_kernel(small, 3) + identity_kernel(8, groups, 3) * scale[:, None, None, None]
    got = add_identity(add_centered(kernel.clone(), small), scale)
    assert torch.equal(got, expected)
    rows = kernel.clone()  # the same, a block of output rows at a time
    for start in range(0, 8, 3):
        block = rows[start : start + 3]
        add_identity(add_centered(block, small[start : start + 3]), scale[start : start + 3], first_row=start)
    assert torch.equal(rows, expected)
    with pytest.raises(ValueError):
        add_centered(torch.zeros(2, 2, 3, 3, dtype=F64), torch.zeros(2, 2, 2, 2))


def test_merge_1x1_composes_two_convs():
    x = torch.randn(2, 3, 10, 10, dtype=F64)
    w1, b1 = torch.randn(5, 3, 4, 4, dtype=F64), torch.randn(5, dtype=F64)
    w2, b2 = torch.randn(6, 5, 1, 1, dtype=F64), torch.randn(6, dtype=F64)
    w, b = merge_1x1(w2, b2, w1, b1)
    ref = F.conv2d(F.conv2d(x, w1, b1, stride=2), w2, b2)
    assert torch.allclose(F.conv2d(x, w, b, stride=2), ref, atol=1e-10)


def test_merge_1x1_in_blocks_rounds_once_to_the_output_dtype():
    g = torch.Generator().manual_seed(0)
    wo, wi = torch.randn(300, 200, 1, 1, generator=g), torch.randn(200, 200, 1, 1, generator=g)
    exact, _ = merge_1x1(wo, None, wi, None)
    for dtype in (torch.float32, torch.float16):
        blocked, _ = merge_1x1(wo, None, wi, None, out_dtype=dtype, block_rows=64)
        assert blocked.dtype == dtype and blocked.stride() == (200, 1, 1, 1)
        # one rounding of the float64 product (BLAS may sum a row block in another order: 1 ulp)
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(blocked, exact.to(dtype), rtol=eps, atol=eps * exact.abs().max().item())


def test_merge_1x1_folds_both_bns_like_fold_bn_in_blocks():
    from repfuse_cli.fold import bn_scale_shift, fold_bn

    g = torch.Generator().manual_seed(1)

    def bn(n):
        return bn_scale_shift(
            torch.randn(n, generator=g),
            torch.rand(n, generator=g) + 0.5,
            torch.rand(n, generator=g) + 0.5,
            torch.randn(n, generator=g),
            1e-5,
        )

    wo, bo = torch.randn(7, 5, 1, 1, generator=g), torch.randn(7, generator=g)
    wi, bi = torch.randn(5, 3, 3, 3, generator=g), torch.randn(5, generator=g)
    (so, to), (si, ti) = bn(7), bn(5)
    for outer_b, inner_b in ((bo, bi), (None, None)):
        w_ref, b_ref = merge_1x1(*fold_bn(wo, outer_b, so, to), *fold_bn(wi, inner_b, si, ti))
        w, b = merge_1x1(
            wo, outer_b, wi, inner_b, outer_scale=so, outer_shift=to, inner_scale=si, inner_shift=ti, block_rows=2
        )  # blocks over both operands' rows
        assert torch.allclose(w, w_ref, rtol=1e-12, atol=1e-12) and torch.allclose(b, b_ref, rtol=1e-12, atol=1e-12)
