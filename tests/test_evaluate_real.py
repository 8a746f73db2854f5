"""Pure pieces of train/evaluate_real.py: centroids, centroid matching, labelling, the grid choice."""

import numpy as np
import pytest

from cleftwise.train.errors import TrainError
from cleftwise.train.evaluate_real import centroid_match, centroids, choose_postprocess, label_predictions


def test_centroids_in_nm():
    lab = np.zeros((2, 4, 4), np.uint16)
    lab[1, 0:2, 0:2] = 7
    c = centroids(lab, (50, 4.6, 4.6))
    assert c["id"].tolist() == [7] and c["size"].tolist() == [4]
    np.testing.assert_allclose(c[["z", "y", "x"]].to_numpy()[0], [75.0, 4.6, 4.6])


def test_centroid_match_is_one_to_one_within_the_limit():
    true = np.zeros((1, 100, 100), np.uint32)
    pred = np.zeros_like(true)
    true[0, 10:14, 10:14] = 1
    true[0, 60:64, 60:64] = 2
    pred[0, 11:15, 10:14] = 5      # 1 px (5 nm) from true 1
    pred[0, 12:16, 12:16] = 6      # also near true 1, but 1 is taken: a false positive
    pred[0, 90:94, 90:94] = 8      # 30 px in y and x from true 2: 212 nm at 5 nm/px
    m, matches = centroid_match(pred, true, (50, 5, 5), max_distance_nm=50)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 2, 1)
    assert matches[["pred_id", "true_id"]].values.tolist() == [[5, 1]]
    m2, _ = centroid_match(pred, true, (50, 5, 5), max_distance_nm=250)
    assert (m2["tp"], m2["fp"], m2["fn"]) == (2, 1, 0)
    empty, _ = centroid_match(np.zeros_like(true), true, (50, 5, 5), 50)
    assert empty["recall"] == 0.0 and empty["fn"] == 2
    with pytest.raises(TrainError, match="shapes"):
        centroid_match(pred[:, :50], true, (50, 5, 5), 50)


def test_label_predictions_threshold_size_and_uint8():
    p = np.zeros((1, 20, 20), np.float32)
    p[0, 0:5, 0:5] = 0.9           # 25 voxels
    p[0, 10:12, 10:12] = 0.9       # 4 voxels
    p[0, 15:19, 15:19] = 0.4       # below 0.5
    lab = label_predictions(p, 0.5, min_size=10)
    assert lab.max() == 1 and np.count_nonzero(lab) == 25
    lab8 = label_predictions((p * 255).astype(np.uint8), 0.5, min_size=0)
    assert lab8.max() == 2
    assert label_predictions(p, 0.3, min_size=0).max() == 3


def test_choose_postprocess_prefers_the_setting_that_matches_truth():
    true = np.zeros((1, 40, 40), np.uint32)
    true[0, 2:8, 2:8] = 1
    true[0, 20:26, 20:26] = 2
    p = np.zeros((1, 40, 40), np.float32)
    p[0, 2:8, 2:8] = 0.9
    p[0, 20:26, 20:26] = 0.6
    p[0, 30:32, 30:32] = 0.95      # small confident speck: removed by min_size 10
    th, ms, grid = choose_postprocess(p, true, [0.5, 0.7], [0, 10], iou_threshold=0.1)
    assert (th, ms) == (0.5, 10)
    best = grid[(grid.threshold == 0.5) & (grid.min_size == 10)].iloc[0]
    assert best["f1"] == 1.0 and len(grid) == 4


def test_choose_postprocess_pools_regions_by_counts():
    """Out-of-fold choice: detections are counted per region and summed, then scored."""
    true_a = np.zeros((1, 40, 40), np.uint32)
    true_a[0, 2:8, 2:8] = 1
    p_a = np.zeros((1, 40, 40), np.float32)
    p_a[0, 2:8, 2:8] = 0.9
    true_b = np.zeros((1, 30, 30), np.uint32)
    true_b[0, 10:13, 10:13] = 5        # a small true synapse (9 voxels)
    p_b = np.zeros((1, 30, 30), np.float32)
    p_b[0, 10:13, 10:13] = 0.8
    p_b[0, 20:22, 20:22] = 0.9         # a 4-voxel false detection
    th, ms, grid = choose_postprocess([p_a, p_b], [true_a, true_b], [0.5], [0, 5, 20], iou_threshold=0.1)
    rows = grid.set_index("min_size")
    assert rows.loc[0, "n_pred"] == 3 and rows.loc[5, "n_pred"] == 2 and rows.loc[20, "n_pred"] == 1
    assert rows.loc[5, "f1"] == 1.0 and rows.loc[20, "recall"] == 0.5 and rows.loc[0, "precision"] == 2 / 3
    assert (th, ms) == (0.5, 5)
    with pytest.raises(TrainError, match="2 probability and 1 label"):
        choose_postprocess([p_a, p_b], [true_a], [0.5], [0], iou_threshold=0.1)
