"""The ``dfr-pipeline`` command line: one module per command group (train, models, demo, score +
nightly, report, evaluate), each parsing flags into one config and calling one function (the
work lives in the modules it calls). What they share (``--address``, ``--s3-endpoint-url``, the
exit codes) is defined once, in :mod:`pipeline.cli.options`; the group is in
:mod:`pipeline.cli.group`.

This package module imports no command: ``python -m pipeline.cli.score`` must stay a small,
torch-free process (the scoring driver), so ``main`` is loaded on first use.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "main":  # the console script's entry point, pipeline.cli:main
        from pipeline.cli.group import main

        return main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
