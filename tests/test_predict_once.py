"""Each patch of the global grid is predicted once per job (issue 21): pass 1 runs the patches a
block owns and keeps exact fixed-point sums, pass 2 adds the neighbours' spill. The forward
passes equal the minimal grid and the output is byte-identical to the whole-volume prediction
for every block shape, ROI, output dtype, and after a crash in either pass."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from funlib.geometry import Roi

from cleftwise.blockwise.crashpoints import ENV
from cleftwise.blockwise.ledger import Ledger
from cleftwise.blockwise.patch_sums import BlendSums, box_minus_box, owned
from cleftwise.blockwise.runner import BackendConfig, run_task
from cleftwise.blockwise.sliding_window import (TorchPredictor, batch_plan, blend_profiles, grid_origins,
                                                predict_region, run_patches, to_uint8, torch_threads)
from cleftwise.models.checkpoint import load_model, save_checkpoint
from cleftwise.models.rsunet import RSUNetConfig, build_rsunet
from cleftwise.postprocess.pipeline import parse_config, run_pipeline
from cleftwise.postprocess.predict import PredictConfig, PredictStep
from cleftwise.storage.volume import create_volume, open_volume

VS = (40, 4, 4)
SHAPE = (20, 72, 88)  # 126,720 voxels; 4 x 4 x 5 = 80 grid patches
PATCH = (8, 32, 32)
STRIDE = (4, 16, 16)
OFFSET = (400, 40, 80)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("once")
    torch.manual_seed(0)
    cfg = RSUNetConfig(out_channels=3, filters=(4, 8, 12), anisotropic_levels=2, norm="group")
    ckpt = str(d / "model.pt")
    save_checkpoint(ckpt, build_rsunet(cfg), cfg, voxel_size=VS, extra={"patch_shape": list(PATCH)})
    vol = create_volume(str(d / "in.zarr/raw"), shape=SHAPE, voxel_size=VS, offset=OFFSET, dtype="uint8",
                        chunk_shape=(4, 8, 8))
    vol.write(vol.roi, np.random.default_rng(1).integers(0, 255, SHAPE, dtype=np.uint8))
    model, _ = load_model(ckpt, device="cpu")
    predictor = TorchPredictor(model, device="cpu")
    with torch_threads(1):
        whole = predict_region(predictor, vol.read(), (0, 0, 0), (0, 0, 0), SHAPE, PATCH, STRIDE, SHAPE,
                               blend_profiles(PATCH), batch_size=3, out_channels=3)
    n_grid = int(np.prod([len(o) for o in grid_origins(SHAPE, PATCH, STRIDE)]))
    assert predictor.patches_evaluated == n_grid
    return d, ckpt, vol.url, whole


def _cfg(setup, name, block, **kw):
    d, ckpt, raw_url, _ = setup
    return PredictConfig(input=raw_url, output=str(d / f"{name}.zarr/pred"), checkpoint=ckpt,
                         block_shape=block, patch_shape=PATCH, stride=STRIDE, batch_size=3,
                         torch_threads=1, **kw)


def _forward_passes(step: PredictStep) -> int:
    """Patches run through the model, as each worker's TorchPredictor counted them (stored
    with every block's done record)."""
    return sum(r["counters"]["forward_passes"] for r in Ledger(step.ledger_path()).records())


# patch-sized; odd sizes dividing nothing; README default (32, 256, 256) vs patch (18, 160, 160)
# scaled to this patch; one block = the whole volume
@pytest.mark.parametrize("block", [(8, 32, 32), (9, 33, 35), (14, 52, 52), SHAPE])
def test_each_patch_once_and_bytes_equal_whole_volume(setup, block):
    whole = setup[3]
    step = PredictStep(_cfg(setup, "b" + "_".join(map(str, block)), block))
    report = run_task(step, BackendConfig(progress=False))
    minimal = int(np.prod([len(o) for o in grid_origins(SHAPE, PATCH, STRIDE)]))
    assert report.extra["forward_passes_minimal"] == minimal
    assert report.extra["forward_passes"] == _forward_passes(step) == minimal
    assert report.extra["patches_padding"] == 0
    out = open_volume(step.cfg.output).read()
    assert out.dtype == np.uint8 and out.shape == (3,) + SHAPE
    assert out.tobytes() == to_uint8(whole).tobytes()
    # pass 2 deleted the sums once every block was blended
    assert not os.path.exists(os.path.dirname(step.sums_path(0)))


