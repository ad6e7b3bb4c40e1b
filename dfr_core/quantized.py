"""int8 matrix products for the head's fast path (`dfr_core.fastpath`, precision ``int8``).

Why: the paper configuration's head is about 49 GMAC per 256 px image, two thirds of its
arithmetic; VNNI (AVX512-VNNI) multiplies int8 at about twice the bf16 rate on the same cores.
Weights are quantised once, symmetrically per output channel; activations per row (one grid
position), symmetrically, at the time of the product: each position keeps its own range, so a
position of small features is not rounded to the scale of the largest one in its chunk. The
products accumulate exactly in int32 (``K * 127 * 127`` stays far below 2**31 for any head here)
and are scaled back to fp32; everything between products (biases, ReLU, the regional operator,
the squared error) runs in fp32.

This is a reduced precision of its own: thresholds hold only when calibrated at it
(`dfr_core.precision`), and `benchmarks/precision_parity.py` measures its parity on real data.
`torch._int_mm` is the int8 GEMM torch exposes (what torchao builds its int8 paths on); on CPU
it takes any shape and returns the exact int32 products (`tests/unit/test_quantized.py`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

#: Symmetric int8 range: -127..127 (-128 is never produced, so negation stays in range).
QMAX = 127.0

#: Output channels per int8 GEMM call (see `int8_product`). 512 x 1,928 x 512 still runs at
#: the full int8 rate on the 2-core dev machine (ad-hoc: 419-424 GMAC/s), and its scratch is
#: about 1 MB against about 5 MB for 512 x 1,928 x 1,928 in one call.
OUT_BLOCK = 512


class Int8Weight(NamedTuple):
    """A linear map's (out, in) weight, quantised per output channel: ``W ~ q * scale[:, None]``."""

    q: torch.Tensor  # (out, in) int8
    scale: torch.Tensor  # (out,) fp32

    def rows(self, lo: int, hi: int) -> Int8Weight:
        """Output channels lo:hi (views: no copy)."""
        return Int8Weight(self.q[lo:hi], self.scale[lo:hi])


def quantize_weight(weight: torch.Tensor) -> Int8Weight:
    """(out, in) float weight -> per-output-channel symmetric int8 (rounded to nearest)."""
    w = weight.double()
    scale = w.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / QMAX
    q = torch.round(w / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return Int8Weight(q.contiguous(), scale.float())


class Int8Rows(NamedTuple):
    """Activations quantised per row: ``x ~ q * scale``."""

    q: torch.Tensor  # (M, K) int8
    scale: torch.Tensor  # (M, 1) fp32


def quantize_rows(x: torch.Tensor, overwrite: bool = False) -> Int8Rows:
    """(M, K) float -> per-row symmetric int8 (rounded to nearest). A row of zeros gets a tiny
    scale and quantises to zeros. ``overwrite``: ``x`` (fp32, the caller's own temporary) is
    used as the scratch space, so no second (M, K) fp32 tensor is allocated."""
    x = x.float()
    # max |x| per row as two reductions: no |x| copy, and about 10x faster on CPU than an
    # inf-norm or aminmax reduction over rows (torch 2.14)
    amax = torch.maximum(x.amax(dim=1, keepdim=True), x.amin(dim=1, keepdim=True).neg_())
    scale = amax.clamp_min_(torch.finfo(torch.float32).tiny).div_(QMAX)
    scaled = x.div_(scale) if overwrite else torch.div(x, scale)
    return Int8Rows(scaled.round_().to(torch.int8), scale)


def int8_product(
    x: Int8Rows, weight: Int8Weight, bias: torch.Tensor | None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """fp32 ``x @ W^T (+ bias)`` from quantised rows: exact int32 GEMMs, scaled back by both
    scales (a chunk's rows are quantised once for all of a layer's channel groups); written
    into ``out`` (fp32, (M, N)) when given.

    The GEMMs run OUT_BLOCK output channels at a time, each converted into ``out`` as it is
    copied: the int32 product and oneDNN's scratch for it (which grow with rows x outputs)
    stay one block's, not the whole layer's."""
    rows, width = x.q.shape[0], weight.q.shape[0]
    if out is None:
        out = torch.empty(rows, width, device=x.q.device)
    for lo in range(0, width, OUT_BLOCK):
        hi = min(lo + OUT_BLOCK, width)
        out[:, lo:hi] = torch._int_mm(x.q, weight.q[lo:hi].T)
    out.mul_(x.scale).mul_(weight.scale)
    return out if bias is None else out.add_(bias)


def int8_affine(
    x: torch.Tensor, weight: Int8Weight, bias: torch.Tensor | None, overwrite: bool = False
) -> torch.Tensor:
    """fp32 ``x @ W^T (+ bias)`` with the product in int8 (``x`` quantised per row;
    ``overwrite``: as in `quantize_rows`). Once quantised, ``x`` is released before the output
    is allocated: when the caller holds no other reference (a temporary it passed), its memory
    is free for the output."""
    rows = quantize_rows(x, overwrite)
    del x
    return int8_product(rows, weight, bias)


__all__ = [
    "OUT_BLOCK",
    "QMAX",
    "Int8Rows",
    "Int8Weight",
    "int8_affine",
    "int8_product",
    "quantize_rows",
    "quantize_weight",
]
