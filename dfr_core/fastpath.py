"""The exact fast path from images to the per-position reconstruction-error grid (eval only).

`DFRHead.error_grid(FeatureExtractor(x))` is the reference: pool every layer onto the S/4 grid,
standardise, run the 1x1-conv autoencoder at every grid position, square the error. The same
numbers (up to float rounding) come out of less arithmetic and memory, because:

- the channel standardisation, the first 1x1 convolution and its BatchNorm (eval: an affine map)
  are one linear map, and the regional operator R (bilinear upsample + mean pool) is linear with
  rows summing to 1, so for a layer whose native map is coarser than the grid (VGG19 relu4_x is
  32 x 32 for a 64 x 64 grid) ``W1 . R(f)`` equals ``R(W1 . f)``: the widest matmul runs on 4x
  fewer positions. Layers of one native size share one R;
- every later BatchNorm folds into its convolution;
- positions are processed in chunks, so no full-width (C x S/4 x S/4) decoder output, difference
  or square is ever held for the whole image: activation memory is bounded by the chunk; the
  coarse layers' first-layer products too are made for a chunk's native rows (each row once:
  a chunk reuses the rows it shares with the one before);
- everything is position-major (channels_last, as the backbone's convolutions produce it): maps
  are pooled and stacked without a transposing copy, a chunk is a contiguous range of rows, and
  each regional band multiplies only the native rows its grid rows read (the operator is banded).

(Expanding ``||W x + b - z||^2`` into a Gram term ``x^T W^T W x`` was measured on paper: for the
paper's widths it costs more multiply-adds than the chunked direct form, 12.8 M against 12.1 M per
position, so the direct form is used; chunking gives the memory saving the expansion would.)

Computation can run at fp32 (the default, equal to the reference) or, when a model was calibrated
so, in bf16/fp16 (see dfr_core.precision), or with the head's matrix products in int8
(`dfr_core.quantized`: each position's input quantised on its own scale; the first layer's input
standardised before it is quantised rather than folded into its weights).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from dfr_core.chunks import channel_blocks, chunk_rows, quant_rows, row_parts
from dfr_core.features import FeatureExtractor, apply_regional
from dfr_core.quantized import (
    Int8Rows,
    Int8Weight,
    int8_affine,
    int8_product,
    quantize_rows,
    quantize_weight,
)
from dfr_core.regional_maps import (
    RegionalMaps,
    channel_layout,
    extract_regional,
    pooled_means,
    row_support,
)


class _Linear(NamedTuple):
    weight: torch.Tensor | Int8Weight  # (out, in); Int8Weight in an int8 FoldedHead
    bias: torch.Tensor  # (out, 1) as folded; (out,) in a FoldedHead
    relu: bool


def _fold_cae(cae: nn.Module) -> list[_Linear]:
    """The CAE as a list of affine maps (each 1x1 conv with its eval BatchNorm folded in)."""
    layers: list[list] = []
    for module in list(cae.encoder) + list(cae.decoder):
        if isinstance(module, nn.Conv2d):
            w = module.weight.detach().double().flatten(1)
            b = (
                module.bias.detach().double()
                if module.bias is not None
                else torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
            )
            layers.append([w, b, False])
        elif isinstance(module, nn.BatchNorm2d):
            scale = module.weight.detach().double() / torch.sqrt(
                module.running_var.double() + module.eps
            )
            w, b, _ = layers[-1]
            shift = module.bias.detach().double() - module.running_mean.double() * scale
            layers[-1][0], layers[-1][1] = w * scale[:, None], b * scale + shift
        elif isinstance(module, nn.ReLU):
            layers[-1][2] = True
        else:
            raise TypeError(f"fast path cannot fold CAE module {type(module).__name__}")
    return [_Linear(w, b[:, None], relu) for w, b, relu in layers]


class _Rows(NamedTuple):
    """Native rows ``start .. start + len(rows)`` of a position-major map ``height`` rows high."""

    rows: torch.Tensor  # (k, w, c)
    start: int
    height: int


class FoldedHead:
    """A DFRHead's eval-mode computation rearranged for the fast path (weights folded once).

    Built for one extractor layout, device and compute dtype (torch.int8: int8 products, fp32
    in between); `error_grid` takes the extractor's `RegionalMaps` and returns the (B, Gh, Gw)
    fp32 error grid.
    """

    def __init__(
        self, head: nn.Module, extractor: FeatureExtractor, dtype: torch.dtype = torch.float32
    ) -> None:
        layout = channel_layout(extractor)
        self.layout, self.dtype, self.grid_hw = layout, dtype, extractor.grid_hw
        self.pooling = extractor.pooling
        channels = int(layout.order.numel())
        if head.cae.in_channels != channels:
            raise ValueError(f"head expects {head.cae.in_channels} channels, extractor {channels}")
        device = head.feature_mean.device
        order = layout.order.to(device)
        if head.config.feature_norm == "channel":
            mean = head.feature_mean.detach().double().flatten()[order]
            inv_std = 1.0 / head.feature_std.detach().double().flatten()[order]
        else:
            mean = torch.zeros(channels, dtype=torch.float64, device=device)
            inv_std = torch.ones_like(mean)
        layers = _fold_cae(head.cae)
        first, last = layers[0], layers[-1]
        self.int8 = dtype == torch.int8
        if self.int8:
            self._quantize(layers, order, mean, inv_std, layout)
        else:
            self._cast(layers, order, mean, inv_std, layout, dtype)
        # reconstruction - z = W h + b - (f - m) s = W h + (b + m s) - f s
        self.b_last = (last.bias.flatten() + mean * inv_std).float()
        self.inv_std = inv_std.float()
        self.channels = channels
        self.width = max([channels] + [int(layer.weight.shape[0]) for layer in layers])
        self.first_relu = first.relu

    def _cast(self, layers, order, mean, inv_std, layout, dtype) -> None:
        """fp32/bf16/fp16 weights, the standardisation folded into the first layer."""
        first, last, nf = layers[0], layers[-1], layout.n_fine
        # standardisation folded into the first layer: W1 ((f - m) * s) = (W1 s) f - W1 (m s)
        w1 = first.weight[:, order] * inv_std[None, :]
        b1 = first.bias - w1 @ mean[:, None]
        cast = dict(device=w1.device, dtype=dtype)
        # Weights are kept (out, in) and used transposed: positions are rows (x @ W^T).
        self.w1_fine = w1[:, :nf].to(**cast).contiguous()
        self.w1_coarse = [
            part.to(**cast).contiguous() for part in w1[:, nf:].split(layout.coarse_widths, dim=1)
        ]
        self.b1 = b1.flatten().float()
        self.middle = [
            _Linear(x.weight.to(**cast).contiguous(), x.bias.flatten().to(**cast), x.relu)
            for x in layers[1:-1]
        ]
        self.w_last = last.weight[order].to(**cast).contiguous()

    def _quantize(self, layers, order, mean, inv_std, layout) -> None:
        """int8 weights (dfr_core.quantized). The standardisation is NOT folded into the first
        layer: its input is standardised (``(f - m) s``, one fused pass) before it is quantised
        per position, so every channel gets the same share of the int8 range whatever the
        backbone layer's magnitude."""
        first, last, nf = layers[0], layers[-1], layout.n_fine
        w1 = first.weight[:, order]
        shift, scale = (-mean * inv_std).float(), inv_std.float()
        self.in_fine = (shift[:nf], scale[:nf])
        self.in_coarse = list(
            zip(
                shift[nf:].split(layout.coarse_widths),
                scale[nf:].split(layout.coarse_widths),
                strict=True,
            )
        )
        self.w1_fine = quantize_weight(w1[:, :nf])
        self.w1_coarse = [quantize_weight(p) for p in w1[:, nf:].split(layout.coarse_widths, 1)]
        self.b1 = first.bias.flatten().float()
        self.middle = [
            _Linear(quantize_weight(x.weight), x.bias.flatten().float(), x.relu)
            for x in layers[1:-1]
        ]
        self.w_last = quantize_weight(last.weight[order])

    def _first_fine(self, fine: torch.Tensor) -> torch.Tensor:
        """The first layer on pooled fine rows -> (rows, H1) fp32, its bias added."""
        if self.int8:
            shift, scale = self.in_fine
            # standardised, then quantised in place (no name holds it: freed once quantised)
            return int8_affine(torch.addcmul(shift, fine, scale), self.w1_fine, self.b1, True)
        return _affine_fp32(fine.to(self.dtype), self.w1_fine, self.b1)

    def _first_coarse(self, m: torch.Tensor, index: int) -> torch.Tensor:
        """The first layer's contribution of one coarse map, at its native positions:
        (h, w, c) -> (h, w, H1), in the compute dtype (int8: fp32; no bias)."""
        flat = m.flatten(0, 1)
        if self.int8:
            shift, scale = self.in_coarse[index]
            rows = flat.shape[0]
            out = torch.empty(rows, self.b1.numel(), device=m.device)
            # bounded temporaries: a block's standardised input (quantised in place), its
            # int8 copy and int32 product, QUANT_BYTES of fp32 at most each
            step = quant_rows(max(flat.shape[1], out.shape[1]))
            for r in range(0, rows, step):
                z = quantize_rows(torch.addcmul(shift, flat[r : r + step], scale), True)
                int8_product(z, self.w1_coarse[index], None, out=out[r : r + step])
        else:
            out = flat.to(self.dtype) @ self.w1_coarse[index].T
        return out.view(*m.shape[:2], -1)

    def _support(self, h: int, r0: int, r1: int) -> tuple[int, int]:
        """The native rows of an h-row map that grid rows r0:r1 read."""
        return row_support(h, self.pooling.input_hw[0], self.pooling.pool, r0, r1)

    def _first_rows(
        self, m: torch.Tensor, index: int, r0: int, r1: int, prev: _Rows | None
    ) -> _Rows:
        """The first layer's contribution of coarse map ``m`` (h, w, c) on the native rows grid
        rows r0:r1 read, reusing the rows ``prev`` (the chunk before) already holds: each
        native row is multiplied once per image, yet only a chunk's rows are ever held."""
        k0, k1 = self._support(m.shape[0], r0, r1)
        keep = 0 if prev is None else max(0, prev.start + prev.rows.shape[0] - k0)
        new = self._first_coarse(m[k0 + keep : k1], index)
        if keep:
            new = torch.cat([prev.rows[k0 - prev.start : k0 - prev.start + keep], new])
        return _Rows(new, k0, m.shape[0])

    def _band(
        self, native: torch.Tensor | _Rows, r0: int, r1: int, lo: int, hi: int
    ) -> torch.Tensor:
        """Grid rows r0:r1 of the regional operator applied to channels lo:hi of a
        position-major (h, w, c) map (or the `_Rows` of it these grid rows read): ((r1-r0)*Gw,
        hi-lo) fp32. Only the native rows these grid rows read are converted (a bf16/fp16
        map) and enter the first GEMM."""
        if isinstance(native, _Rows):
            native, start, h = native
        else:
            start, h = 0, native.shape[0]
        w = native.shape[1]
        k0, k1 = self._support(h, r0, r1)
        band = native[k0 - start : k1 - start, :, lo:hi].float().contiguous()  # (k, w, c)
        mh = self.pooling._matrix(h, band, 0)[r0:r1, k0:k1]
        mw = self.pooling._matrix(w, band, 1)
        # as a (1, c, k, w) channels_last map: the pooling's own two GEMMs, no copy either way
        pooled = apply_regional(band.permute(2, 0, 1).unsqueeze(0), mh, mw)
        return pooled.permute(0, 2, 3, 1).reshape(-1, hi - lo)  # (r*Gw, c)

    def _chunk(
        self,
        fine: torch.Tensor,
        coarse: list[torch.Tensor],
        first_coarse: list[_Rows],
        r0: int,
        r1: int,
    ) -> torch.Tensor:
        """Error of grid rows r0:r1 of one image -> ((r1-r0)*G,) fp32.

        ``fine``: (Gh*Gw, C_fine) pooled; ``coarse``: per native size, (h, w, c_n) maps;
        ``first_coarse``: per native size, the first layer's (k, w, H1) contribution at native
        resolution, on the native rows these grid rows read. All position-major; only this
        band's rows are mapped onto the grid.
        """
        g, nf = self.grid_hw[1], self.layout.n_fine
        fine = fine[r0 * g : r1 * g]
        if nf:
            h = self._first_fine(fine)
        else:
            h = self.b1.repeat((r1 - r0) * g, 1)
        for part in first_coarse:
            for lo, hi in channel_blocks(part.rows.shape[-1], h.device):
                h[:, lo:hi].add_(self._band(part, r0, r1, lo, hi))
        if self.first_relu:
            h = h.relu_()
        if not self.int8:
            h = h.to(self.dtype)
        for layer in self.middle:
            if self.int8:
                # quantised in place and released before the product's output is made
                rows = quantize_rows(h, overwrite=True)
                del h
                h = int8_product(rows, layer.weight, layer.bias)
            else:
                h = torch.addmm(layer.bias, h, layer.weight.T)
            if layer.relu:
                h = h.relu_()
        # the last layer one channel group at a time (fine, then coarse blocks), minus that
        # group's standardised target: only one group's difference is ever held
        if self.int8:
            # quantised once for every channel group; int8 GEMMs take scratch in proportion to
            # their width, so the fine channels go in blocks too
            err = torch.zeros(h.shape[0], device=fine.device)
            h = quantize_rows(h, overwrite=True)
            for lo, hi in channel_blocks(nf, fine.device):
                err.add_(self._group_error(h, fine[:, lo:hi], lo, hi))
        else:
            err = self._group_error(h, fine, 0, nf) if nf else torch.zeros_like(h[:, 0]).float()
        start = nf
        for native in coarse:
            for lo, hi in channel_blocks(native.shape[-1], fine.device):
                band = self._band(native, r0, r1, lo, hi)
                err.add_(self._group_error(h, band, start + lo, start + hi))
            start += native.shape[-1]
        return err.div_(self.channels)

    def _group_error(
        self, h: torch.Tensor | Int8Rows, target: torch.Tensor, lo: int, hi: int
    ) -> torch.Tensor:
        """Squared error summed over channels lo:hi: ``||W h + b - target * s||^2`` per row."""
        if isinstance(h, Int8Rows):
            diff = int8_product(h, self.w_last.rows(lo, hi), self.b_last[lo:hi])
        else:
            diff = _affine_fp32(h, self.w_last[lo:hi], self.b_last[lo:hi])
        return diff.addcmul_(target, self.inv_std[lo:hi], value=-1.0).pow_(2).sum(dim=1)

    @torch.no_grad()
    def error_grid(self, maps: RegionalMaps) -> torch.Tensor:
        b, (gh, g) = maps.fine.shape[0], self.grid_hw
        sizes = tuple((m.shape[-2], m.shape[-1]) for m in maps.coarse)
        if sizes != self.layout.coarse_sizes or maps.fine.shape[1] != self.layout.n_fine:
            raise ValueError(f"maps do not match the head's layout: coarse sizes {sizes}")
        parts = row_parts(gh, chunk_rows(self.width, g, maps.fine.device))
        out = torch.empty(b, gh * g, device=maps.fine.device)
        for i in range(b):
            fine = _positions(maps.fine[i]).flatten(0, 1)
            coarse = [_positions(m[i]) for m in maps.coarse]
            # the widest matmul, on the coarse layers' native positions (exact: R is linear),
            # a chunk's native rows at a time (kept in the compute dtype the GEMM returns:
            # converted band by band, in _band)
            first: list[_Rows | None] = [None] * len(coarse)
            for r0, r1 in parts:
                first = [self._first_rows(m, k, r0, r1, first[k]) for k, m in enumerate(coarse)]
                out[i, r0 * g : r1 * g] = self._chunk(fine, coarse, first, r0, r1)
        return out.view(b, gh, g)


