"""segment.decoding pytc / pytc_exclusive: PyTorch Connectomics' polarity2instance, blockwise.

The reference below is polarity2instance (PyTC connectomics/decoding/synapse.py, formerly
connectomics/utils/process.py) written with numpy + scipy.ndimage + cc3d instead of skimage:
``remove_small_objects(min_size, connectivity=1)`` = drop 6-connected components with fewer
than ``min_size`` voxels; ``binary_dilation(x, ones((1, d, d)))`` = scipy's with background
outside; labelling = cc3d 6-connected.
"""

import numpy as np
import pandas as pd
import pytest
import cc3d
from scipy import ndimage

from cleftwise.blockwise.runner import BackendConfig, run_task
from cleftwise.postprocess.errors import PostprocessError
from cleftwise.postprocess.partners_step import PartnersStep, partners_config
from cleftwise.postprocess.pytc_decoding import dilate_yx, pytc_masks
from cleftwise.postprocess.segment import SegmentConfig, segment_passes
from cleftwise.storage.db import open_store
from cleftwise.storage.volume import create_volume, open_volume

VS = (40, 4, 4)
SHAPE = (10, 48, 56)


def polarity2instance_ref(volume, thres=0.5, thres_small=128, dilate_sz=5, exclusive=False, connectivity=6):
    """PyTC's polarity2instance (instance mode, scale 1): 2n - 1 pre, 2n post, 0 background."""
    if exclusive:
        idx = np.argmax(volume, axis=0)
        temp = np.stack([idx == 1, idx == 2, idx != 0])
    else:
        temp = volume > int(255.0 * thres)

    def remove_small_objects(mask, min_size):
        ccs, _ = ndimage.label(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1))
        sizes = np.bincount(ccs.ravel())
        out = mask.copy()
        out[(sizes < min_size)[ccs]] = False
        return out

    syn_pre = remove_small_objects(temp[0] & temp[2], thres_small)
    syn_post = remove_small_objects(temp[1] & temp[2], thres_small)
    fg = ndimage.binary_dilation(temp[2], structure=np.ones((1, dilate_sz, dilate_sz), bool))
    fg = cc3d.connected_components(fg, connectivity=connectivity).astype(np.int64)
    return np.maximum((fg * 2 - 1) * syn_pre, fg * 2 * syn_post)


def _expected(segm):
    """Reference → (instance labels renumbered 1..N in the order of PyTC's n, sides 1/2)."""
    n = (segm + 1) // 2
    present = np.unique(n[n > 0])
    lut = np.zeros(int(n.max()) + 1, np.uint64)
    lut[present] = np.arange(1, present.size + 1, dtype=np.uint64)
    sides = np.where(segm == 0, 0, np.where(segm % 2 == 1, 1, 2)).astype(np.uint8)
    return lut[n], sides


def _blobs(seed, shape=SHAPE, exclusive=False, level=1.6):
    """Smooth random maps (uint8): clefts of many sizes, nearby and touching fragments, voxels
    above threshold on both sides. (pre, post, union), or (background, pre, post) if exclusive."""
    rng = np.random.default_rng(seed)

    def field(sigma):
        f = ndimage.gaussian_filter(rng.normal(size=shape), sigma)
        return f / f.std()

    f, g = field((1, 3, 3)), field((1, 2, 2))
    union = 128 + 80 * (f - level)
    pre, post = np.clip(union + 60 * g, 0, 255), np.clip(union - 60 * g, 0, 255)
    if exclusive:
        return np.stack([np.clip(255 - union, 0, 255), pre, post]).astype(np.uint8)
    noisy = np.clip(union + rng.integers(-15, 16, shape), 0, 255)
    return np.stack([pre, post, noisy]).astype(np.uint8)


def _write(path, vol, names=None):
    v = create_volume(path, shape=vol.shape[1:], voxel_size=VS, offset=(80, 40, 40), dtype="uint8",
                      chunk_shape=(4, 8, 8), num_channels=3, overwrite=True,
                      attrs={"channels": list(names)} if names else None)
    v.write(v.roi, vol)
    return path


def _segment(tmp_path, name, preds, block, **kw):
    cfg = SegmentConfig(predictions=preds, output=f"{tmp_path}/{name}.zarr/labels",
                        work_dir=f"{tmp_path}/{name}_work", block_shape=block, **kw)
    for t in segment_passes(cfg):
        run_task(t, BackendConfig(progress=False))
    return cfg


def _read(url):
    v = open_volume(url)
    return v.read(v.roi)


