"""The ``classify`` stage: transmitter class (E/I) of every synapse in the DB, blockwise.

Cubes of raw EM centred on each synapse go through a classifier (:mod:`cleftwise.models.classifiers`);
the stage writes ``ei_prob`` (probability that the synapse is excitatory: the summed
probability of the classes whose sign is +1), ``ei_label`` (the predicted class name) and
``classifier`` (which checkpoint said so) back to each synapse record.

How it runs (:class:`ClassifyStep`, a :class:`~cleftwise.blockwise.step.BlockStep`):

1. ``prepare`` (driver, once per job): reads ``id`` and the position columns of every synapse
   from the DB, maps positions (nm) to voxels, checks every synapse lies inside the raw volume
   and assigns it to the one block of the grid that contains its voxel; the assignment is saved
   as ``<work_dir>/index.parquet``;
2. per block (resumable through the ledger): the block's synapses are read from the index,
   the bounding box of their cubes (at most the block grown by half a cube: the context) is
   read from the raw volume in **one** read (zeros outside the volume), the cubes are cut from
   it, classified in batches, and the three fields are written with ``update_fields``. Writes
   are idempotent, so a block re-run after a crash writes the same values again.

Pure helpers used by training too: :func:`positions_to_voxels`, :func:`cut_cubes`,
:func:`read_cubes` (blockwise-local cube reading), :func:`predict_probs` (batched inference
with optional 8-flip test-time augmentation) and :func:`probs_to_labels`.

Positions are nm (z, y, x); a position maps to the voxel containing it,
``floor((p - offset) / voxel_size)``, so voxel-centre positions ``offset + (i + 0.5) · vs``
map to voxel ``i``. A cube of shape ``s`` around voxel ``c`` spans ``[c - s // 2, c - s // 2 + s)``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from funlib.geometry import Coordinate, Roi

from cleftwise.blockwise import crashpoints
from cleftwise.blockwise.grid import Block
from cleftwise.blockwise.sliding_window import normalise_raw, torch_threads
from cleftwise.blockwise.stages import Stage
from cleftwise.postprocess.preflight import check_checkpoint, check_db
from cleftwise.blockwise.step import BlockStep
from cleftwise.models import classifiers as _classifiers  # noqa: F401  (registers the classifier families)
from cleftwise.models.checkpoint import CheckpointMeta, load_model, read_checkpoint_meta, resolve_device
from cleftwise.models.classifiers import prepare_input, use_fast_memory_format
from cleftwise.models.errors import ModelError
from cleftwise.storage.db.urls import redact
from cleftwise.storage.errors import StorageError
from cleftwise.storage.volume import Volume, open_volume

from cleftwise.postprocess.errors import PostprocessError
from cleftwise.postprocess.predict import check_raw_values, checked_raw_range

__all__ = ["ClassifyConfig", "ClassifyStep", "ClassifierInfo", "classifier_info",
           "positions_to_voxels", "check_inside", "cube_box", "cut_cubes", "read_cubes",
           "read_cube", "predict_probs", "probs_to_labels", "positive_prob", "classify_table",
           "FLIPS", "STAGE"]

log = logging.getLogger(__name__)

#: the 8 flip combinations (axes of a (z, y, x) cube) used for test-time augmentation
FLIPS: tuple = ((), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2))


# ------------------------------------------------------------------------------------------
# geometry (pure)
# ------------------------------------------------------------------------------------------

def positions_to_voxels(positions_nm: np.ndarray, offset_nm: Sequence[float],
                        voxel_size_nm: Sequence[float]) -> np.ndarray:
    """Voxel index (n, 3) int64 of the voxel containing each position (n, 3) nm, axes (z, y, x).

    ``floor((p - offset) / voxel_size)``; positions at voxel centres map to that voxel.
    """
    p = np.asarray(positions_nm, dtype=np.float64).reshape(-1, 3)
    if not np.isfinite(p).all():
        raise PostprocessError(f"{int((~np.isfinite(p).all(axis=1)).sum())} synapse positions are NaN/inf")
    off = np.asarray(offset_nm, dtype=np.float64).reshape(1, 3)
    vs = np.asarray(voxel_size_nm, dtype=np.float64).reshape(1, 3)
    return np.floor((p - off) / vs).astype(np.int64)


def check_inside(voxels: np.ndarray, volume_shape: Sequence[int], ids: Optional[np.ndarray] = None,
                 where: str = "volume", error: type = PostprocessError) -> None:
    """Raise ``error`` naming the first synapses whose voxel (n, 3) lies outside ``volume_shape``."""
    v = np.asarray(voxels).reshape(-1, 3)
    shape = np.asarray(volume_shape, dtype=np.int64).reshape(1, 3)
    bad = np.flatnonzero(((v < 0) | (v >= shape)).any(axis=1))
    if len(bad):
        names = [str(ids[i]) if ids is not None else f"#{i}" for i in bad[:5]]
        raise error(f"{len(bad)} synapse(s) lie outside {where} of shape {tuple(int(s) for s in volume_shape)} "
                    f"voxels, e.g. id(s) {', '.join(names)} at voxel(s) {v[bad[:5]].tolist()}")


def cube_box(centers_vox: np.ndarray, cube_shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(begin, end) voxel corners (n, 3) of the cubes around ``centers_vox``: begin = c - s // 2."""
    s = np.asarray(cube_shape, dtype=np.int64).reshape(1, 3)
    begin = np.asarray(centers_vox, dtype=np.int64).reshape(-1, 3) - s // 2
    return begin, begin + s


