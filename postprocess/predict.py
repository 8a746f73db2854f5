"""The ``predict`` step: blockwise sliding-window inference of a 3D CNN over a volume.

Patches lie on one *global* grid (origins at the input volume's origin + k·stride,
:func:`~cleftwise.blockwise.sliding_window.grid_origins`) and each patch is predicted once per
job, in two passes (a stage of two steps):

1. :class:`PredictStep`: a block runs the patches whose origin lies in its write ROI (patches
   starting before the ROI go to the first block along that axis), in batches, and adds
   their blended predictions as exact integer sums
   (:class:`~cleftwise.blockwise.patch_sums.BlendSums`). It writes the voxels no other
   block's patch reaches, and saves the rest of its sums (its low-face margins and the spill
   past its high faces into up to 7 neighbours) to ``<work_dir>/predict_sums/<block>.npz``.
2. :class:`PredictBlendStep` (no model): a block adds its own saved sums and its lower
   neighbours' spill, divides by Σ w (a function of the grid) and writes the remaining voxels;
   the sums are deleted when every block is blended.

Integer sums do not depend on their order, so a voxel gets the same bits whatever the block
shape, backend, worker count or resumes, and the same bits as
:func:`~cleftwise.blockwise.sliding_window.predict_region` over the whole volume. Both passes
overwrite, never add: a re-run block gives the same file and voxels. Pass 1 records per block
the forward passes run (the predictor's count), summed in the run report beside the minimal
count (the grid patches touching the ROI).

Output: a (c, z, y, x) volume of probabilities, uint8 0–255 (default) or float16, with the
input's voxel size and the ROI's offset.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from typing import Optional, Union

import numpy as np
from funlib.geometry import Coordinate, Roi

from cleftwise.models.checkpoint import load_model, read_checkpoint_meta, weights_digest
from cleftwise.models.errors import ModelError
from cleftwise.models.rsunet import check_patch_shape
from cleftwise.storage.atomic import atomic_path
from cleftwise.storage.volume import open_volume

from cleftwise.blockwise.grid import Block
from cleftwise.blockwise.errors import BlockwiseError
from cleftwise.blockwise.ledger import Ledger
from cleftwise.blockwise.patch_sums import box_minus_box, final_begin, intersect, minimal_patch_count, owned
from cleftwise.blockwise.sliding_window import (torch_threads, TorchPredictor, Workspace, blend_profiles,
                                                blend_sums, calibrate_batch_size, grid_origins,
                                                keep_freed_memory, raw_outside_range, resolve_raw_range,
                                                run_patches, to_uint8)
from cleftwise.blockwise.progress import report as report_progress
from cleftwise.blockwise.stages import Stage
from cleftwise.postprocess.preflight import check_checkpoint
from cleftwise.blockwise.step import ArraySpec, BlockStep
from cleftwise.postprocess.errors import PostprocessError

__all__ = ["PredictConfig", "PredictStep", "PredictBlendStep", "channel_names", "checked_raw_range", "check_raw_values",
           "batch_cache_path", "BATCH_CANDIDATES", "STAGE"]

log = logging.getLogger(__name__)


@dataclass
class PredictConfig:
    """Settings of the predict step. Shapes are voxels (z, y, x); ROI in nm."""

    input: str = ""
    """raw EM volume URL (z y x; uint8 0–255 or float32 0–1, other dtypes with raw_range), e.g.
    data.zarr/raw (the pipeline fills it)"""
    raw_range: Optional[tuple] = None
    """[low, high] raw intensities mapped to 0..1 (checked on every block read); default 0–255
    for uint8, 0–1 for float32; required for any other dtype (uint16, int8, …)"""
    output: str = ""
    """output volume URL for the (c, z, y, x) probabilities (the pipeline fills it)"""
    checkpoint: str = ""
    """model state_dict (.pt) with its architecture JSON beside it"""
    roi: Optional[tuple] = None
    """[[z, y, x] begin nm, [z, y, x] shape nm] to predict; default the whole input"""
    block_shape: tuple = (32, 256, 256)
    """write block shape, voxels"""
    chunk_shape: Optional[tuple] = None
    """output chunk shape, voxels (must divide block_shape); default block_shape"""
    patch_shape: Optional[tuple] = None
    """model input patch, voxels; default the checkpoint's training patch or (18, 160, 160)"""
    stride: Optional[tuple] = None
    """patch stride, voxels; default patch_shape // 2"""
    blend: str = "bump"
    """blending window: bump or gaussian"""
    batch_size: Union[int, str] = "auto"
    """patches per forward pass, or auto: each worker times a few forward passes at batch
    1, 2, 4, 8 and keeps the most patches/s, cached per (weights, patch, device, threads) in
    $CLEFTWISE_CACHE_DIR/batch.json (default ~/.cache/cleftwise); results agree to ~1e-5
    whatever the batch"""
    output_dtype: str = "uint8"
    """uint8 (probability × 255) or float16"""
    device: str = "auto"
    """auto (CUDA when present), cpu or cuda"""
    amp: bool = True
    """bf16 autocast on CUDA (ignored on CPU)"""
    tta: bool = False
    """test-time augmentation by flips (slower, averaged)"""
    torch_threads: int = 0
    """torch CPU threads per worker (0 = torch default)"""
    work_dir: str = ""
    """folder of the ledger (the pipeline fills it with <output_dir>/predict; alone: <output>.work)"""
    missing_chunks: str = "error"
    """never-written chunks of this stage's input volumes: error or zeros; zeros here or in the
    top-level missing_chunks reads them as zeros"""

    def __post_init__(self) -> None:
        for key in ("block_shape", "chunk_shape", "patch_shape", "stride"):
            _check_shape(getattr(self, key), f"predict.{key}")
        if self.raw_range is not None:
            checked_raw_range(self.input or "predict", "float32", self.raw_range, "predict.raw_range")
        if self.batch_size != "auto" and (isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int)
                                          or self.batch_size < 1):
            raise PostprocessError(f"predict.batch_size must be a whole number >= 1 or auto, got {self.batch_size!r}")

    #: fields that do not change the output (left out of the job identity, so a job can resume
    #: on other hardware)
    NOT_IDENTITY = ("device", "batch_size", "torch_threads", "work_dir", "input", "roi",
                    "block_shape", "chunk_shape", "patch_shape", "stride", "checkpoint",
                    "missing_chunks")


