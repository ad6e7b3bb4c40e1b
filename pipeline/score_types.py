"""The scoring job's configuration and its typed results and failures (torch-free).

Kept apart from the job (pipeline.score_job) and its Ray execution (pipeline.score_execute),
which both use them, so that neither imports the other's module for a type.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

from dfr_core.config import ModelConfig
from dfr_core.decode import DEFAULT_MAX_PIXELS
from pipeline import outputs, storage
from pipeline.drift import DriftConfig
from pipeline.storage import StorageOptions

DEFAULT_CACHE_DIR = os.path.join(tempfile.gettempdir(), "dfr-pipeline-cache")


class RunInterrupted(RuntimeError):
    """Raised when ``stop_after_shards`` stops a run on purpose (tests, controlled drains)."""


class ShardCountError(RuntimeError):
    """Ray Data returned a different number of rows for a shard than the listing holds."""


class EmptyInput(RuntimeError):
    """The input lists no image (and ``allow_empty`` is off): an upstream export likely broke."""


@dataclass(frozen=True)
class ScoreJobConfig:
    """Everything one scoring run needs; the CLI and the nightly job build one of these."""

    models_uri: str
    input_uri: str
    output_uri: str
    run_date: str  # YYYY-MM-DD: the partition the run writes
    run_id: str | None = None  # None: derived from the date and the run's content
    products: tuple[str, ...] = ()  # empty: every product line in the input
    batch_size: int = 32
    # Resources: None sizes the figure from the cluster (pipeline.resources.plan_resources).
    min_actors: int | None = None
    max_actors: int | None = None
    cpus_per_actor: float | None = None
    gpus_per_actor: float | None = None
    decode_cpus: float | None = None  # per read/decode task
    read_threads: int = 16  # concurrent object reads per read task (S3 is latency bound)
    torch_threads: int | None = None  # intra-op threads per actor
    masks: str = "anomalous"  # which ok rows get a mask: anomalous | all | none
    heatmaps: bool = False  # also write a colour heatmap beside each mask
    shard_size: int = 1000  # rows per committed output file
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = 256 * 2**20
    max_error_fraction: float = 0.1  # above this the run is committed but reported as failed
    cache_dir: str = DEFAULT_CACHE_DIR  # local model/weights cache (driver and actors)
    address: str | None = None  # Ray cluster (pipeline.ray_runtime); None: a private local one
    quiet: bool = False
    storage: StorageOptions | None = None  # None: from the environment
    #: An input that lists no image commits an empty run instead of failing (nightly configs
    #: of lines that may have no images some days).
    allow_empty: bool = False
    #: Test/ops knob: stop (RunInterrupted) after committing this many shards.
    stop_after_shards: int | None = None
    drift_level: float = 0.001  # significance level of the drift tests (pipeline.drift)
    drift_min_images: int = 20  # fewer ok rows in a line: never drifted

    @property
    def drift(self) -> DriftConfig:
        return DriftConfig(level=self.drift_level, min_images=self.drift_min_images)

    def __post_init__(self) -> None:
        outputs.check_run_date(self.run_date)
        if self.run_id is not None:
            storage.safe_component(self.run_id, "run id")
        object.__setattr__(self, "products", tuple(self.products))
        for line in self.products:
            storage.safe_component(line, "product line")
        if self.masks not in outputs.MASK_MODES:
            raise ValueError(f"masks must be one of {outputs.MASK_MODES}, got {self.masks!r}")
        for name in ("batch_size", "read_threads", "shard_size", "max_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("min_actors", "max_actors", "torch_threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if (
            self.min_actors is not None
            and self.max_actors is not None
            and self.max_actors < self.min_actors
        ):
            raise ValueError(f"max_actors {self.max_actors} < min_actors {self.min_actors}")
        for name in ("cpus_per_actor", "gpus_per_actor"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.decode_cpus is not None and self.decode_cpus <= 0:
            raise ValueError(f"decode_cpus must be > 0, got {self.decode_cpus}")
        if not 0.0 <= self.max_error_fraction <= 1.0:
            raise ValueError(f"max_error_fraction must be in [0, 1], got {self.max_error_fraction}")
        if self.stop_after_shards is not None and self.stop_after_shards < 1:
            raise ValueError("stop_after_shards must be >= 1")
        self.drift  # noqa: B018  (validates the drift settings)


@dataclass(frozen=True)
class LineModel:
    """A product line's pinned model, or why its images cannot be scored."""

    product_line: str
    version: str | None
    geometry: ModelConfig | None  # its model_config: the decode stage's image_size / tile ...
    error_reason: str | None = None
    error: str | None = None
