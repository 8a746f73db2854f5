"""Blockwise connected components must equal global cc3d exactly (ids included)."""

import itertools

import cc3d
import numpy as np
import pytest

from cc_reference import blockwise_cc_reference, halo_equivalences, label_block, relabel_block
from cleftwise.postprocess.cc_stitch import block_id_offset, resolve
from cleftwise.postprocess.errors import PostprocessError

SHAPE = (19, 23, 21)
BLOCK_SHAPES = [(8, 8, 8), (5, 7, 9), (19, 4, 6), (3, 23, 2), (32, 32, 32)]


def _corners(shape, block_shape):
    return list(itertools.product(*(range(0, n, b) for n, b in zip(shape, block_shape))))


def _region(begin, block_shape, shape):
    return tuple(slice(b, min(b + s, n)) for b, s, n in zip(begin, block_shape, shape))


def _run_shuffled(mask, block_shape, connectivity, rng, side="high", probs=None, **filters):
    """The engine's order of work: pass 1, pass 1b and pass 2 over blocks in random orders."""
    shape = mask.shape
    corners = _corners(shape, block_shape)
    provisional = np.zeros(shape, np.uint64)
    records = []
    for i in rng.permutation(len(corners)):
        begin = corners[i]
        sl = _region(begin, block_shape, shape)
        labels, rec = label_block(mask[sl], begin, connectivity,
                                  block_id_offset(begin, block_shape, shape),
                                  None if probs is None else probs[sl])
        provisional[sl] = labels
        records.append(rec)
    pairs = []
    pad = ((0, 1),) * 3 if side == "high" else ((1, 0),) * 3
    padded = np.pad(provisional, pad)
    for i in rng.permutation(len(corners)):
        sl = _region(corners[i], block_shape, shape)
        core = tuple(s.stop - s.start for s in sl)
        halo = padded[tuple(slice(s.start, s.stop + 1) for s in sl)]
        pairs.append(halo_equivalences(halo, core, connectivity, side=side))
    order = rng.permutation(len(records))
    res = resolve([pairs[i] for i in rng.permutation(len(pairs))],
                  [records[i] for i in order], **filters)
    out = np.zeros(shape, np.uint64)
    for i in rng.permutation(len(corners)):
        sl = _region(corners[i], block_shape, shape)
        out[sl] = relabel_block(provisional[sl], res)
    return out, res


@pytest.mark.parametrize("connectivity", [6, 18, 26])
@pytest.mark.parametrize("density", [0.08, 0.2, 0.35, 0.55])
def test_random_volumes_match_global_cc3d(connectivity, density):
    rng = np.random.default_rng(int(density * 100) + connectivity)
    mask = rng.random(SHAPE) < density
    expected = cc3d.connected_components(mask, connectivity=connectivity).astype(np.uint64)
    assert expected.max() >= 1  # 0.55 percolates into (nearly) one component
    for block_shape in BLOCK_SHAPES:
        out, res = blockwise_cc_reference(mask, block_shape, connectivity)
        assert out.dtype == np.uint64
        # Final ids are numbered by first voxel in raster order, which is cc3d's own order,
        # so the match is exact, not merely up to relabelling; hence identical across blocks.
        np.testing.assert_array_equal(out, expected)
        assert len(res.instances) == expected.max()
        counts = np.bincount(expected.ravel())[1:]
        np.testing.assert_array_equal(res.instances["size"].to_numpy(), counts)


@pytest.mark.parametrize("connectivity", [6, 26])
def test_order_independence_and_low_side_halo(connectivity):
    rng = np.random.default_rng(7)
    mask = rng.random(SHAPE) < 0.3
    expected = cc3d.connected_components(mask, connectivity=connectivity).astype(np.uint64)
    for side in ("high", "low"):
        out, _ = _run_shuffled(mask, (6, 5, 8), connectivity, rng, side=side)
        np.testing.assert_array_equal(out, expected)


def _two_voxels(a, b, shape=(4, 4, 4)):
    m = np.zeros(shape, bool)
    m[a] = True
    m[b] = True
    return m


