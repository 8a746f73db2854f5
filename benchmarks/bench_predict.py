"""Benchmark: blockwise prediction engine vs pure model forward vs MONAI sliding windows vs chunkflow.

Section ``engine`` measures, on one uint8 EM volume and one small, seeded RSUNet (CPU, 2 torch
threads, all in this process):

(a) **forward**: only ``model(x)`` over exactly the patches the engine evaluates (the global-grid
    origins of every block, grouped in the engine's batches), inputs prepared beforehand;
(b) **engine**: ``run_task(PredictStep(cfg), BackendConfig("local"))`` end to end (checkpoint
    load, TensorStore read, batched forward, blending, uint8 conversion, zarr write, ledger),
    once with several blocks and once with one block = the whole volume;
(c) **MONAI**: ``monai.inferers.sliding_window_inference`` with overlap 0.5 and Gaussian
    blending on the same model and volume (input read from the same zarr, output kept in memory).

Every variant is warmed up once and then repeated (interleaved, to spread the load of a shared
machine evenly); the minimum is reported. The engine output is checked against a direct
``predict_region`` call over the whole volume.

Section ``peers`` (issue "Prediction inner loop …", item 4) runs, each in a fresh child process
with one thread (``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``), interleaved, on the shipped
``models/weights/rsunet_polarity.pt`` and a 36 x 384 x 384 volume (48 patches 18 x 160 x 160,
overlap 9 x 80 x 80): cleftwise (``run_task`` of a ``PredictStep``, the whole volume one block),
chunkflow 1.2.0's ``Inferencer`` (``framework='pytorch'``, ``bump='wu'``,
``mask_output_chunk=True``) from its own virtual environment with cleftwise's model through a
generated adapter file, and a bare ``model(batch)`` loop over the same patches (cleftwise's batch
size and batch 1). Per contender: wall, CPU (user + sys) and minor page faults of the whole
process (``wait4`` rusage of the child) and of the step alone (measured inside the child), peak
RSS, forward calls and patches (counted by wrapping ``RSUNet.forward``); the ratios the issue
targets; and the agreement of cleftwise's and chunkflow's probabilities (overall and within 8
voxels of the volume faces).

chunkflow set-up (once; ``benchmarks/scratch/`` is git-ignored; chunkflow is not a cleftwise
dependency)::

    python -m venv benchmarks/scratch/venv-chunkflow --system-site-packages
    benchmarks/scratch/venv-chunkflow/bin/pip install chunkflow==1.2.0

Sections ``grid`` (forward passes and wall vs the minimal global patch grid at the README default
block, 64 x 512 x 512 and 18 x 160 x 160 blocks; outputs compared byte for byte with the
whole-volume run) and ``volara`` (volara 1.0.5 ``Predict`` in its own venv at equal work: same
weights, same patches) live in ``predict_grid.py``; see its docstring.

Results: ``benchmarks/results/bench_predict{,_quick}.{json,md}``; a section not run
(``--sections``) is carried over from the existing file, marked with when it was measured.

Run: ``python benchmarks/bench_predict.py [--quick] [--repeats N] [--sections engine,peers,grid,volara]
[--profile] [--chunkflow-python PATH] [--volara-python PATH]`` (the full run takes ~10 min for
``peers`` and ~10 min for ``engine`` on 2 shared cores; ``grid`` (1 repeat unless ``--repeats``)
~12 min and ``volara`` ~8 min at load ~5; ``--quick`` ~1-2 min each).
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import json
import os
import platform
import pstats
import resource
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

import numpy as np
import psutil
import torch

from cleftwise.postprocess.predict import PredictConfig, PredictStep
from cleftwise.blockwise.runner import BackendConfig, run_task
from cleftwise.blockwise.sliding_window import (TorchPredictor, blend_window, grid_origins,
                                      patch_origins, predict_region, to_uint8)
from cleftwise.models.checkpoint import load_model, save_checkpoint
from cleftwise.models.rsunet import RSUNetConfig, build_rsunet
from cleftwise.storage.volume import create_volume, open_volume

import predict_grid  # noqa: E402  (sections grid and volara; this script's folder is on the path)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VOXEL_SIZE = (40, 4, 4)
THREADS = 2


@dataclass
class Setup:
    """Benchmark geometry (voxels, z y x)."""

    shape: tuple
    patch: tuple
    stride: tuple
    block: tuple
    filters: tuple
    batch_size: int
    repeats: int


# One full run evaluates ~410 patches. With 36 x 256 x 256, 128² patches and the (4, 8, 12, 16)
# model that is ~2-4 minutes on 2 shared cores; the (8, 16, 24, 32) model (--filters 8 16 24 32)
# is ~2.6x slower per patch, 36 x 320 x 320 with 160² patches another ~1.6x. A lighter model is
# also the stricter test of the engine's overhead (fixed cost per voxel, less forward to hide it).
FULL = Setup(shape=(36, 256, 256), patch=(18, 128, 128), stride=(9, 64, 64), block=(36, 128, 128),
             filters=(4, 8, 12, 16), batch_size=4, repeats=2)
QUICK = Setup(shape=(18, 160, 160), patch=(18, 80, 80), stride=(9, 40, 40), block=(18, 80, 80),
              filters=(4, 8, 12, 16), batch_size=4, repeats=2)


class PeakRSS:
    """Samples the RSS of this process (and its children) every ``interval`` s inside a
    ``with`` block; ``peak`` and ``start`` are bytes."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.proc = psutil.Process()
        self.peak = 0
        self.start = 0

    def _rss(self) -> int:
        total = 0
        for p in [self.proc] + self.proc.children(recursive=True):
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            self._stop.wait(self.interval)

    def __enter__(self):
        self.start = self._rss()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


class ForwardClock:
    """Accumulates the wall time spent inside ``RSUNet.forward`` while active (benchmark
    instrumentation: the class method is wrapped, nothing in the engine changes). Because it is
    measured during the same run, ``run time / forward time`` is robust to load from other
    processes, unlike a ratio of two separately timed runs."""

    def __init__(self):
        self.seconds = 0.0
        self.calls = 0

    def __enter__(self):
        from cleftwise.models import rsunet

        self._cls = rsunet.RSUNet
        self._orig = self._cls.forward
        clock = self

        def timed_forward(module, x):
            t0 = time.perf_counter()
            try:
                return clock._orig(module, x)
            finally:
                clock.seconds += time.perf_counter() - t0
                clock.calls += 1

        self._cls.forward = timed_forward
        return self

    def __exit__(self, *exc):
        self._cls.forward = self._orig


def make_raw(shape: tuple, seed: int, source: str) -> tuple[np.ndarray, str]:
    """uint8 (z, y, x) input: the synthetic EM renderer when available (cached in the temp dir,
    rendering is slow), else uniform random bytes. Returns (array, description)."""
    if source in ("auto", "synthetic"):
        try:
            from cleftwise.storage.synthetic.geometry import SyntheticConfig
            from cleftwise.storage.synthetic.render import render_block
        except ImportError as e:
            if source == "synthetic":
                raise
            print(f"synthetic renderer unavailable ({e}); using random uint8")
        else:
            cache = os.path.join(tempfile.gettempdir(), "cleftwise_bench_cache",
                                 f"synthetic_raw_{'x'.join(map(str, shape))}_seed{seed}.npy")
            if os.path.exists(cache):
                return np.load(cache), f"synthetic EM (cleftwise.storage.synthetic.render, seed {seed}; cached)"
            t0 = time.perf_counter()
            cfg = SyntheticConfig(shape=tuple(shape), voxel_size=VOXEL_SIZE, seed=seed)
            raw = render_block(cfg, (0, 0, 0), shape)["raw"]
            print(f"rendered synthetic EM {shape} in {time.perf_counter() - t0:.1f} s")
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            np.save(cache, raw)
            return raw, f"synthetic EM (cleftwise.storage.synthetic.render, seed {seed})"
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, shape, dtype=np.uint8), f"uniform random uint8 (seed {seed})"


