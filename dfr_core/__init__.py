"""DFR (Deep Feature Reconstruction) anomaly segmentation: pure torch/numpy.

Tensors in, tensors or NamedTuples out; no Ray, storage or CLI code lives here.
"""

from dfr_core.config import CalibrationConfig, ModelConfig, TrainConfig

__all__ = ["CalibrationConfig", "ModelConfig", "TrainConfig"]
__version__ = "0.1.0"
