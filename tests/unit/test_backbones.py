"""Backbone registry, weight resolution, declared shapes and the offline ImageNet weights."""

from __future__ import annotations

import hashlib
import logging
import pathlib
import pickle

import pytest
import torch
import torch.nn.functional as F
import torchvision

from dfr_core.backbones import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RANDOM_INIT,
    BackboneInfo,
    FeatureBackbone,
    WeightsNotFoundError,
    backbone_info,
    build_backbone,
    default_weights_path,
    list_backbones,
    sha256_file,
)

BACKBONES = [
    "vgg19",
    "mobilenet_v2",
    "efficientnet_lite0",
    "efficientnet_lite1",
    "efficientnet_lite2",
]
LITES = [("efficientnet_lite0", 224), ("efficientnet_lite1", 240), ("efficientnet_lite2", 260)]
CAT_CLASSES = set(range(281, 286))  # ImageNet tabby .. Egyptian cat
_CACHE: dict[str, FeatureBackbone] = {}


@pytest.fixture
def empty_hub(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    """An empty torch hub cache, so a real cache on this machine cannot satisfy a lookup."""
    hub = tmp_path / "hub"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    return hub


def _all_layers(name: str) -> FeatureBackbone:
    """One backbone per name with every layer selected (shared: building vgg19 is not free)."""
    if name not in _CACHE:
        names = [layer.name for layer in backbone_info(name).layers]
        _CACHE[name] = build_backbone(name, names, allow_random_init=True)
    return _CACHE[name]


def _imagenet_input(size: int) -> torch.Tensor:
    """skimage's chelsea (a tabby cat), resized and ImageNet-normalised: (1, 3, size, size)."""
    skimage_data = pytest.importorskip("skimage.data")
    img = torch.from_numpy(skimage_data.chelsea()).permute(2, 0, 1).float()[None] / 255.0
    img = F.interpolate(img, size=(size, size), mode="bilinear", antialias=True)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (img - mean) / std


# ---------------------------------------------------------------------------- registry


def test_registry_lists_the_backbones() -> None:
    assert list_backbones()[: len(BACKBONES)] == BACKBONES
    for name in BACKBONES:
        info = backbone_info(name)
        assert isinstance(info, BackboneInfo) and info.name == name
        names = [layer.name for layer in info.layers]
        assert len(set(names)) == len(names)
        assert set(info.default_layers) <= set(names)
        assert [layer.stride for layer in info.layers] == sorted(
            layer.stride for layer in info.layers
        )
        assert info.weights_help


def test_default_layers_and_channels() -> None:
    def total(name: str) -> int:
        info = backbone_info(name)
        chans = {layer.name: layer.channels for layer in info.layers}
        return sum(chans[n] for n in info.default_layers)

    vgg = backbone_info("vgg19").default_layers
    assert vgg == tuple(
        f"relu{b}_{c}" for b, n in [(1, 2), (2, 2), (3, 4), (4, 4)] for c in range(1, n + 1)
    )
    assert total("vgg19") == 3456
    assert total("mobilenet_v2") == 232
    assert total("efficientnet_lite0") == 272
    assert total("efficientnet_lite1") == 272  # deeper stages, same widths as lite0
    assert total("efficientnet_lite2") == 296  # width x1.1: 16 + 24 + 48 + 88 + 120


def test_unknown_backbone_lists_known_names() -> None:
    with pytest.raises(ValueError, match="resnet50") as err:
        backbone_info("resnet50")
    assert all(name in str(err.value) for name in BACKBONES)
    with pytest.raises(ValueError, match="vgg19"):
        build_backbone("resnet50", allow_random_init=True)
    with pytest.raises(ValueError):
        default_weights_path("resnet50")


def test_unknown_layer_names_it_and_lists_valid() -> None:
    with pytest.raises(ValueError, match="relu9_9") as err:
        build_backbone("vgg19", ["relu1_1", "relu9_9"], allow_random_init=True)
    assert "relu5_4" in str(err.value) and "relu1_1" in str(err.value)


def test_empty_and_duplicate_layers_rejected() -> None:
    with pytest.raises(ValueError, match="no layers"):
        build_backbone("vgg19", [], allow_random_init=True)
    with pytest.raises(ValueError, match="duplicate.*relu1_1"):
        build_backbone("vgg19", ["relu1_1", "relu2_1", "relu1_1"], allow_random_init=True)


def test_layers_are_sorted_into_forward_order() -> None:
    bb = build_backbone("mobilenet_v2", ["features.6", "features.1", "features.3"])
    assert [layer.name for layer in bb.layers] == ["features.1", "features.3", "features.6"]
    outs = bb(torch.randn(1, 3, 32, 32))
    assert [o.shape[1] for o in outs] == [16, 24, 32]


# ---------------------------------------------------------------------------- weights


def test_vgg19_without_weights_raises(empty_hub: pathlib.Path) -> None:
    assert default_weights_path("vgg19") is None
    with pytest.raises(WeightsNotFoundError, match="vgg19-dcbb9e9d.pth"):
        build_backbone("vgg19")


def test_vgg19_random_init_only_when_allowed(
    empty_hub: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="dfr_core.backbones"):
        bb = build_backbone("vgg19", ["relu1_1"], allow_random_init=True)
    assert "RANDOM INIT" in caplog.text
    assert bb.weights_source == RANDOM_INIT and bb.weights_sha256 is None


def test_hub_cache_is_found(empty_hub: pathlib.Path) -> None:
    target = empty_hub / "checkpoints" / "vgg19-dcbb9e9d.pth"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"")
    assert default_weights_path("vgg19") == target


