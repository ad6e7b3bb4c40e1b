"""The read and decode stages never import torch (about 1 GB of RSS per Ray worker)."""

from __future__ import annotations

CODE = """
import io, sys
import numpy as np
import pyarrow as pa
from PIL import Image
from pipeline.io_stages import DecodeConfig, ReadConfig, decode_batch, read_batch

path = sys.argv[1]
Image.fromarray(np.full((40, 60, 3), 90, np.uint8)).save(path)
table = pa.table({"image_uri": [path], "product_line": ["p"], "status": ["ok"],
                  "error_reason": pa.nulls(1, pa.string()), "error": pa.nulls(1, pa.string())})
out = decode_batch(read_batch(table, ReadConfig(None, 2, 10**6)), DecodeConfig({"p": 32}, 10**6))
assert out.column("status").to_pylist() == ["ok"], out.to_pylist()
assert len(out.column("pixels")[0].as_py()) == 32 * 32 * 3
print(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
"""


def test_decode_stage_imports_no_torch(tmp_path, clean_python):
    out = clean_python("-c", CODE, str(tmp_path / "a.png"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
