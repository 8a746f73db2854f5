"""Volume I/O through TensorStore: round trips, metadata interop, clear errors."""

import json
import os

import numpy as np
import pytest
import zarr
from funlib.geometry import Coordinate, Roi

from cleftwise.storage.errors import StorageError
from cleftwise.storage.volume import check_same_voxel_size, create_volume, open_volume

FORMATS = [
    ("zarr", "{d}/c.zarr/grp/vol"),
    ("zarr3", "zarr3://{d}/c3.zarr/vol"),
    ("n5", "{d}/c.n5/vol"),
    ("precomputed", "precomputed://{d}/pc"),
]


@pytest.mark.parametrize("fmt,template", FORMATS)
@pytest.mark.parametrize("num_channels", [None, 3])
@pytest.mark.parametrize("dtype", ["uint8", "uint64", "float32"])
def test_round_trip_each_format(tmp_path, fmt, template, num_channels, dtype):
    url = template.format(d=tmp_path)
    vol = create_volume(url, shape=(6, 20, 30), voxel_size=(40, 4, 4), offset=(80, 8, 12),
                        dtype=dtype, chunk_shape=(2, 8, 8), num_channels=num_channels)
    rng = np.random.default_rng(0)
    data = (rng.random(vol.shape) * 200).astype(dtype)
    vol.write(vol.roi, data)
    again = open_volume(url)
    assert again.format == fmt
    assert again.voxel_size == Coordinate(40, 4, 4)
    assert again.offset == Coordinate(80, 8, 12)
    assert again.dtype == np.dtype(dtype)
    assert again.num_channels == num_channels
    assert again.chunk_shape == Coordinate(2, 8, 8)
    assert again.roi == Roi((80, 8, 12), (240, 80, 120))
    np.testing.assert_array_equal(again.read(), data)
    # sub-ROI at an offset that is not chunk-aligned
    sub = Roi((120, 12, 16), (80, 20, 48))
    lead = (slice(None),) * (1 if num_channels else 0)
    np.testing.assert_array_equal(again.read(sub), data[lead + (slice(1, 3), slice(1, 6), slice(1, 13))])


@pytest.mark.parametrize("dtype,codec", [("uint64", "zstd"), ("int32", "zstd"), ("float32", "blosc"),
                                         ("uint8", "blosc")])
def test_zarr_codec_follows_dtype(tmp_path, dtype, codec):
    """Label (multi-byte integer) volumes are written with plain zstd, the others with blosc zstd
    and byte shuffle; both read back exactly, also through zarr-python."""
    url = f"{tmp_path}/s.zarr/v"
    create_volume(url, shape=(4, 8, 8), voxel_size=(40, 4, 4), dtype=dtype)
    meta = json.load(open(tmp_path / "s.zarr" / "v" / ".zarray"))
    assert meta["compressor"]["id"] == codec
    if codec == "blosc":
        assert meta["compressor"]["cname"] == "zstd" and meta["compressor"]["shuffle"] == 1
    else:
        assert meta["compressor"]["level"] == 3
    vol = open_volume(url, mode="r+")
    data = (np.arange(256) * 7 % 251).reshape(4, 8, 8).astype(dtype)
    vol.write(vol.roi, data)
    np.testing.assert_array_equal(open_volume(url).read(vol.roi), data)
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "s.zarr" / "v"), mode="r")[:], data)


def test_funlib_and_zarr_read_same_metadata(tmp_path):
    import funlib.persistence as fp

    url = f"{tmp_path}/out.zarr/pred"
    vol = create_volume(url, shape=(8, 32, 32), voxel_size=(40, 4, 4), offset=(400, 40, 80),
                        dtype="uint8", chunk_shape=(4, 16, 16), num_channels=3)
    data = np.arange(np.prod(vol.shape), dtype=np.uint64).reshape(vol.shape).astype(np.uint8)
    vol.write(vol.roi, data)
    ds = fp.open_ds(url)
    assert ds.voxel_size == Coordinate(40, 4, 4)
    assert ds.offset == Coordinate(400, 40, 80)
    assert ds.roi == vol.roi
    np.testing.assert_array_equal(ds.to_ndarray(ds.roi), data)
    z = zarr.open(f"{tmp_path}/out.zarr", mode="r")["pred"]
    assert list(z.attrs["voxel_size"]) == [40, 4, 4]
    assert list(z.attrs["offset"]) == [400, 40, 80]
    np.testing.assert_array_equal(z[:], data)
    # and the reverse: a dataset written by funlib.persistence opens here
    fp_url = f"{tmp_path}/out.zarr/from_funlib"
    fds = fp.prepare_ds(fp_url, shape=(4, 8, 8), offset=(40, 8, 8), voxel_size=(40, 4, 4),
                        dtype=np.uint8, chunk_shape=(2, 4, 4))
    fds[fds.roi] = np.full((4, 8, 8), 7, np.uint8)
    mine = open_volume(fp_url)
    assert mine.voxel_size == Coordinate(40, 4, 4) and mine.offset == Coordinate(40, 8, 8)
    assert (mine.read() == 7).all()