@pytest.fixture(scope="module")
def vgg19_reference(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[pathlib.Path, torch.nn.Module]:
    """A full torchvision vgg19 state dict on disk (classifier included) and its model."""
    torch.manual_seed(0)
    model = torchvision.models.vgg19(weights=None).eval()
    path = tmp_path_factory.mktemp("vgg") / "vgg19.pth"
    torch.save(model.state_dict(), path)
    return path, model


def test_vgg19_loads_full_torchvision_state_dict(vgg19_reference) -> None:
    path, model = vgg19_reference
    bb = build_backbone("vgg19", ["relu1_1", "relu1_2", "relu3_1"], weights_path=path)
    assert bb.weights_source == str(path)
    assert bb.weights_sha256 == sha256_file(path)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        outs = bb(x)  # all maps held: our in-place ReLUs never modify an earlier map
        # torchvision's own (inplace-ReLU) features give the same maps
        refs = [model.features[:n](x.clone()).clone() for n in (2, 4, 12)]
    for out, ref in zip(outs, refs, strict=True):
        torch.testing.assert_close(out, ref)


def test_checkpoint_wrapped_under_state_dict(vgg19_reference, tmp_path: pathlib.Path) -> None:
    _, model = vgg19_reference
    features = {f"features.{k}": v for k, v in model.features.state_dict().items()}
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": features, "epoch": 3}, wrapped)
    bb = build_backbone("vgg19", ["relu1_1"], weights_path=wrapped)
    assert bb.weights_sha256 == sha256_file(wrapped)


def test_wrong_keys_fail_naming_the_file(tmp_path: pathlib.Path) -> None:
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="bad.pth.*missing"):
        build_backbone("vgg19", weights_path=bad)
    wrong_arch = tmp_path / "mbv2.pth"
    torch.save(torchvision.models.mobilenet_v2().state_dict(), wrong_arch)
    with pytest.raises(ValueError, match="mbv2.pth"):
        build_backbone("vgg19", weights_path=wrong_arch)


def test_wrong_shapes_fail_naming_the_file(tmp_path: pathlib.Path) -> None:
    sd = build_backbone("vgg19", allow_random_init=True).model.state_dict()
    sd["features.0.weight"] = torch.zeros(64, 3, 5, 5)
    bad = tmp_path / "shapes.pth"
    torch.save(sd, bad)
    with pytest.raises(ValueError, match="shapes.pth"):
        build_backbone("vgg19", weights_path=bad)


def test_not_a_checkpoint_fails_naming_the_file(tmp_path: pathlib.Path) -> None:
    bad = tmp_path / "notes.txt"
    bad.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="notes.txt"):
        build_backbone("vgg19", weights_path=bad)


