"""The interrupt/resume tests, run repeatedly while two busy processes keep both cores loaded.

    python benchmarks/interrupt_load.py [--repeats 3]

Each repeat is one fresh pytest session of the interrupt/resume tests (so fixtures, Ray start-up
and the moto server are part of what runs under load). Prints how many of N passed per test;
the target is N of N. The tests themselves assert the contracts; this only counts.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = (
    "tests/integration/test_score_job.py::test_prefix_run_interrupted_then_resumed",
    "tests/integration/test_faults.py::test_driver_killed_then_rerun_resumes",
)


def _first_error(output: str) -> str:
    """The first ``E   `` line pytest printed (the failed assertion), if any."""
    return next((ln.strip() for ln in output.splitlines() if ln.startswith("E   ")), "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--burners", type=int, default=2, help="busy processes (cores to load)")
    parser.add_argument(
        "--log-dir", default="/tmp/dfr-interrupt-load", help="each session's full output"
    )
    args = parser.parse_args()
    logs = Path(args.log_dir)
    logs.mkdir(parents=True, exist_ok=True)
    burners = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.burners)
    ]
    passed = {test: 0 for test in TESTS}
    t0 = time.perf_counter()
    try:
        for i in range(args.repeats):
            for test in TESTS:
                run = subprocess.run(
                    [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
                    cwd=REPO,
                    env={**os.environ, "PYTHONPATH": str(REPO)},
                    capture_output=True,
                    text=True,
                )
                ok = run.returncode == 0
                passed[test] += ok
                tail = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
                log = logs / f"{i + 1}-{test.split('::')[1]}.log"
                log.write_text(run.stdout + run.stderr)
                why = "" if ok else f"; {_first_error(run.stdout)}; log {log}"
                verdict = "pass" if ok else "FAIL"
                print(f"repeat {i + 1} {test.split('::')[1]}: {verdict} ({tail}{why})", flush=True)
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    print(f"under {args.burners} busy processes, {time.perf_counter() - t0:.0f} s:")
    for test, n in passed.items():
        print(f"  {test}: {n} of {args.repeats} passed")


if __name__ == "__main__":
    main()
