"""Winograd F(2x2, 3x3) for the backbone's wide 3x3 convolutions on the CPU, at fp32.

Why: on the 2-core AVX-512 dev machine the paper configuration's VGG19 convolutions run at
oneDNN's fp32 peak (about 100 GMAC/s) and are more than half of the fp32-backbone scoring time;
the only way to make them faster at fp32 is less arithmetic. Winograd's minimal filtering
(Lavin and Gray, 2016) computes each 2 x 2 output tile from a 4 x 4 input tile with 16
multiplications per channel pair instead of 36: 2.25x fewer multiply-adds, the rest being
additions (one of the algorithms cuDNN chooses from on a GPU). Its rounding stays that of fp32
(the transforms have coefficients 0, +-1 and +-1/2); `tests/unit/test_winograd.py` bounds it
against a float64 convolution, beside oneDNN's own fp32 error.

The transformed input of a band of tile rows, the 16 GEMMs (one per tile element) and the
output transform run band by band (`BAND_BYTES`), one transformed row of the input (4 of the
16 tile elements) held at a time and multiplied before the next, so the extra memory is a
band's products and a quarter of its transformed input (one scratch, reused by every band of
a layer) and the band's rows of input, zero-padded, not the whole transformed map's (4x the
input) or a padded copy of the whole input. Only wide layers gain: ad-hoc timings at 256 px,
2 threads, each layer alone, 256->256 at 64 x 64 about 18 against 22 ms, 512->512 at 32 x 32
about 15 against 24 ms; at 64 or 128 input channels the transforms cost more than they save,
hence `MIN_CHANNELS`.
Inference only (the backbone is frozen), fp32 only: `dfr_core.inference.prepare_extractor`
installs it for an fp32 backbone on the CPU (`FeatureBackbone.use_winograd`); a GPU keeps
cuDNN's own algorithms.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

#: Input channels from which a 3x3 convolution runs as Winograd (see the module docstring).
MIN_CHANNELS = 256

#: Bytes of the transformed input (16 tile elements x tiles x channels, fp32) of one band:
#: VGG19 at 256 px runs relu3_x in 4 bands, relu4_x in 2. Ad-hoc in-process A/Bs of VGG19-12's
#: backbone at 256 px on the 2-core dev machines (not a committed benchmark): on the AMD one,
#: 226-239 ms with plain convolutions; 197-210 with 4 MiB bands, 189-202 with 8 MiB, 200-201
#: with 12 MiB and 184-194 with 16 MiB; on the AMX one (stop 28) 153
#: ms with 4 MiB and 155 with 16. A band's products and a quarter of its transformed input (5
#: MiB for relu3_x at 4 MiB) are held while it runs, in one scratch every band of a layer
#: reuses: at 16 MiB they made a Winograd layer the paper configuration's peak.
BAND_BYTES = 4 << 20

# Filter transform G (4 x 3): U = G g G^T.
_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))
#: Input transform B^T, row k = x[i] + sign * x[j]: d0 - d2, d1 + d2, d2 - d1, d1 - d3.
_BT = ((0, 2, -1), (1, 2, 1), (2, 1, -1), (1, 3, -1))
#: Output transform A^T, row a = x[i] + sj * x[j] + sk * x[k]: m0 + m1 + m2, m1 - m2 - m3.
_AT = ((0, 1, 1, 2, 1), (1, 2, -1, 3, -1))


def eligible(conv: nn.Module) -> bool:
    """A dense, stride-1, 'same'-padded 3x3 convolution with at least MIN_CHANNELS inputs."""
    return (
        type(conv) is nn.Conv2d
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and conv.in_channels >= MIN_CHANNELS
    )


def transform_weight(weight: torch.Tensor) -> torch.Tensor:
    """(Cout, Cin, 3, 3) -> (16, Cin, Cout) fp32: ``G g G^T`` per channel pair, in float64."""
    g = torch.tensor(_G, dtype=torch.float64, device=weight.device)
    u = torch.einsum("ai,ocij,bj->abco", g, weight.detach().double(), g)
    return u.reshape(16, weight.shape[1], weight.shape[0]).float().contiguous()


class Winograd3x3(nn.Module):
    """A drop-in for an eligible `nn.Conv2d` (same output to fp32 rounding), channels_last out."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if not eligible(conv):
            raise ValueError(f"not a convolution Winograd F(2x2, 3x3) applies to: {conv}")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.register_buffer("u", transform_weight(conv.weight))
        bias = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels)
        self.register_buffer("bias", bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"Winograd3x3 runs at fp32 only, not {x.dtype} or under autocast")
        n, _, h, w = x.shape
        th, tw = -(-h // 2), -(-w // 2)  # tiles; an odd side gets one padded row/column
        x = x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)  # (n, h, w, c)
        out = torch.empty(n, 2 * th, 2 * tw, self.out_channels, device=x.device)
        rows = max(1, BAND_BYTES // (16 * tw * max(self.in_channels, self.out_channels) * 4))
        # one band's scratch, reused by every band (the same blocks image after image)
        most = min(rows, th)
        m = torch.empty(16 * most * tw * self.out_channels, device=x.device)
        v = torch.empty(4 * most * tw * self.in_channels, device=x.device)
        for i in range(n):
            for r0 in range(0, th, rows):
                r1 = min(th, r0 + rows)
                band = _padded_rows(x[i], 2 * r0 - 1, 2 * r1 + 1, 1 + 2 * tw - w)
                self._band(band, out[i, 2 * r0 : 2 * r1], m, v)
        out = out.permute(0, 3, 1, 2)
        if (2 * th, 2 * tw) != (h, w):
            out = out[:, :, :h, :w].contiguous(memory_format=torch.channels_last)
        return out

    def _band(self, d: torch.Tensor, out: torch.Tensor, m: torch.Tensor, v: torch.Tensor) -> None:
        """Padded input rows (2n+2, 2tw+2, Cin) -> output rows (2n, 2tw, Cout), in ``out``."""
        n, tw = out.shape[0] // 2, out.shape[1] // 2
        tile_rows = [d[a::2][:n] for a in range(4)]  # row a of every tile: (n, 2tw+2, Cin)
        m = m[: 16 * n * tw * self.out_channels].view(16, n * tw, self.out_channels)
        v = v[: 4 * n * tw * self.in_channels].view(4, n, tw, self.in_channels)
        for k, (i, j, sign) in enumerate(_BT):  # B^T d B, one transformed row at a time,
            row = torch.add(tile_rows[i], tile_rows[j], alpha=sign)  # multiplied at once
            cols = [row[:, b::2][:, :tw] for b in range(4)]
            for col, (p, q, sign_q) in enumerate(_BT):
                torch.add(cols[p], cols[q], alpha=sign_q, out=v[col])
            del row, cols
            torch.bmm(
                v.view(4, n * tw, self.in_channels),
                self.u[4 * k : 4 * k + 4],
                out=m[4 * k : 4 * k + 4],
            )
        del v
        # A^T M A maps element (1, 1) to all four outputs with coefficient 1: the bias, once
        m[5].add_(self.bias)
        m = m.view(4, 4, n, tw, self.out_channels)
        tiles = out.view(n, 2, tw, 2, self.out_channels)
        for a, (i, j, sj, k, sk) in enumerate(_AT):  # A^T M A, one output row at a time
            s = torch.add(m[i], m[j], alpha=sj).add_(m[k], alpha=sk)
            for b, (p, q, sq, r, sr) in enumerate(_AT):
                y = torch.add(s[p], s[q], alpha=sq)
                torch.add(y, s[r], alpha=sr, out=tiles[:, a, :, b])
            del s


def _padded_rows(x: torch.Tensor, a: int, b: int, right: int) -> torch.Tensor:
    """Rows a..b-1 of a position-major (h, w, c) map, zero beyond its top and bottom edges,
    with one zero column on the left and ``right`` on the right: one band's share of the
    convolution's zero padding, so the whole map is never copied padded."""
    h = x.shape[0]
    rows = x[max(a, 0) : min(b, h)]
    return F.pad(rows, (0, 0, 1, right, max(-a, 0), max(b - h, 0)))


def use_winograd(root: nn.Module, within: Iterable[nn.Module] | None = None) -> int:
    """Replace eligible convolutions under ``root`` by their `Winograd3x3`, in place (only
    those inside the modules ``within``, when given); returns how many were replaced."""
    keep = None if within is None else {id(m) for part in within for m in part.modules()}
    return _replace(root, keep)


def _replace(module: nn.Module, keep: set[int] | None) -> int:
    replaced = 0
    for name, child in module.named_children():
        if eligible(child) and (keep is None or id(child) in keep):
            setattr(module, name, Winograd3x3(child))
            replaced += 1
        else:
            replaced += _replace(child, keep)
    return replaced


__all__ = [
    "BAND_BYTES",
    "MIN_CHANNELS",
    "Winograd3x3",
    "eligible",
    "transform_weight",
    "use_winograd",
]