def _check_shape(value, key: str, minimum: int = 1) -> None:
    if value is None:
        return
    try:
        ok = len(tuple(value)) == 3 and all(int(v) == v and int(v) >= minimum for v in value)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise PostprocessError(f"{key} must be 3 whole numbers >= {minimum} (z, y, x voxels), got {list(value)}")


def checked_raw_range(url: str, dtype, raw_range, key: str) -> tuple:
    """The [low, high] intensity range of raw volume ``url`` (dtype ``dtype``) given setting
    ``raw_range`` (:func:`~cleftwise.blockwise.sliding_window.resolve_raw_range`); a dtype with
    no default or a bad range raises PostprocessError naming ``url`` and the setting ``key``."""
    try:
        return resolve_raw_range(dtype, raw_range)
    except BlockwiseError as e:
        raise PostprocessError(f"{url}: {e} (set {key})") from e


def check_raw_values(raw: np.ndarray, url: str, raw_range: tuple, key: str, where: str = "") -> None:
    """PostprocessError when raw values read from ``url`` fall outside ``raw_range`` (the model
    would see intensities it was never trained on), naming the dtype, the observed min/max, the
    expected range and the setting ``key`` that declares it."""
    seen = raw_outside_range(raw, raw_range)
    if seen is None:
        return
    low, high = raw_range
    raise PostprocessError(
        f"{url}{where}: raw values outside the expected intensity range: dtype {raw.dtype}, observed "
        f"min {seen[0]:g} max {seen[1]:g}, expected [{low:g}, {high:g}] (mapped to 0..1); set {key}: "
        f"[low, high] to the volume's intensity range (e.g. [0, 255] for float data holding 0–255)")


def channel_names(meta, out_channels: int) -> list:
    """A checkpoint's output channel names (training writes them), else the names its channel
    count implies: pre/post/union (3 channels) or cleft (1)."""
    names = list((meta.extra or {}).get("channels") or [])
    if len(names) == out_channels:
        return names
    return ["pre", "post", "union"] if out_channels == 3 else ["cleft"]


