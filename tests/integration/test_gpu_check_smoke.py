"""benchmarks/gpu_check.py runs end to end (``--cpu-smoke``: every step on the CPU, toy sizes).

The script's real run needs a lent GPU, which few sessions get; this keeps the calls it makes
(training, calibration at two precisions, the actor's compute, the Ray Data job) in step with
the code, so that run is not lost to an API that moved. The figures are not checked: only that
every step ran and gave its rows.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(600)

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


def test_every_step_runs_on_the_cpu(ray_session, capsys):
    spec = importlib.util.spec_from_file_location("dfr_gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    assert module.main(["--cpu-smoke"]) == 0

    rows = {(check, case): result for check, case, result in module.ROWS}
    assert len(rows) == len(module.ROWS) == 8, module.ROWS
    assert [c for c, _ in rows].count("parity") == 3
    assert rows[("parity", "fp32 CPU vs fp32 CPU")].startswith("map max rel diff 0.0e+00")
    assert "decisions agree" in rows[("parity", "bf16 CPU vs fp32 CPU")]
    throughput = {case: r for (c, case), r in rows.items() if c == "actor throughput"}
    assert sorted(throughput) == sorted(
        f"{name} {dtype} batch 2"
        for name in ("mobilenet_v2", "paper VGG19-12, d=200")
        for dtype in ("fp32", "bf16")
    )
    assert all(r.endswith("img/s") for r in throughput.values()), throughput
    (job,) = [r for (c, _), r in rows.items() if c == "Ray Data job"]
    assert job.startswith("16/16 ok"), job
    assert "| Ray Data job |" in capsys.readouterr().out  # the final table
