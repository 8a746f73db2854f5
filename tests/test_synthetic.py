"""Synthetic EM generator: determinism, blockwise identity, ground-truth consistency, memory."""

import os
import tracemalloc

import numpy as np
import pandas as pd
import pytest

from cleftwise.storage.errors import StorageError
from cleftwise.storage.synthetic import (
    DATASETS, TABLE_COLUMNS, SyntheticConfig, generate_arrays, generate_block, generate_volume,
    read_synapse_table,
)
from cleftwise.storage.synthetic.geometry import (
    SynapseTiles, WarpField, capsule_distance, grouped_candidates, neuron_margin_nm,
    neurons_in_box, scaled_distances, synapse_neuron_margin_nm, synapses_in_box, vesicles_of,
)
from cleftwise.storage.volume import open_volume


@pytest.fixture(scope="module")
def small():
    """A 32 x 320 x 320 volume (1.28 x 1.28 x 1.28 um) rendered in 4 x 4 blocks."""
    cfg = SyntheticConfig(shape=(32, 320, 320), block_shape=(16, 160, 160), seed=3)
    return cfg, generate_arrays(cfg)


def test_config_validation():
    with pytest.raises(StorageError, match="voxel_size"):
        SyntheticConfig(voxel_size=(40, 4))
    with pytest.raises(StorageError, match="e_fraction"):
        SyntheticConfig(e_fraction=1.5)
    with pytest.raises(StorageError, match="offset"):
        SyntheticConfig(offset=(10, 0, 0))
    with pytest.raises(StorageError, match="low"):
        SyntheticConfig(synapse_radius_nm=(300, 100))
    with pytest.raises(StorageError, match="post_band_nm"):
        SyntheticConfig(post_band_nm=10)


def test_one_block_equals_many_blocks():
    cfg = SyntheticConfig(shape=(12, 150, 170), block_shape=(12, 150, 170), seed=5)
    one = generate_arrays(cfg)
    many = generate_arrays(cfg.replace(block_shape=(5, 80, 96)))   # odd, unaligned blocks
    for name in DATASETS:
        assert one[name].dtype == np.dtype(DATASETS[name])
        assert np.array_equal(one[name], many[name]), name
    pd.testing.assert_frame_equal(one["table"], many["table"])
    # and any box cut out of the volume renders the same on its own
    box = generate_block(cfg, (3, 40, 77), (4, 50, 60))
    sl = (slice(3, 7), slice(40, 90), slice(77, 137))
    for name in DATASETS:
        ref = one[name][(slice(None),) + sl] if name == "polarity" else one[name][sl]
        assert np.array_equal(box[name], ref), name


def test_same_seed_same_bytes_different_seed_differs():
    cfg = SyntheticConfig(shape=(4, 96, 96), seed=11)
    a = generate_block(cfg, (0, 0, 0), cfg.shape)
    b = generate_block(cfg, (0, 0, 0), cfg.shape)
    c = generate_block(cfg.replace(seed=12), (0, 0, 0), cfg.shape)
    for name in DATASETS:
        assert np.array_equal(a[name], b[name])
    assert not np.array_equal(a["raw"], c["raw"])
    assert not np.array_equal(a["neurons"], c["neurons"])


def test_image_statistics(small):
    cfg, arr = small
    raw, neurons = arr["raw"], arr["neurons"]
    assert raw.dtype == np.uint8 and 100 < raw.mean() < 200 and raw.std() > 15
    assert neurons.min() > 0                              # every voxel has a neuron
    # membranes are dark: voxels at a label boundary are darker than cell interiors
    edge = np.zeros(neurons.shape, bool)
    edge[:, 1:] |= neurons[:, 1:] != neurons[:, :-1]
    edge[:, :, 1:] |= neurons[:, :, 1:] != neurons[:, :, :-1]
    assert raw[edge].mean() < raw[~edge].mean() - 20
    # sections differ in brightness a little (per-section gain/offset)
    assert np.ptp(raw.reshape(raw.shape[0], -1).mean(1)) > 1.0