def cut_cubes(region: np.ndarray, region_begin_vox: Sequence[int], centers_vox: np.ndarray,
              cube_shape: Sequence[int]) -> np.ndarray:
    """Cubes (n, *cube_shape) cut from ``region`` (z, y, x) whose voxel (0, 0, 0) is ``region_begin_vox``.

    Every cube must lie inside the region (PostprocessError otherwise); the result is a copy
    with ``region``'s dtype, in the order of ``centers_vox``.
    """
    cs = tuple(int(c) for c in cube_shape)
    begin, end = cube_box(centers_vox, cs)
    rel = begin - np.asarray(region_begin_vox, dtype=np.int64).reshape(1, 3)
    if len(rel) == 0:
        return np.zeros((0,) + cs, dtype=region.dtype)
    if (rel < 0).any() or (rel + np.asarray(cs) > np.asarray(region.shape)).any():
        raise PostprocessError(f"cut_cubes: cubes {cs} around {len(rel)} centres do not fit in the region of "
                               f"shape {region.shape} starting at voxel {tuple(region_begin_vox)}")
    windows = np.lib.stride_tricks.sliding_window_view(region, cs)
    return np.ascontiguousarray(windows[rel[:, 0], rel[:, 1], rel[:, 2]])


def _voxel_roi(begin_vox: Sequence[int], end_vox: Sequence[int], volume: Volume) -> Roi:
    vs = volume.voxel_size
    b = Coordinate(int(x) for x in begin_vox)
    e = Coordinate(int(x) for x in end_vox)
    return Roi(volume.offset + b * vs, (e - b) * vs)


def read_cube(volume: Volume, center_vox: Sequence[int], cube_shape: Sequence[int]) -> np.ndarray:
    """One cube (z, y, x) around ``center_vox`` by its own read (zeros outside the volume)."""
    begin, end = cube_box(np.asarray(center_vox).reshape(1, 3), cube_shape)
    return volume.read(_voxel_roi(begin[0], end[0], volume), fill_outside=True)


def read_cubes(volume: Volume, centers_vox: np.ndarray, cube_shape: Sequence[int],
               block_shape: Sequence[int] = (64, 512, 512)) -> np.ndarray:
    """Cubes (n, *cube_shape) around ``centers_vox`` (n, 3) from ``volume``, in input order.

    Blockwise-local: centres are grouped by the block (``block_shape`` voxels, grid anchored at
    voxel 0) that contains them; for each block the bounding box of its cubes (inside the block
    grown by half a cube) is read once (zeros outside the volume) and the cubes are cut from it.
    """
    if volume.num_channels is not None:
        raise PostprocessError(f"{volume.url}: raw volume must be (z, y, x), got shape {volume.shape}")
    c = np.asarray(centers_vox, dtype=np.int64).reshape(-1, 3)
    cs = tuple(int(x) for x in cube_shape)
    out = np.zeros((len(c),) + cs, dtype=volume.dtype)
    if len(c) == 0:
        return out
    bs = np.asarray(block_shape, dtype=np.int64).reshape(1, 3)
    blk = np.floor_divide(c, bs)
    keys = np.unique(blk, axis=0, return_inverse=True)[1].reshape(-1)
    order = np.argsort(keys, kind="stable")
    bounds = np.flatnonzero(np.diff(keys[order])) + 1
    for group in np.split(order, bounds):
        begin, end = cube_box(c[group], cs)
        lo, hi = begin.min(axis=0), end.max(axis=0)
        region = volume.read(_voxel_roi(lo, hi, volume), fill_outside=True)
        out[group] = cut_cubes(region, lo, c[group], cs)
    return out


