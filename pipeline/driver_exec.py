"""``dfr-pipeline score`` and ``nightly`` run as a torch-free process (the scoring driver).

The driver holds the listing and the run's bookkeeping and must stay small at millions of
images; torch (~1 GB of RSS with the CUDA build, and tens of seconds to import on a busy node)
is only needed by the scoring actors. The ``dfr-pipeline`` group imports every command's
module, torch among them, so before it does (``pipeline/__init__.py``, which runs first)
:func:`reexec_scoring` replaces the process with ``python -P -m pipeline.cli.score`` and the
same arguments: same pid (a supervisor's or a test's kill still reaches the driver), same
environment, no torch. This module imports nothing heavy: the check costs other commands
nothing.
"""

from __future__ import annotations

import os
import sys

#: Set to "0" (the re-exec sets it, so it happens once) to keep the current process.
ENV = "DFR_PIPELINE_TORCH_FREE_REEXEC"
SCORING_COMMANDS = ("score", "nightly")


def reexec_scoring() -> None:
    """Re-execute as the torch-free scoring entry point when this is ``dfr-pipeline score`` or
    ``dfr-pipeline nightly``; otherwise (other commands, tests and notebooks calling the
    commands in process) do nothing."""
    if os.environ.get(ENV) == "0" or os.path.basename(sys.argv[0]) != "dfr-pipeline":
        return
    if len(sys.argv) < 2 or sys.argv[1] not in SCORING_COMMANDS:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    argv = [sys.executable, "-P", "-m", "pipeline.cli.score", *sys.argv[1:]]
    os.execve(sys.executable, argv, {**os.environ, ENV: "0"})
