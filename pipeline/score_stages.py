"""The Ray Data stages of the scoring job: read bytes, decode + geometry (pipeline.io_stages,
torch-free), score (here).

Every stage takes and returns a pyarrow table with the listing's columns (``image_id``,
``image_uri``, ``product_line``, ``captured_at``, ``shard``, ``status``, ``error_reason``,
``error``) plus its own. A row that already has ``status == "error"`` passes through every stage
untouched, and a failure of one row (missing object, corrupt file, broken model) turns only that
row into an error row: bad input is data, never a crash of the job.

Reading and decoding are separate stages so that decoding (CPU) never runs in the scoring actors
(which may hold a GPU), and so that rows reach the actors already as their model's inputs (the
image resized to the input size, or its tiles), never as the original file.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from dfr_core.artifact import (
    calibration_of,
    check_extractor,
    load_head,
    read_model_metadata,
)
from dfr_core.artifact_meta import ModelMetadata
from dfr_core.calibrate import Calibration
from dfr_core.config import ModelConfig
from dfr_core.device import pick_device
from dfr_core.features import FeatureExtractor
from dfr_core.inference import (
    ImageOutput,
    extract,
    forward_images,
    prepare_extractor,
    score_images,
    to_model_input,
)
from dfr_core.model import DFRHead, build_extractor
from dfr_core.precision import PrecisionSpec
from pipeline import outputs, registry, storage
from pipeline.io_stages import (  # noqa: F401 - re-exported: the job and tests use them here
    DECODE_COLUMNS,
    READ_COLUMNS,
    DecodeConfig,
    Prepared,
    ReadConfig,
    RowError,
    _set_errors,
    decode_batch,
    prepared_rows,
    read_batch,
)
from pipeline.row_errors import ListingReason, RowStatus
from pipeline.scoring_config import ScoringConfig  # noqa: F401 - re-exported for callers

#: What the scoring stage emits: the score file columns plus the two the driver groups by.
SCORED_SCHEMA = pa.schema(
    list(outputs.SCORE_SCHEMA)
    + [pa.field("product_line", pa.string(), nullable=False), pa.field("shard", pa.int32())]
)


# --------------------------------------------------------------------------------------------
# Stage 3: scoring actors (backbone once per batch, one head per product line)
# --------------------------------------------------------------------------------------------


class LoadedLine(NamedTuple):
    """A product line's head, its calibration and the extractor it runs on."""

    version: str
    head: DFRHead
    calibration: Calibration
    extractor_key: tuple[Any, ...]
    precision: PrecisionSpec  # the calibration's: the backbone and head run at exactly this
    geometry: ModelConfig  # image_size / tile / ...: how its masks go back to the original size


class Scored(NamedTuple):
    """One row's result: the stitched anomaly map (map_hw, fp32, CPU) and what it yields."""

    model: LoadedLine
    anomaly_map: torch.Tensor
    score: float  # the model's image score (dfr_core ImageOutput.score)
    max_score: float  # the raw max of the map (the `score` column)
    defect_area_fraction: float


#: Result columns the scoring stage computes (null for error rows).
RESULT_COLUMNS = (
    "score",
    "threshold",
    "anomaly_score",
    "anomaly_threshold",
    "pixel_threshold",
    "is_anomaly",
    "defect_area_fraction",
    "mask_uri",
    "heatmap_uri",
)

Group = tuple[tuple[Any, ...], PrecisionSpec]


def extractor_key(meta: ModelMetadata, precision: PrecisionSpec) -> tuple[Any, ...]:
    """Models with equal keys share one extractor (and one backbone forward per batch): the
    same backbone, and the same backbone precision (a bf16 one stores bf16 weights)."""
    config = meta.model_config
    backbone = meta.backbone
    return (
        backbone.name,
        tuple(backbone.layers),
        config.input_hw,
        config.pool,
        backbone.weights_sha256,
        precision.backbone_dtype,
    )


