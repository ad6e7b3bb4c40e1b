"""int8 products (dfr_core.quantized): exact integer GEMMs, bounded rounding, scales per row
and per output channel."""

from __future__ import annotations

import pytest
import torch

from dfr_core.quantized import (
    QMAX,
    int8_affine,
    int8_product,
    quantize_rows,
    quantize_weight,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("shape", [(1, 8, 8), (5, 7, 3), (37, 232, 116), (600, 1928, 512)])
def test_int_mm_is_exact(shape):
    """The int32 accumulation is exact on CPU for any shape (torch._int_mm has no alignment
    rule there), with a transposed weight view as the fast path passes it."""
    m, k, n = shape
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=_gen(0))
    b = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=_gen(1))
    exact = (a.long() @ b.long().T).int()
    assert torch.equal(torch._int_mm(a, b.T), exact)


def test_weights_round_to_nearest_per_output_channel():
    w = torch.randn(64, 96, generator=_gen(2)) * torch.logspace(-3, 1, 64)[:, None]
    w[3] = 0.0  # an all-zero channel stays zero
    q = quantize_weight(w)
    assert q.q.dtype == torch.int8 and q.q.shape == w.shape and q.scale.shape == (64,)
    assert torch.equal(q.q.abs().amax(dim=1)[[0, 1, 2, 4]], torch.full((4,), 127, dtype=torch.int8))
    assert not q.q[3].any()
    err = (q.q.double() * q.scale.double()[:, None] - w.double()).abs()
    assert bool((err <= q.scale.double()[:, None] * 0.5 * (1 + 1e-5)).all())


def test_rows_round_to_nearest_per_row():
    x = torch.randn(50, 40, generator=_gen(3)) * torch.logspace(-4, 2, 50)[:, None]
    x[7] = 0.0
    rows = quantize_rows(x)
    assert rows.q.dtype == torch.int8 and rows.scale.shape == (50, 1)
    assert not rows.q[7].any()
    assert float(rows.q.abs().max()) == QMAX
    err = (rows.q.double() * rows.scale.double() - x.double()).abs()
    assert bool((err <= rows.scale.double() * 0.5 * (1 + 1e-5)).all())
    # quantising in place (the caller's temporary as scratch) gives the same rows
    scratch = x.clone()
    in_place = quantize_rows(scratch, overwrite=True)
    assert torch.equal(in_place.q, rows.q) and torch.equal(in_place.scale, rows.scale)
    # bf16 input is quantised from its fp32 value
    assert torch.equal(quantize_rows(x.bfloat16()).q, quantize_rows(x.bfloat16().float()).q)


def test_affine_is_the_product_within_its_rounding():
    """|x W^T - dequantised| is bounded by the rounding of both operands (half a step each),
    and the int8 result is not the fp32 one (it really is quantised)."""
    x = torch.randn(300, 256, generator=_gen(4)).relu()
    w = torch.randn(128, 256, generator=_gen(5)) * 0.05
    bias = torch.randn(128, generator=_gen(6))
    exact = torch.addmm(bias.double(), x.double(), w.double().T)
    got = int8_affine(x, quantize_weight(w), bias)
    assert got.dtype == torch.float32 and got.shape == (300, 128)
    rows, weight = quantize_rows(x), quantize_weight(w)
    xs, ws = rows.scale.double(), weight.scale.double()[None, :]
    # x = xq xs + ex, w = wq ws + ew, |ex| <= xs / 2, |ew| <= ws / 2, summed over 256 inputs
    bound = (
        0.5 * xs * w.double().abs().sum(dim=1)[None, :]
        + 0.5 * ws * x.double().abs().sum(dim=1, keepdim=True)
        + 0.25 * 256 * xs * ws
    )
    assert bool(((got.double() - exact).abs() <= bound * (1 + 1e-4) + 1e-5).all())
    assert not torch.allclose(got.double(), exact, rtol=0, atol=1e-7)
    # quantising once and reusing the rows for several output groups gives the same numbers
    lo = int8_product(rows, weight.rows(0, 64), bias[:64])
    hi = int8_product(rows, weight.rows(64, 128), bias[64:])
    torch.testing.assert_close(torch.cat([lo, hi], dim=1), got, rtol=0, atol=0)
    out = torch.full((300, 128), float("nan"))
    assert int8_product(rows, weight, bias, out=out) is out
    torch.testing.assert_close(out, got, rtol=0, atol=0)
