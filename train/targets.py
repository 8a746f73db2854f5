"""Training targets computed from label volumes, patch by patch.

Axis order is (z, y, x), channel first when present; voxel sizes and distances are nm.

Polarity (synaptic pre/post sides), two label forms are accepted:

* **synapse instances + per-voxel sides** (``seg_to_polarity(labels, sides)``): ``labels`` are
  synapse instance ids (0 = background) and ``sides`` per-voxel side codes with the bits of
  :mod:`cleftwise.postprocess.polarity`: 1 = pre, 2 = post, 3 = both, 0 = neither. Instance voxels whose
  side code is 0 count as union only. :func:`sides_from_partners` derives the codes from a
  neuron segmentation and each synapse's pre/post neuron (the synthetic synapse table).
* **pre/post instance labels** (``seg_to_polarity(labels)``, the PyTorch Connectomics
  convention): synapse k is labelled ``2k - 1`` on its presynaptic side and ``2k`` on its
  postsynaptic side, so odd ids are pre and even non-zero ids post.

A 3-channel 0/1 (pre, post, union) array, like the synthetic ``polarity`` dataset, is already the
non-exclusive target; :func:`polarity_to_exclusive` turns it into the exclusive one.

Targets: ``exclusive=False`` gives uint8 (3, z, y, x) 0/1 channels (pre, post, union) that may
overlap (for three sigmoid outputs); ``exclusive=True`` gives uint8 (z, y, x) classes
0 = background, 1 = pre, 2 = post (for a softmax over (background, pre, post)); a voxel on both
sides takes the class named by ``both``. :func:`cleft_target` gives a binary (z, y, x) mask,
optionally dilated by a distance in nm (anisotropy-aware, through a Euclidean distance
transform).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage

from cleftwise.train.errors import TrainError

__all__ = [
    "SIDE_PRE",
    "SIDE_POST",
    "seg_to_polarity",
    "polarity_to_exclusive",
    "sides_from_partners",
    "cleft_target",
    "dilation_context",
    "foreground_count",
]

SIDE_PRE = 1
SIDE_POST = 2
_BOTH = {"pre": 1, "post": 2}


def _check_3d(name: str, array: np.ndarray) -> None:
    if not isinstance(array, np.ndarray) or array.ndim != 3:
        raise TrainError(f"{name} must be a (z, y, x) numpy array, got "
                         f"{getattr(array, 'shape', type(array).__name__)}")


def _both_class(both: str) -> int:
    if both not in _BOTH:
        raise TrainError(f"both must be 'pre' or 'post', got {both!r}")
    return _BOTH[both]


def _stack(pre: np.ndarray, post: np.ndarray, union: np.ndarray, exclusive: bool,
           both: str) -> np.ndarray:
    if not exclusive:
        return np.stack([pre, post, union]).astype(np.uint8)
    out = np.zeros(pre.shape, np.uint8)
    first, second = ((post, 2), (pre, 1)) if _both_class(both) == 1 else ((pre, 1), (post, 2))
    out[first[0]] = first[1]
    out[second[0]] = second[1]   # the later write wins on voxels of both sides
    return out


def seg_to_polarity(labels: np.ndarray, sides: np.ndarray | None = None, exclusive: bool = False,
                    both: str = "pre") -> np.ndarray:
    """Polarity target from instance labels.

    Args:
        labels: (z, y, x) integer labels. With ``sides``: synapse instance ids, 0 = background.
            Without: pre/post instance labels, odd ids = presynaptic, even non-zero = postsynaptic.
        sides: optional (z, y, x) integer side codes, bit 1 = pre, bit 2 = post (3 = both).
            Only voxels with ``labels != 0`` take part.
        exclusive: False → uint8 (3, z, y, x) 0/1 channels (pre, post, union);
            True → uint8 (z, y, x) classes 0 background, 1 pre, 2 post.
        both: class of a voxel that is both pre and post in the exclusive form ("pre"/"post").

    Returns:
        The target array described under ``exclusive``.

    Example:
        >>> lab = np.array([[[0, 1, 2, 3]]])        # synapse 1: voxel 1 pre, voxel 2 post
        >>> seg_to_polarity(lab)[:, 0, 0].tolist()
        [[0, 1, 0, 1], [0, 0, 1, 0], [0, 1, 1, 1]]
    """
    _check_3d("labels", labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise TrainError(f"labels must be an integer array, got dtype {labels.dtype}")
    _both_class(both)
    union = labels != 0
    if sides is None:
        pre = union & (labels % 2 == 1)
        post = union & ~pre
    else:
        _check_3d("sides", sides)
        if sides.shape != labels.shape:
            raise TrainError(f"sides shape {sides.shape} differs from labels shape {labels.shape}")
        code = sides.astype(np.uint8, copy=False)
        pre = union & ((code & SIDE_PRE) != 0)
        post = union & ((code & SIDE_POST) != 0)
    return _stack(pre, post, union, exclusive, both)


def polarity_to_exclusive(polarity: np.ndarray, both: str = "pre") -> np.ndarray:
    """(3, z, y, x) 0/1 (pre, post, union) channels → (z, y, x) uint8 classes 0 bg, 1 pre, 2 post.

    A union voxel on neither side stays background; a voxel on both sides takes ``both``.
    """
    if not isinstance(polarity, np.ndarray) or polarity.ndim != 4 or polarity.shape[0] != 3:
        raise TrainError(f"polarity must be a (3, z, y, x) array (pre, post, union), got "
                         f"{getattr(polarity, 'shape', type(polarity).__name__)}")
    union = polarity[2] != 0
    return _stack(union & (polarity[0] != 0), union & (polarity[1] != 0), union, True, both)


def sides_from_partners(synapses: np.ndarray, neurons: np.ndarray,
                        pre_neuron: Mapping[int, int], post_neuron: Mapping[int, int]) -> np.ndarray:
    """Per-voxel side codes from a neuron segmentation and each synapse's partner neurons.

    Args:
        synapses: (z, y, x) synapse instance ids, 0 = background.
        neurons: (z, y, x) neuron ids on the same grid.
        pre_neuron, post_neuron: synapse id → presynaptic / postsynaptic neuron id; a synapse
            missing from a mapping has no voxels on that side.

    Returns:
        uint8 (z, y, x): 1 where the voxel's neuron is its synapse's pre neuron, 2 where it is
        the post neuron, 3 if both (an autapse), 0 elsewhere.
    """
    _check_3d("synapses", synapses)
    _check_3d("neurons", neurons)
    if synapses.shape != neurons.shape:
        raise TrainError(f"synapses shape {synapses.shape} differs from neurons shape {neurons.shape}")
    out = np.zeros(synapses.shape, np.uint8)
    inside = synapses != 0
    if not inside.any():
        return out
    syn = synapses[inside].astype(np.uint64)
    neu = neurons[inside].astype(np.uint64)
    for bit, table in ((SIDE_PRE, pre_neuron), (SIDE_POST, post_neuron)):
        ids = np.asarray(list(table.keys()), np.uint64)
        vals = np.asarray([int(v) for v in table.values()], np.uint64)
        if ids.size == 0:
            continue
        order = np.argsort(ids)
        ids, vals = ids[order], vals[order]
        pos = np.clip(np.searchsorted(ids, syn), 0, ids.size - 1)
        known = ids[pos] == syn
        hit = known & (vals[pos] == neu)
        out[inside] |= (hit.astype(np.uint8) * np.uint8(bit))
    return out


def dilation_context(dilation_nm: float, voxel_size: Sequence[float]) -> tuple[int, int, int]:
    """Voxels (z, y, x) a dilation by ``dilation_nm`` reaches: ``floor(dilation_nm / voxel_size)``."""
    if dilation_nm < 0:
        raise TrainError(f"dilation must be >= 0 nm, got {dilation_nm}")
    return tuple(int(np.floor(float(dilation_nm) / float(v) + 1e-9)) for v in voxel_size)  # type: ignore


def cleft_target(labels: np.ndarray, dilation_nm: float = 0.0,
                 voxel_size: Sequence[float] = (40, 4, 4)) -> np.ndarray:
    """Binary cleft target: ``labels != 0``, grown by ``dilation_nm``.

    Args:
        labels: (z, y, x) cleft mask or synapse instance ids (0 = background).
        dilation_nm: every voxel whose centre lies within this Euclidean distance (nm, using
            ``voxel_size``) of a labelled voxel becomes foreground; 0 = no dilation.
        voxel_size: (z, y, x) nm.

    Returns:
        uint8 (z, y, x) 0/1. To avoid edge effects when used on a patch, compute it on the patch
        grown by :func:`dilation_context` voxels per side and crop.
    """
    _check_3d("labels", labels)
    if len(voxel_size) != 3 or min(float(v) for v in voxel_size) <= 0:
        raise TrainError(f"voxel_size must be 3 positive numbers (z, y, x) nm, got {voxel_size!r}")
    mask = labels != 0
    if dilation_nm < 0:
        raise TrainError(f"cleft dilation must be >= 0 nm, got {dilation_nm}")
    if dilation_nm == 0 or not mask.any() or mask.all():
        return mask.astype(np.uint8)
    dist = ndimage.distance_transform_edt(~mask, sampling=[float(v) for v in voxel_size])
    return (dist <= float(dilation_nm) + 1e-6).astype(np.uint8)


def foreground_count(target: np.ndarray, exclusive: bool | None = None) -> int:
    """Foreground voxels of a target: union channel of a (3, z, y, x) target, else non-zeros."""
    if target.ndim == 4 and target.shape[0] == 3 and not exclusive:
        return int(np.count_nonzero(target[2]))
    return int(np.count_nonzero(target))

