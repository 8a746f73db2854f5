"""Exact blockwise connected components: per-block labelling, halo equivalences, global resolve.

The algorithm gives exactly ``cc3d.connected_components(mask, connectivity)`` of the whole
volume, computed block by block, with ids renumbered deterministically. All arrays are
(z, y, x); coordinates are integer voxel indices in the *global* grid (voxel 0 = the first
voxel of the processed volume); the caller converts to nm (``offset + index * voxel_size``).

Three steps (the blockwise engine runs 1, 1b and 2 over blocks in any order, on any worker):

1. :func:`label_block_local` per block, on the block's write region only (no context): cc3d
   labels the mask; local label ``l`` stands for the block-unique *provisional* id
   ``id_offset + l``, and one statistics record per label is returned. The engine stores the
   records and only the block's six boundary slices (:func:`block_faces`, sparse): the
   provisional label volume itself is never written.

   Provisional id scheme: ``provisional = id_offset + local_label`` with
   ``id_offset = block_index * id_stride`` (:func:`block_id_offset`), where ``block_index``
   is the C-order (z, y, x) linear index of the block in the block grid and ``id_stride``
   defaults to the number of voxels of a full block (an upper bound on the labels a block
   can hold). Ids therefore never collide and need no coordination between workers.

1b. :func:`face_equivalences` per block, after *all* blocks finished step 1: the block's
   provisional labels grown by one voxel on the high z/y/x sides (voxels outside the volume
   are 0) are needed only on three thin slabs, which are assembled from the stored faces of the
   block and its 7 high-side neighbours; it returns the pairs of provisional ids that touch
   across the block boundary under the connectivity. Every pair of adjacent voxels ``p, q`` lies in the 2x2x2 cube whose
   low corner is ``r = min(p, q)`` (component-wise); the block whose write region contains
   ``r`` reports the pair, and its +1 halo contains the whole cube. So face, edge and corner
   contacts (also diagonal ones such as (z, y, x) -> (z+1, y-1, x+1), whose endpoints are in
   blocks that are not face neighbours) are all found exactly once, with no per-voxel loop.

2. :func:`resolve` once, on all pairs and records: union-find (:func:`pair_components`,
   array form), merged statistics, size / peak-probability filters applied *after* merging,
   and final ids ``1..N`` ordered by each component's first voxel in global z-y-x raster order.
   That is the order in which cc3d numbers labels, so with no filter the result equals global
   cc3d labels exactly. Then per block the local labels are recomputed (cc3d is
   deterministic; recomputing from the uint8 input is cheaper than writing and re-reading a
   uint64 provisional volume) and mapped through :func:`local_lut` to the final uint64 labels.

A serial, dense reference of all three steps (``blockwise_cc_reference`` and the dense-halo /
uint64 forms of the steps) lives with the tests, in ``tests/cc_reference.py``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import cc3d
import numpy as np
import pandas as pd

from cleftwise.postprocess.errors import PostprocessError

__all__ = [
    "RECORD_COLUMNS",
    "INSTANCE_COLUMNS",
    "CCResolution",
    "block_id_offset",
    "union_mask",
    "label_block_local",
    "label_components",
    "apply_lut",
    "pair_components",
    "FACE_NAMES",
    "block_faces",
    "faces_region",
    "face_equivalences",
    "local_lut",
    "resolve",
]

logger = logging.getLogger(__name__)

#: Columns of the per-block records returned by :func:`label_block_local` (prob_* only with probs).
#: first_*: first voxel in z-y-x raster order; z0..x1: half-open bbox [z0, z1); sum_*: summed
#: voxel coordinates (exact int64); all in global voxel indices.
RECORD_COLUMNS = (
    "id", "count", "first_z", "first_y", "first_x",
    "z0", "y0", "x0", "z1", "y1", "x1", "sum_z", "sum_y", "sum_x",
)
#: Columns of the instance table returned by :func:`resolve` (prob_* only with probs).
INSTANCE_COLUMNS = (
    "id", "size", "first_z", "first_y", "first_x",
    "z0", "y0", "x0", "z1", "y1", "x1", "centroid_z", "centroid_y", "centroid_x",
    "n_fragments",
)

_CONNECTIVITIES = (6, 18, 26)


def _check_connectivity(connectivity: int) -> int:
    if connectivity not in _CONNECTIVITIES:
        raise PostprocessError(
            f"connectivity must be one of {_CONNECTIVITIES} for 3-D volumes, got {connectivity!r}"
        )
    return int(connectivity)


def _check_3d(array: np.ndarray, name: str) -> None:
    if array.ndim != 3:
        raise PostprocessError(f"{name} must be a 3-D (z, y, x) array, got shape {array.shape}")


def block_id_offset(
    block_begin: Sequence[int],
    block_shape: Sequence[int],
    volume_shape: Sequence[int],
    id_stride: int | None = None,
) -> int:
    """Provisional-id offset of the block starting at ``block_begin``.

    Args:
        block_begin: (z, y, x) first voxel of the block's write region in the global grid;
            must be a multiple of ``block_shape``.
        block_shape: (z, y, x) nominal block shape in voxels (blocks at the high borders may
            be clipped; they keep the nominal stride).
        volume_shape: (z, y, x) shape of the whole volume in voxels.
        id_stride: ids reserved per block; default ``prod(block_shape)``.

    Returns:
        ``block_index * id_stride`` with ``block_index`` the C-order linear index of the block
        in the ``ceil(volume_shape / block_shape)`` grid.
    """
    begin = np.asarray(block_begin, dtype=np.int64)
    bshape = np.asarray(block_shape, dtype=np.int64)
    vshape = np.asarray(volume_shape, dtype=np.int64)
    if begin.shape != (3,) or bshape.shape != (3,) or vshape.shape != (3,):
        raise PostprocessError(
            f"block_begin {tuple(begin)}, block_shape {tuple(bshape)} and volume_shape "
            f"{tuple(vshape)} must each have 3 entries (z, y, x)"
        )
    if np.any(bshape <= 0) or np.any(begin < 0) or np.any(begin % bshape) or np.any(begin >= vshape):
        raise PostprocessError(
            f"block begin {tuple(begin)} is not a block corner of a {tuple(bshape)} grid over a "
            f"volume of shape {tuple(vshape)}"
        )
    grid = -(-vshape // bshape)
    index = int(np.ravel_multi_index(tuple(begin // bshape), tuple(grid)))
    stride = int(np.prod(bshape)) if id_stride is None else int(id_stride)
    if stride <= 0:
        raise PostprocessError(f"id_stride must be positive, got {id_stride}")
    total = int(np.prod(grid)) * stride
    if total >= 2**63:
        raise PostprocessError(
            f"{int(np.prod(grid))} blocks x id_stride {stride} overflow the int64 id space"
        )
    return index * stride


def _per_label_stats(
    local: np.ndarray, n_labels: int, begin: np.ndarray, probs: np.ndarray | None,
    mask: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Count, first voxel, bbox, coordinate sums (and prob sum/max) for labels 1..n_labels;
    ``mask`` (bool, the labelled foreground) only makes finding the foreground cheaper."""
    n = n_labels + 1
    flat = local.reshape(-1)
    fg = np.flatnonzero(mask) if mask is not None and mask.dtype == bool else np.flatnonzero(flat)
    lab = flat[fg].astype(np.intp, copy=False)
    coords = np.unravel_index(fg, local.shape)
    out: dict[str, np.ndarray] = {}
    out["count"] = np.bincount(lab, minlength=n)[1:].astype(np.int64)
    first = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first, lab, fg.astype(np.int64))
    first_zyx = np.unravel_index(first[1:], local.shape)
    for axis, name in enumerate("zyx"):
        c = coords[axis].astype(np.int64, copy=False)
        lo = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
        hi = np.full(n, -1, dtype=np.int64)
        np.minimum.at(lo, lab, c)
        np.maximum.at(hi, lab, c)
        s = np.bincount(lab, weights=c, minlength=n)[1:]
        out[f"first_{name}"] = first_zyx[axis].astype(np.int64) + begin[axis]
        out[f"{name}0"] = lo[1:] + begin[axis]
        out[f"{name}1"] = hi[1:] + 1 + begin[axis]
        # float64 sums of integers are exact below 2**53; shift to global coordinates.
        out[f"sum_{name}"] = np.rint(s).astype(np.int64) + out["count"] * begin[axis]
    if probs is not None:
        pv = probs.reshape(-1)[fg].astype(np.float64, copy=False)
        out["prob_sum"] = np.bincount(lab, weights=pv, minlength=n)[1:]
        pmax = np.full(n, -np.inf, dtype=np.float64)
        np.maximum.at(pmax, lab, pv)
        out["prob_max"] = pmax[1:]
    return out


