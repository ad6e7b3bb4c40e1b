"""How much work the fast path does at a time (dfr_core.fastpath, benchmarks/speed_floor.py).

The head runs on chunks of grid rows and on blocks of channels so that no full-width tensor is
ever held for a whole image and each chunk's matrix products stay in cache while still large;
on CUDA, where the bound is memory rather than a cache, chunks are sized for the GPU.
"""

from __future__ import annotations

import torch

#: Bytes of the widest fp32 tensor of one chunk (head width x positions): about a quarter of a
#: 32 MiB L3, so a chunk's product, difference and pooled bands stay in cache while its matmuls
#: are still large. VGG19-12 at 256 px (3456 channels) gets 8 grid rows of 64, 512 positions;
#: narrow heads (the default backbone, 232 channels) take the whole 64 x 64 grid at once.
#: Chosen by an ad-hoc in-process A/B on the 2-core AVX-512 dev machine (not a committed
#: benchmark): for VGG19-12, 512 positions were faster than 1,024 and 256, with half the
#: head's working memory of 1,024; for the default backbone, the whole grid was as fast as
#: 1,024 and 512 was slower. Rechecked after the position-major rewrite (same kind of A/B):
#: 256 positions were still about 5 % slower for VGG19-12. BENCHMARKS.md's figures are at
#: this value. An int8 head uses it too: its GEMMs reach their rate with more rows on the AMD
#: dev machine (ad hoc, ms per image: 186-190 at 7 MiB, 170 at 21), but the larger chunk's
#: temporaries (about 3x) made the head's chunk the paper configuration's peak, and on the AMX
#: machine the head took 112-113 ms at either size (ad hoc, alternating, stop 28).
CHUNK_BYTES = 7 << 20

#: Bytes of fp32 input per block of the int8 first layer at the coarse maps' native positions
#: (VGG19-12: 256 of relu4_x's 1,024): its standardised copy, int8 copy and int32 product stay
#: a few MiB while the product is still a large GEMM.
QUANT_BYTES = 2 << 20

#: The same bound on CUDA, where a chunk is sized by memory, not by a cache: CPU-sized chunks
#: and channel groups leave a GPU waiting on kernel launches (the paper configuration ran at
#: 65-72 images/s on an H200 with them, `benchmarks/gpu_check.py`). 256 MiB takes VGG19-12's
#: whole 64 x 64 grid of one image in one chunk (56 MiB for its widest tensor).
CUDA_CHUNK_BYTES = 256 << 20


def _on_cuda(device: torch.device | None) -> bool:
    return device is not None and device.type == "cuda"


def chunk_rows(width: int, grid_w: int, device: torch.device | None = None) -> int:
    """Grid rows per chunk (at most) for a head whose widest layer has ``width`` channels, on
    ``device`` (None: the CPU)."""
    budget = CUDA_CHUNK_BYTES if _on_cuda(device) else CHUNK_BYTES
    return max(1, budget // (4 * width * grid_w))


def quant_rows(width: int) -> int:
    """Rows per block of the int8 first layer at the coarse maps' native positions, for a
    product ``width`` channels wide at most (its input's or output's): QUANT_BYTES of fp32."""
    return max(1, QUANT_BYTES // (4 * width))


def row_parts(total: int, most: int) -> list[tuple[int, int]]:
    """``total`` rows cut into as few parts of at most ``most`` rows as possible, of heights
    differing by one at most (no short last part doing a full part's fixed work): (r0, r1)."""
    parts = -(-total // max(most, 1))
    return [(k * total // parts, (k + 1) * total // parts) for k in range(parts)]


#: Channels of a coarse map mapped onto the grid at a time (VGG19-12: one relu4_x layer):
#: bounds a band's fp32 rows and products to rows x 512, a few MiB, within a chunk. On CUDA
#: a map is handled whole (fewer, larger kernels; memory is bounded by CUDA_CHUNK_BYTES).
BAND_CHANNELS = 512


def channel_blocks(channels: int, device: torch.device | None = None) -> list[tuple[int, int]]:
    """The (lo, hi) channel ranges, BAND_CHANNELS wide (on CUDA: one), a coarse map and the
    last layer are handled in."""
    step = channels if _on_cuda(device) else BAND_CHANNELS
    return [(lo, min(lo + step, channels)) for lo in range(0, channels, max(step, 1))]


__all__ = [
    "BAND_CHANNELS",
    "CHUNK_BYTES",
    "CUDA_CHUNK_BYTES",
    "QUANT_BYTES",
    "channel_blocks",
    "chunk_rows",
    "quant_rows",
    "row_parts",
]