@pytest.mark.parametrize(
    "a, b, joined_from",
    [
        ((1, 1, 1), (2, 2, 2), 26),  # corner contact across the 8-block corner
        ((1, 2, 1), (2, 1, 2), 26),  # corner contact, offset (1, -1, 1): blocks not face-adjacent
        ((2, 1, 1), (1, 2, 2), 26),  # offset (-1, 1, 1)
        ((1, 1, 0), (2, 2, 0), 18),  # edge contact across the z/y block edge
        ((0, 2, 1), (0, 1, 2), 18),  # edge contact, offset (0, -1, 1)
        ((1, 0, 3), (2, 0, 3), 6),   # face contact across the z face
    ],
)
def test_one_voxel_objects_touching_at_block_edges_and_corners(a, b, joined_from):
    mask = _two_voxels(a, b)
    for connectivity in (6, 18, 26):
        out, res = blockwise_cc_reference(mask, (2, 2, 2), connectivity)
        expected = cc3d.connected_components(mask, connectivity=connectivity)
        np.testing.assert_array_equal(out, expected)
        n = 1 if connectivity >= joined_from else 2
        assert len(res.instances) == n
        assert (out[a] == out[b]) == (n == 1)


def test_diagonal_staircase_chain_through_many_blocks():
    # A 1-voxel staircase stepping (+1, +1, -1): 26-connected only, crossing many blocks.
    shape = (12, 12, 12)
    mask = np.zeros(shape, bool)
    for i in range(12):
        mask[i, i, 11 - i] = True
    for bs in [(2, 2, 2), (3, 5, 4), (1, 3, 2)]:
        out26, res26 = blockwise_cc_reference(mask, bs, 26)
        assert len(res26.instances) == 1 and res26.instances["size"].iloc[0] == 12
        out6, res6 = blockwise_cc_reference(mask, bs, 6)
        assert len(res6.instances) == 12
        np.testing.assert_array_equal(out6, cc3d.connected_components(mask, connectivity=6))


def test_halo_equivalences_hand_made():
    # Core 3x3x3 + high halo: core voxel (2,2,2) has label 5; the halo holds 7 at the far
    # corner (3,3,3), 8 at (3,0,0) and 9 at (0,0,3) (both far from 5).
    arr = np.zeros((4, 4, 4), np.uint64)
    arr[2, 2, 2] = 5
    arr[3, 3, 3] = 7
    arr[3, 0, 0] = 8
    arr[0, 0, 3] = 9
    assert halo_equivalences(arr, (3, 3, 3), 26).tolist() == [[5, 7]]
    assert halo_equivalences(arr, (3, 3, 3), 18).tolist() == []
    assert halo_equivalences(arr, (3, 3, 3), 6).tolist() == []
    arr[2, 2, 3] = 9  # x-face neighbour of 5; also touches 7, but that pair's low corner
    # (2,2,3) lies in the +x block, which reports it, not this one.
    assert halo_equivalences(arr, (3, 3, 3), 6).tolist() == [[5, 9]]
    assert halo_equivalences(arr, (3, 3, 3), 18).tolist() == [[5, 9]]
    assert halo_equivalences(arr, (3, 3, 3), 26).tolist() == [[5, 7], [5, 9]]
    # Halo-to-halo contact between two other blocks (+y block and +z block), whose low
    # corner (2,2,0) lies in this block, is reported here and only here.
    arr2 = np.zeros((4, 4, 4), np.uint64)
    arr2[2, 3, 0] = 8
    arr2[3, 2, 0] = 10
    assert halo_equivalences(arr2, (3, 3, 3), 18).tolist() == [[8, 10]]
    assert halo_equivalences(arr2, (3, 3, 3), 6).tolist() == []
    # The mirror image with a low-side halo gives the same pairs.
    assert halo_equivalences(arr2[::-1, ::-1, ::-1], (3, 3, 3), 18, side="low").tolist() == [[8, 10]]
    with pytest.raises(PostprocessError, match="halo"):
        halo_equivalences(arr, (2, 2, 2), 26)
    with pytest.raises(PostprocessError, match="connectivity"):
        halo_equivalences(arr, (3, 3, 3), 4)


def _blob_volume():
    """An ellipsoid blob centred on the corner shared by 8 blocks of (10, 10, 10), plus noise."""
    shape = (20, 20, 20)
    z, y, x = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    blob = ((z - 9.6) / 4) ** 2 + ((y - 10.2) / 6) ** 2 + ((x - 9.7) / 5) ** 2 <= 1
    rng = np.random.default_rng(3)
    probs = (rng.random(shape) * 0.4 + 0.6 * blob).astype(np.float32)
    return blob, probs


