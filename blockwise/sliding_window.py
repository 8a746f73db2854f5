"""Sliding-window inference maths on a global patch grid (knows nothing of synapses or storage).

All coordinates here are integer voxel indices (z, y, x) relative to the first voxel of the
volume, which is the grid origin.

**The global grid.** Along each axis with volume size ``n``, patch size ``p`` and stride ``s``
(``1 <= s <= p <= n``), patch origins are ``0, s, 2s, …`` below ``n - p`` plus a last origin
clamped to ``n - p``, so every patch lies inside the volume and every voxel is covered. The
patches are the Cartesian product of the per-axis origins. The grid is a fixed function of
(volume shape, patch shape, stride), which is what makes blockwise prediction block-independent:
a voxel's value is ``Σ w·p / Σ w`` over the same global patches, whichever write block asks for it.
The sums are exact integers (:mod:`cleftwise.blockwise.patch_sums`), so they can also be split
across blocks (the predict step runs each patch once and adds the neighbours' spill) and give
the same bits. Volumes smaller than a patch along an axis must be padded by the caller.

**Blending.** Each patch prediction is weighted by a window (``blend_window``) that is largest in
the patch centre and small but positive at its faces, so voxels near patch faces (where the
network sees less context) count less. Each per-axis profile is floored (not their product),
so at a volume face, where every covering patch has the same profile along the face's axis,
the patches keep the relative weights they have in the interior.

**Batches.** :func:`batch_plan` never sends one patch alone when ``batch_size >= 2``: on CPU a
batch of one takes another convolution path (~1e-6 apart), which would make a patch's
prediction depend on which block ran it.

**Memory.** ``predict_region`` takes a :class:`Workspace` whose input-batch buffer a worker
reuses from block to block, and :func:`keep_freed_memory` keeps glibc from unmapping the
forward pass's large buffers after every batch (which cost ~7 M minor page faults per 48
patches).

Typical use (per write block)::

    read_begin, read_end = required_read_region(wb, we, patch, stride, vol_shape)
    raw = volume[read_begin:read_end]                 # (z, y, x) uint8
    prob = predict_region(TorchPredictor(model), raw, read_begin, wb, we, patch, stride,
                          vol_shape, blend_profiles(patch))   # (C, z, y, x) float32 in [0, 1]
    out = to_uint8(prob)
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import logging
import platform
import sys
import time
from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np

from cleftwise.blockwise.errors import BlockwiseError
from cleftwise.blockwise.patch_sums import BlendSums

__all__ = [
    "batch_plan",
    "blend_profiles",
    "blend_sums",
    "blend_window",
    "calibrate_batch_size",
    "keep_freed_memory",
    "Workspace",
    "grid_origins",
    "overlapping_origins",
    "patch_origins",
    "required_read_region",
    "predict_region",
    "run_patches",
    "normalise_raw",
    "raw_outside_range",
    "resolve_raw_range",
    "TorchPredictor",
    "to_uint8",
]

log = logging.getLogger(__name__)

Shape = Tuple[int, int, int]
ModelFn = Callable[[np.ndarray], np.ndarray]


def _shape3(value: Sequence[int], name: str, minimum: int = 1) -> Shape:
    try:
        out = tuple(int(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise BlockwiseError(f"{name} must be 3 integers (z, y, x), got {value!r}") from exc
    if len(out) != 3 or any(v < minimum for v in out):
        raise BlockwiseError(f"{name} must be 3 integers >= {minimum} (z, y, x), got {value!r}")
    return out  # type: ignore[return-value]


def blend_profiles(patch_shape: Sequence[int], mode: str = "bump", sigma_scale: float = 1.0 / 8,
                   min_weight: float = 1e-3) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The per-axis 1-D profiles (float64, lengths pz, py, px; max 1, floored at ``min_weight``)
    whose outer product is ``blend_window(patch_shape, mode, sigma_scale, min_weight)``.

    Blending with the profiles (``predict_region(window=profiles)``, the predict step) uses the
    separable maths of :class:`~cleftwise.blockwise.patch_sums.BlendSums`: Σ w per voxel comes
    from per-axis sums, with no loop over patches."""
    shape = _shape3(patch_shape, "patch_shape")
    if mode not in ("bump", "gaussian"):
        raise BlockwiseError(f"blend_window: mode must be 'bump' or 'gaussian', got {mode!r}")
    if not 0 < min_weight <= 1:
        raise BlockwiseError(f"blend_window: min_weight must lie in (0, 1], got {min_weight}")
    if mode == "gaussian" and not sigma_scale > 0:
        raise BlockwiseError(f"blend_window: sigma_scale must be > 0, got {sigma_scale}")
    return tuple(np.maximum(p, min_weight) for p in _raw_profiles(shape, mode, sigma_scale))  # type: ignore[return-value]


