"""A backbone's early blocks run in stripes of rows: the same maps, a few MiB at a time.

Why: at full resolution a CNN's first blocks hold its largest maps (VGG19 at 256 px: relu1_x
is 64 x 256 x 256, 16 MiB each at fp32, two alive at once), far more than anything after
them. A block made only of row-local steps (same-padded stride-1 convolutions and ReLUs) and
ending in a 2 x 2 max pool can be computed a band of output rows at a time from the input rows
that band reads (its halo: a convolution of kernel height k reads k // 2 rows either side), so
only a stripe of each map is ever held, plus the block's pooled output (a quarter of its last
map). A consumer that pools the requested maps stripe by stripe (`dfr_core.regional_maps`)
never needs them whole.

Each stripe's convolution sees exactly the rows the whole-map convolution would, zero rows
standing in for its padding at the image's top and bottom edges, so every output value is
the same sum; `tests/unit/test_stripes.py` checks the assembled maps against the plain ones.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class MapRows(NamedTuple):
    """Rows ``row0 .. row0 + rows.shape[-2]`` of requested layer ``layer`` (its index in the
    backbone's requested layers): a whole map has ``row0`` 0 and every row."""

    layer: int
    row0: int
    rows: torch.Tensor


def _row_local(step: object) -> bool:
    """A step whose output row r depends only on input rows near r, at the same resolution."""
    if type(step) is nn.ReLU:
        return True
    if type(step) is not nn.Conv2d:
        return False
    kh, kw = step.kernel_size
    return (
        step.stride == (1, 1)
        and step.dilation == (1, 1)
        and kh % 2 == 1
        and kw % 2 == 1
        and step.padding == (kh // 2, kw // 2)
        and step.padding_mode == "zeros"
    )


def _halving_pool(step: object) -> bool:
    return (
        type(step) is nn.MaxPool2d
        and step.kernel_size in (2, (2, 2))
        and step.stride in (2, (2, 2))
        and step.padding in (0, (0, 0))
        and step.dilation in (1, (1, 1))
        and not step.ceil_mode
        and not step.return_indices
    )


def block_end(steps: Sequence[object], start: int) -> int | None:
    """The end (exclusive) of a stripable block starting at ``start``: row-local steps, at
    least one a convolution, then a 2 x 2 max pool; None when the steps there are not such a
    block."""
    end = start
    while end < len(steps) and _row_local(steps[end]):
        end += 1
    convs = any(type(step) is nn.Conv2d for step in steps[start:end])
    if not convs or end >= len(steps) or not _halving_pool(steps[end]):
        return None
    return end + 1


def _halo(step: object) -> int:
    return step.kernel_size[0] // 2 if type(step) is nn.Conv2d else 0


def _rows_conv(step: nn.Conv2d, x: torch.Tensor, top: int, bottom: int) -> torch.Tensor:
    """The convolution on a stripe that lacks ``top``/``bottom`` rows of its halo (the image's
    edges): those rows are its zero padding, given explicitly; the columns keep the layer's."""
    if top or bottom:
        x = F.pad(x, (0, 0, top, bottom))
    padding = (0, step.padding[1])
    if x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.is_available():
        # oneDNN, as the whole map's convolution: torch sends a batch-1 input of at most 20,480
        # values (a stripe of an RGB image) to its own slower convolution instead
        return torch.ops.aten.mkldnn_convolution(
            x, step.weight, step.bias, list(padding), [1, 1], [1, 1], step.groups
        )
    return F.conv2d(x, step.weight, step.bias, 1, padding, 1, step.groups)


def run_block(
    steps: Sequence[nn.Module], x: torch.Tensor, rows: int, want: dict[int, int]
) -> Generator[MapRows, None, torch.Tensor]:
    """Run one stripable block (`block_end`) on ``x`` (B, C, H, W), ``rows`` rows of its
    full-resolution maps at a time (even; H must be too). Yields the rows of the steps in
    ``want`` (step index in ``steps`` -> requested layer index) as they are made, each row of
    each map exactly once, and returns the pooled output, whole.
    """
    *local, pool = steps
    h = x.shape[-2]
    if rows % 2 or h % 2:
        raise ValueError(f"a striped block needs even row counts, got {rows} of {h}")
    out = None
    for r0 in range(0, h, rows):
        r1 = min(r0 + rows, h)
        # the rows each step must produce for this stripe: its own, plus every later halo
        need = []
        a, b = r0, r1
        for step in reversed(local):
            need.insert(0, (a, b))
            a, b = max(a - _halo(step), 0), min(b + _halo(step), h)
        cur, have = x[:, :, a:b], (a, b)
        for j, step in enumerate(local):
            lo, hi = need[j]
            if type(step) is nn.Conv2d:
                halo = _halo(step)
                top, bottom = max(halo - lo, 0), max(hi + halo - h, 0)
                cur = _rows_conv(step, cur, top, bottom)  # exactly rows lo..hi
            else:
                cur = step(cur)[:, :, lo - have[0] : hi - have[0]]
            have = (lo, hi)
            if j in want:
                yield MapRows(want[j], r0, cur[:, :, r0 - lo : r1 - lo])
        pooled = pool(cur[:, :, r0 - have[0] : r1 - have[0]])
        if out is None:
            shape = (x.shape[0], pooled.shape[1], h // 2, pooled.shape[-1])
            out = torch.empty(shape, device=x.device, dtype=pooled.dtype)
            out = out.contiguous(memory_format=torch.channels_last)
        out[:, :, r0 // 2 : r1 // 2].copy_(pooled)
    return out


__all__ = ["MapRows", "block_end", "run_block"]