# ------------------------------------------------------------------------------------------
# inference (pure torch)
# ------------------------------------------------------------------------------------------

@torch.no_grad()
def predict_probs(model: torch.nn.Module, cubes: np.ndarray, batch_size: int = 32,
                  device: Any = "cpu", tta: bool = False, amp: bool = False) -> np.ndarray:
    """Class probabilities (n, num_classes) float64 of cubes (n, z, y, x) (uint8 or [0, 1] float).

    ``tta``: average the softmax over the 8 flip combinations of (z, y, x) (:data:`FLIPS`).
    ``amp``: bf16 autocast (CUDA only). The model is put in eval mode (so a sample's output
    does not depend on its batch). A short batch is padded with zero cubes to the next power of
    two (at most ``batch_size``), so only a few batch shapes ever occur: the CPU (oneDNN) and
    GPU backends plan kernels per shape, which costs more than the padding.
    """
    model.eval()
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    flips = FLIPS if tta else ((),)
    n = len(cubes)
    batch_size = max(1, int(batch_size))
    out = np.zeros((n, 0), dtype=np.float64)
    chunks = []
    for a in range(0, n, batch_size):
        part = cubes[a:a + batch_size]
        m = len(part)
        size = min(batch_size, 1 << (m - 1).bit_length())
        if size > m:
            part = np.concatenate([part, np.zeros((size - m,) + part.shape[1:], part.dtype)])
        x = use_fast_memory_format(model, prepare_input(part, dev))
        acc = None
        for f in flips:
            xf = torch.flip(x, dims=[d + 2 for d in f]) if f else x
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and dev.type == "cuda"):
                logits = model(xf)
            p = torch.softmax(logits.float(), dim=1).double()
            acc = p if acc is None else acc + p
        chunks.append((acc / len(flips)).cpu().numpy()[:m])
    if chunks:
        out = np.concatenate(chunks, axis=0)
    return out


def positive_prob(probs: np.ndarray, signs: Sequence[int]) -> np.ndarray:
    """p(excitatory) (n,): summed probability (n, C) of the classes whose sign is +1."""
    s = np.asarray(signs)
    return np.asarray(probs)[:, s > 0].sum(axis=1)


def probs_to_labels(probs: np.ndarray, threshold: Optional[float] = None) -> np.ndarray:
    """Predicted class index (n,): with 2 classes and ``threshold`` τ, class 0 iff p0 ≥ τ; else argmax."""
    p = np.asarray(probs)
    if threshold is not None and p.shape[1] == 2:
        return np.where(p[:, 0] >= threshold, 0, 1).astype(np.int64)
    return p.argmax(axis=1).astype(np.int64)


# ------------------------------------------------------------------------------------------
# checkpoint → what the stage needs
# ------------------------------------------------------------------------------------------

@dataclass
class ClassifierInfo:
    """A classifier checkpoint's data contract (from its JSON ``extra``)."""

    classes: tuple
    """class names, in logit order"""
    signs: tuple
    """+1 (excitatory) / -1 (inhibitory) / 0 per class"""
    cube_shape: tuple
    """(z, y, x) voxels of the input cube"""
    voxel_size: tuple
    """(z, y, x) nm the model was trained at"""
    threshold: Optional[float]
    """τ on p(class 0) chosen on validation (2 classes), or None = argmax"""
    name: str
    """value written to the ``classifier`` field"""


