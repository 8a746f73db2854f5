"""Blockwise segment + partners stages on the engine: exact global CC, merged statistics,
identical ids across block shapes and backends, resume after kill -9."""

import os

import cc3d
import fastremap
import numpy as np
import pandas as pd
import pytest

from cleftwise.blockwise.runner import BackendConfig, run_task
from cleftwise.postprocess.partners_step import PartnersConfig, PartnersStep, partners_config
from cleftwise.postprocess.segment import SegmentConfig, segment_passes
from cleftwise.storage.db import open_store
from cleftwise.storage.volume import create_volume, open_volume

VS = (40, 4, 4)


def _write_preds(path, union, pre=None, post=None):
    shape = union.shape
    pre = np.zeros(shape, np.uint8) if pre is None else pre
    post = np.zeros(shape, np.uint8) if post is None else post
    vol = create_volume(path, shape=shape, voxel_size=VS, offset=(80, 40, 40), dtype="uint8",
                        chunk_shape=(4, 8, 8), num_channels=3, overwrite=True)
    vol.write(vol.roi, np.stack([pre, post, union]))
    return path


def _run_segment(tmp_path, name, preds, block, backend=None, **kw):
    cfg = SegmentConfig(predictions=preds, output=f"{tmp_path}/{name}.zarr/synapses",
                        work_dir=f"{tmp_path}/{name}_work", block_shape=block, **kw)
    for t in segment_passes(cfg):
        run_task(t, backend or BackendConfig(progress=False))
    return cfg


def _run_partners(tmp_path, seg_cfg, name="db", overwrite=False, **settings) -> pd.DataFrame:
    """Run the partners step on a finished segment run; returns the records it wrote to the DB."""
    url = f"sqlite:///{tmp_path}/{name}.db"
    step = PartnersStep(partners_config(seg_cfg, url, f"{tmp_path}/{name}_partners", **settings))
    run_task(step, BackendConfig(progress=False), overwrite=overwrite)
    with open_store(url) as store:
        return store.query()


def _global_reference(mask, connectivity, min_size):
    ref = cc3d.connected_components(mask, connectivity=connectivity, out_dtype=np.uint64)
    if min_size > 1:
        ids, counts = fastremap.unique(ref, return_counts=True)
        small = ids[(counts < min_size) & (ids != 0)]
        ref = fastremap.mask(ref, small)
        ref, _ = fastremap.renumber(ref, in_place=False)  # keeps raster order of first voxels
    return ref


@pytest.mark.parametrize("connectivity", [6, 26])
def test_blockwise_cc_equals_global_across_block_shapes(tmp_path, connectivity):
    rng = np.random.default_rng(3)
    union = (rng.random((12, 40, 48)) < 0.35).astype(np.uint8) * 255
    preds = _write_preds(f"{tmp_path}/p.zarr/pred", union)
    ref = _global_reference(union > 127, connectivity, min_size=3)
    outs = []
    for block in [(4, 8, 8), (8, 16, 24), (12, 40, 48)]:
        cfg = _run_segment(tmp_path, f"s{block[1]}_{connectivity}", preds, block,
                           connectivity=connectivity, min_size=3)
        outs.append(open_volume(cfg.output).read())
    for out in outs:
        np.testing.assert_array_equal(out, ref)


def test_diagonal_contacts_at_block_corners(tmp_path):
    union = np.zeros((8, 16, 16), np.uint8)
    # a 1-voxel-thick diagonal line crossing the corner shared by 8 blocks of (4, 8, 8)
    for i in range(-3, 3):
        union[4 + i, 8 + i, 8 + i] = 255
    preds = _write_preds(f"{tmp_path}/p.zarr/pred", union)
    c26 = _run_segment(tmp_path, "c26", preds, (4, 8, 8), connectivity=26, min_size=1)
    c6 = _run_segment(tmp_path, "c6", preds, (4, 8, 8), connectivity=6, min_size=1)
    assert set(np.unique(open_volume(c26.output).read())) == {0, 1}
    assert len(np.unique(open_volume(c6.output).read())) == 7