def test_sha256_file_streams_the_whole_file(tmp_path: pathlib.Path) -> None:
    data = bytes(range(256)) * 5000  # > one 1 MiB read chunk
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_missing_weights_path_names_it(tmp_path: pathlib.Path) -> None:
    missing = tmp_path / "nope" / "vgg19.pth"
    with pytest.raises(FileNotFoundError, match="nope"):
        build_backbone("vgg19", weights_path=missing, allow_random_init=True)


def test_offline_packages_provide_weights() -> None:
    for name in ("mobilenet_v2", *(lite for lite, _ in LITES)):
        path = default_weights_path(name)
        assert path is not None and path.is_file()
        bb = build_backbone(name, [backbone_info(name).layers[0].name])
        assert bb.weights_source == str(path)
        assert bb.weights_sha256 is not None and len(bb.weights_sha256) == 64


# ---------------------------------------------------------------------------- shapes, state


@pytest.mark.parametrize("name", BACKBONES)
def test_declared_channels_and_strides_match_forward_at_256(name: str) -> None:
    bb = _all_layers(name)
    assert bb.layers == backbone_info(name).layers
    with torch.no_grad():
        outs = bb(torch.randn(1, 3, 256, 256))
    assert len(outs) == len(bb.layers)
    for layer, out in zip(bb.layers, outs, strict=True):
        assert out.shape[0] == 1
        assert out.shape[1] == layer.channels, layer
        assert out.shape[2] * layer.stride == 256 and out.shape[3] * layer.stride == 256, layer


