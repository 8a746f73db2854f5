"""Blockwise sliding-window prediction: equals a whole-volume pass, same on every backend,
resumes exactly, refuses changed configs, and names bad inputs."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml
from funlib.geometry import Roi

from cleftwise.blockwise.errors import BlockwiseError
from cleftwise.postprocess.errors import PostprocessError
from cleftwise.postprocess.predict import PredictConfig, PredictStep
from cleftwise.blockwise.runner import BackendConfig, run_task, task_status
from cleftwise.blockwise.sliding_window import TorchPredictor, blend_window, predict_region, to_uint8
from cleftwise.models.checkpoint import load_model, save_checkpoint
from cleftwise.models.rsunet import RSUNetConfig, build_rsunet
from cleftwise.storage.volume import create_volume, open_volume

VS = (40, 4, 4)
SHAPE = (20, 72, 88)
PATCH = (8, 32, 32)
STRIDE = (4, 16, 16)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("predict")
    torch.manual_seed(0)
    cfg = RSUNetConfig(out_channels=3, filters=(4, 8, 12), anisotropic_levels=2, norm="group")
    model = build_rsunet(cfg)
    ckpt = str(d / "model.pt")
    save_checkpoint(ckpt, model, cfg, voxel_size=VS, extra={"patch_shape": list(PATCH)})
    raw_url = str(d / "in.zarr/raw")
    vol = create_volume(raw_url, shape=SHAPE, voxel_size=VS, offset=(400, 40, 80), dtype="uint8",
                        chunk_shape=(4, 8, 8))
    rng = np.random.default_rng(1)
    vol.write(vol.roi, rng.integers(0, 255, SHAPE, dtype=np.uint8))
    # whole-volume reference: one write region = the whole volume
    m, _ = load_model(ckpt, device="cpu")
    pred = TorchPredictor(m, device="cpu")
    whole = predict_region(pred, vol.read(), (0, 0, 0), (0, 0, 0), SHAPE, PATCH, STRIDE, SHAPE,
                           blend_window(PATCH), batch_size=4, out_channels=3)
    return d, ckpt, raw_url, to_uint8(whole)


def _cfg(d, ckpt, raw_url, name, block, **kw):
    return PredictConfig(input=raw_url, output=str(d / f"{name}.zarr/pred"), checkpoint=ckpt,
                         block_shape=block, chunk_shape=(4, 8, 8), patch_shape=PATCH,
                         stride=STRIDE, batch_size=3, **kw)


@pytest.mark.parametrize("block", [(8, 32, 32), (12, 40, 48), (20, 72, 88)])
def test_blockwise_equals_whole_volume(setup, block):
    d, ckpt, raw_url, whole = setup
    cfg = _cfg(d, ckpt, raw_url, f"b{'_'.join(map(str, block))}", block)
    run_task(PredictStep(cfg), BackendConfig(progress=False))
    out = open_volume(cfg.output)
    assert out.num_channels == 3 and out.dtype == np.uint8
    assert out.roi == open_volume(raw_url).roi and tuple(out.voxel_size) == VS
    diff = np.abs(out.read().astype(int) - whole.astype(int))
    assert diff.max() <= 1


@pytest.mark.parametrize("backend,workers", [("local", 1), ("daisy", 2), ("ray", 2), ("dask", 2)])
def test_backends_identical(setup, backend, workers, request):
    d, ckpt, raw_url, whole = setup
    extra = {}
    if backend == "ray":
        request.getfixturevalue("ray_cluster")
    if backend == "dask":
        extra["address"] = request.getfixturevalue("dask_address")
    cfg = _cfg(d, ckpt, raw_url, f"be_{backend}", (12, 40, 48), torch_threads=1)
    run_task(PredictStep(cfg), BackendConfig(backend, workers=workers, progress=False, **extra))
    ref = _cfg(d, ckpt, raw_url, "b12_40_48", (12, 40, 48))
    if not os.path.exists(ref.output):
        run_task(PredictStep(ref), BackendConfig(progress=False))
    a = open_volume(cfg.output).read()
    assert np.abs(a.astype(int) - open_volume(ref.output).read().astype(int)).max() <= 1


def test_float16_output_and_sub_roi(setup):
    d, ckpt, raw_url, whole = setup
    roi = Roi((400 + 4 * 40, 40 + 16 * 4, 80 + 8 * 4), (8 * 40, 32 * 4, 48 * 4))
    cfg = _cfg(d, ckpt, raw_url, "f16", (8, 32, 48), output_dtype="float16", roi=(roi.begin, roi.shape))
    run_task(PredictStep(cfg), BackendConfig(progress=False))
    out = open_volume(cfg.output)
    assert out.dtype == np.float16 and out.roi == roi
    sub = whole[:, 4:12, 16:48, 8:56].astype(np.float32) / 255
    assert np.abs(out.read().astype(np.float32) - sub).max() <= 1 / 255 + 1e-3


def test_kill_and_resume_byte_identical(setup, tmp_path):
    d, ckpt, raw_url, whole = setup
    conf = {"raw": raw_url, "output_dir": str(tmp_path / "job"),
            "backend": {"backend": "local", "progress": False},
            "predict": {"checkpoint": ckpt, "block_shape": [8, 32, 32], "chunk_shape": [4, 8, 8],
                        "patch_shape": list(PATCH), "stride": list(STRIDE), "batch_size": 1}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(conf))
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "launch/predict_volume.py"),
                             "--config", str(path), "--stages", "predict"], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    from cleftwise.postprocess.pipeline import parse_config
    from cleftwise.postprocess.stages import REGISTRY

    task = None
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            run_cfg = parse_config(conf)
            task = task or next(iter(REGISTRY["predict"].steps(run_cfg, run_cfg.predict)))
            if task_status(task).done >= 3:
                break
        except Exception:
            pass
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = task_status(task).done
    assert 3 <= done < task_status(task).total
    r = subprocess.run([sys.executable, os.path.join(REPO, "launch/predict_volume.py"), "--config",
                        str(path), "--stages", "predict", "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f'"skipped": {done}' in r.stdout
    ref = PredictConfig(input=raw_url, output=str(tmp_path / "ref.zarr/pred"), checkpoint=ckpt,
                        block_shape=(8, 32, 32), chunk_shape=(4, 8, 8), patch_shape=PATCH,
                        stride=STRIDE, batch_size=1)
    run_task(PredictStep(ref), BackendConfig(progress=False))
    a = open_volume(os.path.join(str(tmp_path / "job"), "predictions.zarr", "pred")).read()
    assert a.tobytes() == open_volume(ref.output).read().tobytes()
    # status CLI reports it
    s = subprocess.run([sys.executable, os.path.join(REPO, "launch/predict_volume.py"), "--config",
                        str(path), "--status"], capture_output=True, text=True)
    assert '"remaining": 0' in s.stdout


def test_changed_config_refused(setup):
    d, ckpt, raw_url, _ = setup
    cfg = _cfg(d, ckpt, raw_url, "chg", (20, 72, 88))
    run_task(PredictStep(cfg), BackendConfig(progress=False))
    cfg2 = _cfg(d, ckpt, raw_url, "chg", (20, 72, 88), blend="gaussian")
    with pytest.raises(BlockwiseError, match="changed: blend"):
        run_task(PredictStep(cfg2), BackendConfig(progress=False))


def test_bad_inputs(setup, tmp_path):
    d, ckpt, raw_url, _ = setup
    with pytest.raises(Exception, match="not found in container"):
        PredictStep(_cfg(d, ckpt, str(d / "in.zarr/missing"), "x", (8, 32, 32)))
    f = create_volume(str(tmp_path / "f.zarr/raw"), shape=(20, 72, 88), voxel_size=VS, dtype="uint16")
    with pytest.raises(PostprocessError, match="must be uint8"):
        PredictStep(_cfg(d, ckpt, f.url, "x", (8, 32, 32)))
    c = create_volume(str(tmp_path / "f.zarr/rgb"), shape=(20, 72, 88), voxel_size=VS, num_channels=3)
    with pytest.raises(PostprocessError, match=r"3D \(z, y, x\)"):
        PredictStep(_cfg(d, ckpt, c.url, "x", (8, 32, 32)))
    v = create_volume(str(tmp_path / "f.zarr/vs"), shape=(20, 72, 88), voxel_size=(50, 4, 4))
    with pytest.raises(PostprocessError, match="voxel size mismatch"):
        PredictStep(_cfg(d, ckpt, v.url, "x", (8, 32, 32)))
    with pytest.raises(PostprocessError, match="smaller than the patch"):
        PredictStep(_cfg(d, ckpt, raw_url, "x", (4, 32, 32)))
    with pytest.raises(PostprocessError, match="does not suit"):
        PredictStep(PredictConfig(input=raw_url, output=str(tmp_path / "o.zarr/p"), checkpoint=ckpt,
                                  block_shape=(8, 32, 32), patch_shape=(8, 30, 30)))
