"""Training targets, patch sampling (rejection rate, on-the-fly targets) and augmentation."""

import numpy as np
import pytest
from funlib.geometry import Roi

from cleftwise.storage.volume import create_volume
from cleftwise.train.augment import (AugmentConfig, apply_geometric, augment_patch, crop_misaligned,
                           geometric_params, missing_sections)
from cleftwise.train.data import DataConfig, PatchDataset, RejectConfig, VolumeSpec, open_sources
from cleftwise.train.errors import TrainError
from cleftwise.train.targets import (cleft_target, dilation_context, polarity_to_exclusive, seg_to_polarity,
                           sides_from_partners)

VS = (40, 4, 4)


# -- targets ------------------------------------------------------------------------------------

def _prepost_volume():
    """Two synapses in PyTC pre/post labelling: synapse 1 = ids 1 (pre) / 2 (post), 2 = 3 / 4."""
    lab = np.zeros((2, 4, 6), np.uint32)
    lab[0, 1, 0:2] = 1
    lab[0, 1, 2:4] = 2
    lab[1, 2:4, 3] = 3
    lab[1, 2:4, 4] = 4
    return lab


def test_seg_to_polarity_prepost_nonexclusive_exact():
    lab = _prepost_volume()
    pol = seg_to_polarity(lab)
    assert pol.shape == (3, 2, 4, 6) and pol.dtype == np.uint8
    pre = np.zeros(lab.shape, bool)
    pre[0, 1, 0:2] = True
    pre[1, 2:4, 3] = True
    post = np.zeros(lab.shape, bool)
    post[0, 1, 2:4] = True
    post[1, 2:4, 4] = True
    np.testing.assert_array_equal(pol[0], pre)
    np.testing.assert_array_equal(pol[1], post)
    np.testing.assert_array_equal(pol[2], pre | post)


def test_seg_to_polarity_prepost_exclusive_exact():
    lab = _prepost_volume()
    ex = seg_to_polarity(lab, exclusive=True)
    expected = np.zeros(lab.shape, np.uint8)
    expected[lab % 2 == 1] = 1
    expected[(lab % 2 == 0) & (lab > 0)] = 2
    assert ex.shape == lab.shape
    np.testing.assert_array_equal(ex, expected)
    np.testing.assert_array_equal(polarity_to_exclusive(seg_to_polarity(lab)), expected)


def test_seg_to_polarity_with_sides_both_and_neither():
    syn = np.array([[[0, 5, 5, 5, 5, 7]]], np.uint64)
    sides = np.array([[[1, 1, 2, 3, 0, 2]]], np.uint8)   # voxel 0 is background: ignored
    pol = seg_to_polarity(syn, sides)
    assert pol[:, 0, 0].tolist() == [[0, 1, 0, 1, 0, 0],
                                     [0, 0, 1, 1, 0, 1],
                                     [0, 1, 1, 1, 1, 1]]
    assert seg_to_polarity(syn, sides, exclusive=True, both="pre")[0, 0].tolist() == [0, 1, 2, 1, 0, 2]
    assert seg_to_polarity(syn, sides, exclusive=True, both="post")[0, 0].tolist() == [0, 1, 2, 2, 0, 2]
    with pytest.raises(TrainError, match="sides shape"):
        seg_to_polarity(syn, sides[..., :3])
    with pytest.raises(TrainError, match="integer"):
        seg_to_polarity(syn.astype(np.float32))


def test_sides_from_partners_matches_neurons():
    syn = np.array([[[0, 1, 1, 1, 2, 2]]], np.uint64)
    neu = np.array([[[9, 10, 11, 12, 10, 12]]], np.uint64)
    sides = sides_from_partners(syn, neu, {1: 10, 2: 12}, {1: 11, 2: 12})
    # synapse 1: 10 pre, 11 post, 12 neither; synapse 2: 10 neither, 12 both (autapse)
    assert sides[0, 0].tolist() == [0, 1, 2, 0, 0, 3]


def test_cleft_target_dilation_is_an_anisotropic_ball():
    lab = np.zeros((7, 31, 31), np.uint8)
    lab[3, 15, 15] = 1
    assert dilation_context(40, VS) == (1, 10, 10)
    out = cleft_target(lab, dilation_nm=40, voxel_size=VS)
    z, y, x = np.meshgrid(*(np.arange(n) for n in lab.shape), indexing="ij")
    d2 = ((z - 3) * 40.0) ** 2 + ((y - 15) * 4.0) ** 2 + ((x - 15) * 4.0) ** 2
    np.testing.assert_array_equal(out, (d2 <= 40.0 ** 2).astype(np.uint8))
    assert out[2, 15, 15] == 1 and out[2, 15, 16] == 0   # reaches the next section only on axis
    np.testing.assert_array_equal(cleft_target(lab * 7), lab)  # ids → 0/1, no dilation
    with pytest.raises(TrainError, match=">= 0"):
        cleft_target(lab, dilation_nm=-1)


# -- sampling -------------------------------------------------------------------------------------

