"""Benchmark: the segment stage on a cluster backend vs igneous' CCL vs one global cc3d call.

Issue 21, item 4 ("segment" half). The input is bench_cc's synapse-like probability volume
(uint8, ~2 % of voxels above 0.5) at 128 x 512 x 512 (default) or 256 x 1024 x 1024 (``--large``).
Compared, each in a fresh process, all at **6-connectivity** with no size filter (so that every
labelling is the same partition of the foreground):

- **global cc3d + label write**: TensorStore read of the whole volume, threshold,
  ``cc3d.connected_components(connectivity=6)``, uint64 zarr write of the labels;
- **cleftwise local x1**, **daisy x2**, **ray x2**, **dask x2** (``--large``: also x1 of each, the
  1 → 2 worker scaling): the pipeline's own entry point, ``run_pipeline(cfg, ("segment",))``
  (all three passes, worker start-up, ledgers and the uint64 label write included);
- **igneous x1**, **igneous x2**: igneous-pipeline's ``igneous -p N image ccl auto`` (faces,
  links, calc-labels, relabel, clean; its in-process ``LocalTaskQueue``, ``pathos`` processes
  at N > 1) on a ``file://`` neuroglancer-precomputed copy of the same volume (raw encoding,
  chunk = block), ``--threshold-gte 128`` (= p > 0.5 on uint8), raw-encoded output; run from its
  own virtual environment (set-up in benchmarks/requirements.txt).

Per run: wall (timed inside the child after its imports), CPU seconds (user + system of every
process of the tree, sampled from outside every 10 ms, less the child's own CPU before the timed
section: what igneous' pool and Ray's daemons use counts too), processes started (distinct pids seen in the tree), peak RSS of the tree, of
the driver and of each other process (``per_process``: name and peak MiB), the time the first
block started (``first_block_start_s``, from the ledger markers: worker start-up as seen by the
job), and whether the labels are the same partition as the global call's. Ratios: per-core
throughput (voxels / (wall x workers)) to global + write, and wall to igneous x2 and to
cleftwise local x1 (targets of issue 21). Repeats are interleaved; the minimum wall is kept.

Results: ``benchmarks/results/bench_cluster{,_large,_quick}.{json,md}``.

Run: ``python benchmarks/bench_cluster.py [--quick | --large] [--repeats N]
[--backends local,daisy,ray,dask] [--igneous-python PATH]``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
from bench_cc import Setup, synapse_like_probability  # noqa: E402  (same input and geometry record as bench_cc)

VOXEL_SIZE = (40, 4, 4)
THRESHOLD = 0.5
CONNECTIVITY = 6  # igneous' CCL is 6-connected only
MIN_SIZE = 1  # no size filter: every mode labels the same partition
IGNEOUS_PY = os.path.join(HERE, "scratch", "venv-igneous", "bin", "python")
TARGETS = {"wall_vs_igneous2": 1.0, "wall_vs_local1_large": 0.65, "per_core_vs_global_write_large": 0.9,
           "dask_first_block_start_s": 5.0}



FULL = Setup(shape=(128, 512, 512), block=(32, 256, 256), foreground=0.02, repeats=2)
LARGE = Setup(shape=(256, 1024, 1024), block=(64, 256, 256), foreground=0.02, repeats=2)
QUICK = Setup(shape=(32, 256, 256), block=(16, 128, 128), foreground=0.02, repeats=1)


# -- children (one measured mode each, run as `python bench_cluster.py --child ...`) ----------

def _own_cpu() -> float:
    """User + system CPU seconds this process used so far (imports): subtracted from the
    tree's CPU so that, like the wall, it counts the measured section only."""
    import resource

    me = resource.getrusage(resource.RUSAGE_SELF)
    return me.ru_utime + me.ru_stime


def _child_global(work: str, block: tuple) -> dict:
    import cc3d

    from cleftwise.storage.volume import create_volume, open_volume

    cpu0, t0 = _own_cpu(), time.perf_counter()
    union = open_volume(os.path.join(work, "pred.zarr", "pred")).read()[0]
    t1 = time.perf_counter()
    labels = cc3d.connected_components(union > THRESHOLD * 255.0, connectivity=CONNECTIVITY,
                                       out_dtype=np.uint64)
    t2 = time.perf_counter()
    out = create_volume(os.path.join(work, "global.zarr", "labels"), shape=labels.shape,
                        voxel_size=VOXEL_SIZE, dtype="uint64", chunk_shape=block, overwrite=True)
    out.write(out.roi, labels)
    t3 = time.perf_counter()
    return {"seconds": t3 - t0, "cpu_before_s": cpu0, "read_s": t1 - t0, "cc3d_s": t2 - t1, "write_s": t3 - t2,
            "n_labels": int(labels.max()), "output": os.path.join(work, "global.zarr", "labels")}