def union_mask(union: np.ndarray, threshold: float) -> np.ndarray:
    """Foreground ``union > threshold`` on the probability scale 0..1 (bool, same shape).

    A uint8 map is on the 0..255 scale (p = value / 255); it is compared with the integer
    ``floor(threshold * 255)``, which selects exactly the voxels with ``value > threshold * 255``
    without converting the block to floats.
    """
    union = np.asarray(union)
    if union.dtype == np.uint8:
        cut = np.floor(float(threshold) * 255.0)
        if cut >= 255:
            return np.zeros(union.shape, dtype=bool)
        return union > (np.uint8(cut) if cut >= 0 else -1)
    return union > float(threshold)


def label_components(mask: np.ndarray, connectivity: int) -> tuple[np.ndarray, int]:
    """cc3d labels 1..n in order of first occurrence in C order (the one call both passes use)."""
    mask = np.ascontiguousarray(mask != 0 if mask.dtype != bool else mask)
    local, n_labels = cc3d.connected_components(mask, connectivity=connectivity, return_N=True)
    return local, int(n_labels)


def label_block_local(
    mask_block: np.ndarray,
    block_begin: Sequence[int],
    connectivity: int = 26,
    id_offset: int = 0,
    probs_block: np.ndarray | None = None,
    id_stride: int | None = None,
) -> tuple[np.ndarray, pd.DataFrame]:
    """Pass 1: label one block's write region and describe each label (local labels).

    Args:
        mask_block: (z, y, x) foreground of the block's write region (bool or any numeric
            dtype; non-zero = foreground). No context.
        block_begin: (z, y, x) global voxel index of the block's first voxel.
        connectivity: 6, 18 or 26.
        id_offset: added to the local labels 1..n to make them unique over all blocks; use
            :func:`block_id_offset`.
        probs_block: optional (z, y, x) probability (any real dtype, used as is: a uint8 map
            stays on the 0..255 scale) for per-label ``prob_sum``/``prob_max``.
        id_stride: if given, the number of ids reserved for this block; more labels raise.

    Returns:
        ``(local, records)``: local is the cc3d labelling (unsigned ints, 0 = background,
        labels 1..n in order of first voxel); the provisional id of local label ``l`` is
        ``id_offset + l``. records is a DataFrame with :data:`RECORD_COLUMNS` (+
        ``prob_sum``, ``prob_max``) and one row per label, sorted by (provisional) id.
    """
    _check_3d(mask_block, "mask_block")
    connectivity = _check_connectivity(connectivity)
    begin = np.asarray(block_begin, dtype=np.int64)
    if begin.shape != (3,):
        raise PostprocessError(f"block_begin must be (z, y, x), got {block_begin!r}")
    if probs_block is not None and probs_block.shape != mask_block.shape:
        raise PostprocessError(
            f"probs_block shape {probs_block.shape} differs from mask_block shape "
            f"{mask_block.shape} (block at {tuple(begin)})"
        )
    if id_offset < 0:
        raise PostprocessError(f"id_offset must be >= 0, got {id_offset} (block at {tuple(begin)})")
    mask = np.ascontiguousarray(mask_block != 0 if mask_block.dtype != bool else mask_block)
    local, n_labels = label_components(mask, connectivity)
    if id_stride is not None and n_labels > id_stride:
        raise PostprocessError(
            f"block at {tuple(begin)} has {n_labels} components, more than its id_stride "
            f"{id_stride} allows"
        )
    if id_offset + n_labels >= 2**63:
        raise PostprocessError(f"id_offset {id_offset} + {n_labels} labels overflow int64 ids")
    stats = _per_label_stats(local, n_labels, begin, probs_block, mask)
    records = pd.DataFrame(
        {"id": np.arange(1, n_labels + 1, dtype=np.uint64) + np.uint64(id_offset), **stats}
    )
    return local, records


