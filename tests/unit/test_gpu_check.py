"""benchmarks/gpu_check.py is ready to run: without CUDA it says so and exits 0."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script runs the full check")
def test_gpu_check_exits_zero_without_cuda(clean_python):
    out = clean_python("benchmarks/gpu_check.py", timeout=300)
    assert out.returncode == 0, out.stderr
    assert "no GPU" in out.stdout
