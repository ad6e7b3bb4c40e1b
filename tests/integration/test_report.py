"""The QA report end to end on a hand-built scoring output, local and on the moto S3 server.

Contracts checked: the report counts only committed rows (an uncommitted run's file is
ignored); per-line counts and rates, the top-N gallery order and the error rows are in the
page; a day with zero anomalies and a line with only errors render; data strings are escaped;
nothing in the page points at the network; model versions show training, calibration and
evaluation with curves when stored; the CLI validates its flags; and in headless Chromium every
image and plot of the page loads.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline import storage
from pipeline.cli.report import report
from pipeline.report import REPORT_FILE, ReportConfig, ReportError, write_report

pytestmark = pytest.mark.integration

D1, D2 = "2024-05-01", "2024-05-02"
METAL, WOOD = "metal_plate", "wood_panel"
EVIL = '<script>alert("pwned")</script>'
SIZE = 96
SCORED_AT = dt.datetime(2024, 5, 3, 1, 0, tzinfo=dt.UTC)

#: The score files' explicit schema: the scoring contract's columns (partition columns live in
#: the path), incl. the optional error_reason and heatmap_uri.
SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("image_uri", pa.string(), nullable=False),
        pa.field("score", pa.float64()),
        pa.field("threshold", pa.float64()),
        pa.field("is_anomaly", pa.bool_()),
        pa.field("defect_area_fraction", pa.float64()),
        pa.field("mask_uri", pa.string()),
        pa.field("heatmap_uri", pa.string()),
        pa.field("model_version", pa.string()),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("scored_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error_reason", pa.string()),
        pa.field("error", pa.string()),
    ]
)


# --------------------------------------------------------------------------------------------
# The hand-built outputs tree
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """One score row to build: ``fmt`` None = an error row; ``mask``/``heatmap`` to store."""

    line: str
    date: str
    image_id: str
    score: float | None
    anomaly: bool = False
    fmt: str | None = "PNG"
    mask: bool = False
    heatmap: bool = False
    store_image: bool = True
    error: str | None = None
    version: str | None = "v1"


SPECS = (
    Spec(METAL, D1, "a01", 5.0, True, "PNG", mask=True, heatmap=True),
    Spec(METAL, D1, "a02", 4.0, True, "JPEG", mask=True),
    Spec(METAL, D1, "a03", 1.0, fmt="BMP"),
    Spec(METAL, D1, "a04", 0.5, fmt="TIFF"),
    Spec(METAL, D1, "a05", 0.8, fmt="PNG16"),
    Spec(METAL, D1, "a06", None, fmt=None, error=f"not_an_image: {EVIL}"),
    # D2: a day with zero anomalies, scored by another model version; b03's original is gone
    Spec(METAL, D2, "b01", 1.2, version="v2"),
    Spec(METAL, D2, "b02", 0.9, version="v2"),
    Spec(METAL, D2, "b03", 1.1, version="v2", store_image=False),
    # a line with only errors
    Spec(WOOD, D1, "w01", None, fmt=None, error="no_model: no LATEST model", version=None),
    Spec(WOOD, D1, "w02", None, fmt=None, error="not_found: missing object", version=None),
)
#: Counts the report must show, per line: rows, ok, anomalies, errors, rate.
EXPECTED = {
    METAL: {"rows": "9", "ok": "8", "anomalies": "2", "errors": "1", "anomaly_rate": "25.0%"},
    WOOD: {"rows": "2", "ok": "0", "anomalies": "0", "errors": "2", "anomaly_rate": "—"},
}
EXPECTED_TOP4 = ["a01", "a02", "b01", "b03"]


def _image(seed: int, anomaly: bool) -> np.ndarray:
    """A textured grey plate; anomalous ones carry a dark blob where their mask is."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    base = 120 + 40 * np.sin(xx / 6.0) * np.cos(yy / 9.0) + rng.normal(0, 6, (SIZE, SIZE))
    if anomaly:
        base[_blob()] = 30
    gray = base.clip(0, 255).astype(np.uint8)
    return np.stack([gray, gray, (gray * 0.9).astype(np.uint8)], axis=-1)


