"""Polarity decoding: per-voxel side rules, per-instance sites, blockwise merge."""

import itertools

import numpy as np
import pytest

from cleftwise.postprocess.errors import PostprocessError
from cleftwise.postprocess.polarity import (
    SIDE_POST,
    SIDE_PRE,
    assign_sides,
    decode_polarity,
    merge_polarity_stats,
    polarity_stats_block,
)


def _hand_volume():
    """Instance 4 occupies x = 0..5 of row (1, 1); instance 9 is the voxel (2, 3, 3)."""
    labels = np.zeros((3, 4, 6), np.uint64)
    labels[1, 1, :] = 4
    labels[2, 3, 3] = 9
    probs = np.zeros((3,) + labels.shape, np.float32)
    # x:          0    1    2    3    4    5
    probs[0, 1, 1] = [0.9, 0.8, 0.6, 0.2, 0.1, 0.9]  # pre
    probs[1, 1, 1] = [0.1, 0.3, 0.7, 0.9, 0.8, 0.9]  # post
    probs[2, 1, 1] = [1.0, 1.0, 1.0, 1.0, 1.0, 0.5]  # union; x=5: not > 0.5 (PyTC)
    probs[:, 2, 3, 3] = [0.9, 0.2, 0.9]              # instance 9: pre only
    probs[0, 0, 0, 0] = 1.0                          # outside instances: ignored
    probs[2, 0, 0, 0] = 1.0
    return labels, probs


def test_nonexclusive_threshold_rule_by_hand():
    labels, probs = _hand_volume()
    sides = assign_sides(labels, probs, "nonexclusive", 0.5, "threshold")
    assert sides[1, 1].tolist() == [1, 1, 3, 2, 2, 0]
    assert sides[2, 3, 3] == SIDE_PRE and sides[0, 0, 0] == 0
    res = decode_polarity(labels, probs).set_index("id")
    r4 = res.loc[4]
    assert (r4["voxels"], r4["pre_count"], r4["post_count"]) == (6, 3, 3)
    assert (r4["pre_z"], r4["pre_y"], r4["pre_x"]) == (1.0, 1.0, 1.0)   # x = 0, 1, 2
    assert (r4["post_z"], r4["post_y"], r4["post_x"]) == (1.0, 1.0, 3.0)  # x = 2, 3, 4
    np.testing.assert_allclose(r4["pre_score"], (0.9 + 0.8 + 0.6) / 3, rtol=1e-6)
    np.testing.assert_allclose(r4["post_score"], (0.7 + 0.9 + 0.8) / 3, rtol=1e-6)
    assert not r4["pre_empty"] and not r4["post_empty"]
    r9 = res.loc[9]
    assert r9["pre_count"] == 1 and r9["post_count"] == 0
    assert r9["post_empty"] and not r9["pre_empty"]
    assert np.isnan(r9["post_x"]) and np.isnan(r9["post_score"])


def test_nonexclusive_argmax_rule_ties_vote_for_neither():
    labels, probs = _hand_volume()
    sides = assign_sides(labels, probs, "nonexclusive", 0.5, "argmax")
    # x=2: 0.6 < 0.7 -> post; x=5 not above the union threshold -> none.
    assert sides[1, 1].tolist() == [1, 1, 2, 2, 2, 0]
    probs[2, 1, 1, 5] = 1.0  # x=5 now foreground with pre == post == 0.9: a tie
    sides = assign_sides(labels, probs, "nonexclusive", 0.5, "argmax")
    assert sides[1, 1, 5] == 0
    assert set(np.unique(sides).tolist()) <= {0, 1, 2}  # argmax never gives both


def test_uint8_scale_matches_pytc_threshold():
    rng = np.random.default_rng(0)
    labels = (rng.random((6, 7, 8)) < 0.7).astype(np.uint64) * 3
    raw = rng.integers(0, 256, (3, 6, 7, 8)).astype(np.uint8)
    raw[:, 0, 0, :4] = [[127, 128, 255, 0]] * 3  # straddle PyTC's cut int(255 * 0.5) = 127
    sides = assign_sides(labels, raw, "nonexclusive", 0.5)
    # PyTC polarity2instance: temp = volume > int(255 * thres); pre = temp[0] & temp[2].
    temp = raw > int(255 * 0.5)
    inside = labels != 0
    np.testing.assert_array_equal((sides & SIDE_PRE) != 0, temp[0] & temp[2] & inside)
    np.testing.assert_array_equal((sides & SIDE_POST) != 0, temp[1] & temp[2] & inside)
    # Same decisions on the float scale; scores are reported in [0, 1] either way.
    as_float = raw.astype(np.float64) / 255
    np.testing.assert_array_equal(assign_sides(labels, as_float, "nonexclusive", 0.5), sides)
    a = decode_polarity(labels, raw)
    b = decode_polarity(labels, as_float)
    np.testing.assert_allclose(a["pre_score"], b["pre_score"], rtol=1e-12)
    assert 0.5 < a["pre_score"].iloc[0] <= 1.0


