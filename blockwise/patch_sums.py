"""Exact, order-free blending sums on the global patch grid (pure numpy; no I/O, no model).

Blending gives voxel ``v`` the value ``Σ w·p / Σ w`` over the global-grid patches covering it
(:mod:`cleftwise.blockwise.sliding_window`). Float additions depend on their order, so a sum
split across blocks (each block runs only *its* patches, neighbours add the spill) would not
be bit-identical to a whole-volume sum. Here every term is an integer, so any split and any
order gives the same bits:

- **Normalised weights.** ``w'(v) = w(v − o) / M(v)`` with ``M(v)`` the largest window value
  among the patches covering ``v`` (a max is order-free), so ``w' ∈ (0, 1]`` and the best
  covering patch has ``w' = 1`` even where every window value is tiny (volume corners:
  ``1e-9``). Dividing every weight of a voxel by one number leaves ``Σw·p / Σw`` unchanged.
- **Fixed point.** ``num(v) = Σ rint(w'·p·2^k)`` in int32 (int64 for dense grids), with ``k``
  and the dtype (:func:`fixed_point_format`) chosen from the grid so no sum can overflow. The
  rounding error is at most ``N/2`` units of ``2^-k`` (``N`` patches per voxel): < 4e-7 of
  the largest weight at the default half-patch stride.
- **Σ w without neighbours.** ``den(v) = 2^k·Σ w'`` is a function of the global grid only:
  for a separable window (a product of per-axis profiles, ``blend_profiles``) it is the outer
  product of per-axis sums, computed in any block without spills; for any other window it is
  an integer sum ``Σ rint(w'·2^k)`` over every covering patch (no model needed).

The result ``num / den`` (float64 → float32) is therefore one deterministic function of the
grid, the window, the patch predictions and the voxel, whatever the block that computes it.

Coordinates are integer voxel indices (z, y, x) from the volume's first voxel (the grid
origin); boxes are half-open ``[begin, end)``.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from cleftwise.blockwise.errors import BlockwiseError

__all__ = ["BlendSums", "fixed_point_format", "max_patches_per_voxel", "touching", "owned",
           "final_begin", "minimal_patch_count", "box_minus_box", "intersect"]

Box = Tuple[Tuple[int, int, int], Tuple[int, int, int]]
Window = Union[np.ndarray, Sequence[np.ndarray]]

#: bound on |model output| the fixed point is sized for (probabilities)
VALUE_BOUND = 1.0


def max_patches_per_voxel(patch: Sequence[int], stride: Sequence[int]) -> int:
    """Upper bound on the grid patches covering one voxel: ``Π (ceil(p/s) + 1)`` (the +1 is
    the clamped last origin)."""
    return int(np.prod([-(-int(p) // int(s)) + 1 for p, s in zip(patch, stride)]))


def fixed_point_format(patch: Sequence[int], stride: Sequence[int]) -> Tuple[int, type]:
    """Fractional bits ``k`` and integer dtype of the sums, a function of the grid only (every
    block uses the same). With ``N`` = :func:`max_patches_per_voxel` and terms ``|w'·p| <= 1``,
    a sum is at most ``N·2^k``: int32 with ``k = 30 − ceil(log2 N)`` when that leaves ``k >= 24``
    (half the scratch of int64; the default half-patch stride has ``N = 27``, ``k = 25``),
    else int64 with ``k = min(40, 62 − ceil(log2 N))``. The result is within ``N·2^-(k+1)`` of
    the exact blend (relative to the largest weight, which is 1)."""
    bits = math.ceil(math.log2(max_patches_per_voxel(patch, stride)))
    if 30 - bits >= 24:
        return 30 - bits, np.int32
    k = 62 - bits
    if k < 24:
        raise BlockwiseError(f"patch {tuple(patch)} with stride {tuple(stride)} overlaps too many patches "
                             "per voxel for exact blending sums; use a larger stride")
    return min(40, k), np.int64


def touching(origins: np.ndarray, p: int, lo: int, hi: int) -> np.ndarray:
    """Origins (one axis) whose patch ``[o, o + p)`` overlaps ``[lo, hi)``."""
    return origins[(origins < hi) & (origins + p > lo)]


def owned(origins: np.ndarray, p: int, wb: int, we: int, roi_b: int, roi_e: int) -> np.ndarray:
    """Origins (one axis) a block with write range ``[wb, we)`` inside the ROI ``[roi_b, roi_e)``
    runs: those in ``[wb, we)``, plus, for the first block (``wb == roi_b``), those before the
    ROI whose patch reaches into it. Over the blocks of an axis every origin touching the ROI
    is owned exactly once."""
    t = touching(origins, p, roi_b, roi_e)
    lo = -np.inf if wb == roi_b else wb
    return t[(t >= lo) & (t < we)]


def final_begin(origins: np.ndarray, p: int, wb: int, we: int) -> int:
    """First position (one axis) of ``[wb, we)`` that no patch with origin < ``wb`` covers:
    from there on a block's own patches are the only contributors (``we`` if none)."""
    before = origins[origins < wb]
    if not len(before):
        return wb
    return int(min(we, max(wb, int(before[-1]) + p)))


