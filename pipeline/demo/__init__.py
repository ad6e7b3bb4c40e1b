"""The demo and the data it (and the tests and benchmarks) run on: ``run`` (``dfr-pipeline
demo``: generate, train, score, report), ``synthetic`` (procedural product images with drawn
defects in MVTec layout: ``textures`` + ``defects``), ``shifts`` (generated nights with the input
shifts the drift watch must catch). Test and demo data, kept out of the product modules."""

from pipeline.demo.run import DemoConfig, DemoResult, run_demo

__all__ = ["DemoConfig", "DemoResult", "run_demo"]