def test_fill_outside_and_outside_error(tmp_path):
    vol = create_volume(f"{tmp_path}/a.zarr/raw", shape=(4, 8, 8), voxel_size=(40, 4, 4),
                        offset=(40, 4, 4), dtype="uint8", chunk_shape=(2, 4, 4))
    vol.write(vol.roi, np.full((4, 8, 8), 9, np.uint8))
    big = Roi((0, 0, 0), (240, 48, 48))
    with pytest.raises(StorageError, match="outside the volume"):
        vol.read(big)
    out = vol.read(big, fill_outside=True)
    assert out.shape == (6, 12, 12)
    assert out.sum() == 9 * 4 * 8 * 8
    assert (out[1:5, 1:9, 1:9] == 9).all()
    far = vol.read(Roi((4000, 0, 0), (80, 8, 8)), fill_outside=True)
    assert far.shape == (2, 2, 2) and not far.any()


def test_clear_errors(tmp_path):
    vol = create_volume(f"{tmp_path}/a.zarr/raw", shape=(4, 8, 8), voxel_size=(40, 4, 4),
                        dtype="uint8", chunk_shape=(2, 4, 4))
    with pytest.raises(StorageError, match="not aligned to the voxel size"):
        vol.read(Roi((20, 0, 0), (40, 8, 8)))
    with pytest.raises(StorageError, match="not aligned to the voxel size"):
        vol.write(Roi((0, 0, 0), (40, 6, 8)), np.zeros((1, 1, 2), np.uint8))
    with pytest.raises(StorageError, match="dtype mismatch"):
        vol.write(Roi((0, 0, 0), (40, 8, 8)), np.zeros((1, 2, 2), np.float32))
    with pytest.raises(StorageError, match="shape mismatch"):
        vol.write(Roi((0, 0, 0), (40, 8, 8)), np.zeros((1, 2, 3), np.uint8))
    with pytest.raises(StorageError, match="not found in container"):
        open_volume(f"{tmp_path}/a.zarr/nope")
    with pytest.raises(StorageError, match="does not exist"):
        open_volume(f"{tmp_path}/missing.zarr/raw")
    with pytest.raises(StorageError, match="exists already"):
        create_volume(f"{tmp_path}/a.zarr/raw", shape=(4, 8, 8), voxel_size=(40, 4, 4))
    with pytest.raises(StorageError, match="not a multiple of voxel size"):
        create_volume(f"{tmp_path}/a.zarr/b", shape=(4, 8, 8), voxel_size=(40, 4, 4), offset=(10, 0, 0))
    with pytest.raises(StorageError, match="read-only"):
        open_volume(f"{tmp_path}/a.zarr/raw").write(Roi((0, 0, 0), (40, 8, 8)), np.zeros((1, 2, 2), np.uint8))
    other = create_volume(f"{tmp_path}/a.zarr/seg", shape=(4, 8, 8), voxel_size=(50, 4, 4))
    with pytest.raises(StorageError, match="voxel size mismatch"):
        check_same_voxel_size([vol, other])
    # overwrite replaces
    again = create_volume(f"{tmp_path}/a.zarr/raw", shape=(2, 4, 4), voxel_size=(40, 4, 4), overwrite=True)
    assert again.shape == (2, 4, 4)


def test_corrupt_chunk_names_volume(tmp_path):
    url = f"{tmp_path}/a.zarr/raw"
    vol = create_volume(url, shape=(4, 8, 8), voxel_size=(40, 4, 4), chunk_shape=(2, 4, 4))
    vol.write(vol.roi, np.ones((4, 8, 8), np.uint8))
    chunk = os.path.join(url, "0.0.0")
    with open(chunk, "wb") as f:
        f.write(b"this is not a blosc chunk")
    with pytest.raises(StorageError, match="a.zarr/raw: reading ROI"):
        open_volume(url).read()
