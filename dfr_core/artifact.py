"""Model directories: a JSON config with checksums beside the head's weights.

Only the small per-product head is stored; the frozen backbone is identified by name, layers and
the sha256 of its weights file, and is rebuilt from the registry on load (a mismatch is an error,
so a model is never scored with backbone weights other than those it was trained with).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import platform
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from dfr_core.artifact_meta import (  # noqa: F401 - re-exported: the torch-free part
    CONFIG_FILE,
    FORMAT,
    FORMAT_VERSION,
    HEAD_FILE,
    LIBRARY_VERSION,
    ArtifactError,
    ModelMetadata,
    model_config_of,
    parse_metadata,
    read_metadata,
    read_model_metadata,
    sha256_bytes,
)
from dfr_core.calibrate import Calibration
from dfr_core.config import to_dict
from dfr_core.features import FeatureExtractor
from dfr_core.model import DFRHead, DFRModel, build_extractor


class LoadedModel(NamedTuple):
    model: DFRModel
    calibration: Calibration | None
    metadata: ModelMetadata


def _versions() -> dict[str, str]:
    return {
        "dfr_core": LIBRARY_VERSION,
        "torch": torch.__version__,
        # the installed distribution, not an import of torchvision (backbones.mobilenet_v2: why)
        "torchvision": importlib.metadata.version("torchvision"),
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def save_model(
    model: DFRModel,
    directory: str | os.PathLike,
    calibration: Calibration | None = None,
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write head.pt and model.json (with head.pt's sha256) into directory; returns the JSON."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.head.state_dict().items()}
    torch.save(state, out / HEAD_FILE)
    backbone = model.extractor.backbone
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_config": to_dict(model.config),
        "backbone": {
            "name": backbone.name,
            "layers": [layer.name for layer in backbone.layers],
            "channels": model.extractor.channels,
            "weights_sha256": backbone.weights_sha256,
            "weights_source": backbone.weights_source,
        },
        "latent_dim": model.head.cae.latent_dim,
        "calibration": dataclasses.asdict(calibration) if calibration else None,
        "training": training or {},
        "metrics": metrics or {},
        "extra": extra or {},
        "versions": _versions(),
        "files": {HEAD_FILE: sha256_bytes((out / HEAD_FILE).read_bytes())},
    }
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=float))
    return meta


def load_head(directory: str | os.PathLike, meta: ModelMetadata | None = None) -> DFRHead:
    """Rebuild the per-product head after verifying its checksum (weights_only loading)."""
    meta = meta or read_model_metadata(directory)
    path = Path(directory) / HEAD_FILE
    if not path.is_file():
        raise ArtifactError(f"{path}: missing weights file")
    data = path.read_bytes()
    expected = meta.files.get(HEAD_FILE)
    if sha256_bytes(data) != expected:
        raise ArtifactError(f"{path}: sha256 mismatch (expected {expected}); refusing to load")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle payload or corrupt file: never executed
        raise ArtifactError(f"{path}: not a plain tensor state dict ({exc})") from exc
    if meta.backbone.channels is None:
        raise ArtifactError(f"{path}: model.json records no backbone channels")
    head = DFRHead(meta.model_config, meta.backbone.channels, meta.latent_dim)
    try:
        head.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise ArtifactError(f"{path}: weights do not fit the config ({exc})") from exc
    return head.eval()


def check_extractor(extractor: FeatureExtractor, meta: ModelMetadata) -> None:
    """The extractor must be the one the model was trained with (name, layers, weights)."""
    want = meta.backbone
    got = extractor.backbone
    if got.name != want.name or [x.name for x in got.layers] != list(want.layers):
        raise ArtifactError(
            f"model expects backbone {want.name} {list(want.layers)}, "
            f"got {got.name} {[x.name for x in got.layers]}"
        )
    if want.weights_sha256 != got.weights_sha256:
        raise ArtifactError(
            f"model was trained with {want.name} weights sha256 {want.weights_sha256}, "
            f"but the loaded weights have sha256 {got.weights_sha256} ({got.weights_source})"
        )
    if extractor.input_hw != meta.model_config.input_hw:
        raise ArtifactError("extractor image size differs from the model's")


def calibration_of(meta: ModelMetadata, required: bool = False) -> Calibration | None:
    """The thresholds and the precision they hold at (absent in older models: fp32).

    ``required``: a model without thresholds is an ArtifactError (ModelMetadata's
    require_calibration) instead of None: scoring refuses such a model, with one message.
    """
    if meta.calibration is None and not required:
        return None
    record = meta.require_calibration()  # the one "no calibration" check
    try:
        calibration = Calibration(**record.fields)
        calibration.precision_spec  # noqa: B018 - validate the recorded precision now
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"bad calibration in model.json: {exc}") from exc
    return calibration


def load_model(
    directory: str | os.PathLike,
    weights_path: str | os.PathLike | None = None,
    extractor: FeatureExtractor | None = None,
) -> LoadedModel:
    """Rebuild exactly what save_model wrote; pass `extractor` to share an already-built one.

    A model trained on a random-init backbone (no weights sha256) cannot be rebuilt: a new
    random backbone would give different features, so that is refused unless the very
    extractor it was trained with is passed in.
    """
    meta = read_model_metadata(directory)
    if extractor is None:
        if meta.backbone.weights_sha256 is None:
            raise ArtifactError(
                f"{directory}: trained on a random-init backbone, which cannot be rebuilt; "
                "pass the extractor it was trained with"
            )
        extractor = build_extractor(meta.model_config, weights_path)
    check_extractor(extractor, meta)
    calibration = calibration_of(meta)
    precision = calibration.precision_spec if calibration else None
    model = DFRModel(extractor, load_head(directory, meta), precision).eval()
    return LoadedModel(model, calibration, meta)
