"""Synaptic partner assignment: majority neuron under each side of each synapse instance.

Inputs share one (z, y, x) voxel grid: ``instance_labels`` (synapse ids), ``sides`` (the
uint8 side code of :func:`cleftwise.postprocess.polarity.assign_sides`: bit 1 pre, bit 2 post) and
``neurons`` (uint64 neuron segmentation, 0 = background / unassigned).

Rule, per instance and side:

* The side region is the instance's voxels carrying that side bit, optionally dilated by
  ``dilate_nm`` (every voxel within Euclidean distance ``<= dilate_nm`` in nm of a side voxel,
  anisotropic voxel size), so that a thin cleft prediction reaches the neurons beside it. Each
  instance is dilated independently: regions of nearby synapses may overlap.
* Every voxel of the region votes for the neuron id under it. Background (0) votes are counted
  (``*_background_votes``) but excluded from the majority.
* The partner is the neuron with the most votes; ties go to the smallest id and set
  ``*_tie``. The confidence is its vote fraction among non-background votes.
* A side with no non-background vote gets neuron 0 and ``*_background = True`` (also when the
  side is empty). ``autapse = True`` when pre and post are the same non-zero neuron.

Rule ``"contrast"`` (an option, for blurry side predictions that spill across the membrane):
among the neurons holding at least ``min_fraction`` of an instance's non-background votes
(pre + post), the pre partner is the neuron with the largest surplus of pre over post votes
(pre − post; ties to more votes, then the smaller id) and the post partner the other neuron
with the largest surplus of post over pre votes. Surpluses, not pre / (pre + post) fractions:
a fraction lets a sliver of a neighbouring neuron with a few all-post votes beat the true
post neuron holding thousands of mostly-post votes (on the validation volumes the fraction
rule got 49 of 54 matched synapses' neurons right, the surplus rule 53). With fewer than two
such neurons the majority rule decides. Confidences stay the vote fractions of the chosen
neurons within each side.
Where the side prediction is sharp both rules agree; where the pre side of a small bouton bleeds
into a large postsynaptic neuron, the majority rule calls an autapse and the contrast rule
still separates the two neurons.

Blockwise use: :func:`partner_votes_block` returns exact (id, side, neuron, count) partial
counts over a block's write region (arrays read with ``context`` voxels on every side, at
least :func:`dilation_radius_voxels`); :func:`merge_partner_votes` sums them and decides.
"""

from __future__ import annotations

import logging
from typing import Iterable, Sequence

import fastremap
import numpy as np
import pandas as pd

from cleftwise.postprocess.errors import PostprocessError

__all__ = [
    "VOTE_COLUMNS",
    "dilation_radius_voxels",
    "partner_votes_block",
    "merge_partner_votes",
    "assign_partners",
]

logger = logging.getLogger(__name__)

#: Columns of the partial vote table; side is 1 (pre) or 2 (post).
VOTE_COLUMNS = ("id", "side", "neuron", "count")
_SIDES = ((1, "pre"), (2, "post"))


def dilation_radius_voxels(dilate_nm: float, voxel_size: Sequence[float]) -> tuple[int, int, int]:
    """Largest voxel offset per axis reachable within ``dilate_nm``: ``floor(dilate_nm / v)``.

    Args:
        dilate_nm: dilation radius in nm (>= 0).
        voxel_size: (z, y, x) voxel size in nm.

    Returns:
        (z, y, x) radius in voxels; the context a block needs for :func:`partner_votes_block`.
    """
    vs = np.asarray(voxel_size, dtype=np.float64)
    if vs.shape != (3,) or np.any(vs <= 0):
        raise PostprocessError(f"voxel_size must be 3 positive nm values (z, y, x), got {voxel_size!r}")
    if dilate_nm < 0:
        raise PostprocessError(f"dilate_nm must be >= 0, got {dilate_nm}")
    # Tolerance so that e.g. 80 nm / 40 nm gives exactly 2 despite float rounding.
    return tuple(int(r) for r in np.floor(dilate_nm / vs + 1e-9))