#: Names of a block's six boundary slices: the first ("lo") and last ("hi") slice along z, y, x.
FACE_NAMES = ("z_lo", "z_hi", "y_lo", "y_hi", "x_lo", "x_hi")


def block_faces(local: np.ndarray, id_offset: int = 0) -> dict[str, np.ndarray]:
    """The six boundary slices of a block's labels, stored sparsely in four flat arrays.

    Args:
        local: (z, y, x) labels of the block's write region (0 = background).
        id_offset: added to non-zero labels (gives provisional ids for local labels).

    Returns:
        ``shape``: (3,) int64 block shape; ``counts``: (6,) int64 non-zero voxels per face in
        :data:`FACE_NAMES` order; ``idx``: int64 flat C-order indices into each 2-D slice
        (e.g. (y, x) for a z face) of its non-zero voxels, faces concatenated; ``ids``: uint64
        provisional ids there. A few percent of the block's size even when every face voxel is
        foreground; few arrays, so saving and loading them is cheap.
    """
    _check_3d(local, "local")
    idx_parts, id_parts = [], []
    for axis in range(3):
        for k in (0, local.shape[axis] - 1):
            flat = np.take(local, k, axis=axis).reshape(-1)
            idx = np.flatnonzero(flat)
            idx_parts.append(idx.astype(np.int64, copy=False))
            id_parts.append(flat[idx].astype(np.uint64) + np.uint64(id_offset))
    return {"shape": np.asarray(local.shape, dtype=np.int64),
            "counts": np.array([len(i) for i in idx_parts], dtype=np.int64),
            "idx": np.concatenate(idx_parts), "ids": np.concatenate(id_parts)}


