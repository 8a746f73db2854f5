"""The predict inner loop (issue "Prediction inner loop …"): every patch evaluated exactly once
(no padded batches), results independent of the batch size to 1e-5, reused buffers, glibc
malloc kept from returning freed blocks, and ``batch_size: auto`` calibrated once and cached."""

import json
import math
import platform
import sys

import numpy as np
import pytest
import torch

from cleftwise.blockwise.errors import BlockwiseError
from cleftwise.blockwise.runner import BackendConfig, run_task
from cleftwise.blockwise.sliding_window import (TorchPredictor, Workspace, batch_plan, blend_window, calibrate_batch_size,
                                                keep_freed_memory, patch_origins, predict_region)
from cleftwise.models.checkpoint import save_checkpoint
from cleftwise.models.rsunet import RSUNetConfig, build_rsunet
from cleftwise.postprocess import predict as predict_mod
from cleftwise.postprocess.errors import PostprocessError
from cleftwise.postprocess.predict import BATCH_CANDIDATES, PredictConfig, PredictStep, batch_cache_path
from cleftwise.storage.volume import create_volume, open_volume

VOL = (20, 90, 90)
PATCH = (8, 32, 32)
STRIDE = (4, 16, 16)
VS = (40, 4, 4)


@pytest.fixture(scope="module")
def predictor():
    torch.manual_seed(0)
    return TorchPredictor(build_rsunet(RSUNetConfig(filters=(4, 8, 8, 12), norm="group")), device="cpu")


def _raw(seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=VOL, dtype=np.uint8)