@pytest.mark.parametrize("name", BACKBONES)
def test_strides_hold_at_64_px_and_output_order(name: str) -> None:
    bb = _all_layers(name)
    with torch.no_grad():
        outs = bb(torch.randn(2, 3, 64, 64))
    got = [(o.shape[1], 64 // o.shape[-1]) for o in outs]
    assert got == [(layer.channels, layer.stride) for layer in bb.layers]


@pytest.mark.parametrize("name", BACKBONES)
def test_frozen_and_always_eval(name: str) -> None:
    bb = _all_layers(name)
    assert not any(p.requires_grad for p in bb.parameters())
    assert not bb.training and not any(m.training for m in bb.modules())
    parent = torch.nn.Sequential(bb)
    parent.train()
    assert bb.train() is bb
    assert not any(m.training for m in bb.modules())
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    bb(x)[0].sum().backward()  # gradients reach the input, never the weights
    assert x.grad is not None
    assert all(p.grad is None for p in bb.parameters())


def test_backbone_is_picklable() -> None:
    bb = build_backbone("efficientnet_lite0", ["blocks.2"])
    clone = pickle.loads(pickle.dumps(bb))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(clone(x)[0], bb(x)[0])


def test_bad_input_shape_rejected() -> None:
    bb = build_backbone("mobilenet_v2", ["features.1"])
    with pytest.raises(ValueError, match="3, H, W"):
        bb(torch.randn(1, 1, 32, 32))


# ---------------------------------------------------------------------------- early stop


@pytest.mark.parametrize(
    ("name", "shallow", "deep_module"),
    [
        ("vgg19", "relu2_1", lambda m: m.features[35]),
        ("mobilenet_v2", "features.3", lambda m: m.features[18]),
        ("efficientnet_lite0", "blocks.2", lambda m: m._conv_head),
    ],
)
def test_stops_after_deepest_requested_layer(name: str, shallow: str, deep_module) -> None:
    bb = build_backbone(name, [shallow], allow_random_init=True)
    calls: list[str] = []
    deep_module(bb.model).register_forward_hook(lambda *args: calls.append("deep"))
    with torch.no_grad():
        bb(torch.randn(1, 3, 64, 64))
    assert calls == []


def test_efficientnet_early_stop_skips_later_blocks() -> None:
    bb = build_backbone("efficientnet_lite0", ["stem", "blocks.4"])
    ran: list[int] = []
    for i, block in enumerate(bb.model._blocks):
        block.register_forward_hook(lambda *args, i=i: ran.append(i))
    with torch.no_grad():
        bb(torch.randn(1, 3, 64, 64))
    assert ran == [0, 1, 2, 3, 4]


# ------------------------------------------------------------------ mobilenet_v2 built here

NO_TORCHVISION = """
import sys
import torch
import pipeline.score_stages
from dfr_core.backbones import build_backbone
with torch.no_grad():
    build_backbone("mobilenet_v2")(torch.zeros(1, 3, 64, 64))
print(sorted(m for m in sys.modules if m.startswith(("torchvision", "torch._dynamo"))))
"""


@pytest.mark.parametrize("seed", [0, 1])
def test_mobilenet_v2_is_torchvisions(seed: int) -> None:
    """Built without torchvision, but the same model: keys, shapes, the random initialisation of
    one seed, and the outputs."""
    from dfr_core.backbones.mobilenet_v2 import SPEC

    torch.manual_seed(seed)
    reference = torchvision.models.mobilenet_v2(weights=None).eval()
    torch.manual_seed(seed)
    ours = SPEC.make_model().eval()
    want, got = reference.state_dict(), ours.state_dict()
    assert list(got) == list(want)
    for key, value in want.items():
        assert torch.equal(got[key], value), key
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(ours(x), reference(x))
        assert torch.equal(ours.features[:7](x), reference.features[:7](x))


def test_scoring_the_default_backbone_imports_no_torchvision(clean_python) -> None:
    """torchvision imports torch._dynamo: 0.8-0.9 s of CPU in each scoring actor's start."""
    out = clean_python("-c", NO_TORCHVISION)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


# ---------------------------------------------------------------------------- real weights


def _top5(logits: torch.Tensor) -> tuple[set[int], int, float]:
    probs = logits.softmax(dim=1)[0]
    top = probs.topk(5)
    return set(top.indices.tolist()), int(top.indices[0]), float(top.values[0])


def test_mobilenet_v2_offline_weights_are_imagenet_trained() -> None:
    path = default_weights_path("mobilenet_v2")
    assert path is not None
    model = torchvision.models.mobilenet_v2(weights=None)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    model.eval()
    x = _imagenet_input(224)
    with torch.no_grad():
        top5, top1, p1 = _top5(model(x))
        # the backbone's feature maps are exactly the classifier's intermediate activations
        bb = build_backbone("mobilenet_v2", ["features.3", "features.13"])
        outs = bb(x)
        torch.testing.assert_close(outs[0], model.features[:4](x))
        torch.testing.assert_close(outs[1], model.features[:14](x))
    assert top5 & CAT_CLASSES, top5
    assert top1 in CAT_CLASSES and p1 > 0.3  # a random net gives ~0.001 to every class


@pytest.mark.parametrize(("name", "size"), LITES)
def test_efficientnet_lite_offline_weights_are_imagenet_trained(name: str, size: int) -> None:
    effnet = pytest.importorskip("efficientnet_lite_pytorch")
    path = default_weights_path(name)
    assert path is not None
    model = effnet.EfficientNet.from_name(name.replace("_", "-"), image_size=None)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    model.eval()
    x = _imagenet_input(size)  # each variant's native resolution
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x_lite = ((x * std + mean) * 255.0 - 127.0) / 128.0  # the TF lite training convention
    with torch.no_grad():
        top5, top1, p1 = _top5(model(x_lite))
        # the backbone takes ImageNet-normalised input and converts it to the lite convention
        bb = build_backbone(name, ["stem", "blocks.2"])
        stem, block2 = bb(x)
        ref = model._swish(model._bn0(model._conv_stem(x_lite)))
        torch.testing.assert_close(stem, ref, rtol=1e-4, atol=1e-4)
        for block in model._blocks[:3]:
            ref = block(ref)
        torch.testing.assert_close(block2, ref, rtol=1e-4, atol=1e-4)
    assert top5 & CAT_CLASSES, top5
    assert top1 in CAT_CLASSES and p1 > 0.3


def test_efficientnet_steps_replay_extract_features() -> None:
    """The step-by-step loop (stopping early, yielding maps) computes what the package's own
    extract_features computes for the last map."""
    pytest.importorskip("efficientnet_lite_pytorch")
    bb = build_backbone("efficientnet_lite0", ["head"], allow_random_init=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        (ours,) = bb(x)
        theirs = bb.model.extract_features(bb.input_norm(x))
    assert torch.equal(ours, theirs)
