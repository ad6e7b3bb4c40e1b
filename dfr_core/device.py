"""Device choice and the mixed-precision context: CUDA when present, CPU otherwise."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def pick_device(requested: str | None = None) -> torch.device:
    """'cuda', 'cpu', or None for CUDA when available (a Ray task that got no GPU sees none)."""
    if requested:
        dev = torch.device(requested)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {requested!r} requested but CUDA is not available")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def inference_mode(device: torch.device) -> Iterator[None]:
    """no_grad + autocast (bf16 where supported, else fp16) on CUDA; plain no_grad on CPU.

    Only the frozen backbone benefits; heads cast their input back to fp32 so that raw scores
    and thresholds stay comparable across devices.
    """
    with torch.no_grad():
        if device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            with torch.autocast("cuda", dtype=dtype):
                yield
        else:
            yield


def prepare_for_device(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move a module to the device, channels_last: cuDNN and oneDNN (CPU) convolutions both run
    faster in it (measured in BENCHMARKS.md), and the values are the same to float rounding."""
    return module.to(device).to(memory_format=torch.channels_last)
