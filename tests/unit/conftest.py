"""Fixtures shared by the unit tests of the model registry (registry, bad models, promotion).

* ``models_uri``: a registry root, once on local storage and once on the moto S3 server.
* ``make_artifact(directory, extra=None)``: a real (untrained, calibrated) model directory, as
  the training job publishes it (head.pt + model.json with checksums). torch is imported only
  when it is called, so the torch-free unit tests do not pay for it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(params=["local", "s3"])
def models_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "models")
    return f"{request.getfixturevalue('s3_bucket')}/registry"


def _make_artifact(directory: Path, extra: dict[str, Any] | None = None) -> Path:
    import torch

    from dfr_core.artifact import save_model
    from dfr_core.calibrate import Calibration
    from dfr_core.config import ModelConfig
    from dfr_core.model import DFRHead, DFRModel, build_extractor

    config = ModelConfig(image_size=64)
    extractor = build_extractor(config)
    torch.manual_seed(0)
    head = DFRHead(config, extractor.channels, 8)
    calibration = Calibration(1.5, 2.5, 0.005, 0.01, 3)
    save_model(DFRModel(extractor, head), directory, calibration, extra=extra)
    return directory


@pytest.fixture(scope="session")
def make_artifact() -> Callable[..., Path]:
    return _make_artifact