def _positions(fmap: torch.Tensor) -> torch.Tensor:
    """(c, h, w) -> position-major (h, w, c): a view of a channels_last map, else one copy."""
    return fmap.permute(1, 2, 0).contiguous()


def _affine_fp32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """fp32 ``x @ weight^T + bias`` for an fp32 ``bias``: at fp32 one GEMM that adds the bias as
    it writes; at bf16/fp16 the product in that dtype, converted, then the bias."""
    if x.dtype == torch.float32:
        return torch.addmm(bias, x, weight.T)
    # convert, then add in place: a promoting ``torch.add`` would hold a converted copy as well
    return (x @ weight.T).float().add_(bias)


def _state_key(head: nn.Module, dtype: torch.dtype) -> tuple:
    tensors = list(head.parameters()) + list(head.buffers())
    return (dtype, tuple((t.data_ptr(), t._version, str(t.device)) for t in tensors))


def folded_head(
    head: nn.Module, extractor: FeatureExtractor, dtype: torch.dtype = torch.float32
) -> FoldedHead:
    """The head's FoldedHead, cached on the head and rebuilt whenever its weights change."""
    key = (id(extractor), _state_key(head, dtype))
    cache = head.__dict__.setdefault("_folded_cache", {})
    if key not in cache:
        cache.clear()
        cache[key] = FoldedHead(head, extractor, dtype)
    return cache[key]


def reference_error_grid(
    extractor: FeatureExtractor, head: nn.Module, x: torch.Tensor
) -> torch.Tensor:
    """Today's computation (pool everything, standardise, CAE, squared error): the oracle."""
    with torch.no_grad():
        return head.error_grid(extractor(x))


def fast_error_grid(extractor: FeatureExtractor, head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """fp32 fast path for one head (tests and benchmarks; scoring uses dfr_core.inference)."""
    return folded_head(head, extractor).error_grid(extract_regional(extractor, x))


__all__ = [
    "FoldedHead",
    "RegionalMaps",
    "extract_regional",
    "fast_error_grid",
    "folded_head",
    "pooled_means",
    "reference_error_grid",
]
