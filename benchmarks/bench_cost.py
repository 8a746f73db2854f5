"""Benchmark: measured CPU cost of predict, segment and partners per block and per voxel,
extrapolated to a teravoxel (10^12 voxels); writes docs/cost_per_teravoxel.md from its JSON.

On a synthetic EM volume with neurons (``cleftwise.storage.synthetic``; full: 48 x 512 x 512,
the demo's volume; ``--quick``: 36 x 320 x 320) the pipeline runs the stages ``predict``,
``segment`` and ``partners`` one after the other, in this process, on the local backend with
**one torch thread** (per-core costs), the shipped ``models/weights/rsunet_polarity.pt``, the
README default predict settings (block 32 x 256 x 256, patch 18 x 160 x 160, stride 9 x 80 x 80,
batch 4) and the default segment/partners settings. Per stage: wall, CPU seconds (user +
system of this process and reaped children: load-robust), blocks and the mean per-block time
from the ledger markers. For predict also: patches evaluated and the time inside
``RSUNet.forward`` (wrapped for counting; CPU time of the calling thread, which with one torch
thread is the pass's CPU time), the model's FLOPs per patch (``torch.utils.flop_counter``) and
so the measured CPU FLOP rate per core.

Extrapolation to 10^12 voxels (stated in the doc): segment and partners scale with voxels
(CPU s per voxel x 10^12); predict scales with patches, 10^12 / prod(stride) on a large volume
(a small volume has relatively more patches at its faces), times the measured CPU s per patch.
The GPU column is an estimate, not a measurement: FLOPs per teravoxel / (sustained FLOP rate),
given for the sustained rates named in the JSON (``gpu_sustained_tflops``), plus the CPU
stages that stay on CPU. Results: ``benchmarks/results/bench_cost{,_quick}.json`` and
``docs/cost_per_teravoxel.md`` (not written by ``--quick`` unless ``--doc``).

Run: ``python benchmarks/bench_cost.py [--quick] [--doc]`` (~4 min full on an idle 2-core
machine, most of it predict).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import resource
import shutil
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
from bench_cluster import git_state  # noqa: E402  (commit and modified files, as there)
from predict_grid import PatchCounter  # noqa: E402

WEIGHTS = os.path.join(REPO, "models", "weights", "rsunet_polarity.pt")
PATCH, STRIDE, BLOCK, BATCH = (18, 160, 160), (9, 80, 80), (32, 256, 256), 4
FULL_SHAPE, QUICK_SHAPE = (48, 512, 512), (36, 320, 320)
TERAVOXEL = 1e12
GPU_SUSTAINED_TFLOPS = (10.0, 50.0)  # assumptions, not measurements (see the doc)
DOC = os.path.join(REPO, "docs", "cost_per_teravoxel.md")


def cpu_seconds() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def ledger_block_times(stage_dir: str) -> dict:
    """Per step: number of done markers and their mean/max ``duration_s``."""
    out = {}
    for done in sorted(glob.glob(os.path.join(stage_dir, "**", "done"), recursive=True)):
        d = []
        for m in glob.glob(os.path.join(done, "*.json")):
            with open(m) as f:
                d.append(float(json.load(f).get("duration_s", 0.0)))
        if d:
            out[os.path.relpath(os.path.dirname(done), stage_dir)] = {
                "blocks": len(d), "mean_block_s": round(float(np.mean(d)), 4), "max_block_s": round(max(d), 4)}
    return out


def model_flops_per_patch() -> tuple[int, int]:
    """(FLOPs of one forward pass of a (1, 1, 18, 160, 160) patch, parameters) of the shipped model."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from cleftwise.models.checkpoint import load_model

    model, _ = load_model(WEIGHTS, device="cpu")
    model.eval()
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        model(torch.zeros((1, 1) + PATCH))
    return int(fc.get_total_flops()), int(sum(p.numel() for p in model.parameters()))


