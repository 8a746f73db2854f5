"""Synaptic polarity decoding: which voxels of each instance are pre- and which post-synaptic.

The thresholds follow PyTorch Connectomics' ``polarity2instance`` (zudi-lin/pytorch_connectomics,
``connectomics/decoding/synapse.py``), evaluated per instance of a label volume from
connected components instead of re-labelling; unlike PyTC, small side fragments are kept and a
voxel above threshold on both sides counts for both (``segment.decoding: pytc`` reproduces PyTC
exactly: :mod:`cleftwise.postprocess.pytc_decoding`, docs/decoding.md). ``probs`` is (3, z, y, x); values are
probabilities on the scale ``prob_scale`` (1.0 for float maps, 255 for uint8 maps: the default
``None`` picks 255 for uint8 and 1.0 otherwise; thresholds are always given in [0, 1] and
compared as ``value > threshold * prob_scale``). Only voxels with ``instance_labels != 0``
take part.

Rules (``sides`` code per voxel: bit 1 = pre, bit 2 = post, so 3 = both, 0 = neither):

* ``mode="nonexclusive"``, channels (pre, post, union), independent sigmoids.
  - ``rule="threshold"`` (PyTC): foreground = ``union > threshold``; a foreground voxel is pre
    if ``pre > threshold`` and post if ``post > threshold``. Both or neither is possible.
  - ``rule="argmax"``: a foreground voxel (``union > threshold``) is pre if ``pre > post``,
    post if ``post > pre``; a tie (``pre == post``, common when both saturate in uint8)
    votes for neither side.
* ``mode="exclusive"``, channels (background, pre, post) after a softmax (PyTC
  ``exclusive=True``): ``argmax`` over the 3 channels, ties to the lower channel index
  (background, then pre); 1 = pre, 2 = post. ``threshold`` and ``rule`` are unused.

Per instance the pre site is the centroid (voxels, global grid) of its pre voxels, the post
site that of its post voxels; scores are the mean pre probability over pre voxels and the
mean post probability over post voxels, in [0, 1]. A side with no voxels gets NaN site and
score and is flagged (``pre_empty``/``post_empty``).

Blockwise use: :func:`polarity_stats_block` returns exact per-id partial sums for one block's
write region; :func:`merge_polarity_stats` adds them over blocks and finishes the sites.
"""

from __future__ import annotations

import logging
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from cleftwise.postprocess.errors import PostprocessError

__all__ = [
    "SIDE_PRE",
    "SIDE_POST",
    "STATS_COLUMNS",
    "assign_sides",
    "polarity_stats_block",
    "merge_polarity_stats",
    "decode_polarity",
]

logger = logging.getLogger(__name__)

SIDE_PRE = np.uint8(1)
SIDE_POST = np.uint8(2)

#: Columns of the partial sums of :func:`polarity_stats_block`.
STATS_COLUMNS = (
    "id", "voxels",
    "pre_count", "pre_sum_z", "pre_sum_y", "pre_sum_x", "pre_score_sum",
    "post_count", "post_sum_z", "post_sum_y", "post_sum_x", "post_score_sum",
)

_MODES = ("nonexclusive", "exclusive")
_RULES = ("threshold", "argmax")


def _resolve_scale(probs: np.ndarray, prob_scale: float | None) -> float:
    if prob_scale is None:
        return 255.0 if probs.dtype == np.uint8 else 1.0
    if prob_scale <= 0:
        raise PostprocessError(f"prob_scale must be positive, got {prob_scale}")
    return float(prob_scale)


def _check_inputs(instance_labels: np.ndarray, probs: np.ndarray, mode: str, rule: str) -> None:
    if instance_labels.ndim != 3:
        raise PostprocessError(
            f"instance_labels must be (z, y, x), got shape {instance_labels.shape}"
        )
    if probs.ndim != 4 or probs.shape[0] != 3 or probs.shape[1:] != instance_labels.shape:
        raise PostprocessError(
            f"probs must be (3, z, y, x) matching instance_labels {instance_labels.shape}, "
            f"got {probs.shape}"
        )
    if mode not in _MODES:
        raise PostprocessError(f"mode must be one of {_MODES}, got {mode!r}")
    if rule not in _RULES:
        raise PostprocessError(f"rule must be one of {_RULES}, got {rule!r}")


