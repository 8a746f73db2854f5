"""Partner assignment: majority votes, ties, background, autapses, dilation, blockwise merge."""

import itertools

import numpy as np
import pandas as pd
import pytest

from cleftwise.postprocess.errors import PostprocessError
from cleftwise.postprocess.partners import (
    assign_partners,
    dilation_radius_voxels,
    merge_partner_votes,
    partner_votes_block,
)


def _row(frame, sid):
    return frame.set_index("id").loc[sid]


def test_majority_ties_background_and_autapse():
    labels = np.zeros((1, 4, 6), np.uint64)
    sides = np.zeros(labels.shape, np.uint8)
    neurons = np.zeros(labels.shape, np.uint64)
    # Synapse 1: pre side votes 10,10,11,0 -> 10 (2/3); post votes 20,21 -> tie -> 20.
    labels[0, 0, :6] = 1
    sides[0, 0, :6] = [1, 1, 1, 1, 2, 2]
    neurons[0, 0, :6] = [10, 10, 11, 0, 21, 20]
    # Synapse 2: pre on neuron 30, post on background only.
    labels[0, 1, :3] = 2
    sides[0, 1, :3] = [1, 2, 2]
    neurons[0, 1, :3] = [30, 0, 0]
    # Synapse 3: both sides on neuron 40 (autapse); one voxel is both pre and post.
    labels[0, 2, :3] = 3
    sides[0, 2, :3] = [1, 3, 2]
    neurons[0, 2, :3] = [40, 40, 40]
    # Synapse 4: no side voxels at all.
    labels[0, 3, 0] = 4
    neurons[0, 3, 0] = 50
    res = assign_partners(labels, sides, neurons)
    assert res["id"].tolist() == [1, 2, 3, 4]
    r = _row(res, 1)
    assert (r["pre_neuron"], r["pre_votes"], r["pre_background_votes"]) == (10, 3, 1)
    assert r["pre_confidence"] == pytest.approx(2 / 3) and not r["pre_tie"]
    assert (r["post_neuron"], r["post_confidence"], r["post_tie"]) == (20, 0.5, True)
    assert not r["autapse"] and not r["pre_background"] and not r["post_background"]
    r = _row(res, 2)
    assert r["pre_neuron"] == 30 and r["post_neuron"] == 0
    assert r["post_background"] and r["post_background_votes"] == 2 and r["post_confidence"] == 0
    assert not r["autapse"]
    r = _row(res, 3)
    assert r["autapse"] and r["pre_neuron"] == r["post_neuron"] == 40
    assert (r["pre_votes"], r["post_votes"]) == (2, 2)
    r = _row(res, 4)
    assert r["pre_background"] and r["post_background"] and not r["autapse"]
    assert res["pre_neuron"].dtype == np.uint64


