"""segment → partners → synapse DB on synthetic ground truth passed through as a perfect
prediction: every synapse found (F1 = 1), every partner pair right; with noise, worse."""

import os

import numpy as np
import pandas as pd
import pytest

from cleftwise.postprocess.metrics import instance_f1
from cleftwise.postprocess.pipeline import parse_config, run_pipeline
from cleftwise.storage.db import open_store
from cleftwise.storage.synthetic import SyntheticConfig, generate_volume, read_synapse_table
from cleftwise.storage.volume import create_volume, open_volume


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    d = tmp_path_factory.mktemp("gt")
    cfg = SyntheticConfig(shape=(24, 256, 256), seed=7, block_shape=(24, 128, 128),
                          chunk_shape=(8, 64, 64))
    res = generate_volume(cfg, str(d / "syn.zarr"))
    return d, res


def _pipeline(d, name, preds_url, neurons_url, min_size=20):
    conf = {"raw": os.path.join(str(d / "syn.zarr"), "raw"), "neurons": neurons_url,
            "output_dir": str(d / name), "backend": {"progress": False},
            "segment": {"predictions": preds_url, "block_shape": [8, 64, 64], "min_size": min_size,
                        "connectivity": 6}}
    cfg = parse_config(conf)
    summary = run_pipeline(cfg, stages=("segment", "partners", "connectome"))
    return cfg, summary


def test_perfect_prediction(synthetic):
    d, res = synthetic
    pol = open_volume(res.datasets["polarity"])
    preds = create_volume(str(d / "perfect.zarr/pred"), shape=tuple(pol.spatial_shape),
                          voxel_size=pol.voxel_size, offset=pol.offset, dtype="uint8",
                          chunk_shape=(8, 64, 64), num_channels=3)
    preds.write(preds.roi, pol.read() * 255)
    # min_size 1: the generator keeps partial synapses cut by the volume border, a few voxels big
    cfg, summary = _pipeline(d, "perfect", preds.url, res.datasets["neurons"], min_size=1)
    labels = open_volume(os.path.join(cfg.output_dir, "synapses.zarr", "labels")).read()
    gt = open_volume(res.datasets["synapses"]).read()
    m = instance_f1(labels, gt, iou_threshold=0.5)
    assert len(res.table) >= 3
    assert m.f1 == 1.0, m
    with open_store(cfg.db_url) as store:
        db = store.query()
    assert len(db) == len(res.table) == summary["stages"]["partners"]["synapses_in_db"]
    # partners: match DB records to GT synapses through the label overlap
    truth = read_synapse_table(res.path).set_index("id")
    pairs = dict(zip(m.matches["pred_id"].astype(int), m.matches["true_id"].astype(int)))
    checked = 0
    for r in db.itertuples():
        t = truth.loc[pairs[int(r.id)]]
        if int(r.pre_size) == 0 or int(r.post_size) == 0:
            # a synapse cut by the volume border may have lost a side: flagged, not dropped
            assert "background" in r.flags and "no_" in r.flags
            continue
        assert (int(r.pre_neuron), int(r.post_neuron)) == (int(t.pre_neuron), int(t.post_neuron))
        assert r.pre_conf == 1.0 and r.post_conf == 1.0 and r.flags == ""
        checked += 1
    assert checked >= len(db) - 1
    # the connectome stage exported the unsigned graph (no E/I yet): one edge per synapse pair
    edges = pd.read_parquet(os.path.join(cfg.output_dir, "graph", "edges.parquet"))
    assert summary["stages"]["connectome"]["edges"] == len(edges) >= 1
    assert edges["sign"].isna().all()  # no E/I yet: every sign unknown (missing, not 0)
    assert summary["stages"]["connectome"]["signed_neurons"] == 0
    assert summary["stages"]["connectome"]["signed_presynaptic"] == 0
    # idempotent: a second run changes nothing in the DB
    _pipeline(d, "perfect", preds.url, res.datasets["neurons"], min_size=1)
    with open_store(cfg.db_url) as store:
        again = store.query()
    pd.testing.assert_frame_equal(db.sort_values("id").reset_index(drop=True),
                                  again.sort_values("id").reset_index(drop=True))


def test_noise_degrades(synthetic):
    d, res = synthetic
    pol = open_volume(res.datasets["polarity"]).read().astype(np.float32)
    rng = np.random.default_rng(0)
    noisy = np.clip(pol * 0.6 + rng.random(pol.shape, dtype=np.float32) * 0.55, 0, 1)
    preds = create_volume(str(d / "noisy.zarr/pred"), shape=pol.shape[1:], voxel_size=(40, 4, 4),
                          dtype="uint8", chunk_shape=(8, 64, 64), num_channels=3)
    preds.write(preds.roi, (noisy * 255).astype(np.uint8))
    cfg, _ = _pipeline(d, "noisy", preds.url, res.datasets["neurons"])
    labels = open_volume(os.path.join(cfg.output_dir, "synapses.zarr", "labels")).read()
    m = instance_f1(labels, open_volume(res.datasets["synapses"]).read(), iou_threshold=0.5)
    assert m.f1 < 1.0
