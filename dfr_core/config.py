"""Frozen configuration dataclasses: one per stage, saved as JSON beside the weights."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

FEATURE_NORMS = ("channel", "none")
IMAGE_SCORES = ("max", "topk_mean")
SCORE_NORMS = ("quantile", "none")
LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class ModelConfig:
    """What the model is: everything needed to rebuild it for scoring.

    Defaults were chosen by benchmarks/accuracy.py (see BENCHMARKS.md), not by taste.
    """

    backbone: str = "mobilenet_v2"
    layers: tuple[str, ...] = ()  # empty: the backbone's default layers
    image_size: int | tuple[int, int] = 256  # N (square) or (H, W); each a multiple of 32
    pool: int = 4
    pca_variance: float = 0.9
    latent_dim: int | None = None  # None: chosen by PCA on the training features
    feature_norm: str = "channel"  # "channel": standardise each channel by training mean/std
    smoothing_sigma: float = 4.0  # Gaussian sigma in pixels at image_size; 0 disables
    image_score: str = "topk_mean"  # "max": the paper's; "topk_mean": mean of the top fraction
    topk_fraction: float = 0.01  # of the map's pixels, for image_score == "topk_mean"
    score_norm: str = "quantile"  # "quantile": terms scaled by held-out normal images' q90/q99.5
    # weight of the pooled-feature Gaussian term; 0 disables it. 2 (not 1): chosen on
    # magnetic_tile, confirmed on kolektorsdd (BENCHMARKS.md, "Score levers"); a saved model
    # keeps the weight it was trained with
    global_weight: float = 2.0
    # Geometry (issue 12). tile None: the image is resized to image_size (today's behaviour).
    # tile N: the image (resized by tile_scale, aspect kept) is covered by N x N tiles that
    # overlap by tile_overlap pixels; each tile is a model input (image_size == tile).
    tile: int | None = None
    tile_overlap: int = 0
    tile_scale: float = 1.0
    max_tiles: int = 64  # an image needing more tiles is refused (GeometryReason.TOO_MANY_TILES)

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", _normalise_size(self.image_size, self.tile))
        _check_geometry(self)
        if self.feature_norm not in FEATURE_NORMS:
            raise ValueError(
                f"feature_norm must be one of {FEATURE_NORMS}, got {self.feature_norm!r}"
            )
        if self.image_score not in IMAGE_SCORES:
            raise ValueError(f"image_score must be one of {IMAGE_SCORES}, got {self.image_score!r}")
        if self.score_norm not in SCORE_NORMS:
            raise ValueError(f"score_norm must be one of {SCORE_NORMS}, got {self.score_norm!r}")
        if not 0.0 < self.topk_fraction <= 1.0:
            raise ValueError(f"topk_fraction must be in (0, 1], got {self.topk_fraction}")
        if self.global_weight < 0:
            raise ValueError(f"global_weight must be >= 0, got {self.global_weight}")
        if self.global_weight > 0 and self.score_norm == "none":
            raise ValueError(
                "global_weight > 0 needs score_norm='quantile': the local and global terms have "
                "different units and are only added after normalisation"
            )
        if self.smoothing_sigma < 0:
            raise ValueError(f"smoothing_sigma must be >= 0, got {self.smoothing_sigma}")
        if not 0.0 < self.pca_variance <= 1.0:
            raise ValueError(f"pca_variance must be in (0, 1], got {self.pca_variance}")
        if self.latent_dim is not None and self.latent_dim < 1:
            raise ValueError(f"latent_dim must be >= 1, got {self.latent_dim}")
        object.__setattr__(self, "layers", tuple(self.layers))

    @property
    def input_hw(self) -> tuple[int, int]:
        """The model input (H, W): image_size's, which is (tile, tile) for a tiled model."""
        return size_hw(self.image_size)


def size_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    """``N`` or ``(H, W)`` -> (H, W)."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def parse_size(text: str) -> int | tuple[int, int]:
    """``"256"`` -> 256, ``"256x640"`` -> (256, 640) (ValueError naming the text otherwise)."""
    parts = str(text).strip().lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"{text!r} is not a size N or HxW") from None
    if len(values) == 1:
        return values[0]
    if len(values) == 2:
        return (values[0], values[1])
    raise ValueError(f"{text!r} is not a size N or HxW")


def _normalise_size(size: int | tuple[int, int] | list, tile: int | None) -> int | tuple[int, int]:
    """A square (N, N) is stored as N (so square models' model.json stays as before); a tiled
    model's input is its tile: image_size left at the default 256 becomes the tile."""
    if isinstance(size, bool) or not isinstance(size, int | tuple | list):
        raise ValueError(f"image_size must be N or (H, W), got {size!r}")
    if not isinstance(size, int):
        if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in size):
            raise ValueError(f"image_size must be N or (H, W) integers, got {size!r}")
        size = size[0] if size[0] == size[1] else (int(size[0]), int(size[1]))
    if tile is not None and size == 256:
        return tile
    return size