def test_masks_and_dilation_match_pytc_primitives():
    rng = np.random.default_rng(0)
    vol = rng.integers(0, 256, (3, 4, 9, 11)).astype(np.uint8)
    fg, pre, post = pytc_masks(vol, 0.5, exclusive=False)
    t = vol > 127  # int(255 * 0.5) = 127: a value of 128 is foreground, 127 is not
    assert np.array_equal(fg, t[2]) and np.array_equal(pre, t[0] & t[2]) and np.array_equal(post, t[1] & t[2])
    fg, pre, post = pytc_masks(vol, 0.5, exclusive=True)
    k = np.argmax(vol, axis=0)
    assert np.array_equal(fg, k != 0) and np.array_equal(pre, k == 1) and np.array_equal(post, k == 2)
    m = rng.random((3, 9, 11)) > 0.93
    for d in (1, 3, 5, 7):
        ref = ndimage.binary_dilation(m, structure=np.ones((1, d, d), bool))
        assert np.array_equal(dilate_yx(m, d), ref)


@pytest.mark.parametrize("exclusive, block", [
    (False, SHAPE), (True, SHAPE), (False, (4, 16, 16)), (True, (4, 16, 16)),
    (False, (3, 13, 11)), (True, (10, 5, 7))])  # blocks thinner than the dilation, odd shapes
def test_blockwise_pytc_equals_polarity2instance(tmp_path, exclusive, block):
    vol = _blobs(1, exclusive=exclusive)
    names = ("background", "pre", "post") if exclusive else ("pre", "post", "union")
    preds = _write(f"{tmp_path}/p.zarr/pred", vol, names)
    small = 40
    ref = polarity2instance_ref(vol, thres_small=small, exclusive=exclusive)
    want_labels, want_sides = _expected(ref)
    n_ref = int(want_labels.max())
    assert n_ref >= 5  # the volume is not trivial ...
    raw = polarity2instance_ref(vol, thres_small=1, exclusive=exclusive)
    assert np.count_nonzero(raw) > np.count_nonzero(ref)  # ... and the size filter removes something
    cfg = _segment(tmp_path, "s", preds, block, decoding="pytc_exclusive" if exclusive else "pytc",
                   pytc_small=small)
    labels, sides = _read(cfg.output), _read(cfg.output + "_sides")
    assert np.array_equal(labels, want_labels)
    assert np.array_equal(sides, want_sides)
    inst = pd.read_parquet(f"{cfg.work_dir}/instances.parquet")
    assert inst["id"].tolist() == list(range(1, n_ref + 1))
    sizes = np.bincount(want_labels.ravel().astype(np.int64))[1:]
    assert inst["size"].tolist() == sizes.tolist()
    zz, yy, xx = np.nonzero(want_labels == 3)
    r = inst.set_index("id").loc[3]
    assert (r["z0"], r["y0"], r["x0"], r["z1"], r["y1"], r["x1"]) == (
        zz.min(), yy.min(), xx.min(), zz.max() + 1, yy.max() + 1, xx.max() + 1)
    assert r["centroid_y"] == pytest.approx(yy.mean())

    if block == (4, 16, 16):  # the records in the synapse DB carry PyTC's sides
        url = f"sqlite:///{tmp_path}/syn.db"
        step = PartnersStep(partners_config(cfg, url, f"{tmp_path}/partners"))
        run_task(step, BackendConfig(progress=False))
        with open_store(url) as store:
            rec = store.query().set_index("id").sort_index()
        assert rec.index.tolist() == list(range(1, n_ref + 1))
        pre_n = np.bincount(want_labels[want_sides == 1].astype(np.int64), minlength=n_ref + 1)[1:]
        post_n = np.bincount(want_labels[want_sides == 2].astype(np.int64), minlength=n_ref + 1)[1:]
        assert rec["pre_size"].tolist() == pre_n.tolist()
        assert rec["post_size"].tolist() == post_n.tolist()


@pytest.mark.parametrize("block", [(2, 16, 16), (4, 8, 16), (4, 16, 9)])
def test_dilation_and_size_filter_across_block_faces(tmp_path, block):
    """Hand-built: two clefts whose dilations meet only across a block face (the halo is
    needed), and fragments that are small in every block but large in total (global sizes)."""
    vol = np.zeros((3, 4, 32, 32), np.uint8)
    vol[0, 1:3, 12:14, 2:12] = 200   # cleft A: pre y 12-13, post y 14-15 (ends at the face y = 16)
    vol[1, 1:3, 14:16, 2:12] = 200
    vol[0, 1:3, 19:21, 2:12] = 200   # cleft B starts at y = 19: dilations (2 voxels) meet at y = 17
    vol[1, 1:3, 21:22, 2:12] = 200
    vol[0, 0:4, 3:5, 14:18] = 200    # 32 pre voxels cut by the x face at 16 and the z face at 2
    vol[1, 0:4, 5:6, 14:18] = 200    # 16 post voxels: below pytc_small, removed
    vol[2] = np.maximum(vol[0], vol[1])
    preds = _write(f"{tmp_path}/p.zarr/pred", vol)
    want_labels, want_sides = _expected(polarity2instance_ref(vol, thres_small=30))
    assert int(want_labels.max()) == 2 and want_labels[1, 12, 2] == want_labels[1, 20, 2] == 2
    assert want_sides[0, 5, 14] == 0 and want_labels[0, 3, 14] == 1
    cfg = _segment(tmp_path, "s", preds, block, decoding="pytc", pytc_small=30)
    assert np.array_equal(_read(cfg.output), want_labels)
    assert np.array_equal(_read(cfg.output + "_sides"), want_sides)


