"""Blockwise classify stage: every synapse filled exactly once, resumable after kill -9, equal to a
one-shot non-blockwise run; clear errors for bad input."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch

from cleftwise.blockwise.runner import BackendConfig, run_task, task_status
from cleftwise.models.checkpoint import save_checkpoint
from cleftwise.models.classifiers import VGG3D, VGG3DConfig
from cleftwise.postprocess.classify import ClassifyConfig, ClassifyStep, classify_table
from cleftwise.postprocess.errors import PostprocessError
from cleftwise.storage.db import open_store
from cleftwise.storage.volume import create_volume

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (12, 80, 72)
VS = (40, 4, 4)
OFFSET = (400, -80, 40)
CUBE = (4, 16, 16)
N_SYN = 70


def _checkpoint(path, threshold=0.5, voxel_size=VS, classes=("E", "I"), extra=None):
    torch.manual_seed(3)
    cfg = VGG3DConfig(input_shape=CUBE, fmaps=(4, 8), down_factors=((1, 2, 2), (2, 2, 2)),
                      anisotropic_levels=1, fc=(8,), dropout=0.0, num_classes=len(classes))
    model = VGG3D(cfg)
    with torch.no_grad():  # a visible spread of probabilities: scale the output layer up
        model.classifier[-1].weight.mul_(20.0)
    ex = {"classes": list(classes), "class_signs": {"E": 1, "I": -1, "M": 0}, "cube_shape": list(CUBE),
          "threshold": threshold}
    ex["class_signs"] = {c: ex["class_signs"][c] for c in classes}
    ex.update(extra or {})
    save_checkpoint(path, model, cfg, voxel_size, extra=ex)
    return str(path) + ".pt"


@pytest.fixture()
def setup(tmp_path):
    rng = np.random.default_rng(11)
    raw = create_volume(str(tmp_path / "d.zarr" / "raw"), shape=SHAPE, voxel_size=VS, offset=OFFSET,
                        dtype="uint8", chunk_shape=(4, 32, 32))
    data = rng.integers(0, 256, SHAPE, dtype=np.uint8)
    raw.write(raw.roi, data)
    vox = np.stack([rng.integers(0, s, N_SYN) for s in SHAPE], axis=1)
    vox[:4] = [[0, 0, 0], [SHAPE[0] - 1, SHAPE[1] - 1, SHAPE[2] - 1], [0, SHAPE[1] - 1, 3], [5, 0, 70]]
    pos = np.asarray(OFFSET) + (vox + 0.5) * np.asarray(VS)
    db_url = f"sqlite:///{tmp_path / 'syn.db'}"
    recs = pd.DataFrame({"id": np.arange(101, 101 + N_SYN), "z": pos[:, 0], "y": pos[:, 1], "x": pos[:, 2],
                         "pre_neuron": rng.integers(1, 9, N_SYN)})
    with open_store(db_url) as db:
        db.upsert_many(recs)
    ckpt = _checkpoint(tmp_path / "clf")
    cfg = ClassifyConfig(raw=raw.url, db=db_url, checkpoint=ckpt, work_dir=str(tmp_path / "work"),
                         block_shape=(4, 32, 32), batch_size=8, device="cpu")
    return cfg, recs


def _db(cfg):
    with open_store(cfg.db) as db:
        return db.query(columns=["ei_prob", "ei_label", "classifier"]).set_index("id").sort_index()


def _assert_equal_to_reference(cfg, got):
    ref = classify_table(cfg).set_index("id").sort_index()
    assert got.index.tolist() == ref.index.tolist()
    np.testing.assert_allclose(got["ei_prob"].to_numpy(float), ref["ei_prob"].to_numpy(float), atol=1e-6)
    assert got["ei_label"].tolist() == ref["ei_label"].tolist()
    assert (got["classifier"] == ref["classifier"]).all()
    return ref


def test_blockwise_equals_one_shot_and_fills_each_synapse_once(setup):
    cfg, recs = setup
    task = ClassifyStep(cfg)
    report = run_task(task, BackendConfig(progress=False))
    assert report.total == len(task.blocks()) == 3 * 3 * 3
    index = pd.read_parquet(task.index_path)
    assert sorted(index["id"]) == sorted(recs["id"]) and index["id"].is_unique  # one block per synapse
    blocks = {b.block_id: b for b in task.blocks()}
    for row in index.itertuples():
        p = recs.set_index("id").loc[row.id, ["z", "y", "x"]].to_numpy()
        assert blocks[row.block_id].write_roi.contains(tuple(int(v) for v in p))
    assert index["block_id"].nunique() > 5
    got = _db(cfg)
    assert got["ei_prob"].notna().all() and got["ei_label"].isin(["E", "I"]).all()
    assert got["classifier"].str.startswith("vgg3d:").all()
    ref = _assert_equal_to_reference(cfg, got)
    assert 0.02 < (ref["ei_label"] == "E").mean() < 0.98, "the test model should give both classes"
    # the checkpoint's τ is applied: E iff p(E) >= τ
    assert ((got["ei_prob"] >= 0.5) == (got["ei_label"] == "E")).all()
    # a second run is a no-op (all blocks done)
    again = run_task(ClassifyStep(cfg), BackendConfig(progress=False))
    assert again.processed == 0 and again.skipped == report.total


def test_threshold_override_changes_labels_only(setup, tmp_path):
    cfg, _ = setup
    cfg.threshold = 0.8
    run_task(ClassifyStep(cfg), BackendConfig(progress=False))
    got = _db(cfg)
    assert ((got["ei_prob"] >= 0.8) == (got["ei_label"] == "E")).all()


_KILL_SCRIPT = textwrap.dedent("""
    import contextlib, json, os, signal, sys
    sys.path.insert(0, {repo!r})
    from cleftwise.blockwise.runner import BackendConfig, run_task
    from cleftwise.postprocess.classify import ClassifyConfig, ClassifyStep

    class KilledTask(ClassifyStep):
        @contextlib.contextmanager
        def worker(self):
            with super().worker() as fn:
                n = [0]
                def process(block):
                    fn(block)                       # the DB update of this block is written ...
                    n[0] += 1
                    if n[0] == {kill_after}:        # ... but the ledger never hears of it
                        os.kill(os.getpid(), signal.SIGKILL)
                yield process

    cfg = ClassifyConfig(**json.loads(sys.argv[1]))
    run_task(KilledTask(cfg), BackendConfig(progress=False))
