"""The precision contract: thresholds are only valid at the precision they were calibrated at.

A calibration records its precision (fp32, or bf16/fp16 together with the kind of device it ran
on). Scoring runs the backbone, the head and everything that defines a score at exactly that
precision, or refuses with `PrecisionError`: scores are never silently computed in a mix of
precisions (e.g. a bf16 CUDA backbone under fp32 CPU thresholds). fp32 is device-independent to
float rounding (TF32 is switched off for it on CUDA), so an fp32 model scores alike on CPU and
GPU nodes of one run; a reduced-precision model runs only on the device kind it was calibrated
on. Models written before this field existed were calibrated in fp32.

A reduced-precision calibration may keep the backbone at fp32 (``backbone``; calibrate's
default): a bf16 backbone's rounding of the features moves the scores beyond the parity
criterion on real data, while a reduced-precision head does not (`benchmarks/precision_parity.py`).
``backbone`` absent (every model written before it existed) means the backbone runs at ``dtype``.

``int8`` is a head precision only, on CPU (`dfr_core.quantized`: the head's matrix products in
int8 with per-position and per-channel scales, the rest of the head in fp32); its backbone runs
at fp32 or bf16, always recorded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import torch


class Precision(StrEnum):
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"
    INT8 = "int8"


_DTYPES = {
    Precision.FP32: torch.float32,
    Precision.BF16: torch.bfloat16,
    Precision.FP16: torch.float16,
    Precision.INT8: torch.int8,  # the head's products (dfr_core.quantized); never a backbone
}

#: What a backbone can run at under an int8 head (convolutions have no int8 path here).
_INT8_BACKBONES = (Precision.FP32, Precision.BF16)


class PrecisionError(RuntimeError):
    """A model cannot be scored at its calibrated precision on this device."""


def device_kind(device: torch.device) -> str:
    """'cpu', or 'cuda:<device name>' (reduced-precision kernels differ between GPU models)."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def _precision(name: str | Precision) -> Precision:
    try:
        return Precision(name)
    except ValueError as exc:
        raise ValueError(
            f"unknown precision {name!r}; use one of {[x.value for x in Precision]}"
        ) from exc


@dataclass(frozen=True)
class PrecisionSpec:
    """What a model's thresholds were calibrated at; ``device_kind`` is None for fp32.

    ``dtype`` is the head's precision; ``backbone`` the backbone's when it differs (fp32 under a
    reduced-precision head), None when it is ``dtype`` too.
    """

    dtype: Precision = Precision.FP32
    device_kind: str | None = None
    backbone: Precision | None = None

    def __post_init__(self) -> None:
        if self.dtype is Precision.INT8:
            if self.backbone not in _INT8_BACKBONES:
                raise ValueError(
                    "an int8 head needs its backbone's precision: fp32 or bf16, not "
                    f"{self.backbone.value if self.backbone else 'none'}"
                )
            return
        if self.backbone is not None and self.backbone not in (Precision.FP32, self.dtype):
            raise ValueError(
                f"backbone precision {self.backbone.value} under a {self.dtype.value} head: "
                f"use fp32 or {self.dtype.value}"
            )
        if self.backbone == self.dtype:  # one spelling per meaning (specs compare equal)
            object.__setattr__(self, "backbone", None)

    @property
    def torch_dtype(self) -> torch.dtype:
        """The head's compute dtype."""
        return _DTYPES[self.dtype]

    @property
    def backbone_dtype(self) -> torch.dtype:
        return _DTYPES[self.backbone or self.dtype]

    @classmethod
    def for_device(
        cls, precision: str | Precision, device: torch.device, backbone: str | None = None
    ) -> PrecisionSpec:
        """The spec a calibration at ``precision`` on ``device`` records (``backbone``: the
        backbone's precision when it is not ``precision``, i.e. fp32)."""
        p = _precision(precision)
        spec = cls(
            p,
            None if p is Precision.FP32 else device_kind(device),
            None if backbone is None else _precision(backbone),
        )
        spec.check(device)
        return spec

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> PrecisionSpec:
        """From model.json's calibration block; absent (older models) means fp32."""
        if not data:
            return cls()
        backbone = data.get("backbone")
        return cls(
            _precision(data.get("dtype", "fp32")),
            data.get("device_kind"),
            None if backbone is None else _precision(backbone),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dtype": self.dtype.value, "device_kind": self.device_kind}
        if self.backbone is not None:
            out["backbone"] = self.backbone.value
        return out

    def check(self, device: torch.device) -> None:
        """Refuse a device on which this precision's scores would not match its thresholds."""
        if self.dtype is Precision.FP32:
            return
        here = device_kind(device)
        if self.device_kind != here:
            raise PrecisionError(
                f"model was calibrated at {self.dtype.value} on {self.device_kind}; this worker "
                f"runs on {here}, where {self.dtype.value} scores would not match its thresholds "
                "(score it on that device kind, or recalibrate it at fp32)"
            )
        if device.type == "cpu" and self.dtype is Precision.FP16:
            raise PrecisionError("fp16 is not supported on CPU; use fp32 or bf16")
        if device.type != "cpu" and self.dtype is Precision.INT8:
            raise PrecisionError(f"int8 runs on CPU only, not on {here}; use bf16 there")
        if device.type == "cuda" and self.dtype is Precision.BF16:
            if not torch.cuda.is_bf16_supported():
                raise PrecisionError(f"{here} does not support bf16")

    def describe(self) -> str:
        text = (
            self.dtype.value
            if self.device_kind is None
            else f"{self.dtype.value}@{self.device_kind}"
        )
        return text if self.backbone is None else f"{text} (backbone {self.backbone.value})"


@contextlib.contextmanager
def exact_fp32(device: torch.device) -> Iterator[None]:
    """On CUDA, switch TF32 off for the duration (TF32 matmuls/convolutions are not fp32)."""
    if device.type != "cuda":
        yield
        return
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
