"""bench_predict sections ``grid`` and ``volara`` (issue 21, items 4 and 5).

``grid``: forward passes the engine runs vs the minimal global patch grid, and its wall vs a
bare ``model(batch)`` loop over exactly that grid, on one uint8 volume with a small seeded
RSUNet (filters 4, 8, 12, 16; 3 output channels; 2 torch threads; batch 4 everywhere), patch
18 x 160 x 160, stride 9 x 80 x 80, at four block shapes: the whole volume as one block, the
README default 32 x 256 x 256, 64 x 512 x 512 and 18 x 160 x 160. Every engine run is
``run_task(PredictStep(cfg), local)`` end to end in this process (checkpoint load, reads,
forward, blending, uint8, zarr write, ledger); patches are counted by wrapping
``RSUNet.forward`` (benchmark instrumentation only) and compared with the grid's size; the
output of every block shape is compared byte for byte with the whole-volume run. The volume is
chosen so the grid is exact ((n - patch) a multiple of the stride on every axis).

``volara``: volara 1.0.5 + volara-torch's ``Predict`` (gunpowder pipeline per block, serial
daisy server, 1 worker, 2 torch threads) in its own virtual environment, on a 45 x 480 x 480
volume (100 patches; ``--quick``: the grid section's 36 x 320 x 320),
with the same weights and the same eager module (cleftwise's RSUNet, pickled whole with a wrapper
that applies the sigmoid and crops the central 9 x 80 x 80; cleftwise's model code is put on the
venv's PYTHONPATH, nothing of cleftwise is installed there), reading exactly the same 18 x 160 x 160 patches: its write blocks are the stride,
its context (4, 40, 40) below and (5, 40, 40) above, its ROI the grid's interior, so it runs
the same number of forward passes on the same inputs as the minimal grid. Throughput = volume
voxels / wall (the volume cleftwise predicts; volara writes only the grid's interior, which is
less work, not more); both timed inside their processes after imports, each a fresh process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
VOXEL_SIZE = (40, 4, 4)
PATCH = (18, 160, 160)
STRIDE = (9, 80, 80)
FILTERS = (4, 8, 12, 16)
BATCH = 4
THREADS = 2
GRID_FULL = (81, 560, 560)   # 8 x 6 x 6 = 288 patches on the exact grid
GRID_QUICK = (36, 320, 320)  # 3 x 3 x 3 = 27 patches
VOLARA_FULL = (45, 480, 480)  # 4 x 5 x 5 = 100 patches (volara runs ~4x the CPU per patch)
BLOCKS = {"default_32x256x256": (32, 256, 256), "large_64x512x512": (64, 512, 512),
          "patch_18x160x160": (18, 160, 160)}
VOLARA_PY = os.path.join(HERE, "scratch", "venv-volara", "bin", "python")
TARGETS = {"forward_passes_vs_minimal_grid": 1.05, "throughput_vs_forward": 0.9, "volara_throughput_ratio": 2.5}


class PatchCounter:
    """Counts ``RSUNet.forward`` calls and patches (batch rows) while active, and the wall and
    calling-thread CPU seconds spent inside it."""

    def __enter__(self):
        from cleftwise.models import rsunet

        self.calls = self.patches = 0
        self.seconds = self.thread_cpu_s = 0.0
        self._cls, self._orig = rsunet.RSUNet, rsunet.RSUNet.forward
        counter = self

        def counted(module, x):
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return counter._orig(module, x)
            finally:
                counter.seconds += time.perf_counter() - t0
                counter.thread_cpu_s += time.thread_time() - c0  # = CPU of the pass with 1 torch thread
                counter.calls += 1
                counter.patches += int(x.shape[0])

        self._cls.forward = counted
        return self

    def __exit__(self, *exc):
        self._cls.forward = self._orig


def build_model(work: str, out_channels: int = 3):
    """A seeded RSUNet saved as a cleftwise checkpoint; returns (checkpoint path, model)."""
    import torch

    from cleftwise.models.checkpoint import load_model, save_checkpoint
    from cleftwise.models.rsunet import RSUNetConfig, build_rsunet

    torch.manual_seed(0)
    mcfg = RSUNetConfig(out_channels=out_channels, filters=FILTERS, anisotropic_levels=2, norm="batch")
    ckpt = os.path.join(work, "model.pt")
    save_checkpoint(ckpt, build_rsunet(mcfg), mcfg, voxel_size=VOXEL_SIZE, extra={"patch_shape": list(PATCH)})
    model, _ = load_model(ckpt, device="cpu")
    model.eval()
    return ckpt, model


def minimal_grid(shape: tuple) -> list:
    """(N, 3) origins of the minimal global grid, raster order."""
    from cleftwise.blockwise.sliding_window import grid_origins

    oz, oy, ox = grid_origins(shape, PATCH, STRIDE)
    return [(int(z), int(y), int(x)) for z in oz for y in oy for x in ox]


def time_forward_grid(model, raw: np.ndarray, origins: list) -> float:
    """Bare ``model(batch)`` over ``origins`` in batches of BATCH, inputs prepared beforehand."""
    import torch

    tensors = []
    for s in range(0, len(origins), BATCH):
        b = origins[s:s + BATCH]
        arr = np.stack([raw[z:z + PATCH[0], y:y + PATCH[1], x:x + PATCH[2]] for z, y, x in b])
        tensors.append(torch.from_numpy(arr[:, None].astype(np.float32) / np.float32(255)))
    t0 = time.perf_counter()
    with torch.inference_mode():
        for x in tensors:
            model(x)
    return time.perf_counter() - t0


def run_engine(raw_url: str, ckpt: str, out: str, block: tuple) -> dict:
    from cleftwise.blockwise.runner import BackendConfig, run_task
    from cleftwise.postprocess.predict import PredictConfig, PredictStep

    cfg = PredictConfig(input=raw_url, output=out, checkpoint=ckpt, block_shape=block, patch_shape=PATCH,
                        stride=STRIDE, blend="bump", batch_size=BATCH, output_dtype="uint8", device="cpu",
                        torch_threads=THREADS)
    with PatchCounter() as pc:
        t0 = time.perf_counter()
        rep = run_task(PredictStep(cfg), BackendConfig("local", progress=False), overwrite=True)
        sec = time.perf_counter() - t0
    return {"seconds": sec, "forward_calls": pc.calls, "patches": pc.patches,
            "forward_seconds_in_run": pc.seconds, "blocks": rep.total,
            "report_extra": {k: v for k, v in rep.extra.items() if isinstance(v, (int, float, str, bool))}}


def grid_section(quick: bool, repeats: int) -> dict:
    """Forward passes and wall vs the minimal grid at several block shapes (see module doc)."""
    import torch

    from cleftwise.storage.volume import create_volume, open_volume

    torch.set_num_threads(THREADS)
    shape = GRID_QUICK if quick else GRID_FULL
    origins = minimal_grid(shape)
    voxels = int(np.prod(shape))
    load_start = [round(x, 2) for x in os.getloadavg()]
    print(f"grid: volume {shape}, patch {PATCH}, stride {STRIDE}, minimal grid {len(origins)} patches, "
          f"filters {FILTERS}, batch {BATCH}, {THREADS} threads, {repeats} repeat(s); load {load_start}")
    work = tempfile.mkdtemp(prefix="cleftwise_bench_grid_")
    try:
        raw = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
        raw_url = os.path.join(work, "in.zarr", "raw")
        vol = create_volume(raw_url, shape=shape, voxel_size=VOXEL_SIZE, dtype="uint8", chunk_shape=(18, 160, 160))
        vol.write(vol.roi, raw)
        ckpt, model = build_model(work)
        blocks = {"whole_volume": shape, **BLOCKS}
        # warm-up: oneDNN primitives, code paths
        time_forward_grid(model, raw, origins[:BATCH])
        run_engine(raw_url, ckpt, os.path.join(work, "warm.zarr", "pred"), shape)
        runs = {k: [] for k in ["forward_minimal_grid", *blocks]}
        for rep in range(repeats):
            t = time_forward_grid(model, raw, origins)
            runs["forward_minimal_grid"].append({"seconds": t})
            print(f"  repeat {rep + 1}: forward over the minimal grid {t:7.3f} s")
            for key, block in blocks.items():
                r = run_engine(raw_url, ckpt, os.path.join(work, f"{key}.zarr", "pred"), block)
                runs[key].append(r)
                print(f"  repeat {rep + 1}: engine {key:20s} {r['seconds']:7.3f} s, {r['patches']} patches in "
                      f"{r['forward_calls']} calls, {r['blocks']} blocks")
        whole = open_volume(os.path.join(work, "whole_volume.zarr", "pred")).read()
        f_best = min(r["seconds"] for r in runs["forward_minimal_grid"])
        results = {"forward_minimal_grid": {"seconds": round(f_best, 3), "patches": len(origins),
                                            "all_seconds": [round(r["seconds"], 3) for r in runs["forward_minimal_grid"]],
                                            "voxels_per_s": round(voxels / f_best)}}
        for key, block in blocks.items():
            best = min(runs[key], key=lambda r: r["seconds"])
            out = open_volume(os.path.join(work, f"{key}.zarr", "pred")).read()
            results[key] = {
                "block": list(block), "blocks": best["blocks"], "seconds": round(best["seconds"], 3),
                "all_seconds": [round(r["seconds"], 3) for r in runs[key]],
                "patches": best["patches"], "forward_calls": best["forward_calls"],
                "forward_passes_ratio_to_minimal_grid": round(best["patches"] / len(origins), 4),
                "throughput_ratio_to_forward": round(f_best / best["seconds"], 4),
                "in_run_forward_share": round(best["forward_seconds_in_run"] / best["seconds"], 4),
                "voxels_per_s": round(voxels / best["seconds"]),
                "byte_identical_to_whole_volume": bool(out.tobytes() == whole.tobytes()),
                "report_extra": best["report_extra"]}
        met = {}
        for key in ("default_32x256x256", "patch_18x160x160"):
            met[f"{key}: forward passes <= 1.05 x minimal grid"] = \
                results[key]["forward_passes_ratio_to_minimal_grid"] <= TARGETS["forward_passes_vs_minimal_grid"]
            met[f"{key}: output byte-identical to whole volume"] = results[key]["byte_identical_to_whole_volume"]
        met["default_32x256x256: throughput >= 0.9 x forward over the minimal grid"] = \
            results["default_32x256x256"]["throughput_ratio_to_forward"] >= TARGETS["throughput_vs_forward"]
        params = sum(p.numel() for p in model.parameters())
        return {"shape": list(shape), "voxels": voxels, "patch": list(PATCH), "stride": list(STRIDE),
                "filters": list(FILTERS), "parameters": int(params), "batch_size": BATCH, "torch_threads": THREADS,
                "input": "uniform random uint8 (seed 1)", "minimal_grid_patches": len(origins),
                "repeats": repeats, "load_avg_start": load_start,
                "load_avg_end": [round(x, 2) for x in os.getloadavg()], "results": results, "met": met}
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- volara ---------------------------------------------------------------------------------

VOLARA_RUN = r'''
"""Run volara-torch's Predict once on spec["raw_npy"] (timed after imports); print JSON."""
import json, os, resource, sys, time
spec = json.loads(sys.argv[1])
import numpy as np
import torch
torch.set_num_threads(spec["threads"])
from funlib.geometry import Coordinate, Roi
from funlib.persistence import prepare_ds
from volara.datasets import Raw
from volara_torch.blockwise import Predict
from volara_torch.models import TorchModel
from importlib import metadata
vs = Coordinate(spec["voxel_size"])
raw = np.load(spec["raw_npy"])
ds = prepare_ds(spec["raw_zarr"], shape=raw.shape, offset=Coordinate(0, 0, 0), voxel_size=vs,
                dtype=np.uint8, chunk_shape=tuple(spec["patch"]), axis_names=["z", "y", "x"], units=["nm"] * 3)
