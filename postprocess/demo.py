"""The one-command demo: synthetic EM → every pipeline stage → a signed connectome, scored.

``python launch/predict_volume.py --demo`` calls :func:`run_demo`:

1. a synthetic volume with full ground truth (raw EM, neuron segmentation, synapse instances,
   pre/post polarity, E/I labels; :mod:`cleftwise.storage.synthetic`) is generated in
   ``<out_dir>/synthetic.zarr`` (kept and reused when it exists with the same shape and seed);
2. a pipeline config (written to ``<out_dir>/pipeline.yaml``, a real config the user can edit
   and run with ``--config``) names the shipped weights ``models/weights/rsunet_polarity.pt``
   (predict) and ``models/weights/ei_vgg3d.pt`` (classify) and the embedded defaults (local
   backend, SQLite DB in the output folder);
3. :func:`cleftwise.postprocess.pipeline.run_pipeline` runs predict → segment → partners → classify →
   connectome, each resumable;
4. the result is scored against the ground truth: instance precision/recall/F1 (IoU ≥ 0.5),
   pre/post and partner accuracy of matched synapses, E/I accuracy of matched synapses, and the
   neuron signs of the signed graph vs the true E/I type of each presynaptic neuron;
5. figures (:mod:`cleftwise.postprocess.figures`): a montage of detected synapses over the EM with
   their pre/post sides, and the signed adjacency matrix, in ``<out_dir>/figures``.

The summary is printed and written to ``<out_dir>/demo_summary.json``. The demo volume's seed
(7 by default) is not one the shipped weights were trained or validated on.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shlex
import time
from dataclasses import asdict, dataclass
import numpy as np
import pandas as pd
import yaml

from cleftwise.postprocess.errors import PostprocessError
from cleftwise.postprocess.metrics import assignment_metrics, instance_f1, table_labels, true_partners
from cleftwise.postprocess.pipeline import parse_config, run_pipeline
from cleftwise.storage.db.urls import redact

__all__ = ["DemoConfig", "run_demo", "score_demo", "format_summary", "WEIGHTS_DIR"]

log = logging.getLogger(__name__)

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "weights")


#: predict stride (voxels) of the demo and of train/evaluate.py's report: a third of the patch
#: overlaps, not half, so the demo fits in minutes on a 2-core laptop
DEMO_STRIDE = (14, 120, 120)
#: union threshold and smallest synapse kept (voxels), chosen on the RSUNet's validation volumes
#: (seeds 201 and 202) with train/tune_segment.py
DEMO_THRESHOLD = 0.5
DEMO_MIN_SIZE = 1000


@dataclass
class DemoConfig:
    """Settings of the demo. Shapes are voxels (z, y, x) at 40 × 4 × 4 nm."""

    out_dir: str = "cleftwise_demo"
    """folder for the synthetic volume, every output, the DB and the summary"""
    shape: tuple = (48, 512, 512)
    """synthetic volume shape, voxels"""
    seed: int = 7
    """seed of the synthetic volume (not one used in training or validation)"""
    rsunet: str = os.path.join(WEIGHTS_DIR, "rsunet_polarity.pt")
    """synapse (polarity) model checkpoint"""
    classifier: str = os.path.join(WEIGHTS_DIR, "ei_vgg3d.pt")
    """E/I classifier checkpoint"""
    backend: str = "local"
    """local, daisy, ray or dask"""
    workers: int = 1
    """workers of the backend"""
    block_shape: tuple = (48, 256, 256)
    """predict/segment block shape, voxels"""
    progress: bool = True
    """tqdm progress bars"""
    overwrite: bool = False
    """start every stage afresh (default: resume what is done)"""


def _volume_matches(path: str, cfg: DemoConfig) -> bool:
    from cleftwise.storage.volume import open_volume

    try:
        raw = open_volume(os.path.join(path, "raw"))
        open_volume(os.path.join(path, "neurons"))
        open_volume(os.path.join(path, "synapses"))
    except Exception:  # noqa: BLE001 - anything unreadable is regenerated
        return False
    return (tuple(raw.spatial_shape) == tuple(cfg.shape) and raw.attrs.get("seed") == cfg.seed
            and os.path.exists(os.path.join(path, "synapses.parquet"))
            and os.path.exists(os.path.join(path, "neurons.csv")))


def make_volume(cfg: DemoConfig) -> str:
    """The demo's synthetic volume (generated once, reused while shape and seed agree)."""
    from cleftwise.storage.synthetic import SyntheticConfig, generate_volume

    path = os.path.join(os.path.abspath(cfg.out_dir), "synthetic.zarr")
    if not _volume_matches(path, cfg):
        log.info("demo: generating a synthetic volume %s (seed %d) in %s", tuple(cfg.shape), cfg.seed, path)
        generate_volume(SyntheticConfig(shape=tuple(cfg.shape), seed=cfg.seed), path, overwrite=True)
    return path


