"""Does flooring each per-axis blend window (instead of their product) help at volume faces?

Issue "Prediction inner loop …", item 3. On synthetic volumes with known synapses, predicts
with the shipped RSUNet (``models/weights/rsunet_polarity.pt``) once per patch and blends the
same patch predictions with both windows:

- ``product`` — the product of the per-axis bump profiles floored at 1e-3 (before the issue):
  near a volume face every covering patch sits at the floor, so the blend is a plain average;
- ``axis`` — each per-axis profile floored at 1e-3 (now): the relative weights of patches are
  kept up to the faces.

Reports per volume and window: instance F1 (IoU >= 0.5, Hungarian; union > 0.5, 26-connected
components of >= 1000 voxels, the demo's segment settings) and the mean absolute error of the
union probability against the true synapse mask (synapses > 0), within 8 voxels of a volume
face (any axis) and in the interior.

    python benchmarks/blend_faces.py [--shape 36 384 384] [--seeds 301 302] [--threads 2]
    python benchmarks/blend_faces.py --report-only   # rewrite the .md from the .json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import cc3d
import numpy as np
import torch

from cleftwise.blockwise.sliding_window import TorchPredictor, blend_window, predict_region
from cleftwise.models.checkpoint import load_model
from cleftwise.postprocess.metrics import instance_f1
from cleftwise.storage.synthetic import SyntheticConfig, generate_arrays

HERE = os.path.dirname(os.path.abspath(__file__))
WEIGHTS = os.path.join(os.path.dirname(HERE), "models", "weights", "rsunet_polarity.pt")
FACE = 8
THRESHOLD, MIN_SIZE = 0.5, 1000
WINDOWS = ("product", "axis")


class Replay:
    """model_fn that runs the model on the first pass and replays its outputs afterwards (the
    patch order and batches of ``predict_region`` are fixed), so both windows blend the very
    same patch predictions."""

    def __init__(self, predictor):
        self.predictor, self.outputs, self.i, self.recording = predictor, [], 0, True

    def __call__(self, batch):
        if self.recording:
            self.outputs.append(self.predictor(batch))
            return self.outputs[-1]
        out = self.outputs[self.i]
        self.i += 1
        return out


def face_mask(shape, width=FACE):
    m = np.zeros(shape, bool)
    for ax, n in enumerate(shape):
        idx = [slice(None)] * 3
        idx[ax] = slice(0, width)
        m[tuple(idx)] = True
        idx[ax] = slice(n - width, n)
        m[tuple(idx)] = True
    return m


def segment(union):
    labels = cc3d.connected_components(union > THRESHOLD, connectivity=26)
    return cc3d.dust(labels, threshold=MIN_SIZE, connectivity=26, in_place=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(36, 384, 384))
    ap.add_argument("--seeds", type=int, nargs="+", default=(301, 302))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "blend_faces"))
    ap.add_argument("--report-only", action="store_true", help="rewrite OUT.md from OUT.json")
    args = ap.parse_args()
    if args.report_only:
        with open(args.out + ".json") as f:
            data = json.load(f)
        return write_report(args.out, data["settings"], data["rows"])
    torch.set_num_threads(args.threads)
    model, meta = load_model(WEIGHTS, device="cpu")
    patch = tuple(int(p) for p in meta.extra.get("patch_shape", (18, 160, 160)))
    stride = tuple(max(1, p // 2) for p in patch)
    shape = tuple(args.shape)
    faces = face_mask(shape)
    union_ch = list(meta.extra.get("channels", ["pre", "post", "union"])).index("union")
    rows = []
    for seed in args.seeds:
        t0 = time.perf_counter()
        arrays = generate_arrays(SyntheticConfig(shape=shape, seed=seed))
        raw, syn = arrays["raw"], arrays["synapses"]
        truth = (syn > 0).astype(np.float32)
        replay = Replay(TorchPredictor(model, device="cpu"))
        for name in WINDOWS:
            prob = predict_region(replay, raw, (0, 0, 0), (0, 0, 0), shape, patch, stride, shape,
                                  blend_window(patch, floor=name), batch_size=args.batch_size)
            replay.recording, replay.i = False, 0
            union = prob[union_ch]
            err = np.abs(union - truth)
            m = instance_f1(segment(union), syn, iou_threshold=0.5)
            rows.append({"seed": seed, "window": name, "f1": m.f1, "precision": m.precision, "recall": m.recall,
                         "tp": m.tp, "fp": m.fp, "fn": m.fn, "n_true": int(m.tp + m.fn),
                         "mae_faces": float(err[faces].mean()), "mae_interior": float(err[~faces].mean()),
                         "mae_faces_on_synapses": float(err[faces & (truth > 0)].mean()) if (faces & (truth > 0)).any() else None})
            print(json.dumps(rows[-1]), flush=True)
        print(f"seed {seed}: {time.perf_counter() - t0:.1f} s", flush=True)
    meta_out = {"shape": list(shape), "patch": list(patch), "stride": list(stride), "face_width": FACE,
                "threshold": THRESHOLD, "min_size": MIN_SIZE, "batch_size": args.batch_size,
                "threads": args.threads, "torch": torch.__version__, "machine": platform.machine(),
                "weights": os.path.relpath(WEIGHTS, os.path.dirname(HERE))}
    with open(args.out + ".json", "w") as f:
        json.dump({"settings": meta_out, "rows": rows}, f, indent=1)
    write_report(args.out, meta_out, rows)


def write_report(out, meta_out, rows):
    shape, patch, stride = tuple(meta_out["shape"]), tuple(meta_out["patch"]), tuple(meta_out["stride"])
    seeds = sorted({r["seed"] for r in rows})
    lines = ["# blend_faces: per-axis vs product floor of the blend window", "",
             f"Synthetic volumes {shape} (seeds {', '.join(map(str, seeds))}), "
             f"`{meta_out['weights']}`, patch {patch}, stride {stride}, bump window, floor 1e-3. "
             "Both windows blend the same patch predictions. Instance F1: union > 0.5, "
             "26-connected components >= 1000 voxels, IoU >= 0.5. MAE: |union probability - "
             f"true synapse mask|, within {FACE} voxels of a volume face vs the interior.", "",
             "| seed | window floor | F1 | precision | recall | TP / FP / FN | MAE faces | MAE interior | MAE faces, synapse voxels |",
             "|---|---|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        syn_mae = "-" if r["mae_faces_on_synapses"] is None else f"{r['mae_faces_on_synapses']:.4f}"
        lines.append(f"| {r['seed']} | {r['window']} | {r['f1']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} | "
                     f"{r['tp']} / {r['fp']} / {r['fn']} | {r['mae_faces']:.5f} | {r['mae_interior']:.5f} | {syn_mae} |")
    mean = {w: {k: float(np.mean([r[k] for r in rows if r["window"] == w]))
                for k in ("f1", "mae_faces", "mae_interior")} for w in WINDOWS}
    a, p = mean["axis"], mean["product"]
    lines += ["", f"Mean over the seeds: F1 {p['f1']:.3f} (product) → {a['f1']:.3f} (axis); MAE within "
              f"{FACE} voxels of a face {p['mae_faces']:.5f} → {a['mae_faces']:.5f} "
              f"({100 * (a['mae_faces'] / p['mae_faces'] - 1):+.1f} %); interior {p['mae_interior']:.5f} → "
              f"{a['mae_interior']:.5f} ({100 * (a['mae_interior'] / p['mae_interior'] - 1):+.2f} %).",
              "The per-axis floor lowers the error at the faces a little and leaves the interior as it "
              "was; on these two volumes it does not raise instance F1 (a count of a few synapses: one "
              "component more or less changes F1 by ~0.03)."]
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