def test_synapse_blob_across_8_blocks_merges_stats():
    blob, probs = _blob_volume()
    out, res = blockwise_cc_reference(blob, (10, 10, 10), 26, probs=probs)
    assert len(res.instances) == 1
    row = res.instances.iloc[0]
    assert row["id"] == 1 and row["n_fragments"] == 8
    zz, yy, xx = np.nonzero(blob)
    assert row["size"] == blob.sum()
    assert (row["z0"], row["y0"], row["x0"]) == (zz.min(), yy.min(), xx.min())
    assert (row["z1"], row["y1"], row["x1"]) == (zz.max() + 1, yy.max() + 1, xx.max() + 1)
    np.testing.assert_allclose([row["centroid_z"], row["centroid_y"], row["centroid_x"]],
                               [zz.mean(), yy.mean(), xx.mean()], rtol=0, atol=1e-12)
    np.testing.assert_allclose(row["prob_mean"], probs[blob].astype(np.float64).mean(), rtol=1e-12)
    assert row["prob_max"] == probs[blob].max()
    first = np.unravel_index(np.flatnonzero(blob)[0], blob.shape)
    assert (row["first_z"], row["first_y"], row["first_x"]) == first
    np.testing.assert_array_equal(out, blob.astype(np.uint64))


def test_size_filter_applies_after_merging():
    blob, probs = _blob_volume()
    mask = blob.copy()
    mask[0:2, 0:2, 0:2] = True   # small object (8 voxels) in one block
    mask[18:20, 0:3, 18:20] = True  # 12 voxels
    n_blob = int(blob.sum())
    # Every blob fragment is below min_size, the merged blob is above it.
    _, res_frag = blockwise_cc_reference(mask, (10, 10, 10), 26)
    frags = n_blob // 8 + 20
    assert frags < n_blob
    out, res = blockwise_cc_reference(mask, (10, 10, 10), 26, min_size=frags)
    assert res.instances["size"].tolist() == [n_blob]
    np.testing.assert_array_equal(out, blob.astype(np.uint64))
    # Filters keep consecutive ids in raster order; max_size removes the blob instead.
    out, res = blockwise_cc_reference(mask, (7, 9, 10), 26, min_size=9, max_size=100)
    assert res.instances["id"].tolist() == [1]
    assert res.instances["size"].tolist() == [12]
    assert out.max() == 1 and (out == 1).sum() == 12
    _, res = blockwise_cc_reference(mask, (10, 10, 10), 26, min_size=1)
    assert res.instances["size"].tolist() == [8, n_blob, 12]
    # Peak-probability filter: only the blob has probabilities above 0.9.
    p = probs.copy()
    p[~blob] = np.minimum(p[~blob], 0.5)
    _, res = blockwise_cc_reference(mask, (10, 10, 10), 26, probs=p, min_peak_prob=0.9)
    assert res.instances["size"].tolist() == [n_blob]


def test_label_block_records_are_global():
    mask = np.zeros((4, 5, 6), bool)
    mask[1, 2, 3:5] = True
    mask[3, 0, 0] = True
    labels, rec = label_block(mask, (10, 20, 30), 26, id_offset=1000)
    assert labels.dtype == np.uint64
    assert sorted(np.unique(labels).tolist()) == [0, 1001, 1002]
    r = rec.set_index("id")
    assert r.loc[1001, ["count", "first_z", "first_y", "first_x"]].tolist() == [2, 11, 22, 33]
    assert r.loc[1001, ["z0", "y0", "x0", "z1", "y1", "x1"]].tolist() == [11, 22, 33, 12, 23, 35]
    assert r.loc[1001, ["sum_z", "sum_y", "sum_x"]].tolist() == [22, 44, 33 + 34]
    assert r.loc[1002, ["first_z", "first_y", "first_x"]].tolist() == [13, 20, 30]
    with pytest.raises(PostprocessError, match="id_stride"):
        label_block(mask, (0, 0, 0), 26, id_offset=0, id_stride=1)


