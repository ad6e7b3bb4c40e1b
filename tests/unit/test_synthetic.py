"""Unit tests for the procedural MVTec-style data generator (pipeline.demo.synthetic)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

from pipeline.demo.synthetic import (
    DEFECT_TYPES,
    PRODUCT_LINES,
    SyntheticSpec,
    render_defect,
    render_normal,
    write_mvtec_dataset,
)


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_constants():
    assert DEFECT_TYPES == ("scratch", "spot", "crack")
    assert len(PRODUCT_LINES) >= 3
    assert {"metal_plate", "woven_fabric"} <= set(PRODUCT_LINES)
    assert SyntheticSpec().product_lines == PRODUCT_LINES


@pytest.mark.parametrize("line", PRODUCT_LINES)
@pytest.mark.parametrize("size", [32, 128, 256])
def test_render_normal_shape_dtype(line, size):
    img = render_normal(line, _rng(0), size)
    assert img.shape == (size, size, 3)
    assert img.dtype == np.uint8
    assert img.std() > 3.0  # textured, not flat


@pytest.mark.parametrize("line", PRODUCT_LINES)
@pytest.mark.parametrize("defect", DEFECT_TYPES)
def test_render_defect_shape_dtype_mask(line, defect):
    for seed in range(4):
        img, mask = render_defect(line, defect, _rng(seed), 128)
        assert img.shape == (128, 128, 3) and img.dtype == np.uint8
        assert mask.shape == (128, 128) and mask.dtype == np.uint8
        assert set(np.unique(mask).tolist()) == {0, 255}
        on = mask > 0
        assert 15 <= on.sum() <= 0.1 * on.size
        # fully inside the image: nothing touches the border
        assert not (on[0].any() or on[-1].any() or on[:, 0].any() or on[:, -1].any())


@pytest.mark.parametrize("line", PRODUCT_LINES)
def test_determinism_normal(line):
    a = render_normal(line, _rng(42))
    b = render_normal(line, _rng(42))
    c = render_normal(line, _rng(43))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # int seeds are accepted as a convenience and match the generator form
    np.testing.assert_array_equal(render_normal(line, 42), a)


@pytest.mark.parametrize("line", PRODUCT_LINES)
@pytest.mark.parametrize("defect", DEFECT_TYPES)
def test_determinism_defect(line, defect):
    a, ma = render_defect(line, defect, _rng(5))
    b, mb = render_defect(line, defect, _rng(5))
    c, mc = render_defect(line, defect, _rng(6))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ma, mb)
    assert not np.array_equal(a, c)
    assert not np.array_equal(ma, mc)


@pytest.mark.parametrize("line", PRODUCT_LINES)
@pytest.mark.parametrize("defect", DEFECT_TYPES)
def test_defect_drawn_on_top_of_normal(line, defect):
    """render_defect == render_normal (same rng state) + a change confined to the mask."""
    for seed in range(3):
        normal = render_normal(line, _rng(seed)).astype(np.float64)
        img, mask = render_defect(line, defect, _rng(seed))
        diff = np.abs(img.astype(np.float64) - normal).mean(axis=2)
        on = mask > 0
        inside, outside = diff[on].mean(), diff[~on].mean()
        assert inside > 10.0, (seed, inside)
        assert outside < 0.2, (seed, outside)
        assert inside > 20 * max(outside, 0.05)
        # most mask pixels visibly changed; almost nothing outside changed
        assert (diff[on] > 8).mean() > 0.3
        assert (diff[~on] > 8).mean() < 0.002


def test_defects_not_trivially_saturated():
    for line in PRODUCT_LINES:
        for defect in DEFECT_TYPES:
            img, mask = render_defect(line, defect, _rng(1))
            px = img[mask > 0]
            assert (px == 255).all(axis=1).mean() < 0.5
            assert (px == 0).all(axis=1).mean() < 0.5


def test_product_lines_look_different():
    means = {
        line: np.mean([render_normal(line, _rng(s), 64).mean(axis=(0, 1)) for s in range(3)], 0)
        for line in PRODUCT_LINES
    }
    for i, a in enumerate(PRODUCT_LINES):
        for b in PRODUCT_LINES[i + 1 :]:
            assert np.abs(means[a] - means[b]).max() > 15, (a, b)


@pytest.mark.parametrize("line", PRODUCT_LINES)
def test_normals_vary_within_one_distribution(line):
    imgs = np.stack([render_normal(line, _rng(s), 64).astype(np.float64) for s in range(6)])
    means = imgs.mean(axis=(1, 2, 3))
    assert means.max() - means.min() < 40
    pair_diffs = [np.abs(imgs[i] - imgs[i + 1]).mean() for i in range(5)]
    assert min(pair_diffs) > 2.0


def test_unknown_names_and_bad_sizes_raise():
    with pytest.raises(ValueError, match="metal_plate"):
        render_normal("bogus_line", _rng(0))
    with pytest.raises(ValueError, match="valid"):
        render_defect("bogus_line", "spot", _rng(0))
    with pytest.raises(ValueError, match="scratch"):
        render_defect(PRODUCT_LINES[0], "dent", _rng(0))
    for bad in (16, 31, 0, -5, 64.0, True):
        with pytest.raises(ValueError):
            render_normal(PRODUCT_LINES[0], _rng(0), bad)
        with pytest.raises(ValueError):
            render_defect(PRODUCT_LINES[0], "spot", _rng(0), bad)


def test_spec_validation(tmp_path):
    with pytest.raises(ValueError, match="metal_plate"):
        write_mvtec_dataset(tmp_path, SyntheticSpec(product_lines=("nope",)))
    with pytest.raises(ValueError):
        SyntheticSpec(size=16)
    with pytest.raises(ValueError):
        SyntheticSpec(n_train=-1)
    with pytest.raises(ValueError):
        SyntheticSpec(product_lines=())
    with pytest.raises(ValueError):
        SyntheticSpec(product_lines=("metal_plate", "metal_plate"))
    assert SyntheticSpec(product_lines=["wood_panel"]).product_lines == ("wood_panel",)
    assert not any(tmp_path.iterdir())  # nothing written on invalid input


def _files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_write_mvtec_dataset_layout(tmp_path):
    lines = PRODUCT_LINES[:2]
    spec = SyntheticSpec(product_lines=lines, n_train=3, n_test_good=2, n_test_defect=5, size=48)
    out = write_mvtec_dataset(tmp_path, spec)
    assert out == {line: tmp_path / line for line in lines}

    expected = []
    per_defect = {"scratch": 2, "spot": 2, "crack": 1}  # 5 round-robin over 3 types
    for line in lines:
        expected += [f"{line}/train/good/{i:03d}.png" for i in range(3)]
        expected += [f"{line}/test/good/{i:03d}.png" for i in range(2)]
        for defect, n in per_defect.items():
            expected += [f"{line}/test/{defect}/{i:03d}.png" for i in range(n)]
            expected += [f"{line}/ground_truth/{defect}/{i:03d}_mask.png" for i in range(n)]
    assert _files(tmp_path) == sorted(expected)

    for line in lines:
        for img_path in (tmp_path / line / "test").glob("*/*.png"):
            with Image.open(img_path) as im:
                assert im.mode == "RGB" and im.size == (48, 48)
            defect = img_path.parent.name
            if defect == "good":
                continue
            mask_path = tmp_path / line / "ground_truth" / defect / f"{img_path.stem}_mask.png"
            assert mask_path.is_file()
            with Image.open(mask_path) as m:
                assert m.mode == "L" and m.size == (48, 48)
                arr = np.asarray(m)
            assert set(np.unique(arr).tolist()) == {0, 255}


def test_write_mvtec_dataset_deterministic(tmp_path):
    spec = SyntheticSpec(
        product_lines=("ceramic_tile",), n_train=2, n_test_good=1, n_test_defect=3, size=40, seed=7
    )
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    write_mvtec_dataset(a, spec)
    write_mvtec_dataset(str(b), spec)
    write_mvtec_dataset(c, dataclasses.replace(spec, seed=8))
    names = _files(a)
    assert names == _files(b) == _files(c)
    assert all((a / n).read_bytes() == (b / n).read_bytes() for n in names)
    assert any((a / n).read_bytes() != (c / n).read_bytes() for n in names)
    # images of one split do not depend on the counts of another
    d = tmp_path / "d"
    write_mvtec_dataset(d, dataclasses.replace(spec, n_train=5))
    for n in names:
        if "/train/" not in n:
            assert (a / n).read_bytes() == (d / n).read_bytes()