def _score_channels(mode: str) -> tuple[int, int]:
    """Channel indices of the pre and post probabilities."""
    return (0, 1) if mode == "nonexclusive" else (1, 2)


def assign_sides(
    instance_labels: np.ndarray,
    probs: np.ndarray,
    mode: str = "nonexclusive",
    threshold: float = 0.5,
    rule: str = "threshold",
    prob_scale: float | None = None,
) -> np.ndarray:
    """Per-voxel side code (see module docstring for the rules).

    Args:
        instance_labels: (z, y, x) instance ids, 0 = background.
        probs: (3, z, y, x) network output: (pre, post, union) for ``"nonexclusive"``,
            (background, pre, post) for ``"exclusive"``; uint8 0..255 or float 0..1.
        mode: ``"nonexclusive"`` or ``"exclusive"``.
        threshold: probability threshold in [0, 1] (non-exclusive only).
        rule: ``"threshold"`` (PyTC) or ``"argmax"`` (non-exclusive only).
        prob_scale: value of probability 1.0 in ``probs``; None = 255 for uint8, else 1.0.

    Returns:
        uint8 (z, y, x): 0 none, 1 pre (:data:`SIDE_PRE`), 2 post (:data:`SIDE_POST`), 3 both;
        always 0 where ``instance_labels == 0``.
    """
    _check_inputs(instance_labels, probs, mode, rule)
    inside = instance_labels != 0
    if mode == "exclusive":
        winner = np.argmax(probs, axis=0)
        pre = (winner == 1) & inside
        post = (winner == 2) & inside
    else:
        cut = threshold * _resolve_scale(probs, prob_scale)
        fg = inside & (probs[2] > cut)
        if rule == "threshold":
            pre = fg & (probs[0] > cut)
            post = fg & (probs[1] > cut)
        else:
            pre = fg & (probs[0] > probs[1])
            post = fg & (probs[1] > probs[0])
    return pre.astype(np.uint8) | (post.astype(np.uint8) << 1)


def polarity_stats_block(
    instance_labels: np.ndarray,
    probs: np.ndarray,
    block_begin: Sequence[int] = (0, 0, 0),
    mode: str = "nonexclusive",
    threshold: float = 0.5,
    rule: str = "threshold",
    prob_scale: float | None = None,
    sides: np.ndarray | None = None,
) -> pd.DataFrame:
    """Mergeable per-instance polarity sums over one block's write region.

    Args:
        instance_labels: (z, y, x) final instance ids of the block's write region.
        probs: (3, z, y, x) network output of the same region (see :func:`assign_sides`).
        block_begin: (z, y, x) global voxel index of the block's first voxel.
        mode, threshold, rule, prob_scale: see :func:`assign_sides`.
        sides: optional precomputed :func:`assign_sides` result (same shape) to reuse.

    Returns:
        DataFrame with :data:`STATS_COLUMNS`, one row per id present in the block (sorted):
        ``voxels`` instance voxels, ``*_count`` side voxels, ``*_sum_z/y/x`` summed global
        voxel coordinates (int64), ``*_score_sum`` summed side probability in [0, 1].
    """
    _check_inputs(instance_labels, probs, mode, rule)
    scale = _resolve_scale(probs, prob_scale)
    if sides is None:
        sides = assign_sides(instance_labels, probs, mode, threshold, rule, prob_scale)
    elif sides.shape != instance_labels.shape:
        raise PostprocessError(
            f"sides shape {sides.shape} differs from instance_labels {instance_labels.shape}"
        )
    begin = np.asarray(block_begin, dtype=np.int64)
    if begin.shape != (3,):
        raise PostprocessError(f"block_begin must be (z, y, x), got {block_begin!r}")
    flat = instance_labels.reshape(-1)
    fg = np.flatnonzero(flat)
    ids, inv = np.unique(flat[fg], return_inverse=True)
    n = ids.size
    out: dict[str, np.ndarray] = {
        "id": ids.astype(np.uint64),
        "voxels": np.bincount(inv, minlength=n).astype(np.int64),
    }
    side_fg = sides.reshape(-1)[fg]
    coords = np.unravel_index(fg, instance_labels.shape)
    ch_pre, ch_post = _score_channels(mode)
    for name, bit, ch in (("pre", SIDE_PRE, ch_pre), ("post", SIDE_POST, ch_post)):
        sel = (side_fg & bit) != 0
        lab = inv[sel]
        count = np.bincount(lab, minlength=n).astype(np.int64)
        out[f"{name}_count"] = count
        for axis, ax in enumerate("zyx"):
            s = np.bincount(lab, weights=coords[axis][sel], minlength=n)
            out[f"{name}_sum_{ax}"] = np.rint(s).astype(np.int64) + count * begin[axis]
        score = probs[ch].reshape(-1)[fg[sel]].astype(np.float64) / scale
        out[f"{name}_score_sum"] = np.bincount(lab, weights=score, minlength=n)
    return pd.DataFrame(out, columns=list(STATS_COLUMNS))


