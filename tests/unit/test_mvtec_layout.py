"""One MVTec layout rule, two readers that differ only in their I/O.

dfr_core.datasets reads local folders (benchmarks, real-data tests); pipeline.mvtec_remote
reads any storage URI (S3 included). Both place masks by dfr_core.datasets.mask_of, so on the
same folder they find the same test samples and masks.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dfr_core.datasets import list_category, mask_of
from pipeline.mvtec_remote import LabelledSetError, list_labelled_set


def _tree(root: Path, with_masks: bool = True) -> None:
    for rel in ("train/good/0.png", "test/good/1.png", "test/crack/2.png", "test/hole/3.bmp"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    if with_masks:
        for rel in ("ground_truth/crack/2_mask.png", "ground_truth/hole/3_mask.png"):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(b"x")


def test_mask_of() -> None:
    assert mask_of("good", "001.png") is None
    assert mask_of("crack", "001.tif") == ("crack", "001_mask.png")


def test_both_readers_find_the_same_samples(tmp_path: Path) -> None:
    _tree(tmp_path)
    _, local = list_category(tmp_path)
    remote = list_labelled_set(str(tmp_path))
    as_local = [(str(s.image), s.defect, None if s.mask is None else str(s.mask)) for s in local]
    assert as_local == [tuple(s) for s in remote]
    assert [s.defect for s in remote] == ["crack", "good", "hole"]
    assert remote[0].mask_uri == str(tmp_path / "ground_truth" / "crack" / "2_mask.png")


def test_both_readers_refuse_a_defect_without_its_mask(tmp_path: Path) -> None:
    _tree(tmp_path, with_masks=False)
    with pytest.raises(FileNotFoundError, match="2_mask.png not found"):
        list_category(tmp_path)
    with pytest.raises(LabelledSetError, match="2_mask.png not found"):
        list_labelled_set(str(tmp_path))
