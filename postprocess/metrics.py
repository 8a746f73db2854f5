"""Evaluation metrics: instance-matched precision/recall/F1 and CREMI cleft distances.

Arrays are (z, y, x) on one voxel grid; voxel sizes and distances are in nm.

* :func:`instance_f1`: predicted and true instances (label volumes, 0 = background) are
  matched one-to-one when their IoU is ``>= iou_threshold``; ``method="hungarian"`` maximises
  the summed IoU of the matches (scipy ``linear_sum_assignment`` per connected group of
  candidate pairs), ``method="greedy"`` takes candidate pairs by decreasing IoU (ties: smaller
  predicted id, then smaller true id). For ``iou_threshold > 0.5`` both give the same matches.
* :func:`cremi_cleft_metrics` mirrors cremi_python's ``cremi.evaluation.Clefts``: distance
  transforms (``scipy.ndimage.distance_transform_edt`` with ``sampling=voxel_size``) of the
  true and predicted cleft masks; the average false-positive distance (ADF) is the mean over
  predicted voxels of the distance to the nearest true voxel, the average false-negative
  distance (ADGT) the mean over true voxels of the distance to the nearest predicted voxel,
  and the CREMI score is their mean. As in CREMI, a predicted voxel farther than
  ``tolerance_nm`` (strictly ``>``, default 200 nm) from every true voxel is a false positive
  and a true voxel farther than it from every prediction a false negative; voxels of
  ``ignore_mask`` (CREMI's "invalid" label) count as background in both masks. cremi_python
  reports only these counts; here precision = 1 - FP / #predicted voxels, recall = 1 - FN /
  #true voxels and F1 their harmonic mean.
* :func:`true_partners` and :func:`assignment_metrics`: the true pre/post neuron of each true
  synapse (majority neuron under its true pre/post voxels) and the pre/post, partner and site
  accuracy of matched predicted synapses (used by train/evaluate.py and the demo).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import fastremap
import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from cleftwise.postprocess.errors import PostprocessError

__all__ = ["InstanceMatch", "instance_overlaps", "instance_f1", "cremi_cleft_metrics", "true_partners",
           "assignment_metrics", "table_labels"]


def table_labels(labels: np.ndarray, table: pd.DataFrame) -> np.ndarray:
    """The instance labels restricted to the ids of the synapse table (others set to 0).

    The label volume holds every component that passed the size filter; the partners step may
    drop some of them from the table (``SegmentConfig.max_neuron_fraction``). Scores are made on
    what the table, i.e. the synapse DB, holds.
    """
    ids = table["id"].to_numpy(np.int64)
    return fastremap.mask_except(np.ascontiguousarray(labels), [int(i) for i in ids] or [0])


@dataclass(frozen=True)
class InstanceMatch:
    """Result of :func:`instance_f1`.

    Attributes:
        tp, fp, fn: matched pairs, unmatched predicted, unmatched true instances.
        precision, recall, f1: ``tp/(tp+fp)``, ``tp/(tp+fn)``, harmonic mean; a 0/0 ratio is
            1.0 when both volumes are empty and 0.0 otherwise.
        matches: DataFrame (pred_id, true_id, iou), sorted by pred_id.
    """

    tp: int
    fp: int
    fn: int
    precision: float
    recall: float
    f1: float
    matches: pd.DataFrame = field(repr=False)


def _check_pair(a: np.ndarray, b: np.ndarray, names: tuple[str, str]) -> None:
    if a.shape != b.shape:
        raise PostprocessError(f"{names[0]} shape {a.shape} differs from {names[1]} shape {b.shape}")


def instance_overlaps(pred_labels: np.ndarray, true_labels: np.ndarray) -> pd.DataFrame:
    """Overlap table of two label volumes.

    Args:
        pred_labels, true_labels: integer label volumes of equal shape, 0 = background.

    Returns:
        DataFrame (pred_id, true_id, intersection, pred_size, true_size, iou) with one row per
        pair of non-zero ids that share at least one voxel.
    """
    _check_pair(pred_labels, true_labels, ("pred_labels", "true_labels"))
    p = pred_labels.reshape(-1)
    t = true_labels.reshape(-1)
    pid, psize = fastremap.unique(p, return_counts=True)
    tid, tsize = fastremap.unique(t, return_counts=True)
    both = np.flatnonzero((p != 0) & (t != 0))
    pi = np.searchsorted(pid, p[both])
    ti = np.searchsorted(tid, t[both])
    keys, inter = np.unique(pi.astype(np.int64) * tid.size + ti, return_counts=True)
    pi, ti = keys // tid.size, keys % tid.size
    sp, st = psize[pi].astype(np.int64), tsize[ti].astype(np.int64)
    return pd.DataFrame({
        "pred_id": pid[pi], "true_id": tid[ti], "intersection": inter.astype(np.int64),
        "pred_size": sp, "true_size": st, "iou": inter / (sp + st - inter),
    })


def _ratio(num: int, den: int, both_empty: bool) -> float:
    if den:
        return num / den
    return 1.0 if both_empty else 0.0


def instance_f1(
    pred_labels: np.ndarray,
    true_labels: np.ndarray,
    iou_threshold: float = 0.5,
    method: str = "hungarian",
) -> InstanceMatch:
    """Instance-level precision, recall and F1 with one-to-one IoU matching.

    Args:
        pred_labels: (z, y, x) predicted instance ids, 0 = background.
        true_labels: (z, y, x) ground-truth instance ids, same shape.
        iou_threshold: a pair can match if its IoU is ``>= iou_threshold`` (must be > 0).
        method: ``"hungarian"`` or ``"greedy"`` (see the module docstring).

    Returns:
        :class:`InstanceMatch`.
    """
    if not 0 < iou_threshold <= 1:
        raise PostprocessError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    if method not in ("hungarian", "greedy"):
        raise PostprocessError(f"method must be 'hungarian' or 'greedy', got {method!r}")
    table = instance_overlaps(pred_labels, true_labels)
    pid = fastremap.unique(pred_labels)
    tid = fastremap.unique(true_labels)
    n_pred = int(np.count_nonzero(pid))
    n_true = int(np.count_nonzero(tid))
    cand = table[table["iou"].to_numpy() >= iou_threshold - 1e-12]
    cand = cand.sort_values(["iou", "pred_id", "true_id"], ascending=[False, True, True],
                            kind="stable").reset_index(drop=True)
    if method == "greedy" or len(cand) == 0:
        used_p, used_t, rows = set(), set(), []
        for i, (p, t) in enumerate(zip(cand["pred_id"].tolist(), cand["true_id"].tolist())):
            if p not in used_p and t not in used_t:
                used_p.add(p)
                used_t.add(t)
                rows.append(i)
    else:
        rows = _hungarian_rows(cand)
    matches = cand.loc[rows, ["pred_id", "true_id", "iou"]].sort_values("pred_id")
    matches = matches.reset_index(drop=True)
    tp = len(matches)
    fp, fn = n_pred - tp, n_true - tp
    both_empty = n_pred == 0 and n_true == 0
    precision = _ratio(tp, tp + fp, both_empty)
    recall = _ratio(tp, tp + fn, both_empty)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return InstanceMatch(tp, fp, fn, precision, recall, f1, matches)


def _hungarian_rows(cand: pd.DataFrame) -> list[int]:
    """Rows of ``cand`` in a max-total-IoU one-to-one matching, solved per connected group."""
    pu, pi = np.unique(cand["pred_id"].to_numpy(), return_inverse=True)
    tu, ti = np.unique(cand["true_id"].to_numpy(), return_inverse=True)
    n = pu.size + tu.size
    graph = coo_matrix((np.ones(len(cand)), (pi, pu.size + ti)), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    iou = cand["iou"].to_numpy()
    rows: list[int] = []
    group = comp[pi]
    for g in np.unique(group):
        sel = np.flatnonzero(group == g)
        if sel.size == 1:
            rows.append(int(sel[0]))
            continue
        lp, lpi = np.unique(pi[sel], return_inverse=True)
        lt, lti = np.unique(ti[sel], return_inverse=True)
        weight = np.zeros((lp.size, lt.size))
        weight[lpi, lti] = iou[sel]
        r, c = linear_sum_assignment(weight, maximize=True)
        lookup = {(a, b): int(s) for a, b, s in zip(lpi, lti, sel)}
        rows += [lookup[(a, b)] for a, b in zip(r, c) if (a, b) in lookup]
    return sorted(rows)


def _distance_to(mask: np.ndarray, voxel_size: Sequence[float]) -> np.ndarray:
    """Distance (nm) of every voxel to the nearest voxel of ``mask``; inf if mask is empty."""
    if not mask.any():
        return np.full(mask.shape, np.inf)
    return ndimage.distance_transform_edt(~mask, sampling=voxel_size)


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else float("nan")


def cremi_cleft_metrics(
    pred_mask: np.ndarray,
    true_mask: np.ndarray,
    voxel_size: Sequence[float],
    tolerance_nm: float = 200.0,
    ignore_mask: np.ndarray | None = None,
) -> dict[str, float]:
    """CREMI cleft metrics of a predicted against a true cleft mask.

    Args:
        pred_mask: (z, y, x) predicted cleft voxels (non-zero = cleft).
        true_mask: (z, y, x) true cleft voxels, same shape.
        voxel_size: (z, y, x) voxel size in nm.
        tolerance_nm: distance above which a voxel counts as FP / FN (CREMI: 200 nm).
        ignore_mask: optional (z, y, x) voxels treated as background in both masks.

    Returns:
        dict with ``avg_fp_distance`` (ADF, nm), ``avg_fn_distance`` (ADGT, nm),
        ``cremi_score`` (their mean), ``max_fp_distance``, ``max_fn_distance``, ``fp_count``,
        ``fn_count``, ``n_pred``, ``n_true`` (voxels), ``precision``, ``recall``, ``f1``.
        A mean over an empty set is NaN; a distance to an empty set is inf. With both masks
        empty, precision = recall = f1 = 1.
    """
    _check_pair(pred_mask, true_mask, ("pred_mask", "true_mask"))
    vs = tuple(float(v) for v in voxel_size)
    if len(vs) != pred_mask.ndim or min(vs) <= 0:
        raise PostprocessError(f"voxel_size {voxel_size!r} must be positive, one per axis of "
                               f"shape {pred_mask.shape}")
    pred = pred_mask != 0
    true = true_mask != 0
    if ignore_mask is not None:
        _check_pair(pred_mask, ignore_mask, ("pred_mask", "ignore_mask"))
        valid = ignore_mask == 0
        pred &= valid
        true &= valid
    fp_dist = _distance_to(true, vs)[pred]   # predicted voxels -> nearest true voxel
    fn_dist = _distance_to(pred, vs)[true]   # true voxels -> nearest predicted voxel
    n_pred, n_true = int(fp_dist.size), int(fn_dist.size)
    fp_count = int(np.count_nonzero(fp_dist > tolerance_nm))
    fn_count = int(np.count_nonzero(fn_dist > tolerance_nm))
    both_empty = n_pred == 0 and n_true == 0
    precision = _ratio(n_pred - fp_count, n_pred, both_empty)
    recall = _ratio(n_true - fn_count, n_true, both_empty)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    adf, adgt = _mean(fp_dist), _mean(fn_dist)
    return {
        "avg_fp_distance": adf,
        "avg_fn_distance": adgt,
        "cremi_score": (adf + adgt) / 2,
        "max_fp_distance": float(fp_dist.max()) if n_pred else float("nan"),
        "max_fn_distance": float(fn_dist.max()) if n_true else float("nan"),
        "fp_count": fp_count,
        "fn_count": fn_count,
        "n_pred": n_pred,
        "n_true": n_true,
        "precision": precision,
        "recall": recall,
        "f1": f1,
    }


def true_partners(synapses: np.ndarray, polarity: np.ndarray, neurons: np.ndarray) -> pd.DataFrame:
    """True pre/post neuron of every synapse instance.

    Args:
        synapses: (z, y, x) instance ids, 0 = background.
        polarity: (3, z, y, x) 0/1 (pre, post, union).
        neurons: (z, y, x) neuron ids.

    Returns:
        DataFrame ``id, size, pre_neuron, post_neuron`` (uint64 ids; neuron 0 when the side has
        no voxels): the neuron holding most of the instance's pre (post) voxels.
    """
    if synapses.shape != neurons.shape or polarity.shape != (3,) + synapses.shape:
        raise PostprocessError(f"true_partners: shapes synapses {synapses.shape}, polarity "
                         f"{polarity.shape}, neurons {neurons.shape} do not agree")
    ids, sizes = fastremap.unique(synapses, return_counts=True)
    keep = ids != 0
    out = pd.DataFrame({"id": ids[keep].astype(np.uint64), "size": sizes[keep].astype(np.int64)})
    for ch, name in ((0, "pre_neuron"), (1, "post_neuron")):
        sel = (synapses != 0) & (polarity[ch] != 0)
        pairs = pd.DataFrame({"id": synapses[sel].astype(np.uint64), "neuron": neurons[sel].astype(np.uint64)})
        counts = pairs.value_counts().reset_index(name="n")
        best = counts.sort_values(["id", "n", "neuron"], ascending=[True, False, True]).drop_duplicates("id")
        out[name] = out["id"].map(dict(zip(best["id"], best["neuron"]))).fillna(0).astype(np.uint64)
    return out


def _neuron_at(neurons: np.ndarray, table: pd.DataFrame, side: str, offset, voxel_size) -> np.ndarray:
    """Neuron id under each row's ``{side}_z/y/x`` site (nm); 0 for a missing (NaN) site."""
    pos = table[[f"{side}_{a}" for a in "zyx"]].to_numpy(np.float64)
    ok = np.isfinite(pos).all(axis=1)
    idx = np.zeros(pos.shape, np.int64)
    idx[ok] = np.floor((pos[ok] - np.asarray(offset)) / np.asarray(voxel_size)).astype(np.int64)
    idx = np.clip(idx, 0, np.asarray(neurons.shape) - 1)
    out = neurons[idx[:, 0], idx[:, 1], idx[:, 2]].astype(np.uint64)
    out[~ok] = 0
    return out