ds[ds.roi] = raw
ctx_lo, ctx_hi = Coordinate(spec["context_low"]), Coordinate(spec["context_high"])
model = TorchModel(save_path=spec["model"], in_channels=1, min_input_shape=spec["patch"],
                   min_output_shape=spec["stride"], min_step_shape=(1, 1, 1), out_channels=spec["out_channels"],
                   out_range=(0.0, 1.0), context_override=(spec["context_low"], spec["context_high"]))
roi = Roi(ctx_lo * vs, Coordinate(spec["write_shape"]) * vs)
task = Predict(checkpoint=model, in_data=Raw(store=spec["raw_zarr"], scale_shift=(1.0 / 255, 0.0)),
               out_data=[Raw(store=spec["out_zarr"])], roi=roi, num_workers=1)
me = resource.getrusage(resource.RUSAGE_SELF)
cpu0, t0 = me.ru_utime + me.ru_stime, time.perf_counter()
task.run_blockwise(multiprocessing=False)
sec = time.perf_counter() - t0
me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
cpu = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime - cpu0
from funlib.persistence import open_ds
out = open_ds(spec["out_zarr"])
data = out.to_ndarray(out.roi)
np.save(spec["out_npy"], data)
print(json.dumps({"seconds": sec, "cpu_s": cpu, "out_shape": list(data.shape),
                  "versions": {d: metadata.version(d) for d in ("volara", "volara-torch", "daisy", "gunpowder",
                                                                  "funlib.persistence", "zarr", "torch")}}))