def _face(faces: Mapping[str, np.ndarray], name: str) -> tuple[np.ndarray, np.ndarray]:
    """(flat indices, ids) of one face of :func:`block_faces`."""
    k = FACE_NAMES.index(name)
    ends = np.cumsum(faces["counts"])
    start = int(ends[k - 1]) if k else 0
    return faces["idx"][start:int(ends[k])], faces["ids"][start:int(ends[k])]


def faces_region(
    region_begin: Sequence[int],
    region_shape: Sequence[int],
    blocks: Iterable[tuple[Sequence[int], Mapping[str, np.ndarray]]],
) -> np.ndarray:
    """Dense labels of a thin region on block boundaries, assembled from :func:`block_faces`.

    Args:
        region_begin: (z, y, x) global voxel index of the region's first voxel.
        region_shape: (z, y, x) shape of the region.
        blocks: ``(block_begin, faces)`` of every block that may intersect the region; each
            block's part of the region must lie in one of its boundary slices.

    Returns:
        uint64 (z, y, x) labels of the region; voxels in none of the blocks (outside the
        volume) are 0.
    """
    rb = np.asarray(region_begin, dtype=np.int64)
    re = rb + np.asarray(region_shape, dtype=np.int64)
    out = np.zeros(tuple(int(s) for s in region_shape), dtype=np.uint64)
    for begin, faces in blocks:
        begin = np.asarray(begin, dtype=np.int64)
        shape = np.asarray(faces["shape"], dtype=np.int64)
        lo, hi = np.maximum(rb, begin), np.minimum(re, begin + shape)
        if np.any(hi <= lo):
            continue
        for axis in range(3):
            if hi[axis] - lo[axis] != 1:
                continue
            if lo[axis] == begin[axis]:
                name = f"{'zyx'[axis]}_lo"
                break
            if lo[axis] == begin[axis] + shape[axis] - 1:
                name = f"{'zyx'[axis]}_hi"
                break
        else:
            raise PostprocessError(
                f"region {tuple(lo)}..{tuple(hi)} of the block at {tuple(begin)} (shape "
                f"{tuple(shape)}) is not on one of its faces"
            )
        other = [a for a in range(3) if a != axis]
        fshape = (int(shape[other[0]]), int(shape[other[1]]))
        dense = np.zeros(fshape[0] * fshape[1], dtype=np.uint64)
        idx, ids = _face(faces, name)
        dense[idx] = ids
        dense = dense.reshape(fshape)
        part = dense[lo[other[0]] - begin[other[0]]:hi[other[0]] - begin[other[0]],
                     lo[other[1]] - begin[other[1]]:hi[other[1]] - begin[other[1]]]
        target = tuple(slice(int(lo[a] - rb[a]), int(hi[a] - rb[a])) for a in range(3))
        out[target] = np.expand_dims(part, axis)
    return out


def _neighbour_offsets(connectivity: int) -> np.ndarray:
    """Half of the neighbourhood: offsets d with d > 0 in z-y-x lexicographic order, (k, 3)."""
    grid = np.stack(np.meshgrid([-1, 0, 1], [-1, 0, 1], [-1, 0, 1], indexing="ij"), -1).reshape(-1, 3)
    nonzero = np.abs(grid).sum(1)
    keep = (nonzero > 0) & (nonzero <= {6: 1, 18: 2, 26: 3}[connectivity])
    grid = grid[keep]
    first = np.array([row[np.flatnonzero(row)[0]] for row in grid])
    return grid[first > 0]