def _raw_profiles(shape: Shape, mode: str, sigma_scale: float) -> list:
    profiles = []
    for n in shape:
        # Offsets of voxel centres from the patch centre, in voxels; exactly antisymmetric.
        d = (2.0 * np.arange(n) + 1.0 - n) / 2.0
        if mode == "bump":
            t2 = (d / (n / 2.0)) ** 2  # in [0, 1)
            prof = np.exp(-1.0 / (1.0 - t2))
        else:
            sigma = sigma_scale * n
            prof = np.exp(-(d ** 2) / (2.0 * sigma ** 2))
        profiles.append(prof / prof.max())
    return profiles


def blend_window(patch_shape: Sequence[int], mode: str = "bump", sigma_scale: float = 1.0 / 8,
                 min_weight: float = 1e-3, floor: str = "axis") -> np.ndarray:
    """Blending weights for one patch: float32 (z, y, x), max 1, every value > 0.

    The window is a product of 1-D profiles evaluated at voxel centres, mirror-symmetric along
    each axis:

    - ``"bump"``: ``exp(-1 / (1 - t²))`` with ``t ∈ (-1, 1)`` the voxel centre's position
      across the patch (a smooth bump that vanishes at the faces);
    - ``"gaussian"``: ``exp(-d² / (2 σ²))`` with ``d`` the distance (voxels) to the patch centre
      and ``σ = sigma_scale · size`` per axis (nnU-Net style);

    each scaled to a maximum of 1 and floored so that no voxel has weight 0 (at the volume
    borders a voxel may be covered only by patch faces):

    - ``floor="axis"`` (default): each 1-D profile is floored at ``min_weight`` before the
      product (window values >= ``min_weight³``). Near a volume face every patch covering a
      voxel has the same profile value along the face's axis, which then cancels in Σw·p / Σw:
      the weights along the other axes keep their shape up to the faces;
    - ``floor="product"``: the product is floored at ``min_weight`` (cleftwise before the
      issue "Prediction inner loop …"). Near a face the product of every covering patch falls
      to the floor, so the blend there degrades to a plain average. Kept for comparisons
      (``benchmarks/blend_faces.py``).
    """
    shape = _shape3(patch_shape, "patch_shape")
    if mode not in ("bump", "gaussian"):
        raise BlockwiseError(f"blend_window: mode must be 'bump' or 'gaussian', got {mode!r}")
    if floor not in ("axis", "product"):
        raise BlockwiseError(f"blend_window: floor must be 'axis' or 'product', got {floor!r}")
    if not 0 < min_weight <= 1:
        raise BlockwiseError(f"blend_window: min_weight must lie in (0, 1], got {min_weight}")
    if mode == "gaussian" and not sigma_scale > 0:
        raise BlockwiseError(f"blend_window: sigma_scale must be > 0, got {sigma_scale}")
    profiles = _raw_profiles(shape, mode, sigma_scale)
    if floor == "axis":
        profiles = [np.maximum(p, min_weight) for p in profiles]
    w = profiles[0][:, None, None] * profiles[1][None, :, None] * profiles[2][None, None, :]
    if floor == "product":
        np.maximum(w, min_weight, out=w)
    return w.astype(np.float32)


