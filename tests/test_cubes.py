"""Synapse cubes: neuron-held-out splits, exact cube contents at borders and anisotropic voxels,
blockwise-local reading, clear errors."""

import json

import numpy as np
import pandas as pd
import pytest
from funlib.geometry import Roi

from cleftwise.postprocess.classify import cut_cubes, positions_to_voxels, read_cube, read_cubes
from cleftwise.storage.volume import create_volume, open_volume
from cleftwise.train.cubes import (CubeDataConfig, SourceSpec, build_cube_sets, class_indices, crop_cubes,
                         centre_slices, extract_cubes, load_split, neuron_keys, neuron_split, save_split)
from cleftwise.train.errors import TrainError


def _table(n_neurons=40, seed=0, classes=("E", "I"), p=(0.7, 0.3)):
    rng = np.random.default_rng(seed)
    rows = []
    sid = 1
    for nid in range(1, n_neurons + 1):
        label = rng.choice(classes, p=p)
        for _ in range(int(rng.integers(1, 12))):
            rows.append((sid, nid, label))
            sid += 1
    return pd.DataFrame(rows, columns=["id", "pre_neuron", "ei_label"])


@pytest.mark.parametrize("classes,p", [(("E", "I"), (0.75, 0.25)), (("A", "B", "C"), (0.5, 0.3, 0.2))])
def test_neuron_split_holds_out_neurons_and_keeps_classes(classes, p):
    df = _table(60, seed=3, classes=classes, p=p)
    labels = class_indices(df["ei_label"], classes)
    keys = neuron_keys("v", df["pre_neuron"], df["id"])
    split = neuron_split(keys, labels, (0.6, 0.2, 0.2), seed=5, num_classes=len(classes))
    sets = {k: set(v) for k, v in split.items()}
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"]) \
        and not (sets["val"] & sets["test"])
    assert set.union(*sets.values()) == set(keys)
    n = len(df)
    for name, frac in zip(("train", "val", "test"), (0.6, 0.2, 0.2)):
        member = np.isin(keys, list(sets[name]))
        assert set(labels[member]) == set(range(len(classes))), f"{name} lacks a class"
        assert abs(member.sum() / n - frac) < 0.12, (name, member.sum() / n)
    # seeded: same seed, same split; another seed, another split
    assert neuron_split(keys, labels, (0.6, 0.2, 0.2), seed=5, num_classes=len(classes)) == split
    assert neuron_split(keys, labels, (0.6, 0.2, 0.2), seed=6, num_classes=len(classes)) != split


def test_neuron_split_needs_enough_neurons_per_class():
    df = pd.DataFrame({"id": [1, 2, 3, 4, 5], "pre_neuron": [1, 1, 2, 3, 4], "ei_label": list("EEEEI")})
    labels = class_indices(df["ei_label"], ("E", "I"))
    with pytest.raises(TrainError, match="class 1 has 1 neuron"):
        neuron_split(neuron_keys("v", df["pre_neuron"], df["id"]), labels, (0.6, 0.2, 0.2))


def test_neuron_keys_background_synapses_are_their_own_group():
    keys = neuron_keys("vol", [7, 0, np.nan, 7], [10, 11, 12, 13])
    assert keys.tolist() == ["vol/7", "vol/syn11", "vol/syn12", "vol/7"]


def test_split_file_round_trip_and_overlap_check(tmp_path):
    split = {"train": ["v/1", "v/2"], "val": ["v/3"], "test": ["v/4"]}
    path = tmp_path / "split.json"
    save_split(str(path), split, {"seed": 1})
    assert load_split(str(path)) == split
    doc = json.loads(path.read_text())
    doc["splits"]["val"].append("v/1")
    path.write_text(json.dumps(doc))
    with pytest.raises(TrainError, match="neuron v/1 is in both train and val"):
        load_split(str(path))


def test_unknown_class_name_is_named():
    with pytest.raises(TrainError, match=r"unknown class name\(s\) \['X'\].*synapse id\(s\) 12"):
        class_indices(["E", "X", "I"], ("E", "I"), ids=[11, 12, 13])