def _count_keys(ids: np.ndarray, neurons: np.ndarray, side: int) -> pd.DataFrame:
    """Vote counts of aligned (instance id, neuron id) arrays."""
    if ids.size == 0:
        return pd.DataFrame({c: np.zeros(0, np.uint64) for c in VOTE_COLUMNS})
    uid, iid = np.unique(ids, return_inverse=True)
    uneu, ineu = np.unique(neurons, return_inverse=True)
    key = iid.astype(np.int64) * uneu.size + ineu
    keys, counts = np.unique(key, return_counts=True)
    return pd.DataFrame({
        "id": uid[keys // uneu.size].astype(np.uint64),
        "side": np.full(keys.size, side, np.uint8),
        "neuron": uneu[keys % uneu.size].astype(np.uint64),
        "count": counts.astype(np.int64),
    })


def partner_votes_block(
    instance_labels: np.ndarray,
    sides: np.ndarray,
    neurons: np.ndarray,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    dilate_nm: float = 0.0,
    context: Sequence[int] = (0, 0, 0),
) -> pd.DataFrame:
    """Partial partner votes over one block's write region.

    Args:
        instance_labels: (z, y, x) synapse instance ids (0 = none), read with ``context``.
        sides: (z, y, x) uint8 side codes (bit 1 pre, bit 2 post), same region.
        neurons: (z, y, x) uint64 neuron ids (0 = background), same region.
        voxel_size: (z, y, x) voxel size in nm.
        dilate_nm: dilation radius of each side region in nm (0 = no dilation).
        context: (z, y, x) voxels of context on each side of the write region in the arrays;
            must be >= :func:`dilation_radius_voxels` when dilating. Only voxels of the write
            region vote, so summing over blocks counts each voxel exactly once.

    Returns:
        DataFrame with :data:`VOTE_COLUMNS` (uint64 id, uint8 side, uint64 neuron, int64 count).
    """
    shape = instance_labels.shape
    if instance_labels.ndim != 3 or sides.shape != shape or neurons.shape != shape:
        raise PostprocessError(
            f"instance_labels {instance_labels.shape}, sides {sides.shape} and neurons "
            f"{neurons.shape} must be equal (z, y, x) shapes"
        )
    ctx = np.asarray(context, dtype=np.int64)
    if ctx.shape != (3,) or np.any(ctx < 0) or np.any(2 * ctx >= np.asarray(shape)):
        raise PostprocessError(f"context {tuple(context)} does not fit arrays of shape {shape}")
    radius = np.asarray(dilation_radius_voxels(dilate_nm, voxel_size))
    if np.any(ctx < radius):
        raise PostprocessError(
            f"context {tuple(ctx)} voxels is smaller than the dilation radius {tuple(radius)} "
            f"voxels of {dilate_nm} nm at voxel size {tuple(voxel_size)}"
        )
    core = tuple(slice(int(c), int(n - c)) for c, n in zip(ctx, shape))
    frames = []
    if not np.any(radius > 0):
        lab = instance_labels[core].reshape(-1)
        sd = sides[core].reshape(-1)
        neu = neurons[core].reshape(-1)
        for bit, _ in _SIDES:
            sel = (lab != 0) & ((sd & bit) != 0)
            frames.append(_count_keys(lab[sel], neu[sel], bit))
    else:
        frames += _dilated_votes(instance_labels, sides, neurons, voxel_size, dilate_nm,
                                 radius, core)
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame({c: np.zeros(0, np.uint64) for c in VOTE_COLUMNS})
    return pd.concat(frames, ignore_index=True)


def _dilated_votes(instance_labels, sides, neurons, voxel_size, dilate_nm, radius, core):
    """Votes of each instance's dilated side regions, instance by instance in bbox crops."""
    shape = np.asarray(instance_labels.shape)
    core_lo = np.array([s.start for s in core])
    core_hi = np.array([s.stop for s in core])
    vs = tuple(float(v) for v in voxel_size)
    from scipy import ndimage  # here: workers of the other segment passes start sooner without it

    frames = []
    for bit, _ in _SIDES:
        side_labels = np.where((sides & bit) != 0, instance_labels, 0).astype(np.uint64)
        compact, table = fastremap.renumber(side_labels, preserve_zero=True)
        if len(table) <= 1:
            continue
        back = np.zeros(max(table.values()) + 1, dtype=np.uint64)
        for orig, new in table.items():
            back[new] = orig
        boxes = ndimage.find_objects(compact.astype(np.int64, copy=False))
        ids_all, neu_all = [], []
        for k, box in enumerate(boxes, start=1):
            if box is None:
                continue
            lo = np.maximum([s.start for s in box] - radius, 0)
            hi = np.minimum([s.stop for s in box] + radius, shape)
            # Only voxels of the write region vote; skip crops that miss it.
            vlo = np.maximum(lo, core_lo)
            vhi = np.minimum(hi, core_hi)
            if np.any(vhi <= vlo):
                continue
            crop = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
            member = compact[crop] == k
            dist = ndimage.distance_transform_edt(~member, sampling=vs)
            region = dist <= dilate_nm * (1 + 1e-9)
            vote = tuple(slice(int(a - c), int(b - c)) for a, b, c in zip(vlo, vhi, lo))
            region = region[vote]
            neu = neurons[tuple(slice(int(a), int(b)) for a, b in zip(vlo, vhi))][region]
            ids_all.append(np.full(neu.size, back[k], dtype=np.uint64))
            neu_all.append(neu.astype(np.uint64, copy=False))
        if ids_all:
            frames.append(_count_keys(np.concatenate(ids_all), np.concatenate(neu_all), bit))
    return frames


def merge_partner_votes(
    frames: pd.DataFrame | Iterable[pd.DataFrame],
    instance_ids: Sequence[int] | np.ndarray | None = None,
    rule: str = "majority",
    min_fraction: float = 0.05,
) -> pd.DataFrame:
    """Sum partial votes over blocks and pick the partners (rules in the module docstring).

    Args:
        frames: outputs of :func:`partner_votes_block`.
        instance_ids: optional ids to report even without any vote (they get neuron 0 and
            the background flag on both sides).
        rule: ``"majority"`` (per side, the neuron with most votes) or ``"contrast"``.
        min_fraction: contrast rule: share of an instance's votes a neuron needs to compete.

    Returns:
        One row per instance id (sorted): ``id``; for side in (pre, post): ``{side}_neuron``
        (uint64), ``{side}_confidence`` (vote fraction among non-background votes, 0 if
        none), ``{side}_votes`` (non-background votes), ``{side}_background_votes``,
        ``{side}_background`` (no non-background vote), ``{side}_tie``; ``autapse``; and
        ``neuron_fraction``, the largest share one neuron holds of the instance's non-background
        pre + post votes (0 without votes; a detection inside one neuron has about 1).
    """
    if isinstance(frames, pd.DataFrame):
        frames = [frames]
    frames = [f for f in frames if len(f)]
    if frames:
        frame = pd.concat(frames, ignore_index=True)
        missing = [c for c in VOTE_COLUMNS if c not in frame.columns]
        if missing:
            raise PostprocessError(f"partner votes lack columns {missing}")
        bad_side = ~frame["side"].isin([1, 2])
        if bad_side.any():
            raise PostprocessError(
                f"partner votes have side values {sorted(set(frame['side'][bad_side]))}, "
                f"expected 1 (pre) or 2 (post)"
            )
        summed = frame.groupby(["id", "side", "neuron"], sort=True)["count"].sum().reset_index()
    else:
        summed = pd.DataFrame({c: np.zeros(0, np.uint64) for c in VOTE_COLUMNS})
    ids = summed["id"].to_numpy(dtype=np.uint64)
    if instance_ids is not None:
        ids = np.concatenate([ids, np.asarray(instance_ids, dtype=np.uint64)])
    ids = np.unique(ids)
    if rule not in ("majority", "contrast"):
        raise PostprocessError(f"partner rule must be 'majority' or 'contrast', got {rule!r}")
    result = pd.DataFrame({"id": ids})
    confidence_of: dict = {}
    for bit, name in _SIDES:
        part = summed[summed["side"].to_numpy() == bit]
        pid = part["id"].to_numpy(dtype=np.uint64)
        neu = part["neuron"].to_numpy(dtype=np.uint64)
        cnt = part["count"].to_numpy(dtype=np.int64)
        bg = neu == 0
        row_of = np.searchsorted(ids, pid)
        background_votes = np.bincount(row_of[bg], weights=cnt[bg], minlength=ids.size)
        votes = np.bincount(row_of[~bg], weights=cnt[~bg], minlength=ids.size)
        # Winner: max count, then smallest neuron id, per instance.
        rows, neu, cnt = row_of[~bg], neu[~bg], cnt[~bg]
        confidence_of[name] = (rows, neu, cnt, votes)
        order = np.lexsort((neu, -cnt, rows))
        rows, neu, cnt = rows[order], neu[order], cnt[order]
        starts = np.r_[0, np.flatnonzero(np.diff(rows)) + 1] if rows.size else np.zeros(0, np.intp)
        winner = np.zeros(ids.size, np.uint64)
        win_count = np.zeros(ids.size, np.int64)
        tie = np.zeros(ids.size, bool)
        winner[rows[starts]] = neu[starts]
        win_count[rows[starts]] = cnt[starts]
        second = starts + 1
        has_second = second < rows.size
        has_second[has_second] &= rows[second[has_second]] == rows[starts[has_second]]
        tie[rows[starts[has_second]]] = cnt[second[has_second]] == cnt[starts[has_second]]
        result[f"{name}_neuron"] = winner
        result[f"{name}_confidence"] = np.where(votes > 0, win_count / np.maximum(votes, 1), 0.0)
        result[f"{name}_votes"] = votes.astype(np.int64)
        result[f"{name}_background_votes"] = background_votes.astype(np.int64)
        result[f"{name}_background"] = votes == 0
        result[f"{name}_tie"] = tie
    if rule == "contrast":
        _apply_contrast(result, summed, ids, confidence_of, float(min_fraction))
    result["autapse"] = (result["pre_neuron"] == result["post_neuron"]) & (result["pre_neuron"] != 0)
    result["neuron_fraction"] = _dominant_neuron_fraction(summed, ids)
    return result


def _dominant_neuron_fraction(summed: pd.DataFrame, ids: np.ndarray) -> np.ndarray:
    """Per id: the largest share one neuron holds of the non-background pre + post votes (0 if
    none). Near 1 for a detection lying inside one neuron (e.g. a mitochondrion); a synapse
    joins two neurons, so its votes split between them."""
    v = summed[summed["neuron"].to_numpy() != 0]
    out = np.zeros(ids.size, dtype=np.float64)
    if not len(v):
        return out
    per = v.groupby(["id", "neuron"], sort=False)["count"].sum().reset_index()
    total = per.groupby("id")["count"].sum()
    top = per.groupby("id")["count"].max()
    frac = (top / total).reindex(pd.Index(ids, dtype=total.index.dtype)).to_numpy()
    out[:] = np.nan_to_num(frac, nan=0.0)
    return out


def _apply_contrast(result: pd.DataFrame, summed: pd.DataFrame, ids: np.ndarray,
                    confidence_of: dict, min_fraction: float) -> None:
    """Overwrite pre/post neurons (and their confidences) of ``result`` by the contrast rule."""
    v = summed[summed["neuron"].to_numpy() != 0]
    if not len(v):
        return
    table = v.pivot_table(index=["id", "neuron"], columns="side", values="count", aggfunc="sum",
                          fill_value=0).reset_index()
    pre = table[1].to_numpy(np.float64) if 1 in table else np.zeros(len(table))
    post = table[2].to_numpy(np.float64) if 2 in table else np.zeros(len(table))
    table = pd.DataFrame({"id": table["id"].to_numpy(np.uint64), "neuron": table["neuron"].to_numpy(np.uint64),
                          "total": pre + post, "surplus": pre - post})
    table["share"] = table["total"] / table.groupby("id")["total"].transform("sum")
    table = table[table["share"] >= min_fraction]
    n = table.groupby("id")["neuron"].transform("size")
    table = table[n >= 2]
    if not len(table):
        return
    best_pre = table.sort_values(["id", "surplus", "total", "neuron"], ascending=[True, False, False, True]) \
        .drop_duplicates("id")
    rest = table.merge(best_pre[["id", "neuron"]], on="id", suffixes=("", "_pre"))
    rest = rest[rest["neuron"] != rest["neuron_pre"]]
    best_post = rest.sort_values(["id", "surplus", "total", "neuron"], ascending=[True, True, False, True]) \
        .drop_duplicates("id")
    row = {int(i): k for k, i in enumerate(ids)}
    for name, chosen in (("pre", best_pre), ("post", best_post)):
        rows_c, neu_c, cnt_c, votes = confidence_of[name]
        counts = {(int(r), int(nn)): int(c) for r, nn, c in zip(rows_c, neu_c, cnt_c)}
        for i, nn in zip(chosen["id"].to_numpy(np.uint64), chosen["neuron"].to_numpy(np.uint64)):
            r = row[int(i)]
            result.at[r, f"{name}_neuron"] = np.uint64(nn)
            c = counts.get((r, int(nn)), 0)
            result.at[r, f"{name}_confidence"] = c / votes[r] if votes[r] > 0 else 0.0
            result.at[r, f"{name}_tie"] = False


def assign_partners(
    instance_labels: np.ndarray,
    sides: np.ndarray,
    neurons: np.ndarray,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    dilate_nm: float = 0.0,
) -> pd.DataFrame:
    """Whole-volume convenience: votes of one block without context, then the merge.

    Outside the array counts as background (no votes), like zero padding.
    """
    radius = np.asarray(dilation_radius_voxels(dilate_nm, voxel_size))
    pad = [(int(r), int(r)) for r in radius]
    votes = partner_votes_block(
        np.pad(instance_labels, pad), np.pad(sides, pad), np.pad(neurons, pad),
        voxel_size, dilate_nm, context=tuple(int(r) for r in radius),
    )
    ids = fastremap.unique(instance_labels)
    return merge_partner_votes(votes, instance_ids=ids[ids != 0])