def test_synapse_ground_truth(small):
    cfg, arr = small
    syn, pol, cleft, neurons, table = (arr["synapses"], arr["polarity"], arr["cleft"],
                                       arr["neurons"], arr["table"])
    assert list(table.columns) == TABLE_COLUMNS
    ids = np.unique(syn[syn > 0])
    assert len(ids) >= 3
    assert np.array_equal(np.sort(table.id.to_numpy()), ids)
    pre, post, union = pol[0] > 0, pol[1] > 0, pol[2] > 0
    assert np.array_equal(union, syn > 0)
    assert np.array_equal(union, pre | post) and not (pre & post).any()
    assert not (cleft.astype(bool) & ~union).any()
    vs = np.asarray(cfg.voxel_size, float)
    for row in table.itertuples():
        m = syn == row.id
        assert row.pre_neuron != row.post_neuron
        assert row.size == m.sum()
        # every pre-side voxel lies in the presynaptic neuron, every post-side voxel in the
        # postsynaptic one, and both sides are present somewhere
        assert (neurons[m & pre] == row.pre_neuron).all()
        assert (neurons[m & post] == row.post_neuron).all()
        assert ((neurons[m] == row.pre_neuron) == pre[m]).all()
        # the centroid in the table is the centroid of the label's voxels
        c = np.argwhere(m).mean(0) * vs + np.asarray(cfg.offset)
        assert np.all(np.abs(c - [row.centroid_z, row.centroid_y, row.centroid_x]) < 1e-6 * vs + 1e-6)
        if (m & pre).any() and (m & post).any():
            # the two sides touch (6-neighbourhood) across the shared membrane
            a, b = m & pre, m & post
            touch = any((a[tuple(slice(1, None) if i == ax else slice(None) for i in range(3))] &
                         b[tuple(slice(None, -1) if i == ax else slice(None) for i in range(3))]).any() or
                        (b[tuple(slice(1, None) if i == ax else slice(None) for i in range(3))] &
                         a[tuple(slice(None, -1) if i == ax else slice(None) for i in range(3))]).any()
                        for ax in range(3))
            assert touch, row.id
        # the sites lie on their side of the cleft, inside the right neuron
        for site, nid in (((row.pre_site_z, row.pre_site_y, row.pre_site_x), row.pre_neuron),
                          ((row.post_site_z, row.post_site_y, row.post_site_x), row.post_neuron)):
            idx = np.round((np.asarray(site) - cfg.offset) / vs).astype(int)
            if np.all(idx >= 0) and np.all(idx < cfg.shape):
                assert neurons[tuple(idx)] == nid
    # a cleft lies at every synapse that shows both sides
    assert all(cleft[syn == i].any() for i in ids if (pre[syn == i].any() and post[syn == i].any()))


def test_dale_principle_and_neuron_table(small):
    _, arr = small
    table, ntab = arr["table"], arr["neuron_table"]
    classes = table.groupby("pre_neuron").ei_label.nunique()
    assert (classes == 1).all()
    nt = ntab.set_index("id")
    for row in table.itertuples():
        assert nt.loc[row.pre_neuron, "kind"] == "axon"
        assert nt.loc[row.pre_neuron, "ei_label"] == row.ei_label
        assert nt.loc[row.post_neuron, "kind"] == "dendrite"
    counts = np.unique(arr["neurons"], return_counts=True)
    assert np.array_equal(nt.loc[counts[0], "size"].to_numpy(), counts[1])


def test_default_volume_synapse_density_and_classes():
    """The default 64 x 512 x 512 volume at 40 x 4 x 4 nm: 20-60 synapses, several per
    presynaptic neuron, mostly excitatory; E and I carry their ultrastructural cues."""
    cfg = SyntheticConfig()
    warp = WarpField.from_config(cfg)
    ext = np.asarray(cfg.shape) * np.asarray(cfg.voxel_size, float)
    m = synapse_neuron_margin_nm(cfg)
    nr = neurons_in_box(cfg, -m + 0 * ext, ext + m)
    syn = synapses_in_box(cfg, nr, np.zeros(3), ext, warp)
    assert 20 <= len(syn) <= 60
    per_pre = np.unique(syn.pre_id, return_counts=True)[1]
    assert per_pre.mean() >= 2.0 and per_pre.max() >= 4
    assert 0 < syn.exc.mean() < 1                         # both classes present
    # E/I is a neuron property drawn with e_fraction: check it over many axon neurons
    big = neurons_in_box(cfg, np.zeros(3), np.full(3, 12000.0))
    ax_ids, first = np.unique(big.ids[big.is_axon], return_index=True)
    assert abs(big.is_exc[big.is_axon][first].mean() - cfg.e_fraction) < 0.06
    ves = vesicles_of(cfg, syn, nr, warp)
    exc = syn.exc[np.searchsorted(syn.ids, ves.synapse_id)]
    d_e, d_i = 2 * ves.radii[exc, 0], 2 * ves.radii[~exc, 0]
    assert d_e.min() >= cfg.vesicle_diameter_e_nm[0] - 1e-9
    assert d_i.max() <= cfg.vesicle_diameter_i_nm[1] + 1e-9
    flat_i = ves.radii[~exc, 2] / ves.radii[~exc, 0]
    assert np.allclose(flat_i, cfg.vesicle_flattening_i) and np.allclose(ves.radii[exc, 2], ves.radii[exc, 0])
    assert cfg.psd_thickness_e_nm > 2 * cfg.psd_thickness_i_nm
    # vesicles lie inside their presynaptic neurite: scaled distance to its capsule is the
    # smallest among all capsules at the (warped) vesicle centre
    cw = ves.center + warp.at_points(ves.center)
    d = scaled_distances(cw, nr)
    si = np.searchsorted(syn.ids, ves.synapse_id)
    assert np.array_equal(nr.ids[np.argmin(d, axis=1)], syn.pre_id[si])


