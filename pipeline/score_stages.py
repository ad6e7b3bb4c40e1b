"""The three Ray Data stages of the scoring job: read bytes, decode+resize, score.

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
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from dfr_core.artifact import (
    calibration_of,
    check_extractor,
    load_head,
    model_config_of,
    read_metadata,
)
from dfr_core.calibrate import Calibration
from dfr_core.device import inference_mode, pick_device, prepare_for_device
from dfr_core.features import FeatureExtractor
from dfr_core.model import DFRHead, build_extractor
from dfr_core.preprocess import normalize_batch, resize_image
from pipeline import outputs, registry, storage
from pipeline.imageio import DecodeError, decode_image
from pipeline.input_stats import STAT_NAMES, image_stats
from pipeline.storage import StorageOptions

#: Columns added by the stages, in order of appearance.
READ_COLUMNS = pa.schema([pa.field("data", pa.large_binary())])
DECODE_COLUMNS = pa.schema(
    [
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("pixels", pa.large_binary()),  # resized (S, S, 3) uint8, C order
        pa.field("size", pa.int32()),
        *(pa.field(name, pa.float64()) for name in STAT_NAMES),
    ]
)
#: What the scoring stage emits: the score file columns plus the two the driver groups by.
SCORED_SCHEMA = pa.schema(
    list(outputs.SCORE_SCHEMA)
    + [pa.field("product_line", pa.string(), nullable=False), pa.field("shard", pa.int32())]
)


class RowError(NamedTuple):
    reason: str
    message: str


def _set_errors(batch: pa.Table, failures: dict[int, RowError]) -> pa.Table:
    """Mark rows ``i`` in ``failures`` as errors (status/error_reason/error columns)."""
    if not failures:
        return batch
    status = batch.column("status").to_pylist()
    reasons = batch.column("error_reason").to_pylist()
    errors = batch.column("error").to_pylist()
    for i, failure in failures.items():
        status[i], reasons[i] = "error", failure.reason
        errors[i] = f"{failure.reason}: {storage.redact(failure.message)}"
    for name, values in (("status", status), ("error_reason", reasons), ("error", errors)):
        batch = batch.set_column(
            batch.schema.get_field_index(name), name, pa.array(values, pa.string())
        )
    return batch


# --------------------------------------------------------------------------------------------
# Stage 1: read bytes (I/O bound: threads)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReadConfig:
    options: StorageOptions | None
    threads: int
    max_bytes: int


def _read_capped(stream: Any, cap: int) -> bytes:
    """Read to EOF, but never more than ``cap`` bytes (a short read is not EOF on every fs)."""
    chunks, total = [], 0
    while total < cap:
        chunk = stream.read(min(cap - total, 1 << 24))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def _read_one(uri: str, config: ReadConfig) -> bytes | RowError:
    """One object's bytes, capped at max_bytes + 1 so a huge file is refused without a full read.

    pyarrow's filesystems (C++, GIL released) and a plain input stream: one GET per S3 object,
    where an fsspec open would add a HEAD.
    """
    try:
        fs, path = storage.pyarrow_fs(uri, config.options)
    except ValueError as exc:
        return RowError("bad_uri", str(exc))
    try:
        with fs.open_input_stream(path) as stream:
            data = _read_capped(stream, config.max_bytes + 1)
    except FileNotFoundError as exc:
        return RowError("not_found", str(exc) or uri)
    except PermissionError as exc:
        return RowError("access_denied", str(exc) or uri)
    except Exception as exc:  # any storage failure of this one object is this row's error
        text = f"{type(exc).__name__}: {exc}"
        denied = "ACCESS_DENIED" in text or "AccessDenied" in text
        return RowError("access_denied" if denied else "read_error", text)
    if len(data) > config.max_bytes:
        return RowError("file_too_large", f"larger than the {config.max_bytes} byte cap")
    return data


def read_batch(batch: pa.Table, config: ReadConfig) -> pa.Table:
    """Add ``data`` (the object's bytes, no decoding); read failures become error rows."""
    uris = batch.column("image_uri").to_pylist()
    status = batch.column("status").to_pylist()
    todo = [i for i, s in enumerate(status) if s == "ok"]
    data: list[bytes | None] = [None] * batch.num_rows
    failures: dict[int, RowError] = {}
    with ThreadPoolExecutor(max_workers=max(1, min(config.threads, len(todo)))) as pool:
        results = pool.map(lambda i: _read_one(uris[i], config), todo)
        for i, result in zip(todo, results, strict=True):
            if isinstance(result, RowError):
                failures[i] = result
            else:
                data[i] = result
    batch = _set_errors(batch, failures)
    return batch.append_column(READ_COLUMNS.field("data"), pa.array(data, pa.large_binary()))


# --------------------------------------------------------------------------------------------
# Stage 2: decode + RGB + resize (CPU)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodeConfig:
    image_sizes: dict[str, int]  # product line -> its model's input size
    max_pixels: int


def decode_batch(batch: pa.Table, config: DecodeConfig) -> pa.Table:
    """Replace ``data`` by the original size and the resized RGB pixels of each image."""
    data = batch.column("data").to_pylist()
    lines = batch.column("product_line").to_pylist()
    status = batch.column("status").to_pylist()
    n = batch.num_rows
    widths: list[int | None] = [None] * n
    heights: list[int | None] = [None] * n
    pixels: list[bytes | None] = [None] * n
    sizes: list[int | None] = [None] * n
    stats: list[tuple[float, ...] | None] = [None] * n
    failures: dict[int, RowError] = {}
    for i in range(n):
        if status[i] != "ok":
            continue
        try:
            array = decode_image(data[i], config.max_pixels)
            size = config.image_sizes[lines[i]]
            resized = resize_image(array, size)
        except DecodeError as exc:
            failures[i] = RowError(exc.reason, exc.message)
            continue
        except ValueError as exc:  # decoded, but not an image layout the model can take
            failures[i] = RowError("unsupported_format", str(exc))
            continue
        heights[i], widths[i] = int(array.shape[0]), int(array.shape[1])
        pixels[i], sizes[i] = resized.tobytes(), size
        stats[i] = image_stats(resized)
    batch = _set_errors(batch.drop_columns(["data"]), failures)
    columns = {"width": widths, "height": heights, "pixels": pixels, "size": sizes}
    for k, name in enumerate(STAT_NAMES):
        columns[name] = [None if s is None else s[k] for s in stats]
    for field in DECODE_COLUMNS:
        batch = batch.append_column(field, pa.array(columns[field.name], field.type))
    return batch


# --------------------------------------------------------------------------------------------
# Stage 3: scoring actors (backbone once per batch, one head per product line)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoringConfig:
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


class LoadedLine(NamedTuple):
    """A product line's head, its calibration and the extractor it runs on."""

    version: str
    head: DFRHead
    calibration: Calibration
    extractor_key: tuple[Any, ...]


class Scored(NamedTuple):
    """One row's result: the anomaly map (S, S, on the actor's device) and what it yields."""

    model: LoadedLine
    anomaly_map: torch.Tensor
    score: float
    defect_area_fraction: float


#: Result columns the scoring stage computes (null for error rows).
RESULT_COLUMNS = (
    "score",
    "threshold",
    "pixel_threshold",
    "is_anomaly",
    "defect_area_fraction",
    "mask_uri",
    "heatmap_uri",
)


def extractor_key(meta: dict[str, Any]) -> tuple[Any, ...]:
    """Models with equal keys share one extractor (and one backbone forward per batch)."""
    config = model_config_of(meta)
    backbone = meta["backbone"]
    return (
        backbone["name"],
        tuple(backbone["layers"]),
        config.image_size,
        config.pool,
        backbone.get("weights_sha256"),
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
        meta = read_metadata(directory)
        calibration = calibration_of(meta)
        if calibration is None:
            raise ValueError(f"model {line}/{version} has no calibration (no thresholds)")
        key = extractor_key(meta)
        extractor = self.extractors.get(key)
        if extractor is None:
            weights = registry.resolve_weights(meta, cfg.cache_dir, cfg.options)
            extractor = build_extractor(model_config_of(meta), weights_path=weights)
            extractor = prepare_for_device(extractor.eval(), self.device)
            self.extractors[key] = extractor
        check_extractor(extractor, meta)
        head = load_head(directory, meta).to(self.device).eval()
        return LoadedLine(version, head, calibration, key)

    def _model(self, line: str) -> LoadedLine | None:
        if line not in self.lines and line not in self.failed:
            try:
                self.lines[line] = self._load(line)
            except Exception as exc:  # a broken model fails its rows, not the whole job
                self.failed[line] = f"{type(exc).__name__}: {exc}"
        return self.lines.get(line)

    # ---- scoring ---------------------------------------------------------------------------

    def _to_device(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(images)
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        x = normalize_batch(x)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    @torch.no_grad()
    def _score_group(
        self, rows: list[int], lines: list[str], pixels: list[bytes], size: int, key: tuple
    ) -> dict[int, Scored]:
        """Rows sharing an extractor: one backbone forward for all of them, then each line's
        head on its own rows."""
        images = np.stack([np.frombuffer(pixels[i], np.uint8).reshape(size, size, 3) for i in rows])
        with inference_mode(self.device):
            feats = self.extractors[key](self._to_device(images))
        feats = feats.float()  # heads run in fp32 so scores match the calibration's
        by_line: dict[str, list[int]] = {}
        for pos, i in enumerate(rows):
            by_line.setdefault(lines[i], []).append(pos)
        out: dict[int, Scored] = {}
        for line, positions in by_line.items():
            model = self.lines[line]
            result = model.head(feats[positions])
            amaps = result.anomaly_map.float()
            scores = result.score.float().cpu().tolist()
            above = amaps > model.calibration.pixel_threshold
            fractions = above.float().mean(dim=(1, 2)).cpu().tolist()
            for k, pos in enumerate(positions):
                out[rows[pos]] = Scored(model, amaps[k], scores[k], fractions[k])
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
        storage.write_bytes_atomic(
            mask_uri, outputs.encode_mask_png((full > threshold).cpu().numpy()), opts
        )
        if heat_uri is not None:
            png = outputs.encode_heatmap_png(full.cpu().numpy(), threshold)
            storage.write_bytes_atomic(heat_uri, png, opts)

    def _score_batch(self, batch: pa.Table) -> tuple[dict[int, Scored], dict[int, RowError]]:
        """Score the batch's ok rows, grouped by extractor; rows of a broken model fail."""
        lines = batch.column("product_line").to_pylist()
        status = batch.column("status").to_pylist()
        pixels = batch.column("pixels").to_pylist()
        sizes = batch.column("size").to_pylist()
        failures: dict[int, RowError] = {}
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i in range(batch.num_rows):
            if status[i] != "ok":
                continue
            model = self._model(lines[i])
            if model is None:
                failures[i] = RowError("model_error", self.failed[lines[i]])
            else:
                groups.setdefault(model.extractor_key, []).append(i)
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
            cols["score"][i] = row.score
            cols["threshold"][i] = cal.image_threshold
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