def classifier_info(meta: CheckpointMeta, name: Optional[str] = None) -> ClassifierInfo:
    """Read classes, signs, cube shape and τ from a classifier checkpoint's metadata."""
    ex = meta.extra or {}
    where = f"checkpoint {meta.json_path}"
    classes = tuple(str(c) for c in ex.get("classes") or ())
    if not classes:
        raise PostprocessError(f"{where}: extra.classes is missing; not a cleftwise classifier checkpoint")
    num_classes = getattr(meta.config, "num_classes", None)
    if num_classes != len(classes):
        raise PostprocessError(f"{where}: {len(classes)} classes {list(classes)} but the model has "
                               f"{num_classes} outputs")
    sign_map = ex.get("class_signs") or {}
    try:
        signs = tuple(int(sign_map[c]) for c in classes)
    except KeyError as e:
        raise PostprocessError(f"{where}: extra.class_signs has no sign for class {e}") from e
    cube = tuple(int(v) for v in ex.get("cube_shape") or getattr(meta.config, "input_shape", None) or ())
    if len(cube) != 3:
        raise PostprocessError(f"{where}: extra.cube_shape is missing")
    model_shape = getattr(meta.config, "input_shape", None)
    if model_shape is not None and tuple(model_shape) != cube:
        raise PostprocessError(f"{where}: cube_shape {cube} differs from the model's input_shape {tuple(model_shape)}")
    thr = ex.get("threshold")
    return ClassifierInfo(classes, signs, cube, tuple(meta.voxel_size),
                          None if thr is None else float(thr),
                          name or f"{meta.model_type}:{meta.weights_sha256[:12]}")


# ------------------------------------------------------------------------------------------
# synapse DB adapter
# ------------------------------------------------------------------------------------------

def _open_db(url: str):
    try:
        from cleftwise.storage.db import open_store
    except ImportError as e:  # pragma: no cover - the DB module ships with cleftwise
        raise PostprocessError(f"synapse DB support is unavailable: {e}") from e
    try:
        return open_store(url)
    except StorageError as e:
        raise PostprocessError(f"synapse DB {redact(url)}: {redact(str(e))}") from e


def _query_positions(store, url: str, columns: Sequence[str]) -> pd.DataFrame:
    try:
        df = store.query(columns=list(columns))
    except StorageError as e:
        raise PostprocessError(f"synapse DB {redact(url)}: {redact(str(e))}") from e
    missing = [c for c in ("id", *columns) if c not in df.columns]
    if missing:
        raise PostprocessError(f"synapse DB {redact(url)}: records lack columns {missing}")
    return df[["id", *columns]].reset_index(drop=True)


# ------------------------------------------------------------------------------------------
# the stage
# ------------------------------------------------------------------------------------------

@dataclass
class ClassifyConfig:
    """Settings of the classify stage. Shapes are voxels (z, y, x)."""

    raw: str = ""
    """raw EM volume URL (z, y, x), the one the synapses were detected in (the pipeline fills it)"""
    raw_range: Optional[tuple] = None
    """[low, high] raw intensities mapped to 0..1 (checked on every cube region read); default
    0–255 for uint8, 0–1 for float32; required for any other dtype (uint16, int8, …)"""
    db: str = ""
    """synapse DB URL, e.g. sqlite:///out/synapses.db (the pipeline fills it)"""
    checkpoint: str = ""
    """classifier checkpoint (.pt or .json) written by train/train_classifier.py"""
    work_dir: str = ""
    """folder for the synapse→block index and the ledger (the pipeline fills it)"""
    block_shape: tuple = (64, 512, 512)
    """block shape in voxels; each block reads its synapses' cubes in one read"""
    position_columns: tuple = ("z", "y", "x")
    """record columns (nm) the cubes are centred on"""
    batch_size: int = 32
    """cubes per forward pass"""
    device: str = "auto"
    """auto (CUDA when present), cpu or cuda"""
    amp: bool = True
    """bf16 autocast on CUDA (ignored on CPU)"""
    tta: bool = False
    """average over the 8 flips of the cube (8× slower)"""
    threshold: Optional[float] = None
    """τ on p(class 0) for two classes; None = the checkpoint's validated τ (argmax if it has none)"""
    classifier_name: Optional[str] = None
    """value of the ``classifier`` field; default '<model_type>:<first 12 of the weights sha256>'"""
    torch_threads: int = 0
    """torch CPU threads per worker (0 = torch default)"""
    missing_chunks: str = "error"
    """never-written chunks of this stage's input volumes: error or zeros; zeros here or in the
    top-level missing_chunks reads them as zeros"""

    def __post_init__(self) -> None:
        if len(tuple(self.block_shape)) != 3 or any(int(b) < 1 for b in self.block_shape):
            raise PostprocessError(f"classify.block_shape must be 3 positive voxel counts, got {list(self.block_shape)}")
        if len(tuple(self.position_columns)) != 3:
            raise PostprocessError(f"classify: position_columns must name 3 columns (z, y, x), "
                                   f"got {self.position_columns}")
        if self.raw_range is not None:
            checked_raw_range(self.raw or "classify", "float32", self.raw_range, "classify.raw_range")
        if int(self.batch_size) < 1:
            raise PostprocessError(f"classify: batch_size must be >= 1, got {self.batch_size}")
        if self.threshold is not None and not 0.0 <= float(self.threshold) <= 1.0:
            raise PostprocessError(f"classify: threshold must lie in [0, 1], got {self.threshold}")