def test_pytc_defaults_and_connectivity_variants(tmp_path):
    """PyTC's defaults (thres_small 128, dilation 5) and the older 26-connected labelling."""
    vol = _blobs(3, (8, 40, 48), level=1.3)
    preds = _write(f"{tmp_path}/p.zarr/pred", vol)
    for conn, d in ((6, 5), (26, 3)):
        ref = polarity2instance_ref(vol, dilate_sz=d, connectivity=conn)
        want_labels, want_sides = _expected(ref)
        assert want_labels.max() >= 2
        kw = {} if conn == 6 and d == 5 else {"pytc_connectivity": conn, "pytc_dilation": d}
        cfg = _segment(tmp_path, f"c{conn}", preds, (3, 16, 16), decoding="pytc", **kw)
        assert np.array_equal(_read(cfg.output), want_labels)
        assert np.array_equal(_read(cfg.output + "_sides"), want_sides)


def test_default_decoding_differs_from_pytc(tmp_path):
    """Two clefts 3 voxels apart in y (one synapse after PyTC's dilation, two by default), a
    20-voxel pre fragment (removed by PyTC, kept by default) and voxels above threshold on both
    sides (post in PyTC, both by default)."""
    vol = np.zeros((3,) + (4, 32, 32), np.uint8)
    vol[0, 1:3, 4:6, 4:20] = 200      # pre, 64 voxels
    vol[1, 1:3, 6:8, 4:20] = 200      # post, 64 voxels
    vol[1, 1:3, 5, 4:8] = 200         # 8 voxels above threshold on both sides
    vol[0, 1:3, 11:13, 4:20] = 200    # a second cleft 3 voxels further in y
    vol[1, 1:3, 13:14, 4:20] = 200
    vol[0, 1:3, 24:26, 20:25] = 200   # a lone 20-voxel pre fragment
    vol[2] = np.maximum(vol[0], vol[1])
    preds = _write(f"{tmp_path}/p.zarr/pred", vol)
    pytc = _segment(tmp_path, "pytc", preds, (2, 16, 16), decoding="pytc", pytc_small=30)
    default = _segment(tmp_path, "default", preds, (2, 16, 16), min_size=1)
    want_labels, want_sides = _expected(polarity2instance_ref(vol, thres_small=30))
    assert np.array_equal(_read(pytc.output), want_labels)
    assert int(want_labels.max()) == 1  # both clefts one synapse; the fragment gone
    assert int(_read(default.output).max()) == 3
    assert np.all(want_sides[1:3, 5, 4:8] == 2)
    # the default partners stage counts the ambiguous voxels for both sides
    url = f"sqlite:///{tmp_path}/d.db"
    run_task(PartnersStep(partners_config(default, url, f"{tmp_path}/dp")), BackendConfig(progress=False))
    with open_store(url) as store:
        rec = store.query().set_index("id").sort_index()
    assert rec.loc[1, "pre_size"] == 64 and rec.loc[1, "post_size"] == 64 + 8
    url = f"sqlite:///{tmp_path}/p.db"
    run_task(PartnersStep(partners_config(pytc, url, f"{tmp_path}/pp")), BackendConfig(progress=False))
    with open_store(url) as store:
        rec = store.query().set_index("id").sort_index()
    assert rec.loc[1, "pre_size"] == 64 - 8 + 64 and rec.loc[1, "post_size"] == 64 + 8 + 32


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(PostprocessError, match="segment.decoding"):
        SegmentConfig(decoding="pyt")
    with pytest.raises(PostprocessError, match="pytc_dilation"):
        SegmentConfig(decoding="pytc", pytc_dilation=4)
    with pytest.raises(PostprocessError, match="pytc_small"):
        SegmentConfig(decoding="pytc", pytc_small=-1)
    with pytest.raises(PostprocessError, match="pytc_connectivity"):
        SegmentConfig(decoding="pytc", pytc_connectivity=8)
    preds = _write(f"{tmp_path}/p.zarr/pred", np.zeros((3, 2, 8, 8), np.uint8), ("pre", "post", "union"))
    cfg = SegmentConfig(predictions=preds, output=f"{tmp_path}/o.zarr/l", work_dir=f"{tmp_path}/w",
                        decoding="pytc_exclusive")
    with pytest.raises(PostprocessError, match="background"):
        segment_passes(cfg)
    cfg = SegmentConfig(predictions=preds, output=f"{tmp_path}/o.zarr/l", work_dir=f"{tmp_path}/w", decoding="pytc")
    with pytest.raises(PostprocessError, match="polarity_mode to nonexclusive"):
        partners_config(cfg, "sqlite:///x.db", f"{tmp_path}/pw", polarity_mode="exclusive")