def _cube_pairs(sub: np.ndarray, r_shape: Sequence[int], offsets: np.ndarray) -> list[np.ndarray]:
    """Pairs (a, b) of distinct non-zero labels at r - min(d, 0) and r + max(d, 0), r in r_shape."""
    out = []
    if min(r_shape) <= 0:
        return out
    for d in offsets:
        ps = np.maximum(-d, 0)
        qs = np.maximum(d, 0)
        a = sub[ps[0]:ps[0] + r_shape[0], ps[1]:ps[1] + r_shape[1], ps[2]:ps[2] + r_shape[2]]
        b = sub[qs[0]:qs[0] + r_shape[0], qs[1]:qs[1] + r_shape[1], qs[2]:qs[2] + r_shape[2]]
        m = (a != b) & (a != 0) & (b != 0)
        if m.any():
            out.append(np.stack([a[m], b[m]], axis=1))
    return out


def _slab_regions(core_shape: Sequence[int]) -> list[tuple[tuple, tuple]]:
    """(begin, shape) relative to the block begin of the three high-side slabs of the halo."""
    z, y, x = (int(c) for c in core_shape)
    return [((z - 1, 0, 0), (2, y + 1, x + 1)), ((0, y - 1, 0), (z, 2, x + 1)),
            ((0, 0, x - 1), (z, y, 2))]


def _slab_pairs(slab_z: np.ndarray, slab_y: np.ndarray, slab_x: np.ndarray,
                core: Sequence[int], connectivity: int) -> np.ndarray:
    """Unique sorted (a < b) pairs from the three high-side slabs of a block's +1 halo."""
    offsets = _neighbour_offsets(connectivity)
    z, y, x = core
    pairs: list[np.ndarray] = []
    # Low corners r on the block's high faces: z slab, then y slab (z < Z-1), then x slab
    # (z < Z-1, y < Y-1). Cubes with r deeper inside touch only write-region voxels, whose
    # adjacent non-zero voxels already share one label.
    pairs += _cube_pairs(slab_z, (1, y, x), offsets)
    pairs += _cube_pairs(slab_y, (z - 1, 1, x), offsets)
    pairs += _cube_pairs(slab_x, (z - 1, y - 1, 1), offsets)
    if not pairs:
        return np.zeros((0, 2), dtype=np.uint64)
    allp = np.concatenate(pairs).astype(np.uint64, copy=False)
    allp.sort(axis=1)
    allp = allp[np.lexsort((allp[:, 1], allp[:, 0]))]
    keep = np.ones(len(allp), dtype=bool)
    keep[1:] = np.any(allp[1:] != allp[:-1], axis=1)
    return allp[keep]


def face_equivalences(
    block_begin: Sequence[int],
    core_shape: Sequence[int],
    blocks: Iterable[tuple[Sequence[int], Mapping[str, np.ndarray]]],
    connectivity: int = 26,
) -> np.ndarray:
    """Pass 1b from stored faces: the pairs of one block, without its labels.

    Args:
        block_begin: (z, y, x) global voxel index of the block's first voxel.
        core_shape: (z, y, x) shape of its write region.
        blocks: ``(begin, faces)`` (:func:`block_faces`) of the block and of those of its 7
            high-side neighbours (+z, +y, +x, and the edge/corner ones) that exist; missing
            neighbours (outside the volume) read as background.
        connectivity: 6, 18 or 26.

    Returns:
        (k, 2) uint64 array of unique pairs ``(a, b)``, ``a < b``, sorted: the provisional ids
        of neighbouring voxels (under ``connectivity``) whose low corner lies in the block.
    """
    connectivity = _check_connectivity(connectivity)
    begin = np.asarray(block_begin, dtype=np.int64)
    core = tuple(int(c) for c in core_shape)
    blocks = list(blocks)
    slabs = [faces_region(begin + np.asarray(off), shape, blocks) for off, shape in _slab_regions(core)]
    return _slab_pairs(*slabs, core, connectivity)