class PredictStep(BlockStep):
    """Blockwise sliding-window prediction (see module docstring)."""

    name = "predict"

    def __init__(self, cfg: PredictConfig, blend_in_finish: bool = True):
        self.cfg = cfg
        #: run pass 2 (:class:`PredictBlendStep`) in :meth:`finish`, locally; the stage runs it
        #: as a step of its own on the backend instead
        self.blend_in_finish = bool(blend_in_finish)
        for key in ("input", "output", "checkpoint"):
            if not getattr(cfg, key):
                raise PostprocessError(f"predict: '{key}' is not set")
        src = open_volume(cfg.input)
        if src.num_channels is not None or len(src.shape) != 3:
            raise PostprocessError(
                f"{cfg.input}: predict expects a 3D (z, y, x) raw volume, got shape {src.shape}")
        self.raw_range = checked_raw_range(cfg.input, src.dtype, cfg.raw_range, "predict.raw_range")
        meta = read_checkpoint_meta(cfg.checkpoint)
        self.meta = meta
        mv = tuple(int(round(v)) for v in meta.voxel_size)
        if Coordinate(mv) != src.voxel_size:
            raise PostprocessError(
                f"voxel size mismatch: {cfg.input} has {tuple(src.voxel_size)} nm but the model "
                f"{cfg.checkpoint} was trained at {mv} nm; resample the input or use a matching model")
        self.voxel_size = src.voxel_size
        self.volume_roi = src.roi
        self.volume_shape = tuple(src.spatial_shape)
        self.total_roi = Roi(*cfg.roi) if cfg.roi is not None else src.roi
        if not src.roi.contains(self.total_roi):
            raise PostprocessError(f"ROI {self.total_roi} is not inside the input volume {src.roi} ({cfg.input})")
        patch = cfg.patch_shape or meta.extra.get("patch_shape") or (18, 160, 160)
        self.patch = tuple(int(p) for p in patch)
        if meta.model_type == "rsunet":
            try:
                check_patch_shape(meta.config, self.patch)
            except ModelError as e:
                raise PostprocessError(f"patch {self.patch} does not suit {cfg.checkpoint}: {e}") from e
        self.stride = tuple(int(s) for s in (cfg.stride or tuple(max(1, p // 2) for p in self.patch)))
        if any(s <= 0 or s > p for s, p in zip(self.stride, self.patch)):
            raise PostprocessError(f"stride {self.stride} must be in 1..patch {self.patch} per axis")
        if any(p > v for p, v in zip(self.patch, self.volume_shape)):
            raise PostprocessError(
                f"patch {self.patch} voxels is larger than the input volume {self.volume_shape} "
                f"({cfg.input}); use a smaller patch or pad the volume")
        block = Coordinate(int(b) for b in cfg.block_shape)
        if any(b < p for b, p in zip(block, self.patch)):
            raise PostprocessError(
                f"block shape {tuple(block)} voxels is smaller than the patch {self.patch}: every "
                "block would re-predict most of its neighbours' patches; use blocks of at least "
                "one patch")
        self.write_size = block
        self.chunk = Coordinate(int(c) for c in (cfg.chunk_shape or cfg.block_shape))
        if cfg.output_dtype not in ("uint8", "float16"):
            raise PostprocessError(f"output_dtype must be uint8 or float16, got {cfg.output_dtype!r}")
        if cfg.blend not in ("bump", "gaussian"):
            raise PostprocessError(f"blend must be bump or gaussian, got {cfg.blend!r}")
        self.out_channels = int(meta.config.out_channels)
        self.work_dir = cfg.work_dir or cfg.output.rstrip("/") + ".work"
        self._digest = weights_digest(cfg.checkpoint)

    # -- declarations -----------------------------------------------------------------------
    def outputs(self) -> list[ArraySpec]:
        return [ArraySpec(self.cfg.output, self.cfg.output_dtype,
                          channels=tuple(channel_names(self.meta, self.out_channels)),
                          chunk_shape=tuple(self.chunk), attrs={"weights_sha256": self._digest})]

    def identity(self) -> dict:
        c = self.cfg
        return {"input": os.path.abspath(c.input) if "://" not in c.input else c.input,
                "weights_sha256": self._digest, "patch": list(self.patch), "stride": list(self.stride),
                # the window's per-axis floor (issue "Prediction inner loop …") changed the
                # predictions: a job started with the product floor is not resumed by this one
                "blend_floor": "axis",
                # exact fixed-point blending, each patch once per job (issue 21): other bits and
                # a two-pass layout, so a job of the earlier per-block blending is not resumed
                "blend_sums": "fixed_point",
                # raw_range only when set, so jobs started before the setting existed resume
                **({"raw_range": list(self.raw_range)} if c.raw_range is not None else {}),
                **{k: v for k, v in asdict(c).items()
                   if k not in PredictConfig.NOT_IDENTITY and k != "raw_range"}}

    # -- geometry (voxels of the input volume: the global grid's origin) -----------------
    def write_box(self, block: Block) -> tuple:
        """``block``'s write region [begin, end) in input-volume voxels (z, y, x)."""
        w0 = tuple(int(x) for x in (block.write_roi.begin - self.volume_roi.begin) / self.voxel_size)
        w1 = tuple(a + int(s) for a, s in zip(w0, block.write_roi.shape / self.voxel_size))
        return w0, w1

    def roi_box(self) -> tuple:
        """The ROI [begin, end) in input-volume voxels."""
        r0 = tuple(int(x) for x in (self.total_roi.begin - self.volume_roi.begin) / self.voxel_size)
        return r0, tuple(a + int(s) for a, s in zip(r0, self.total_roi.shape / self.voxel_size))

    def voxel_roi(self, box: tuple) -> Roi:
        """Input-volume voxel box → ROI (nm)."""
        return Roi(self.volume_roi.begin + Coordinate(box[0]) * self.voxel_size,
                   Coordinate(e - b for b, e in zip(*box)) * self.voxel_size)

    def grid(self) -> tuple:
        """Per-axis origins of the global patch grid (cached)."""
        g = self.__dict__.get("_grid")
        if g is None:
            g = self.__dict__["_grid"] = grid_origins(self.volume_shape, self.patch, self.stride)
        return g

    def owned_origins(self, block: Block) -> tuple:
        """Per-axis grid origins whose patches ``block`` runs in pass 1 (:func:`owned`)."""
        (w0, w1), (r0, r1) = self.write_box(block), self.roi_box()
        return tuple(owned(o, p, a, b, c, d) for o, p, a, b, c, d in zip(self.grid(), self.patch, w0, w1, r0, r1))

    def interior(self, block: Block) -> Optional[tuple]:
        """The part of ``block`` that only its own patches cover (final after pass 1), or None."""
        w0, w1 = self.write_box(block)
        lo = tuple(final_begin(o, p, a, b) for o, p, a, b in zip(self.grid(), self.patch, w0, w1))
        return (lo, w1) if all(a < b for a, b in zip(lo, w1)) else None

    def minimal_patches(self) -> int:
        """The global-grid patches touching the ROI: the fewest forward passes for this job."""
        return minimal_patch_count(self.grid(), self.patch, *self.roi_box())

    def sums_path(self, block_id: int) -> str:
        """Pass 1's integer sums of ``block_id`` that pass 2 still needs (``.npz``: pieces
        ``begin<i>``, ``end<i>`` (input-volume voxels) and ``sums<i>`` (C, z, y, x))."""
        return os.path.join(os.path.abspath(self.work_dir), "predict_sums", f"{int(block_id)}.npz")

    def input_roi(self, block: Block) -> Optional[Roi]:
        """Input ROI (nm) of the patches ``block`` runs in pass 1; None when it runs none."""
        own = self.owned_origins(block)
        if not all(len(o) for o in own):
            return None
        return self.voxel_roi((tuple(int(o[0]) for o in own),
                               tuple(int(o[-1]) + p for o, p in zip(own, self.patch))))

    def to_output(self, prob: np.ndarray) -> np.ndarray:
        """float32 probabilities → the output dtype (uint8 ×255, or float16)."""
        return to_uint8(prob, in_place=True) if self.cfg.output_dtype == "uint8" else prob.astype(np.float16)

    def blend_sums(self):
        """The exact blending maths of this job's grid and window (cached)."""
        bs = self.__dict__.get("_sums")
        if bs is None:
            bs = self.__dict__["_sums"] = blend_sums(self.volume_shape, self.patch, self.stride,
                                                     blend_profiles(self.patch, mode=self.cfg.blend))
        return bs

    # -- work -----------------------------------------------------------------------------
    def prepare_scratch(self, fresh: bool) -> None:
        """A fresh start forgets pass-1 sums of an earlier job and pass 2's ledger (its blocks
        must be blended again into the new output)."""
        if fresh:
            shutil.rmtree(os.path.dirname(self.sums_path(0)), ignore_errors=True)
            self.blend_step().drop_outputs()

    @contextlib.contextmanager
    def open_worker(self):
        # keep the forward pass's large freed buffers mapped for the next batch (glibc only;
        # process-wide, once): see keep_freed_memory
        keep_freed_memory()
        with torch_threads(self.cfg.torch_threads):
            model, _ = load_model(self.cfg.checkpoint, device=self.cfg.device)
            predictor = TorchPredictor(model, device=self.cfg.device, tta=self.cfg.tta,
                                       amp_dtype="bf16" if self.cfg.amp else None)
            batch = self.cfg.batch_size if self.cfg.batch_size != "auto" else self.auto_batch_size(predictor)
            yield {"predictor": predictor, "batch_size": int(batch), "workspace": Workspace(),
                   "src": open_volume(self.cfg.input, missing=self.cfg.missing_chunks),
                   "dst": open_volume(self.cfg.output, mode="r+"), "pending": {}}

    def auto_batch_size(self, predictor: TorchPredictor) -> int:
        """``batch_size: auto``: the batch cached for this (weights, patch, device, threads,
        tta, amp), else one calibrated now (:func:`calibrate_batch_size` over
        :data:`BATCH_CANDIDATES`) and cached. Workers of one machine calibrate one at a time
        (a lock file beside the cache) so they agree; a cache that cannot be read or written
        is logged and skipped."""
        import torch

        key = json.dumps({"weights_sha256": self._digest, "patch": list(self.patch),
                          "device": str(predictor.device), "threads": torch.get_num_threads(),
                          "tta": self.cfg.tta, "amp": bool(self.cfg.amp and predictor.amp_dtype is not None)},
                         sort_keys=True)
        path = batch_cache_path()
        with _locked(path + ".lock"):
            cache = _read_cache(path)
            hit = cache.get(key, {}).get("batch_size")
            if isinstance(hit, int) and not isinstance(hit, bool) and hit >= 1:
                log.info("predict: batch_size auto → %d (cached in %s)", hit, path)
                return hit
            best, rates = calibrate_batch_size(predictor, self.patch, BATCH_CANDIDATES)
            cache[key] = {"batch_size": best, "patches_per_s": {str(b): round(r, 4) for b, r in rates.items()}}
            try:
                with atomic_path(path) as tmp, open(tmp, "w") as f:
                    json.dump(cache, f, indent=1, sort_keys=True)
            except Exception as e:  # a read-only home must not stop a prediction
                log.warning("predict: could not write the batch cache %s (%s)", path, e)
        log.info("predict: batch_size auto → %d (patches/s by batch: %s; cached in %s)", best,
                 {b: round(r, 3) for b, r in rates.items()}, path)
        return best

    def prefetch(self, block: Block, w) -> None:
        """Start an asynchronous TensorStore read of ``block``'s input."""
        w["pending"].clear()
        roi = self.input_roi(block)
        if roi is not None:
            w["pending"][block.block_id] = w["src"].read_async(roi)

    def process(self, block: Block, w) -> dict:
        """Pass 1: run the patches ``block`` owns, accumulate their exact sums, write the
        voxels no other block's patch reaches, and save the rest of the sums (its low-face
        margins and the spill into its high neighbours) for pass 2. Overwrites, never adds:
        a re-run gives the same file. Returns the block's counters."""
        own = self.owned_origins(block)
        stats = {"patches_run": 0, "patches_padded": 0}
        evaluated = w["predictor"].patches_evaluated
        pieces: list = []
        roi = self.input_roi(block)
        fut = w["pending"].pop(block.block_id, None)
        if roi is not None:
            raw = fut.result() if fut is not None else w["src"].read(roi)
            check_raw_values(raw, self.cfg.input, self.raw_range, "predict.raw_range", f" (block {block.block_id})")
            w0, _ = self.write_box(block)
            r0 = tuple(int(o[0]) for o in own)
            r1 = self.roi_box()[1]
            acc = (w0, tuple(min(e, int(o[-1]) + p) for o, p, e in zip(own, self.patch, r1)))
            sums = self.blend_sums()
            num = sums.zeros(self.out_channels, acc)
            origins = np.stack(np.meshgrid(*own, indexing="ij"), axis=-1).reshape(-1, 3)
            for k, (o, p) in enumerate(run_patches(w["predictor"], raw, r0, origins, self.patch,
                                                   w["batch_size"], self.out_channels, self.raw_range,
                                                   w["workspace"], stats), 1):
                sums.add(num, w0, o, p)
                report_progress(k, len(origins))  # the bar moves inside a large block
            inner = self.interior(block)
            if inner is not None:
                sl = (slice(None),) + tuple(slice(b - a, e - a) for a, b, e in zip(w0, *inner))
                w["dst"].write(self.voxel_roi(inner), self.to_output(sums.finalize(num[sl], inner)))
            for piece in box_minus_box(acc, inner):
                sl = (slice(None),) + tuple(slice(b - a, e - a) for a, b, e in zip(w0, *piece))
                pieces.append((piece, num[sl]))
        arrays = {"count": np.int64(len(pieces))}
        for i, (piece, data) in enumerate(pieces):
            arrays[f"begin{i}"] = np.asarray(piece[0], dtype=np.int64)
            arrays[f"end{i}"] = np.asarray(piece[1], dtype=np.int64)
            arrays[f"sums{i}"] = data
        path = self.sums_path(block.block_id)
        with atomic_path(path, "predict sums") as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)
        stats["scratch_bytes"] = int(os.path.getsize(path))
        # forward passes as the predictor counts them (a lone patch's padding copy included)
        stats["forward_passes"] = int(w["predictor"].patches_evaluated - evaluated)
        return stats

    def counters(self) -> dict:
        """Summed over the ledger's done records: ``forward_passes`` (patches through the model,
        as the predictor counts them), ``patches_run`` (distinct grid patches) and
        ``patches_padding`` (copies sent so that no batch holds one patch alone), beside
        ``forward_passes_minimal`` (the grid patches touching the ROI); ``scratch_bytes`` pass 1
        wrote (and per output voxel). A re-run block replaces its record: never counted twice."""
        totals = {"forward_passes": 0, "patches_run": 0, "patches_padded": 0, "scratch_bytes": 0}
        for rec in Ledger(self.ledger_path()).records():
            for key, v in (rec.get("counters") or {}).items():
                if key in totals:
                    totals[key] += int(v)
        out_voxels = int(np.prod([int(s) for s in self.total_roi.shape / self.voxel_size]))
        return {"forward_passes": totals["forward_passes"], "forward_passes_minimal": self.minimal_patches(),
                "patches_run": totals["patches_run"], "patches_padding": totals["patches_padded"],
                "scratch_bytes": totals["scratch_bytes"],
                "scratch_bytes_per_voxel": round(totals["scratch_bytes"] / max(1, out_voxels), 3)}

    status_extra = counters

    def blend_step(self) -> "PredictBlendStep":
        """Pass 2 of this job."""
        return PredictBlendStep(self)

    def finish(self) -> dict:
        """The counters; when the step runs alone (``run_task(PredictStep(cfg))``), pass 2 too."""
        out = self.counters()
        if self.blend_in_finish:
            from cleftwise.blockwise.runner import BackendConfig, run_task

            rep = run_task(self.blend_step(), BackendConfig(progress=False))
            out["blend"] = rep.to_dict()
        return out


class PredictBlendStep(BlockStep):
    """Pass 2 of predict: per block, add its own margin sums and its lower neighbours' spills
    (pass 1's files), divide by Σ w (a function of the grid, no neighbour needed) and write
    those voxels. No model; idempotent (it only reads the sums and overwrites voxels)."""

    name = "predict_blend"

    def __init__(self, first: "PredictStep"):
        self.first = first
        self.cfg = first.cfg
        self.total_roi, self.voxel_size, self.write_size = first.total_roi, first.voxel_size, first.write_size
        self.work_dir = first.work_dir

    def blocks(self) -> list[Block]:
        return self.first.blocks()

    def identity(self) -> dict:
        return {**self.first.identity(), "pass": "blend", "output": self.cfg.output}

    @contextlib.contextmanager
    def open_worker(self):
        yield {"dst": open_volume(self.cfg.output, mode="r+"),
               "ids": {b.index: b.block_id for b in self.first.blocks()}}

    def process(self, block: Block, w) -> None:
        first = self.first
        box = first.write_box(block)
        margins = box_minus_box(box, first.interior(block))
        if not margins:
            return
        sums = first.blend_sums()
        num = sums.zeros(first.out_channels, box)
        for e in np.ndindex(2, 2, 2):
            bid = w["ids"].get(tuple(i - d for i, d in zip(block.index, e)))
            if bid is None:
                continue
            path = first.sums_path(bid)
            try:
                data = np.load(path)
            except OSError as err:
                raise BlockwiseError(f"predict: pass-1 sums of block {bid} are missing or unreadable ({path}: "
                                     f"{err}); re-run with --overwrite") from err
            with data:
                for i in range(int(data["count"])):
                    piece = (tuple(int(x) for x in data[f"begin{i}"]), tuple(int(x) for x in data[f"end{i}"]))
                    ov = intersect(piece, box)
                    if ov is None:
                        continue
                    src = (slice(None),) + tuple(slice(a - b, c - b) for a, c, b in zip(*ov, piece[0]))
                    dst = (slice(None),) + tuple(slice(a - b, c - b) for a, c, b in zip(*ov, box[0]))
                    part = data[f"sums{i}"]
                    if part.dtype != num.dtype:
                        raise BlockwiseError(f"predict: {path} holds {part.dtype} sums, this job uses "
                                             f"{num.dtype}; re-run with --overwrite")
                    num[dst] += part[src]
        for m in margins:
            sl = (slice(None),) + tuple(slice(a - b, c - b) for a, c, b in zip(*m, box[0]))
            w["dst"].write(first.voxel_roi(m), first.to_output(sums.finalize(num[sl], m)))

    def finish(self) -> dict:
        """Pass-1 sums are no longer needed once every block is blended."""
        shutil.rmtree(os.path.dirname(self.first.sums_path(0)), ignore_errors=True)
        return {}


#: batch sizes ``batch_size: auto`` tries, in this order (it stops when patches/s drop)
BATCH_CANDIDATES = (1, 2, 4, 8)


def batch_cache_path() -> str:
    """The ``batch_size: auto`` cache: ``$CLEFTWISE_CACHE_DIR/batch.json``, else
    ``$XDG_CACHE_HOME/cleftwise/batch.json``, else ``~/.cache/cleftwise/batch.json``."""
    d = os.environ.get("CLEFTWISE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "cleftwise")
    return os.path.join(d, "batch.json")


def _read_cache(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("predict: ignoring the unreadable batch cache %s (%s)", path, e)
        return {}


@contextlib.contextmanager
def _locked(path: str):
    """An exclusive lock on the file ``path`` (POSIX flock) while the body runs; no lock where
    the folder cannot be created or flock is missing."""
    try:
        import fcntl

        os.makedirs(os.path.dirname(path), exist_ok=True)
        f = open(path, "a")
    except (ImportError, OSError) as e:
        log.warning("predict: no lock for the batch cache (%s)", e)
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _predict_steps(run, cfg: PredictConfig):
    first = PredictStep(PredictConfig(**{**asdict(cfg), "input": cfg.input or run.raw,
                                         "output": cfg.output or run.predictions_url,
                                         "roi": cfg.roi if cfg.roi is not None else run.roi,
                                         "work_dir": cfg.work_dir or run.stage_dir("predict"),
                                         "missing_chunks": run.missing_for(cfg)}),
                        blend_in_finish=False)
    yield first
    yield first.blend_step()


def _predict_preflight(run, cfg: PredictConfig) -> None:
    check_checkpoint("predict", cfg.checkpoint, cfg.input or run.raw)


#: the ``predict`` stage: raw EM → (c, z, y, x) probabilities; a changed identity is refused
#: (predictions are costly: --overwrite discards them)
STAGE = Stage(
    "predict",
    config=PredictConfig,
    work_dir=lambda run, cfg: cfg.work_dir or run.stage_dir("predict"),
    steps=_predict_steps,
    preflight=_predict_preflight,
    rerun_on_change=False,
    doc="blockwise CNN → probability volume <output_dir>/predictions.zarr/pred",
)