def engine_batches(task: PredictStep, batch_size: int, min_batch: int | None = None
                   ) -> tuple[list[np.ndarray], int]:
    """The (B, 3) patch origins (voxels) of every batch the engine feeds the model: per block
    the global-grid patches overlapping its write region, in lexicographic order, in batches of
    ``batch_size``, a short batch padded to ``min_batch`` as TorchPredictor does (None: its
    ``min_batch`` default if it still has one, else no padding). Returns (batches, number of
    real patches)."""
    if min_batch is None:
        import inspect
        p = inspect.signature(TorchPredictor).parameters.get("min_batch")
        min_batch = int(p.default) if p is not None else 1
    batches, real = [], 0
    for block in task.blocks():
        _, w0, w1, _ = task.read_roi(block)
        origins = patch_origins(w0, w1, task.patch, task.stride, task.volume_shape)
        real += len(origins)
        for s in range(0, len(origins), batch_size):
            b = origins[s:s + batch_size]
            if len(b) < min_batch:
                b = np.concatenate([b, np.repeat(b[-1:], min_batch - len(b), axis=0)])
            batches.append(b)
    return batches, real


def forward_inputs(raw: np.ndarray, batches: list[np.ndarray], patch: tuple) -> list[torch.Tensor]:
    """The float32 (B, 1, pz, py, px) tensors in [0, 1] of every batch."""
    tensors = []
    for b in batches:
        arr = np.stack([raw[o[0]:o[0] + patch[0], o[1]:o[1] + patch[1], o[2]:o[2] + patch[2]]
                        for o in b])[:, None].astype(np.float32) / np.float32(255)
        tensors.append(torch.from_numpy(arr))
    return tensors


def time_forward(model, tensors: list[torch.Tensor]) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        for x in tensors:
            model(x)
    return time.perf_counter() - t0


def time_engine(cfg: PredictConfig) -> float:
    t0 = time.perf_counter()
    run_task(PredictStep(cfg), BackendConfig("local", progress=False), overwrite=True)
    return time.perf_counter() - t0


def time_monai(model, raw_url: str, patch: tuple, batch_size: int, keep: dict,
               roi: tuple | None = None) -> float:
    """Read the input from zarr, run MONAI's sliding windows (overlap 0.5, Gaussian), keep the
    (C, z, y, x) probabilities in ``keep["monai"]``; returns seconds. ``roi`` = (begin, shape)
    in voxels restricts the input (warm-up)."""
    from monai.inferers import sliding_window_inference

    def predictor(x):
        return torch.sigmoid(model(x))

    t0 = time.perf_counter()
    vol = open_volume(raw_url)
    raw = vol.read()
    if roi is not None:
        raw = raw[tuple(slice(b, b + n) for b, n in zip(*roi))]
    x = torch.from_numpy(raw.astype(np.float32) / np.float32(255))[None, None]
    with torch.inference_mode():
        y = sliding_window_inference(x, roi_size=patch, sw_batch_size=batch_size, predictor=predictor,
                                     overlap=0.5, mode="gaussian", sigma_scale=0.125,
                                     padding_mode="constant", progress=False)
    keep["monai"] = y[0].numpy()
    return time.perf_counter() - t0


def monai_window_origins(shape: tuple, patch: tuple, overlap: float = 0.5) -> list[list[int]]:
    """Per-axis window origins MONAI uses (scan interval ``int(p * (1 - overlap))``, last
    window clamped to the border) — for comparison with the engine's global grid."""
    out = []
    for n, p in zip(shape, patch):
        step = max(int(p * (1 - overlap)), 1)
        k = int(np.ceil(max(n - p, 0) / step)) + 1
        out.append(sorted({min(i * step, n - p) for i in range(k)}))
    return out


def profile_engine(cfg: PredictConfig, top: int = 18) -> list[dict]:
    """cProfile one engine run; the ``top`` functions by own time."""
    prof = cProfile.Profile()
    prof.enable()
    run_task(PredictStep(cfg), BackendConfig("local", progress=False), overwrite=True)
    prof.disable()
    stats = pstats.Stats(prof, stream=io.StringIO())
    rows = []
    for (fname, line, func), (cc, nc, tt, ct, _) in stats.stats.items():
        rows.append({"function": f"{os.path.relpath(fname, REPO) if fname.startswith(REPO) else fname}:{line}({func})",
                     "calls": nc, "tottime_s": round(tt, 4), "cumtime_s": round(ct, 4)})
    rows.sort(key=lambda r: -r["tottime_s"])
    return rows[:top]


def fmt_mib(b: float) -> float:
    return round(b / 2**20, 1)