def grid_origins(volume_shape: Sequence[int], patch_shape: Sequence[int],
                 stride: Sequence[int]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-axis patch origins (voxels) of the global grid; see the module docstring.

    Returns three sorted int64 arrays (z, y, x): ``0, s, 2s, …`` below ``n - p`` and ``n - p``.
    Raises BlockwiseError if a patch is larger than the volume (pad the volume) or a stride is
    outside ``[1, patch]`` (it would leave voxels uncovered).
    """
    vol = _shape3(volume_shape, "volume_shape")
    patch = _shape3(patch_shape, "patch_shape")
    step = _shape3(stride, "stride")
    out = []
    for ax, n, p, s in zip("zyx", vol, patch, step):
        if p > n:
            raise BlockwiseError(
                f"patch {patch} is larger than the volume {vol} along {ax} ({p} > {n} voxels); "
                "pad the volume to at least one patch"
            )
        if s > p:
            raise BlockwiseError(f"stride {step} exceeds patch {patch} along {ax}: voxels would be skipped")
        out.append(np.append(np.arange(0, n - p, s, dtype=np.int64), np.int64(n - p)))
    return tuple(out)  # type: ignore[return-value]


def _check_write_region(write_begin: Sequence[int], write_end: Sequence[int],
                        volume_shape: Sequence[int]) -> Tuple[Shape, Shape]:
    wb = _shape3(write_begin, "write_begin", minimum=0)
    we = _shape3(write_end, "write_end", minimum=0)
    vol = _shape3(volume_shape, "volume_shape")
    if any(b >= e for b, e in zip(wb, we)) or any(e > n for e, n in zip(we, vol)):
        raise BlockwiseError(
            f"write region [{wb}, {we}) is empty or outside the volume [(0, 0, 0), {vol})"
        )
    return wb, we


def overlapping_origins(write_begin: Sequence[int], write_end: Sequence[int], patch_shape: Sequence[int],
                        stride: Sequence[int], volume_shape: Sequence[int]
                        ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-axis origins of the global-grid patches overlapping the write region [begin, end).

    A patch overlaps when ``origin < end`` and ``origin + patch > begin`` along every axis.
    Returns three sorted int64 arrays (z, y, x); their Cartesian product is the patch set.
    """
    wb, we = _check_write_region(write_begin, write_end, volume_shape)
    patch = _shape3(patch_shape, "patch_shape")
    axes = grid_origins(volume_shape, patch, stride)
    return tuple(o[(o < e) & (o + p > b)] for o, b, e, p in zip(axes, wb, we, patch))  # type: ignore[return-value]


def patch_origins(write_begin: Sequence[int], write_end: Sequence[int], patch_shape: Sequence[int],
                  stride: Sequence[int], volume_shape: Sequence[int]) -> np.ndarray:
    """Origins (N, 3) int64 (z, y, x voxels) of the patches overlapping the write region,
    in lexicographic (z, then y, then x) order, the order ``predict_region`` accumulates in."""
    oz, oy, ox = overlapping_origins(write_begin, write_end, patch_shape, stride, volume_shape)
    grid = np.stack(np.meshgrid(oz, oy, ox, indexing="ij"), axis=-1)
    return grid.reshape(-1, 3)


def required_read_region(write_begin: Sequence[int], write_end: Sequence[int], patch_shape: Sequence[int],
                         stride: Sequence[int], volume_shape: Sequence[int]) -> Tuple[Shape, Shape]:
    """Voxel box [read_begin, read_end) (z, y, x) = union of the patches overlapping the write
    region; always inside the volume and containing the write region."""
    patch = _shape3(patch_shape, "patch_shape")
    axes = overlapping_origins(write_begin, write_end, patch, stride, volume_shape)
    begin = tuple(int(o[0]) for o in axes)
    end = tuple(int(o[-1]) + p for o, p in zip(axes, patch))
    return begin, end  # type: ignore[return-value]


def resolve_raw_range(dtype, raw_range: Optional[Sequence[float]] = None) -> Tuple[float, float]:
    """The [low, high] raw intensity range that :func:`normalise_raw` maps to [0, 1].

    ``raw_range`` when given (two numbers, low < high); else 0–255 for uint8 and 0–1 for
    float32. Any other dtype (uint16, int8, float64, …) needs an explicit ``raw_range``
    (BlockwiseError otherwise).
    """
    dt = np.dtype(dtype)
    if raw_range is not None:
        try:
            low, high = (float(v) for v in raw_range)
        except (TypeError, ValueError) as exc:
            raise BlockwiseError(f"raw_range must be two numbers [low, high], got {raw_range!r}") from exc
        if not (np.isfinite(low) and np.isfinite(high) and low < high):
            raise BlockwiseError(f"raw_range must be finite with low < high, got {list(raw_range)!r}")
        return low, high
    if dt == np.uint8:
        return 0.0, 255.0
    if dt == np.float32:
        return 0.0, 1.0
    raise BlockwiseError(f"raw must be uint8 (0–255) or float32 (0–1), got {dt}; for other dtypes "
                         "give raw_range [low, high], the intensities to map to 0..1")


def raw_outside_range(raw: np.ndarray, raw_range: Tuple[float, float],
                      rel_tol: float = 1e-4) -> Optional[Tuple[float, float]]:
    """The observed (min, max) of ``raw`` when some value lies outside ``raw_range`` (or is NaN),
    else None. Float data may exceed the range by ``rel_tol · (high - low)``; integers may not."""
    a = np.asarray(raw)
    if a.size == 0:
        return None
    lo, hi = float(a.min()), float(a.max())
    low, high = raw_range
    tol = rel_tol * (high - low) if np.issubdtype(a.dtype, np.floating) else 0.0
    if lo >= low - tol and hi <= high + tol:  # False for NaN
        return None
    return lo, hi


def normalise_raw(raw: np.ndarray, raw_range: Tuple[float, float] = (0.0, 255.0),
                  reciprocal: bool = False, out: Optional[np.ndarray] = None) -> np.ndarray:
    """Raw intensities (any shape) → float32 ``(raw - low) / (high - low)``, so [low, high] maps
    to [0, 1] (values are not clipped; check them first with :func:`raw_outside_range`).

    The one scaling of model inputs: predict patches (``reciprocal=True``) and classify cubes.
    ``reciprocal=True`` multiplies by ``float32(1 / (high - low))`` instead of dividing, which can
    differ by one float32 ulp: the arithmetic predict has always used, kept so that predictions
    stay byte-identical (the classifiers were run, and trained, with the division).
    ``out``: a float32 array of raw's shape to write into (the same arithmetic, no allocation).
    """
    low, high = float(raw_range[0]), float(raw_range[1])
    if out is None:
        out = np.asarray(raw).astype(np.float32)
    else:
        if out.dtype != np.float32 or out.shape != np.shape(raw):
            raise BlockwiseError(f"normalise_raw: out must be float32 {np.shape(raw)}, got {out.dtype} {out.shape}")
        out[...] = raw
    if low:
        out -= np.float32(low)
    if reciprocal:
        out *= np.float32(1.0 / (high - low))
    else:
        out /= np.float32(high - low)
    return out


def batch_plan(n: int, batch_size: int) -> list:
    """Sizes of the ``model_fn`` calls that evaluate ``n`` patches with at most ``batch_size``
    per call: full batches, then what is left, never a batch of one patch when ``batch_size
    >= 2`` (the last two batches share the patches left: 4, 4, 1 → 4, 3, 2). On CPU a patch run
    alone takes another convolution path and differs by ~1e-6 from the same patch run in any
    larger batch; every patch is thus predicted the same whichever block runs it. A lone patch
    (``n == 1 < batch_size``) is sent twice (size 2, see :func:`run_patches`)."""
    if n <= 0:
        return []
    if batch_size <= 1:
        return [1] * n
    if n == 1:
        return [1]
    sizes = [batch_size] * (n // batch_size)
    rest = n % batch_size
    if rest == 1:
        last = sizes.pop() + 1
        sizes += [last - last // 2, last // 2]
    elif rest:
        sizes.append(rest)
    return sizes


def run_patches(model_fn: ModelFn, raw: np.ndarray, raw_begin: Sequence[int], origins: np.ndarray,
                patch_shape: Sequence[int], batch_size: int, out_channels: int,
                scale: Tuple[float, float], workspace: Optional["Workspace"] = None,
                stats: Optional[dict] = None):
    """Predict the patches at ``origins`` (N, 3; global voxels) from ``raw`` (whose first voxel
    is ``raw_begin``), in batches of :func:`batch_plan`; yields ``(origin, pred)`` per patch,
    ``pred`` (C, pz, py, px) float32 (valid until the next patch of the next batch).

    ``stats`` (a dict) counts ``patches_run`` (distinct patches) and ``patches_padded`` (copies
    sent only so that no batch holds one patch: a lone patch with ``batch_size >= 2``)."""
    patch = _shape3(patch_shape, "patch_shape")
    rb = _shape3(raw_begin, "raw_begin", minimum=0)
    ws = workspace if workspace is not None else Workspace()
    start = 0
    for size in batch_plan(len(origins), batch_size):
        chunk = origins[start:start + size]
        start += size
        pad = 1 if (size == 1 and batch_size >= 2) else 0
        batch = ws.array("batch", (size + pad, 1) + patch)
        for i, o in enumerate(chunk):
            sl = tuple(slice(int(a) - r, int(a) - r + p) for a, r, p in zip(o, rb, patch))
            normalise_raw(raw[sl], scale, reciprocal=True, out=batch[i, 0])
        if pad:
            batch[1] = batch[0]
        pred = np.asarray(model_fn(batch))
        expected = (size + pad, out_channels) + patch
        if pred.shape != expected:
            raise BlockwiseError(f"predict_region: model_fn returned shape {pred.shape}, expected {expected}")
        pred = pred.astype(np.float32, copy=False)
        if stats is not None:
            stats["patches_run"] = stats.get("patches_run", 0) + size
            stats["patches_padded"] = stats.get("patches_padded", 0) + pad
        for o, p in zip(chunk, pred):
            yield tuple(int(x) for x in o), p


def predict_region(model_fn: ModelFn, raw: np.ndarray, raw_begin: Sequence[int],
                   write_begin: Sequence[int], write_end: Sequence[int], patch_shape: Sequence[int],
                   stride: Sequence[int], volume_shape: Sequence[int], window=None,
                   batch_size: int = 4, out_channels: int = 3,
                   raw_range: Optional[Sequence[float]] = None,
                   workspace: Optional["Workspace"] = None, stats: Optional[dict] = None) -> np.ndarray:
    """Blended prediction over the write region [write_begin, write_end) (z, y, x voxels),
    running every global patch that overlaps it (the whole-volume path; the predict step runs
    each patch once per job and adds neighbours' sums, with the same maths and bits).

    Args:
        model_fn: maps a batch (B, 1, pz, py, px) float32 in [0, 1] to (B, C, pz, py, px)
            probabilities in [0, 1] (e.g. a ``TorchPredictor``).
        raw: (z, y, x) raw intensities covering at least ``required_read_region(...)``, scaled
            to [0, 1] by :func:`normalise_raw` with ``raw_range``.
        raw_begin: global voxel (z, y, x) of ``raw[0, 0, 0]``.
        patch_shape, stride, volume_shape: define the global grid (see module docstring).
        window: three per-axis profiles (:func:`blend_profiles`, separable maths) or a
            (pz, py, px) array of positive weights (:func:`blend_window`); None →
            ``blend_profiles(patch_shape)``.
        batch_size: patches per ``model_fn`` call (:func:`batch_plan`: never one patch alone
            when >= 2), so each patch is evaluated exactly once.
        out_channels: C, the number of channels ``model_fn`` returns.
        raw_range: [low, high] intensities mapped to [0, 1]; None = the default of raw's dtype
            (:func:`resolve_raw_range`: uint8 0–255, float32 0–1).
        workspace: a :class:`Workspace` whose input-batch buffer is reused from call to call.
        stats: a dict to count patches into (:func:`run_patches`).

    Returns:
        float32 (C, wz, wy, wx): ``Σ w·p / Σ w`` over every global patch overlapping the write
        region, computed with the exact fixed-point sums of
        :class:`~cleftwise.blockwise.patch_sums.BlendSums`: the same bits whichever region,
        block split or patch order computes a voxel.
    """
    patch = _shape3(patch_shape, "patch_shape")
    wb, we = _check_write_region(write_begin, write_end, volume_shape)
    rb = _shape3(raw_begin, "raw_begin", minimum=0)
    if batch_size < 1 or out_channels < 1:
        raise BlockwiseError(f"predict_region: batch_size ({batch_size}) and out_channels ({out_channels}) must be >= 1")
    raw = np.asarray(raw)
    if raw.ndim != 3:
        raise BlockwiseError(f"predict_region: raw must be (z, y, x), got shape {raw.shape}")
    scale = resolve_raw_range(raw.dtype, raw_range)
    read_begin, read_end = required_read_region(wb, we, patch, stride, volume_shape)
    raw_end = tuple(b + s for b, s in zip(rb, raw.shape))
    if any(r < b for r, b in zip(read_begin, rb)) or any(r > e for r, e in zip(read_end, raw_end)):
        raise BlockwiseError(
            f"predict_region: raw covers [{rb}, {raw_end}) but the write region [{wb}, {we}) needs "
            f"[{read_begin}, {read_end})"
        )
    sums = blend_sums(volume_shape, patch, stride, window)
    origins = patch_origins(wb, we, patch, stride, volume_shape)
    box = (wb, we)
    num = sums.zeros(out_channels, box)
    norm = sums.norm_max(box)
    log.debug("predict_region write [%s, %s): %d patches", wb, we, len(origins))
    for o, p in run_patches(model_fn, raw, rb, origins, patch, batch_size, out_channels, scale,
                            workspace, stats):
        sums.add(num, wb, o, p, norm)
    return sums.finalize(num, box)


def blend_sums(volume_shape: Sequence[int], patch_shape: Sequence[int], stride: Sequence[int],
               window=None) -> BlendSums:
    """The :class:`~cleftwise.blockwise.patch_sums.BlendSums` of a global grid; ``window`` as
    in :func:`predict_region` (None: ``blend_profiles(patch_shape)``). BlockwiseError for a
    window that is not positive with the patch's shape."""
    patch = _shape3(patch_shape, "patch_shape")
    axes = grid_origins(volume_shape, patch, stride)
    if window is None:
        window = blend_profiles(patch)
    try:
        return BlendSums(volume_shape, patch, stride, window, axes)
    except BlockwiseError as e:
        raise BlockwiseError(f"predict_region: {e}") from e


class Workspace:
    """Named float32 buffers reused across calls (one per worker, see :func:`predict_region`).

    ``array(name, shape)`` returns a C-contiguous view of ``shape`` into the buffer ``name``,
    which grows (is reallocated) only when a larger shape is asked for, so a worker predicting
    blocks of one shape allocates its buffers once. Views from an earlier call alias the new one.
    """

    def __init__(self) -> None:
        self._buffers: dict = {}

    def array(self, name: str, shape: Sequence[int], zero: bool = False) -> np.ndarray:
        """A float32 view of ``shape`` into buffer ``name`` (zeroed when ``zero``)."""
        size = int(np.prod(shape, dtype=np.int64))
        buf = self._buffers.get(name)
        if buf is None or buf.size < size:
            buf = self._buffers[name] = np.empty(size, dtype=np.float32)
        out = buf[:size].reshape(tuple(shape))
        if zero:
            out.fill(0)
        return out

    def nbytes(self) -> int:
        """Bytes held by the buffers."""
        return sum(b.nbytes for b in self._buffers.values())


def to_uint8(prob: np.ndarray, in_place: bool = False) -> np.ndarray:
    """Probabilities in [0, 1] → uint8 ``round(prob · 255)`` (values outside [0, 1] are clipped).
    Any shape; raises BlockwiseError on NaN (a diverged model). ``in_place``: scale a float32
    ``prob`` in place (it is consumed) instead of allocating a float32 copy."""
    prob = np.asarray(prob)
    if in_place and prob.dtype == np.float32:
        scaled = np.multiply(prob, np.float32(255.0), out=prob)
    else:
        scaled = np.multiply(prob, 255.0, dtype=np.float32)
    if np.isnan(scaled).any():
        raise BlockwiseError("to_uint8: probabilities contain NaN")
    np.clip(scaled, 0.0, 255.0, out=scaled)
    np.rint(scaled, out=scaled)
    return scaled.astype(np.uint8)


@contextlib.contextmanager
def torch_threads(n: int = 0):
    """Run the body with torch using ``n`` CPU threads (0: leave as is), then restore the
    process's setting: results of a forward pass depend on the thread count, so one step's
    setting must not leak into the rest of the process."""
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        if n:
            torch.set_num_threads(before)


class TorchPredictor:
    """A torch model as a ``model_fn``: (B, 1, z, y, x) float32 numpy → (B, C, z, y, x) float32
    probabilities.

    Args:
        model: an ``nn.Module`` producing logits (B, C, z, y, x); put in eval mode here.
        device: "auto" (cuda if available, else cpu), or any torch device.
        activation: "sigmoid" (independent channels), "softmax" (exclusive channels, over C) or
            "none"; None → the model's ``output_activation`` attribute, else "sigmoid".
        amp_dtype: None, "bf16" or "fp16": autocast on CUDA (ignored on CPU).
        tta: average probabilities over all 8 flips of (z, y, x) (test-time augmentation).
        num_threads: if given, ``torch.set_num_threads(num_threads)`` (process-wide).
        pin_memory: use pinned host buffers for CUDA transfers.

    A batch runs at its true size: ``patches_evaluated`` counts the patches run through the
    model (a TTA patch counts once) and ``forward_calls`` the calls. CPU convolutions take
    another code path for a single sample, so a patch run alone differs by ~1e-6 from the same
    patch in a larger batch (measured bit-identical across batches of 2..5);
    :func:`batch_plan` therefore never sends one patch alone when ``batch_size >= 2`` (a block
    with a single patch sends it twice), which keeps blockwise and whole-volume results
    bit-identical.
    """

    def __init__(self, model, device: Union[str, "torch.device", None] = "auto",
                 activation: Optional[str] = None, amp_dtype: Optional[str] = None, tta: bool = False,
                 num_threads: Optional[int] = None, pin_memory: bool = True):
        import torch

        self._torch = torch
        if device is None or device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if activation is None:
            activation = getattr(model, "output_activation", "sigmoid")
        if activation not in ("sigmoid", "softmax", "none"):
            raise BlockwiseError(f"TorchPredictor: activation must be sigmoid/softmax/none, got {activation!r}")
        self.activation = activation
        dtypes = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}
        if amp_dtype not in dtypes:
            raise BlockwiseError(f"TorchPredictor: amp_dtype must be None, 'bf16' or 'fp16', got {amp_dtype!r}")
        self.amp_dtype = dtypes[amp_dtype] if self.device.type == "cuda" else None
        if amp_dtype is not None and self.amp_dtype is None:
            log.info("TorchPredictor: amp_dtype=%s ignored on %s", amp_dtype, self.device)
        self.tta = bool(tta)
        self.patches_evaluated = 0
        self.forward_calls = 0
        self.pin_memory = bool(pin_memory) and self.device.type == "cuda"
        if num_threads is not None:
            torch.set_num_threads(int(num_threads))
        self.model = model.to(self.device).eval()

    def _probabilities(self, x):
        torch = self._torch
        if self.amp_dtype is not None:
            with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype):
                logits = self.model(x)
        else:
            logits = self.model(x)
        logits = logits.float()
        if self.activation == "sigmoid":
            return torch.sigmoid(logits)
        if self.activation == "softmax":
            return torch.softmax(logits, dim=1)
        return logits

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.ndim != 5:
            raise BlockwiseError(f"TorchPredictor: expected a (B, C, z, y, x) batch, got shape {batch.shape}")
        n = batch.shape[0]
        self.patches_evaluated += n
        self.forward_calls += 1
        x = torch.from_numpy(batch)
        if self.pin_memory:
            x = x.pin_memory()
        x = x.to(self.device, non_blocking=True)
        with torch.inference_mode():
            if not self.tta:
                prob = self._probabilities(x)
            else:
                prob = None
                flips = [dims for k in range(4) for dims in itertools.combinations((2, 3, 4), k)]
                for dims in flips:
                    xi = torch.flip(x, dims) if dims else x
                    pi = self._probabilities(xi)
                    pi = torch.flip(pi, dims) if dims else pi
                    prob = pi if prob is None else prob + pi
                prob = prob / len(flips)
            return prob.cpu().numpy()


def calibrate_batch_size(model_fn: ModelFn, patch_shape: Sequence[int],
                         candidates: Sequence[int] = (1, 2, 4, 8), in_channels: int = 1,
                         clock: Callable[[], float] = time.perf_counter) -> Tuple[int, dict]:
    """The batch size with the most patches/s among ``candidates``, measured on ``model_fn``.

    One warm-up call at the smallest candidate, then one timed call per candidate in increasing
    order on a fixed random batch (B, in_channels, pz, py, px) float32; stops at the first
    candidate slower (patches/s) than the best so far, or that runs out of memory (MemoryError,
    or a RuntimeError saying "out of memory"/"can't allocate"). Returns ``(best, {batch:
    patches_per_s})`` of the candidates timed. Which batch wins changes the time only: results
    agree to ~1e-5 whatever the batch (:class:`TorchPredictor`).
    """
    patch = _shape3(patch_shape, "patch_shape")
    cands = sorted({int(c) for c in candidates})
    if not cands or cands[0] < 1:
        raise BlockwiseError(f"calibrate_batch_size: candidates must be integers >= 1, got {list(candidates)}")
    x = np.random.default_rng(0).random((cands[-1], in_channels) + patch, dtype=np.float32)
    model_fn(x[:cands[0]])  # warm-up: first-call allocations and kernel selection
    rates: dict = {}
    best = cands[0]
    for b in cands:
        t0 = clock()
        try:
            model_fn(x[:b])
        except (MemoryError, RuntimeError) as e:
            if not isinstance(e, MemoryError) and not any(
                    m in str(e).lower() for m in ("out of memory", "can't allocate", "cannot allocate")):
                raise
            log.info("calibrate_batch_size: batch %d ran out of memory (%s); keeping %d", b, e, best)
            break
        rates[b] = b / max(clock() - t0, 1e-12)
        log.debug("calibrate_batch_size: batch %d: %.3f patches/s", b, rates[b])
        if rates[b] > rates[best]:
            best = b
        elif rates[b] < rates[best]:
            break
    return best, rates


_MALLOC_SET: Optional[dict] = None


def keep_freed_memory(trim_threshold: int = 1 << 30) -> dict:
    """Make this process's glibc malloc keep large freed blocks for reuse (Linux/glibc only).

    A forward pass allocates activation buffers of tens of MB; glibc serves blocks above its
    mmap threshold (at most 32 MiB) with ``mmap`` and unmaps them on free, and trims the top of
    the heap above ``M_TRIM_THRESHOLD``, so every batch faults its buffers in again (measured:
    7.1 M minor page faults for 48 patches of 18 × 160 × 160). This sets, once per process,
    ``M_MMAP_MAX = 0`` (no mmap'd blocks: large blocks come from the heap and are reused) and
    ``M_TRIM_THRESHOLD = trim_threshold`` (freed memory below that stays mapped). The cost: the
    process keeps its peak heap (up to the threshold above what it uses) until it exits.

    Returns the settings applied (``{}`` where the platform has no glibc ``mallopt``, e.g.
    macOS, Windows, musl); later calls return the first call's result.
    """
    global _MALLOC_SET
    if _MALLOC_SET is not None:
        return _MALLOC_SET
    applied: dict = {}
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        try:
            libc = ctypes.CDLL("libc.so.6")
            m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
            if libc.mallopt(m_mmap_max, 0) == 1:
                applied["M_MMAP_MAX"] = 0
            if libc.mallopt(m_trim_threshold, ctypes.c_int(min(int(trim_threshold), 2 ** 31 - 1))) == 1:
                applied["M_TRIM_THRESHOLD"] = int(min(int(trim_threshold), 2 ** 31 - 1))
        except (OSError, AttributeError) as e:  # no libc.so.6 / no mallopt
            log.debug("keep_freed_memory: mallopt unavailable (%s)", e)
    log.debug("keep_freed_memory: %s", applied or "not applied (no glibc)")
    _MALLOC_SET = applied
    return applied