def test_synapse_tiles_match_direct_computation():
    """Cached per-tile synapses equal a direct computation over an arbitrary box."""
    cfg = SyntheticConfig(seed=7, synapse_tile_nm=800.0)
    lo, hi = np.array([300.0, -500.0, 700.0]), np.array([1500.0, 900.0, 2000.0])
    tiles = SynapseTiles(cfg, max_tiles=3)                   # tiny cache: forces recomputation
    a, _ = tiles.query(lo, hi)
    m = synapse_neuron_margin_nm(cfg)
    b = synapses_in_box(cfg, neurons_in_box(cfg, lo - m, hi + m), lo, hi)
    assert len(a) > 0 and np.array_equal(a.ids, b.ids)
    assert np.allclose(a.center, b.center) and np.array_equal(a.pre_id, b.pre_id)


def test_candidate_culling_is_exact():
    """The culled candidate lists always contain the nearest capsule and the nearest one of
    another neuron id (brute force over every capsule)."""
    cfg = SyntheticConfig(seed=2)
    rng = np.random.default_rng(0)
    pts = rng.uniform([0, 0, 0], [2000, 2000, 2000], (400, 3))
    m = neuron_margin_nm(cfg)
    nr = neurons_in_box(cfg, pts.min(0) - m, pts.max(0) + m)
    cand = grouped_candidates(pts, nr, np.arange(len(nr)), 60.0, slack=30.0)
    d = scaled_distances(pts, nr)
    for i in range(len(pts)):
        j1 = np.argmin(d[i])
        f2 = np.min(np.where(nr.ids == nr.ids[j1], np.inf, d[i]))
        need = set(np.flatnonzero(d[i] <= f2 + 30.0).tolist())
        assert need <= set(cand[i].tolist())
    # capsule distance: zero on the segment, Euclidean off it
    p = np.array([[0.0, 0.0, 5.0], [0.0, 3.0, 0.0]])
    dist = capsule_distance(p, np.zeros((2, 3)), np.array([[0.0, 0.0, 1.0]] * 2), np.array([10.0, 10.0]))
    assert np.allclose(dist, [0.0, 3.0])


def test_generate_volume_writes_container(tmp_path):
    cfg = SyntheticConfig(shape=(8, 128, 160), block_shape=(8, 64, 64), chunk_shape=(8, 64, 64),
                          offset=(80, 400, 0), seed=4)
    res = generate_volume(cfg, str(tmp_path / "s.zarr"))
    ref = generate_arrays(cfg)
    for name in DATASETS:
        vol = open_volume(res.datasets[name])
        assert tuple(vol.voxel_size) == cfg.voxel_size and tuple(vol.offset) == cfg.offset
        assert np.array_equal(vol.read(), ref[name]), name
    assert open_volume(res.datasets["polarity"]).num_channels == 3
    tab = read_synapse_table(res.path)
    pd.testing.assert_frame_equal(tab, ref["table"])
    csv = pd.read_csv(res.table_csv)
    assert list(csv.columns) == TABLE_COLUMNS and len(csv) == len(tab)
    assert os.path.exists(res.neuron_csv)
    with pytest.raises(StorageError, match="exists"):
        generate_volume(cfg, str(tmp_path / "s.zarr"))


def test_memory_bounded_by_block(tmp_path):
    """Peak traced allocation does not grow with the volume: a volume of 12 blocks peaks
    like one of 2 blocks (the rest is a fixed per-block and per-synapse-tile working set)."""
    block = (8, 96, 96)

    def peak(shape, name):
        cfg = SyntheticConfig(shape=shape, block_shape=block, chunk_shape=block, seed=9)
        tracemalloc.start()
        generate_volume(cfg, str(tmp_path / name))
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    small_peak = peak((8, 96, 192), "a.zarr")            # 2 blocks
    big_peak = peak((16, 288, 192), "b.zarr")             # 12 blocks, 6x the voxels
    assert big_peak < 1.25 * small_peak + 4e6


def test_cli_writes_volume_and_montage(tmp_path):
    from cleftwise.launch.make_synthetic import main

    png = tmp_path / "m.png"
    rc = main(["--out", str(tmp_path / "c.zarr"), "--shape", "8", "96", "128", "--seed", "2",
               "--block", "8", "64", "64", "--montage", str(png)])
    assert rc == 0 and png.stat().st_size > 10_000
    assert main(["--out", str(tmp_path / "c.zarr"), "--shape", "8", "96", "128"]) == 2