def _blob() -> np.ndarray:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    return (yy - 40) ** 2 + (xx - 55) ** 2 < 15**2


def _encode(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "PNG16":  # a 16-bit grayscale camera image
        Image.fromarray(array[..., 0].astype(np.uint16) * 257).save(buf, format="PNG")
    else:
        Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def _png(array: np.ndarray, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


_EXT = {"PNG": "png", "PNG16": "png", "JPEG": "jpg", "BMP": "bmp", "TIFF": "tiff"}


def _row(spec: Spec, root: str, run_id: str, write: Callable[[str, bytes], None]) -> dict:
    """Write the spec's image, mask and heatmap; return its score row."""
    ext = _EXT.get(spec.fmt or "", "png")
    image_uri = f"{root}/archive/{spec.line}/{spec.image_id}.{ext}"
    if spec.fmt is not None and spec.store_image:
        write(image_uri, _encode(_image(sum(spec.image_id.encode()), spec.anomaly), spec.fmt))
    masks = f"{root}/out/masks/run_date={spec.date}/product_line={spec.line}"
    mask_uri = f"{masks}/{spec.image_id}.png" if spec.mask else None
    heatmap_uri = f"{masks}/{spec.image_id}.heatmap.png" if spec.heatmap else None
    if mask_uri:
        write(mask_uri, _png(np.where(_blob(), 255, 0).astype(np.uint8), "L"))
    if heatmap_uri:
        heat = np.zeros((SIZE, SIZE, 3), np.uint8)
        heat[..., 0] = np.where(_blob(), 255, 40)
        heat[..., 1] = np.where(_blob(), 200, 0)
        write(heatmap_uri, _png(heat, "RGB"))
    ok = spec.fmt is not None
    return {
        "image_id": spec.image_id,
        "image_uri": image_uri,
        "score": spec.score,
        "threshold": 2.0 if ok else None,
        "is_anomaly": spec.anomaly if ok else None,
        "defect_area_fraction": float(_blob().mean()) if spec.mask else (0.0 if ok else None),
        "mask_uri": mask_uri,
        "heatmap_uri": heatmap_uri,
        "model_version": spec.version,
        "run_id": run_id,
        "scored_at": SCORED_AT,
        "width": SIZE if ok else None,
        "height": SIZE if ok else None,
        "status": "ok" if ok else "error",
        "error_reason": spec.error.split(":")[0] if spec.error else None,
        "error": spec.error,
    }


def _parquet(rows: list[dict]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), buf)
    return buf.getvalue()


def _score_file(root: str, date: str, line: str, key: str) -> tuple[str, str]:
    rel = f"scores/run_date={date}/product_line={line}/part-00000-{key}.parquet"
    return f"{root}/out/{rel}", rel


def _model_json(line: str, version: str, with_metrics: bool) -> dict:
    grid = np.linspace(0.0, 1.0, 50)
    metrics = {
        "image_auroc": 0.97,
        "pixel_auroc": 0.95,
        "pro": 0.88,
        "f1": 0.61,
        "iou": 0.44,
        "n_images": 17,
        "n_anomalous": 9,
        "curves": {
            "roc": {"fpr": grid.tolist(), "tpr": np.sqrt(grid).tolist()},
            "pro": {"fpr": (grid * 0.3).tolist(), "pro": (grid**0.3).tolist()},
        },
    }
    history = [
        {"epoch": e, "epochs": 5, "train_loss": 1.0 / e, "val_loss": 1.2 / e, "seconds": 0.1}
        for e in range(1, 6)
    ]
    return {
        "format": "dfr-pipeline-model",
        "format_version": 1,
        "model_config": {"backbone": "mobilenet_v2", "image_size": 128},
        "backbone": {"name": "mobilenet_v2", "layers": ["features.1", "features.3"]},
        "latent_dim": 12,
        "calibration": {
            "pixel_threshold": 0.7,
            "image_threshold": 2.0,
            "pixel_fpr": 0.005,
            "image_fpr": 0.01,
            "n_images": 6,
            "method": "quantile",
        },
        "training": {
            "train_images": 24,
            "val_images": 6,
            "epochs_run": 5,
            "best_epoch": 5,
            "best_loss": 0.24,
            "history": history,
        },
        "metrics": metrics if with_metrics else {},
        "extra": {"product_line": line, "version": version, "created_at": "2024-04-30T12:00:00"},
        "files": {},
    }


def build_outputs(root: str, options: storage.StorageOptions | None = None) -> dict[str, str]:
    """Images, masks, score files, two committed runs, one uncommitted run and two model.json
    files under ``root``; returns the URIs a report needs."""

    def write(uri: str, data: bytes) -> None:
        storage.write_bytes_atomic(uri, data, options)

    out = f"{root}/out"
    run_ids = {D1: "run-d1", D2: "run-d2"}
    files: dict[str, dict[str, list[str]]] = {D1: {}, D2: {}}
    for date in (D1, D2):
        for line in (METAL, WOOD):
            specs = [s for s in SPECS if s.date == date and s.line == line]
            if not specs:
                continue
            rows = [_row(s, root, run_ids[date], write) for s in specs]
            uri, rel = _score_file(root, date, line, f"k{date[-1]}")
            write(uri, _parquet(rows))
            files[date][line] = [rel]
    for date, run_id in run_ids.items():
        record = {
            "format": "dfr-pipeline-run",
            "format_version": 1,
            "run_id": run_id,
            "run_key": f"k{date[-1]}",
            "run_date": date,
            "committed_at": f"{date}T23:00:00+00:00",
            "models": {METAL: "v1" if date == D1 else "v2"},
            "counts": {"rows": sum(len(v) for v in files[date].values())},
            "files": files[date],
        }
        write(f"{out}/runs/{run_id}.json", json.dumps(record).encode())
    # An uncommitted run (no run record): its very high score must appear nowhere.
    ghost = _row(Spec(METAL, D2, "ghost", 99.0, True), root, "run-ghost", write)
    write(_score_file(root, D2, METAL, "kghost")[0], _parquet([ghost]))
    models = f"{root}/models"
    for version, with_metrics in (("v1", True), ("v2", False)):
        meta = _model_json(METAL, version, with_metrics)
        write(f"{models}/{METAL}/{version}/model.json", json.dumps(meta).encode())
    return {"out": out, "models": models}


# --------------------------------------------------------------------------------------------
# Reading the page back
# --------------------------------------------------------------------------------------------


class PageParser(HTMLParser):
    """Collects what the checks need: overview cells, gallery order, images and links."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: dict[str, dict[str, str]] = {}
        self.gallery: dict[str, list[str]] = {}
        self.srcs: list[str] = []
        self.hrefs: list[str] = []
        self.body: dict[str, str] = {}
        self._line: str | None = None  # inside an overview <tr data-line>
        self._section: str | None = None
        self._field: str | None = None
        self._in_overview = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "body":
            self.body = a
        elif tag == "table" and "overview" in a.get("class", ""):
            self._in_overview = True
        elif tag == "tr" and self._in_overview and "data-line" in a:
            self._line = a["data-line"]
        elif tag == "td" and self._line and "data-field" in a:
            self._field = a["data-field"]
        elif tag == "section" and "line" in a.get("class", "").split():
            self._section = a["data-line"]
        elif tag == "figure" and "data-rank" in a and self._section:
            self.gallery.setdefault(self._section, []).append(a["data-image-id"])
        elif tag == "img":
            self.srcs.append(a.get("src", ""))
        elif tag in ("a", "link"):
            self.hrefs.append(a.get("href", ""))

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._in_overview = False
        elif tag == "td":
            self._field = None
        elif tag == "tr":
            self._line = None

    def handle_data(self, data: str) -> None:
        if self._line and self._field:
            cell = self.cells.setdefault(self._line, {})
            cell[self._field] = cell.get(self._field, "") + data.strip()


def parse(page: str) -> PageParser:
    parser = PageParser()
    parser.feed(page)
    return parser


def overview(parser: PageParser) -> dict[str, dict[str, str]]:
    keys = ("rows", "ok", "anomalies", "errors", "anomaly_rate")
    return {line: {k: cells[k] for k in keys} for line, cells in parser.cells.items()}


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_tree(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return build_outputs(str(tmp_path_factory.mktemp("report_tree")))


@pytest.fixture(scope="module")
def local_report(local_tree: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = ReportConfig(
        scores_uri=local_tree["out"],
        out_dir=str(tmp_path_factory.mktemp("report_out")),
        models_uri=local_tree["models"],
        top_n=4,
    )
    return write_report(config)


def test_counts_gallery_and_errors(local_report: Path) -> None:
    assert local_report.name == REPORT_FILE
    page = local_report.read_text(encoding="utf-8")
    parser = parse(page)
    assert overview(parser) == EXPECTED
    assert parser.gallery == {METAL: EXPECTED_TOP4}
    assert "ghost" not in page and "run-ghost" not in page  # uncommitted run ignored
    for reason in ("not_an_image", "no_model", "not_found"):
        assert f"<code>{reason}</code>" in page
    assert "run-d1" in page and "run-d2" in page
    assert "original unavailable: not found" in page  # b03's original is gone
    assert "mask overlay (no heatmap stored)" in page  # a02 has a mask but no heatmap
    assert "No scored images: no histogram." in page  # the errors-only line


def test_data_strings_are_escaped(local_report: Path) -> None:
    page = local_report.read_text(encoding="utf-8")
    assert EVIL not in page
    assert "&lt;script&gt;alert(&quot;pwned&quot;)&lt;/script&gt;" in page
    assert page.count("<script>") == 1  # only the report's own image-load counter


def test_no_network_references(local_report: Path) -> None:
    page = local_report.read_text(encoding="utf-8")
    parser = parse(page)
    assert parser.srcs and all(src.startswith("data:image/") for src in parser.srcs)
    assert all(href.startswith("#") for href in parser.hrefs)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "@import" not in page and "url(" not in page
    assert "default-src &#x27;none&#x27;" in page  # the CSP that forbids fetching anything


def test_model_versions_section(local_report: Path) -> None:
    page = local_report.read_text(encoding="utf-8")
    v1 = page.split('data-version="v1"', 1)[1].split("</section>", 1)[0]
    v2 = page.split('data-version="v2"', 1)[1].split("</section>", 1)[0]
    assert 'data-field="metric:image AUROC">0.97<' in v1
    assert 'data-field="metric:PRO (AUPRO)">0.88<' in v1
    assert 'data-field="calibration:image threshold">2<' in v1
    assert 'data-field="training:train images">24<' in v1
    assert v1.count('class="plot"') == 3  # training loss, ROC, PRO
    assert "No labelled test set was given" in v2
    assert v2.count('class="plot"') == 1  # training loss only


def test_missing_model_json_is_a_note(local_tree: dict[str, str], tmp_path: Path) -> None:
    config = ReportConfig(local_tree["out"], str(tmp_path), models_uri=str(tmp_path / "none"))
    page = write_report(config).read_text(encoding="utf-8")
    assert page.count("model.json unavailable: not found") == 2  # v1 and v2


def test_report_from_s3_matches_local(
    s3_bucket: str, s3_server, local_report: Path, tmp_path: Path
) -> None:
    tree = build_outputs(f"{s3_bucket}/prod", s3_server.options)
    config = ReportConfig(
        scores_uri=tree["out"] + "/scores/",  # the scores/ folder is accepted as well
        out_dir=str(tmp_path / "s3report"),
        models_uri=tree["models"],
        top_n=4,
        storage=s3_server.options,
    )
    s3_page = parse(write_report(config).read_text(encoding="utf-8"))
    local_page = parse(local_report.read_text(encoding="utf-8"))
    assert overview(s3_page) == overview(local_page) == EXPECTED
    assert s3_page.gallery == local_page.gallery
    assert len(s3_page.srcs) == len(local_page.srcs)  # same thumbnails and plots


def test_cli_one_day_with_zero_anomalies(local_tree: dict[str, str], tmp_path: Path) -> None:
    result = CliRunner().invoke(
        report,
        ["--scores", local_tree["out"], "--run-date", D2, "--products", f"{METAL},{WOOD}"]
        + ["--out", str(tmp_path)],
    )
    assert result.exit_code == 0, result.output
    path = Path(result.output.strip().splitlines()[-1])
    assert path == tmp_path / REPORT_FILE
    page = path.read_text(encoding="utf-8")
    cells = overview(parse(page))
    assert cells == {
        METAL: {"rows": "3", "ok": "3", "anomalies": "0", "errors": "0", "anomaly_rate": "0.0%"}
    }
    assert "No error rows." in page
    assert "Pass --models-uri" in page


def test_cli_date_range_and_product_filter(local_tree: dict[str, str], tmp_path: Path) -> None:
    args = ["--scores", local_tree["out"], "--from", D1, "--to", D1, "--products", WOOD]
    result = CliRunner().invoke(report, [*args, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    cells = overview(parse((tmp_path / REPORT_FILE).read_text(encoding="utf-8")))
    assert cells == {WOOD: EXPECTED[WOOD]}


def test_empty_scope_still_writes_a_report(local_tree: dict[str, str], tmp_path: Path) -> None:
    path = write_report(ReportConfig(local_tree["out"], str(tmp_path), run_date="2023-01-01"))
    page = path.read_text(encoding="utf-8")
    assert 'id="empty"' in page and 'data-rows="0"' in page


@pytest.mark.parametrize(
    "args",
    [
        ["--run-date", D1, "--from", D1],
        ["--run-date", "yesterday"],
        ["--from", D2, "--to", D1],
    ],
)
def test_cli_rejects_bad_dates(local_tree: dict[str, str], tmp_path: Path, args: list) -> None:
    result = CliRunner().invoke(
        report, ["--scores", local_tree["out"], "--out", str(tmp_path)] + args
    )
    assert result.exit_code == 2
    assert not (tmp_path / REPORT_FILE).exists()


def test_missing_scoring_output_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="no scoring output"):
        write_report(ReportConfig(str(tmp_path / "nothing"), str(tmp_path / "out")))
    result = CliRunner().invoke(
        report, ["--scores", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 2
    assert "no scoring output" in result.output


# --------------------------------------------------------------------------------------------
# Browser
# --------------------------------------------------------------------------------------------

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)


def _chromium() -> str:
    """The browser binary; skip locally without one, but fail in CI (which installs it)."""
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    message = (
        f"no Chromium binary ({', '.join(CHROMIUM_NAMES)}) on PATH; "
        "install the Debian packages 'chromium' and 'chromium-driver' to run the browser test"
    )
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def _run_chromium(binary: str, profile: Path, args: list[str]) -> str:
    cmd = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, f"{cmd} failed ({done.returncode}):\n{done.stderr[-3000:]}"
    return done.stdout


def test_report_renders_in_headless_chromium(local_report: Path, tmp_path: Path) -> None:
    binary = _chromium()
    url = local_report.as_uri()
    dom = _run_chromium(
        binary, tmp_path / "profile-dom", ["--virtual-time-budget=5000", "--dump-dom", url]
    )
    parser = parse(dom)
    expected_images = len(parse(local_report.read_text(encoding="utf-8")).srcs)
    assert parser.body.get("data-images-total") == str(expected_images), parser.body
    assert parser.body.get("data-images-loaded") == str(expected_images), parser.body
    assert parser.body.get("data-images-broken") == "0", parser.body
    assert overview(parser) == EXPECTED
    assert parser.gallery == {METAL: EXPECTED_TOP4}

    shot = tmp_path / "report.png"
    _run_chromium(
        binary,
        tmp_path / "profile-shot",
        ["--virtual-time-budget=5000", "--window-size=1280,2400", f"--screenshot={shot}", url],
    )
    with Image.open(shot) as image:
        assert image.size == (1280, 2400)
        pixels = np.asarray(image.convert("L"))
    assert pixels.std() > 10  # not a blank page
    keep = os.environ.get("DFR_REPORT_SCREENSHOT")
    if keep:  # for looking at the page by eye
        shutil.copy(shot, keep)