def engine_markdown(res: dict) -> list[str]:
    s, r = res["setup"], res["results"]
    em = res.get("engine_measured", {})
    lines = [
        "## Engine vs pure forward vs MONAI (2 threads, in one process)",
        "",
        f"Measured {em.get('measured_at', '?')}{describe_git(em.get('git'))}.",
        "",
        f"Machine: {res['machine']}. torch {res['versions']['torch']} ({THREADS} threads), "
        f"MONAI {res['versions'].get('monai', 'n/a')}. Load average at start: {res['load_avg_start']}.",
        "",
        f"Volume {tuple(s['shape'])} voxels ({s['voxels']:,}) uint8 at {tuple(VOXEL_SIZE)} nm, input: "
        f"{s['input']}. RSUNet filters {tuple(s['filters'])} (seed 0, {s['parameters']:,} parameters), "
        f"patch {tuple(s['patch'])}, stride {tuple(s['stride'])}, batch {s['batch_size']}, "
        f"Gaussian blending. Min of {s['repeats']} repeats after one warm-up.",
        "",
        "| variant | patches | time s | voxels/s | time / forward of same patches (separate runs) "
        "| of which in model.forward s | time / own forward (same run) | peak RSS MiB (Δ in run) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key in ("whole", "blocks"):
        e = r[f"engine_{key}"]
        f = r[f"forward_{key}"]
        lines.append(f"| forward only, {e['label']} patches | {f['patches']} | {f['seconds']:.3f} | "
                     f"{f['voxels_per_s']:,.0f} | 1.000 | {f['forward_seconds_in_run']:.3f} | "
                     f"{f['in_run_ratio']:.3f} | {f['peak_rss_mib']} ({f['delta_rss_mib']:+}) |")
        lines.append(f"| engine, {e['label']} | {e['patches']} | {e['seconds']:.3f} | "
                     f"{e['voxels_per_s']:,.0f} | **{e['overhead_vs_forward']:.3f}** | "
                     f"{e['forward_seconds_in_run']:.3f} | **{e['in_run_ratio']:.3f}** | "
                     f"{e['peak_rss_mib']} ({e['delta_rss_mib']:+}) |")
    m = r["monai"]
    lines.append(f"| MONAI sliding_window_inference | {m['windows']} | {m['seconds']:.3f} | "
                 f"{m['voxels_per_s']:,.0f} | {m['ratio_vs_forward_whole']:.3f} (vs whole-volume forward) | "
                 f"{m['forward_seconds_in_run']:.3f} | {m['in_run_ratio']:.3f} | "
                 f"{m['peak_rss_mib']} ({m['delta_rss_mib']:+}) |")
    c = res["checks"]
    lines += [
        "",
        f"- Engine / forward overhead, one block = whole volume: **{r['engine_whole']['overhead_vs_forward']:.3f}** "
        f"against a separately timed forward pass, **{r['engine_whole']['in_run_ratio']:.3f}** against the "
        f"time the same run spent in `RSUNet.forward` (target ≤ 1.15: "
        f"{'met' if max(r['engine_whole']['overhead_vs_forward'], r['engine_whole']['in_run_ratio']) <= 1.15 else 'NOT met'}). "
        "The same-run ratio is immune to load from other processes on the shared machine; the "
        "separate-run ratio is the one asked for and is noisier.",
        f"- Engine / forward overhead, blocks {tuple(s['block'])}: {r['engine_blocks']['overhead_vs_forward']:.3f} "
        f"over the same {r['engine_blocks']['patches']} patches; those blocks evaluate "
        f"{r['engine_blocks']['patches']} / {r['engine_whole']['patches']} = "
        f"{r['engine_blocks']['patches'] / r['engine_whole']['patches']:.2f}× the patches of the whole "
        f"volume (patches crossing block faces are predicted by every block they overlap), so their "
        f"end-to-end time is {r['engine_blocks']['seconds'] / r['engine_whole']['seconds']:.2f}× the whole-volume run.",
        f"- Engine (whole volume) / MONAI: {r['engine_whole']['seconds'] / m['seconds']:.3f}; "
        f"engine ({tuple(s['block'])} blocks) / MONAI: {r['engine_blocks']['seconds'] / m['seconds']:.3f}. "
        "MONAI's time covers the zarr read and in-memory inference but no write; the engine's also "
        "covers checkpoint loading, the zarr write (uint8) and the ledger.",
        f"- MONAI window origins per axis {m['window_origins']} vs engine global grid "
        f"{c['engine_grid_origins']} (same here: {m['same_windows_as_engine']}). MONAI's windows are "
        "anchored to the input it is given, so on a sub-volume they would not line up with a global grid.",
        f"- Engine output vs direct `predict_region` on the whole volume: max |Δ| = "
        f"{c['engine_vs_direct_max_abs_uint8']} (uint8 levels; blocks run: "
        f"{c['engine_blocks_vs_direct_max_abs_uint8']}), check {'passed' if c['engine_matches_direct'] else 'FAILED'}.",
        f"- MONAI vs engine probabilities (both Gaussian, σ = patch/8, different window constructions): "
        f"max |Δ| = {c['monai_vs_engine_max_abs']:.4f}, mean |Δ| = {c['monai_vs_engine_mean_abs']:.5f}.",
        f"- Peak RSS of the whole process: {res['ru_maxrss_mib']} MiB (getrusage).",
    ]
    if res.get("profile"):
        lines += ["", "## cProfile of one whole-volume engine run (top by own time)", "",
                  "| function | calls | own s | cumulative s |", "|---|---:|---:|---:|"]
        for p in res["profile"]:
            lines.append(f"| `{p['function']}` | {p['calls']} | {p['tottime_s']} | {p['cumtime_s']} |")
    return lines


def describe_git(g: dict | None) -> str:
    if not g or not g.get("commit"):
        return ""
    mod = g.get("modified") or []
    return (f" on commit {g['commit']} ({g.get('subject', '')[:60]}…)"
            + (f" plus uncommitted changes to {', '.join(mod)}" if mod else ", clean tree"))


def peers_markdown(res: dict) -> list[str]:
    pr, pm = res["peers"], res.get("peers_measured", {})
    s, r, a = pr["setup"], pr["results"], pr["agreement_cleftwise_vs_chunkflow"]
    lines = [
        "## cleftwise vs chunkflow vs a bare forward loop (1 thread, each in a fresh process)",
        "",
        f"Measured {pm.get('measured_at', '?')}{describe_git(pm.get('git'))}. Load average at end: {pr.get('load_avg')}.",
        "",
        f"Model `{s['model']}`, volume {tuple(s['shape'])} ({s['voxels']:,} voxels), input {s['input']}; "
        f"patch {tuple(s['patch'])}, overlap {tuple(s['overlap'])} (stride {tuple(s['stride'])}), "
        f"{s['grid_patches']} grid patches (same grid in both: {pr['same_patch_grid']}). "
        f"torch threads {s['threads']} (OMP_NUM_THREADS too). cleftwise: `run_task(PredictStep(...))` "
        f"with the whole volume as one block, batch {s['cleftwise_batch_size']}, blend "
        f"{s['cleftwise_options']['blend']}, uint8 zarr output. chunkflow {s['chunkflow_version']} "
        f"`Inferencer(framework='pytorch', bump='wu', mask_output_chunk=True, batch_size=1)` (its "
        "pytorch framework asserts batch 1) on the volume held in memory, cleftwise's model through a "
        "generated adapter (`cleftwise.models.checkpoint.load_model` + sigmoid), output saved as "
        f"float32 .npy. Forward: `model(batch)` over the same {s['grid_patches']} patches at batch "
        f"{s['cleftwise_batch_size']} (with glibc's default malloc, and with the `M_MMAP_MAX=0`, "
        "`M_TRIM_THRESHOLD=1 GiB` settings cleftwise's predict step applies) and at batch 1, inputs "
        "prepared before the clock. Min over {s['repeats']} "
        "interleaved repeats, each repeat's value in parentheses (peak RSS: max).",
        "",
        "*Process* = the whole child process (interpreter start, imports, reading, the step, writing; "
        "`wait4` rusage of the child, i.e. what `getrusage(RUSAGE_CHILDREN)` accumulates). *Step* = "
        "measured inside the child with `getrusage(RUSAGE_SELF)`: cleftwise `run_task` (checkpoint "
        "load, zarr read, forward, blend, uint8, zarr write, ledger); chunkflow `Inferencer(...)` + "
        "`inferencer(chunk)` (model load, patch loop, blend, normalisation; no I/O); forward: the "
        "`model(batch)` loop only.",
        "",
        "| contender | process wall s | process CPU s | process minor faults | peak RSS MiB "
        "| step wall s | step CPU s | step minor faults | patches (forward calls) | in model.forward s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    names = {"cleftwise": "cleftwise (run_task)", "chunkflow": f"chunkflow {s['chunkflow_version']} Inferencer",
             "forward": f"bare forward loop, batch {s['cleftwise_batch_size']}",
             "forward_b1": "bare forward loop, batch 1",
             "forward_malloc": f"bare forward loop, batch {s['cleftwise_batch_size']}, cleftwise's malloc settings"}
    for k in ("cleftwise", "chunkflow", "forward", "forward_malloc", "forward_b1"):
        if k not in r:
            continue
        x = r[k]
        def rep(part, m, fmt):
            al = x[part][f"all_{m}"]
            return format(x[part][m], fmt) + (f" ({' / '.join(format(v, fmt) for v in al)})" if len(al) > 1 else "")
        lines.append(f"| {names[k]} | {x['process']['wall_s']:.2f} | {rep('process', 'cpu_s', '.2f')} | "
                     f"{rep('process', 'minflt', ',')} | {x['process']['maxrss_mib']} | {x['step']['wall_s']:.2f} | "
                     f"{rep('step', 'cpu_s', '.2f')} | {rep('step', 'minflt', ',')} | {x['patches_evaluated']} "
                     f"({x['forward_calls']}) | {x['forward_s_in_step']:.2f} |")
    lines += ["", "| ratio | value | target |", "|---|---:|---|"]
    labels = {"cpu_process_cleftwise_over_chunkflow": "CPU, whole process: cleftwise / chunkflow",
              "cpu_step_cleftwise_over_chunkflow": "CPU, inference step: cleftwise / chunkflow",
              "minflt_process_cleftwise_over_chunkflow": "minor page faults, whole process: cleftwise / chunkflow",
              "minflt_step_cleftwise_over_chunkflow": "minor page faults, step: cleftwise / chunkflow",
              "throughput_engine_over_forward": "patches/s, cleftwise step / bare forward loop (wall)",
              "throughput_engine_over_forward_cpu": "patches/CPU s, cleftwise step / bare forward loop",
              "throughput_engine_over_forward_malloc": "patches/s, cleftwise step / bare loop with cleftwise's malloc settings (wall)",
              "throughput_engine_over_forward_malloc_cpu": "patches/CPU s, cleftwise step / bare loop with cleftwise's malloc settings",
              "forward_cpu_per_patch_batch1_over_batchN": "bare forward CPU per patch: batch 1 / cleftwise's batch (both default malloc)",
              "engine_forward_share_in_step": "share of cleftwise's step spent in model.forward (same run)"}
    for k, v in pr["ratios"].items():
        t = pr["targets"].get(k)
        lines.append(f"| {labels.get(k, k)} | **{v:.3f}** | "
                     + (f"{t}: {'met' if pr['met'][k] else 'NOT met'}" if t else "—") + " |")
    lines += ["",
              f"Agreement, cleftwise (uint8 / 255) vs chunkflow (float32), probabilities: max |Δ| "
              f"{a['max_abs']}, mean |Δ| {a['mean_abs']}, fraction of voxels with |Δ| > 0.1: "
              f"{a['frac_gt_0.1']:.6f}; within {FACE} voxels of the volume faces: max |Δ| "
              f"{a['near_faces_max_abs']}, fraction > 0.1 {a['near_faces_frac_gt_0.1']:.6f}; interior: "
              f"max |Δ| {a['interior_max_abs']}, fraction > 0.1 {a['interior_frac_gt_0.1']}. The two "
              "blend windows differ (cleftwise's bump with a per-axis floor, chunkflow's normalised "
              "'wu' bump), so small differences in the overlaps are expected."]
    return lines


def write_markdown(res: dict, path: str) -> None:
    lines = ["# bench_predict: engine vs pure forward vs MONAI vs chunkflow", ""]
    if "peers" in res:
        lines += peers_markdown(res) + [""]
    if "results" in res:
        lines += engine_markdown(res)
    lines += predict_grid.markdown(res)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------
# Peers: cleftwise vs chunkflow vs a bare forward loop, each in its own fresh process
# ---------------------------------------------------------------------------------------------
#
# chunkflow lives in the benchmark's own virtual environment (never a cleftwise dependency):
#
#   python -m venv benchmarks/scratch/venv-chunkflow --system-site-packages
#   benchmarks/scratch/venv-chunkflow/bin/pip install chunkflow==1.2.0
#
# (``--system-site-packages`` lets the venv see the same torch/numpy and the editable cleftwise,
# whose ``load_model`` the adapter below uses; the full install of chunkflow 1.2.0 and its
# requirements succeeded with pip 23 on Python 3.11.) ``--chunkflow-python`` points elsewhere.

PEER_MODEL = os.path.join(REPO, "models", "weights", "rsunet_polarity.pt")
SCRATCH = os.path.join(REPO, "benchmarks", "scratch")
CHUNKFLOW_PY = os.path.join(SCRATCH, "venv-chunkflow", "bin", "python")
PEER_THREADS = 1
FACE = 8  # voxels: the "near the volume faces" band of the agreement check


@dataclass
class PeerSetup:
    shape: tuple
    patch: tuple
    stride: tuple
    batch_size: int


# 3 x 4 x 4 = 48 patches on cleftwise's global grid and on chunkflow's (last patch clamped)
PEER_FULL = PeerSetup(shape=(36, 384, 384), patch=(18, 160, 160), stride=(9, 80, 80), batch_size=4)
PEER_QUICK = PeerSetup(shape=(18, 240, 240), patch=(18, 160, 160), stride=(9, 80, 80), batch_size=4)

# chunkflow's pytorch framework imports a python file: ``load_model(weight_path)`` builds the
# net, ``post_process`` maps logits to what is blended (cleftwise's model emits logits; cleftwise
# applies the sigmoid itself).
CHUNKFLOW_ADAPTER = '''
import torch
from cleftwise.models.checkpoint import load_model as _load


def load_model(weight_path):
    model, _ = _load(weight_path, device="cpu")
    return model.eval()


def post_process(net_output):
    return torch.sigmoid(net_output)
'''

# Shared by the workers: count forward calls and samples (patches) by wrapping RSUNet.forward,
# time the measured step with getrusage(RUSAGE_SELF) around it, report JSON.
WORKER_COMMON = '''
import json, os, resource, sys, time
T_START = time.perf_counter()
import numpy as np
import torch
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
from cleftwise.models import rsunet

spec = json.load(open(sys.argv[1]))
COUNT = {"calls": 0, "patches": 0, "forward_s": 0.0}
_orig_forward = rsunet.RSUNet.forward


def _counted(module, x):
    t0 = time.perf_counter()
    try:
        return _orig_forward(module, x)
    finally:
        COUNT["forward_s"] += time.perf_counter() - t0
        COUNT["calls"] += 1
        COUNT["patches"] += int(x.shape[0])


rsunet.RSUNet.forward = _counted


class Step:
    def __enter__(self):
        self.t0, self.r0 = time.perf_counter(), self._ru()
        return self

    @staticmethod
    def _ru():  # this process and any children it waited for
        a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return (a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime, a.ru_minflt + b.ru_minflt,
                a.ru_majflt + b.ru_majflt)

    def __exit__(self, *exc):
        r1 = self._ru()
        self.res = {"wall_s": time.perf_counter() - self.t0, "cpu_s": r1[0] - self.r0[0],
                    "minflt": r1[1] - self.r0[1], "majflt": r1[2] - self.r0[2]}


def report(step, **extra):
    out = {"step": step.res, "count": COUNT, "torch_threads": torch.get_num_threads(),
           "step_start_s": step.t0 - T_START, **extra}
    with open(spec["result"], "w") as f:
        json.dump(out, f)
'''

CLEFTWISE_WORKER = WORKER_COMMON + '''
from cleftwise.postprocess.predict import PredictConfig, PredictStep
from cleftwise.blockwise.runner import BackendConfig, run_task

cfg = PredictConfig(input=spec["raw_url"], output=spec["out_url"], checkpoint=spec["model"],
                    block_shape=tuple(spec["shape"]), patch_shape=tuple(spec["patch"]),
                    stride=tuple(spec["stride"]), batch_size=spec["batch_size"], device="cpu",
                    torch_threads=int(os.environ["OMP_NUM_THREADS"]))
with Step() as st:  # checkpoint load, zarr read, batched forward, blend, uint8, zarr write, ledger
    run_task(PredictStep(cfg), BackendConfig("local", progress=False), overwrite=True)
report(st)
'''

CHUNKFLOW_WORKER = WORKER_COMMON + '''
from chunkflow.chunk import Chunk
from chunkflow.flow.divid_conquer.inferencer import Inferencer

raw = np.load(spec["raw_npy"])
with Step() as st:  # model load, patch loop, blend, mask
    inf = Inferencer(spec["adapter"], spec["model"], input_patch_size=tuple(spec["patch"]),
                     output_patch_overlap=tuple(p - s for p, s in zip(spec["patch"], spec["stride"])),
                     num_output_channels=3, framework="pytorch", batch_size=1, bump="wu",
                     mask_output_chunk=True)
    out = inf(Chunk(raw, voxel_offset=(0, 0, 0), voxel_size=tuple(spec["voxel_size"])))
np.save(spec["out_npy"], np.asarray(out.array, dtype=np.float32))
origins = sorted({tuple(int(s.start) for s in sl[0]) for sl in inf.patch_slices_list})
report(st, patch_origins=origins)
'''

FORWARD_WORKER = WORKER_COMMON + '''
from cleftwise.models.checkpoint import load_model

if spec.get("malloc"):  # the glibc settings cleftwise's predict applies (keep_freed_memory)
    import ctypes
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-4, 0)  # M_MMAP_MAX
    libc.mallopt(-1, ctypes.c_int(1 << 30))  # M_TRIM_THRESHOLD
raw = np.load(spec["raw_npy"])
model, _ = load_model(spec["model"], device="cpu")
model.eval()
p = spec["patch"]
batches = []
for b in spec["batches"]:
    arr = np.stack([raw[o[0]:o[0] + p[0], o[1]:o[1] + p[1], o[2]:o[2] + p[2]] for o in b])
    batches.append(torch.from_numpy(arr[:, None].astype(np.float32) / np.float32(255)))
with Step() as st, torch.inference_mode():  # only model(batch), inputs prepared beforehand
    for x in batches:
        model(x)
report(st)
'''


def run_worker(python: str, script: str, spec: dict, log_path: str) -> dict:
    """Run ``script`` with ``python`` in a fresh process (1 thread); its own rusage from wait4
    (the same numbers getrusage(RUSAGE_CHILDREN) accumulates, per child), plus the step figures
    the worker measured inside itself."""
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS=str(PEER_THREADS), MKL_NUM_THREADS=str(PEER_THREADS),
               OPENBLAS_NUM_THREADS=str(PEER_THREADS), PYTHONUNBUFFERED="1")
    spec_path = spec["result"] + ".spec.json"
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    if os.path.exists(spec["result"]):
        os.remove(spec["result"])
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen([python, script, spec_path], stdout=log, stderr=subprocess.STDOUT,
                                env=env, cwd=SCRATCH)
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 or not os.path.exists(spec["result"]):
        with open(log_path) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"{os.path.basename(script)} failed (exit {proc.returncode}):\n{tail}")
    with open(spec["result"]) as f:
        inner = json.load(f)
    inner["process"] = {"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "user_s": ru.ru_utime,
                        "sys_s": ru.ru_stime, "minflt": ru.ru_minflt, "majflt": ru.ru_majflt,
                        "maxrss_mib": round(ru.ru_maxrss / 1024, 1)}
    return inner


