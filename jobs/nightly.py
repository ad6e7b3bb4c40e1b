"""The nightly scoring run: ``python -m jobs.nightly --config jobs/nightly.yaml``, the same
command as ``dfr-pipeline nightly`` (the config format: pipeline/nightly_config.py)."""

from pipeline.cli.score import nightly

if __name__ == "__main__":
    nightly(prog_name="python -m jobs.nightly")