""")


def test_resume_after_kill9_fills_everything_equal_to_one_shot(setup, tmp_path):
    cfg, recs = setup
    script = tmp_path / "killed.py"
    script.write_text(_KILL_SCRIPT.format(repo=REPO, kill_after=10))
    args = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()}
    proc = subprocess.run([sys.executable, str(script), json.dumps(args)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    task = ClassifyStep(cfg)
    status = task_status(task)
    assert status.done == 9, status  # the 10th block wrote but was not marked done
    partial = _db(cfg)
    assert 0 < partial["ei_prob"].notna().sum() < N_SYN
    report = run_task(task, BackendConfig(progress=False))
    assert report.resumed and report.skipped == 9 and report.processed == report.total - 9
    got = _db(cfg)
    assert got["ei_prob"].notna().all()
    _assert_equal_to_reference(cfg, got)


def test_changed_db_refuses_resume_until_overwrite(setup):
    cfg, recs = setup
    run_task(ClassifyStep(cfg), BackendConfig(progress=False))
    with open_store(cfg.db) as db:  # a record added after the job ran
        db.upsert_many(pd.DataFrame({"id": [5000], "z": recs["z"][:1], "y": recs["y"][:1], "x": recs["x"][:1]}))
    from cleftwise.blockwise.errors import BlockwiseError

    with pytest.raises(BlockwiseError, match="changed: db_records"):
        run_task(ClassifyStep(cfg), BackendConfig(progress=False))
    # device / batch size are not part of the job identity
    cfg_other = ClassifyConfig(**{**cfg.__dict__, "batch_size": 3})
    run_task(ClassifyStep(cfg_other), BackendConfig(progress=False), overwrite=True)
    got = _db(cfg)
    assert got["ei_prob"].notna().all() and len(got) == N_SYN + 1
    assert run_task(ClassifyStep(cfg), BackendConfig(progress=False)).processed == 0


def test_synapse_outside_the_volume_is_named(setup):
    cfg, _ = setup
    with open_store(cfg.db) as db:
        db.upsert_many(pd.DataFrame({"id": [999], "z": [OFFSET[0] - 40.0], "y": [0.0], "x": [100.0]}))
    with pytest.raises(PostprocessError, match=r"1 synapse\(s\) lie outside raw volume.*id\(s\) 999"):
        run_task(ClassifyStep(cfg), BackendConfig(progress=False))


def test_model_and_config_mismatches_are_clear(setup, tmp_path):
    cfg, _ = setup
    other = _checkpoint(tmp_path / "vs8", voxel_size=(40, 8, 8))
    with pytest.raises(PostprocessError, match=r"voxel size \(40, 4, 4\).*trained at \(40, 8, 8\)"):
        ClassifyStep(ClassifyConfig(**{**cfg.__dict__, "checkpoint": other}))
    bad_shape = _checkpoint(tmp_path / "shape", extra={"cube_shape": [4, 32, 32]})
    with pytest.raises(PostprocessError, match=r"cube_shape \(4, 32, 32\) differs from the model's input_shape"):
        ClassifyStep(ClassifyConfig(**{**cfg.__dict__, "checkpoint": bad_shape}))
    bad_classes = _checkpoint(tmp_path / "cls", extra={"classes": ["E", "I", "M"],
                                                       "class_signs": {"E": 1, "I": -1, "M": 0}})
    with pytest.raises(PostprocessError, match=r"3 classes .* but the model has 2 outputs"):
        ClassifyStep(ClassifyConfig(**{**cfg.__dict__, "checkpoint": bad_classes}))
    with pytest.raises(PostprocessError, match="'checkpoint' is not set"):
        ClassifyStep(ClassifyConfig(**{**cfg.__dict__, "checkpoint": ""}))
    with pytest.raises(PostprocessError, match="block_shape"):
        ClassifyConfig(block_shape=(4, 0, 32))


def test_three_classes_with_signs(tmp_path, setup):
    cfg, _ = setup
    ckpt = _checkpoint(tmp_path / "three", classes=("E", "I", "M"), threshold=None)
    cfg3 = ClassifyConfig(**{**cfg.__dict__, "checkpoint": ckpt, "work_dir": str(tmp_path / "w3")})
    run_task(ClassifyStep(cfg3), BackendConfig(progress=False))
    got = _db(cfg3)
    assert got["ei_label"].isin(["E", "I", "M"]).all() and got["ei_prob"].between(0, 1).all()
    _assert_equal_to_reference(cfg3, got)
