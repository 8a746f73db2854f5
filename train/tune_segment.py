"""Choose the segment step's threshold and minimum size on a *validation* volume.

``cleftwise tune-segment --checkpoint models/weights/rsunet_polarity.pt --volume val.zarr``

Predicts the volume once (blockwise, as the pipeline does), then runs the segment + partners
passes for every (threshold, min_size) pair and scores instance F1 (IoU >= 0.5) and pre/post
accuracy against the volume's ground truth (:func:`cleftwise.train.evaluate.true_partners`). Prints one
row per pair and the best pair by F1 (ties: larger min_size); writes them as JSON with ``--out``.
``--neuron-fractions 0.9 0.85`` also scores the partner filter ``max_neuron_fraction`` (drop
detections lying for more than that share in one neuron) at those values.
Use a validation volume, never the test volume the report is made on.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import pandas as pd

from cleftwise.blockwise.runner import BackendConfig, run_task
from cleftwise.postprocess.metrics import assignment_metrics, instance_f1, table_labels, true_partners
from cleftwise.postprocess.predict import PredictConfig, PredictStep
from cleftwise.postprocess.partners_step import PartnersConfig, PartnersStep, partners_config, synapse_table
from cleftwise.postprocess.segment import SegmentConfig, segment_passes
from cleftwise.storage.volume import open_volume


def sweep(checkpoint: str, volume: str, work: str, thresholds, min_sizes, stride=None,
          block_shape=(32, 256, 256), partner_rule: str = "contrast", threads: int = 2,
          neuron_fractions=(None,), tta: bool = False) -> list[dict]:
    """Score every (threshold, min_size, max_neuron_fraction); returns one dict per setting.

    The segment passes run once per (threshold, min_size); the partner filter is applied to
    their table for every ``neuron_fractions`` value (None = no filter)."""
    backend = BackendConfig(progress=False)
    vol = volume.rstrip("/")
    pred = os.path.join(work, "predictions.zarr", "pred")
    run_task(PredictStep(PredictConfig(input=f"{vol}/raw", output=pred, checkpoint=checkpoint,
                                       block_shape=tuple(block_shape), batch_size=2, torch_threads=threads,
                                       stride=None if stride is None else tuple(stride), tta=tta)), backend)
    raw = open_volume(f"{vol}/raw")
    syn = open_volume(f"{vol}/synapses").read()
    neu = open_volume(f"{vol}/neurons").read()
    truth = true_partners(syn, open_volume(f"{vol}/polarity").read(), neu)
    rows = []
    for thr in thresholds:
        for ms in min_sizes:
            w = os.path.join(work, f"t{thr}_m{ms}")
            sc = SegmentConfig(predictions=pred, output=os.path.join(w, "labels.zarr", "labels"),
                               work_dir=os.path.join(w, "segment"), threshold=thr, min_size=int(ms),
                               block_shape=tuple(block_shape))
            for task in segment_passes(sc):
                run_task(task, backend, overwrite=True)
            partners = PartnersStep(partners_config(sc, "sqlite:///" + os.path.join(w, "synapses.db"),
                                                    os.path.join(w, "partners"), neurons=f"{vol}/neurons",
                                                    partner_rule=partner_rule))
            run_task(partners, backend, overwrite=True)
            all_labels = open_volume(sc.output).read()
            table_all = synapse_table(partners)
            filtered = any(nf is not None for nf in neuron_fractions)
            fraction = _neuron_fraction(partners.cfg) if filtered else {}  # votes merged again only if needed
            for nf in neuron_fractions:
                table = table_all if nf is None else table_all[
                    table_all["id"].map(fraction).fillna(0.0).to_numpy() <= nf]
                labels = table_labels(all_labels, table)
                m = instance_f1(labels, syn, iou_threshold=0.5)
                a = assignment_metrics(m.matches, table, truth, neu, tuple(raw.roi.begin),
                                       tuple(int(v) for v in raw.voxel_size))
                rows.append({"threshold": thr, "min_size": int(ms), "max_neuron_fraction": nf,
                             "n_pred": int(len(table)), "tp": m.tp, "fp": m.fp, "fn": m.fn,
                             "precision": m.precision, "recall": m.recall, "f1": m.f1,
                             "prepost_accuracy": a["prepost_accuracy"]})
    return rows


def aggregate(rows: pd.DataFrame) -> pd.DataFrame:
    """Sum TP/FP/FN over volumes per setting and recompute precision, recall, F1 (pre/post
    accuracy weighted by TP)."""
    keys = ["threshold", "min_size", "max_neuron_fraction"]
    rows = rows.assign(max_neuron_fraction=rows["max_neuron_fraction"].fillna(-1.0),
                       pp=rows["prepost_accuracy"].fillna(0.0) * rows["tp"])
    g = rows.groupby(keys, sort=True)[["n_pred", "tp", "fp", "fn", "pp"]].sum().reset_index()
    g["precision"] = g["tp"] / (g["tp"] + g["fp"]).clip(lower=1)
    g["recall"] = g["tp"] / (g["tp"] + g["fn"]).clip(lower=1)
    g["f1"] = 2 * g["tp"] / (2 * g["tp"] + g["fp"] + g["fn"]).clip(lower=1)
    g["prepost_accuracy"] = g["pp"] / g["tp"].clip(lower=1)
    g["max_neuron_fraction"] = g["max_neuron_fraction"].where(g["max_neuron_fraction"] >= 0)
    return g.drop(columns="pp")


def _neuron_fraction(pc: PartnersConfig) -> dict:
    """{synapse id: share of its pre + post votes on one neuron} from the partners step's votes."""
    import glob

    from cleftwise.postprocess.partners import merge_partner_votes

    votes = [pd.read_parquet(f) for f in sorted(glob.glob(os.path.join(pc.work_dir, "votes", "*.parquet")))]
    merged = merge_partner_votes(votes, rule=pc.partner_rule)
    return dict(zip(merged["id"].astype("int64"), merged["neuron_fraction"]))


def sweep_volumes(checkpoint: str, volumes: Sequence[str], work_dir: str, thresholds, min_sizes, stride=None,
                  partner_rule: str = "contrast", threads: int = 2, neuron_fractions=(),
                  tta: bool = False) -> list[dict]:
    """:func:`sweep` on every volume (work folder ``work_dir``, or ``work_dir/v<k>`` for several);
    ``neuron_fractions`` are tried besides no filter. One dict per volume and setting, with
    ``volume``."""
    rows = []
    for k, volume in enumerate(volumes):
        work = work_dir if len(volumes) == 1 else os.path.join(work_dir, f"v{k}")
        for row in sweep(checkpoint, volume, work, thresholds, min_sizes, stride,
                         partner_rule=partner_rule, threads=threads,
                         neuron_fractions=[None] + list(neuron_fractions), tta=tta):
            rows.append({"volume": volume, **row})
    return rows


def best_setting(summed: pd.DataFrame) -> dict:
    """The best row of :func:`aggregate`'s table by F1 (ties: larger min_size, then the weakest
    neuron filter): ``{threshold, min_size, max_neuron_fraction, f1}``."""
    df = summed.assign(nf_sort=summed["max_neuron_fraction"].fillna(2.0))
    best = df.sort_values(["f1", "min_size", "nf_sort"], ascending=[False, False, False]).iloc[0]
    nf: Optional[float] = None if pd.isna(best["max_neuron_fraction"]) else float(best["max_neuron_fraction"])
    return {"threshold": float(best["threshold"]), "min_size": int(best["min_size"]),
            "max_neuron_fraction": nf, "f1": float(best["f1"])}