def _child_cleftwise(work: str, block: tuple, backend: str, workers: int, out_name: str) -> dict:
    from cleftwise.blockwise.runner import BackendConfig
    from cleftwise.postprocess.pipeline import parse_config, run_pipeline

    out_dir = os.path.join(work, out_name)
    cfg = parse_config({
        "raw": os.path.join(work, "raw.zarr", "raw"), "output_dir": out_dir,
        "backend": {"backend": backend, "workers": workers, "progress": False},
        "segment": {"predictions": os.path.join(work, "pred.zarr", "pred"), "channel": "cleft",
                    "threshold": THRESHOLD, "connectivity": CONNECTIVITY, "min_size": MIN_SIZE,
                    "block_shape": list(block)}}, "bench_cluster")
    assert isinstance(cfg.backend, BackendConfig)
    cpu0, t_epoch, t0 = _own_cpu(), time.time(), time.perf_counter()
    summary = run_pipeline(cfg, ("segment",), overwrite=True)
    seconds = time.perf_counter() - t0
    starts = []
    for marker in glob.glob(os.path.join(out_dir, "segment", "**", "done", "*.json"), recursive=True):
        with open(marker) as f:
            m = json.load(f)
        if "time" in m:
            starts.append(float(m["time"]) - float(m.get("duration_s", 0.0)))
    return {"seconds": seconds, "cpu_before_s": cpu0, "first_block_start_s": (min(starts) - t_epoch) if starts else None,
            "stage_summary": summary.get("stages", {}).get("segment"),
            "output": cfg.labels_url}


def child_main(args) -> None:
    """Run one mode; print its JSON as the last stdout line."""
    block = tuple(args.block)
    if args.child == "global":
        res = _child_global(args.work, block)
    else:
        backend, workers = args.child.split(":")
        res = _child_cleftwise(args.work, block, backend, int(workers), args.out_name)
    print(json.dumps(res, default=str))


# igneous: a script run by the igneous venv's python (imports first, then times the CLI call)
IGNEOUS_RUN = r'''
import json, resource, sys, time
from igneous_cli.cli import main
src, dest, shape, parallel = sys.argv[1:5]
me = resource.getrusage(resource.RUSAGE_SELF)
cpu0, t0 = me.ru_utime + me.ru_stime, time.perf_counter()
main(["-p", parallel, "image", "ccl", "auto", src, dest, "--shape", shape, "--threshold-gte", "128",
      "--encoding", "raw"], standalone_mode=False)
print(json.dumps({"seconds": time.perf_counter() - t0, "cpu_before_s": cpu0}))
'''

IGNEOUS_MAKE = r'''
import sys, numpy as np
from cloudvolume import CloudVolume
npy, url, chunk = sys.argv[1], sys.argv[2], [int(v) for v in sys.argv[3].split(",")]
arr = np.load(npy)  # (z, y, x) uint8
info = CloudVolume.create_new_info(num_channels=1, layer_type="image", data_type="uint8", encoding="raw",
                                   resolution=[4, 4, 40], voxel_offset=[0, 0, 0], chunk_size=chunk,
                                   volume_size=list(arr.shape[::-1]))
vol = CloudVolume(url, info=info, progress=False)
vol.commit_info()
vol[:, :, :] = np.ascontiguousarray(arr.T)[..., None]
'''

IGNEOUS_READ = r'''
import sys, numpy as np
from cloudvolume import CloudVolume
vol = CloudVolume(sys.argv[1], progress=False)
np.save(sys.argv[2], np.ascontiguousarray(np.asarray(vol[:, :, :])[..., 0].T))  # (z, y, x)
'''


# -- measuring a child process tree from outside ------------------------------------------