def merge_polarity_stats(frames: pd.DataFrame | Iterable[pd.DataFrame]) -> pd.DataFrame:
    """Add per-block partial sums and finish the per-instance polarity.

    Args:
        frames: outputs of :func:`polarity_stats_block` (one DataFrame or several).

    Returns:
        One row per instance id (sorted): ``id``, ``voxels``, ``pre_count``, ``post_count``,
        ``pre_z/y/x`` and ``post_z/y/x`` (site centroids, global voxels; NaN if the side is
        empty), ``pre_score``, ``post_score`` (mean side probability in [0, 1]; NaN if
        empty), and flags ``pre_empty``, ``post_empty``.
    """
    if isinstance(frames, pd.DataFrame):
        frames = [frames]
    frames = [f for f in frames if len(f)]
    if not frames:
        frame = pd.DataFrame({c: np.zeros(0, np.int64) for c in STATS_COLUMNS})
    else:
        frame = pd.concat(frames, ignore_index=True)
    missing = [c for c in STATS_COLUMNS if c not in frame.columns]
    if missing:
        raise PostprocessError(f"polarity stats lack columns {missing}")
    total = frame.groupby("id", sort=True)[list(STATS_COLUMNS[1:])].sum()
    result = pd.DataFrame({"id": total.index.to_numpy().astype(np.uint64)})
    result["voxels"] = total["voxels"].to_numpy()
    for name in ("pre", "post"):
        count = total[f"{name}_count"].to_numpy()
        result[f"{name}_count"] = count
        denom = np.where(count > 0, count, 1)
        for ax in "zyx":
            result[f"{name}_{ax}"] = np.where(
                count > 0, total[f"{name}_sum_{ax}"].to_numpy() / denom, np.nan
            )
        result[f"{name}_score"] = np.where(
            count > 0, total[f"{name}_score_sum"].to_numpy() / denom, np.nan
        )
    result["pre_empty"] = result["pre_count"].to_numpy() == 0
    result["post_empty"] = result["post_count"].to_numpy() == 0
    n_bad = int((result["pre_empty"] | result["post_empty"]).sum())
    if n_bad:
        logger.debug("%d of %d instances have an empty pre or post side", n_bad, len(result))
    return result


def decode_polarity(
    instance_labels: np.ndarray,
    probs: np.ndarray,
    mode: str = "nonexclusive",
    threshold: float = 0.5,
    rule: str = "threshold",
    prob_scale: float | None = None,
) -> pd.DataFrame:
    """Whole-volume convenience: :func:`merge_polarity_stats` of one block at (0, 0, 0)."""
    return merge_polarity_stats(
        polarity_stats_block(instance_labels, probs, (0, 0, 0), mode, threshold, rule, prob_scale)
    )
