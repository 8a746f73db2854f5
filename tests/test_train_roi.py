"""Training data restricted to a region (VolumeSpec.roi): a held-out band is never read."""

import numpy as np
import pytest

from cleftwise.storage.volume import create_volume
from cleftwise.train.augment import AugmentConfig
from cleftwise.train.data import DataConfig, PatchDataset, RejectConfig, VolumeSpec, open_sources
from cleftwise.train.errors import TrainError
from cleftwise.train.loop import parse_train_config

SHAPE = (8, 64, 48)
VS = (50, 5, 5)


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    """Raw whose value encodes the y row band (y < 40: 10, y >= 40: 200); labels everywhere."""
    d = tmp_path_factory.mktemp("roi")
    raw = np.full(SHAPE, 10, np.uint8)
    raw[:, 40:] = 200
    lab = np.zeros(SHAPE, np.uint8)
    lab[2:6, 10:20, 10:20] = 1          # a synapse in the training band
    lab[2:6, 45:60, 10:20] = 1          # and one in the held-out band
    r = create_volume(str(d / "v.zarr/raw"), shape=SHAPE, voxel_size=VS, dtype="uint8")
    r.write(r.roi, raw)
    m = create_volume(str(d / "v.zarr/mask"), shape=SHAPE, voxel_size=VS, dtype="uint8")
    m.write(m.roi, lab)
    return r.url, m.url


def _cfg(spec, cache, **aug):
    return DataConfig(train=[spec], patch_shape=(4, 32, 32), target="cleft", cache=cache,
                      reject=RejectConfig(min_foreground=1, probability=0.5),
                      augment=AugmentConfig(misalign_p=1.0, misalign_max_px=4, missing_section_p=0.0,
                                            intensity_p=0.0, **aug))


@pytest.mark.parametrize("cache", [True, False])
def test_samples_never_leave_the_region(volume, cache):
    raw, mask = volume
    spec = VolumeSpec(raw=raw, labels=mask, label_format="instances",
                      roi=[[0, 0, 0], [SHAPE[0] * 50, 40 * 5, SHAPE[2] * 5]])
    cfg = _cfg(spec, cache)
    src = open_sources(cfg.train, cfg, "train", margin_px=4)[0]
    assert src.shape == (SHAPE[0], 40, SHAPE[2])
    # a read reaching past the region gives zeros there, never the held-out value 200
    block = src.read("raw", (0, 30, 0), (2, 20, 8))
    assert (block[:, :10] == 10).all() and (block[:, 10:] == 0).all()
    ds = PatchDataset([src], cfg, seed=3, augment=True)
    fg = 0
    for i in range(12):
        item = ds.sample(i)
        assert item["raw"].max() < 100 / 255, "a training patch saw held-out pixels"
        fg += item["foreground"]
    assert fg > 0  # the training band's synapse is sampled


def test_bad_rois_raise(volume):
    raw, mask = volume
    for roi, msg in (([[0, 0, 0], [400, 995, 240]], "not inside"),
                     ([[0, 3, 0], [400, 100, 240]], "not aligned"),
                     ([[0, 0], [400, 100]], "roi must be"),
                     ("band", "roi must be")):
        spec = VolumeSpec(raw=raw, labels=mask, label_format="instances", roi=roi)
        with pytest.raises(TrainError, match=msg):
            open_sources([spec], _cfg(spec, True), "train")


def test_roi_from_yaml_dict(volume):
    raw, mask = volume
    cfg = parse_train_config({
        "model": {"filters": [4, 8], "anisotropic_levels": 1, "out_channels": 1},
        "data": {"target": "cleft", "patch_shape": [4, 32, 32],
                 "train": [{"raw": raw, "labels": mask, "label_format": "instances",
                            "roi": [[0, 0, 0], [400, 200, 240]]}]}})
    src = open_sources(cfg.data.train, cfg.data, "train")[0]
    assert src.shape == (8, 40, 48)
