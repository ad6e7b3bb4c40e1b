"""The Ray Data stages of the scoring job: read bytes, decode+resize (pipeline.io_stages,
torch-free), score (here).

Every stage takes and returns a pyarrow table with the listing's columns (``image_id``,
``image_uri``, ``product_line``, ``captured_at``, ``shard``, ``status``, ``error_reason``,
``error``) plus its own. A row that already has ``status == "error"`` passes through every stage
untouched, and a failure of one row (missing object, corrupt file, broken model) turns only that
row into an error row: bad input is data, never a crash of the job.

Reading and decoding are separate stages so that decoding (CPU) never runs in the scoring actors
(which may hold a GPU), and so that rows reach the actors already resized to their model's input
size, shipping S*S*3 bytes per image instead of the original file.
"""

from __future__ import annotations

import datetime as dt
from concurrent.futures import ThreadPoolExecutor
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
from dfr_core.device import pick_device, prepare_for_device
from dfr_core.features import FeatureExtractor
from dfr_core.inference import extract, head_output, to_model_input
from dfr_core.model import DFRHead, build_extractor
from dfr_core.precision import PrecisionSpec
from pipeline import outputs, registry, storage
from pipeline.io_stages import (  # noqa: F401 - re-exported: the job and tests use them here
    DECODE_COLUMNS,
    READ_COLUMNS,
    DecodeConfig,
    ReadConfig,
    RowError,
    _set_errors,
    decode_batch,
    read_batch,
)
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


class Scored(NamedTuple):
    """One row's result: the anomaly map (S, S, on the actor's device) and what it yields."""

    model: LoadedLine
    anomaly_map: torch.Tensor
    score: float  # the model's image score (dfr_core AnomalyOutput.score)
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


def extractor_key(meta: ModelMetadata) -> tuple[Any, ...]:
    """Models with equal keys share one extractor (and one backbone forward per batch)."""
    config = meta.model_config
    backbone = meta.backbone
    return (
        backbone.name,
        tuple(backbone.layers),
        config.image_size,
        config.pool,
        backbone.weights_sha256,
    )