@pytest.mark.parametrize("batch_size", [1, 3, 4])
def test_every_patch_evaluated_exactly_once_unpadded(predictor, batch_size):
    raw = _raw(1)
    seen = []

    def model_fn(batch):
        seen.append(batch.shape[0])
        return predictor(batch)

    n = len(patch_origins((0, 0, 0), VOL, PATCH, STRIDE, VOL))
    before, calls = predictor.patches_evaluated, predictor.forward_calls
    predict_region(model_fn, raw, (0, 0, 0), (0, 0, 0), VOL, PATCH, STRIDE, VOL, None, batch_size=batch_size)
    assert predictor.patches_evaluated - before == n == sum(seen)
    assert predictor.forward_calls - calls == math.ceil(n / batch_size) == len(seen)
    # full batches, then the patches left over at their true size; never one patch alone when
    # batch_size >= 2 (issue 21: 100 patches by 3 → 32 batches of 3, then 2 + 2, not 3 + 1)
    assert seen == batch_plan(n, batch_size)
    if batch_size > 1:
        assert 1 not in seen
    rest = n % batch_size
    if rest != 1 or batch_size == 1:
        assert seen == [batch_size] * (n // batch_size) + ([rest] if rest else [])


def test_outputs_agree_across_batch_sizes(predictor):
    raw = _raw(2)
    outs = {b: predict_region(predictor, raw, (0, 0, 0), (0, 0, 0), VOL, PATCH, STRIDE, VOL, None, batch_size=b)
            for b in (1, 3, 4, 8)}
    for b in (3, 4, 8):
        np.testing.assert_allclose(outs[b], outs[1], atol=1e-5, rtol=0)


def test_workspace_is_reused_and_changes_nothing(predictor):
    raw = _raw(3)
    wb, we = (0, 0, 0), (10, 45, 45)
    fresh = predict_region(predictor, raw, (0, 0, 0), wb, we, PATCH, STRIDE, VOL, None, batch_size=3)
    ws = Workspace()
    a = predict_region(predictor, raw, (0, 0, 0), wb, we, PATCH, STRIDE, VOL, None, batch_size=3, workspace=ws)
    np.testing.assert_array_equal(a, fresh)
    held = ws.nbytes()
    buffers = {k: id(v) for k, v in ws._buffers.items()}
    b = predict_region(predictor, raw, (0, 0, 0), wb, we, PATCH, STRIDE, VOL, None, batch_size=3, workspace=ws)
    np.testing.assert_array_equal(b, fresh)
    assert ws.nbytes() == held and {k: id(v) for k, v in ws._buffers.items()} == buffers


def test_keep_freed_memory_once():
    first = keep_freed_memory()
    assert keep_freed_memory() is first
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert first == {"M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": 1 << 30}
    else:
        assert first == {}


class _FakeClock:
    """A model_fn whose call costs ``cost[b]`` seconds of a fake clock."""

    def __init__(self, cost, oom_at=None):
        self.t, self.cost, self.oom_at, self.calls = 0.0, cost, oom_at, []

    def clock(self):
        return self.t

    def __call__(self, batch):
        b = batch.shape[0]
        self.calls.append(b)
        if self.oom_at is not None and b >= self.oom_at:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")
        self.t += self.cost[b]
        return batch


def test_calibrate_picks_fastest_and_stops_when_throughput_drops():
    fake = _FakeClock({1: 1.0, 2: 1.5, 4: 3.5, 8: 6.0})  # patches/s: 1, 1.33, 1.14 (drop: stop)
    best, rates = calibrate_batch_size(fake, PATCH, (1, 2, 4, 8), clock=fake.clock)
    assert best == 2 and sorted(rates) == [1, 2, 4] and fake.calls == [1, 1, 2, 4]
    fake = _FakeClock({1: 1.0, 2: 1.0, 4: 1.0, 8: 1.0}, oom_at=8)
    best, rates = calibrate_batch_size(fake, PATCH, (1, 2, 4, 8), clock=fake.clock)
    assert best == 4 and sorted(rates) == [1, 2, 4]
    with pytest.raises(BlockwiseError, match="candidates"):
        calibrate_batch_size(fake, PATCH, (0, 2))


@pytest.fixture()
def small_job(tmp_path, monkeypatch):
    monkeypatch.setenv("CLEFTWISE_CACHE_DIR", str(tmp_path / "cache"))
    torch.manual_seed(0)
    cfg = RSUNetConfig(out_channels=3, filters=(4, 8, 12), anisotropic_levels=2, norm="group")
    ckpt = str(tmp_path / "model.pt")
    save_checkpoint(ckpt, build_rsunet(cfg), cfg, voxel_size=VS, extra={"patch_shape": list(PATCH)})
    vol = create_volume(str(tmp_path / "in.zarr/raw"), shape=(8, 32, 64), voxel_size=VS, dtype="uint8")
    vol.write(vol.roi, np.random.default_rng(0).integers(0, 255, (8, 32, 64), dtype=np.uint8))
    create_volume(str(tmp_path / "out.zarr/pred"), shape=(8, 32, 64), voxel_size=VS, dtype="uint8",
                  num_channels=3)

    def step(batch_size, output="out.zarr/pred"):
        return PredictStep(PredictConfig(input=vol.url, output=str(tmp_path / output), checkpoint=ckpt,
                                         block_shape=(8, 32, 64), patch_shape=PATCH, stride=STRIDE,
                                         batch_size=batch_size))
    return step


def test_auto_batch_calibrates_once_and_caches(small_job, monkeypatch, tmp_path):
    assert PredictConfig().batch_size == "auto"
    assert "batch_size" in PredictConfig.NOT_IDENTITY
    path = batch_cache_path()
    assert path == str(tmp_path / "cache" / "batch.json")
    calls = []
    real = predict_mod.calibrate_batch_size

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(predict_mod, "calibrate_batch_size", counting)
    with small_job("auto").open_worker() as w:
        chosen = w["batch_size"]
    assert chosen in BATCH_CANDIDATES and calls == [1]
    cache = json.load(open(path))
    (key, entry), = cache.items()
    assert entry["batch_size"] == chosen and str(chosen) in entry["patches_per_s"]
    assert {"weights_sha256", "patch", "device", "threads"} <= set(json.loads(key))
    # a second worker reuses the cached choice: no second calibration
    with small_job("auto").open_worker() as w:
        assert w["batch_size"] == chosen
    assert calls == [1]
    # a forced int is honoured, with no calibration
    with small_job(3).open_worker() as w:
        assert w["batch_size"] == 3
    assert calls == [1]


def test_auto_batch_survives_an_unwritable_cache(small_job, monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("CLEFTWISE_CACHE_DIR", str(blocker / "sub"))  # a folder below a file
    with small_job("auto").open_worker() as w:
        assert w["batch_size"] in BATCH_CANDIDATES


@pytest.mark.parametrize("bad", [0, "fast", 2.5, True])
def test_batch_size_validated(bad):
    with pytest.raises(PostprocessError, match="batch_size"):
        PredictConfig(batch_size=bad)


def test_auto_and_int_give_the_same_predictions(small_job):
    outs = []
    for b in ("auto", 1, 4):
        step = small_job(b, output=f"run_{b}.zarr/pred")
        run_task(step, BackendConfig(progress=False))
        outs.append(open_volume(step.cfg.output).read().astype(int))
    for o in outs[1:]:
        assert np.abs(o - outs[0]).max() <= 1
