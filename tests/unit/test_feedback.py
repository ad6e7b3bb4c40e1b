"""The QA feedback table is validated like the manifest: every problem, with line and column."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.feedback import DEFECT, NORMAL, FeedbackError, load_feedback

HEADER = "image_uri,product_line,label,mask_uri,reviewer,reviewed_at\n"


@pytest.fixture
def images(tmp_path: Path) -> Path:
    for name in ("a.png", "b.png", "m.png"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / name)
    return tmp_path


def _write(directory: Path, body: str) -> str:
    path = directory / "feedback.csv"
    path.write_text(HEADER + body)
    return str(path)


def test_a_good_table_parses_with_relative_paths(images: Path) -> None:
    uri = _write(
        images, "a.png,metal,normal,,ann,2024-05-02T10:00:00\nb.png,metal,Defect,m.png,bob,\n"
    )
    fb = load_feedback(uri, {"metal"})
    assert [r.label for r in fb.rows] == [NORMAL, DEFECT]
    assert fb.rows[0].image_uri == str(images / "a.png") and fb.rows[0].line == 2
    assert fb.rows[1].mask_uri == str(images / "m.png") and len(fb.sha256) == 64
    assert fb.for_line("metal") == fb.rows and fb.for_line("other") == ()


def test_every_bad_row_is_named(images: Path) -> None:
    uri = _write(
        images,
        "missing.png,metal,normal,,,\n"  # line 2: image does not exist
        "a.png,metal,maybe,,,\n"  # line 3: bad label
        "b.png,nomodel,normal,,,\n"  # line 4: line without a model
        "a.png,metal,normal,,,yesterday\n",  # line 5: bad time
    )
    with pytest.raises(FeedbackError) as info:
        load_feedback(uri, {"metal"})
    text = str(info.value)
    assert "nothing was trained or promoted" in text
    report = info.value.describe("no report was written")  # what `report --feedback` prints
    assert report.startswith(f"feedback {uri}: 4 problems, no report was written:\n")
    assert "trained" not in report and report.splitlines()[1:] == text.splitlines()[1:]
    assert "line 2, column 'image_uri': not found:" in text and "missing.png" in text
    assert "line 3, column 'label': 'maybe' is neither 'normal' nor 'defect'" in text
    assert "line 4, column 'product_line': product line 'nomodel' has no model" in text
    assert "line 5, column 'reviewed_at'" in text
    assert len(info.value.problems) == 4


def test_header_problems_and_contradictions(images: Path) -> None:
    path = images / "f.csv"
    path.write_text("image_uri,label,colour\na.png,normal,red\n")
    with pytest.raises(FeedbackError, match="column 'product_line': required column") as info:
        load_feedback(str(path), {"metal"})
    assert "column 'colour': unknown column" in str(info.value)
    uri = _write(images, "a.png,metal,normal,,,\na.png,metal,defect,,,\n")
    with pytest.raises(FeedbackError, match="line 3, column 'label': 'defect' contradicts"):
        load_feedback(uri, {"metal"})


def test_parquet_tables_and_missing_files(images: Path) -> None:
    table = pa.table({"image_uri": [str(images / "a.png")], "product_line": ["metal"],
                      "label": ["normal"]})  # fmt: skip
    pq.write_table(table, images / "f.parquet")
    assert load_feedback(str(images / "f.parquet"), {"metal"}).rows[0].line == 2
    with pytest.raises(FeedbackError, match="file not found"):
        load_feedback(str(images / "nope.csv"), {"metal"})