def _ray_node_id() -> str | None:
    """The Ray node this process runs on (None outside Ray): recorded per row as ``node_id``."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def image_chunks(rows: list[int], prepared: dict[int, Prepared], tiles: int) -> list[list[int]]:
    """Rows packed, in order, into chunks of at most ``tiles`` model inputs (one backbone pass
    each); an image is never split, so one with more tiles than that (up to its model's
    max_tiles) is a chunk alone, scored in passes (ScoringActor._score_large). This is what
    bounds an actor's memory: one pass's backbone and head work at a time."""
    chunks: list[list[int]] = []
    held = 0
    for i in rows:
        n = prepared[i].plan.n_tiles
        if not chunks or held + n > tiles:
            chunks.append([])
            held = 0
        chunks[-1].append(i)
        held += n
    return chunks


def full_size_map(scored: Scored, height: int, width: int) -> torch.Tensor:
    """The anomaly map at the original image's size, which masks and heatmaps are written at.

    Untiled models (a map at the model's input size): bilinear upsampling, as always. Tiled
    models: the map already is at the (scaled) image's resolution, usually the original itself;
    a scaled one is resized nearest-neighbour, so the mask is exactly the thresholded map's
    pixels (what defect_area_fraction counts) and no interpolated float copy of a large image
    is made beyond the output.
    """
    amap = scored.anomaly_map
    if tuple(amap.shape) == (height, width):
        return amap
    mode = "bilinear" if scored.model.geometry.tile is None else "nearest"
    extra = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(amap[None, None], size=(height, width), mode=mode, **extra)[0, 0]


class _ModelView(NamedTuple):
    """What dfr_core.inference.forward_images needs of a model (its DFRModel protocol): a
    line's head on the actor's shared extractor, at the calibration's precision."""

    head: DFRHead
    extractor: FeatureExtractor
    precision: PrecisionSpec


def _scored(model: LoadedLine, result: ImageOutput) -> Scored:
    """A row's result from its image's output; the defect area is counted on the full map."""
    amap = result.anomaly_map.float()
    above = float((amap > model.calibration.pixel_threshold).float().mean())
    return Scored(model, amap, result.score, result.max_score, above)


class ScoringActor:
    """Callable class run by an ActorPoolStrategy: models load once per actor, not per batch.

    The frozen backbone is shared by every product line trained on it, so the actor builds one
    extractor per distinct (backbone, layers, input size, pool, weights) and one head per line it
    meets, runs the backbone once per chunk of model inputs (tiles) of the rows sharing an
    extractor and each image through its own line's head (dfr_core.inference.score_images):
    one row per image however many tiles it has, images of any size mixed in one batch.
    """

    def __init__(self, config: ScoringConfig) -> None:
        self.config = config
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        self.device = pick_device()
        self.node_id = _ray_node_id()
        self.extractors: dict[tuple[Any, ...], FeatureExtractor] = {}
        self.lines: dict[str, LoadedLine] = {}
        self.failed: dict[str, str] = {}
        self.writer = ThreadPoolExecutor(max_workers=config.write_threads)

    # ---- models --------------------------------------------------------------------------

    def _load(self, line: str) -> LoadedLine:
        cfg = self.config
        version = cfg.models[line]
        directory = registry.fetch(cfg.models_uri, line, version, cfg.cache_dir, cfg.options)
        meta = read_model_metadata(directory)
        calibration = calibration_of(meta, required=True)
        precision = calibration.precision_spec
        precision.check(self.device)  # refuse (model_error rows) rather than mix precisions
        key = extractor_key(meta, precision)
        extractor = self.extractors.get(key)
        if extractor is None:
            weights = registry.resolve_weights(meta.weights_uri, cfg.cache_dir, cfg.options)
            extractor = build_extractor(meta.model_config, weights_path=weights)
            extractor = prepare_extractor(extractor, self.device, precision)
            self.extractors[key] = extractor
        check_extractor(extractor, meta)
        head = load_head(directory, meta).to(self.device).eval()
        return LoadedLine(version, head, calibration, key, precision, meta.model_config)

    def _model(self, line: str) -> LoadedLine | None:
        if line not in self.lines and line not in self.failed:
            try:
                self.lines[line] = self._load(line)
            except Exception as exc:  # a broken model fails its rows, not the whole job
                self.failed[line] = f"{type(exc).__name__}: {exc}"
        return self.lines.get(line)

    # ---- scoring ---------------------------------------------------------------------------

    def _score_large(self, line: str, prepared: Prepared, group: Group) -> Scored:
        """One image with more tiles than a backbone pass holds (a chunk of its own, so one
        line): dfr_core.inference.forward_images runs backbone AND head in passes of tile_batch
        tiles and keeps only the small per-tile error grids until the image is stitched, so the
        head's intermediates stay bounded by the pass, not by the image's tile count."""
        key, precision = group
        model = self.lines[line]
        view = _ModelView(model.head, self.extractors[key], precision)
        (result,) = forward_images(view, [prepared], self.config.tile_batch, precision)
        return _scored(model, result)

    @torch.no_grad()
    def _score_chunk(
        self, rows: list[int], lines: list[str], prepared: dict[int, Prepared], group: Group
    ) -> dict[int, Scored]:
        """Rows sharing an extractor and a precision: one backbone pass over all their tiles,
        then each line's head on its own images' tiles (dfr_core.inference, as calibration)."""
        if len(rows) == 1 and prepared[rows[0]].plan.n_tiles > self.config.tile_batch:
            return {rows[0]: self._score_large(lines[rows[0]], prepared[rows[0]], group)}
        key, precision = group
        extractor = self.extractors[key]
        tiles = np.concatenate([prepared[i].tiles for i in rows])
        maps = extract(extractor, to_model_input(tiles, self.device), precision)
        first, start = {}, 0
        for i in rows:  # each image's first tile in the pass (an image's tiles are consecutive)
            first[i], start = start, start + prepared[i].plan.n_tiles
        by_line: dict[str, list[int]] = {}
        for i in rows:
            by_line.setdefault(lines[i], []).append(i)
        out: dict[int, Scored] = {}
        for line, images in by_line.items():
            model = self.lines[line]
            tile_rows = [
                t for i in images for t in range(first[i], first[i] + prepared[i].plan.n_tiles)
            ]
            subset = None if len(tile_rows) == start else tile_rows
            plans = [prepared[i].plan for i in images]
            results = score_images(model.head, extractor, maps, precision, plans, subset)
            for i, result in zip(images, results, strict=True):
                out[i] = _scored(model, result)
        return out

    def _write_mask(
        self, scored: Scored, width: int, height: int, mask_uri: str, heat_uri: str | None
    ) -> None:
        """Mask (and heatmap) at the original resolution, from the full-resolution map."""
        full = full_size_map(scored, height, width)
        threshold = scored.model.calibration.pixel_threshold
        opts = self.config.options
        # Temp files go to the run's staging prefix, which the committing run deletes, so an
        # actor killed mid-write leaves nothing beside the masks.
        staging = outputs.staging_uri(self.config.output_uri, self.config.run_date)
        storage.write_bytes_atomic(
            mask_uri, outputs.encode_mask_png((full > threshold).cpu().numpy()), opts, staging
        )
        if heat_uri is not None:
            png = outputs.encode_heatmap_png(full.cpu().numpy(), threshold)
            storage.write_bytes_atomic(heat_uri, png, opts, staging)

    def _groups(
        self, lines: list[str], prepared: dict[int, Prepared]
    ) -> tuple[dict[Group, list[int]], dict[int, RowError]]:
        """The ok rows grouped by (extractor, precision); rows of a broken model fail."""
        failures: dict[int, RowError] = {}
        groups: dict[Group, list[int]] = {}
        for i in prepared:
            model = self._model(lines[i])
            if model is None:
                failures[i] = RowError(ListingReason.MODEL_ERROR, self.failed[lines[i]])
            else:
                groups.setdefault((model.extractor_key, model.precision), []).append(i)
        return groups, failures

    def _scored_chunks(
        self, batch: pa.Table, lines: list[str]
    ) -> tuple[Iterator[dict[int, Scored]], dict[int, RowError]]:
        """The batch's ok rows scored chunk by chunk (lazily: one chunk's maps in memory)."""
        prepared = prepared_rows(batch)
        groups, failures = self._groups(lines, prepared)

        def scored() -> Iterator[dict[int, Scored]]:
            for group, rows in groups.items():
                for chunk in image_chunks(rows, prepared, self.config.tile_batch):
                    yield self._score_chunk(chunk, lines, prepared, group)

        return scored(), failures

    def _fill(self, cols: dict[str, list[Any]], i: int, row: Scored) -> bool:
        """Row ``i``'s result columns; True when it gets a mask (per the --masks mode)."""
        cal = row.model.calibration
        anomalous = row.score > cal.image_threshold
        cols["score"][i] = row.max_score
        # format-1 models have no max_threshold: their image score was the max of the map
        cols["threshold"][i] = (
            cal.image_threshold if cal.max_threshold is None else cal.max_threshold
        )
        cols["anomaly_score"][i] = row.score
        cols["anomaly_threshold"][i] = cal.image_threshold
        cols["pixel_threshold"][i] = cal.pixel_threshold
        cols["is_anomaly"][i] = anomalous
        cols["defect_area_fraction"][i] = row.defect_area_fraction
        return self.config.masks == "all" or (self.config.masks == "anomalous" and anomalous)

    def __call__(self, batch: pa.Table) -> pa.Table:
        cfg = self.config
        n = batch.num_rows
        ids = batch.column("image_id").to_pylist()
        lines = batch.column("product_line").to_pylist()
        widths = batch.column("width").to_pylist()
        heights = batch.column("height").to_pylist()
        chunks, failures = self._scored_chunks(batch, lines)
        cols: dict[str, list[Any]] = {name: [None] * n for name in RESULT_COLUMNS}
        arrived = batch.column("status").to_pylist()
        cols["node_id"] = [self.node_id if s == RowStatus.OK else None for s in arrived]
        previous: list[Future] = []
        for scored in chunks:
            writes = []
            for i, row in scored.items():
                if not self._fill(cols, i, row):
                    continue
                mask = outputs.mask_uri(cfg.output_uri, cfg.run_date, lines[i], ids[i])
                heat = None
                if cfg.heatmaps:
                    heat = outputs.heatmap_uri(cfg.output_uri, cfg.run_date, lines[i], ids[i])
                cols["mask_uri"][i], cols["heatmap_uri"][i] = mask, heat
                writes.append(
                    self.writer.submit(self._write_mask, row, widths[i], heights[i], mask, heat)
                )
            # At most two chunks' full-resolution maps are alive: this chunk's writes overlap
            # the next chunk's forward, the previous chunk's must be done first.
            _wait(previous)
            previous = writes
        _wait(previous)

        batch = _set_errors(batch, failures)
        cols["model_version"] = [cfg.models.get(line) for line in lines]
        cols["run_id"] = [cfg.run_id] * n
        cols["scored_at"] = [dt.datetime.now(dt.UTC)] * n
        arrays = [
            pa.array(cols[f.name], f.type) if f.name in cols else batch.column(f.name)
            for f in SCORED_SCHEMA
        ]
        return pa.Table.from_arrays(arrays, schema=SCORED_SCHEMA)


def _wait(writes: list[Future]) -> None:
    """A failed mask write is a storage failure, not bad input: it fails the job, and the rerun
    resumes from the committed shards and writes the mask again."""
    for future in writes:
        future.result()