def local_lut(provisional_ids: np.ndarray, final_ids: np.ndarray, id_offset: int,
              n_labels: int) -> np.ndarray:
    """Lookup table local label → final id for one block (pass 2 on recomputed local labels).

    Args:
        provisional_ids: (n,) sorted provisional ids of all blocks (:class:`CCResolution`).
        final_ids: (n,) aligned final ids (0 = filtered out).
        id_offset: the block's provisional-id offset.
        n_labels: number of local labels the block has now.

    Returns:
        uint64 (n_labels + 1,) with ``lut[0] = 0``; apply with :func:`apply_lut`. Raises
        :class:`PostprocessError` when the resolution holds another number of labels for this
        block (its input changed after pass 1).
    """
    prov = np.asarray(provisional_ids, dtype=np.uint64)
    lo, hi = (int(i) for i in np.searchsorted(
        prov, np.array([id_offset + 1, id_offset + n_labels + 1], dtype=np.uint64)))
    # a block's provisional ids are contiguous: more labels in the resolution show as id n + 1
    extra = hi < prov.size and int(prov[hi]) == id_offset + n_labels + 1
    if hi - lo != n_labels or extra:
        raise PostprocessError(
            f"the block with id offset {id_offset} has {n_labels} components now but "
            f"{hi - lo}{'+' if extra else ''} in the resolution: its input changed after the "
            f"labelling pass (re-run the segment stage with overwrite)"
        )
    lut = np.zeros(n_labels + 1, dtype=np.uint64)
    lut[1:] = np.asarray(final_ids, dtype=np.uint64)[lo:hi]
    return lut


def apply_lut(lut: np.ndarray, local: np.ndarray, foreground: np.ndarray | None = None,
              out: np.ndarray | None = None) -> np.ndarray:
    """``lut[local]`` (a block's local labels → final ids), written into ``out`` if given.

    Args:
        lut: (n_labels + 1,) ids with ``lut[0] = 0`` (:func:`local_lut`).
        local: (z, y, x) local labels 0..n_labels.
        foreground: optional bool (z, y, x), exactly ``local != 0`` (the mask the labels were
            computed from). With it, only foreground voxels are gathered: synapse masks cover a
            few per cent of a block, so this is ~4x faster than a gather over every voxel.
        out: optional C-contiguous array of ``local``'s shape and ``lut``'s dtype (reused
            between blocks to avoid page faults).

    Returns:
        ``out`` (or a new array) holding the mapped labels.
    """
    if out is None:
        out = np.empty(local.shape, dtype=lut.dtype)
    elif out.shape != local.shape or out.dtype != lut.dtype or not out.flags.c_contiguous:
        raise PostprocessError(f"apply_lut: out must be a C-contiguous {lut.dtype} array of shape "
                               f"{local.shape}, got {out.dtype} {out.shape}")
    if foreground is None or foreground.dtype != bool or foreground.shape != local.shape \
            or np.count_nonzero(foreground) * 4 > local.size:  # dense: the full gather is cheaper
        return np.take(lut, local, out=out)
    fg = np.flatnonzero(foreground)
    out.fill(0)
    flat = out.reshape(-1)
    flat[fg] = lut[local.reshape(-1)[fg]]
    return out


@dataclass(frozen=True)
class CCResolution:
    """Result of :func:`resolve`.

    Attributes:
        provisional_ids: (n,) uint64, sorted: every provisional id of every block.
        final_ids: (n,) uint64 aligned with ``provisional_ids``; 0 = filtered out.
        instances: one row per kept instance (:data:`INSTANCE_COLUMNS` + ``prob_mean``,
            ``prob_max`` when probabilities were given); voxel units, global grid.
    """

    provisional_ids: np.ndarray
    final_ids: np.ndarray
    instances: pd.DataFrame

    def as_dict(self) -> dict[int, int]:
        """``{provisional: final}`` including ``0: 0`` (fine for small volumes)."""
        table = dict(zip(self.provisional_ids.tolist(), self.final_ids.tolist()))
        table[0] = 0
        return table


def _as_records(records: pd.DataFrame | Iterable[pd.DataFrame]) -> pd.DataFrame:
    if isinstance(records, pd.DataFrame):
        frame = records
    else:
        frames = list(records)
        nonempty = [f for f in frames if len(f)]
        if nonempty:
            frame = pd.concat(nonempty, ignore_index=True)
        elif frames:
            frame = frames[0]
        else:
            frame = pd.DataFrame({c: np.zeros(0, np.int64) for c in RECORD_COLUMNS})
    missing = [c for c in RECORD_COLUMNS if c not in frame.columns]
    if missing:
        raise PostprocessError(f"records lack columns {missing}")
    return frame