def test_dilation_reaches_past_the_cleft_anisotropically():
    # A two-voxel-thick cleft: pre side at y = 5, post side at y = 6, both x = 2..6, z = 2.
    # Pre neuron at y <= 3, post neuron at y >= 8; y = 4 and y = 7 are background, so only
    # dilation finds the partners.
    shape = (5, 12, 9)
    vs = (40.0, 8.0, 8.0)
    labels = np.zeros(shape, np.uint64)
    sides = np.zeros(shape, np.uint8)
    neurons = np.zeros(shape, np.uint64)
    labels[2, 5:7, 2:7] = 1
    sides[2, 5, 2:7] = 1
    sides[2, 6, 2:7] = 2
    neurons[:, :4] = 100
    neurons[:, 8:] = 200
    r = _row(assign_partners(labels, sides, neurons, vs, dilate_nm=0.0), 1)
    assert r["pre_background"] and r["post_background"]
    assert (r["pre_background_votes"], r["post_background_votes"]) == (5, 5)
    # 16 nm = 2 voxels in y/x but 0 in z (40 nm voxels).
    assert dilation_radius_voxels(16.0, vs) == (0, 2, 2)
    r = _row(assign_partners(labels, sides, neurons, vs, dilate_nm=16.0), 1)
    assert (r["pre_neuron"], r["post_neuron"]) == (100, 200)
    assert r["pre_confidence"] == 1.0 and r["post_confidence"] == 1.0
    # Within 2 voxels in-plane, only row y = 3 (dy = 2, dx = 0) of the pre neuron is reached:
    # x = 2..6, five votes; likewise row y = 8 for the post side.
    assert (r["pre_votes"], r["post_votes"]) == (5, 5)
    # 40 nm reaches one z plane up and down and five voxels in-plane: more votes, and the
    # far neuron now gets some too, but the near one still wins.
    assert dilation_radius_voxels(40.0, vs) == (1, 5, 5)
    r40 = _row(assign_partners(labels, sides, neurons, vs, dilate_nm=40.0), 1)
    assert (r40["pre_neuron"], r40["post_neuron"]) == (100, 200)
    assert r40["pre_votes"] > 5 and 0.5 < r40["pre_confidence"] < 1.0
    # Nearby synapses are dilated independently: a second synapse does not steal votes.
    labels2, sides2 = labels.copy(), sides.copy()
    labels2[2, 4, 2:5] = 2
    sides2[2, 4, 2:5] = 1
    res2 = assign_partners(labels2, sides2, neurons, vs, dilate_nm=16.0)
    assert _row(res2, 1)["pre_votes"] == r["pre_votes"]
    assert _row(res2, 2)["pre_neuron"] == 100


def test_blockwise_votes_merge_to_whole_volume():
    rng = np.random.default_rng(11)
    shape = (9, 20, 18)
    vs = (30.0, 10.0, 10.0)
    labels = np.zeros(shape, np.uint64)
    labels[2:7, 4:16, 3:15] = 5
    labels[0:2, 0:5, 12:18] = 8
    labels[8, 19, 17] = 9
    labels[(rng.random(shape) < 0.1) & (labels == 0)] = 12
    sides = rng.integers(0, 4, shape).astype(np.uint8) * (labels > 0)
    neurons = rng.integers(0, 4, shape).astype(np.uint64) * 1000
    dilate = 25.0
    whole = assign_partners(labels, sides, neurons, vs, dilate)
    r = dilation_radius_voxels(dilate, vs)
    pad = [(ri, ri) for ri in r]
    L, S, N = np.pad(labels, pad), np.pad(sides, pad), np.pad(neurons, pad)
    for block in [(4, 7, 5), (9, 20, 18), (2, 3, 18)]:
        frames = []
        for begin in itertools.product(*(range(0, n, b) for n, b in zip(shape, block))):
            # Read the write region grown by the radius (the padded arrays put the volume
            # at offset r, so the grown region starts at `begin` there).
            end = [min(o + b, n) for o, b, n in zip(begin, block, shape)]
            sl = tuple(slice(o, e + 2 * ri) for o, e, ri in zip(begin, end, r))
            frames.append(partner_votes_block(L[sl], S[sl], N[sl], vs, dilate, context=r))
        merged = merge_partner_votes(frames, instance_ids=[5, 8, 9, 12])
        assert merged.equals(whole)


def test_votes_need_enough_context():
    a = np.zeros((5, 5, 5), np.uint64)
    with pytest.raises(PostprocessError, match="dilation radius"):
        partner_votes_block(a, a.astype(np.uint8), a, (10, 10, 10), 20.0, context=(1, 1, 1))
    with pytest.raises(PostprocessError, match="shapes"):
        partner_votes_block(a, a[:4].astype(np.uint8), a)
    with pytest.raises(PostprocessError, match="side values"):
        merge_partner_votes(pd.DataFrame({"id": [1], "side": [3], "neuron": [2], "count": [1]}))


