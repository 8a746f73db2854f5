"""Evaluate shipped RSUNet weights through the real blockwise pipeline on a labelled volume.

``cleftwise evaluate --checkpoint models/weights/rsunet_polarity.pt --volume eval.zarr``

The volume is a zarr container with the synthetic generator's datasets ``raw``, ``neurons``,
``synapses`` (instance ids), ``polarity`` (3, z, y, x) and ``cleft``. Pipeline (local backend):
:class:`~cleftwise.postprocess.predict.PredictStep` → the three segment passes
(:func:`~cleftwise.postprocess.segment.segment_passes`) → :class:`~cleftwise.postprocess.partners_step.PartnersStep`
(with the true neuron segmentation), giving the synapse records (also in ``work_dir/synapses.db``). Reported (``<out>.json``, ``<out>.md``, ``<out>.png``):

- instance precision / recall / F1: predicted vs true synapse instances matched one-to-one at
  IoU >= ``iou_threshold`` (:func:`postprocess.metrics.instance_f1`); also restricted to true
  instances of at least ``min_true_size`` voxels (fragments cut by the volume border);
- for matched synapses, with the true partners taken from the labels (the neuron holding most
  of a true synapse's ``polarity`` pre voxels is its pre neuron, likewise post):
  ``site_accuracy`` — both predicted sites (pre/post centroids) lie in the true pre / post
  neuron; ``prepost_accuracy`` — predicted ``pre_neuron`` and ``post_neuron`` equal the true
  ones; ``partner_accuracy`` — the predicted neuron pair equals the true pair in either
  order; ``flipped`` — pre and post swapped;
- CREMI distances (:func:`cleftwise.postprocess.metrics.cremi_cleft_metrics`) of the predicted synapse
  mask against the true synapse mask (the union the model predicts) and against the true cleft.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass
from typing import Optional

import fastremap
import numpy as np
import pandas as pd

from cleftwise.blockwise.errors import BlockwiseError
from cleftwise.postprocess.predict import PredictConfig, PredictStep
from cleftwise.blockwise.runner import BackendConfig, run_task
from cleftwise.models.checkpoint import read_checkpoint_meta
from cleftwise.models.errors import ModelError
from cleftwise.postprocess.errors import PostprocessError
from cleftwise.postprocess.metrics import (assignment_metrics, cremi_cleft_metrics, instance_f1,
                                 table_labels, true_partners)
from cleftwise.postprocess.partners_step import PartnersStep, partners_config, synapse_table
from cleftwise.postprocess.segment import SegmentConfig, segment_passes
from cleftwise.storage.errors import StorageError
from cleftwise.storage.volume import open_volume

from cleftwise.train.errors import TrainError

__all__ = ["EvalConfig", "true_partners", "assignment_metrics", "evaluate", "write_report"]

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """What to evaluate and how the pipeline runs. Shapes are voxels (z, y, x)."""

    checkpoint: str = "models/weights/rsunet_polarity.pt"
    """cleftwise checkpoint (.pt with its .json)"""
    volume: str = ""
    """zarr container with raw, neurons, synapses, polarity, cleft"""
    work_dir: str = "runs/eval"
    """predictions, labels, ledgers and tables of the pipeline run"""
    out: str = "docs/reports/rsunet_eval"
    """report prefix: <out>.json, <out>.md, <out>.png"""
    block_shape: tuple = (32, 256, 256)
    """predict / segment block shape"""
    stride: Optional[tuple] = None
    """patch stride of the predict step; default half the patch (the demo uses (14, 120, 120))"""
    batch_size: int = 2
    """patches per forward pass"""
    tta: bool = False
    """predict with test-time augmentation (mean over the 8 flips of z, y, x)"""
    torch_threads: int = 2
    """torch CPU threads"""
    device: str = "auto"
    """auto, cpu or cuda"""
    threshold: float = 0.5
    """union-channel threshold of the segment step"""
    min_size: int = 200
    """drop predicted instances smaller than this (voxels)"""
    partner_rule: str = "contrast"
    """partner rule of the partners step (majority or contrast; see postprocess.partners)"""
    max_neuron_fraction: Optional[float] = None
    """partners step: drop detections lying for more than this share in one neuron (None: keep)"""
    iou_threshold: float = 0.5
    """IoU needed to match a predicted and a true instance"""
    min_true_size: int = 200
    """true instances below this size are excluded from the secondary ("border-cut") scores"""
    overwrite: bool = True
    """re-run every stage from scratch"""


def _run(task, backend: BackendConfig, overwrite: bool) -> dict:
    return run_task(task, backend, overwrite=overwrite).to_dict()


def run_pipeline(cfg: EvalConfig) -> dict:
    """Predict → segment → partners on ``cfg.volume``; returns paths and per-stage timings."""
    vol = cfg.volume.rstrip("/")
    work = os.path.abspath(cfg.work_dir)
    pred_url = os.path.join(work, "predictions.zarr", "pred")
    labels_url = os.path.join(work, "synapses.zarr", "labels")
    backend = BackendConfig(backend="local", progress=False)
    times = {}
    t0 = time.perf_counter()
    _run(PredictStep(PredictConfig(input=f"{vol}/raw", output=pred_url, checkpoint=cfg.checkpoint,
                                   block_shape=tuple(cfg.block_shape), batch_size=cfg.batch_size,
                                   stride=None if cfg.stride is None else tuple(cfg.stride),
                                   device=cfg.device, torch_threads=cfg.torch_threads, tta=cfg.tta)),
         backend, cfg.overwrite)
    times["predict_s"] = time.perf_counter() - t0
    scfg = SegmentConfig(predictions=pred_url, output=labels_url, work_dir=os.path.join(work, "segment"),
                         threshold=cfg.threshold, min_size=cfg.min_size, block_shape=tuple(cfg.block_shape))
    t0 = time.perf_counter()
    for step in segment_passes(scfg):  # label, stitch (+ resolve), relabel, in order
        _run(step, backend, cfg.overwrite)
    times["segment_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    partners = PartnersStep(partners_config(
        scfg, "sqlite:///" + os.path.join(work, "synapses.db"), os.path.join(work, "partners"),
        neurons=f"{vol}/neurons", partner_rule=cfg.partner_rule, max_neuron_fraction=cfg.max_neuron_fraction))
    _run(partners, backend, cfg.overwrite)
    times["partners_s"] = time.perf_counter() - t0
    return {"predictions": pred_url, "labels": labels_url, "table": synapse_table(partners), "times": times}


def evaluate(cfg: EvalConfig, training: Optional[dict] = None) -> dict:
    """Run the pipeline and compute every metric; returns the report dict (also written).

    ``training`` (e.g. steps, wall time, hardware of the training run) is copied into the report.
    """
    try:
        meta = read_checkpoint_meta(cfg.checkpoint)
    except ModelError as e:
        raise TrainError(f"evaluate: {e}") from e
    vol = cfg.volume.rstrip("/")
    try:
        raw = open_volume(f"{vol}/raw")
        truth_vols = {k: open_volume(f"{vol}/{k}") for k in ("synapses", "polarity", "neurons", "cleft")}
    except StorageError as e:
        raise TrainError(f"evaluate: {vol} lacks a dataset the evaluation needs: {e}") from e
    t_start = time.perf_counter()
    try:
        paths = run_pipeline(cfg)
    except (BlockwiseError, PostprocessError, StorageError) as e:
        raise TrainError(f"evaluate: pipeline failed on {vol}: {e}") from e
    roi = raw.roi
    syn = truth_vols["synapses"].read(roi)
    pol = truth_vols["polarity"].read(roi)
    neu = truth_vols["neurons"].read(roi)
    cleft = truth_vols["cleft"].read(roi)
    table = paths["table"]
    # the synapse table is the output; the label volume also holds detections it dropped
    pred_labels = table_labels(open_volume(paths["labels"]).read(roi), table)
    truth = true_partners(syn, pol, neu)
    vs = tuple(int(v) for v in raw.voxel_size)

    inst = instance_f1(pred_labels, syn, iou_threshold=cfg.iou_threshold)
    big_true = truth.loc[truth["size"] >= cfg.min_true_size, "id"].to_numpy(np.uint64)
    # secondary score: true fragments below min_true_size are ignored, and so is any predicted
    # instance whose best overlap is one of them
    small = np.setdiff1d(truth["id"].to_numpy(np.uint64), big_true)
    syn_big = fastremap.mask(syn, small.tolist()) if small.size else syn
    pred_ignore = []
    if small.size:
        from cleftwise.postprocess.metrics import instance_overlaps

        ov = instance_overlaps(pred_labels, syn)
        best = ov.sort_values("iou", ascending=False).drop_duplicates("pred_id")
        pred_ignore = best.loc[best["true_id"].isin(small), "pred_id"].tolist()
    pred_big = fastremap.mask(pred_labels, pred_ignore) if pred_ignore else pred_labels
    inst_big = instance_f1(pred_big, syn_big, iou_threshold=cfg.iou_threshold)
    assign = assignment_metrics(inst.matches, table, truth, neu, tuple(roi.begin), vs)
    cremi_union = cremi_cleft_metrics(pred_labels != 0, syn != 0, vs)
    cremi_cleft = cremi_cleft_metrics(pred_labels != 0, cleft != 0, vs)
    elapsed = time.perf_counter() - t_start

    def inst_dict(m):
        return {"tp": m.tp, "fp": m.fp, "fn": m.fn, "precision": m.precision, "recall": m.recall,
                "f1": m.f1}

    report = {
        "checkpoint": os.path.relpath(cfg.checkpoint) if not os.path.isabs(cfg.checkpoint) else cfg.checkpoint,
        "weights_sha256": meta.weights_sha256,
        "volume": vol, "volume_shape": list(raw.spatial_shape), "voxel_size": list(vs),
        "volume_attrs": {k: v for k, v in raw.attrs.items() if k in ("seed", "synthetic", "generator")},
        "n_true": int(len(truth)), "n_true_ge_min_size": int(big_true.size), "n_pred": int(len(table)),
        "instance": inst_dict(inst), f"instance_true_ge_{cfg.min_true_size}": inst_dict(inst_big),
        "assignment": assign, "cremi_union": cremi_union, "cremi_cleft": cremi_cleft,
        "pipeline_times_s": {k: round(v, 2) for k, v in paths["times"].items()},
        "eval_seconds": round(elapsed, 1), "config": asdict(cfg),
        "hardware": f"{platform.machine()} CPU, {os.cpu_count()} cores, python {platform.python_version()}",
        "checkpoint_extra": meta.extra,
        "training": training or meta.extra.get("training"),
    }
    write_report(report, cfg.out, raw=raw.read(roi), polarity_true=pol,
                 predictions=open_volume(paths["predictions"]).read(roi), pred_labels=pred_labels,
                 true_labels=syn)
    return report


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else (
        f"{v:.3f}" if isinstance(v, float) else str(v))


def write_report(report: dict, out: str, raw: np.ndarray, polarity_true: np.ndarray,
                 predictions: np.ndarray, pred_labels: np.ndarray, true_labels: np.ndarray) -> None:
    """``<out>.json`` (the report), ``<out>.md`` (tables) and ``<out>.png`` (a slice figure)."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(report, f, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    inst, a = report["instance"], report["assignment"]
    key_big = next(k for k in report if k.startswith("instance_true_ge_"))
    big = report[key_big]
    cu, cc = report["cremi_union"], report["cremi_cleft"]
    lines = [
        "# RSUNet evaluation on a held-out synthetic volume",
        "",
        f"Weights `{report['checkpoint']}` (sha256 `{report['weights_sha256'][:12]}…`), volume "
        f"`{report['volume']}` {tuple(report['volume_shape'])} voxels at {tuple(report['voxel_size'])} nm; "
        "run through the real blockwise pipeline (predict → segment → partners, local backend). "
        f"Generated by `cleftwise evaluate`; numbers below are copied from `{os.path.basename(out)}.json`.",
        "",
        "## Synapse instances (IoU ≥ 0.5, one-to-one)",
        "",
        "| true set | true | predicted | TP | FP | FN | precision | recall | F1 |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| all true instances | {report['n_true']} | {report['n_pred']} | {inst['tp']} | {inst['fp']} | "
        f"{inst['fn']} | {_fmt(inst['precision'])} | {_fmt(inst['recall'])} | **{_fmt(inst['f1'])}** |",
        f"| true ≥ {key_big.rsplit('_', 1)[-1]} voxels (border fragments ignored) | "
        f"{report['n_true_ge_min_size']} | – | {big['tp']} | {big['fp']} | {big['fn']} | "
        f"{_fmt(big['precision'])} | {_fmt(big['recall'])} | {_fmt(big['f1'])} |",
        "",
        f"## Pre/post and partners ({a['matched']} matched synapses)",
        "",
        "| metric | value |",
        "|---|---|",
        f"| predicted pre site inside the true pre neuron | {_fmt(a['pre_site_in_pre'])} |",
        f"| predicted post site inside the true post neuron | {_fmt(a['post_site_in_post'])} |",
        f"| both sites right (site accuracy) | **{_fmt(a['site_accuracy'])}** |",
        f"| pre_neuron and post_neuron equal the true ones (pre/post accuracy) | **{_fmt(a['prepost_accuracy'])}** |",
        f"| neuron pair right in either order (partner accuracy) | {_fmt(a['partner_accuracy'])} |",
        f"| pre and post swapped | {_fmt(a['flipped'])} |",
        "",
        "## CREMI distances (nm)",
        "",
        "| predicted synapse mask vs | ADF (avg FP dist.) | ADGT (avg FN dist.) | CREMI score | FP voxels > 200 nm | FN voxels > 200 nm |",
        "|---|---|---|---|---|---|",
        f"| true synapse mask (cleft + pre + post bands) | {_fmt(cu['avg_fp_distance'])} | "
        f"{_fmt(cu['avg_fn_distance'])} | {_fmt(cu['cremi_score'])} | {cu['fp_count']} | {cu['fn_count']} |",
        f"| true cleft only | {_fmt(cc['avg_fp_distance'])} | {_fmt(cc['avg_fn_distance'])} | "
        f"{_fmt(cc['cremi_score'])} | {cc['fp_count']} | {cc['fn_count']} |",
        "",
        "The model predicts the whole synapse (cleft plus ~50/60 nm pre/post bands), so its mask is "
        "thicker than the true cleft: the cleft row measures that thickness as much as errors.",
        "",
        f"Pipeline time: {report['pipeline_times_s']} on {report['hardware']}.",
    ]
    if report.get("training"):
        lines += ["", f"Training: {report['training']}"]
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    _figure(out + ".png", raw, polarity_true, predictions, pred_labels, true_labels, report)