def test_sub_roi_float16(setup):
    """A ROI inside the volume (grid still anchored at the volume origin): the patches touching
    the ROI run once each, and the float16 output is the whole-volume blend cropped."""
    whole = setup[3]
    begin, shape = (9, 33, 49), (11, 39, 39)  # patches from before the ROI reach into it
    roi = Roi(tuple(o + b * v for o, b, v in zip(OFFSET, begin, VS)), tuple(s * v for s, v in zip(shape, VS)))
    step = PredictStep(_cfg(setup, "roi16", (8, 32, 32), output_dtype="float16", roi=(roi.begin, roi.shape)))
    report = run_task(step, BackendConfig(progress=False))
    touching = [o[(o < b + n) & (o + p > b)] for o, p, b, n in
                zip(grid_origins(SHAPE, PATCH, STRIDE), PATCH, begin, shape)]
    minimal = int(np.prod([len(t) for t in touching]))
    assert report.extra["forward_passes_minimal"] == minimal < int(np.prod([len(o) for o in grid_origins(SHAPE, PATCH, STRIDE)]))
    assert _forward_passes(step) == report.extra["forward_passes"] == minimal + report.extra["patches_padding"]
    out = open_volume(step.cfg.output)
    assert out.dtype == np.float16 and out.roi == roi
    expected = whole[(slice(None),) + tuple(slice(b, b + n) for b, n in zip(begin, shape))].astype(np.float16)
    assert out.read().tobytes() == expected.tobytes()


def test_batches_never_hold_one_patch_and_a_lone_patch_is_padded(setup):
    assert batch_plan(9, 4) == [4, 3, 2] and batch_plan(8, 4) == [4, 4] and batch_plan(5, 4) == [3, 2]
    assert batch_plan(3, 1) == [1, 1, 1] and batch_plan(1, 4) == [1] and batch_plan(0, 4) == []
    model, _ = load_model(setup[1], device="cpu")
    predictor = TorchPredictor(model, device="cpu")
    raw = open_volume(setup[2]).read()
    origins = np.array([[0, 0, 0], [4, 16, 16]])
    with torch_threads(1):
        stats: dict = {}
        lone = [p.copy() for _, p in run_patches(predictor, raw, (0, 0, 0), origins[:1], PATCH, 3, 3,
                                                 (0.0, 255.0), stats=stats)]
        assert stats == {"patches_run": 1, "patches_padded": 1} and predictor.patches_evaluated == 2
        pair = [p.copy() for _, p in run_patches(predictor, raw, (0, 0, 0), origins, PATCH, 3, 3, (0.0, 255.0))]
    # the lone patch ran in a batch of two: the same bits as beside another patch
    assert lone[0].tobytes() == pair[0].tobytes()


