"""`dfr_core.heap.bound_heap`: blocks from its threshold up go back to the kernel when freed.

Each case runs in a fresh interpreter: the setting is process-wide and would slow every later
test's large batches (see the module docstring)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

_SCRIPT = """
import sys
import torch
from dfr_core import heap

def rss_mb():
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) for l in fh if l.startswith("VmRSS:")) / 1024

bound = heap.bound_heap() if sys.argv[1] == "bound" else None
kept = []
for _ in range(4):
    before = rss_mb()
    block = torch.ones(3 << 18)  # 3 MiB, touched
    del block
    kept.append(rss_mb() - before)
print(bound, max(kept[1:]))
"""

pytestmark = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="mallopt's parameters are glibc's own"
)


def _run(mode: str) -> tuple[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, check=True
    )
    bound, kept = out.stdout.split()
    return bound, float(kept)


def test_a_bounded_heap_hands_freed_large_blocks_back():
    bound, kept = _run("bound")
    assert bound == "True"
    assert kept < 1.0  # MB still resident after a 3 MiB block is freed


def test_by_default_glibc_keeps_them_after_the_first():
    """The contrast that makes the test above mean something: glibc's adaptive threshold rises
    to a freed block's size, so later blocks of that size stay in its heap once freed."""
    bound, kept = _run("default")
    assert bound == "None"
    assert kept > 2.5


def test_release_free_heap_reports_a_bool():
    from dfr_core.heap import release_free_heap

    assert isinstance(release_free_heap(), bool)
