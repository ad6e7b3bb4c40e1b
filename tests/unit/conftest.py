"""Fixtures shared by unit tests: the model registry's (registry, bad models, promotion), and a
fresh interpreter for the tests that check what a module imports.

* ``models_uri``: a registry root, once on local storage and once on the moto S3 server.
* ``make_artifact(directory, extra=None)``: a real (untrained, calibrated) model directory, as
  the training job publishes it (head.pt + model.json with checksums). torch is imported only
  when it is called, so the torch-free unit tests do not pay for it.
* ``clean_python(*argv, timeout=120)``: runs ``python *argv`` in a fresh interpreter with only
  this checkout on its path (what a Ray worker of the checkout imports, no test's imports).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


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


def _clean_python(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout
    )


@pytest.fixture(scope="session")
def clean_python() -> Callable[..., subprocess.CompletedProcess[str]]:
    return _clean_python
