"""dfr_core.metrics against independent brute-force references and hand-worked cases."""

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from dfr_core import metrics

trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy 2 renamed np.trapz


# --------------------------------------------------------------------------- references


def brute_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """O(n_pos * n_neg) pairwise Mann-Whitney: wins + 0.5 * ties over all pairs."""
    labels, scores = np.ravel(labels).astype(bool), np.ravel(scores)
    pos, neg = scores[labels][:, None], scores[~labels][None, :]
    return float(((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size))


def reference_pro_points(
    masks: np.ndarray, maps: np.ndarray, thresholds: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PRO curve by brute force: scipy regions, explicit overlaps, one threshold at a time."""
    per_image = []
    for i, mask in enumerate(masks):
        labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
        per_image += [(i, labels == r) for r in range(1, n + 1)]
    normal = ~masks.astype(bool)
    if thresholds is None:
        thresholds = np.unique(maps)[::-1]
    thresholds = np.append(thresholds, -np.inf)
    fpr, pro = [], []
    for t in thresholds:
        pred = maps > t
        fpr.append((pred & normal).sum() / normal.sum())
        pro.append(np.mean([(pred[i] & region).sum() / region.sum() for i, region in per_image]))
    return np.array(fpr), np.array(pro), thresholds


def reference_truncate(
    fpr: np.ndarray, pro: np.ndarray, max_fpr: float
) -> tuple[np.ndarray, np.ndarray]:
    """Points with fpr <= max_fpr plus a linear interpolation at exactly max_fpr."""
    keep = fpr <= max_fpr
    x, y = list(fpr[keep]), list(pro[keep])
    if x[-1] < max_fpr:
        j = int(np.argmax(fpr > max_fpr))
        w = (max_fpr - fpr[j - 1]) / (fpr[j] - fpr[j - 1])
        x.append(max_fpr)
        y.append(pro[j - 1] + w * (pro[j] - pro[j - 1]))
    return np.array(x), np.array(y)


def reference_aupro(masks: np.ndarray, maps: np.ndarray, max_fpr: float = 0.3) -> float:
    fpr, pro, _ = reference_pro_points(masks, maps)
    x, y = reference_truncate(fpr, pro, max_fpr)
    return float(trapezoid(y, x) / max_fpr)


def blob_masks(rng: np.random.Generator, n: int, h: int, w: int, max_blobs: int = 3) -> np.ndarray:
    """Union of random discs per image (some images defect-free)."""
    yy, xx = np.ogrid[:h, :w]
    masks = np.zeros((n, h, w), bool)
    for i in range(n):
        for _ in range(rng.integers(0, max_blobs + 1)):
            cy, cx = rng.integers(0, h), rng.integers(0, w)
            r = rng.integers(1, max(2, h // 5))
            masks[i] |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    return masks


def random_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """3 images 16x16: blob or speckle masks; continuous, coarse (tied) or informative maps."""
    rng = np.random.default_rng(seed)
    if seed % 2:
        masks = blob_masks(rng, 3, 16, 16)
    else:
        masks = rng.random((3, 16, 16)) < 0.15  # many tiny, diagonally touching regions
    masks[0, 5, 5] = True  # at least one region
    kind = seed % 3
    if kind == 0:
        maps = rng.random(masks.shape)
    elif kind == 1:
        maps = rng.integers(0, 5, masks.shape) / 4.0  # heavy ties, incl. across classes
    else:
        maps = (rng.random(masks.shape) + masks * rng.random()).astype(np.float32)
    return masks, maps


# --------------------------------------------------------------------------- ROC


@pytest.mark.parametrize("seed", range(20))
def test_roc_auc_matches_pairwise_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 60))
    labels = rng.random(n) < 0.4
    labels[:2] = [True, False]
    scores = rng.integers(0, 6, n).astype(float) if seed % 2 else rng.normal(size=n)
    assert metrics.roc_auc(labels, scores) == pytest.approx(brute_auc(labels, scores), abs=1e-12)


def test_roc_auc_hand_cases():
    y = np.array([0, 0, 1, 1])
    assert metrics.roc_auc(y, [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert metrics.roc_auc(y, [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert metrics.roc_auc(y, [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert metrics.roc_auc(y, [0.1, 0.5, 0.5, 0.9]) == 0.875  # 3 wins + 1 tie out of 4 pairs


def test_roc_auc_accepts_bool_and_torch():
    y = torch.tensor([False, True, False, True])
    s = torch.tensor([0.1, 0.7, 0.4, 0.3], requires_grad=True)
    assert metrics.roc_auc(y, s) == 0.75
    assert metrics.image_auroc(y, s) == 0.75


@pytest.mark.parametrize("labels", [[1, 1, 1], [0, 0, 0], [True]])
def test_roc_auc_single_class_raises(labels):
    with pytest.raises(ValueError, match="both classes"):
        metrics.roc_auc(labels, np.arange(len(labels), dtype=float))


def test_roc_auc_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(3,\).*\(4,\)"):
        metrics.roc_auc([0, 1, 1], [0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match="binary"):
        metrics.roc_auc([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="NaN"):
        metrics.roc_auc([0, 1], [0.1, np.nan])
    with pytest.raises(ValueError, match="empty"):
        metrics.roc_auc([], [])
    with pytest.raises(ValueError, match="1-D"):
        metrics.image_auroc([[0, 1]], [[0.1, 0.2]])


@pytest.mark.parametrize("seed", range(5))
def test_roc_curve_points_area_and_thresholds(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(40) < 0.5
    labels[:2] = [True, False]
    scores = rng.integers(0, 8, 40).astype(float)
    fpr, tpr, thr = metrics.roc_curve(labels, scores)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    np.testing.assert_array_equal(thr[:-1], np.unique(scores)[::-1])
    assert thr[-1] == -np.inf
    assert trapezoid(tpr, fpr) == pytest.approx(metrics.roc_auc(labels, scores), abs=1e-12)
    for i in (0, len(thr) // 2, len(thr) - 1):  # each point is the ">" operating point
        pred = scores > thr[i]
        assert tpr[i] == pred[labels].mean() and fpr[i] == pred[~labels].mean()


def test_pixel_auroc_equals_flat_roc_auc():
    rng = np.random.default_rng(0)
    masks = blob_masks(rng, 4, 20, 24)
    maps = (rng.random(masks.shape) + 0.3 * masks).astype(np.float32)
    maps[maps > 0.9] = 0.9  # ties across classes
    expected = metrics.roc_auc(masks.ravel(), maps.ravel())
    assert metrics.pixel_auroc(masks, maps) == expected
    assert expected == pytest.approx(brute_auc(masks, maps), abs=1e-12)
    assert metrics.pixel_auroc(torch.from_numpy(masks), torch.from_numpy(maps)) == expected


# --------------------------------------------------------------------------- PRO


@pytest.mark.parametrize("seed", range(8))
def test_pro_curve_and_aupro_match_brute_force(seed):
    masks, maps = random_case(seed)
    ref_fpr, ref_pro, _ = reference_pro_points(masks, maps)
    for max_fpr in (0.3, 0.05, 1.0):
        curve = metrics.pro_curve(masks, maps, max_fpr)
        x, y = reference_truncate(ref_fpr, ref_pro, max_fpr)
        np.testing.assert_allclose(curve.fpr, x, atol=1e-12)
        np.testing.assert_allclose(curve.pro, y, atol=1e-9)
        expected = float(trapezoid(y, x) / max_fpr)
        assert metrics.aupro(masks, maps, max_fpr) == pytest.approx(expected, abs=1e-6)
    assert metrics.aupro(masks, maps) == pytest.approx(reference_aupro(masks, maps), abs=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_pro_curve_thresholds_are_operating_points(seed):
    masks, maps = random_case(seed)
    curve = metrics.pro_curve(masks, maps, max_fpr=1.0)
    assert curve.fpr[0] == 0 and curve.pro[0] == 0
    assert np.all(np.diff(curve.fpr) >= 0) and np.all(np.diff(curve.thresholds) < 0)
    ref_fpr, ref_pro, _ = reference_pro_points(masks, maps, curve.thresholds[:-1])
    np.testing.assert_allclose(curve.fpr, ref_fpr, atol=1e-12)
    np.testing.assert_allclose(curve.pro, ref_pro, atol=1e-9)
    mid = len(curve.thresholds) // 2
    tm = metrics.threshold_metrics(masks, maps, curve.thresholds[mid])
    assert tm.fpr == pytest.approx(curve.fpr[mid], abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_pro_curve_num_thresholds_matches_brute_force_on_the_grid(seed):
    masks, maps = random_case(seed)
    curve = metrics.pro_curve(masks, maps, max_fpr=0.3, num_thresholds=50)
    grid = np.linspace(maps.max(), maps.min(), 50).astype(maps.dtype).astype(np.float64)
    ref_fpr, ref_pro, _ = reference_pro_points(masks, maps, grid)
    x, y = reference_truncate(ref_fpr, ref_pro, 0.3)
    np.testing.assert_allclose(curve.fpr, x, atol=1e-12)
    np.testing.assert_allclose(curve.pro, y, atol=1e-9)


def test_aupro_hand_worked_case():
    # regions A = {(0,0)} and B = {(1,2),(1,3)}; 5 normal pixels.
    masks = np.array([[[1, 0, 0, 0], [0, 0, 1, 1]]])
    maps = np.array([[[0.9, 0.8, 0.1, 0.2], [0.3, 0.4, 0.7, 0.0]]])
    # > 0.8: A (fpr 0, pro 1/2); > 0.7: + normal (0.2, 1/2); > 0.4: + half of B (0.2, 3/4);
    # > 0.3: + normal (0.4, 3/4).  Area to 0.3: 0.2 * 1/2 + 0.1 * 3/4 = 0.175.
    curve = metrics.pro_curve(masks, maps)
    np.testing.assert_allclose(curve.fpr, [0, 0, 0.2, 0.2, 0.3])
    np.testing.assert_allclose(curve.pro, [0, 0.5, 0.5, 0.75, 0.75])
    np.testing.assert_array_equal(curve.thresholds[:-1], [0.9, 0.8, 0.7, 0.4])
    assert math.isnan(curve.thresholds[-1])
    assert metrics.aupro(masks, maps) == pytest.approx(0.175 / 0.3, abs=1e-12)
    assert metrics.aupro(masks, maps, max_fpr=1.0) == pytest.approx(0.1 + 0.8 * 0.75)
    assert metrics.aupro(masks[0], maps[0]) == metrics.aupro(masks, maps)  # (H, W) accepted


def test_aupro_perfect_and_inverted_maps():
    masks = blob_masks(np.random.default_rng(3), 4, 24, 24)
    masks[0, 3:6, 3:6] = True
    assert metrics.aupro(masks, masks.astype(float)) == pytest.approx(1.0, abs=1e-12)
    assert metrics.aupro(masks, 1.0 - masks) == 0.0
    # a constant map has only the operating points (0, 0) and (1, 1): area 0.3^2 / 2, over 0.3
    assert metrics.aupro(masks, np.full(masks.shape, 0.5)) == pytest.approx(0.15)


def test_pro_regions_are_per_image_and_8_connected():
    # image 0: region of 2 on its bottom row; image 1: region of 1 on its top row. Stacked they
    # would touch; kept separate, predicting only image 1's defect gives PRO (0 + 1) / 2.
    masks = np.zeros((2, 2, 2), bool)
    masks[0, 1, :] = True
    masks[1, 0, 0] = True
    maps = np.full(masks.shape, 0.5)
    maps[0, 1, :], maps[1, 0, 0] = 0.0, 1.0
    assert metrics.aupro(masks, maps) == pytest.approx(0.5)
    # diagonal pair is one region (size 2) under 8-connectivity: PRO (1/2 + 1) / 2, not 2/3.
    masks = np.array([[[1, 0, 0, 0], [0, 1, 0, 1]]], bool)
    maps = np.where(masks, 0.0, 0.5)
    maps[0, 0, 0] = maps[0, 1, 3] = 1.0
    assert metrics.aupro(masks, maps) == pytest.approx(0.75)


def test_pro_invalid_inputs():
    masks = np.zeros((2, 4, 4), bool)
    with pytest.raises(ValueError, match="no defect region|at least one defect region"):
        metrics.aupro(masks, np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="normal pixels"):
        metrics.aupro(~masks, np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match=r"\(2, 4, 4\).*\(2, 4, 5\)"):
        metrics.aupro(masks, np.zeros((2, 4, 5)))
    with pytest.raises(ValueError, match="empty"):
        metrics.pro_curve(np.zeros((0, 4, 4)), np.zeros((0, 4, 4)))
    masks[0, 1, 1] = True
    with pytest.raises(ValueError, match="max_fpr"):
        metrics.aupro(masks, np.zeros((2, 4, 4)), max_fpr=0.0)
    with pytest.raises(ValueError, match="num_thresholds"):
        metrics.pro_curve(masks, np.zeros((2, 4, 4)), num_thresholds=1)


# --------------------------------------------------------------------------- components


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("seed", range(6))
def test_label_components_matches_scipy(connectivity, seed):
    rng = np.random.default_rng(seed)
    shape = tuple(rng.integers(1, 40, 2))
    mask = rng.random(shape) < rng.uniform(0.1, 0.8)
    labels, n = metrics.label_components(mask, connectivity)
    structure = np.ones((3, 3)) if connectivity == 8 else None
    ref, ref_n = ndimage.label(mask, structure=structure)
    assert n == ref_n and labels.dtype == np.int32
    np.testing.assert_array_equal(labels == 0, ref == 0)
    pairs = np.unique(np.stack([labels[mask], ref[mask]]), axis=1)  # same partition:
    assert pairs.shape[1] == n  # a bijection between the two labellings


def test_label_components_edge_cases():
    labels, n = metrics.label_components(np.zeros((3, 3)))
    assert n == 0 and not labels.any()
    snake = np.ones((9, 9), bool)
    snake[1::4, :-1] = False
    snake[3::4, 1:] = False
    assert metrics.label_components(snake)[1] == 1
    with pytest.raises(ValueError, match="2-D"):
        metrics.label_components(np.zeros((2, 3, 3)))
    with pytest.raises(ValueError, match="connectivity"):
        metrics.label_components(np.zeros((3, 3)), connectivity=6)


# --------------------------------------------------------------------------- fixed threshold


def test_threshold_metrics_hand_case():
    masks = np.array([[[1, 1, 0, 0], [1, 0, 0, 0]]])
    maps = np.array([[[0.9, 0.4, 0.8, 0.1], [0.6, 0.5, 0.2, 0.5]]], dtype=np.float32)
    # map > 0.5: (0,0) tp, (0,2) fp, (1,0) tp; (0,1) fn; 0.5 itself is not above the threshold.
    tm = metrics.threshold_metrics(masks, maps, 0.5)
    assert tm == pytest.approx(
        metrics.ThresholdMetrics(f1=4 / 6, iou=2 / 4, precision=2 / 3, recall=2 / 3, fpr=1 / 5)
    )
    # float32 maps vs a float64 threshold just below 0.5f: both 0.5 pixels are above it.
    just_below = float(np.nextafter(np.float64(np.float32(0.5)), 0))
    assert metrics.threshold_metrics(masks, maps, just_below).fpr == 3 / 5
    empty = metrics.threshold_metrics(np.zeros((1, 2, 2)), np.zeros((1, 2, 2)), 1.0)
    assert math.isnan(empty.precision) and math.isnan(empty.f1) and empty.fpr == 0.0


# --------------------------------------------------------------------------- scale


@pytest.mark.slow
def test_full_scale_smoke():
    rng = np.random.default_rng(0)
    masks = blob_masks(rng, 300, 256, 256)
    maps = rng.random(masks.shape, dtype=np.float32) + masks * np.float32(0.5)
    value = metrics.aupro(masks, maps)
    assert math.isfinite(value) and 0.0 <= value <= 1.0
    assert 0.5 < metrics.pixel_auroc(masks, maps) <= 1.0


def test_tpr_at_fpr_and_operating_point():
    labels = np.array([0] * 100 + [1] * 10)
    scores = np.concatenate([np.arange(100, dtype=float), np.array([99.5] * 5 + [50.0] * 5)])
    # one normal (score 99) may be flagged at 1% FPR: threshold 98 flags 99 and the five 99.5s
    assert metrics.tpr_at_fpr(labels, scores, 0.01) == 0.5
    assert metrics.tpr_at_fpr(labels, scores, 0.0) == 0.5
    assert metrics.tpr_at_fpr(labels, scores, 1.0) == 1.0
    op = metrics.image_operating_point(labels, scores, 98.0)
    assert (op.n_flagged_normal, op.n_normal, op.n_flagged_defective, op.n_defective) == (
        1,
        100,
        5,
        10,
    )
    assert op.fpr == 0.01 and op.recall == 0.5
    # strictly greater: a score equal to the threshold is not flagged
    assert metrics.image_operating_point(labels, scores, 99.5).n_flagged_defective == 0
    with pytest.raises(ValueError):
        metrics.tpr_at_fpr(np.zeros(5), np.arange(5.0))
    only_normal = metrics.image_operating_point(np.zeros(3), np.arange(3.0), 0.5)
    assert op.fpr == 0.01 and np.isnan(only_normal.recall)