def minimal_patch_count(axes: Sequence[np.ndarray], patch: Sequence[int], roi_begin: Sequence[int],
                        roi_end: Sequence[int]) -> int:
    """The global-grid patches touching the ROI: the fewest forward passes that predict it."""
    return int(np.prod([len(touching(o, p, b, e)) for o, p, b, e in zip(axes, patch, roi_begin, roi_end)]))


def intersect(a: Box, b: Box) -> Optional[Box]:
    """The intersection of two boxes, or None when empty."""
    lo = tuple(max(x, y) for x, y in zip(a[0], b[0]))
    hi = tuple(min(x, y) for x, y in zip(a[1], b[1]))
    return (lo, hi) if all(l < h for l, h in zip(lo, hi)) else None  # type: ignore[return-value]


def box_minus_box(outer: Box, inner: Optional[Box]) -> List[Box]:
    """``outer`` minus ``inner`` as at most 6 disjoint boxes (z slabs, then y, then x)."""
    inner = intersect(outer, inner) if inner is not None else None
    if inner is None:
        return [outer]
    out = []
    lo, hi = list(outer[0]), list(outer[1])
    for ax in range(3):
        if lo[ax] < inner[0][ax]:
            h = list(hi)
            h[ax] = inner[0][ax]
            out.append((tuple(lo), tuple(h)))
        if inner[1][ax] < hi[ax]:
            l_ = list(lo)
            l_[ax] = inner[1][ax]
            out.append((tuple(l_), tuple(hi)))
        lo[ax], hi[ax] = inner[0][ax], inner[1][ax]
    return out  # type: ignore[return-value]


def _slices(box: Box, origin: Sequence[int]) -> Tuple[slice, ...]:
    return tuple(slice(b - o, e - o) for b, e, o in zip(box[0], box[1], origin))