def run_measured(cmd: list, work: str, name: str, interval: float = 0.01, env: dict | None = None) -> dict:
    """Run ``cmd``; sample the RSS and CPU times of its whole process tree every ``interval`` s.
    Returns the child's last JSON line plus peak_tree_rss, peak_driver_rss, per_process,
    processes_started and cpu_tree_s (user + system summed over every pid seen, last sample)."""
    import psutil

    log_out = open(os.path.join(work, f"{name}.stdout"), "w+")
    log_err = open(os.path.join(work, f"{name}.stderr"), "w+")
    proc = subprocess.Popen(cmd, cwd=work, stdout=log_out, stderr=log_err, text=True,
                            env={**os.environ, **(env or {})})
    root = psutil.Process(proc.pid)
    peak_sum, peak, cpu, names = 0, {}, {}, {}
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
                with p.oneshot():
                    rss = p.memory_info().rss
                    ct = p.cpu_times()
                    if p.pid not in names:
                        names[p.pid] = _proc_name(p)
            except psutil.Error:
                continue
            total += rss
            peak[p.pid] = max(peak.get(p.pid, 0), rss)
            cpu[p.pid] = max(cpu.get(p.pid, 0.0), ct.user + ct.system)
        peak_sum = max(peak_sum, total)
        time.sleep(interval)
    rc = os.waitstatus_to_exitcode(status)
    log_out.seek(0)
    log_err.seek(0)
    out, err = log_out.read(), log_err.read()
    log_out.close()
    log_err.close()
    if rc != 0:
        raise RuntimeError(f"{name} failed ({rc}): {' '.join(cmd)}\n{err[-3000:]}")
    res = json.loads(out.strip().splitlines()[-1])
    driver = peak.pop(proc.pid, 0)
    others = sorted(peak.items(), key=lambda kv: -kv[1])
    res.update(peak_tree_rss=peak_sum, peak_driver_rss=driver,
               peak_largest_other_rss=others[0][1] if others else 0,
               per_process=[{"name": names.get(pid, "?"), "peak_rss_mib": mib(r)} for pid, r in others[:12]],
               processes_started=len(others),
               cpu_tree_s=sum(cpu.values()) - float(res.get("cpu_before_s", 0.0)))
    return res


def _proc_name(p) -> str:
    """A short name: the executable, or for python the script / module it runs."""
    name = p.name()
    try:
        cmd = p.cmdline()
    except Exception:  # noqa: BLE001 - a process that just ended
        return name
    if name.startswith("python") and len(cmd) > 1:
        arg = cmd[2] if cmd[1] in ("-m", "-c") and len(cmd) > 2 else cmd[1]
        return f"python {os.path.basename(arg)[:40]}" if cmd[1] != "-c" else "python -c"
    return name


