"""Serial, test-only reference pieces of the blockwise connected components (postprocess.cc_stitch).

Production runs the three steps through the blockwise engine (postprocess.segment); these
dense, in-memory forms are the specification the tests hold it to:

- :func:`label_block`: :func:`~cleftwise.postprocess.cc_stitch.label_block_local` with uint64
  provisional ids;
- :func:`halo_equivalences`: pass 1b from a dense +1 (or -1) halo instead of stored faces;
- :func:`relabel_block`: pass 2 on uint64 provisional labels;
- :func:`blockwise_cc_reference`: all of it serially over an in-memory array.
"""

from __future__ import annotations

import itertools
from typing import Mapping, Sequence

import fastremap
import numpy as np
import pandas as pd

from cleftwise.postprocess.cc_stitch import (CCResolution, _check_3d, _check_connectivity, _slab_pairs,
                                             block_faces, block_id_offset, face_equivalences,
                                             label_block_local, label_components, local_lut, resolve)
from cleftwise.postprocess.errors import PostprocessError

__all__ = ["label_block", "halo_equivalences", "relabel_block", "blockwise_cc_reference"]


def label_block(*args, **kwargs) -> tuple[np.ndarray, pd.DataFrame]:
    """:func:`label_block_local` (same arguments) with the labels returned as uint64 provisional ids.

    Returns:
        ``(labels, records)``: labels is uint64 (z, y, x), 0 = background, else
        ``id_offset + local``; records as in :func:`label_block_local`.
    """
    local, records = label_block_local(*args, **kwargs)
    lut = np.zeros(len(records) + 1, dtype=np.uint64)
    lut[1:] = records["id"].to_numpy(dtype=np.uint64)
    return np.take(lut, local), records


def halo_equivalences(
    labels_with_halo: np.ndarray,
    core_shape: Sequence[int],
    connectivity: int = 26,
    side: str = "high",
) -> np.ndarray:
    """Pass 1b: pairs of provisional ids that touch across the block's boundary.

    Args:
        labels_with_halo: (z, y, x) provisional labels of the block's write region plus a
            1-voxel halo, shape ``core_shape + 1`` on every axis. ``side="high"``: the halo is
            on the high z/y/x sides (array index 0 = block begin); ``side="low"``: on the low
            sides (array index 1 = block begin). Halo voxels outside the volume must be 0.
        core_shape: (z, y, x) shape of the block's write region.
        connectivity: 6, 18 or 26.
        side: "high" or "low", see above.

    Returns:
        (k, 2) uint64 array of unique pairs ``(a, b)``, ``a < b``, sorted; each pair has one
        voxel labelled a and one labelled b that are neighbours under ``connectivity`` and
        whose low corner (high corner for ``side="low"``) lies in the write region.
    """
    _check_3d(labels_with_halo, "labels_with_halo")
    connectivity = _check_connectivity(connectivity)
    core = tuple(int(c) for c in core_shape)
    expected = tuple(c + 1 for c in core)
    if len(core) != 3 or labels_with_halo.shape != expected:
        raise PostprocessError(
            f"labels_with_halo has shape {labels_with_halo.shape}; a block of write shape "
            f"{core} with a 1-voxel halo needs {expected}"
        )
    if side == "low":
        labels_with_halo = labels_with_halo[::-1, ::-1, ::-1]
    elif side != "high":
        raise PostprocessError(f"side must be 'high' or 'low', got {side!r}")
    arr = labels_with_halo
    z, y, x = core
    return _slab_pairs(arr[z - 1:z + 1, :, :], arr[:z, y - 1:y + 1, :], arr[:z, :y, x - 1:x + 1],
                       core, connectivity)