def test_empty_volume():
    mask = np.zeros((6, 7, 8), bool)
    probs = np.zeros(mask.shape, np.float32)
    out, res = blockwise_cc_reference(mask, (4, 4, 4), 26, probs=probs, min_peak_prob=0.5)
    assert out.dtype == np.uint64 and not out.any()
    assert len(res.instances) == 0 and res.provisional_ids.size == 0


def test_block_id_offsets_are_disjoint():
    shape, bs = (19, 23, 21), (5, 7, 9)
    offsets = [block_id_offset(c, bs, shape) for c in _corners(shape, bs)]
    stride = int(np.prod(bs))
    assert sorted(offsets) == [i * stride for i in range(len(offsets))]
    with pytest.raises(PostprocessError, match="block corner"):
        block_id_offset((1, 0, 0), bs, shape)


def test_errors_name_the_fault():
    mask = np.zeros((4, 4, 4), bool)
    mask[0, 0, 0] = True
    labels, rec = label_block(mask, (0, 0, 0), 26, id_offset=10)
    res = resolve([], [rec])
    assert relabel_block(labels, res).max() == 1
    with pytest.raises(PostprocessError, match="99"):
        relabel_block(labels + np.uint64(88) * (labels > 0), res)
    with pytest.raises(PostprocessError, match="without a record"):
        resolve(np.array([[11, 12]], np.uint64), [rec])
    with pytest.raises(PostprocessError, match="more than one record"):
        resolve([], [rec, rec])
    with pytest.raises(PostprocessError, match="no final id"):
        relabel_block(labels, {0: 0})
    with pytest.raises(PostprocessError, match="min_peak_prob"):
        resolve([], [rec], min_peak_prob=0.5)
    with pytest.raises(PostprocessError, match="connectivity"):
        label_block(mask, (0, 0, 0), 8)


@pytest.mark.parametrize("block_shape", [(4, 5, 6), (19, 4, 6), (3, 23, 2), (1, 7, 7)])
def test_pairs_from_stored_faces_equal_pairs_from_dense_halo(block_shape):
    """Pass 1b from the sparse boundary faces = pass 1b from the dense +1 halo, incl. clipped
    border blocks (19 = 4 * 4 + 3) and 1-voxel-thick blocks."""
    from cleftwise.postprocess.cc_stitch import block_faces, face_equivalences

    rng = np.random.default_rng(sum(block_shape))
    mask = rng.random(SHAPE) < 0.3
    faces, provisional = {}, np.zeros(SHAPE, np.uint64)
    corners = _corners(SHAPE, block_shape)
    for begin in corners:
        sl = _region(begin, block_shape, SHAPE)
        offset = block_id_offset(begin, block_shape, SHAPE)
        labels, _ = label_block(mask[sl], begin, 26, id_offset=offset)
        provisional[sl] = labels
        local = np.where(labels > 0, labels - np.uint64(offset), 0)
        faces[begin] = block_faces(local, offset)
    padded = np.pad(provisional, ((0, 1),) * 3)
    total = 0
    for begin in corners:
        sl = _region(begin, block_shape, SHAPE)
        core = tuple(s.stop - s.start for s in sl)
        dense = halo_equivalences(padded[tuple(slice(s.start, s.stop + 1) for s in sl)], core, 26)
        near = [c for c in corners if all(0 <= c[a] - begin[a] <= block_shape[a] for a in range(3))]
        from_faces = face_equivalences(begin, core, [(c, faces[c]) for c in near], 26)
        np.testing.assert_array_equal(from_faces, dense)
        total += len(dense)
    assert total > 0


def test_recomputed_labels_must_match_the_resolution():
    """Pass 2 recomputes each block's labels; a block whose input changed is refused."""
    from cleftwise.postprocess.cc_stitch import local_lut

    mask = np.zeros((4, 8, 8), bool)
    mask[0, 0, 0] = mask[0, 5, 5] = mask[3, 7, 7] = True
    _, rec = label_block(mask, (0, 0, 0), 26, id_offset=100)
    res = resolve([], [rec])
    lut = local_lut(res.provisional_ids, res.final_ids, 100, 3)
    assert lut.tolist() == [0, 1, 2, 3]
    for n in (2, 4):
        with pytest.raises(PostprocessError, match="input changed"):
            local_lut(res.provisional_ids, res.final_ids, 100, n)