def test_synapse_across_8_blocks_stats_and_partners(tmp_path):
    shape = (8, 32, 32)
    union = np.zeros(shape, np.uint8)
    pre = np.zeros(shape, np.uint8)
    post = np.zeros(shape, np.uint8)
    union[2:6, 10:22, 10:22] = 200
    union[3, 15, 15] = 250
    pre[2:6, 10:16, 10:22] = 220      # y < 16: pre side
    post[2:6, 16:22, 10:22] = 220     # y >= 16: post side
    union[0:2, 0:3, 0:3] = 255        # a small blob, filtered by size
    preds = _write_preds(f"{tmp_path}/p.zarr/pred", union, pre, post)
    neurons = np.zeros(shape, np.uint64)
    neurons[:, :16] = 7
    neurons[:, 16:] = 9
    seg = create_volume(f"{tmp_path}/n.zarr/neurons", shape=shape, voxel_size=VS, offset=(80, 40, 40),
                        dtype="uint64", chunk_shape=(4, 8, 8))
    seg.write(seg.roi, neurons)
    cfg = _run_segment(tmp_path, "s8", preds, (4, 16, 16), min_size=20)
    df = _run_partners(tmp_path, cfg, neurons=seg.url)
    labels = open_volume(cfg.output).read()
    assert set(np.unique(labels)) == {0, 1}
    assert len(df) == 1
    r = df.iloc[0]
    assert r["size"] == 4 * 12 * 12
    # centroid of voxels z 2..5, y 10..21, x 10..21 at voxel centres, offset (80, 40, 40)
    assert r["z"] == pytest.approx(80 + (3.5 + 0.5) * 40)
    assert r["y"] == pytest.approx(40 + (15.5 + 0.5) * 4)
    assert (r["bbox_z0"], r["bbox_z1"]) == (80 + 2 * 40, 80 + 6 * 40)
    assert r["score_max"] == pytest.approx(250 / 255)
    assert r["pre_neuron"] == 7 and r["post_neuron"] == 9
    assert r["pre_conf"] == 1.0 and r["post_conf"] == 1.0
    assert r["pre_y"] == pytest.approx(40 + (12.5 + 0.5) * 4)
    assert r["post_y"] == pytest.approx(40 + (18.5 + 0.5) * 4)
    assert r["flags"] == ""


def test_backends_give_identical_labels(tmp_path, dask_address):
    rng = np.random.default_rng(5)
    union = (rng.random((8, 32, 32)) < 0.3).astype(np.uint8) * 255
    preds = _write_preds(f"{tmp_path}/p.zarr/pred", union)
    a = _run_segment(tmp_path, "local", preds, (4, 8, 16), min_size=2)
    b = _run_segment(tmp_path, "daisy", preds, (4, 8, 16), min_size=2,
                     backend=BackendConfig("daisy", workers=2, progress=False))
    c = _run_segment(tmp_path, "dask", preds, (4, 8, 16), min_size=2,
                     backend=BackendConfig("dask", workers=2, address=dask_address, progress=False))
    la = open_volume(a.output).read()
    np.testing.assert_array_equal(la, open_volume(b.output).read())
    np.testing.assert_array_equal(la, open_volume(c.output).read())


def _one_blob_job(tmp_path):
    """(union, prediction URL, SegmentConfig) of an 8 x 16 x 16 volume with one blob, 8 blocks."""
    union = np.zeros((8, 16, 16), np.uint8)
    union[1:3, 2:5, 2:5] = 255
    preds = _write_preds(f"{tmp_path}/p.zarr/pred", union)
    cfg = SegmentConfig(predictions=preds, output=f"{tmp_path}/o.zarr/synapses",
                        work_dir=f"{tmp_path}/w", block_shape=(4, 8, 8), min_size=1)
    return union, preds, cfg


def test_relabel_refuses_predictions_changed_after_labelling(tmp_path):
    """The relabel pass recomputes each block's components; if the predictions changed since
    the labelling pass it stops with a message instead of writing wrong ids."""
    union, preds, cfg = _one_blob_job(tmp_path)
    label, stitch, relabel = segment_passes(cfg)
    run_task(label, BackendConfig(progress=False))
    run_task(stitch, BackendConfig(progress=False))
    union[1, 12:14, 12:14] = 255  # a new component in another block
    _write_preds(preds, union)
    from cleftwise.blockwise.errors import BlockwiseError

    with pytest.raises(BlockwiseError, match="input changed after the labelling pass"):
        run_task(segment_passes(cfg)[2], BackendConfig(progress=False, max_retries=0))
    assert os.path.exists(os.path.join(cfg.work_dir, "faces"))