def pipeline_dict(cfg: DemoConfig, volume: str) -> dict:
    """The demo's pipeline config as plain data (what ``pipeline.yaml`` holds)."""
    out = os.path.abspath(cfg.out_dir)
    block = [int(b) for b in cfg.block_shape]
    return {
        "raw": os.path.join(volume, "raw"),
        "neurons": os.path.join(volume, "neurons"),
        "output_dir": os.path.join(out, "run"),
        "backend": {"backend": cfg.backend, "workers": int(cfg.workers), "progress": bool(cfg.progress)},
        "predict": {"checkpoint": os.path.abspath(cfg.rsunet), "block_shape": block, "batch_size": 2,
                    "stride": list(DEMO_STRIDE)},
        "segment": {"block_shape": block, "threshold": DEMO_THRESHOLD, "min_size": DEMO_MIN_SIZE},
        "partners": {"partner_rule": "contrast"},
        "classify": {"checkpoint": os.path.abspath(cfg.classifier)},
    }


def _check_weights(cfg: DemoConfig) -> None:
    for name, path in (("synapse model", cfg.rsunet), ("E/I classifier", cfg.classifier)):
        if not os.path.exists(path):
            raise PostprocessError(f"demo: the shipped {name} weights {path} are missing; "
                                   "re-clone the repository or pass another checkpoint")