def measure(shape: tuple) -> dict:
    import torch

    from cleftwise.postprocess.pipeline import parse_config, run_pipeline
    from cleftwise.storage.synthetic import SyntheticConfig, generate_volume

    torch.set_num_threads(1)
    work = tempfile.mkdtemp(prefix="cleftwise_bench_cost_")
    try:
        t0 = time.perf_counter()
        vol = os.path.join(work, "synthetic.zarr")
        generate_volume(SyntheticConfig(shape=tuple(shape), seed=7), vol, overwrite=True)
        print(f"synthetic volume {shape} in {time.perf_counter() - t0:.1f} s")
        out = os.path.join(work, "run")
        cfg = parse_config({
            "raw": os.path.join(vol, "raw"), "neurons": os.path.join(vol, "neurons"), "output_dir": out,
            "backend": {"backend": "local", "workers": 1, "progress": False},
            "predict": {"checkpoint": WEIGHTS, "block_shape": list(BLOCK), "patch_shape": list(PATCH),
                        "stride": list(STRIDE), "batch_size": BATCH, "torch_threads": 1, "device": "cpu"},
            "segment": {"block_shape": list(BLOCK)}}, "bench_cost")
        stages = {}
        for name in ("predict", "segment", "partners"):
            with PatchCounter() as pc:
                c0, w0 = cpu_seconds(), time.perf_counter()
                summary = run_pipeline(cfg, (name,))
                wall, cpu = time.perf_counter() - w0, cpu_seconds() - c0
            e = {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
                 "steps": ledger_block_times(os.path.join(out, name)),
                 "summary_seconds": summary.get("seconds", {}).get(name)}
            if name == "predict":
                e.update(patches=pc.patches, forward_calls=pc.calls, forward_wall_s=round(pc.seconds, 3),
                         forward_cpu_s=round(pc.thread_cpu_s, 3))
            stages[name] = e
            print(f"  {name:9s} wall {wall:7.2f} s, CPU {cpu:7.2f} s" +
                  (f", {pc.patches} patches, {pc.thread_cpu_s:.2f} CPU s in forward" if name == "predict" else ""))
        import sqlite3

        with sqlite3.connect(os.path.join(out, "synapses.db")) as db:
            try:
                n_syn = int(db.execute("select count(*) from synapses").fetchone()[0])
            except sqlite3.Error:
                n_syn = None
        return {"stages": stages, "synapses": n_syn}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def extrapolate(shape: tuple, m: dict, flops: int) -> dict:
    voxels = int(np.prod(shape))
    p = m["stages"]["predict"]
    patches_per_tv = TERAVOXEL / float(np.prod(STRIDE))
    cpu_per_patch = p["cpu_s"] / p["patches"]
    fwd_per_patch = p["forward_cpu_s"] / p["patches"]
    flop_rate = flops / fwd_per_patch  # FLOP per CPU second of one thread in model.forward
    rows = {"predict": {"cpu_s_per_voxel": p["cpu_s"] / voxels, "cpu_s_per_patch": cpu_per_patch,
                        "core_hours_per_tv": patches_per_tv * cpu_per_patch / 3600,
                        "core_hours_per_tv_naive_per_voxel": p["cpu_s"] / voxels * TERAVOXEL / 3600,
                        "core_hours_per_tv_outside_model": patches_per_tv * (p["cpu_s"] - p["forward_cpu_s"])
                        / p["patches"] / 3600,
                        "flops_per_tv": patches_per_tv * flops,
                        "gpu_hours_per_tv": {str(r): patches_per_tv * flops / (r * 1e12) / 3600
                                             for r in GPU_SUSTAINED_TFLOPS}}}
    for name in ("segment", "partners"):
        s = m["stages"][name]
        rows[name] = {"cpu_s_per_voxel": s["cpu_s"] / voxels, "core_hours_per_tv": s["cpu_s"] / voxels * TERAVOXEL / 3600}
    rows["total_cpu"] = {"core_hours_per_tv": sum(rows[k]["core_hours_per_tv"] for k in ("predict", "segment", "partners"))}
    return {"voxels": voxels, "patches_measured": p["patches"], "patches_per_tv": patches_per_tv,
            "model_flops_per_patch": flops, "cpu_flop_rate_per_core_gflops": flop_rate / 1e9,
            "forward_share_of_predict_cpu": p["forward_cpu_s"] / p["cpu_s"], "rows": rows}