def _as_pairs(pairs: np.ndarray | Iterable[np.ndarray]) -> np.ndarray:
    if isinstance(pairs, np.ndarray):
        parts = [pairs]
    else:
        parts = [np.asarray(p) for p in pairs]
    parts = [p.reshape(-1, 2) for p in parts if p.size]
    if not parts:
        return np.zeros((0, 2), dtype=np.uint64)
    return np.concatenate(parts).astype(np.uint64, copy=False)


#: above this many provisional ids :func:`resolve` uses scipy's connected components (faster on
#: large graphs) instead of :func:`pair_components` (no 0.2 s import)
SCIPY_RESOLVE_NODES = 1 << 20


def pair_components(n: int, pairs: np.ndarray) -> tuple[int, np.ndarray]:
    """Connected components of the graph on nodes 0..n-1 with the (k, 2) edge list ``pairs``.

    Union-find in array form: every round hooks the larger root of each edge whose ends have
    different roots onto the smallest root it meets, then compresses the paths of the nodes on
    an edge by pointer jumping, until no edge joins two roots. A root is always the smallest
    node of its tree. The result equals ``scipy.sparse.csgraph.connected_components``'s; it
    saves scipy's 0.2 s import for the small graphs of most runs, but is 1.3-1.9x slower than
    scipy at 10^7 nodes, so :func:`resolve` uses scipy above :data:`SCIPY_RESOLVE_NODES`.

    Returns:
        ``(n_comp, comp)``: comp is (n,) intp, components numbered 0.. in the order of their
        smallest node. Raises :class:`PostprocessError` for pairs that are not (k, 2) node
        indices in [0, n).
    """
    raw = np.asarray(pairs)
    if raw.size and (raw.ndim != 2 or raw.shape[1] != 2):
        raise PostprocessError(f"pair_components: pairs must be a (k, 2) array, got shape {raw.shape}")
    if raw.size and (raw.dtype.kind not in "iu" or raw.min() < 0 or raw.max() >= n):
        raise PostprocessError(f"pair_components: pairs must be integer node indices in [0, {n})")
    edges = raw.astype(np.intp, copy=False).reshape(-1, 2)
    parent = np.arange(n, dtype=np.intp)
    on_edge = np.zeros(n, dtype=bool)
    on_edge[edges.reshape(-1)] = True
    nodes = np.flatnonzero(on_edge)  # only these can leave their own set: jump on them alone
    a, b = edges[:, 0], edges[:, 1]
    while a.size:
        ra, rb = parent[a], parent[b]
        apart = ra != rb
        if not apart.any():
            break
        a, b, ra, rb = a[apart], b[apart], ra[apart], rb[apart]  # joined edges stay joined
        np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))
        here = parent[nodes]
        while True:
            up = parent[here]
            if np.array_equal(up, here):
                break
            parent[nodes] = here = up
    is_root = parent == np.arange(n, dtype=np.intp)
    rank = np.cumsum(is_root, dtype=np.intp) - 1
    return int(is_root.sum()), rank[parent]