def _write(path, array, voxel_size=VS, channels=None, offset=(0, 0, 0)):
    shape = array.shape[-3:]
    vol = create_volume(path, shape=shape, voxel_size=voxel_size, offset=offset, dtype=array.dtype,
                        num_channels=channels, overwrite=True, chunk_shape=shape)
    vol.write(vol.roi, array)
    return path


def _fg_fraction(union: np.ndarray, patch, threshold: int) -> float:
    """Exact fraction of patch positions holding >= threshold foreground voxels (integral image)."""
    c = np.pad(union.astype(np.int64), ((1, 0), (1, 0), (1, 0))).cumsum(0).cumsum(1).cumsum(2)
    pz, py, px = patch
    s = (c[pz:, py:, px:] - c[:-pz, py:, px:] - c[pz:, :-py, px:] - c[pz:, py:, :-px]
         + c[:-pz, :-py, px:] + c[:-pz, py:, :-px] + c[pz:, :-py, :-px] - c[:-pz, :-py, :-px])
    return float(np.mean(s >= threshold))


@pytest.fixture(scope="module")
def sparse_volume(tmp_path_factory):
    """Raw + polarity with one synapse-like box in a corner: few patch positions see it."""
    d = tmp_path_factory.mktemp("sparse")
    shape = (8, 64, 64)
    rng = np.random.default_rng(5)
    raw = rng.integers(0, 256, shape, dtype=np.uint8)
    pol = np.zeros((3,) + shape, np.uint8)
    pol[0, 2:6, 4:14, 4:9] = 1
    pol[1, 2:6, 4:14, 9:14] = 1
    pol[2] = pol[0] | pol[1]
    return {"raw": _write(str(d / "v.zarr/raw"), raw), "labels": _write(str(d / "v.zarr/pol"), pol, channels=3),
            "raw_array": raw, "pol_array": pol, "dir": d}


@pytest.mark.parametrize("probability", [0.9, 0.0])
def test_rejection_sampling_rate(sparse_volume, probability):
    patch, threshold = (4, 24, 24), 100
    cfg = DataConfig(patch_shape=patch, reject=RejectConfig(min_foreground=threshold,
                                                            probability=probability, max_tries=200),
                     augment=AugmentConfig(enabled=False))
    spec = VolumeSpec(raw=sparse_volume["raw"], labels=sparse_volume["labels"])
    ds = PatchDataset(open_sources([spec], cfg, "train"), cfg, seed=3, augment=False)
    f = _fg_fraction(sparse_volume["pol_array"][2], patch, threshold)
    assert 0.02 < f < 0.2  # the fixture makes foreground patches rare
    expected = f / (f + (1 - f) * (1 - probability))
    n = 600
    hits = sum(ds.sample(i)["foreground"] >= threshold for i in range(n))
    sigma = np.sqrt(expected * (1 - expected) / n)
    assert abs(hits / n - expected) < 4 * sigma + 0.01, (hits / n, expected)