def run_demo(cfg: DemoConfig) -> dict:
    """Generate, run every stage, score; returns the summary (also written as JSON)."""
    _check_weights(cfg)
    t0 = time.perf_counter()
    os.makedirs(cfg.out_dir, exist_ok=True)
    volume = make_volume(cfg)
    t_gen = time.perf_counter() - t0
    data = pipeline_dict(cfg, volume)
    config_path = os.path.join(os.path.abspath(cfg.out_dir), "pipeline.yaml")
    with open(config_path, "w") as f:
        yaml.safe_dump(data, f, sort_keys=False)
    pcfg = parse_config(data, where=config_path)
    t1 = time.perf_counter()
    run = run_pipeline(pcfg, overwrite=cfg.overwrite)
    t_run = time.perf_counter() - t1
    summary = score_demo(volume, pcfg.output_dir, pcfg.db_url)
    from cleftwise.postprocess.figures import run_figures

    summary["figures"] = run_figures(pcfg.output_dir, pcfg.raw, pcfg.db_url,
                                     os.path.join(os.path.abspath(cfg.out_dir), "figures"))
    summary.update({
        "volume": volume, "config": config_path, "output_dir": pcfg.output_dir, "db": pcfg.db_url,
        "graph_dir": os.path.join(pcfg.output_dir, "graph"),
        "seconds": {"generate": round(t_gen, 1), "pipeline": round(t_run, 1),
                    "stages": run["seconds"],
                    "total": round(time.perf_counter() - t0, 1)},
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "demo": asdict(cfg),
    })
    with open(os.path.join(os.path.abspath(cfg.out_dir), "demo_summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    return summary


def _true_neuron_types(volume: str) -> dict:
    neurons = pd.read_csv(os.path.join(volume, "neurons.csv"))
    typed = neurons.dropna(subset=["ei_label"])
    return dict(zip(typed["id"].astype(np.int64), typed["ei_label"].astype(str)))


def score_demo(volume: str, output_dir: str, db_url: str, iou_threshold: float = 0.5) -> dict:
    """Detected synapses, E/I calls and neuron signs against the synthetic ground truth."""
    from cleftwise.storage.db import open_store
    from cleftwise.storage.volume import open_volume

    raw = open_volume(os.path.join(volume, "raw"))
    roi = raw.roi
    vs = tuple(int(v) for v in raw.voxel_size)
    syn = open_volume(os.path.join(volume, "synapses")).read(roi)
    pol = open_volume(os.path.join(volume, "polarity")).read(roi)
    neu = open_volume(os.path.join(volume, "neurons")).read(roi)
    with open_store(db_url) as store:
        table = store.query()
    # scored on what the DB holds (the label volume also keeps detections the partners step dropped)
    pred = table_labels(open_volume(os.path.join(output_dir, "synapses.zarr", "labels")).read(roi), table)
    inst = instance_f1(pred, syn, iou_threshold=iou_threshold)
    truth = true_partners(syn, pol, neu)
    assign = assignment_metrics(inst.matches, table, truth, neu, tuple(roi.begin), vs)

    true_table = pd.read_parquet(os.path.join(volume, "synapses.parquet"))
    true_ei = dict(zip(true_table["id"].astype(np.int64), true_table["ei_label"].astype(str)))
    m = inst.matches
    ei = {"matched_with_call": 0, "accuracy": float("nan")}
    if len(m) and "ei_label" in table:
        calls = table.set_index(table["id"].astype(np.int64))["ei_label"]
        pred_call = calls.reindex(m["pred_id"].astype(np.int64)).to_numpy()
        true_call = np.array([true_ei.get(int(t), "") for t in m["true_id"]], dtype=object)
        ok = pd.notna(pred_call) & (true_call != "")
        if ok.any():
            ei = {"matched_with_call": int(ok.sum()),
                  "accuracy": float(np.mean(pred_call[ok].astype(str) == true_call[ok]))}

    nodes_path = os.path.join(output_dir, "graph", "nodes.parquet")
    edges_path = os.path.join(output_dir, "graph", "edges.parquet")
    graph = {}
    if os.path.exists(nodes_path) and os.path.exists(edges_path):
        nodes, edges = pd.read_parquet(nodes_path), pd.read_parquet(edges_path)
        graph = {"edges": int(len(edges)), "neurons": int(len(nodes))}
        types = _true_neuron_types(volume)
        if "sign" in nodes:
            signed = nodes[nodes["sign"].fillna(0) != 0]
            known = signed[signed["neuron"].astype(np.int64).isin(list(types))] if "neuron" in signed else signed.iloc[:0]
            truth_sign = known["neuron"].astype(np.int64).map(lambda n: 1 if types[n] == "E" else -1)
            graph.update({"signed_neurons": int(len(signed)),
                          "signed_with_known_type": int(len(known)),
                          "sign_accuracy": float((known["sign"].to_numpy() == truth_sign.to_numpy()).mean())
                          if len(known) else float("nan")})
    return {"synapses_true": int(len(truth)), "synapses_found": int(len(table)),
            "precision": inst.precision, "recall": inst.recall, "f1": inst.f1,
            "tp": inst.tp, "fp": inst.fp, "fn": inst.fn,
            "prepost_accuracy": assign["prepost_accuracy"], "partner_accuracy": assign["partner_accuracy"],
            "ei": ei, "graph": graph}


def format_summary(s: dict) -> str:
    """A few lines for the terminal."""
    def f(v):
        return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.3f}"

    def path(p):  # absolute and shell-quoted, so a printed command works from any folder
        return shlex.quote(os.path.abspath(p))

    g = s.get("graph", {})
    config = path(s["config"])
    lines = [
        f"cleftwise demo finished in {s['seconds']['total']:.0f} s (peak memory {s['peak_rss_mib']:.0f} MiB)",
        f"  synapses: {s['synapses_found']} found, {s['synapses_true']} true; precision {f(s['precision'])}, "
        f"recall {f(s['recall'])}, F1 {f(s['f1'])} (IoU >= 0.5)",
        f"  partners: pre/post neurons right for {f(s['prepost_accuracy'])} of matched synapses "
        f"(either order: {f(s['partner_accuracy'])})",
        f"  E/I: accuracy {f(s['ei']['accuracy'])} on {s['ei']['matched_with_call']} matched synapses",
        f"  signed graph: {g.get('edges', 0)} edges, {g.get('neurons', 0)} neurons, "
        f"{g.get('signed_neurons', 0)} signed; sign accuracy {f(g.get('sign_accuracy'))} "
        f"on {g.get('signed_with_known_type', 0)} presynaptic neurons of known type",
        f"  figures: {', '.join(path(p) for p in s.get('figures', {}).values()) or 'none'}",
        f"  outputs: {path(s['output_dir'])} (graph: {path(s['graph_dir'])}), DB {redact(s['db'])}",
        f"  config:  {config} (run it again with: cleftwise predict --config {config}; "
        f"progress: cleftwise predict --config {config} --status)",
    ]
    return "\n".join(lines)