def resolve(
    equivalence_pairs: np.ndarray | Iterable[np.ndarray],
    records: pd.DataFrame | Iterable[pd.DataFrame],
    min_size: int = 1,
    max_size: int | None = None,
    min_peak_prob: float | None = None,
) -> CCResolution:
    """Pass 1c: merge touching provisional labels into instances and number them.

    Args:
        equivalence_pairs: (k, 2) uint64 pairs from :func:`face_equivalences` (or a list of
            such arrays, one per block).
        records: the records of all blocks (one DataFrame or a list) from
            :func:`label_block_local`.
        min_size: instances with fewer voxels (after merging) are dropped (final id 0).
        max_size: if given, instances with more voxels are dropped.
        min_peak_prob: if given, instances whose ``prob_max`` is below it are dropped (same
            scale as the probabilities given to :func:`label_block_local`).

    Returns:
        :class:`CCResolution`. Kept instances are numbered 1..N in the z-y-x raster order of
        their first voxel, so ids do not depend on the block layout; centroids are
        ``sum_coord / size`` in voxels; bboxes are half-open global voxel ranges.
    """
    frame = _as_records(records)
    ids = frame["id"].to_numpy(dtype=np.uint64)
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    frame = frame.iloc[order].reset_index(drop=True)
    if ids.size and np.any(ids[1:] == ids[:-1]):
        dup = ids[1:][ids[1:] == ids[:-1]][:5]
        raise PostprocessError(f"provisional ids {dup.tolist()} occur in more than one record")
    if ids.size and ids[0] == 0:
        raise PostprocessError("provisional id 0 (background) appears in the records")
    pairs = _as_pairs(equivalence_pairs)
    n = ids.size
    if pairs.size:
        idx = np.searchsorted(ids, pairs)
        bad = (idx >= n) | (ids[np.minimum(idx, max(n - 1, 0))] != pairs) if n else np.ones_like(pairs, bool)
        if np.any(bad):
            raise PostprocessError(
                f"equivalence pairs name provisional ids without a record: "
                f"{np.unique(pairs[bad])[:5].tolist()}"
            )
        if n <= SCIPY_RESOLVE_NODES:
            n_comp, comp = pair_components(n, idx)
        else:  # imported here: block workers (fresh processes under daisy) never need it
            from scipy.sparse import coo_matrix
            from scipy.sparse.csgraph import connected_components

            graph = coo_matrix((np.ones(len(idx), dtype=np.int8), (idx[:, 0], idx[:, 1])), shape=(n, n))
            n_comp, comp = connected_components(graph, directed=False)
    else:
        n_comp, comp = n, np.arange(n)
    comp = comp.astype(np.intp)

    def col(name: str) -> np.ndarray:
        return frame[name].to_numpy()

    # Component first voxel: lexicographic min over its fragments.
    lex = np.lexsort((col("first_x"), col("first_y"), col("first_z"), comp))
    first_rows = lex[np.r_[0, np.flatnonzero(np.diff(comp[lex])) + 1]] if n else lex
    size = np.bincount(comp, weights=col("count"), minlength=n_comp).astype(np.int64)
    merged: dict[str, np.ndarray] = {
        "size": size,
        "first_z": col("first_z")[first_rows].astype(np.int64),
        "first_y": col("first_y")[first_rows].astype(np.int64),
        "first_x": col("first_x")[first_rows].astype(np.int64),
    }
    for name in "zyx":
        lo = np.full(n_comp, np.iinfo(np.int64).max, np.int64)
        hi = np.full(n_comp, np.iinfo(np.int64).min, np.int64)
        np.minimum.at(lo, comp, col(f"{name}0").astype(np.int64))
        np.maximum.at(hi, comp, col(f"{name}1").astype(np.int64))
        merged[f"{name}0"], merged[f"{name}1"] = lo, hi
    for name in "zyx":
        s = np.zeros(n_comp, np.int64)
        np.add.at(s, comp, col(f"sum_{name}").astype(np.int64))
        merged[f"centroid_{name}"] = s / np.maximum(size, 1)
    merged["n_fragments"] = np.bincount(comp, minlength=n_comp).astype(np.int64)
    has_probs = "prob_sum" in frame.columns and "prob_max" in frame.columns
    if has_probs:
        psum = np.bincount(comp, weights=col("prob_sum").astype(np.float64), minlength=n_comp)
        pmax = np.full(n_comp, -np.inf)
        np.maximum.at(pmax, comp, col("prob_max").astype(np.float64))
        merged["prob_mean"] = psum / np.maximum(size, 1)
        merged["prob_max"] = pmax
    elif min_peak_prob is not None:
        raise PostprocessError("min_peak_prob needs records with prob_sum/prob_max (pass probs)")

    keep = size >= int(min_size)
    if max_size is not None:
        keep &= size <= int(max_size)
    if min_peak_prob is not None:
        keep &= merged["prob_max"] >= float(min_peak_prob)
    # Number kept components by first voxel in raster order.
    comp_order = np.lexsort((merged["first_x"], merged["first_y"], merged["first_z"]))
    comp_order = comp_order[keep[comp_order]]
    final_of_comp = np.zeros(n_comp, dtype=np.uint64)
    final_of_comp[comp_order] = np.arange(1, comp_order.size + 1, dtype=np.uint64)
    instances = pd.DataFrame({"id": final_of_comp[comp_order]})
    for name in INSTANCE_COLUMNS[1:] + (("prob_mean", "prob_max") if has_probs else ()):
        instances[name] = merged[name][comp_order]
    logger.debug(
        "resolved %d provisional labels, %d pairs -> %d components, %d kept",
        n, len(pairs), n_comp, comp_order.size,
    )
    return CCResolution(provisional_ids=ids, final_ids=final_of_comp[comp], instances=instances)