def _checked_setup(cfg: ClassifyConfig) -> tuple[Volume, CheckpointMeta, ClassifierInfo]:
    for key in ("raw", "db", "checkpoint"):
        if not getattr(cfg, key):
            raise PostprocessError(f"classify: '{key}' is not set")
    try:
        raw = open_volume(cfg.raw, missing=cfg.missing_chunks)
    except StorageError as e:
        raise PostprocessError(f"classify: cannot open raw volume: {e}") from e
    if raw.num_channels is not None:
        raise PostprocessError(f"{cfg.raw}: raw volume must be (z, y, x), got shape {raw.shape}")
    try:
        meta = read_checkpoint_meta(cfg.checkpoint)
    except ModelError as e:
        raise PostprocessError(f"classify: {e}") from e
    info = classifier_info(meta, cfg.classifier_name)
    if tuple(int(v) for v in raw.voxel_size) != tuple(int(v) for v in info.voxel_size):
        raise PostprocessError(f"classify: raw volume {cfg.raw} has voxel size {tuple(raw.voxel_size)} nm but "
                               f"checkpoint {cfg.checkpoint} was trained at {info.voxel_size} nm")
    return raw, meta, info


def _model_input(region: np.ndarray, begin_vox: np.ndarray, volume_shape: Sequence[int], url: str,
                 raw_range: tuple, where: str = "") -> np.ndarray:
    """A raw region (z, y, x) read with zeros outside the volume → float32 model input: the part
    inside the volume is checked against ``raw_range`` and scaled to 0..1 (:func:`normalise_raw`),
    the part outside is 0."""
    b = np.asarray(begin_vox, dtype=np.int64).reshape(3)
    inside = tuple(slice(max(0, -int(o)), max(0, min(int(n), int(s) - int(o))))
                   for o, n, s in zip(b, region.shape, volume_shape))
    check_raw_values(region[inside], url, raw_range, "classify.raw_range", where)
    out = normalise_raw(region, raw_range)
    if any(sl.start > 0 or sl.stop < n for sl, n in zip(inside, region.shape)):
        kept = out[inside].copy()
        out[...] = 0.0
        out[inside] = kept
    return out


def _threshold(cfg: ClassifyConfig, info: ClassifierInfo) -> Optional[float]:
    return float(cfg.threshold) if cfg.threshold is not None else info.threshold


def _result_frame(ids: np.ndarray, probs: np.ndarray, info: ClassifierInfo,
                  threshold: Optional[float]) -> pd.DataFrame:
    labels = probs_to_labels(probs, threshold)
    return pd.DataFrame({"id": np.asarray(ids, dtype=np.int64),
                         "ei_prob": positive_prob(probs, info.signs).astype(np.float64),
                         "ei_label": np.asarray(info.classes, dtype=object)[labels],
                         "classifier": info.name})


def _load(cfg: ClassifyConfig):
    device = resolve_device(cfg.device)
    try:
        model, meta = load_model(cfg.checkpoint, device=device)
    except ModelError as e:
        raise PostprocessError(f"classify: {e}") from e
    return model, device


