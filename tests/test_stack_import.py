"""Importing per-section TIFF/PNG stacks and multi-page TIFFs."""

import os
import subprocess
import sys

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile

from cleftwise.storage.errors import StorageError
from cleftwise.storage.importers.stack import StackImportConfig, import_stack, list_sections
from cleftwise.storage.volume import open_volume

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _stack(rng, depth=5, shape=(40, 30)):
    return rng.integers(0, 255, (depth,) + shape, dtype=np.uint8)


@pytest.mark.parametrize("ext", ["png", "tif"])
def test_folder_round_trip(tmp_path, ext):
    data = _stack(np.random.default_rng(0), depth=11)
    folder = tmp_path / "sec"
    folder.mkdir()
    for z, img in enumerate(data):  # natural order: 2 before 10
        iio.imwrite(folder / f"s{z}.{ext}", img)
    assert os.path.basename(list_sections(str(folder))[2]) == f"s2.{ext}"
    vol = import_stack(StackImportConfig(str(folder), f"{tmp_path}/v.zarr/raw", (50, 5, 5), (100, 0, 0),
                                         chunk_shape=(4, 16, 16)))
    again = open_volume(vol.url)
    assert again.shape == data.shape and again.dtype == np.uint8
    assert tuple(again.voxel_size) == (50, 5, 5) and tuple(again.offset) == (100, 0, 0)
    np.testing.assert_array_equal(again.read(), data)


def test_multipage_tiff_and_masks(tmp_path):
    rng = np.random.default_rng(1)
    mask = np.zeros((6, 20, 20), np.uint8)
    mask[1:3, 2:5, 2:5] = 255
    mask[4:6, 10:15, 10:12] = 255
    tifffile.imwrite(tmp_path / "m.tif", mask)
    m = import_stack(StackImportConfig(str(tmp_path / "m.tif"), f"{tmp_path}/v.zarr/mask", kind="mask"))
    np.testing.assert_array_equal(open_volume(m.url).read(), (mask > 0).astype(np.uint8))
    inst = import_stack(StackImportConfig(str(tmp_path / "m.tif"), f"{tmp_path}/v.zarr/inst",
                                          kind="instances"))
    lab = open_volume(inst.url).read()
    assert lab.dtype == np.uint64 and set(np.unique(lab)) == {0, 1, 2}


def test_bad_stacks(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(StorageError, match="no TIFF/PNG images"):
        import_stack(StackImportConfig(str(empty), f"{tmp_path}/a.zarr/raw"))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    iio.imwrite(mixed / "0.png", np.zeros((10, 10), np.uint8))
    iio.imwrite(mixed / "1.png", np.zeros((10, 12), np.uint8))
    with pytest.raises(StorageError, match="1.png: section shape"):
        import_stack(StackImportConfig(str(mixed), f"{tmp_path}/b.zarr/raw"))
    dt = tmp_path / "dtype"
    dt.mkdir()
    iio.imwrite(dt / "0.png", np.zeros((10, 10), np.uint8))
    iio.imwrite(dt / "1.png", np.zeros((10, 10), np.uint16))
    with pytest.raises(StorageError, match="dtype uint16 differs"):
        import_stack(StackImportConfig(str(dt), f"{tmp_path}/c.zarr/raw"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "0.png").write_bytes(b"not a png")
    with pytest.raises(StorageError, match="0.png: unreadable image"):
        import_stack(StackImportConfig(str(bad), f"{tmp_path}/d.zarr/raw"))
    with pytest.raises(StorageError, match="no such folder"):
        import_stack(StackImportConfig(str(tmp_path / "nothing"), f"{tmp_path}/e.zarr/raw"))


@pytest.mark.skipif(not os.path.isdir(os.path.join(REPO, "..", "shared", "data", "vnc-sstem")),
                    reason="real data not beside the project")
def test_cli_imports_real_vnc_stack(tmp_path):
    src = os.path.join(REPO, "..", "shared", "data", "vnc-sstem")
    r = subprocess.run([sys.executable, os.path.join(REPO, "launch/import_stack.py"), f"{src}/synapses",
                        f"{tmp_path}/vnc.zarr/synapses", "--voxel-size", "50", "5", "5",
                        "--kind", "instances"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lab = open_volume(f"{tmp_path}/vnc.zarr/synapses").read()
    assert lab.shape == (20, 1024, 512)
    assert 20 <= lab.max() <= 60  # the dataset's README: about 32 synapses in 3D (6-connected)
