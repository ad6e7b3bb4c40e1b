"""The scoring actors' configuration, in a torch-free module.

Why a module of its own: the driver builds this config and the Ray Data graph, and must not
import torch to do so (the CUDA build costs ~1 GB of RSS per process, and the driver's memory is
what must stay bounded at millions of listed images). The actors, which do need torch, live in
pipeline.score_stages and import this.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.storage import StorageOptions


@dataclass(frozen=True)
class ScoringConfig:
    """What every scoring actor needs; the driver resolves it once per run."""

    models_uri: str
    models: dict[str, str]  # product line -> pinned version (resolved once by the driver)
    cache_dir: str
    options: StorageOptions | None
    output_uri: str
    run_date: str
    run_id: str
    masks: str  # one of outputs.MASK_MODES
    heatmaps: bool
    torch_threads: int | None
    write_threads: int
    #: Model inputs (tiles) per backbone pass. Untiled models: one per image, so this is the
    #: job's batch size and a batch is one pass, as before tiling. An image with more tiles
    #: (up to its model's max_tiles) is scored alone in passes of this many.
    tile_batch: int = 32
