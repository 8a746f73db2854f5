"""Benchmark: blockwise connected components (segment stage) vs one global cc3d labelling.

The input is a synapse-like probability volume: a smoothed Gaussian random field (smoothed on
a coarse in-plane grid, upsampled 8x in y and x with periodic boundaries) mapped through a
logistic so that about 2 % of the voxels exceed 0.5, stored as a (1, z, y, x) uint8
prediction volume (zarr, chunk = block). Blobs are typically 2 x 17 x 16 voxels
(80 x 68 x 64 nm), up to ~5 x 50 x 50.

Compared, each in a fresh subprocess (so peak memory is clean), repeated and the minimum taken:

- **global**: TensorStore read of the whole volume + threshold + ``cc3d.connected_components``
  (26-connected) + size filter (``fastremap.unique`` counts + ``fastremap.mask``) +
  ``fastremap.renumber``; in memory, nothing written. The time of writing the labels to zarr
  is measured separately (``global_write_s``) for context.
- **blockwise, local x1**: ``segment_passes`` (label → stitch + resolve → relabel) on the local
  backend, everything (per-block reads, per-instance statistics, face labels, the final uint64
  label volume, parquet/npz records, ledgers) included.
- **blockwise, daisy x2**: the same on the daisy backend with 2 worker processes (worker
  start-up included).

Per-core throughput = voxels / (seconds x workers); the ratio divides it by the global
throughput. CPU seconds (user + system of the measured section: every thread of the process,
TensorStore's I/O threads included, plus its reaped worker processes) give a second, load-free
measure: throughput per CPU second, as a ratio to the global call's. Memory: the RSS of the subprocess and all its children is sampled from outside
every 10 ms (sum over the tree, the driver, and the largest worker); getrusage/wait4 maxima are
not used because a forked child inherits the parent's high-water mark. Every blockwise output is compared voxel by voxel with the global labelling after
the same size filter. Results: ``benchmarks/results/bench_cc.{json,md}``.

Run: ``python benchmarks/bench_cc.py [--quick] [--repeats N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VOXEL_SIZE = (40, 4, 4)
THRESHOLD = 0.5
CONNECTIVITY = 26
MIN_SIZE = 50


@dataclass
class Setup:
    """Benchmark geometry (voxels, z y x)."""

    shape: tuple
    block: tuple
    foreground: float
    repeats: int


FULL = Setup(shape=(128, 512, 512), block=(32, 256, 256), foreground=0.02, repeats=3)
QUICK = Setup(shape=(32, 128, 128), block=(16, 64, 64), foreground=0.02, repeats=2)
LARGE = Setup(shape=(256, 1024, 1024), block=(64, 256, 256), foreground=0.02, repeats=2)
UPSAMPLE = 8  # in-plane upsampling of the coarse random field


def synapse_like_probability(shape: tuple, foreground: float, seed: int = 0) -> np.ndarray:
    """uint8 (z, y, x) probability map (×255) whose voxels above 0.5 (value >= 128) are sparse
    blobs covering about ``foreground`` of the volume.

    A white-noise field on a (z, y/8, x/8) grid is Gaussian-smoothed (σ = 1.0, 1.2, 1.2 coarse
    voxels, periodic), upsampled ×8 in y and x (linear), and mapped through a logistic centred
    on its (1 - foreground) quantile. y and x must be multiples of 8.
    """
    from scipy import ndimage

    z, y, x = shape
    if y % UPSAMPLE or x % UPSAMPLE:
        raise ValueError(f"shape {shape}: y and x must be multiples of {UPSAMPLE}")
    rng = np.random.default_rng(seed)
    coarse = rng.standard_normal((z, y // UPSAMPLE, x // UPSAMPLE), dtype=np.float32)
    coarse = ndimage.gaussian_filter(coarse, sigma=(1.0, 1.2, 1.2), mode="wrap")
    field = ndimage.zoom(coarse, (1, UPSAMPLE, UPSAMPLE), order=1, grid_mode=True, mode="grid-wrap")
    sample = field[::2, ::4, ::4]
    thr = np.float32(np.quantile(sample, 1.0 - foreground))
    scale = np.float32(0.25 * sample.std())
    prob = 1.0 / (1.0 + np.exp(-(field - thr) / scale))
    return np.rint(prob * 255).astype(np.uint8)


def global_labels(union: np.ndarray, timings: dict | None = None) -> np.ndarray:
    """The reference: threshold as the segment stage does, 26-connected cc3d, drop components
    under MIN_SIZE voxels, renumber 1..N in raster order of first voxels."""
    import cc3d
    import fastremap

    t = time.perf_counter()
    mask = union > THRESHOLD * 255.0
    t1 = time.perf_counter()
    labels = cc3d.connected_components(mask, connectivity=CONNECTIVITY)
    t2 = time.perf_counter()
    ids, counts = fastremap.unique(labels, return_counts=True)
    small = ids[(counts < MIN_SIZE) & (ids != 0)]
    labels = fastremap.mask(labels, small, in_place=True)
    t3 = time.perf_counter()
    labels, _ = fastremap.renumber(labels, in_place=True)
    t4 = time.perf_counter()
    if timings is not None:
        timings.update(threshold_s=t1 - t, cc3d_s=t2 - t1, size_filter_s=t3 - t2, renumber_s=t4 - t3)
    return labels


# -- child processes (one measured mode each) ------------------------------------------------

def _busy_seconds(ledger_dir: str) -> float:
    """Sum of the per-block processing times the ledger recorded (``done/*.json``)."""
    total = 0.0
    done = os.path.join(ledger_dir, "done")
    for name in os.listdir(done):
        if name.endswith(".json"):
            with open(os.path.join(done, name)) as f:
                total += float(json.load(f).get("duration_s", 0.0))
    return total


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process (all threads) and its reaped children."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def child(mode: str, work: str, block: tuple, out_name: str, profile: bool = False,
          pred_url: str | None = None) -> dict:
    """One measured mode, run in its own process; returns timings (s) and RSS (bytes)."""
    import psutil

    from cleftwise.storage.volume import create_volume, open_volume

    if mode != "global":  # import everything the mode needs before the RSS baseline
        from cleftwise.blockwise.runner import BackendConfig, run_task
        from cleftwise.postprocess.segment import SegmentConfig, segment_passes
    pred_url = pred_url or os.path.join(work, "pred.zarr", "pred")
    rss_before = psutil.Process().memory_info().rss
    res: dict = {"mode": mode, "rss_before": rss_before}
    if mode == "global":
        timings: dict = {}
        c0, t0 = _cpu_seconds(), time.perf_counter()
        union = open_volume(pred_url).read()[0]
        t1 = time.perf_counter()
        labels = global_labels(union, timings)
        t2, c2 = time.perf_counter(), _cpu_seconds()
        res.update(seconds=t2 - t0, cpu_s=c2 - c0, read_s=t1 - t0, **timings,
                   n_labels=int(labels.max()), label_dtype=str(labels.dtype))
        out = create_volume(os.path.join(work, out_name, "labels"), shape=labels.shape,
                            voxel_size=VOXEL_SIZE, dtype="uint64", chunk_shape=block, overwrite=True)
        c3, t3 = _cpu_seconds(), time.perf_counter()
        out.write(out.roi, labels.astype(np.uint64))
        res["global_write_s"] = time.perf_counter() - t3
        res["global_write_cpu_s"] = _cpu_seconds() - c3
        return res

    backend = BackendConfig("local", progress=False) if mode == "local" else \
        BackendConfig("daisy", workers=2, progress=False)
    cfg = SegmentConfig(predictions=pred_url, output=os.path.join(work, out_name, "synapses"),
                        work_dir=os.path.join(work, out_name + "_work"), channel="cleft",
                        threshold=THRESHOLD, connectivity=CONNECTIVITY, min_size=MIN_SIZE,
                        block_shape=block)
    prof = None
    if profile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    stages = {}
    c0, t0 = _cpu_seconds(), time.perf_counter()
    for task in segment_passes(cfg):
        ts = time.perf_counter()
        rep = run_task(task, backend, overwrite=True)
        stages[task.name] = {"wall_s": time.perf_counter() - ts, "blocks_s": rep.seconds,
                             "blocks": rep.total, "busy_s": _busy_seconds(task.ledger_path())}
    res["seconds"] = time.perf_counter() - t0
    res["cpu_s"] = _cpu_seconds() - c0
    if prof is not None:
        import pstats

        prof.disable()
        st = pstats.Stats(prof)
        rows = [{"function": f"{os.path.relpath(f, REPO) if f.startswith(REPO) else os.path.basename(f)}"
                             f":{line}({fn})", "calls": nc, "tottime_s": round(tt, 4), "cumtime_s": round(ct, 4)}
                for (f, line, fn), (_, nc, tt, ct, _) in st.stats.items()]
        res["profile_tottime"] = sorted(rows, key=lambda r: -r["tottime_s"])[:25]
        res["profile_cumtime"] = sorted(rows, key=lambda r: -r["cumtime_s"])[:40]
    # the stitch task's finish() is the driver's union-find resolve
    st = stages["segment_stitch"]
    st["resolve_s"] = st["wall_s"] - st["blocks_s"]
    res["stages"] = stages
    res["busy_s"] = sum(s["busy_s"] for s in stages.values())
    res["workers"] = backend.workers
    return res


def run_child(mode: str, work: str, block: tuple, out_name: str, interval: float = 0.01,
              profile: bool = False, pred_url: str | None = None, env: dict | None = None) -> dict:
    """Run one measured mode in a subprocess; sample its process tree's RSS from outside."""
    import psutil

    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--work", work,
           "--block", *map(str, block), "--out-name", out_name] + \
        (["--child-profile"] if profile else []) + (["--pred", pred_url] if pred_url else [])
    log_out = open(os.path.join(work, f"{out_name}.stdout"), "w+")
    log_err = open(os.path.join(work, f"{out_name}.stderr"), "w+")
    proc = subprocess.Popen(cmd, cwd=work, stdout=log_out, stderr=log_err, text=True,
                            env={**os.environ, **(env or {})})
    root = psutil.Process(proc.pid)
    peak_sum, per_pid = 0, {}
    while True:
        pid, status = os.waitpid(proc.pid, os.WNOHANG)
        if pid:
            break
        total = 0
        try:
            procs = [root] + root.children(recursive=True)
        except psutil.Error:
            procs = []
        for p in procs:
            try:
                rss = p.memory_info().rss
            except psutil.Error:
                continue
            total += rss
            per_pid[p.pid] = max(per_pid.get(p.pid, 0), rss)
        peak_sum = max(peak_sum, total)
        time.sleep(interval)
    proc.returncode = os.waitstatus_to_exitcode(status)
    log_out.seek(0)
    log_err.seek(0)
    out, err = log_out.read(), log_err.read()
    log_out.close()
    log_err.close()
    if proc.returncode != 0:
        raise RuntimeError(f"child {mode} failed ({proc.returncode}):\n{err[-3000:]}")
    res = json.loads(out.strip().splitlines()[-1])
    driver_peak = per_pid.pop(proc.pid, 0)
    res.update(peak_tree_rss=peak_sum, peak_driver_rss=driver_peak,
               peak_worker_rss=max(per_pid.values()) if per_pid else 0, n_child_processes=len(per_pid))
    return res


# -- driver ----------------------------------------------------------------------------------

def mib(b: float) -> float:
    return round(b / 2**20, 1)


def write_markdown(res: dict, path: str) -> None:
    s, r = res["setup"], res["results"]
    g = r["global"]
    lines = [
        "# bench_cc: blockwise segment stage vs global cc3d",
        "",
        f"Machine: {res['machine']}. cc3d {res['versions']['cc3d']}, fastremap "
        f"{res['versions']['fastremap']}, daisy {res['versions']['daisy']}. Load average at start: "
        f"{res['load_avg_start']}, end: {res['load_avg_end']}.",
        "",
        f"Volume {tuple(s['shape'])} voxels ({s['voxels']:,}), (1, z, y, x) uint8 probabilities at "
        f"{tuple(VOXEL_SIZE)} nm; {s['input']}. Foreground (p > 0.5) {s['foreground_fraction']:.2%}; "
        f"{s['components_before_filter']} 26-connected components, {s['instances']} of ≥ {MIN_SIZE} voxels. "
        f"Blocks {tuple(s['block'])} ({s['blocks']} blocks). Min of {s['repeats']} repeats, each in a "
        "fresh process.",
        "",
        "| mode | workers | time s | voxels/s | per-core voxels/s | per-core ratio to global | per-core ratio to global + write | CPU s | per-CPU-second ratio to global / global + write | peak RSS, process tree MiB | largest process MiB | RSS after imports MiB | labels equal global |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for key in ("global", "local", "daisy2"):
        e = r[key]
        lines.append(
            f"| {e['label']} | {e['workers']} | {e['seconds']:.3f} | {e['voxels_per_s']:,.0f} | "
            f"{e['per_core_voxels_per_s']:,.0f} | **{e['per_core_ratio_to_global']:.3f}** | "
            f"{e['per_core_ratio_to_global_with_write']:.3f} | {e['cpu_s']:.3f} | "
            f"{e['per_cpu_s_ratio_to_global']:.3f} / {e['per_cpu_s_ratio_to_global_with_write']:.3f} | "
            f"{e['peak_tree_rss_mib']} | {e['largest_process_rss_mib']} | {e['rss_after_imports_mib']} | "
            f"{e.get('labels_equal_global', '—')} |")
    lines += [
        "",
        f"Global breakdown (s): read {g['read_s']:.3f}, threshold {g['threshold_s']:.3f}, cc3d "
        f"{g['cc3d_s']:.3f}, size filter {g['size_filter_s']:.3f}, renumber {g['renumber_s']:.3f}; "
        f"writing the labels to zarr (not counted in 'global') adds {g['global_write_s']:.3f} s; "
        "'global + write' counts it, as the blockwise modes count writing their output.",
        "",
        "Blockwise stage times (s, wall in the driver; resolve = union-find in the driver):",
        "",
        "| mode | label | stitch (blocks) | resolve | relabel |",
        "|---|---:|---:|---:|---:|",
    ]
    for key in ("local", "daisy2"):
        st = r[key]["stages"]
        lines.append(f"| {r[key]['label']} | {st['segment_label']['wall_s']:.3f} | "
                     f"{st['segment_stitch']['blocks_s']:.3f} | {st['segment_stitch']['resolve_s']:.3f} | "
                     f"{st['segment_relabel']['wall_s']:.3f} |")
    lines += [
        "",
        "Per-block busy time (sum of the ledger's per-block durations, i.e. without worker start-up, "
        "scheduling and the driver's resolve): "
        + ", ".join(f"{r[k]['label']} {r[k]['block_busy_s']:.3f} s (per-core ratio "
                    f"{r[k]['per_core_ratio_busy_to_global']:.3f})" for k in ("local", "daisy2")) + ".",
        "",
        f"Targets: per-core throughput ≥ 0.7× global cc3d (in memory) — local x1 "
        f"{r['local']['per_core_ratio_to_global']:.3f} ({'met' if r['local']['per_core_ratio_to_global'] >= 0.7 else 'NOT met'}), "
        f"daisy x2 {r['daisy2']['per_core_ratio_to_global']:.3f} "
        f"({'met' if r['daisy2']['per_core_ratio_to_global'] >= 0.7 else 'NOT met'}).",
        "",
        "## Memory (driver process RSS, MiB; fresh process per run)",
        "",
        "| run | voxels | time s | RSS after imports | peak | peak − imports |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    g_delta = r["global"]["delta_rss_mib"]
    lines.append(f"| global cc3d, full volume | {s['voxels']:,} | {g['seconds']:.3f} | "
                 f"{g['rss_after_imports_mib']} | {g['peak_tree_rss_mib']} | {g_delta} |")
    for name, m in res.get("memory_scaling", {}).items():
        lines.append(f"| {name.replace('_', ' ')} | {m['voxels']:,} | {m['seconds']:.3f} | "
                     f"{m['rss_after_imports_mib']} | {m['peak_rss_mib']} | {m['delta_rss_mib']} |")
    lines += [
        "",
        f"One block is {s['block_bytes_uint64_mib']} MiB as uint64; the whole volume is "
        f"{s['volume_bytes_uint8_mib']} MiB per uint8 copy and {s['volume_bytes_uint64_mib']} MiB per "
        f"uint64 copy. daisy x2: driver peak {r['daisy2']['largest_process_rss_mib']} MiB max process, "
        f"largest worker {r['daisy2']['largest_worker_rss_mib']} MiB, whole tree "
        f"{r['daisy2']['peak_tree_rss_mib']} MiB.",
    ]
    prof = res.get("profile_local")
    if prof:
        lines += ["", f"## cProfile of one local x1 run ({prof['seconds_under_profiler']} s under the "
                  "profiler), top by own time", "",
                  "| function | calls | own s | cumulative s |", "|---|---:|---:|---:|"]
        for p in prof["top_tottime"][:15]:
            lines.append(f"| `{p['function']}` | {p['calls']} | {p['tottime_s']} | {p['cumtime_s']} |")
    if res.get("notes"):
        lines += [""] + [f"- {n}" for n in res["notes"]]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small volume (smoke test)")
    ap.add_argument("--large", action="store_true",
                    help="256 x 1024 x 1024 voxels, (64, 256, 256) blocks: worker start-up amortised")
    ap.add_argument("--repeats", type=int, default=None, help="runs per mode (>= 2)")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    ap.add_argument("--child", choices=("global", "local", "daisy"), help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--block", type=int, nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--out-name", help=argparse.SUPPRESS)
    ap.add_argument("--child-profile", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--pred", help=argparse.SUPPRESS)
    ap.add_argument("--profile", action="store_true",
                    help="also cProfile one extra local x1 run (always done when the target is missed)")
    args = ap.parse_args(argv)
    if args.child:
        res = child(args.child, args.work, tuple(args.block), args.out_name, args.child_profile,
                    args.pred)
        print(json.dumps(res))
        return res

    from importlib import metadata

    import cc3d
    import psutil

    from cleftwise.storage.volume import create_volume, open_volume

    setup = QUICK if args.quick else LARGE if args.large else FULL
    repeats = max(2, args.repeats or setup.repeats)
    voxels = int(np.prod(setup.shape))
    load_start = [round(x, 2) for x in os.getloadavg()]
    print(f"bench_cc: volume {setup.shape} ({voxels:,} voxels) uint8, blocks {setup.block}, "
          f"~{setup.foreground:.0%} foreground, {CONNECTIVITY}-connected, min_size {MIN_SIZE}, "
          f"{repeats} repeats; load {load_start}")
    work = tempfile.mkdtemp(prefix="cleftwise_bench_cc_")
    try:
        t0 = time.perf_counter()
        union = synapse_like_probability(setup.shape, setup.foreground, seed=0)
        vol = create_volume(os.path.join(work, "pred.zarr", "pred"), shape=setup.shape,
                            voxel_size=VOXEL_SIZE, dtype="uint8", chunk_shape=setup.block, num_channels=1)
        vol.write(vol.roi, union[None])
        half_shape = (setup.shape[0] // 2,) + tuple(setup.shape[1:])
        half_url = os.path.join(work, "pred_half.zarr", "pred")
        half = create_volume(half_url, shape=half_shape, voxel_size=VOXEL_SIZE, dtype="uint8",
                             chunk_shape=setup.block, num_channels=1)
        half.write(half.roi, union[None, :half_shape[0]])
        mask = union > THRESHOLD * 255.0
        n_before = int(cc3d.connected_components(mask, connectivity=CONNECTIVITY, return_N=True)[1])
        fg = float(mask.mean())
        del mask
        ref = global_labels(union)
        n_inst = int(ref.max())
        del union
        print(f"input ready in {time.perf_counter() - t0:.1f} s: foreground {fg:.2%}, {n_before} components, "
              f"{n_inst} >= {MIN_SIZE} voxels")

        modes = {"global": ("global", "global cc3d (in memory)", 1),
                 "local": ("local", "blockwise, local x1", 1),
                 "daisy2": ("daisy", "blockwise, daisy x2", 2)}
        runs = {k: [] for k in modes}
        equal = {}
        for rep in range(repeats):
            for key, (mode, label, _) in modes.items():
                out_name = f"{key}_{rep}.zarr"
                r = run_child(mode, work, setup.block, out_name)
                runs[key].append(r)
                if key != "global":
                    labels = open_volume(os.path.join(work, out_name, "synapses")).read()
                    same = bool(np.array_equal(labels, ref))
                    equal[key] = equal.get(key, True) and same
                    del labels
                print(f"  repeat {rep + 1}: {label:28s} {r['seconds']:7.3f} s  peak tree RSS "
                      f"{mib(r['peak_tree_rss'])} MiB" + (f"  equal to global: {equal[key]}" if key != "global" else ""))
                shutil.rmtree(os.path.join(work, out_name), ignore_errors=True)
                shutil.rmtree(os.path.join(work, out_name + "_work"), ignore_errors=True)

        g_best = min(r["seconds"] for r in runs["global"])
        g_write = min(r["global_write_s"] for r in runs["global"])
        g_cpu = min(r["cpu_s"] for r in runs["global"])
        g_write_cpu = min(r["global_write_cpu_s"] for r in runs["global"])
        results = {}
        for key, (mode, label, workers) in modes.items():
            best = min(runs[key], key=lambda r: r["seconds"])
            sec = best["seconds"]
            per_core = voxels / (sec * workers)
            e = {"label": label, "workers": workers, "seconds": round(sec, 4),
                 "all_seconds": [round(r["seconds"], 4) for r in runs[key]],
                 "voxels_per_s": round(voxels / sec, 1), "per_core_voxels_per_s": round(per_core, 1),
                 "per_core_ratio_to_global": round(per_core / (voxels / g_best), 4),
                 "per_core_ratio_to_global_with_write": round(per_core / (voxels / (g_best + g_write)), 4),
                 "cpu_s": round(best["cpu_s"], 4),
                 "per_cpu_s_ratio_to_global": round(g_cpu / best["cpu_s"], 4),
                 "per_cpu_s_ratio_to_global_with_write": round((g_cpu + g_write_cpu) / best["cpu_s"], 4),
                 "peak_tree_rss_mib": mib(max(r["peak_tree_rss"] for r in runs[key])),
                 "largest_process_rss_mib": mib(max(max(r["peak_driver_rss"], r["peak_worker_rss"])
                                                    for r in runs[key])),
                 "largest_worker_rss_mib": mib(max(r["peak_worker_rss"] for r in runs[key])),
                 "rss_after_imports_mib": mib(min(r["rss_before"] for r in runs[key])),
                 "delta_rss_mib": mib(max(r["peak_driver_rss"] - r["rss_before"] for r in runs[key])),
                 "child_processes": max(r["n_child_processes"] for r in runs[key])}
            if key != "global":
                busy = best["busy_s"]
                e["block_busy_s"] = round(busy, 4)
                e["per_core_ratio_busy_to_global"] = round((voxels / busy) / (voxels / g_best), 4)
            if key == "global":
                for k in ("read_s", "threshold_s", "cc3d_s", "size_filter_s", "renumber_s", "global_write_s"):
                    e[k] = round(min(r[k] for r in runs[key]), 4)
            else:
                e["labels_equal_global"] = equal[key]
                e["stages"] = {name: {k: round(v, 4) if isinstance(v, float) else v for k, v in st.items()}
                               for name, st in best["stages"].items()}
            results[key] = e

        # Memory: does the blockwise driver's peak grow with the volume? (local x1 on half the
        # volume, and with glibc limited to 2 malloc arenas, which return freed memory sooner)
        print("memory checks: local x1 on half the volume, and with MALLOC_ARENA_MAX=2 ...")
        memory = {}
        for name, kw in (("local_half_volume", {"pred_url": half_url}),
                         ("local_full_volume", {}),
                         ("local_half_volume_arena2", {"pred_url": half_url, "env": {"MALLOC_ARENA_MAX": "2"}}),
                         ("local_full_volume_arena2", {"env": {"MALLOC_ARENA_MAX": "2"}}),
                         ("global_half_volume", {"pred_url": half_url, "mode": "global"})):
            kw = dict(kw)
            r = run_child(kw.pop("mode", "local"), work, setup.block, f"mem_{name}.zarr", **kw)
            memory[name] = {"voxels": voxels // (2 if "half" in name else 1), "seconds": round(r["seconds"], 3),
                            "rss_after_imports_mib": mib(r["rss_before"]),
                            "peak_rss_mib": mib(r["peak_driver_rss"]),
                            "delta_rss_mib": mib(r["peak_driver_rss"] - r["rss_before"])}
            print(f"  {name:26s} peak {memory[name]['peak_rss_mib']} MiB (+{memory[name]['delta_rss_mib']} "
                  f"over imports)")
            shutil.rmtree(os.path.join(work, f"mem_{name}.zarr"), ignore_errors=True)
            shutil.rmtree(os.path.join(work, f"mem_{name}.zarr_work"), ignore_errors=True)

        profile = None
        if args.profile or results["local"]["per_core_ratio_to_global"] < 0.7:
            print("profiling one extra local x1 run (cProfile) ...")
            p = run_child("local", work, setup.block, "profile.zarr", profile=True)
            profile = {"seconds_under_profiler": round(p["seconds"], 3),
                       "top_tottime": p["profile_tottime"], "top_cumtime": p["profile_cumtime"]}

        def nbytes(shape, itemsize):
            return mib(int(np.prod(shape)) * itemsize)

        res = {
            "benchmark": "bench_cc",
            "quick": args.quick,
            "large": args.large,
            "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs, "
                       f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}",
            "load_avg_start": load_start,
            "load_avg_end": [round(x, 2) for x in os.getloadavg()],
            "versions": {name: metadata.version(dist) for name, dist in (
                ("cc3d", "connected-components-3d"), ("fastremap", "fastremap"), ("daisy", "daisy"),
                ("tensorstore", "tensorstore"), ("numpy", "numpy"), ("pandas", "pandas"))},
            "setup": {**asdict(setup), "voxels": voxels, "voxel_size_nm": list(VOXEL_SIZE),
                      "input": "synthetic smoothed Gaussian random field, logistic-mapped (seed 0)",
                      "threshold": THRESHOLD, "connectivity": CONNECTIVITY, "min_size": MIN_SIZE,
                      "repeats": repeats, "foreground_fraction": round(fg, 5),
                      "components_before_filter": n_before, "instances": n_inst,
                      "blocks": int(np.prod([-(-s // b) for s, b in zip(setup.shape, setup.block)])),
                      "volume_bytes_uint8_mib": nbytes(setup.shape, 1),
                      "volume_bytes_uint64_mib": nbytes(setup.shape, 8),
                      "block_bytes_uint64_mib": nbytes(setup.block, 8)},
            "counted": {
                "global": "TensorStore read of the whole (1, z, y, x) volume, threshold, cc3d, "
                          "size filter (fastremap.unique + mask), fastremap.renumber; in memory",
                "blockwise": "segment_passes: per-block read + threshold + cc3d + per-instance "
                             "statistics + parquet records + boundary faces (npz); per-block face "
                             "reads + equivalence pairs; driver union-find + size filter; per-block "
                             "read + threshold + cc3d again + final uint64 zarr write; ledgers; "
                             "daisy worker start-up",
            },
            "results": results,
            "memory_scaling": memory,
            "profile_local": profile,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)

    os.makedirs(args.out, exist_ok=True)
    stem = "bench_cc_quick" if args.quick else "bench_cc_large" if args.large else "bench_cc"
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump(res, f, indent=2)
    write_markdown(res, os.path.join(args.out, stem + ".md"))
    print()
    for key in ("global", "local", "daisy2"):
        e = results[key]
        print(f"{e['label']:28s} {e['seconds']:7.3f} s  {e['per_core_voxels_per_s'] / 1e6:6.2f} Mvox/s/core  "
              f"ratio {e['per_core_ratio_to_global']:.3f}  peak tree RSS {e['peak_tree_rss_mib']} MiB"
              + (f"  equal: {e['labels_equal_global']}" if key != "global" else ""))
    print(f"results: {os.path.join(args.out, stem + '.json')} (+ .md)")
    if not all(equal.values()):
        print("ERROR: blockwise labels differ from the global labelling", file=sys.stderr)
        sys.exit(1)
    return res


if __name__ == "__main__":
    main()