def _figure(path, raw, pol, pred, pred_labels, true_labels, report) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z = int(np.argmax((true_labels != 0).sum(axis=(1, 2))))
    scale = 255.0 if pred.dtype == np.uint8 else 1.0
    p = pred[:, z].astype(np.float32) / scale

    def overlay(pre, post, alpha):
        o = np.zeros(pre.shape + (4,), np.float32)
        o[..., 0], o[..., 1] = pre, post
        o[..., 3] = alpha * np.maximum(pre, post)
        return o

    fig, ax = plt.subplots(1, 3, figsize=(16, 5.6))
    for a in ax:
        a.imshow(raw[z], cmap="gray", vmin=0, vmax=255)
        a.set_xticks([])
        a.set_yticks([])
    ax[0].set_title(f"raw, section z={z}")
    ax[1].imshow(overlay(pol[0, z].astype(np.float32), pol[1, z].astype(np.float32), 0.45))
    ax[1].contour(true_labels[z] != 0, levels=[0.5], colors="yellow", linewidths=0.6)
    ax[1].set_title("truth: pre (red), post (green), instances (yellow)")
    ax[2].imshow(overlay(p[0] * (p[2] > 0.5), p[1] * (p[2] > 0.5), 0.5))
    ax[2].contour(pred_labels[z] != 0, levels=[0.5], colors="cyan", linewidths=0.6)
    inst, a = report["instance"], report["assignment"]
    ax[2].set_title(f"prediction: F1 {_fmt(inst['f1'])}, pre/post acc. {_fmt(a['prepost_accuracy'])}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