def test_patch_targets_equal_whole_volume_targets(tmp_path):
    """On-the-fly targets (prepost ids, instances + sides, dilated cleft) equal the crop of the
    whole-volume target at the sampled position; raw is the crop scaled to [0, 1]."""
    rng = np.random.default_rng(0)
    shape = (6, 40, 40)
    raw = rng.integers(0, 256, shape, dtype=np.uint8)
    ids = np.zeros(shape, np.uint32)
    for k in range(1, 9):
        z, y, x = rng.integers(0, 5), rng.integers(0, 32), rng.integers(0, 32)
        ids[z:z + 2, y:y + 6, x:x + 4] = 2 * k - 1
        ids[z:z + 2, y:y + 6, x + 4:x + 8] = 2 * k
    syn = ((ids + 1) // 2).astype(np.uint64)
    sides = np.where(ids == 0, 0, np.where(ids % 2 == 1, 1, 2)).astype(np.uint8)
    r = _write(str(tmp_path / "v.zarr/raw"), raw)
    p = _write(str(tmp_path / "v.zarr/prepost"), ids)
    s = _write(str(tmp_path / "v.zarr/syn"), syn)
    sd = _write(str(tmp_path / "v.zarr/sides"), sides)
    patch = (4, 16, 16)
    cases = [
        ("exclusive", VolumeSpec(raw=r, labels=p, label_format="prepost"), seg_to_polarity(ids, exclusive=True)),
        ("polarity", VolumeSpec(raw=r, labels=s, label_format="instances", sides=sd), seg_to_polarity(ids)),
        ("cleft", VolumeSpec(raw=r, labels=s, label_format="instances"),
         cleft_target(syn, dilation_nm=20, voxel_size=VS)[None]),
    ]
    for target, spec, full in cases:
        for cache in (True, False):
            cfg = DataConfig(patch_shape=patch, target=target, cleft_dilation_nm=20.0, cache=cache,
                             reject=RejectConfig(min_foreground=1, probability=0.5))
            ds = PatchDataset(open_sources([spec], cfg, "train"), cfg, seed=1, augment=False)
            for i in range(4):
                item = ds.sample(i)
                z, y, x = item["begin"]
                crop = (Ellipsis, slice(z, z + 4), slice(y, y + 16), slice(x, x + 16))
                np.testing.assert_array_equal(item["target"], full[crop], err_msg=f"{target} cache={cache}")
                np.testing.assert_allclose(item["raw"][0], raw[crop] / 255.0, atol=1e-6)
                assert item["target"].dtype == (np.int64 if target == "exclusive" else np.float32)


def test_samples_are_functions_of_their_index(sparse_volume):
    cfg = DataConfig(patch_shape=(4, 24, 24), reject=RejectConfig(min_foreground=50))
    spec = VolumeSpec(raw=sparse_volume["raw"], labels=sparse_volume["labels"])
    a = PatchDataset(open_sources([spec], cfg, "train", 8), cfg, seed=9, augment=True)
    b = PatchDataset(open_sources([spec], cfg, "train", 8), cfg, seed=9, augment=True)
    for i in (7, 0, 7):
        x, y = a.sample(i), b.sample(i)
        np.testing.assert_array_equal(x["raw"], y["raw"])
        np.testing.assert_array_equal(x["target"], y["target"])
    assert not np.array_equal(a.sample(1)["raw"], a.sample(2)["raw"])


def test_bad_data_configs_name_the_problem(sparse_volume, tmp_path):
    raw, labels = sparse_volume["raw"], sparse_volume["labels"]
    big = DataConfig(patch_shape=(16, 24, 24))
    with pytest.raises(TrainError, match=r"patch \(16, 24, 24\).*larger than"):
        open_sources([VolumeSpec(raw=raw, labels=labels)], big, "train")
    other = _write(str(tmp_path / "o.zarr/pol"), sparse_volume["pol_array"], voxel_size=(40, 8, 8), channels=3)
    ok = DataConfig(patch_shape=(4, 24, 24))
    with pytest.raises(TrainError, match=r"voxel size mismatch.*\(40, 4, 4\).*\(40, 8, 8\)"):
        open_sources([VolumeSpec(raw=raw, labels=other)], ok, "train")
    with pytest.raises(TrainError, match="cannot open labels dataset .*missing"):
        open_sources([VolumeSpec(raw=raw, labels=str(tmp_path / "o.zarr/missing"))], ok, "train")
    with pytest.raises(TrainError, match="needs a 'sides' volume"):
        open_sources([VolumeSpec(raw=raw, labels=raw, label_format="instances")], ok, "train")
    with pytest.raises(TrainError, match=r"\(3, z, y, x\)"):
        open_sources([VolumeSpec(raw=raw, labels=raw, label_format="polarity")], ok, "train")


# -- augmentation --------------------------------------------------------------------------------

def test_geometry_moves_raw_and_polarity_together():
    rng = np.random.default_rng(0)
    raw = rng.random((4, 8, 8)).astype(np.float32)
    pol = np.stack([raw > 0.7, raw < 0.2, (raw > 0.7) | (raw < 0.2)]).astype(np.uint8)
    seen = set()
    for _ in range(40):
        params = geometric_params(rng, AugmentConfig(), square=True)
        seen.add((params["flips"], params["transpose"], params["k"]))
        r, p = apply_geometric(raw, params), apply_geometric(pol, params)
        np.testing.assert_array_equal(p[0], r > 0.7)   # pre stays pre wherever it moves
        np.testing.assert_array_equal(p[1], r < 0.2)
        assert r.flags.c_contiguous
    assert len(seen) > 10
    params = geometric_params(rng, AugmentConfig(), square=False)
    assert not params["transpose"] and params["k"] in (0, 2)


def test_misalignment_and_missing_sections():
    m = 3
    base = np.arange(3 * 10 * 12, dtype=np.float32).reshape(3, 10, 12)
    offsets = np.array([[0, 0], [2, -3], [0, 0]])
    out = crop_misaligned(base, offsets, m, (4, 6))
    np.testing.assert_array_equal(out[0], base[0, 3:7, 3:9])
    np.testing.assert_array_equal(out[1], base[1, 5:9, 0:6])
    cfg = AugmentConfig(misalign_p=1.0, misalign_max_px=m, intensity_p=0, section_jitter=0,
                        noise_std_max=0, missing_section_p=0, flip_z=False, flip_yx=False,
                        transpose=False, rot90=False)
    raw = (base / base.max()).astype(np.float32)
    shifted = 0
    for seed in range(10):
        r, t = augment_patch(raw, base[None], np.random.default_rng(seed), cfg, (4, 6), m)
        np.testing.assert_allclose(r, t[0] / base.max(), rtol=1e-6)   # labels follow the image
        shifted += not np.array_equal(t[0], base[:, 3:7, 3:9])
    assert shifted >= 8
    img, missing = missing_sections(np.ones((200, 2, 2), np.float32), np.random.default_rng(1), 0.25, 0.0)
    assert 30 < missing.sum() < 70
    assert (img[missing] == 0).all() and (img[~missing] == 1).all()