def test_contrast_rule_separates_a_blurry_pre_side_from_its_post_neuron():
    labels = np.zeros((1, 3, 17), np.uint64)
    sides = np.zeros(labels.shape, np.uint8)
    neurons = np.zeros(labels.shape, np.uint64)
    # Synapse 1: bouton 7 (3 pre, 1 post), large post neuron 9 (5 pre, 7 post), stray neuron 11 (1 pre).
    labels[0, 0, :] = 1
    neurons[0, 0, :] = [7] * 4 + [9] * 12 + [11]
    sides[0, 0, :] = [1, 1, 1, 2] + [1] * 5 + [2] * 7 + [1]
    # Synapse 2: a single neuron: both rules call it an autapse.
    labels[0, 1, :4] = 2
    neurons[0, 1, :4] = 5
    sides[0, 1, :4] = [1, 1, 2, 2]
    # Synapse 3: a sharp prediction: both rules agree.
    labels[0, 2, :6] = 3
    neurons[0, 2, :6] = [3, 3, 3, 4, 4, 4]
    sides[0, 2, :6] = [1, 1, 1, 2, 2, 2]
    votes = partner_votes_block(labels, sides, neurons, (1, 1, 1), 0.0, context=(0, 0, 0))
    major = merge_partner_votes(votes).set_index("id")
    assert (major.loc[1, "pre_neuron"], major.loc[1, "post_neuron"]) == (9, 9) and major.loc[1, "autapse"]
    contrast = merge_partner_votes(votes, rule="contrast", min_fraction=0.1).set_index("id")
    r = contrast.loc[1]
    assert (r["pre_neuron"], r["post_neuron"]) == (7, 9) and not r["autapse"]
    assert r["pre_confidence"] == pytest.approx(3 / 9) and r["post_confidence"] == pytest.approx(7 / 8)
    # the rule weighs vote surpluses, not fractions: even without the share threshold the
    # 1-voxel stray neuron (all pre, surplus 1) does not beat the bouton (3 pre, 1 post, surplus 2)
    loose = merge_partner_votes(votes, rule="contrast", min_fraction=0.0).set_index("id")
    assert (loose.loc[1, "pre_neuron"], loose.loc[1, "post_neuron"]) == (7, 9)
    # a sliver of a neighbour with a few all-post votes does not beat the post neuron that holds
    # thousands of mostly-post votes (a fraction rule picked the sliver: post 1.0 vs 0.82)
    sliver = pd.DataFrame({"id": [4] * 5, "side": [1, 2, 1, 2, 2],
                           "neuron": [20, 20, 30, 30, 40], "count": [6645, 823, 2225, 10201, 1223]})
    r = merge_partner_votes(sliver, rule="contrast").set_index("id").loc[4]
    assert (r["pre_neuron"], r["post_neuron"]) == (20, 30)
    assert r["post_confidence"] == pytest.approx(10201 / (823 + 10201 + 1223))
    assert contrast.loc[2, "autapse"] and contrast.loc[2, "pre_neuron"] == 5
    for col in ("pre_neuron", "post_neuron", "autapse"):
        assert contrast.loc[3, col] == major.loc[3, col]
    assert (contrast.loc[3, "pre_neuron"], contrast.loc[3, "post_neuron"]) == (3, 4)
    with pytest.raises(PostprocessError, match="partner rule"):
        merge_partner_votes(votes, rule="vote")


def test_neuron_fraction_is_the_largest_share_of_pre_plus_post_votes():
    votes = pd.DataFrame({"id": np.array([1, 1, 1, 2, 2, 3], np.uint64),
                          "side": np.array([1, 2, 2, 1, 2, 1], np.uint8),
                          "neuron": np.array([5, 6, 5, 8, 8, 0], np.uint64),
                          "count": np.array([30, 60, 10, 40, 40, 9], np.int64)})
    out = merge_partner_votes(votes).set_index("id")
    assert out.loc[1, "neuron_fraction"] == pytest.approx(0.6)   # 60 of 100 on neuron 6
    assert out.loc[2, "neuron_fraction"] == pytest.approx(1.0)   # all on neuron 8
    assert out.loc[3, "neuron_fraction"] == 0.0                  # background only