def agreement(a: np.ndarray, b: np.ndarray, face: int = FACE) -> dict:
    """max |a - b| and the fraction of voxels with |a - b| > 0.1, overall and within ``face``
    voxels of a volume face (arrays (C, z, y, x))."""
    d = np.abs(a.astype(np.float32) - b.astype(np.float32))
    near = np.zeros(d.shape[1:], bool)
    for ax in range(3):
        sl = [slice(None)] * 3
        sl[ax] = slice(0, face)
        near[tuple(sl)] = True
        sl[ax] = slice(d.shape[1 + ax] - face, None)
        near[tuple(sl)] = True
    dn, di = d[:, near], d[:, ~near]
    return {"max_abs": round(float(d.max()), 4), "frac_gt_0.1": round(float((d > 0.1).mean()), 6),
            "mean_abs": round(float(d.mean()), 5),
            "near_faces_max_abs": round(float(dn.max()), 4),
            "near_faces_frac_gt_0.1": round(float((dn > 0.1).mean()), 6),
            "interior_max_abs": round(float(di.max()), 4) if di.size else None,
            "interior_frac_gt_0.1": round(float((di > 0.1).mean()), 6) if di.size else None}


def run_peers(quick: bool, repeats: int, source: str, chunkflow_python: str) -> dict:
    """cleftwise (run_task in a fresh process) vs chunkflow 1.2.0's Inferencer (its venv) vs a
    bare forward loop, all on rsunet_polarity, one thread, interleaved; see module docstring."""
    ps = PEER_QUICK if quick else PEER_FULL
    if not os.path.exists(chunkflow_python):
        raise SystemExit(f"chunkflow venv not found at {chunkflow_python}: see the set-up comment "
                         "in benchmarks/bench_predict.py (or pass --sections engine)")
    os.makedirs(SCRATCH, exist_ok=True)
    work = tempfile.mkdtemp(prefix="peers_", dir=SCRATCH)
    try:
        raw, src = make_raw(ps.shape, seed=1, source=source)
        raw_npy = os.path.join(work, "raw.npy")
        np.save(raw_npy, raw)
        raw_url = os.path.join(work, "in.zarr", "raw")
        vol = create_volume(raw_url, shape=ps.shape, voxel_size=VOXEL_SIZE, dtype="uint8",
                            chunk_shape=tuple(min(c, s) for c, s in zip(ps.patch, ps.shape)))
        vol.write(vol.roi, raw)
        scripts = {}
        for name, text in (("adapter", CHUNKFLOW_ADAPTER), ("cleftwise", CLEFTWISE_WORKER),
                           ("chunkflow", CHUNKFLOW_WORKER), ("forward", FORWARD_WORKER)):
            scripts[name] = os.path.join(work, f"{name}_worker.py" if name != "adapter" else "chunkflow_model.py")
            with open(scripts[name], "w") as f:
                f.write(text)
        origins = grid_origins(ps.shape, ps.patch, ps.stride)
        grid = [(z, y, x) for z in origins[0] for y in origins[1] for x in origins[2]]
        batches = [[list(map(int, o)) for o in grid[i:i + ps.batch_size]]
                   for i in range(0, len(grid), ps.batch_size)]
        base = {"shape": list(ps.shape), "patch": list(ps.patch), "stride": list(ps.stride),
                "batch_size": ps.batch_size, "model": PEER_MODEL, "voxel_size": list(VOXEL_SIZE),
                "raw_npy": raw_npy, "raw_url": raw_url}
        specs = {
            "cleftwise": (sys.executable, dict(base, out_url=os.path.join(work, "cw.zarr", "pred"))),
            "chunkflow": (chunkflow_python, dict(base, adapter=scripts["adapter"],
                                                  out_npy=os.path.join(work, "chunkflow_out.npy"))),
            "forward": (sys.executable, dict(base, batches=batches)),
            # chunkflow's batch size, to tell the batch size's share of a CPU gap from the engine's
            "forward_b1": (sys.executable, dict(base, batches=[[list(map(int, o))] for o in grid])),
            # the same loop with the malloc settings cleftwise's predict step applies
            # (M_MMAP_MAX=0, M_TRIM_THRESHOLD=1 GiB): isolates the engine's own overhead
            "forward_malloc": (sys.executable, dict(base, batches=batches, malloc=True)),
        }
        runs = {k: [] for k in specs}
        for rep in range(repeats):
            for k, (py, spec) in specs.items():
                spec = dict(spec, result=os.path.join(work, f"{k}_result.json"))
                r = run_worker(py, scripts[k.split("_")[0]], spec, os.path.join(work, f"{k}_{rep}.log"))
                runs[k].append(r)
                print(f"  peers repeat {rep + 1}: {k:14s} process {r['process']['wall_s']:6.1f} s wall "
                      f"{r['process']['cpu_s']:6.1f} s CPU {r['process']['minflt']:>8} minflt "
                      f"{r['process']['maxrss_mib']:7.1f} MiB | step {r['step']['wall_s']:6.1f} s wall "
                      f"{r['step']['cpu_s']:6.1f} s CPU {r['step']['minflt']:>8} minflt | "
                      f"{r['count']['patches']} patches in {r['count']['calls']} forward calls", flush=True)

        cw = open_volume(specs["cleftwise"][1]["out_url"]).read().astype(np.float32) / 255
        cf = np.load(specs["chunkflow"][1]["out_npy"])
        agree = agreement(cw, cf)
        cf_origins = [tuple(o) for o in runs["chunkflow"][-1].get("patch_origins", [])]
        same_grid = sorted(map(tuple, grid)) == sorted(cf_origins)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def summary(k: str) -> dict:
        rs = runs[k]
        out = {}
        for part in ("process", "step"):
            out[part] = {m: round(min(r[part][m] for r in rs), 3) for m in ("wall_s", "cpu_s", "minflt")}
            out[part]["all_cpu_s"] = [round(r[part]["cpu_s"], 3) for r in rs]
            out[part]["all_minflt"] = [r[part]["minflt"] for r in rs]
        out["process"]["maxrss_mib"] = max(r["process"]["maxrss_mib"] for r in rs)
        out["forward_calls"] = rs[-1]["count"]["calls"]
        out["patches_evaluated"] = rs[-1]["count"]["patches"]
        out["forward_s_in_step"] = round(min(r["count"]["forward_s"] for r in rs), 3)
        out["torch_threads"] = rs[-1]["torch_threads"]
        return out

    res = {k: summary(k) for k in runs}
    c, f, fw, f1, fm = (res[k] for k in ("cleftwise", "chunkflow", "forward", "forward_b1", "forward_malloc"))
    ratios = {
        "cpu_process_cleftwise_over_chunkflow": round(c["process"]["cpu_s"] / f["process"]["cpu_s"], 3),
        "cpu_step_cleftwise_over_chunkflow": round(c["step"]["cpu_s"] / f["step"]["cpu_s"], 3),
        "minflt_process_cleftwise_over_chunkflow": round(c["process"]["minflt"] / f["process"]["minflt"], 3),
        "minflt_step_cleftwise_over_chunkflow": round(c["step"]["minflt"] / max(f["step"]["minflt"], 1), 3),
        # patches per second of the engine's step over a bare model(batch) loop at the same batch size
        "throughput_engine_over_forward": round(
            (c["patches_evaluated"] / c["step"]["wall_s"]) / (fw["patches_evaluated"] / fw["step"]["wall_s"]), 3),
        "throughput_engine_over_forward_cpu": round(
            (c["patches_evaluated"] / c["step"]["cpu_s"]) / (fw["patches_evaluated"] / fw["step"]["cpu_s"]), 3),
        "throughput_engine_over_forward_malloc": round(
            (c["patches_evaluated"] / c["step"]["wall_s"]) / (fm["patches_evaluated"] / fm["step"]["wall_s"]), 3),
        "throughput_engine_over_forward_malloc_cpu": round(
            (c["patches_evaluated"] / c["step"]["cpu_s"]) / (fm["patches_evaluated"] / fm["step"]["cpu_s"]), 3),
        # bare forward CPU per patch at batch 1 (chunkflow's) / at cleftwise's batch size
        "forward_cpu_per_patch_batch1_over_batchN": round(
            (f1["step"]["cpu_s"] / f1["patches_evaluated"]) / (fw["step"]["cpu_s"] / fw["patches_evaluated"]), 3),
        # same run: time the engine's step spent in RSUNet.forward / the step's time
        "engine_forward_share_in_step": round(c["forward_s_in_step"] / c["step"]["wall_s"], 3),
    }
    targets = {"cpu_process_cleftwise_over_chunkflow": ("<=", 0.8),
               "cpu_step_cleftwise_over_chunkflow": ("<=", 0.8),
               "minflt_process_cleftwise_over_chunkflow": ("<=", 1.5),
               "throughput_engine_over_forward": (">=", 0.95),
               "throughput_engine_over_forward_cpu": (">=", 0.95),
               "throughput_engine_over_forward_malloc": (">=", 0.95),
               "throughput_engine_over_forward_malloc_cpu": (">=", 0.95)}
    met = {k: (ratios[k] <= v if op == "<=" else ratios[k] >= v) for k, (op, v) in targets.items()}
    import subprocess
    cf_version = subprocess.run([chunkflow_python, "-c", "import importlib.metadata as m; print(m.version('chunkflow'))"],
                                capture_output=True, text=True).stdout.strip()
    return {"setup": {"shape": list(ps.shape), "voxels": int(np.prod(ps.shape)), "input": src,
                      "model": os.path.relpath(PEER_MODEL, REPO), "patch": list(ps.patch),
                      "stride": list(ps.stride), "overlap": [p - s for p, s in zip(ps.patch, ps.stride)],
                      "grid_patches": len(grid), "cleftwise_batch_size": ps.batch_size,
                      "chunkflow_batch_size": 1, "threads": PEER_THREADS, "repeats": repeats,
                      "chunkflow_version": cf_version, "chunkflow_options": {
                          "framework": "pytorch", "bump": "wu", "mask_output_chunk": True},
                      "cleftwise_options": {"blend": PredictConfig().blend, "output_dtype": "uint8",
                                            "block_shape": "whole volume (one block)"}},
            "results": res, "ratios": ratios,
            "targets": {k: f"{op} {v}" for k, (op, v) in targets.items()}, "met": met,
            "agreement_cleftwise_vs_chunkflow": agree, "same_patch_grid": same_grid}


