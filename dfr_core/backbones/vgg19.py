"""vgg19, the paper's backbone: the ReLUs of torchvision's ``features`` (weights from a file the
user gives, or the torch hub cache)."""

from __future__ import annotations

from torch import Tensor, nn

from dfr_core.backbones.spec import (
    BackboneInfo,
    BackboneSpec,
    LayerInfo,
    iter_sequential_features,
    no_package,
)

_VGG19_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
    512, 512, 512, 512, "M", 512, 512, 512, 512, "M",
)  # fmt: skip


def _vgg19_layers() -> tuple[tuple[LayerInfo, ...], dict[str, int]]:
    """Name each ReLU relu<block>_<conv> and record its index in torchvision's `features`."""
    layers: list[LayerInfo] = []
    step_of: dict[str, int] = {}
    idx, block, conv, stride = 0, 1, 1, 1
    for item in _VGG19_CFG:
        if item == "M":
            idx += 1
            block, conv, stride = block + 1, 1, stride * 2
            continue
        name = f"relu{block}_{conv}"
        layers.append(LayerInfo(name, int(item), stride))
        step_of[name] = idx + 1  # conv at idx, its ReLU at idx + 1
        idx += 2
        conv += 1
    return tuple(layers), step_of


class _VGG19Features(nn.Module):
    """torchvision's vgg19 `features` only.

    Built here rather than via torchvision.models.vgg19() to skip the 120M-parameter classifier
    (seconds of init and ~500 MB) that DFR never uses. Module indices, and therefore state-dict
    keys (`features.N.weight`), are identical to torchvision's. ReLUs run in place, as
    torchvision's do: each follows its convolution, whose output nothing else holds, so no
    returned map (always a ReLU's output) is ever modified by a later op, and no map-sized
    copy is made per layer.
    """

    def __init__(self) -> None:
        super().__init__()
        mods: list[nn.Module] = []
        in_ch = 3
        for item in _VGG19_CFG:
            if item == "M":
                mods.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                conv = nn.Conv2d(in_ch, int(item), kernel_size=3, padding=1)
                # torchvision's VGG init, so a random-init backbone matches vgg19(weights=None)
                nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(conv.bias)
                mods += [conv, nn.ReLU(inplace=True)]
                in_ch = int(item)
        self.features = nn.Sequential(*mods)


def _vgg19_drop_classifier(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Accept a full torchvision vgg19 state dict: the classifier is not part of the backbone."""
    return {k: v for k, v in sd.items() if not k.startswith("classifier.")}


_VGG19_LAYERS, _VGG19_STEPS = _vgg19_layers()

SPEC = BackboneSpec(
    info=BackboneInfo(
        name="vgg19",
        layers=_VGG19_LAYERS,
        # DFR paper: the 12 ReLUs of the first four blocks, 3456 channels
        default_layers=tuple(
            layer.name for layer in _VGG19_LAYERS if not layer.name.startswith("relu5")
        ),
        weights_help=(
            "pass --weights PATH/URI to a torchvision vgg19 state dict "
            "(vgg19-dcbb9e9d.pth), or put that file in the torch hub cache "
            "(<torch.hub.get_dir()>/checkpoints/vgg19-dcbb9e9d.pth)"
        ),
    ),
    step_of=_VGG19_STEPS,
    make_model=_VGG19Features,
    iter_steps=iter_sequential_features,
    weights_file="vgg19-dcbb9e9d.pth",
    package_file=no_package,
    adapt_state_dict=_vgg19_drop_classifier,
)