def test_exclusive_mode_argmax_with_ties():
    labels = np.ones((1, 1, 5), np.uint64)
    probs = np.zeros((3, 1, 1, 5), np.float32)
    # channels: background, pre, post
    probs[:, 0, 0, 0] = [0.2, 0.7, 0.1]  # pre
    probs[:, 0, 0, 1] = [0.1, 0.2, 0.7]  # post
    probs[:, 0, 0, 2] = [0.6, 0.3, 0.1]  # background
    probs[:, 0, 0, 3] = [0.4, 0.4, 0.2]  # tie background/pre -> background
    probs[:, 0, 0, 4] = [0.2, 0.4, 0.4]  # tie pre/post -> pre
    sides = assign_sides(labels, probs, "exclusive")
    assert sides[0, 0].tolist() == [1, 2, 0, 0, 1]
    r = decode_polarity(labels, probs, "exclusive").iloc[0]
    assert r["pre_count"] == 2 and r["post_count"] == 1
    assert r["pre_x"] == 2.0 and r["post_x"] == 1.0
    np.testing.assert_allclose(r["pre_score"], (0.7 + 0.4) / 2, rtol=1e-6)  # channel 1
    np.testing.assert_allclose(r["post_score"], 0.7, rtol=1e-6)            # channel 2


def test_blockwise_partial_sums_merge_to_whole_volume():
    rng = np.random.default_rng(5)
    shape = (13, 17, 11)
    labels = np.zeros(shape, np.uint64)
    labels[2:11, 3:15, 1:10] = 7   # crosses every block boundary
    labels[0:3, 0:2, 0:2] = 2
    labels[12, 16, 10] = 5         # a corner voxel in the last block
    probs = rng.integers(0, 256, (3,) + shape).astype(np.uint8)
    whole = decode_polarity(labels, probs)
    for block in [(4, 5, 6), (13, 17, 11), (1, 17, 3)]:
        frames = []
        for begin in itertools.product(*(range(0, n, b) for n, b in zip(shape, block))):
            sl = tuple(slice(o, min(o + b, n)) for o, b, n in zip(begin, block, shape))
            frames.append(polarity_stats_block(labels[sl], probs[(slice(None),) + sl], begin))
        merged = merge_polarity_stats(frames[::-1])
        assert merged["id"].tolist() == [2, 5, 7]
        exact = ["voxels", "pre_count", "post_count", "pre_empty", "post_empty"]
        assert merged[exact].equals(whole[exact])
        for col in ["pre_z", "pre_y", "pre_x", "post_z", "post_y", "post_x",
                    "pre_score", "post_score"]:
            np.testing.assert_allclose(merged[col], whole[col], rtol=1e-12, equal_nan=True)
    # Sites agree with a direct computation.
    sides = assign_sides(labels, probs)
    pre7 = np.argwhere((labels == 7) & ((sides & SIDE_PRE) != 0))
    row = whole.set_index("id").loc[7]
    np.testing.assert_allclose([row["pre_z"], row["pre_y"], row["pre_x"]], pre7.mean(0), rtol=1e-12)


def test_empty_input_and_errors():
    labels = np.zeros((2, 2, 2), np.uint64)
    probs = np.zeros((3, 2, 2, 2), np.float32)
    assert len(decode_polarity(labels, probs)) == 0
    assert len(merge_polarity_stats([])) == 0
    with pytest.raises(PostprocessError, match="3, z, y, x"):
        assign_sides(labels, probs[:2])
    with pytest.raises(PostprocessError, match="mode"):
        assign_sides(labels, probs, mode="softmax")
    with pytest.raises(PostprocessError, match="rule"):
        assign_sides(labels, probs, rule="vote")