def _check_geometry(cfg: ModelConfig) -> None:
    if cfg.tile is not None and (cfg.tile < 32 or cfg.tile % 32):
        raise ValueError(f"tile must be a multiple of 32 and >= 32, got {cfg.tile}")
    if any(side < 32 or side % 32 for side in cfg.input_hw):
        shown = (
            cfg.image_size
            if isinstance(cfg.image_size, int)
            else "x".join(str(v) for v in cfg.image_size)
        )
        raise ValueError(f"image_size must be a multiple of 32 and >= 32, got {shown}")
    if not 0.0 < cfg.tile_scale <= 16.0:
        raise ValueError(f"tile_scale must be in (0, 16], got {cfg.tile_scale}")
    if cfg.max_tiles < 1:
        raise ValueError(f"max_tiles must be >= 1, got {cfg.max_tiles}")
    if cfg.tile_overlap < 0:
        raise ValueError(f"tile_overlap must be >= 0, got {cfg.tile_overlap}")
    if cfg.tile is None:
        return
    if cfg.image_size != cfg.tile:
        raise ValueError(
            f"a tiled model's input is its tile: image_size must be left at its default or equal "
            f"tile ({cfg.tile}), got {cfg.image_size}"
        )
    if cfg.tile_overlap >= cfg.tile:
        raise ValueError(
            f"tile_overlap must be >= 0 and < tile ({cfg.tile}), got {cfg.tile_overlap}"
        )


#: What the geometry fields meant before they existed (issue 12): one square image_size, no
#: tiling. A model.json without them is filled with exactly these (its meaning, not a default).
LEGACY_GEOMETRY_FIELDS: dict[str, Any] = {
    "tile": None,
    "tile_overlap": 0,
    "tile_scale": 1.0,
    "max_tiles": 64,
}


@dataclass(frozen=True)
class TrainConfig:
    """How the autoencoder is fitted. Defaults chosen by benchmarks/accuracy.py."""

    epochs: int = 30  # with lr 1e-3 + cosine: lower validation loss than 60 epochs at 1e-4
    batch_size: int = 4  # images per step (the reference uses 4)
    positions_per_image: int = 256  # grid positions sampled per image per step (1x1 convs)
    lr: float = 1e-3
    lr_schedule: str = "cosine"  # decay to 1 % of lr over `epochs`; "constant": the reference's
    val_fraction: float = 0.1  # held-out normal images for early stopping (and score scales)
    calib_fraction: float = 0.1  # a disjoint held-out slice for threshold calibration only
    val_positions: int = 512  # grid positions per early-stopping image for the val loss; 0: all
    patience: int = 8  # epochs without validation improvement before stopping; 0 disables
    min_delta: float = 1e-4  # relative improvement that counts
    seed: int = 0
    cache_budget_mb: int = 4096  # memory for cached training features (fp16)
    pca_samples: int = 20000  # feature vectors sampled for the PCA latent width
    feature_batch_size: int = 8  # images per backbone forward while caching features
    tiles_per_image: int = 0  # tiled models: tiles trained on per image; 0: all that fit the cache

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "positions_per_image", "feature_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.tiles_per_image < 0:
            raise ValueError(f"tiles_per_image must be >= 0, got {self.tiles_per_image}")
        if self.val_positions < 0:
            raise ValueError(f"val_positions must be >= 0, got {self.val_positions}")
        for name in ("val_fraction", "calib_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.val_fraction + self.calib_fraction >= 1.0:
            raise ValueError(
                f"val_fraction + calib_fraction must be < 1, got "
                f"{self.val_fraction} + {self.calib_fraction}"
            )
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass(frozen=True)
class CalibrationConfig:
    """Targets for the thresholds calibrated on held-out normal images."""

    pixel_fpr: float = 0.005  # the paper's choice
    image_fpr: float = 0.01

    def __post_init__(self) -> None:
        for name in ("pixel_fpr", "image_fpr"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {value}")


#: What a model.json of format version 1 (written before these fields existed) meant by them:
#: the max of the map, unnormalised, no global term. Never fill a missing field with today's
#: default: that would silently change what an old model's score means.
LEGACY_V1_MODEL_FIELDS: dict[str, Any] = {
    "image_score": "max",
    "topk_fraction": 0.01,
    "score_norm": "none",
    "global_weight": 0.0,
}

#: The paper's exact configuration (Yang, Shi and Qi 2020): VGG19 relu1_1..relu4_4 (3456
#: channels), unstandardised features, image score = max of the unsmoothed map.
_VGG19_PAPER_LAYERS = tuple(
    f"relu{b}_{c}" for b, n in ((1, 2), (2, 2), (3, 4), (4, 4)) for c in range(1, n + 1)
)
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "paper": {
        "backbone": "vgg19",
        "layers": _VGG19_PAPER_LAYERS,
        "feature_norm": "none",
        "smoothing_sigma": 0.0,
        "image_score": "max",
        "score_norm": "none",
        "global_weight": 0.0,
    },
}


def preset_fields(name: str) -> dict[str, Any]:
    """The ModelConfig fields a named preset sets (ValueError naming the known presets)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return dict(PRESETS[name])


def to_dict(config: Any) -> dict[str, Any]:
    """Dataclass -> JSON-ready dict (tuples become lists)."""
    return dataclasses.asdict(config)


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Rebuild a config dataclass, rejecting unknown keys (an artifact from a newer version)."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}: written by a newer version?")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return cls(**values)
