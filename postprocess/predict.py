"""The ``predict`` step: blockwise sliding-window inference of a 3D CNN over a volume.

Each worker loads the model once. A block reads the union of the *global* patches that cover
its write ROI (:func:`cleftwise.blockwise.sliding_window.required_read_region`), predicts them in
batches, blends them with the window and writes Σw·p / Σw over its write ROI. Because the
patch grid is global (origins at the input volume's origin + k·stride), a voxel gets the same
value whatever the block shape, backend, worker count or number of resumes.

Output: a (c, z, y, x) volume of probabilities, uint8 0–255 (default) or float16, with the
input's voxel size and the ROI's offset.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
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
from cleftwise.blockwise.sliding_window import (torch_threads, TorchPredictor, Workspace, blend_window,
                                                calibrate_batch_size, keep_freed_memory, predict_region,
                                                raw_outside_range, required_read_region,
                                                resolve_raw_range, to_uint8)
from cleftwise.blockwise.stages import Stage
from cleftwise.postprocess.preflight import check_checkpoint
from cleftwise.blockwise.step import ArraySpec, BlockStep
from cleftwise.postprocess.errors import PostprocessError

__all__ = ["PredictConfig", "PredictStep", "channel_names", "checked_raw_range", "check_raw_values",
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

    def __init__(self, cfg: PredictConfig):
        self.cfg = cfg
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
                # raw_range only when set, so jobs started before the setting existed resume
                **({"raw_range": list(self.raw_range)} if c.raw_range is not None else {}),
                **{k: v for k, v in asdict(c).items()
                   if k not in PredictConfig.NOT_IDENTITY and k != "raw_range"}}

    # -- work -----------------------------------------------------------------------------
    def read_roi(self, block: Block) -> tuple[Roi, tuple, tuple]:
        """Read ROI (nm) and write begin/end (voxels, global grid) of ``block``."""
        w0 = tuple(int(x) for x in (block.write_roi.begin - self.volume_roi.begin) / self.voxel_size)
        w1 = tuple(a + int(s) for a, s in zip(w0, block.write_roi.shape / self.voxel_size))
        r0, r1 = required_read_region(w0, w1, self.patch, self.stride, self.volume_shape)
        roi = Roi(self.volume_roi.begin + Coordinate(r0) * self.voxel_size,
                  Coordinate(b - a for a, b in zip(r0, r1)) * self.voxel_size)
        return roi, w0, w1, r0

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
                   "window": blend_window(self.patch, mode=self.cfg.blend),
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
        w["pending"][block.block_id] = w["src"].read_async(self.read_roi(block)[0])

    def process(self, block: Block, w) -> None:
        roi, w0, w1, r0 = self.read_roi(block)
        fut = w["pending"].pop(block.block_id, None)
        raw = fut.result() if fut is not None else w["src"].read(roi)
        check_raw_values(raw, self.cfg.input, self.raw_range, "predict.raw_range", f" (block {block.block_id})")
        probs = predict_region(w["predictor"], raw, r0, w0, w1, self.patch, self.stride,
                               self.volume_shape, w["window"], batch_size=w["batch_size"],
                               out_channels=self.out_channels, raw_range=self.raw_range,
                               workspace=w["workspace"])
        # probs is a view into the worker's workspace: consumed here
        out = to_uint8(probs, in_place=True) if self.cfg.output_dtype == "uint8" else probs.astype(np.float16)
        w["dst"].write(block.write_roi, out)


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
    yield PredictStep(PredictConfig(**{**asdict(cfg), "input": cfg.input or run.raw,
                                       "output": cfg.output or run.predictions_url,
                                       "roi": cfg.roi if cfg.roi is not None else run.roi,
                                       "work_dir": cfg.work_dir or run.stage_dir("predict"),
                                       "missing_chunks": run.missing_for(cfg)}))


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