def engine_section(args, setup: Setup, repeats: int) -> dict:
    """The engine vs forward vs MONAI section (2 threads, in this process)."""
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    load_start = [round(x, 2) for x in os.getloadavg()]
    voxels = int(np.prod(setup.shape))
    print(f"bench_predict: volume {setup.shape} uint8 ({voxels:,} voxels), patch {setup.patch}, "
          f"stride {setup.stride}, blocks {setup.block} and {setup.shape}, filters {setup.filters}, "
          f"{THREADS} threads, {repeats} repeats; load {load_start}")

    work = tempfile.mkdtemp(prefix="cleftwise_bench_predict_")
    try:
        raw, source = make_raw(setup.shape, seed=1, source=args.input)
        raw_url = os.path.join(work, "in.zarr", "raw")
        vol = create_volume(raw_url, shape=setup.shape, voxel_size=VOXEL_SIZE, dtype="uint8",
                            chunk_shape=tuple(min(c, s) for c, s in zip(setup.patch, setup.shape)))
        vol.write(vol.roi, raw)
        mcfg = RSUNetConfig(out_channels=3, filters=setup.filters, anisotropic_levels=2, norm="batch")
        ckpt = os.path.join(work, "model.pt")
        save_checkpoint(ckpt, build_rsunet(mcfg), mcfg, voxel_size=VOXEL_SIZE,
                        extra={"patch_shape": list(setup.patch)})
        model, _ = load_model(ckpt, device="cpu")
        params = sum(p.numel() for p in model.parameters())

        def pcfg(name, block):
            return PredictConfig(input=raw_url, output=os.path.join(work, f"{name}.zarr", "pred"),
                                 checkpoint=ckpt, block_shape=block, patch_shape=setup.patch,
                                 stride=setup.stride, blend="gaussian", batch_size=setup.batch_size,
                                 output_dtype="uint8", device="cpu", torch_threads=THREADS)

        cfgs = {"whole": pcfg("whole", setup.shape), "blocks": pcfg("blocks", setup.block)}
        tensors, npatches, real, nblocks = {}, {}, {}, {}
        for key, cfg in cfgs.items():
            task = PredictStep(cfg)
            batches, real[key] = engine_batches(task, setup.batch_size)
            tensors[key] = forward_inputs(raw, batches, setup.patch)
            npatches[key] = int(sum(len(b) for b in batches))  # incl. min-batch padding
            nblocks[key] = len(task.blocks())

        kept: dict = {}  # MONAI's last output, for the numerical comparison
        variants = {
            "forward_whole": lambda: time_forward(model, tensors["whole"]),
            "forward_blocks": lambda: time_forward(model, tensors["blocks"]),
            "engine_whole": lambda: time_engine(cfgs["whole"]),
            "engine_blocks": lambda: time_engine(cfgs["blocks"]),
            "monai": lambda: time_monai(model, raw_url, setup.patch, setup.batch_size, kept),
        }
        times = {k: [] for k in variants}
        inner = {k: [] for k in variants}
        mem = {k: {"peak": 0, "delta": 0} for k in variants}
        # Warm-up: one forward batch (oneDNN primitives, allocator), one whole engine run
        # (checkpoint, TensorStore, zarr, ledger code paths) and a MONAI run on one window;
        # the block variants run the same code paths.
        print("warm-up (forward, engine, MONAI) ...")
        with torch.inference_mode():
            model(tensors["whole"][0])
        variants["engine_whole"]()
        time_monai(model, raw_url, setup.patch, setup.batch_size, {}, roi=(
            ((0, 0, 0), setup.patch)))
        for rep in range(repeats):
            for k, fn in variants.items():
                with PeakRSS() as m, ForwardClock() as clock:
                    t = fn()
                times[k].append(t)
                inner[k].append(clock.seconds)
                mem[k]["peak"] = max(mem[k]["peak"], m.peak)
                mem[k]["delta"] = max(mem[k]["delta"], m.peak - m.start)
                print(f"  repeat {rep + 1}: {k:15s} {t:7.3f} s, in model.forward {clock.seconds:7.3f} s "
                      f"({clock.calls} calls), peak RSS {fmt_mib(m.peak)} MiB")

        best = {k: min(v) for k, v in times.items()}

        def entry(k, **extra):
            i = int(np.argmin(times[k]))
            return {"seconds": round(best[k], 4), "all_seconds": [round(t, 4) for t in times[k]],
                    "forward_seconds_in_run": round(inner[k][i], 4),
                    "in_run_ratio": round(best[k] / inner[k][i], 4) if inner[k][i] else None,
                    "in_run_ratio_all": [round(t / f, 4) for t, f in zip(times[k], inner[k]) if f],
                    "voxels_per_s": round(voxels / best[k], 1), "peak_rss_mib": fmt_mib(mem[k]["peak"]),
                    "delta_rss_mib": fmt_mib(mem[k]["delta"]), **extra}

        results = {}
        for key in ("whole", "blocks"):
            results[f"forward_{key}"] = entry(f"forward_{key}", patches=real[key],
                                              patches_incl_padding=npatches[key])
            label = "one block = whole volume" if key == "whole" else f"blocks {setup.block}"
            results[f"engine_{key}"] = entry(
                f"engine_{key}", label=label, blocks=nblocks[key], patches=real[key],
                overhead_vs_forward=round(best[f"engine_{key}"] / best[f"forward_{key}"], 4),
                ratio_vs_monai=round(best[f"engine_{key}"] / best["monai"], 4))
        mo = monai_window_origins(setup.shape, setup.patch)
        grid = [list(map(int, o)) for o in grid_origins(setup.shape, setup.patch, setup.stride)]
        results["monai"] = entry("monai", windows=int(np.prod([len(o) for o in mo])), window_origins=mo,
                                 same_windows_as_engine=mo == grid,
                                 ratio_vs_forward_whole=round(best["monai"] / best["forward_whole"], 4))

        # numerical checks: engine == direct predict_region (same model, window, grid)
        predictor = TorchPredictor(model, device="cpu")
        direct = to_uint8(predict_region(predictor, raw, (0, 0, 0), (0, 0, 0), setup.shape, setup.patch,
                                         setup.stride, setup.shape, blend_window(setup.patch, "gaussian"),
                                         batch_size=setup.batch_size, out_channels=3))
        eng_whole = open_volume(cfgs["whole"].output).read()
        eng_blocks = open_volume(cfgs["blocks"].output).read()
        d_whole = int(np.abs(eng_whole.astype(int) - direct.astype(int)).max())
        d_blocks = int(np.abs(eng_blocks.astype(int) - direct.astype(int)).max())
        monai_out = kept["monai"]
        eng_prob = eng_whole.astype(np.float32) / 255
        checks = {"engine_vs_direct_max_abs_uint8": d_whole,
                  "engine_blocks_vs_direct_max_abs_uint8": d_blocks,
                  "engine_matches_direct": d_whole <= 1 and d_blocks <= 1,
                  "monai_vs_engine_max_abs": round(float(np.abs(monai_out - eng_prob).max()), 5),
                  "monai_vs_engine_mean_abs": round(float(np.abs(monai_out - eng_prob).mean()), 6),
                  "engine_grid_origins": grid}

        profile = None
        overhead = max(results["engine_whole"]["overhead_vs_forward"], results["engine_whole"]["in_run_ratio"])
        if args.profile or overhead > 1.15:
            print(f"engine overhead {overhead:.3f} > 1.15: profiling one whole-volume run")
            profile = profile_engine(cfgs["whole"])

        import monai

        res = {
            "benchmark": "bench_predict",
            "quick": args.quick,
            "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs, "
                       f"{fmt_mib(psutil.virtual_memory().total) / 1024:.0f} GiB, {platform.python_version()}",
            "load_avg_start": load_start,
            "load_avg_end": [round(x, 2) for x in os.getloadavg()],
            "versions": {"torch": torch.__version__, "numpy": np.__version__, "monai": monai.__version__},
            "setup": {"shape": list(setup.shape), "voxels": voxels, "voxel_size_nm": list(VOXEL_SIZE),
                      "input": source, "filters": list(setup.filters), "parameters": params,
                      "patch": list(setup.patch), "stride": list(setup.stride), "block": list(setup.block),
                      "batch_size": setup.batch_size, "repeats": repeats, "torch_threads": THREADS,
                      "blend": "gaussian", "output_dtype": "uint8"},
            "results": results,
            "checks": checks,
            "ru_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "profile": profile,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)

    return res


def git_state() -> dict:
    """Commit and modified tracked files of the measured working tree (read-only git calls)."""
    import subprocess

    def git(*a):
        r = subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True)
        return r.stdout.rstrip() if r.returncode == 0 else ""
    return {"commit": git("rev-parse", "--short", "HEAD"), "subject": git("log", "-1", "--format=%s")[:100],
            "modified": [l[3:] for l in git("status", "--porcelain", "--untracked-files=no").splitlines()]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small volumes (smoke test), 1 repeat")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per variant (default 2; 1 with --quick)")
    ap.add_argument("--input", choices=("auto", "synthetic", "random"), default="auto",
                    help="input volume: synthetic EM if the renderer exists (auto), or random uint8")
    ap.add_argument("--profile", action="store_true", help="always cProfile one engine run")
    ap.add_argument("--filters", type=int, nargs="+", help="RSUNet filters per level (default: setup's)")
    ap.add_argument("--sections", default="engine,peers",
                    help="comma list: engine (engine vs forward vs MONAI, 2 threads), peers (cleftwise vs "
                         "chunkflow vs forward, 1 thread, fresh processes), grid (forward passes and time vs "
                         "the minimal global grid at several block shapes), volara (cleftwise vs volara "
                         "Predict, same weights and patches). A section not run is carried "
                         "over from the existing results file, marked with when it was measured")
    ap.add_argument("--volara-python", default=predict_grid.VOLARA_PY,
                    help="python of the venv holding volara 1.0.5 + volara-torch (see benchmarks/requirements.txt)")
    ap.add_argument("--chunkflow-python", default=CHUNKFLOW_PY,
                    help="python of the venv holding chunkflow 1.2.0 (see the set-up comment)")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    args = ap.parse_args(argv)
    sections = {x.strip() for x in args.sections.split(",") if x.strip()}
    known = {"engine", "peers", "grid", "volara"}
    if not sections <= known:
        ap.error(f"--sections: unknown {sorted(sections - known)}")
    setup = QUICK if args.quick else FULL
    if args.filters:
        setup = dataclasses.replace(setup, filters=tuple(args.filters))
    repeats = max(1, args.repeats or (1 if args.quick else setup.repeats))
    stem = "bench_predict_quick" if args.quick else "bench_predict"
    if args.filters:
        stem += "_filters" + "-".join(map(str, setup.filters))
    json_path = os.path.join(args.out, stem + ".json")
    prev = {}
    if os.path.exists(json_path):
        with open(json_path) as f:
            prev = json.load(f)
    stamp = {"measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "git": git_state()}

    if "engine" in sections:
        res = engine_section(args, setup, repeats)
        res["engine_measured"] = stamp
    elif "results" in prev:
        res = {k: v for k, v in prev.items() if k not in ("peers", "peers_measured", "grid", "grid_measured",
                                                          "volara", "volara_measured")}
        res.setdefault("engine_measured", {"measured_at": "in an earlier run (before the peers section "
                                                          "existed; commit not recorded)",
                                           "git": {}})
    else:
        res = {"benchmark": "bench_predict", "quick": args.quick}
    if "peers" in sections:
        print(f"peers: cleftwise vs chunkflow vs forward, {PEER_THREADS} thread, {repeats} repeats, "
              f"load {[round(x, 2) for x in os.getloadavg()]}")
        res["peers"] = run_peers(args.quick, repeats, args.input, args.chunkflow_python)
        res["peers"]["load_avg"] = [round(x, 2) for x in os.getloadavg()]
        res["peers_measured"] = stamp
    elif "peers" in prev:
        res["peers"], res["peers_measured"] = prev["peers"], prev.get("peers_measured", {})
    for sec in ("grid", "volara"):
        if sec in sections:
            reps = max(1, args.repeats or 1)  # long sections; ratios are also measured within a run
            res[sec] = (predict_grid.grid_section(args.quick, reps) if sec == "grid"
                        else predict_grid.volara_section(args.quick, reps, args.volara_python))
            res[f"{sec}_measured"] = stamp
        elif sec in prev:
            res[sec], res[f"{sec}_measured"] = prev[sec], prev.get(f"{sec}_measured", {})

    os.makedirs(args.out, exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(res, f, indent=2)
    write_markdown(res, os.path.join(args.out, stem + ".md"))
    if "engine" in sections:
        r, checks = res["results"], res["checks"]
        print(f"\nforward whole {r['forward_whole']['seconds']:.3f} s | engine whole {r['engine_whole']['seconds']:.3f} s "
              f"(overhead {r['engine_whole']['overhead_vs_forward']:.3f}, same-run {r['engine_whole']['in_run_ratio']:.3f})"
              f" | forward blocks "
              f"{r['forward_blocks']['seconds']:.3f} s | engine blocks {r['engine_blocks']['seconds']:.3f} s "
              f"(overhead {r['engine_blocks']['overhead_vs_forward']:.3f}, same-run {r['engine_blocks']['in_run_ratio']:.3f})"
              f" | MONAI {r['monai']['seconds']:.3f} s")
        print(f"engine/MONAI: whole {r['engine_whole']['ratio_vs_monai']:.3f}, blocks "
              f"{r['engine_blocks']['ratio_vs_monai']:.3f}; engine vs direct max |Δ| {checks['engine_vs_direct_max_abs_uint8']}"
              f" / {checks['engine_blocks_vs_direct_max_abs_uint8']} uint8; MONAI vs engine max |Δ| "
              f"{checks['monai_vs_engine_max_abs']}")
    if "peers" in sections:
        pr = res["peers"]
        print("\npeers ratios: " + ", ".join(f"{k} {v}" + (f" (target {pr['targets'][k]}: "
              f"{'met' if pr['met'][k] else 'NOT met'})" if k in pr["targets"] else "")
              for k, v in pr["ratios"].items()))
        print(f"cleftwise vs chunkflow: {pr['agreement_cleftwise_vs_chunkflow']}; same patch grid: {pr['same_patch_grid']}")
    for sec in ("grid", "volara"):
        if sec in sections and "met" in res[sec]:
            print(f"{sec}: " + "; ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in res[sec]["met"].items()))
    print(f"results: {json_path} (+ .md)")
    if "grid" in sections and not all(e.get("byte_identical_to_whole_volume", True)
                                      for e in res["grid"]["results"].values()):
        print("WARNING: some block shape's output differs from the whole-volume run", file=sys.stderr)
    if "engine" in sections and not res["checks"]["engine_matches_direct"]:
        print("ERROR: engine output differs from a direct predict_region call", file=sys.stderr)
        sys.exit(1)
    return res


if __name__ == "__main__":
    main()