def write_doc(res: dict, json_rel: str) -> None:
    x, r = res["extrapolation"], res["extrapolation"]["rows"]
    st = res["measured"]["stages"]
    g = res["git"]
    gpu = r["predict"]["gpu_hours_per_tv"]
    rates = list(gpu)
    seg_part = r["segment"]["core_hours_per_tv"] + r["partners"]["core_hours_per_tv"]
    lines = [
        "# Cost per teravoxel",
        "",
        f"Generated by `python benchmarks/bench_cost.py` from `{json_rel}` (measured {res['measured_at']}, "
        f"commit {g.get('commit') or '?'}" + (f", with {len(g['modified'])} tracked files modified (listed in the "
                                             "JSON)" if g.get("modified") else "") + "). "
        f"Machine: {res['machine']}; load average {res['load_avg_start']} at start, {res['load_avg_end']} at end: "
        "a shared machine, so the CPU-second figures (not wall) are the ones used (contention inflates CPU "
        "seconds somewhat too: an idle re-run gives lower ones).",
        "",
        "## Measured (one CPU thread, local backend)",
        "",
        f"Synthetic EM {tuple(res['shape'])} ({x['voxels']:,} voxels, 40 × 4 × 4 nm, with neurons), shipped "
        f"`rsunet_polarity.pt` ({res['model_parameters']:,} parameters), predict block {tuple(BLOCK)}, patch "
        f"{tuple(PATCH)}, stride {tuple(STRIDE)}, batch {BATCH}; segment and partners at their defaults; "
        f"{res['measured']['synapses']} synapses found.",
        "",
        "| stage | CPU s | wall s | per-block mean wall s (step: blocks) | CPU s per voxel |",
        "|---|---:|---:|---|---:|",
    ]
    for name in ("predict", "segment", "partners"):
        s = st[name]
        blocks = "; ".join(f"{k.split('/')[-1]}: {v['mean_block_s']} ({v['blocks']})"
                           for k, v in s["steps"].items()) or "—"
        lines.append(f"| {name} | {s['cpu_s']:.2f} | {s['wall_s']:.2f} | {blocks} | {r[name]['cpu_s_per_voxel']:.3e} |")
    lines += [
        "",
        f"predict evaluated {x['patches_measured']} patches ({r['predict']['cpu_s_per_patch']:.3f} CPU s per patch, "
        f"{x['forward_share_of_predict_cpu']:.0%} of it inside `model.forward`); one forward pass of a patch is "
        f"{x['model_flops_per_patch'] / 1e9:.2f} GFLOP (`torch.utils.flop_counter`), so one core sustained "
        f"**{x['cpu_flop_rate_per_core_gflops']:.1f} GFLOP/s** in the model.",
        "",
        "## Extrapolated to 10^12 voxels",
        "",
        "| stage | CPU core-hours | GPU (estimate) |",
        "|---|---:|---|",
        f"| predict | {r['predict']['core_hours_per_tv']:,.0f} | "
        + ", ".join(f"{gpu[k]:,.1f} GPU-hours at {k} TFLOP/s sustained" for k in rates) + " |",
        f"| segment | {r['segment']['core_hours_per_tv']:,.0f} | stays on CPU |",
        f"| partners | {r['partners']['core_hours_per_tv']:,.0f} | stays on CPU |",
        f"| **total** | **{r['total_cpu']['core_hours_per_tv']:,.0f}** | GPU predict + "
        f"{r['predict']['core_hours_per_tv_outside_model']:,.0f} (predict outside the model) + {seg_part:,.0f} "
        "CPU core-hours |",
        "",
        "Assumptions:",
        "",
        f"- predict scales with the number of patches: a large volume has 10^12 / prod(stride) = "
        f"{x['patches_per_tv']:.3e} patches per teravoxel (each global-grid patch predicted once); the measured "
        "CPU seconds per patch include reading, blending and writing. (Scaling the measured CPU s per voxel "
        f"instead gives {r['predict']['core_hours_per_tv_naive_per_voxel']:,.0f} core-hours: the measured volume's "
        "grid has (n − patch) / stride + 1 patches per axis, fewer per voxel than a large volume's n / stride.)",
        "- segment and partners scale linearly with voxels at the measured synapse density "
        "(a denser volume costs more in partners).",
        "- One core = one CPU thread of this machine; a core-hour on another CPU scales with its "
        "per-core speed. Nothing here counts I/O to remote storage or scheduler overhead across nodes.",
        f"- GPU column: an **estimate, not a measurement** (no GPU here): GPU-hours = FLOPs per teravoxel "
        f"({r['predict']['flops_per_tv']:.3e}) / (sustained FLOP/s × 3600). The sustained rate a GPU reaches on "
        "this small 3D network is the assumption: "
        + " and ".join(f"{k} TFLOP/s" for k in rates) + " are shown; any other rate R gives "
        f"{r['predict']['flops_per_tv'] / 1e12 / 3600:,.0f} / R GPU-hours (R in TFLOP/s). Reading, blending and "
        "writing stay on the CPU: the measured CPU time of predict outside `model.forward`, scaled the same way, "
        "is the middle term of the total.",
        "- Classify and connectome are left out: they scale with the number of synapses, not voxels.",
    ]
    with open(DOC, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_SHAPE} volume (smoke test)")
    ap.add_argument("--doc", action="store_true", help="write docs/cost_per_teravoxel.md also with --quick")
    ap.add_argument("--doc-from", metavar="JSON", help="only rewrite the doc from an earlier results JSON")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    if args.doc_from:
        with open(args.doc_from) as f:
            res = json.load(f)
        res["extrapolation"] = extrapolate(tuple(res["shape"]), res["measured"],
                                           res["extrapolation"]["model_flops_per_patch"])
        with open(args.doc_from, "w") as f:
            json.dump(res, f, indent=2)
        write_doc(res, os.path.relpath(os.path.abspath(args.doc_from), REPO))
        print(f"doc: {DOC}")
        return res
    import psutil

    shape = QUICK_SHAPE if args.quick else FULL_SHAPE
    load_start = [round(v, 2) for v in os.getloadavg()]
    print(f"bench_cost: {shape}, predict/segment/partners, 1 thread; load {load_start}")
    flops, params = model_flops_per_patch()
    m = measure(shape)
    res = {"benchmark": "bench_cost", "quick": args.quick, "shape": list(shape),
           "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "git": git_state(),
           "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs, "
                      f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}",
           "load_avg_start": load_start, "load_avg_end": [round(v, 2) for v in os.getloadavg()],
           "model": os.path.relpath(WEIGHTS, REPO), "model_parameters": params,
           "settings": {"block": list(BLOCK), "patch": list(PATCH), "stride": list(STRIDE), "batch": BATCH,
                        "torch_threads": 1, "backend": "local"},
           "gpu_sustained_tflops": list(GPU_SUSTAINED_TFLOPS), "measured": m,
           "extrapolation": extrapolate(shape, m, flops)}
    os.makedirs(args.out, exist_ok=True)
    stem = "bench_cost_quick" if args.quick else "bench_cost"
    path = os.path.join(args.out, stem + ".json")
    with open(path, "w") as f:
        json.dump(res, f, indent=2)
    if args.doc or not args.quick:
        write_doc(res, os.path.relpath(path, REPO))
        print(f"doc: {DOC}")
    r = res["extrapolation"]["rows"]
    print("core-hours per 10^12 voxels: " + ", ".join(f"{k} {v['core_hours_per_tv']:,.0f}" for k, v in r.items()))
    print(f"results: {path}")
    return res


if __name__ == "__main__":
    main()