def _volume(tmp_path, shape=(10, 40, 36), vs=(40, 4, 4), offset=(80, 400, -40), name="raw"):
    """A uint8 volume whose every voxel is nonzero and unique-ish (1 + index mod 251)."""
    data = (1 + np.arange(np.prod(shape)) % 251).astype(np.uint8).reshape(shape)
    vol = create_volume(str(tmp_path / "v.zarr" / name), shape=shape, voxel_size=vs, offset=offset,
                        dtype="uint8", chunk_shape=(5, 16, 16))
    vol.write(vol.roi, data)
    return open_volume(str(tmp_path / "v.zarr" / name)), data


def _expected(data, center, cube):
    pad = [(c, c) for c in cube]
    padded = np.pad(data, pad)
    b = np.asarray(center) - np.asarray(cube) // 2 + np.asarray(cube)
    return padded[b[0]:b[0] + cube[0], b[1]:b[1] + cube[1], b[2]:b[2] + cube[2]]


@pytest.mark.parametrize("vs,offset", [((40, 4, 4), (80, 400, -40)), ((30, 8, 6), (0, 0, 0)),
                                       ((1, 1, 1), (5, -3, 2))])
def test_cubes_exact_at_borders_and_anisotropic_voxels(tmp_path, vs, offset):
    vol, data = _volume(tmp_path, vs=vs, offset=offset)
    cube = (4, 12, 10)
    centers = np.array([[0, 0, 0], [9, 39, 35], [5, 20, 18], [0, 39, 0], [9, 0, 35], [2, 5, 30]])
    # positions in nm at voxel centres, as the synapse DB stores them
    pos = np.asarray(offset) + (centers + 0.5) * np.asarray(vs)
    assert (positions_to_voxels(pos, offset, vs) == centers).all()
    cubes = extract_cubes(vol.url, pos, cube, block_shape=(4, 16, 16))
    for c, got in zip(centers, cubes):
        want = _expected(data, c, cube)
        np.testing.assert_array_equal(got, want)
    # the corner cube really is zero-padded: outside voxels are 0, inside ones never are
    corner = cubes[0]
    assert (corner[:cube[0] // 2] == 0).all() and (corner[:, :cube[1] // 2] == 0).all()
    assert (corner[cube[0] // 2:, cube[1] // 2:, cube[2] // 2:] > 0).all()


def test_index_convention_rounds_to_the_nearest_voxel(tmp_path):
    vol, data = _volume(tmp_path)
    cube = (2, 4, 4)
    center = np.array([[3, 10, 7]])
    pos = np.asarray(vol.offset) + center * np.asarray(vol.voxel_size) - 0.3  # just below the index
    got = extract_cubes(vol.url, pos, cube, convention="index")
    np.testing.assert_array_equal(got[0], _expected(data, center[0], cube))


class _CountingVolume:
    """A real volume whose reads are counted (to check reads are per block, not per synapse)."""

    def __init__(self, vol):
        self.vol, self.reads = vol, []
        self.num_channels, self.dtype = vol.num_channels, vol.dtype
        self.voxel_size, self.offset = vol.voxel_size, vol.offset

    def read(self, roi, fill_outside=False):
        self.reads.append(roi)
        return self.vol.read(roi, fill_outside=fill_outside)


def test_read_cubes_reads_each_block_once_and_equals_single_reads(tmp_path):
    vol, data = _volume(tmp_path, shape=(12, 64, 64))
    rng = np.random.default_rng(0)
    centers = np.stack([rng.integers(0, s, 200) for s in (12, 64, 64)], axis=1)
    counting = _CountingVolume(vol)
    block = (6, 32, 32)
    cubes = read_cubes(counting, centers, (4, 10, 12), block_shape=block)
    blocks = {tuple(c // np.asarray(block)) for c in centers}
    assert len(counting.reads) == len(blocks) <= 8  # one read per occupied block, 200 synapses
    for c, got in zip(centers, cubes):
        np.testing.assert_array_equal(got, read_cube(vol, c, (4, 10, 12)))
        np.testing.assert_array_equal(got, _expected(data, c, (4, 10, 12)))


def test_cut_cubes_checks_the_region():
    region = np.arange(4 * 8 * 8, dtype=np.uint16).reshape(4, 8, 8)
    got = cut_cubes(region, (10, 20, 30), np.array([[11, 24, 34]]), (2, 4, 4))
    np.testing.assert_array_equal(got[0], region[0:2, 2:6, 2:6])
    from cleftwise.postprocess.errors import PostprocessError

    with pytest.raises(PostprocessError, match="do not fit"):
        cut_cubes(region, (10, 20, 30), np.array([[10, 20, 30]]), (2, 4, 4))


def test_synapse_outside_the_volume_is_named(tmp_path):
    vol, _ = _volume(tmp_path)
    pos = np.array([[vol.roi.begin[0] + 20, vol.roi.begin[1] + 10, vol.roi.begin[2] + 10],
                    [vol.roi.end[0] + 100, vol.roi.begin[1], vol.roi.begin[2]]], dtype=float)
    with pytest.raises(TrainError, match=r"1 synapse\(s\) lie outside raw volume.*id\(s\) 77"):
        extract_cubes(vol.url, pos, (2, 4, 4), ids=np.array([76, 77]))


def test_crop_and_centre_slices():
    cubes = np.arange(2 * 4 * 6 * 6).reshape(2, 4, 6, 6)
    np.testing.assert_array_equal(crop_cubes(cubes, (2, 2, 2)), cubes[:, 1:3, 2:4, 2:4])
    off = np.array([[0, 0, 0], [2, 4, 1]])
    got = crop_cubes(cubes, (2, 2, 2), off)
    np.testing.assert_array_equal(got[1], cubes[1, 2:4, 4:6, 1:3])
    np.testing.assert_array_equal(centre_slices(cubes, 1), cubes[:, 1:2])
    with pytest.raises(TrainError):
        centre_slices(cubes, 5)


def test_build_cube_sets_from_csv_and_parquet_with_saved_split(tmp_path):
    vol, data = _volume(tmp_path, shape=(10, 40, 36))
    df = _table(30, seed=1)
    rng = np.random.default_rng(2)
    vox = np.stack([rng.integers(0, s, len(df)) for s in (10, 40, 36)], axis=1)
    pos = np.asarray(vol.offset) + (vox + 0.5) * np.asarray(vol.voxel_size)
    df[["z", "y", "x"]] = pos
    half = len(df) // 2
    df.iloc[:half].to_csv(tmp_path / "a.csv", index=False)
    df.iloc[half:].to_parquet(tmp_path / "b.parquet", index=False)
    split_file = str(tmp_path / "split.json")
    cfg = CubeDataConfig(sources=[SourceSpec(raw=vol.url, synapses=str(tmp_path / "a.csv"), name="a"),
                                  SourceSpec(raw=vol.url, synapses=str(tmp_path / "b.parquet"), name="b")],
                         cube_shape=(2, 6, 6), margin=(0, 1, 1), split_file=split_file, split_seed=4)
    sets = build_cube_sets(cfg)
    assert sum(len(s) for s in sets.values()) == len(df)
    neurons = {k: set(s.neurons.tolist()) for k, s in sets.items()}
    assert not (neurons["train"] & neurons["val"]) and not (neurons["val"] & neurons["test"])
    for s in sets.values():
        assert s.cubes.shape[1:] == (2, 8, 8)
        assert set(s.labels.tolist()) == {0, 1}
    # cube contents follow the table's positions
    t = sets["test"]
    i = 0
    v = positions_to_voxels(t.positions[i:i + 1], vol.offset, vol.voxel_size)[0]
    np.testing.assert_array_equal(t.cubes[i], _expected(data, v, (2, 8, 8)))
    # the saved split is reused, whatever the seed says now
    cfg2 = CubeDataConfig(**{**cfg.__dict__, "split_seed": 99})
    again = build_cube_sets(cfg2, splits=("test",))
    assert set(again["test"].neurons.tolist()) == neurons["test"]
    assert json.loads(open(split_file).read())["info"]["seed"] == 4


def test_bad_data_config_is_rejected():
    with pytest.raises(TrainError, match="class_signs has no sign"):
        CubeDataConfig(classes=("E", "I", "M"))
    with pytest.raises(TrainError, match="split_fractions"):
        CubeDataConfig(split_fractions=(0.5, 0.5, 0.5))
    with pytest.raises(TrainError, match="split of"):
        CubeDataConfig(sources=[SourceSpec(raw="a.zarr/raw", synapses="t.csv", split="holdout")])