def test_sums_are_exact_whatever_the_split():
    """Integer sums: a block's own patches plus its neighbours' spill give the same bits as all
    patches at once, in any order (pure maths, a deterministic fake model)."""
    vol, patch, stride = (13, 40, 45), (6, 16, 16), (3, 8, 8)
    axes = grid_origins(vol, patch, stride)
    sums = BlendSums(vol, patch, stride, blend_profiles(patch, mode="gaussian"), axes)
    rng = np.random.default_rng(3)
    origins = [(int(z), int(y), int(x)) for z in axes[0] for y in axes[1] for x in axes[2]]
    preds = {o: rng.random((2,) + patch, dtype=np.float32) for o in origins}
    box = ((0, 0, 0), vol)
    ref = sums.zeros(2, box)
    for o in origins:
        sums.add(ref, (0, 0, 0), o, preds[o])
    shuffled = sums.zeros(2, box)
    for i in rng.permutation(len(origins)):
        sums.add(shuffled, (0, 0, 0), origins[i], preds[origins[i]])
    assert shuffled.tobytes() == ref.tobytes()
    # split at (7, 21, 30): sub-block sums over their own origins add up to the same integers
    cut = (7, 21, 30)
    split = sums.zeros(2, box)
    for corner in np.ndindex(2, 2, 2):
        wb = tuple(c if k else 0 for c, k in zip(cut, corner))
        we = tuple(n if k else c for c, n, k in zip(cut, vol, corner))
        own = [owned(o, p, b, e, 0, n) for o, p, b, e, n in zip(axes, patch, wb, we, vol)]
        part = sums.zeros(2, box)
        for o in origins:
            if all(x in set(a.tolist()) for x, a in zip(o, own)):
                sums.add(part, (0, 0, 0), o, preds[o])
        split += part
    assert split.tobytes() == ref.tobytes()
    out = sums.finalize(ref, box)
    assert out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1
    assert box_minus_box(((0, 0, 0), (4, 4, 4)), ((1, 2, 3), (4, 4, 4))) == [
        ((0, 0, 0), (1, 4, 4)), ((1, 0, 0), (4, 2, 4)), ((1, 2, 0), (4, 4, 3))]


# -- crashes ----------------------------------------------------------------------------------

def _job(setup, tmp_path, name):
    d, ckpt, raw_url, _ = setup
    conf = {"raw": raw_url, "output_dir": str(tmp_path / name),
            "backend": {"backend": "local", "progress": False},
            "predict": {"checkpoint": ckpt, "block_shape": [8, 32, 32], "patch_shape": list(PATCH),
                        "stride": list(STRIDE), "batch_size": 3, "torch_threads": 1}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(conf))
    return conf, path


def _crash(path, point):
    env = {**os.environ, ENV: point}
    r = subprocess.run([sys.executable, os.path.join(REPO, "launch", "predict_volume.py"), "--config", str(path),
                        "--stages", "predict", "--no-progress"], env=env, capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]


def _finish_and_check(setup, conf):
    summary = run_pipeline(parse_config(conf), ("predict",))
    out = open_volume(os.path.join(conf["output_dir"], "predictions.zarr", "pred")).read()
    assert out.tobytes() == to_uint8(setup[3]).tobytes()
    with open(os.path.join(conf["output_dir"], "run_summary.json")) as f:
        first, blend = json.load(f)["stages"]["predict"]
    minimal = int(np.prod([len(o) for o in grid_origins(SHAPE, PATCH, STRIDE)]))
    # the ledger holds one record per block: a block re-run after the crash counts once
    assert first["forward_passes"] == first["forward_passes_minimal"] == minimal
    assert first["task"] == "predict" and blend["task"] == "predict_blend"
    return summary


def test_crash_between_passes_and_inside_pass_2_then_rerun(setup, tmp_path):
    conf, path = _job(setup, tmp_path, "between")
    _crash(path, "pass_finished/predict")  # every block of pass 1 done, pass 2 not started
    _crash(path, "block_written/predict_blend:5")  # inside pass 2: 4 blocks blended
    summary = _finish_and_check(setup, conf)
    first, blend = summary["stages"]["predict"]
    assert first["processed"] == 0 and blend["skipped"] == 4 and blend["processed"] == blend["total"] - 4


def test_crash_inside_pass_1_then_rerun(setup, tmp_path):
    conf, path = _job(setup, tmp_path, "inside")
    _crash(path, "block_written/predict:4")  # 3 blocks done; the 4th written, not marked
    summary = _finish_and_check(setup, conf)
    first, blend = summary["stages"]["predict"]
    assert first["skipped"] == 3 and blend["processed"] == blend["total"]