def relabel_block(
    labels_block: np.ndarray,
    mapping: CCResolution | Mapping[int, int] | tuple[np.ndarray, np.ndarray],
) -> np.ndarray:
    """Pass 2: replace provisional ids by final ids.

    Args:
        labels_block: (z, y, x) provisional labels (as written in pass 1).
        mapping: a :class:`CCResolution`, a ``{provisional: final}`` dict, or a pair of
            aligned arrays ``(provisional_ids sorted ascending, final_ids)``.

    Returns:
        uint64 (z, y, x) final labels (0 = background or filtered). An id missing from the
        mapping raises :class:`PostprocessError`.
    """
    labels = np.ascontiguousarray(labels_block, dtype=np.uint64)
    if isinstance(mapping, CCResolution):
        prov, final = mapping.provisional_ids, mapping.final_ids
    elif isinstance(mapping, tuple):
        prov, final = (np.asarray(mapping[0], np.uint64), np.asarray(mapping[1], np.uint64))
    else:
        table = {int(k): int(v) for k, v in mapping.items()}
        table.setdefault(0, 0)
        try:
            return fastremap.remap(labels, table, preserve_missing_labels=False, in_place=False)
        except KeyError as err:
            raise PostprocessError(f"label {err.args[0]} of the block has no final id") from err
    present = fastremap.unique(labels)
    present = present[present != 0]
    idx = np.searchsorted(prov, present)
    found = (idx < prov.size) & (prov[np.minimum(idx, max(prov.size - 1, 0))] == present) \
        if prov.size else np.zeros(present.shape, bool)
    if not np.all(found):
        raise PostprocessError(
            f"provisional ids {present[~found][:5].tolist()} of the block have no final id"
        )
    table = dict(zip(present.tolist(), final[idx].tolist()))
    table[0] = 0
    return fastremap.remap(labels, table, preserve_missing_labels=False, in_place=False)


def blockwise_cc_reference(
    mask: np.ndarray,
    block_shape: Sequence[int],
    connectivity: int = 26,
    probs: np.ndarray | None = None,
    min_size: int = 1,
    max_size: int | None = None,
    min_peak_prob: float | None = None,
) -> tuple[np.ndarray, CCResolution]:
    """Serial reference of the three-step algorithm over an in-memory volume.

    Args:
        mask: (z, y, x) foreground (non-zero).
        block_shape: (z, y, x) block shape in voxels; need not divide the volume shape.
        connectivity: 6, 18 or 26.
        probs: optional (z, y, x) probabilities for ``prob_mean``/``prob_max``.
        min_size, max_size, min_peak_prob: filters, see :func:`resolve`.

    Returns:
        ``(labels, resolution)``: uint64 (z, y, x) final labels and the :class:`CCResolution`.
    """
    _check_3d(mask, "mask")
    bshape = tuple(int(b) for b in block_shape)
    if len(bshape) != 3 or min(bshape) <= 0:
        raise PostprocessError(f"block_shape must be 3 positive ints, got {block_shape!r}")
    shape = mask.shape
    corners = [
        (z, y, x)
        for z in range(0, shape[0], bshape[0])
        for y in range(0, shape[1], bshape[1])
        for x in range(0, shape[2], bshape[2])
    ]

    def region(begin):
        return tuple(slice(b, min(b + s, n)) for b, s, n in zip(begin, bshape, shape))

    records, faces = [], {}
    for begin in corners:
        sl = region(begin)
        offset = block_id_offset(begin, bshape, shape)
        local, rec = label_block_local(mask[sl], begin, connectivity, id_offset=offset,
                                       probs_block=None if probs is None else probs[sl])
        faces[begin] = block_faces(local, offset)
        records.append(rec)
    pairs = []
    for begin in corners:
        core = tuple(s.stop - s.start for s in region(begin))
        near = [tuple(b + d * s for b, d, s in zip(begin, step, bshape))
                for step in itertools.product((0, 1), repeat=3)]
        pairs.append(face_equivalences(begin, core, [(c, faces[c]) for c in near if c in faces],
                                       connectivity))
    resolution = resolve(pairs, records, min_size=min_size, max_size=max_size,
                         min_peak_prob=min_peak_prob)
    out = np.zeros(shape, dtype=np.uint64)
    for begin in corners:  # pass 2 recomputes the local labels, as the engine does
        sl = region(begin)
        local, n = label_components(mask[sl], connectivity)
        lut = local_lut(resolution.provisional_ids, resolution.final_ids,
                        block_id_offset(begin, bshape, shape), n)
        out[sl] = np.take(lut, local)
    return out, resolution
