"""Instance P/R/F1 with IoU matching and CREMI cleft metrics."""

import math

import cc3d
import numpy as np
import pytest
from scipy import ndimage

from cleftwise.postprocess.errors import PostprocessError
from cleftwise.postprocess.metrics import cremi_cleft_metrics, instance_f1, instance_overlaps


def _blobs(shape=(12, 40, 40), n=6, seed=0):
    """Separated ellipsoid-ish blobs as an instance label volume."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint64)
    z, y, x = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
    centres = [(6, 7, 7), (6, 7, 30), (6, 30, 7), (6, 30, 30), (3, 19, 19), (9, 19, 19)][:n]
    for i, (cz, cy, cx) in enumerate(centres, start=1):
        r = rng.uniform(4, 5)
        labels[((z - cz) * 2.0) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 <= r * r] = i
    return labels


def test_perfect_prediction():
    truth = _blobs()
    pred = truth.copy()
    # Renumbering predicted ids changes nothing.
    pred[pred > 0] += 100
    for method in ("hungarian", "greedy"):
        m = instance_f1(pred, truth, 0.5, method)
        assert (m.tp, m.fp, m.fn) == (6, 0, 0)
        assert m.precision == m.recall == m.f1 == 1.0
        assert m.matches["iou"].tolist() == [1.0] * 6
        assert m.matches["true_id"].tolist() == [1, 2, 3, 4, 5, 6]
    c = cremi_cleft_metrics(pred > 0, truth > 0, (40, 4, 4))
    assert c["avg_fp_distance"] == c["avg_fn_distance"] == c["cremi_score"] == 0.0
    assert c["f1"] == 1.0 and c["fp_count"] == c["fn_count"] == 0
    assert c["n_pred"] == c["n_true"] == int((truth > 0).sum())


def test_instance_metrics_by_hand():
    # 1 x 4 x 10 volume; rows are y.
    truth = np.zeros((1, 4, 10), np.uint64)
    pred = np.zeros_like(truth)
    truth[0, 0, 0:4] = 1          # matched by pred 7 with IoU 3/4
    pred[0, 0, 0:3] = 7
    truth[0, 1, 0:4] = 2          # pred 8 covers 2 of 6 voxels of the union: IoU 1/3
    pred[0, 1, 2:6] = 8
    pred[0, 3, 0:5] = 9           # no truth: false positive
    truth[0, 2, 5:10] = 3         # no prediction: false negative
    table = instance_overlaps(pred, truth).set_index(["pred_id", "true_id"])
    assert table.loc[(7, 1), "iou"] == 0.75
    assert table.loc[(8, 2), "iou"] == pytest.approx(1 / 3)
    m = instance_f1(pred, truth, 0.5)
    assert (m.tp, m.fp, m.fn) == (1, 2, 2)
    assert m.precision == pytest.approx(1 / 3) and m.recall == pytest.approx(1 / 3)
    assert m.f1 == pytest.approx(1 / 3)
    m = instance_f1(pred, truth, 0.3)
    assert (m.tp, m.fp, m.fn) == (2, 1, 1)
    assert m.f1 == pytest.approx(2 / 3)


def test_hungarian_beats_greedy_at_low_threshold():
    # T1: rows 0-2, T2: row 3; P1: rows 1-3 (IoU 0.5 with T1, 1/3 with T2); P2: row 0
    # (IoU 1/3 with T1). Greedy takes P1-T1 and stops; Hungarian takes P1-T2 and P2-T1.
    truth = np.zeros((1, 4, 10), np.uint64)
    pred = np.zeros_like(truth)
    truth[0, 0:3] = 1
    truth[0, 3] = 2
    pred[0, 1:4] = 1
    pred[0, 0] = 2
    greedy = instance_f1(pred, truth, 0.3, "greedy")
    hung = instance_f1(pred, truth, 0.3, "hungarian")
    assert greedy.tp == 1 and greedy.matches[["pred_id", "true_id"]].values.tolist() == [[1, 1]]
    assert hung.tp == 2 and hung.matches[["pred_id", "true_id"]].values.tolist() == [[1, 2], [2, 1]]
    # Above 0.5 the matching is unique, so both agree.
    assert instance_f1(pred, truth, 0.5, "greedy").tp == instance_f1(pred, truth, 0.5).tp == 1


def test_erosion_degrades_instance_f1_and_cremi_monotonically():
    truth = _blobs()
    vs = (40.0, 4.0, 4.0)
    f1s, ious, adgts, recalls = [], [], [], []
    pred_mask = truth > 0
    in_plane = np.zeros((3, 3, 3), bool)  # erode in y/x only, the z voxels are 10x larger
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    for k in range(4):
        eroded = ndimage.binary_erosion(pred_mask, in_plane, iterations=k) if k else pred_mask
        pred = cc3d.connected_components(eroded, connectivity=26)
        m = instance_f1(pred, truth, 0.5)
        f1s.append(m.f1)
        ious.append(m.matches["iou"].mean() if len(m.matches) else 0.0)
        c = cremi_cleft_metrics(eroded, truth > 0, vs, tolerance_nm=8.0)
        adgts.append(c["avg_fn_distance"])
        recalls.append(c["recall"])
        assert c["avg_fp_distance"] == 0.0  # eroded prediction stays inside the truth
        assert c["n_pred"] > 0
    assert all(a >= b for a, b in zip(f1s, f1s[1:])) and f1s[0] == 1.0 and f1s[-1] < 1.0
    assert all(a > b for a, b in zip(ious, ious[1:]) if b > 0)
    assert all(a < b for a, b in zip(adgts, adgts[1:]))
    assert all(a >= b for a, b in zip(recalls, recalls[1:])) and recalls[-1] < 1.0


def test_noise_degrades_cremi_monotonically():
    truth = _blobs() > 0
    vs = (40.0, 4.0, 4.0)
    rng = np.random.default_rng(4)
    field = rng.random(truth.shape)
    far = ndimage.distance_transform_edt(~truth, sampling=vs) > 40.0
    assert far.sum() > 1000
    adfs, precisions, f1s = [], [], []
    for level in (0.0, 0.01, 0.03, 0.1):
        pred = truth | (far & (field < level))  # nested noise sets, all > 40 nm away
        c = cremi_cleft_metrics(pred, truth, vs, tolerance_nm=40.0)
        adfs.append(c["avg_fp_distance"])
        precisions.append(c["precision"])
        f1s.append(c["f1"])
        assert c["fp_count"] == int((pred & ~truth).sum())
        assert c["avg_fn_distance"] == 0.0 and c["recall"] == 1.0
    assert adfs[0] == 0.0 and all(a < b for a, b in zip(adfs, adfs[1:]))
    assert precisions[0] == 1.0 and all(a > b for a, b in zip(precisions, precisions[1:]))
    assert all(a > b for a, b in zip(f1s, f1s[1:]))


def test_cremi_by_hand_anisotropic():
    vs = (40.0, 4.0, 4.0)
    truth = np.zeros((2, 1, 3), bool)
    pred = np.zeros_like(truth)
    truth[0, 0, 0] = True
    pred[1, 0, 2] = True
    d = math.hypot(40.0, 8.0)
    c = cremi_cleft_metrics(pred, truth, vs, tolerance_nm=40.0)
    assert c["avg_fp_distance"] == pytest.approx(d) and c["avg_fn_distance"] == pytest.approx(d)
    assert c["cremi_score"] == pytest.approx(d)
    assert (c["fp_count"], c["fn_count"], c["f1"]) == (1, 1, 0.0)
    c = cremi_cleft_metrics(pred, truth, vs, tolerance_nm=41.0)
    assert (c["fp_count"], c["fn_count"], c["f1"]) == (0, 0, 1.0)
    # Two true voxels, one predicted: ADF 0, ADGT (0 + 4) / 2, recall 1/2 at 3 nm.
    truth = np.zeros((1, 1, 2), bool)
    truth[0, 0, :] = True
    pred = np.zeros_like(truth)
    pred[0, 0, 0] = True
    c = cremi_cleft_metrics(pred, truth, vs, tolerance_nm=3.0)
    assert (c["avg_fp_distance"], c["avg_fn_distance"], c["cremi_score"]) == (0.0, 2.0, 1.0)
    assert (c["precision"], c["recall"]) == (1.0, 0.5) and c["f1"] == pytest.approx(2 / 3)
    # Exactly at the tolerance is still matched (CREMI counts only "> threshold").
    c = cremi_cleft_metrics(pred, truth, vs, tolerance_nm=4.0)
    assert c["fn_count"] == 0
    # Ignored voxels are background in both masks.
    ignore = np.zeros_like(truth)
    ignore[0, 0, 1] = True
    c = cremi_cleft_metrics(pred, truth, vs, tolerance_nm=3.0, ignore_mask=ignore)
    assert c["n_true"] == 1 and c["f1"] == 1.0 and c["avg_fn_distance"] == 0.0


def test_empty_cases_and_errors():
    empty = np.zeros((2, 3, 4), bool)
    one = empty.copy()
    one[1, 1, 1] = True
    c = cremi_cleft_metrics(empty, empty, (1, 1, 1))
    assert c["f1"] == 1.0 and math.isnan(c["cremi_score"])
    c = cremi_cleft_metrics(one, empty, (1, 1, 1))
    assert c["avg_fp_distance"] == math.inf and c["precision"] == 0.0 and c["f1"] == 0.0
    c = cremi_cleft_metrics(empty, one, (1, 1, 1))
    assert c["avg_fn_distance"] == math.inf and c["recall"] == 0.0
    m = instance_f1(empty.astype(np.uint64), empty.astype(np.uint64))
    assert (m.tp, m.fp, m.fn, m.f1) == (0, 0, 0, 1.0)
    m = instance_f1(one.astype(np.uint64), empty.astype(np.uint64))
    assert (m.fp, m.precision, m.recall, m.f1) == (1, 0.0, 0.0, 0.0)
    with pytest.raises(PostprocessError, match="shape"):
        instance_f1(empty, empty[:1])
    with pytest.raises(PostprocessError, match="iou_threshold"):
        instance_f1(empty, empty, 0.0)
    with pytest.raises(PostprocessError, match="voxel_size"):
        cremi_cleft_metrics(empty, empty, (1, 1))
