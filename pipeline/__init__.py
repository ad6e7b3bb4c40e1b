"""DFR anomaly-segmentation batch pipeline."""

from pipeline.driver_exec import reexec_scoring

# `dfr-pipeline score|nightly` run as a torch-free driver: re-exec before the CLI group's
# imports load torch (pipeline.driver_exec; a no-op in every other process).
reexec_scoring()