def _ray_node_id() -> str | None:
    """The Ray node this process runs on (None outside Ray): recorded per row as ``node_id``."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


class ScoringActor:
    """Callable class run by an ActorPoolStrategy: models load once per actor, not per batch.

    The frozen backbone is shared by every product line trained on it, so the actor builds one
    extractor per distinct (backbone, layers, size, pool, weights) and one head per line it
    meets, runs the backbone once per group of rows and each row through its own line's head.
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
        key = extractor_key(meta)
        extractor = self.extractors.get(key)
        if extractor is None:
            weights = registry.resolve_weights(meta.weights_uri, cfg.cache_dir, cfg.options)
            extractor = build_extractor(meta.model_config, weights_path=weights)
            extractor = prepare_for_device(extractor.eval(), self.device)
            self.extractors[key] = extractor
        check_extractor(extractor, meta)
        head = load_head(directory, meta).to(self.device).eval()
        return LoadedLine(version, head, calibration, key, precision)

    def _model(self, line: str) -> LoadedLine | None:
        if line not in self.lines and line not in self.failed:
            try:
                self.lines[line] = self._load(line)
            except Exception as exc:  # a broken model fails its rows, not the whole job
                self.failed[line] = f"{type(exc).__name__}: {exc}"
        return self.lines.get(line)

    # ---- scoring ---------------------------------------------------------------------------

    @torch.no_grad()
    def _score_group(
        self,
        rows: list[int],
        lines: list[str],
        pixels: list[bytes],
        size: int,
        group: tuple[tuple[Any, ...], PrecisionSpec],
    ) -> dict[int, Scored]:
        """Rows sharing an extractor and a precision: one backbone forward for all of them,
        then each line's head on its own rows (dfr_core.inference, as calibration did)."""
        key, precision = group
        extractor = self.extractors[key]
        images = np.stack([np.frombuffer(pixels[i], np.uint8).reshape(size, size, 3) for i in rows])
        maps = extract(extractor, to_model_input(images, self.device), precision)
        by_line: dict[str, list[int]] = {}
        for pos, i in enumerate(rows):
            by_line.setdefault(lines[i], []).append(pos)
        out: dict[int, Scored] = {}
        for line, positions in by_line.items():
            model = self.lines[line]
            subset = None if len(positions) == len(rows) else positions
            result = head_output(model.head, extractor, maps, precision, subset)
            amaps = result.anomaly_map.float()
            scores = result.score.float().cpu().tolist()
            max_scores = result.max_score.float().cpu().tolist()
            above = amaps > model.calibration.pixel_threshold
            fractions = above.float().mean(dim=(1, 2)).cpu().tolist()
            for k, pos in enumerate(positions):
                out[rows[pos]] = Scored(model, amaps[k], scores[k], max_scores[k], fractions[k])
        return out

    def _write_mask(
        self, scored: Scored, width: int, height: int, mask_uri: str, heat_uri: str | None
    ) -> None:
        """Masks at the original resolution: bilinear upsampling of the map, then threshold."""
        full = F.interpolate(
            scored.anomaly_map[None, None],
            size=(height, width),
            mode="bilinear",
            align_corners=False,
        )[0, 0]
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

    def _score_batch(self, batch: pa.Table) -> tuple[dict[int, Scored], dict[int, RowError]]:
        """Score the batch's ok rows, grouped by extractor; rows of a broken model fail."""
        lines = batch.column("product_line").to_pylist()
        status = batch.column("status").to_pylist()
        pixels = batch.column("pixels").to_pylist()
        sizes = batch.column("size").to_pylist()
        failures: dict[int, RowError] = {}
        groups: dict[tuple[tuple[Any, ...], PrecisionSpec], list[int]] = {}
        for i in range(batch.num_rows):
            if status[i] != "ok":
                continue
            model = self._model(lines[i])
            if model is None:
                failures[i] = RowError("model_error", self.failed[lines[i]])
            else:
                groups.setdefault((model.extractor_key, model.precision), []).append(i)
        scored: dict[int, Scored] = {}
        for key, rows in groups.items():
            scored.update(self._score_group(rows, lines, pixels, sizes[rows[0]], key))
        return scored, failures

    def __call__(self, batch: pa.Table) -> pa.Table:
        cfg = self.config
        n = batch.num_rows
        scored, failures = self._score_batch(batch)
        ids = batch.column("image_id").to_pylist()
        lines = batch.column("product_line").to_pylist()
        widths = batch.column("width").to_pylist()
        heights = batch.column("height").to_pylist()
        cols: dict[str, list[Any]] = {name: [None] * n for name in RESULT_COLUMNS}
        arrived = batch.column("status").to_pylist()
        cols["node_id"] = [self.node_id if s == "ok" else None for s in arrived]
        writes = []
        for i, row in scored.items():
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
            if cfg.masks == "all" or (cfg.masks == "anomalous" and anomalous):
                mask = outputs.mask_uri(cfg.output_uri, cfg.run_date, lines[i], ids[i])
                heat = None
                if cfg.heatmaps:
                    heat = outputs.heatmap_uri(cfg.output_uri, cfg.run_date, lines[i], ids[i])
                cols["mask_uri"][i], cols["heatmap_uri"][i] = mask, heat
                writes.append(
                    self.writer.submit(self._write_mask, row, widths[i], heights[i], mask, heat)
                )
        for future in writes:
            # A failed mask write is a storage failure, not bad input: it fails the job, and
            # the rerun resumes from the committed shards and writes the mask again.
            future.result()

        batch = _set_errors(batch, failures)
        cols["model_version"] = [cfg.models.get(line) for line in lines]
        cols["run_id"] = [cfg.run_id] * n
        cols["scored_at"] = [dt.datetime.now(dt.UTC)] * n
        arrays = [
            pa.array(cols[f.name], f.type) if f.name in cols else batch.column(f.name)
            for f in SCORED_SCHEMA
        ]
        return pa.Table.from_arrays(arrays, schema=SCORED_SCHEMA)