@pytest.mark.parametrize("n,k,seed", [(0, 0, 0), (1, 0, 0), (5, 0, 1), (50, 30, 2), (2000, 1500, 3),
                                        (2000, 4000, 4)])
def test_pair_components_equals_scipy(n, k, seed):
    """The array union-find of resolve gives scipy's components, numbered the same way."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from cleftwise.postprocess.cc_stitch import pair_components

    rng = np.random.default_rng(seed)
    pairs = rng.integers(0, max(n, 1), size=(k, 2)) if n else np.zeros((0, 2), np.int64)
    if n > 100:  # plus a long chain in scrambled order (deep merges)
        chain = rng.permutation(n)[:400]
        pairs = np.concatenate([pairs, np.stack([chain[:-1], chain[1:]], 1)])
    n_comp, comp = pair_components(n, pairs)
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    ref_n, ref = connected_components(graph, directed=False) if n else (0, np.zeros(0, int))
    assert n_comp == ref_n
    np.testing.assert_array_equal(comp, ref)


def test_resolve_large_graph_path_gives_the_same_labels(monkeypatch):
    """Above SCIPY_RESOLVE_NODES ids resolve uses scipy's components: same labels as cc3d."""
    import cleftwise.postprocess.cc_stitch as cs

    mask = np.random.default_rng(11).random(SHAPE) < 0.2
    expected = cc3d.connected_components(mask, connectivity=26).astype(np.uint64)
    monkeypatch.setattr(cs, "SCIPY_RESOLVE_NODES", 0)
    out, _ = blockwise_cc_reference(mask, BLOCK_SHAPES[0], 26)
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("pairs", [np.array([[0, 5]]), np.array([[-1, 0]]), np.array([[2**64 - 1, 0]], np.uint64),
                                   np.zeros((2, 3), np.int64), np.array([[0.0, 1.0]])])
def test_pair_components_refuses_bad_pairs(pairs):
    from cleftwise.postprocess.cc_stitch import pair_components

    with pytest.raises(PostprocessError, match="pair_components"):
        pair_components(5, pairs)


def test_apply_lut_refuses_a_bad_out_buffer():
    from cleftwise.postprocess.cc_stitch import apply_lut

    local = np.zeros((2, 3, 4), np.uint32)
    lut = np.zeros(1, np.uint64)
    for out in (np.zeros((2, 3, 4), np.uint64, order="F"), np.zeros((2, 3, 4), np.int64),
                np.zeros((2, 3, 5), np.uint64)):
        with pytest.raises(PostprocessError, match="apply_lut"):
            apply_lut(lut, local, local != 0, out=out)


@pytest.mark.parametrize("fraction", [0.02, 0.6])
def test_apply_lut_equals_full_gather_sparse_and_dense(fraction):
    """The foreground-only gather of pass 2 equals ``lut[local]``, also into a reused buffer
    that still holds the previous block's labels."""
    import cc3d

    from cleftwise.postprocess.cc_stitch import apply_lut

    rng = np.random.default_rng(3)
    mask = rng.random((6, 20, 24)) < fraction
    local, n = cc3d.connected_components(mask, connectivity=6, return_N=True)
    lut = np.zeros(n + 1, np.uint64)
    lut[1:] = rng.permutation(n).astype(np.uint64) + np.uint64(2**40)
    lut[1::3] = 0  # filtered instances
    stale = np.full(local.shape, 7, np.uint64)
    got = apply_lut(lut, local, mask, out=stale)
    assert got is stale
    np.testing.assert_array_equal(got, lut[local])
    np.testing.assert_array_equal(apply_lut(lut, local), lut[local])


@pytest.mark.parametrize("threshold", [0.0, 0.25, 0.4, 0.5, 0.5019607843137255, 0.999, 1.0])
def test_union_mask_on_uint8_is_value_above_threshold_times_255(threshold):
    from cleftwise.postprocess.cc_stitch import union_mask

    u = np.arange(256, dtype=np.uint8).reshape(4, 8, 8)
    np.testing.assert_array_equal(union_mask(u, threshold), u.astype(np.float64) > threshold * 255.0)
    f = u.astype(np.float32) / 255
    np.testing.assert_array_equal(union_mask(f, threshold), f > threshold)
