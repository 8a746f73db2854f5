"""Input contracts, secrets and clear errors: raw intensity ranges checked on every read, the
classify step on dask closes cleanly, DB passwords never written, one-line errors for bad
commands and configs."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from cleftwise.blockwise.runner import BackendConfig, run_task
from cleftwise.models.checkpoint import read_checkpoint_meta, save_checkpoint
from cleftwise.models.classifiers import VGG3D, VGG3DConfig
from cleftwise.models.errors import ModelError
from cleftwise.models.rsunet import RSUNetConfig, build_rsunet
from cleftwise.postprocess.classify import ClassifyConfig, ClassifyStep, classify_table
from cleftwise.postprocess.errors import PostprocessError
from cleftwise.postprocess.predict import PredictConfig, PredictStep
from cleftwise.storage.db import open_store
from cleftwise.storage.volume import create_volume, open_volume

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VS = (40, 4, 4)
SHAPE = (8, 48, 48)
PATCH = (8, 32, 32)
CUBE = (4, 16, 16)


def _volume(path, data, dtype):
    vol = create_volume(str(path), shape=SHAPE, voxel_size=VS, dtype=dtype, chunk_shape=(8, 24, 24))
    vol.write(vol.roi, data.astype(dtype))
    return vol.url


@pytest.fixture(scope="module")
def raws(tmp_path_factory):
    """The same EM as uint8, float32 holding 0–255, and uint16 (× 257); a tiny RSUNet and a
    tiny VGG3D classifier."""
    d = tmp_path_factory.mktemp("raws")
    u8 = np.random.default_rng(5).integers(0, 256, SHAPE, dtype=np.uint8)
    torch.manual_seed(0)
    rcfg = RSUNetConfig(out_channels=3, filters=(4, 8, 12), anisotropic_levels=2, norm="group")
    save_checkpoint(str(d / "unet.pt"), build_rsunet(rcfg), rcfg, voxel_size=VS, extra={"patch_shape": list(PATCH)})
    ccfg = VGG3DConfig(input_shape=CUBE, fmaps=(4, 8), down_factors=((1, 2, 2), (2, 2, 2)),
                       anisotropic_levels=1, fc=(8,), dropout=0.0, num_classes=2)
    clf = VGG3D(ccfg)
    with torch.no_grad():
        clf.classifier[-1].weight.mul_(20.0)
    save_checkpoint(str(d / "clf.pt"), clf, ccfg, VS, extra={"classes": ["E", "I"], "class_signs": {"E": 1, "I": -1},
                                                              "cube_shape": list(CUBE), "threshold": 0.5})
    return {"dir": d, "u8": _volume(d / "v.zarr/u8", u8, "uint8"),
            "f255": _volume(d / "v.zarr/f255", u8, "float32"),
            "u16": _volume(d / "v.zarr/u16", u8.astype(np.uint16) * 257, "uint16"),
            "unet": str(d / "unet.pt"), "clf": str(d / "clf.pt")}


def _predict(raws, raw, name, **kw):
    cfg = PredictConfig(input=raws[raw], output=str(raws["dir"] / f"{name}.zarr/pred"), checkpoint=raws["unet"],
                        block_shape=SHAPE, patch_shape=PATCH, stride=(4, 16, 16), device="cpu", **kw)
    run_task(PredictStep(cfg), BackendConfig(progress=False, max_retries=0))
    return open_volume(cfg.output).read()


# ------------------------------------------------------------------------------------------
# 1. raw intensity contract
# ------------------------------------------------------------------------------------------

def test_float_raw_holding_0_255_is_refused_by_predict_unless_raw_range_says_so(raws):
    with pytest.raises(Exception) as e:
        _predict(raws, "f255", "f255_bad")
    msg = str(e.value)
    assert raws["f255"] in msg and "float32" in msg and "observed min 0 max 255" in msg
    assert "expected [0, 1]" in msg and "predict.raw_range" in msg
    step = PredictStep(PredictConfig(input=raws["f255"], output=str(raws["dir"] / "x.zarr/pred"),
                                     checkpoint=raws["unet"], block_shape=SHAPE, patch_shape=PATCH))
    step.prepare(fresh=True)
    with step.worker() as run, pytest.raises(PostprocessError, match=r"observed min 0 max 255, expected \[0, 1\]"):
        run(step.blocks()[0])
    # declared: the same predictions as the uint8 volume, byte for byte
    ref = _predict(raws, "u8", "u8")
    assert _predict(raws, "f255", "f255_ok", raw_range=(0, 255)).tobytes() == ref.tobytes()
    # the declared range is part of the job identity
    assert step.identity().get("raw_range") is None
    assert PredictStep(PredictConfig(**{**step.cfg.__dict__, "raw_range": (0, 255)})).identity()["raw_range"] == [0, 255]


def test_uint16_raw_needs_a_raw_range(raws):
    with pytest.raises(PostprocessError, match=r"u16: raw must be uint8 \(0–255\) or float32 \(0–1\), "
                                               r"got uint16.*set predict.raw_range"):
        _predict(raws, "u16", "u16_bad")
    got = _predict(raws, "u16", "u16_ok", raw_range=(0, 65535))
    ref = _predict(raws, "u8", "u8")
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1
    with pytest.raises(Exception, match=r"observed min 0 max 65535, expected \[0, 1000\]"):
        _predict(raws, "u16", "u16_narrow", raw_range=(0, 1000))


def _classify_cfg(raws, raw, tmp_path, **kw):
    rng = np.random.default_rng(2)
    vox = np.stack([rng.integers(0, s, 12) for s in SHAPE], axis=1)
    pos = (vox + 0.5) * np.asarray(VS)
    db = f"sqlite:///{tmp_path / 'syn.db'}"
    with open_store(db) as store:
        store.upsert_many(pd.DataFrame({"id": np.arange(1, 13), "z": pos[:, 0], "y": pos[:, 1], "x": pos[:, 2],
                                        "pre_neuron": rng.integers(1, 4, 12)}))
    return ClassifyConfig(raw=raws[raw], db=db, checkpoint=raws["clf"], work_dir=str(tmp_path / f"work_{raw}"),
                          block_shape=(8, 24, 24), batch_size=4, device="cpu", **kw)


def test_float_raw_holding_0_255_is_refused_by_classify_unless_raw_range_says_so(raws, tmp_path):
    cfg = _classify_cfg(raws, "f255", tmp_path)
    step = ClassifyStep(cfg)
    step.prepare(fresh=True)
    with step.worker() as run, pytest.raises(PostprocessError) as e:
        for b in step.blocks():
            run(b)
    msg = str(e.value)
    assert raws["f255"] in msg and "float32" in msg and "expected [0, 1]" in msg and "classify.raw_range" in msg
    with pytest.raises(PostprocessError, match="classify.raw_range"):
        classify_table(cfg)
    ok = classify_table(_classify_cfg(raws, "f255", tmp_path, raw_range=(0, 255)))
    ref = classify_table(_classify_cfg(raws, "u8", tmp_path))
    np.testing.assert_array_equal(ok["ei_prob"].to_numpy(), ref["ei_prob"].to_numpy())
    with pytest.raises(PostprocessError, match=r"got uint16.*classify.raw_range"):
        ClassifyStep(_classify_cfg(raws, "u16", tmp_path))
    u16 = classify_table(_classify_cfg(raws, "u16", tmp_path, raw_range=(0, 65535)))
    np.testing.assert_allclose(u16["ei_prob"].to_numpy(), ref["ei_prob"].to_numpy(), atol=1e-5)


# ------------------------------------------------------------------------------------------
# 3. classify on dask: the DB connection never crosses threads
# ------------------------------------------------------------------------------------------

def test_classify_on_dask_closes_without_a_thread_error(raws, tmp_path, dask_address, capfd, caplog):
    from distributed import Client

    from cleftwise.blockwise.ledger import Ledger
    from cleftwise.blockwise.pool import _dask_close, _dask_process

    cfg = _classify_cfg(raws, "u8", tmp_path)
    report = run_task(ClassifyStep(cfg), BackendConfig("dask", address=dask_address, progress=False))
    assert report.processed > 0
    with open_store(cfg.db) as store:
        assert store.query(columns=["ei_prob"])["ei_prob"].notna().all()
    # what the runner does, without its error suppression: open in a task thread, close from
    # the worker's event loop (client.run raises the worker's exception here)
    step = ClassifyStep(cfg)
    with Client(dask_address, timeout="20s") as client:
        key = f"test-close-{os.getpid()}"
        client.submit(_dask_process, step, key, Ledger(step.ledger_path()).path, 0, step.blocks()[0],
                      pure=False).result()
        closed = client.run(_dask_close, key)
    assert sum(closed.values()) >= 1
    out, err = capfd.readouterr()
    assert "ProgrammingError" not in out + err + caplog.text


# ------------------------------------------------------------------------------------------
# 7. secrets
# ------------------------------------------------------------------------------------------

SECRET = "s3cret-Pw"


def test_db_password_is_never_written(tmp_path):
    from cleftwise.postprocess.demo import DemoConfig, make_volume, pipeline_dict

    demo = DemoConfig(out_dir=str(tmp_path / "demo"), shape=(18, 192, 192), seed=7, block_shape=(18, 192, 192),
                      progress=False)
    data = pipeline_dict(demo, make_volume(demo))
    data["db"] = f"mongomock://alice:{SECRET}@dbhost/synapses"
    data["predict"]["stride"] = [18, 32, 32]
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    cmd = [sys.executable, os.path.join(REPO, "launch/predict_volume.py"), "--config", str(path)]
    run = subprocess.run(cmd + ["-v", "--no-progress"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    status = subprocess.run(cmd + ["--status"], capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr[-3000:]
    assert "alice:***@dbhost" in status.stdout
    leaks = [f for f in _files(data["output_dir"]) if SECRET.encode() in open(f, "rb").read()]
    assert leaks == []
    for text in (run.stdout, run.stderr, status.stdout, status.stderr):
        assert SECRET not in text
    # an unreachable DB: the error names the URL redacted
    data["db"] = f"mongodb://alice:{SECRET}@127.0.0.1:9/synapses?serverSelectionTimeoutMS=200"
    path.write_text(yaml.safe_dump(data))
    bad = subprocess.run(cmd + ["--stages", "classify"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "alice:***@127.0.0.1" in bad.stderr and SECRET not in bad.stdout + bad.stderr


def _files(root):
    for d, _, names in os.walk(root):
        for n in names:
            yield os.path.join(d, n)


def test_db_password_from_environment_or_file(tmp_path, monkeypatch):
    from cleftwise.postprocess.pipeline import parse_config, pipeline_status
    from cleftwise.storage.db.credentials import PASSWORD_FILE_ENV, with_password

    monkeypatch.delenv("CLEFTWISE_DB_PASSWORD", raising=False)
    monkeypatch.delenv(PASSWORD_FILE_ENV, raising=False)
    assert with_password("mongodb://alice@h/db") == "mongodb://alice@h/db"
    monkeypatch.setenv("CLEFTWISE_DB_PASSWORD", "p@ss/w")
    assert with_password("mongodb://alice@h:27017/db") == "mongodb://alice:p%40ss%2Fw@h:27017/db"
    assert with_password("mongodb://alice:given@h/db") == "mongodb://alice:given@h/db"
    assert with_password("sqlite:////tmp/a@b.db") == "sqlite:////tmp/a@b.db"
    monkeypatch.delenv("CLEFTWISE_DB_PASSWORD")
    secret = tmp_path / "pw.txt"
    secret.write_text(SECRET + "\n")
    raw = create_volume(str(tmp_path / "r.zarr/raw"), shape=SHAPE, voxel_size=VS, dtype="uint8")
    cfg = parse_config({"raw": raw.url, "output_dir": str(tmp_path / "out"), "db": "mongomock://alice@h/db",
                        "db_password_file": str(secret)})
    status = pipeline_status(cfg)
    assert os.environ[PASSWORD_FILE_ENV] == str(secret)
    assert with_password(cfg.db_url) == f"mongomock://alice:{SECRET}@h/db"
    assert SECRET not in json.dumps(status) and "error" not in status["synapse_db"]


# ------------------------------------------------------------------------------------------
# 11. clear errors
# ------------------------------------------------------------------------------------------

def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "cleftwise.launch.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def test_import_synapses_without_preset_or_map_is_a_usage_error(tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("a,b\n1,2\n")
    r = _cli("import-synapses", "--db", f"sqlite:///{tmp_path / 's.db'}", "--table", str(table))
    # neither a preset nor a mapping: the layout is detected (cleftwise, CAVE, neuPrint/MANC);
    # a table of none of them is one clear error naming its columns and the ways out
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "cannot tell the table's layout from its columns ['a', 'b']; choose a preset" in r.stderr


def test_malformed_yaml_names_file_line_and_column(tmp_path):
    from cleftwise.postprocess.pipeline import PipelineConfig
    from cleftwise.storage.config_io import load_config

    bad = tmp_path / "job.yaml"
    bad.write_text("raw: x\npredict:\n  checkpoint: [a, b\n  block_shape: 3\n")
    expected = f"config file {bad} is not valid YAML at line 4, column 14: expected ',' or ']', but got ':'"
    with pytest.raises(PostprocessError) as e:
        load_config(PipelineConfig, str(bad), error=PostprocessError)
    assert expected in str(e.value)
    r = _cli("predict", "--config", str(bad))
    assert r.returncode == 2 and r.stderr.strip().startswith(f"error: {expected}") and "Traceback" not in r.stderr


def test_missing_checkpoint_names_the_pt_asked_for(tmp_path):
    with pytest.raises(ModelError, match=f"checkpoint not found: {tmp_path / 'nope.pt'} "):
        read_checkpoint_meta(tmp_path / "nope.pt")


def test_negative_block_shape_names_the_field_and_leaves_no_output(raws, tmp_path):
    out = tmp_path / "job"
    conf = {"raw": raws["u8"], "output_dir": str(out),
            "predict": {"checkpoint": raws["unet"], "block_shape": [8, -32, 32]}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(conf))
    r = _cli("predict", "--config", str(path), "--stages", "predict")
    assert r.returncode == 1 and "predict.block_shape" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def test_help_texts(tmp_path):
    r = _cli("config-reference", "--help")
    assert r.returncode == 0 and "usage: cleftwise config-reference" in r.stdout
    r = _cli("predict", "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    assert "skip blocks already done (default) (default" not in text
    assert "(default: None)" not in text
    for line in r.stdout.split("\n  -"):
        assert line.count("default") <= 1, line


# ------------------------------------------------------------------------------------------
# 12. printed follow-up commands work from any folder
# ------------------------------------------------------------------------------------------

def test_demo_summary_prints_absolute_commands(tmp_path, monkeypatch):
    from cleftwise.postprocess.demo import format_summary

    monkeypatch.chdir(tmp_path)
    s = {"seconds": {"total": 1.0}, "peak_rss_mib": 1.0, "synapses_found": 0, "synapses_true": 0,
         "precision": None, "recall": None, "f1": None, "prepost_accuracy": None, "partner_accuracy": None,
         "ei": {"accuracy": None, "matched_with_call": 0}, "graph": {}, "figures": {"m": "figures/m.png"},
         "output_dir": "demo dir/run", "graph_dir": "demo dir/run/graph", "db": "sqlite:///demo dir/run/s.db",
         "config": "demo dir/pipeline.yaml"}
    text = format_summary(s)
    assert f"cleftwise predict --config '{tmp_path}/demo dir/pipeline.yaml'" in text
    assert f"cleftwise predict --config '{tmp_path}/demo dir/pipeline.yaml' --status" in text
    assert f"{tmp_path}/figures/m.png" in text and f"{tmp_path}/demo dir/run" in text