'''

CLEFTWISE_RUN = r'''
import json, os, resource, sys, time
spec = json.loads(sys.argv[1])
import importlib.util  # load the sibling module by its path (this child runs with -c)
_spec = importlib.util.spec_from_file_location("predict_grid", os.path.join(spec["bench_dir"], "predict_grid.py"))
_mod = importlib.util.module_from_spec(_spec)
sys.modules["predict_grid"] = _mod
_spec.loader.exec_module(_mod)
run_engine = _mod.run_engine
me = resource.getrusage(resource.RUSAGE_SELF)
cpu0 = me.ru_utime + me.ru_stime
r = run_engine(spec["raw_url"], spec["ckpt"], spec["out"], tuple(spec["block"]))
me = resource.getrusage(resource.RUSAGE_SELF)
r["cpu_s"] = me.ru_utime + me.ru_stime - cpu0
print(json.dumps(r))
'''


class Cropped(torch.nn.Module):
    """``sigmoid(inner(x))`` cropped by ``lo``/``hi`` voxels (z, y, x) at the low/high faces: the
    central write block volara expects (defined at import, so a pickled instance loads)."""

    def __init__(self, inner, lo: tuple, hi: tuple):
        super().__init__()
        self.inner, self.lo, self.hi = inner, tuple(lo), tuple(hi)

    def forward(self, x):
        y = torch.sigmoid(self.inner(x))
        (a, b, c), (d, e, f) = self.lo, self.hi
        return y[:, :, a:y.shape[2] - d, b:y.shape[3] - e, c:y.shape[4] - f]


def _run_json(cmd: list, log: str, env: dict | None = None, cwd: str | None = None) -> dict:
    with open(log, "w") as f:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True, env=env, cwd=cwd)
    if p.returncode != 0:
        with open(log) as f:
            raise RuntimeError(f"{cmd[0]} {cmd[1][:40]}... failed ({p.returncode}):\n{f.read()[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def volara_section(quick: bool, repeats: int, volara_python: str = VOLARA_PY) -> dict:
    """cleftwise (whole volume and default blocks) vs volara Predict, same weights and patches."""
    import torch

    from cleftwise.storage.volume import create_volume

    if not os.path.exists(volara_python):
        return {"not_run": f"no volara virtual environment at {volara_python} (set-up in benchmarks/requirements.txt)"}
    shape = GRID_QUICK if quick else VOLARA_FULL
    origins = minimal_grid(shape)
    voxels = int(np.prod(shape))
    ctx_lo = tuple((p - s) // 2 for p, s in zip(PATCH, STRIDE))         # (4, 40, 40)
    ctx_hi = tuple(p - s - c for p, s, c in zip(PATCH, STRIDE, ctx_lo))  # (5, 40, 40)
    write_shape = tuple(n - p + s for n, p, s in zip(shape, PATCH, STRIDE))  # = grid size x stride
    load_start = [round(x, 2) for x in os.getloadavg()]
    print(f"volara: volume {shape}, {len(origins)} patches {PATCH} (the minimal grid), {repeats} repeat(s); "
          f"load {load_start}")
    work = tempfile.mkdtemp(prefix="cleftwise_bench_volara_")
    try:
        raw = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
        raw_url = os.path.join(work, "in.zarr", "raw")
        vol = create_volume(raw_url, shape=shape, voxel_size=VOXEL_SIZE, dtype="uint8", chunk_shape=(18, 160, 160))
        vol.write(vol.roi, raw)
        np.save(os.path.join(work, "raw.npy"), raw)
        ckpt, model = build_model(work)
        # the same eager module for volara: pickled whole (torch.load(weights_only=False) is how
        # volara-torch loads a model), its classes importable in volara's venv via PYTHONPATH
        ts_path = os.path.join(work, "model_module.pt")
        torch.save(Cropped(model, ctx_lo, ctx_hi).eval(), ts_path)
        pp = os.path.join(work, "pythonpath")
        os.makedirs(pp)
        os.symlink(os.path.dirname(HERE), os.path.join(pp, "cleftwise"))  # the repo root is the package
        venv_env = {**os.environ, "PYTHONPATH": os.pathsep.join([HERE, pp])}
        runs = {"cleftwise_whole": [], "cleftwise_default": [], "volara": []}
        kept = {}
        for rep in range(repeats):
            for key in runs:
                if key == "volara":
                    out_zarr = os.path.join(work, f"volara_{rep}.zarr", "pred")
                    spec = {"threads": THREADS, "voxel_size": list(VOXEL_SIZE), "raw_npy": os.path.join(work, "raw.npy"),
                            "raw_zarr": os.path.join(work, f"volara_in_{rep}.zarr", "raw"), "patch": list(PATCH),
                            "stride": list(STRIDE), "context_low": list(ctx_lo), "context_high": list(ctx_hi),
                            "model": ts_path, "out_channels": 3, "write_shape": list(write_shape),
                            "out_zarr": out_zarr, "out_npy": os.path.join(work, "volara_out.npy")}
                    # volara keeps its block-done marks in ./volara_logs and skips blocks marked
                    # there: a fresh working directory per run, so every run does all the work
                    cwd = os.path.join(work, f"volara_cwd_{rep}")
                    os.makedirs(cwd)
                    r = _run_json([volara_python, "-c", VOLARA_RUN, json.dumps(spec)],
                                  os.path.join(work, f"volara_{rep}.log"), env=venv_env, cwd=cwd)
                    r["patches"] = len(origins)  # one forward pass per write block = per grid patch
                else:
                    block = shape if key == "cleftwise_whole" else BLOCKS["default_32x256x256"]
                    out = os.path.join(work, f"{key}_{rep}.zarr", "pred")
                    spec = {"bench_dir": HERE, "raw_url": raw_url, "ckpt": ckpt, "out": out, "block": list(block)}
                    r = _run_json([sys.executable, "-c", CLEFTWISE_RUN, json.dumps(spec)],
                                  os.path.join(work, f"{key}_{rep}.log"))
                    kept[key] = out
                runs[key].append(r)
                print(f"  repeat {rep + 1}: {key:18s} {r['seconds']:7.3f} s wall, {r['cpu_s']:7.2f} CPU s, "
                      f"{r['patches']} patches")
        # agreement on the interior volara writes (its blocks are not blended: expect differences
        # of the order of the blend, none of the patch content)
        from cleftwise.storage.volume import open_volume

        vo = np.load(os.path.join(work, "volara_out.npy"))
        cw = open_volume(kept["cleftwise_whole"]).read()[:, ctx_lo[0]:ctx_lo[0] + write_shape[0],
                                                           ctx_lo[1]:ctx_lo[1] + write_shape[1],
                                                           ctx_lo[2]:ctx_lo[2] + write_shape[2]]
        agree = {"volara_out_shape": list(vo.shape), "cleftwise_interior_shape": list(cw.shape)}
        # same patches? volara's output of the first and last grid patch vs the model run here on
        # exactly that patch (sigmoid, central crop, volara's truncating uint8 conversion)
        same = []
        crop = Cropped(model, ctx_lo, ctx_hi).eval()
        for o in (origins[0], origins[-1]):
            x = raw[o[0]:o[0] + PATCH[0], o[1]:o[1] + PATCH[1], o[2]:o[2] + PATCH[2]].astype(np.float32) / 255
            with torch.inference_mode():
                p = crop(torch.from_numpy(x)[None, None])[0].numpy()
            ref = np.clip(p * 255, 0, 255).astype(np.uint8)
            got = vo[:, o[0]:o[0] + STRIDE[0], o[1]:o[1] + STRIDE[1], o[2]:o[2] + STRIDE[2]]
            same.append(int(np.abs(ref.astype(np.int16) - got.astype(np.int16)).max()) if got.shape == ref.shape
                        else f"shape {got.shape} vs {ref.shape}")
        agree["volara_vs_direct_patch_max_abs_uint8_first_last"] = same
        if vo.shape == cw.shape:
            d = np.abs(vo.astype(np.int16) - cw.astype(np.int16))
            agree.update(max_abs_uint8=int(d.max()), mean_abs_uint8=round(float(d.mean()), 4))
        results = {}
        for key, rs in runs.items():
            best = min(rs, key=lambda r: r["seconds"])
            results[key] = {"seconds": round(best["seconds"], 3), "all_seconds": [round(r["seconds"], 3) for r in rs],
                            "cpu_s": round(best["cpu_s"], 2), "patches": best["patches"],
                            "voxels_per_s": round(voxels / best["seconds"])}
        vol_sec = results["volara"]["seconds"]
        for key in ("cleftwise_whole", "cleftwise_default"):
            results[key]["throughput_ratio_to_volara"] = round(vol_sec / results[key]["seconds"], 3)
            # load-robust twin: CPU seconds for the same work
            results[key]["cpu_ratio_volara_to_this"] = round(results["volara"]["cpu_s"] / results[key]["cpu_s"], 3)
        return {"shape": list(shape), "voxels": voxels, "patches": len(origins), "patch": list(PATCH),
                "stride": list(STRIDE), "filters": list(FILTERS), "batch_size_cleftwise": BATCH,
                "batch_size_volara": 1, "torch_threads": THREADS, "repeats": repeats,
                "volara_write_roi_voxels": {"begin": list(ctx_lo), "shape": list(write_shape)},
                "versions_volara_venv": runs["volara"][-1].get("versions"),
                "load_avg_start": load_start, "load_avg_end": [round(x, 2) for x in os.getloadavg()],
                "results": results, "agreement_interior": agree,
                "met": {"cleftwise (default blocks) >= 2.5 x volara throughput":
                        results["cleftwise_default"]["throughput_ratio_to_volara"] >= TARGETS["volara_throughput_ratio"]}}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def markdown(res: dict) -> list:
    """Markdown lines of the grid and volara sections present in ``res``."""
    lines = []
    g = res.get("grid")
    if g:
        m = res.get("grid_measured", {})
        lines += ["", "## Forward passes and time vs the minimal global grid (section `grid`)", "",
                  f"Measured {m.get('measured_at', '?')}, commit {m.get('git', {}).get('commit', '?')}; load "
                  f"{g['load_avg_start']} → {g['load_avg_end']} (shared machine). Volume {tuple(g['shape'])} "
                  f"({g['voxels']:,} voxels, {g['input']}), patch {tuple(g['patch'])}, stride {tuple(g['stride'])}: "
                  f"minimal grid **{g['minimal_grid_patches']} patches**. Seeded RSUNet filters {tuple(g['filters'])} "
                  f"({g['parameters']:,} parameters), batch {g['batch_size']}, {g['torch_threads']} threads; min of "
                  f"{g['repeats']} repeat(s).", "",
                  "| run | blocks | wall s | patches run | / minimal grid | forward-loop time / wall | "
                  "share in model.forward | output = whole-volume run (bytes) |",
                  "|---|---:|---:|---:|---:|---:|---:|---|"]
        f = g["results"]["forward_minimal_grid"]
        lines.append(f"| bare model(batch) over the minimal grid | — | {f['seconds']:.3f} | {f['patches']} | 1.000 | "
                     "1.000 | 1.000 | — |")
        for key, e in g["results"].items():
            if key == "forward_minimal_grid":
                continue
            lines.append(f"| engine, {key} {tuple(e['block'])} | {e['blocks']} | {e['seconds']:.3f} | {e['patches']} | "
                         f"**{e['forward_passes_ratio_to_minimal_grid']:.3f}** | **{e['throughput_ratio_to_forward']:.3f}** | "
                         f"{e['in_run_forward_share']:.3f} | {e['byte_identical_to_whole_volume']} |")
        lines += ["", "Targets (issue 21): " + "; ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in g["met"].items())
                  + "."]
    v = res.get("volara")
    if v:
        m = res.get("volara_measured", {})
        lines += ["", "## cleftwise vs volara `Predict` at equal work (section `volara`)", ""]
        if "not_run" in v:
            lines.append(f"Not run: {v['not_run']}.")
            return lines
        ver = v.get("versions_volara_venv") or {}
        lines += [f"Measured {m.get('measured_at', '?')}, commit {m.get('git', {}).get('commit', '?')}; load "
                  f"{v['load_avg_start']} → {v['load_avg_end']}. volara venv: "
                  + ", ".join(f"{k} {x}" for k, x in ver.items()) + ". "
                  f"Volume {tuple(v['shape'])}, the same {v['patches']} patches {tuple(v['patch'])} (the minimal grid; "
                  f"volara: write blocks {tuple(v['stride'])} with context, ROI = the grid's interior "
                  f"{tuple(v['volara_write_roi_voxels']['shape'])}), the same seeded weights and eager module, "
                  f"{v['torch_threads']} threads; cleftwise batch {v['batch_size_cleftwise']}, volara 1 patch per "
                  f"block; each run a fresh process, timed after imports; min of {v['repeats']}.", "",
                  "| run | wall s | CPU s | patches | volume voxels/s | throughput / volara (wall) | "
                  "volara CPU s / CPU s |", "|---|---:|---:|---:|---:|---:|---:|"]
        for key, e in v["results"].items():
            lines.append(f"| {key} | {e['seconds']:.3f} | {e['cpu_s']:.2f} | {e['patches']} | {e['voxels_per_s']:,} | "
                         f"**{e.get('throughput_ratio_to_volara', 1.0)}** | {e.get('cpu_ratio_volara_to_this', 1.0)} |")
        lines += ["", f"Interior agreement (volara does not blend): {v['agreement_interior']}.",
                  "", "Targets (issue 21): " + "; ".join(f"{k}: {'met' if x else 'NOT met'}" for k, x in v["met"].items())
                  + "."]
    return lines