def assignment_metrics(matches: pd.DataFrame, predicted: pd.DataFrame, truth: pd.DataFrame,
                       neurons: np.ndarray, offset, voxel_size) -> dict:
    """Pre/post and partner accuracy over matched synapses (see module docstring).

    Args:
        matches: (pred_id, true_id) pairs from :func:`instance_f1`.
        predicted: the synapse records of the pipeline (DB rows) (id, pre/post sites nm, neurons).
        truth: :func:`true_partners` of the true labels.
        neurons: (z, y, x) true neuron ids of the evaluated region; ``offset`` (nm) its origin.
        voxel_size: (z, y, x) nm.
    """
    n = len(matches)
    if n == 0:
        return {"matched": 0, "site_accuracy": float("nan"), "prepost_accuracy": float("nan"),
                "partner_accuracy": float("nan"), "flipped": float("nan"), "pre_site_in_pre": float("nan"),
                "post_site_in_post": float("nan")}
    p = predicted.set_index(predicted["id"].astype(np.int64)).loc[matches["pred_id"].astype(np.int64)]
    t = truth.set_index(truth["id"].astype(np.int64)).loc[matches["true_id"].astype(np.int64)]
    pre_site = _neuron_at(neurons, p, "pre", offset, voxel_size)
    post_site = _neuron_at(neurons, p, "post", offset, voxel_size)
    tpre, tpost = t["pre_neuron"].to_numpy(np.uint64), t["post_neuron"].to_numpy(np.uint64)
    ppre, ppost = p["pre_neuron"].to_numpy().astype(np.uint64), p["post_neuron"].to_numpy().astype(np.uint64)
    site_pre, site_post = pre_site == tpre, post_site == tpost
    exact = (ppre == tpre) & (ppost == tpost)
    swapped = (ppre == tpost) & (ppost == tpre) & (tpre != tpost)
    return {"matched": n,
            "pre_site_in_pre": float(site_pre.mean()), "post_site_in_post": float(site_post.mean()),
            "site_accuracy": float((site_pre & site_post).mean()),
            "prepost_accuracy": float(exact.mean()),
            "partner_accuracy": float((exact | swapped).mean()),
            "flipped": float(swapped.mean())}