def test_detection_inside_one_neuron_is_flagged_or_dropped(tmp_path):
    """A synapse joins two neurons; a look-alike inside one neuron (e.g. a mitochondrion) gets
    the one_neuron flag, and max_neuron_fraction drops it from the table (not from the labels)."""
    shape = (8, 32, 32)
    union, pre, post = (np.zeros(shape, np.uint8) for _ in range(3))
    union[2:6, 4:12, 4:12] = 230          # synapse across the y = 8 membrane: neurons 7 | 9
    pre[2:6, 4:8, 4:12] = 220
    post[2:6, 8:12, 4:12] = 220
    union[2:6, 20:28, 20:28] = 230        # look-alike inside neuron 11 only
    pre[2:6, 20:24, 20:28] = 220
    post[2:6, 24:28, 20:28] = 220
    preds = _write_preds(f"{tmp_path}/p.zarr/pred", union, pre, post)
    neurons = np.full(shape, 11, np.uint64)
    neurons[:, :8, :16] = 7
    neurons[:, 8:16, :16] = 9
    seg = create_volume(f"{tmp_path}/n.zarr/neurons", shape=shape, voxel_size=VS, offset=(80, 40, 40),
                        dtype="uint64", chunk_shape=(4, 8, 8))
    seg.write(seg.roi, neurons)
    tables = {}
    for name, nf in (("keep", None), ("drop", 0.85)):
        cfg = _run_segment(tmp_path, name, preds, (4, 16, 16), min_size=20)
        tables[name] = _run_partners(tmp_path, cfg, name, neurons=seg.url, partner_rule="contrast",
                                     max_neuron_fraction=nf)
        assert set(np.unique(open_volume(cfg.output).read())) == {0, 1, 2}
    keep = tables["keep"].set_index("id")
    assert not keep.loc[1, "flags"] and (keep.loc[1, "pre_neuron"], keep.loc[1, "post_neuron"]) == (7, 9)
    assert "one_neuron" in keep.loc[2, "flags"].split(",")
    assert tables["drop"]["id"].tolist() == [1]
    with pytest.raises(Exception, match="max_neuron_fraction"):
        PartnersConfig(max_neuron_fraction=1.5)


def test_corrupt_faces_file_is_named_in_the_error(tmp_path):
    _, _, cfg = _one_blob_job(tmp_path)
    label, stitch, _ = segment_passes(cfg)
    run_task(label, BackendConfig(progress=False))
    bad = os.path.join(cfg.work_dir, "faces", "4_8_8.npz")
    with open(bad, "wb") as f:
        f.write(b"not a zip file")
    from cleftwise.blockwise.errors import BlockwiseError

    with pytest.raises(BlockwiseError, match="faces file .*4_8_8.npz is unreadable"):
        run_task(stitch, BackendConfig(progress=False, max_retries=0))


def test_partners_rewrite_leaves_no_records_of_an_earlier_grid(tmp_path):
    """Records are owned by blocks of the partners grid: after a re-run on a coarser grid (and a
    stricter size filter), the DB holds exactly the new records, none from vanished blocks."""
    shape = (8, 32, 32)
    union = np.zeros(shape, np.uint8)
    union[1:3, 2:6, 2:6] = 255        # 32 voxels, in the first block
    union[5:7, 20:30, 20:30] = 255    # 200 voxels, in a later block of the fine grid
    preds = _write_preds(f"{tmp_path}/p.zarr/pred", union)
    fine = _run_segment(tmp_path, "fine", preds, (4, 16, 16), min_size=10)
    first = _run_partners(tmp_path, fine, "db")
    assert len(first) == 2 and len(set(first["block_id"])) == 2
    coarse = _run_segment(tmp_path, "coarse", preds, (8, 32, 32), min_size=100)
    again = _run_partners(tmp_path, coarse, "db", overwrite=True)
    assert len(again) == 1 and set(again["block_id"]) == {0} and again["size"].tolist() == [200]