class ClassifyStep(BlockStep):
    """Blockwise E/I classification of the synapses in the DB (see module docstring)."""

    name = "classify"

    #: settings that do not change the written fields (left out of the job identity, so a job
    #: can resume on other hardware)
    NOT_IDENTITY = ("device", "batch_size", "torch_threads", "work_dir", "db", "missing_chunks")

    def __init__(self, cfg: ClassifyConfig):
        if not cfg.work_dir:
            raise PostprocessError("classify: 'work_dir' is not set")
        self.cfg = cfg
        raw, meta, info = _checked_setup(cfg)
        self.info = info
        self.raw_range = checked_raw_range(cfg.raw, raw.dtype, cfg.raw_range, "classify.raw_range")
        self.weights_sha256 = meta.weights_sha256
        self.voxel_size = raw.voxel_size
        self.total_roi = raw.roi
        self.volume_shape = tuple(int(s) for s in raw.spatial_shape)
        self.write_size = Coordinate(int(b) for b in cfg.block_shape)
        self.context = Coordinate(int(s) // 2 for s in info.cube_shape)  # half a cube
        self.work_dir = os.path.abspath(cfg.work_dir)
        self.index_path = os.path.join(self.work_dir, "index.parquet")

    @property
    def block(self) -> Coordinate:
        return self.write_size

    def identity(self) -> dict:
        """What changes the written fields, plus the DB's record count (a DB that gained or lost
        records since the job started must be re-classified). The DB URL is stored redacted."""
        # raw_range only when set, so jobs started before the setting existed resume
        s = {k: v for k, v in asdict(self.cfg).items()
             if k not in self.NOT_IDENTITY and (k != "raw_range" or v is not None)}
        with contextlib.closing(_open_db(self.cfg.db)) as store:
            try:
                n = store.count()
            except StorageError as e:
                raise PostprocessError(f"synapse DB {redact(self.cfg.db)}: {e}") from e
        return {**s, "db": redact(self.cfg.db), "weights_sha256": self.weights_sha256,
                "threshold_used": _threshold(self.cfg, self.info), "db_records": int(n)}

    def block_ids_of(self, voxels: np.ndarray) -> np.ndarray:
        """Block id (n,) of the block containing each voxel (n, 3) (raster order, as plan_blocks)."""
        grid = tuple(int(-(-s // b)) for s, b in zip(self.volume_shape, self.block))
        idx = np.floor_divide(voxels, np.asarray(self.block).reshape(1, 3))
        return np.ravel_multi_index(tuple(idx.T), grid).astype(np.int64)

    def build_index(self) -> pd.DataFrame:
        """Every synapse's id, voxel and block id (checked inside the raw volume); saved atomically."""
        cols = list(self.cfg.position_columns)
        with contextlib.closing(_open_db(self.cfg.db)) as store:
            df = _query_positions(store, self.cfg.db, cols)
        vox = positions_to_voxels(df[cols].to_numpy(np.float64), self.total_roi.begin, self.voxel_size)
        check_inside(vox, self.volume_shape, df["id"].to_numpy(), where=f"raw volume {self.cfg.raw}")
        index = pd.DataFrame({"id": df["id"].to_numpy(np.int64), "vz": vox[:, 0], "vy": vox[:, 1],
                              "vx": vox[:, 2], "block_id": self.block_ids_of(vox)})
        os.makedirs(self.work_dir, exist_ok=True)
        tmp = f"{self.index_path}.tmp{os.getpid()}"
        index.to_parquet(tmp, index=False)
        os.replace(tmp, self.index_path)
        log.info("classify: %d synapses in %d of %d blocks", len(index), index["block_id"].nunique(),
                 len(self.blocks()))
        return index

    def prepare_scratch(self, fresh: bool) -> None:
        if fresh or not os.path.exists(self.index_path):
            self.build_index()

    @contextlib.contextmanager
    def open_worker(self) -> Iterator:
        # No DB connection is held here: a backend may open this context in one thread and close
        # it in another (dask runs blocks in its executor thread and closes contexts from its
        # event loop), and an SQLite connection may only be used and closed by the thread that
        # opened it. Each block opens, writes and closes its own connection (see process).
        with torch_threads(self.cfg.torch_threads):
            model, device = _load(self.cfg)
            index = pd.read_parquet(self.index_path)
            raw = open_volume(self.cfg.raw, missing=self.cfg.missing_chunks)
            yield {"model": model, "device": device, "raw": raw,
                   "groups": {int(k): g for k, g in index.groupby("block_id", sort=False)},
                   "threshold": _threshold(self.cfg, self.info)}

    def process(self, block: Block, w) -> None:
        cfg = self.cfg
        g = w["groups"].get(int(block.block_id))
        if g is None or len(g) == 0:
            return
        raw = w["raw"]
        vox = g[["vz", "vy", "vx"]].to_numpy(np.int64)
        begin, end = cube_box(vox, self.info.cube_shape)
        lo, hi = begin.min(axis=0), end.max(axis=0)
        if not block.read_roi.contains(_voxel_roi(lo, hi, raw)):
            raise PostprocessError(f"classify: block {block.block_id}: cubes reach outside its read ROI "
                                   f"{block.read_roi} (index out of date? re-run with overwrite)")
        region = raw.read(_voxel_roi(lo, hi, raw), fill_outside=True)
        region = _model_input(region, lo, self.volume_shape, cfg.raw, self.raw_range,
                              f" (block {block.block_id})")
        cubes = cut_cubes(region, lo, vox, self.info.cube_shape)
        probs = predict_probs(w["model"], cubes, cfg.batch_size, w["device"], cfg.tta, cfg.amp)
        result = _result_frame(g["id"].to_numpy(), probs, self.info, w["threshold"])
        try:
            with contextlib.closing(_open_db(cfg.db)) as store:  # opened and closed in this thread
                store.update_fields(result, fields=["ei_prob", "ei_label", "classifier"])
        except StorageError as e:
            raise PostprocessError(f"classify: block {block.block_id}: DB update failed: {e}") from e
        crashpoints.hit("db_updated", self.name)

    def drop_outputs(self) -> None:
        super().drop_outputs()
        if os.path.exists(self.index_path):
            os.remove(self.index_path)


def classify_table(cfg: ClassifyConfig, synapses: Optional[pd.DataFrame] = None) -> pd.DataFrame:
    """One-shot, non-blockwise classification: one read per synapse, one model pass over all.

    ``synapses`` (id + position columns, nm) defaults to every record of ``cfg.db``. Returns
    ``id, ei_prob, ei_label, classifier`` without writing anything. For small tables and as the
    reference the blockwise stage is tested against.
    """
    raw, meta, info = _checked_setup(cfg)
    cols = list(cfg.position_columns)
    if synapses is None:
        with contextlib.closing(_open_db(cfg.db)) as store:
            synapses = _query_positions(store, cfg.db, cols)
    vox = positions_to_voxels(synapses[cols].to_numpy(np.float64), raw.roi.begin, raw.voxel_size)
    check_inside(vox, tuple(raw.spatial_shape), synapses["id"].to_numpy(), where=f"raw volume {cfg.raw}")
    raw_range = checked_raw_range(cfg.raw, raw.dtype, cfg.raw_range, "classify.raw_range")
    shape = tuple(raw.spatial_shape)
    cubes = np.stack([_model_input(read_cube(raw, v, info.cube_shape), cube_box(v, info.cube_shape)[0],
                                   shape, cfg.raw, raw_range) for v in vox]) if len(vox) else \
        np.zeros((0,) + info.cube_shape, np.float32)
    with torch_threads(cfg.torch_threads):
        model, device = _load(cfg)
        probs = predict_probs(model, cubes, cfg.batch_size, device, cfg.tta, cfg.amp)
    return _result_frame(synapses["id"].to_numpy(), probs, info, _threshold(cfg, info))


def _classify_steps(run, cfg: ClassifyConfig):
    yield ClassifyStep(ClassifyConfig(**{**asdict(cfg), "raw": cfg.raw or run.raw, "db": cfg.db or run.db_url,
                                         "work_dir": cfg.work_dir or run.stage_dir("classify"),
                                         "missing_chunks": run.missing_for(cfg)}))


def _classify_skip(run, cfg: ClassifyConfig) -> Optional[str]:
    if not cfg.checkpoint:
        return "no classifier checkpoint (classify.checkpoint); neurons will have no E/I sign"
    return None


def _classify_preflight(run, cfg: ClassifyConfig) -> None:
    check_checkpoint("classify", cfg.checkpoint, cfg.raw or run.raw)
    check_db(cfg.db or run.db_url)


#: the ``classify`` stage: E/I of every synapse in the DB
STAGE = Stage(
    "classify",
    config=ClassifyConfig,
    after=("partners",),
    work_dir=lambda run, cfg: cfg.work_dir or run.stage_dir("classify"),
    steps=_classify_steps,
    skip=_classify_skip,
    preflight=_classify_preflight,
    doc="E/I class of every synapse in the DB, from EM cubes around it",
)