class BlendSums:
    """The blending maths of one global grid (see the module docstring).

    Args:
        volume_shape, patch, stride: the global grid (voxels, z y x).
        window: three 1-D per-axis profiles (float, lengths = patch; the separable fast path,
            ``blend_profiles``) or a (pz, py, px) array of positive weights (``blend_window``).
    """

    def __init__(self, volume_shape: Sequence[int], patch: Sequence[int], stride: Sequence[int],
                 window: Window, axes: Tuple[np.ndarray, np.ndarray, np.ndarray]):
        self.volume_shape = tuple(int(v) for v in volume_shape)
        self.patch = tuple(int(p) for p in patch)
        self.axes = axes
        self.k, self.dtype = fixed_point_format(self.patch, stride)
        self._buffers: dict = {}
        self.scale = float(2 ** self.k)
        if isinstance(window, (tuple, list)) and len(window) == 3 and all(np.ndim(w) == 1 for w in window):
            self.profiles = tuple(np.asarray(w, dtype=np.float64) for w in window)
            self.window = None
            ok = all(len(w) == p for w, p in zip(self.profiles, self.patch))
            ok = ok and all(np.all(np.isfinite(w)) and np.all(w > 0) for w in self.profiles)
        else:
            self.profiles = None
            self.window = np.asarray(window, dtype=np.float64)
            ok = self.window.shape == self.patch and bool(np.all(self.window > 0))
        if not ok:
            raise BlockwiseError(f"window must be positive with shape {self.patch} (or three positive "
                                 "per-axis profiles of those lengths)")

    # -- per-axis maths (separable window) ------------------------------------------------
    def _axis(self, ax: int, lo: int, hi: int) -> Tuple[np.ndarray, np.ndarray]:
        """Per position of ``[lo, hi)`` on axis ``ax``: the max profile value M and the sum
        ``Σ prof / M`` over the covering origins (ascending, a fixed order)."""
        prof, p = self.profiles[ax], self.patch[ax]
        m = np.zeros(hi - lo)
        for o in touching(self.axes[ax], p, lo, hi):
            a, b = max(lo, int(o)), min(hi, int(o) + p)
            np.maximum(m[a - lo:b - lo], prof[a - o:b - o], out=m[a - lo:b - lo])
        d = np.zeros(hi - lo)
        for o in touching(self.axes[ax], p, lo, hi):
            a, b = max(lo, int(o)), min(hi, int(o) + p)
            d[a - lo:b - lo] += prof[a - o:b - o] / m[a - lo:b - lo]
        return m, d

    def _general_max(self, box: Box) -> np.ndarray:
        """M over ``box`` for a non-separable window: max over every covering patch."""
        shape = tuple(e - b for b, e in zip(*box))
        m = np.zeros(shape)
        for o in _product(*(touching(self.axes[a], self.patch[a], box[0][a], box[1][a]) for a in range(3))):
            ov = intersect(box, (o, tuple(int(x) + p for x, p in zip(o, self.patch))))
            dst = _slices(ov, box[0])
            np.maximum(m[dst], self.window[_slices(ov, o)], out=m[dst])
        return m

    # -- public ---------------------------------------------------------------------------
    def weights(self, origin: Sequence[int], box: Box, norm: Optional[np.ndarray] = None) -> np.ndarray:
        """``w'·2^k`` (float32) of the patch at ``origin`` over ``box`` (inside the patch).
        ``norm``: for a non-separable window, M over ``box`` (:meth:`norm_max`)."""
        if self.profiles is not None:
            q = []
            for ax in range(3):
                lo, hi = box[0][ax], box[1][ax]
                m, _ = self._axis(ax, lo, hi)
                q.append(self.profiles[ax][lo - origin[ax]:hi - origin[ax]] / m)
            qz, qy, qx = (q[0] * self.scale).astype(np.float32), q[1].astype(np.float32), q[2].astype(np.float32)
            return (qz[:, None, None] * qy[None, :, None]) * qx[None, None, :]
        if norm is None:
            norm = self._general_max(box)
        return (self.window[_slices(box, origin)] / norm * self.scale).astype(np.float32)

    def norm_max(self, box: Box) -> Optional[np.ndarray]:
        """M over ``box`` for a non-separable window (None for a separable one: not needed)."""
        return None if self.profiles is not None else self._general_max(box)

    def add(self, num: np.ndarray, num_begin: Sequence[int], origin: Sequence[int], pred: np.ndarray,
            norm_full: Optional[np.ndarray] = None) -> None:
        """Add ``rint(w'·p·2^k)`` of one patch to the integer sums ``num`` (C, z, y, x; dtype
        :attr:`dtype`) whose
        first voxel is ``num_begin``, over the overlap of the patch and ``num``.

        ``pred``: (C, pz, py, px) predictions of the patch, ``|p| <= 1``. ``norm_full``: M over
        the whole of ``num`` (non-separable windows; :meth:`norm_max`)."""
        o = tuple(int(x) for x in origin)
        nbox = (tuple(int(b) for b in num_begin), tuple(int(b) + s for b, s in zip(num_begin, num.shape[1:])))
        ov = intersect(nbox, (o, tuple(a + p for a, p in zip(o, self.patch))))
        if ov is None:
            return
        norm = norm_full[_slices(ov, nbox[0])] if norm_full is not None else None
        w = self.weights(o, ov, norm)
        p = np.asarray(pred, dtype=np.float32)[(slice(None),) + _slices(ov, o)]
        bound = max(float(p.max()), -float(p.min())) if p.size else 0.0
        if not bound <= VALUE_BOUND:  # also NaN
            raise BlockwiseError(f"model output outside [-{VALUE_BOUND:g}, {VALUE_BOUND:g}] (max |p| = {bound}); "
                                 "blending expects probabilities (sigmoid/softmax)")
        # float32 products (|term| <= 2^k <= 2^25 for int32 sums), rounded to integers: the
        # same elementwise operations whatever block or order, in reused buffers
        t = self._buffer("term", p.shape, np.float32)
        np.multiply(p, w, out=t)
        np.rint(t, out=t)
        ti = self._buffer("term_int", p.shape, num.dtype)
        np.copyto(ti, t, casting="unsafe")
        num[(slice(None),) + _slices(ov, nbox[0])] += ti

    def _buffer(self, name: str, shape: tuple, dtype) -> np.ndarray:
        """A reusable array (grown on demand; not pickled)."""
        size = int(np.prod(shape))
        buf = self._buffers.get(name)
        if buf is None or buf.size < size or buf.dtype != np.dtype(dtype):
            buf = self._buffers[name] = np.empty(size, dtype=dtype)
        return buf[:size].reshape(shape)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_buffers": {}}

    def den(self, box: Box) -> np.ndarray:
        """``2^k·Σ w'`` (float64, z y x) over ``box``: a function of the grid only."""
        if self.profiles is not None:
            d = [self._axis(ax, box[0][ax], box[1][ax])[1] for ax in range(3)]
            return ((d[0] * self.scale)[:, None, None] * d[1][None, :, None]) * d[2][None, None, :]
        shape = tuple(e - b for b, e in zip(*box))
        m = self._general_max(box)
        den = np.zeros(shape, dtype=np.int64)
        for o in _product(*(touching(self.axes[a], self.patch[a], box[0][a], box[1][a]) for a in range(3))):
            ov = intersect(box, (o, tuple(int(x) + p for x, p in zip(o, self.patch))))
            dst = _slices(ov, box[0])
            den[dst] += np.rint(self.window[_slices(ov, o)] / m[dst] * self.scale).astype(np.int64)
        return den.astype(np.float64)

    def zeros(self, channels: int, box: Box) -> np.ndarray:
        """Empty sums (C, z, y, x) over ``box`` in :attr:`dtype`."""
        return np.zeros((int(channels),) + tuple(e - b for b, e in zip(*box)), dtype=self.dtype)

    def finalize(self, num: np.ndarray, box: Box, den: Optional[np.ndarray] = None) -> np.ndarray:
        """``num / den`` over ``box`` as float32 (C, z, y, x); ``num`` covers exactly ``box``."""
        if den is None:
            den = self.den(box)
        return (num / den).astype(np.float32)


def _product(oz, oy, ox):
    for z in oz:
        for y in oy:
            for x in ox:
                yield (int(z), int(y), int(x))