def mib(b: float) -> float:
    return round(b / 2**20, 1)


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True when ``a`` and ``b`` (same shape, 0 = background) split the foreground into the
    same instances, whatever their ids."""
    if a.shape != b.shape:
        return False
    fa, fb = a != 0, b != 0
    if not np.array_equal(fa, fb):
        return False
    va, vb = a[fa].astype(np.uint64), b[fb].astype(np.uint64)
    if va.size == 0:
        return True
    import fastremap

    na, nb = len(fastremap.unique(va)), len(fastremap.unique(vb))
    pairs = np.unique(np.stack([va, vb], axis=1), axis=0) if va.size < 2_000_000 else None
    if pairs is None:  # large: pack (renumbered) id pairs into one uint64
        ra, _ = fastremap.renumber(va, in_place=False)
        rb, _ = fastremap.renumber(vb, in_place=False)
        npairs = len(fastremap.unique(ra.astype(np.uint64) << np.uint64(32) | rb.astype(np.uint64)))
    else:
        npairs = len(pairs)
    return na == nb == npairs


# -- driver -------------------------------------------------------------------------------

def git_state() -> dict:
    def git(*a):
        r = subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True)
        return r.stdout.rstrip() if r.returncode == 0 else ""
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "modified": [l[3:] for l in git("status", "--porcelain", "--untracked-files=no").splitlines()]}


def igneous_version(py: str) -> str | None:
    if not os.path.exists(py):
        return None
    r = subprocess.run([py, "-c", "from importlib import metadata as m; print('igneous-pipeline', "
                        "m.version('igneous-pipeline') + ', cloud-volume', m.version('cloud-volume'))"],
                       capture_output=True, text=True)
    return r.stdout.strip() or None


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="32 x 256 x 256 (smoke test), 1 repeat")
    size.add_argument("--large", action="store_true", help="256 x 1024 x 1024, plus 1 → 2 worker scaling")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--backends", default="local,daisy,ray,dask",
                    help="cleftwise backends to measure (local runs x1, the others x2; --large: x1 too)")
    ap.add_argument("--no-igneous", action="store_true", help="skip igneous")
    ap.add_argument("--igneous-python", default=IGNEOUS_PY)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--block", type=int, nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--out-name", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child_main(args)
        return {}

    from importlib import metadata

    import psutil

    from cleftwise.storage.volume import create_volume, open_volume

    setup = QUICK if args.quick else LARGE if args.large else FULL
    repeats = max(1, args.repeats or setup.repeats)
    voxels = int(np.prod(setup.shape))
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    modes = {"global": ("global", 1)}
    for b in backends:
        for n in ((1,) if b == "local" else (1, 2) if args.large else (2,)):
            modes[f"{b}{n}"] = (f"{b}:{n}", n)
    ign_ver = None if args.no_igneous else igneous_version(args.igneous_python)
    notes = []
    if not args.no_igneous and ign_ver is None:
        notes.append(f"igneous not run: no igneous-pipeline at {args.igneous_python} (set-up in "
                     "benchmarks/requirements.txt)")
    if ign_ver:
        modes["igneous1"] = ("igneous:1", 1)
        modes["igneous2"] = ("igneous:2", 2)
    load_start = [round(x, 2) for x in os.getloadavg()]
    print(f"bench_cluster: {setup.shape} ({voxels:,} voxels), blocks {setup.block}, {CONNECTIVITY}-connected, "
          f"modes {list(modes)}, {repeats} repeat(s); load {load_start}")
    work = tempfile.mkdtemp(prefix="cleftwise_bench_cluster_")
    try:
        t0 = time.perf_counter()
        union = synapse_like_probability(setup.shape, setup.foreground, seed=0)
        pred = create_volume(os.path.join(work, "pred.zarr", "pred"), shape=setup.shape, voxel_size=VOXEL_SIZE,
                             dtype="uint8", chunk_shape=setup.block, num_channels=1)
        pred.write(pred.roi, union[None])
        raw = create_volume(os.path.join(work, "raw.zarr", "raw"), shape=setup.shape, voxel_size=VOXEL_SIZE,
                            dtype="uint8", chunk_shape=setup.block)  # the pipeline config needs a raw
        raw.write(raw.roi, union)
        import cc3d

        ref, n_ref = cc3d.connected_components(union > THRESHOLD * 255.0, connectivity=CONNECTIVITY,
                                               return_N=True)
        fg = float((ref != 0).mean())
        ign_src = "file://" + os.path.join(work, "ign_src")
        xyz_block = ",".join(map(str, setup.block[::-1]))
        if ign_ver:
            np.save(os.path.join(work, "union.npy"), union)
            subprocess.run([args.igneous_python, "-c", IGNEOUS_MAKE, os.path.join(work, "union.npy"), ign_src,
                            xyz_block], check=True, cwd=work)
            os.remove(os.path.join(work, "union.npy"))
            with open(os.path.join(work, "ign_run.py"), "w") as f:
                f.write(IGNEOUS_RUN)
        del union
        print(f"input ready in {time.perf_counter() - t0:.1f} s: foreground {fg:.2%}, {n_ref} components")

        runs = {k: [] for k in modes}
        equal, failed = {}, {}
        for rep in range(repeats):
            for key, (mode, workers) in modes.items():
                if key in failed:
                    continue
                name = f"{key}_{rep}"
                if mode.startswith("igneous"):
                    dest = "file://" + os.path.join(work, name)
                    cmd = [args.igneous_python, os.path.join(work, "ign_run.py"), ign_src, dest, xyz_block,
                           str(workers)]
                else:
                    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--work", work,
                           "--block", *map(str, setup.block), "--out-name", name]
                try:
                    r = run_measured(cmd, work, name)
                except RuntimeError as e:  # record and go on with the other modes
                    if key == "global":
                        raise
                    failed[key] = str(e)[-1500:]
                    print(f"  repeat {rep + 1}: {key:10s} FAILED: {str(e).splitlines()[0]}")
                    continue
                # labels: same partition as the global 6-connected call?
                if mode.startswith("igneous"):
                    npy = os.path.join(work, name + ".npy")
                    subprocess.run([args.igneous_python, "-c", IGNEOUS_READ, dest, npy], check=True, cwd=work)
                    labels = np.load(npy)
                    os.remove(npy)
                else:
                    labels = open_volume(r["output"]).read()
                    if labels.ndim == 4:
                        labels = labels[0]
                same = same_partition(labels, ref)
                del labels
                equal[key] = equal.get(key, True) and same
                r["labels_same_partition"] = same
                runs[key].append(r)
                print(f"  repeat {rep + 1}: {key:10s} {r['seconds']:7.3f} s wall, {r['cpu_tree_s']:7.2f} CPU s, "
                      f"{r['processes_started']} processes, peak tree {mib(r['peak_tree_rss'])} MiB, "
                      f"same partition: {same}")
                if mode.startswith("igneous"):
                    shutil.rmtree(os.path.join(work, name), ignore_errors=True)
                elif mode != "global":
                    shutil.rmtree(os.path.join(work, name), ignore_errors=True)

        g = min(runs["global"], key=lambda r: r["seconds"])
        g_sec = g["seconds"]
        results = {}
        for key in failed:
            modes.pop(key)
            notes.append(f"{key} failed, left out: {failed[key]}")
        for key, (mode, workers) in modes.items():
            best = min(runs[key], key=lambda r: r["seconds"])
            sec = best["seconds"]
            e = {"mode": mode, "workers": workers, "seconds": round(sec, 3),
                 "all_seconds": [round(r["seconds"], 3) for r in runs[key]],
                 "cpu_tree_s": round(best["cpu_tree_s"], 2),
                 "voxels_per_s": round(voxels / sec), "per_core_voxels_per_s": round(voxels / (sec * workers)),
                 "per_core_ratio_to_global_write": round(g_sec / (sec * workers), 3),
                 "per_cpu_s_ratio_to_global_write": round(g["cpu_tree_s"] / best["cpu_tree_s"], 3),
                 "processes_started": max(r["processes_started"] for r in runs[key]),
                 "peak_tree_rss_mib": mib(max(r["peak_tree_rss"] for r in runs[key])),
                 "peak_driver_rss_mib": mib(max(r["peak_driver_rss"] for r in runs[key])),
                 "peak_largest_other_process_rss_mib": mib(max(r["peak_largest_other_rss"] for r in runs[key])),
                 "per_process": best["per_process"],
                 "labels_same_partition": equal[key]}
            if best.get("first_block_start_s") is not None:
                e["first_block_start_s"] = round(best["first_block_start_s"], 3)
            for k in ("read_s", "cc3d_s", "write_s", "n_labels"):
                if k in best:
                    e[k] = round(best[k], 3) if isinstance(best[k], float) else best[k]
            if best.get("stage_summary") is not None:
                e["stage_summary"] = best["stage_summary"]
            results[key] = e
        ratios = {}
        for key, e in results.items():
            if key == "global":
                continue
            if "igneous2" in results and not key.startswith("igneous"):
                e["wall_ratio_to_igneous2"] = round(e["seconds"] / results["igneous2"]["seconds"], 3)
            if "local1" in results and key != "local1" and not key.startswith("igneous"):
                e["wall_ratio_to_local1"] = round(e["seconds"] / results["local1"]["seconds"], 3)
        for b in ("daisy", "ray", "dask"):
            if f"{b}1" in results and f"{b}2" in results:
                ratios[f"{b}_speedup_1_to_2"] = round(results[f"{b}1"]["seconds"] / results[f"{b}2"]["seconds"], 3)
        met = {}
        for key, e in results.items():
            if e["workers"] == 2 and not key.startswith("igneous"):
                if "wall_ratio_to_igneous2" in e:
                    met[f"{key}: wall <= igneous x2"] = e["wall_ratio_to_igneous2"] <= TARGETS["wall_vs_igneous2"]
                if args.large and "wall_ratio_to_local1" in e:
                    met[f"{key}: wall <= 0.65 x local x1"] = e["wall_ratio_to_local1"] <= TARGETS["wall_vs_local1_large"]
                if args.large:
                    met[f"{key}: per core >= 0.9 x global + write"] = \
                        e["per_core_ratio_to_global_write"] >= TARGETS["per_core_vs_global_write_large"]
        if "dask2" in results and results["dask2"].get("first_block_start_s") is not None:
            met["dask2: first block starts <= 5 s"] = results["dask2"]["first_block_start_s"] <= \
                TARGETS["dask_first_block_start_s"]

        versions = {}
        for name, dist in (("cc3d", "connected-components-3d"), ("daisy", "daisy"), ("ray", "ray"),
                           ("dask", "dask"), ("distributed", "distributed"), ("tensorstore", "tensorstore"),
                           ("numpy", "numpy")):
            try:
                versions[name] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                versions[name] = None
        versions["igneous"] = ign_ver
        res = {
            "benchmark": "bench_cluster", "quick": args.quick, "large": args.large,
            "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "git": git_state(),
            "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs, "
                       f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}",
            "load_avg_start": load_start, "load_avg_end": [round(x, 2) for x in os.getloadavg()],
            "versions": versions,
            "setup": {**asdict(setup), "repeats": repeats, "voxels": voxels, "voxel_size_nm": list(VOXEL_SIZE),
                      "threshold": THRESHOLD, "connectivity": CONNECTIVITY, "min_size": MIN_SIZE,
                      "foreground_fraction": round(fg, 5), "components": int(n_ref),
                      "blocks": int(np.prod([-(-s // b) for s, b in zip(setup.shape, setup.block)])),
                      "igneous_task_shape_xyz": xyz_block},
            "results": results, "ratios": ratios, "targets": TARGETS, "met": met, "notes": notes,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)

    os.makedirs(args.out, exist_ok=True)
    stem = "bench_cluster_quick" if args.quick else "bench_cluster_large" if args.large else "bench_cluster"
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump(res, f, indent=2)
    write_markdown(res, os.path.join(args.out, stem + ".md"))
    print(f"results: {os.path.join(args.out, stem + '.json')} (+ .md)")
    if not all(v for k, v in equal.items() if k not in failed):
        print("ERROR: some labelling is not the global 6-connected partition: "
              + ", ".join(k for k, v in equal.items() if not v), file=sys.stderr)
        sys.exit(1)
    return res


def write_markdown(res: dict, path: str) -> None:
    s, r = res["setup"], res["results"]
    lines = [
        "# bench_cluster: segment stage on cluster backends vs igneous CCL vs global cc3d",
        "",
        f"Measured {res['measured_at']}, commit {res['git'].get('commit') or '?'}"
        + (f" (modified: {', '.join(res['git']['modified'])})" if res["git"].get("modified") else "")
        + f". Machine: {res['machine']}; load average at start {res['load_avg_start']}, end "
        f"{res['load_avg_end']} (a shared machine: compare ratios within this run). Versions: "
        + ", ".join(f"{k} {v}" for k, v in res["versions"].items()) + ".",
        "",
        f"Volume {tuple(s['shape'])} = {s['voxels']:,} voxels uint8, foreground {s['foreground_fraction']:.2%}, "
        f"{s['components']} components at {s['connectivity']}-connectivity (no size filter); blocks "
        f"{tuple(s['block'])} ({s['blocks']}), igneous task shape {s['igneous_task_shape_xyz']} (x, y, z). "
        f"Min wall of {s['repeats']} interleaved repeat(s), each a fresh process.",
        "",
        "| mode | workers | wall s | CPU s (tree) | per-core ratio to global + write | CPU s of global + write / CPU s | wall / igneous x2 | "
        "wall / local x1 | first block starts s | processes started | peak RSS tree MiB | driver MiB | "
        "largest other process MiB | same partition as global |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for key, e in r.items():
        lines.append(
            f"| {key} | {e['workers']} | {e['seconds']:.3f} | {e['cpu_tree_s']:.2f} | "
            f"{e['per_core_ratio_to_global_write']:.3f} | {e['per_cpu_s_ratio_to_global_write']:.3f} | "
            f"{e.get('wall_ratio_to_igneous2', '—')} | "
            f"{e.get('wall_ratio_to_local1', '—')} | {e.get('first_block_start_s', '—')} | "
            f"{e['processes_started']} | {e['peak_tree_rss_mib']} | {e['peak_driver_rss_mib']} | "
            f"{e['peak_largest_other_process_rss_mib']} | {e['labels_same_partition']} |")
    g = r["global"]
    lines += ["", f"global = read {g.get('read_s')} s + cc3d {g.get('cc3d_s')} s + uint64 zarr write "
              f"{g.get('write_s')} s."]
    if res["ratios"]:
        lines += ["", "Worker scaling 1 → 2 (wall x1 / wall x2): "
                  + ", ".join(f"{k} {v}" for k, v in res["ratios"].items()) + "."]
    if res["met"]:
        lines += ["", "Targets (issue 21): " + "; ".join(f"{k}: {'met' if v else 'NOT met'}"
                                                      for k, v in res["met"].items()) + "."]
    lines += ["", "Peak RSS per process (largest first, MiB; the driver excluded):", ""]
    for key, e in r.items():
        if e["per_process"]:
            lines.append(f"- {key}: " + ", ".join(f"{p['name']} {p['peak_rss_mib']}" for p in e["per_process"]))
    if res.get("notes"):
        lines += [""] + [f"- {n}" for n in res["notes"]]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
