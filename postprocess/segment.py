"""The ``segment`` stage: blockwise synapse instances, exactly stitched connected components.

Connected components of the thresholded union channel (addressed by name: ``union``, else
``cleft``), exactly equal to one global ``cc3d`` labelling (up to the deterministic
renumbering of :mod:`cleftwise.postprocess.cc_stitch`), in three passes — each a
:class:`~cleftwise.blockwise.step.BlockStep` (resumable, any backend):

1. ``segment_label``: per block, cc3d on the write ROI (local labels stand for block-unique
   provisional ids), per-label statistics to ``records/<block>.parquet`` and the block's six
   boundary slices to ``faces/<z>_<y>_<x>.npz`` (sparse); no label volume is written;
2. ``segment_stitch``: per block, its faces and those of its high-side neighbours give the
   one-voxel halo on the high sides → the id pairs that touch across block faces, edges and
   corners (``pairs/<block>.npy``); then, in the driver, union-find over all pairs, statistics
   merged, size filter applied to whole instances, final ids 1..N ordered by each instance's
   first voxel in z-y-x raster order (``mapping.npz``, ``instances.parquet``);
3. ``segment_relabel``: per block, the local labels are recomputed (cc3d is deterministic)
   and their final uint64 ids written to the output label volume.

Positions are voxels of the prediction volume's grid (z, y, x) here; the partners stage
(:mod:`cleftwise.postprocess.partners_step`) turns instances into synapse records in nm.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import itertools
import logging
import os
import threading
import zipfile
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Optional

import numpy as np
from funlib.geometry import Coordinate, Roi

from cleftwise.blockwise.grid import Block
from cleftwise.blockwise.stages import Stage
from cleftwise.blockwise.step import ArraySpec, BlockStep
from cleftwise.storage.atomic import save_npy, save_npz, save_parquet
from cleftwise.storage.volume import open_volume

from cleftwise.postprocess.cc_stitch import (apply_lut, block_faces, block_id_offset, face_equivalences,
                        label_block_local, label_components, local_lut, resolve, union_mask)
from cleftwise.postprocess.errors import PostprocessError

if TYPE_CHECKING:  # pandas is imported where the driver needs it, not by block workers
    import pandas as pd

__all__ = ["SegmentConfig", "DECODINGS", "sides_url", "SegmentLabel", "SegmentStitch", "SegmentRelabel",
           "resolve_segmentation", "segment_passes", "segment_channel", "STAGE"]

log = logging.getLogger(__name__)


@dataclass
class SegmentConfig:
    """Instance segmentation settings. Shapes in voxels (z, y, x)."""

    predictions: str = ""
    """(c, z, y, x) probability volume from the predict step (the pipeline fills it)"""
    output: str = ""
    """final uint64 synapse label volume (the pipeline fills it)"""
    work_dir: str = ""
    """folder for per-block records, faces, pairs and the mapping (the pipeline fills it)"""
    channel: Optional[str] = None
    """prediction channel thresholded for instances, by name; default ``union``, else ``cleft``
    (an exclusive background/pre/post model has neither: name the channel to segment)"""
    threshold: float = 0.5
    """probability threshold on that channel, 0..1"""
    min_peak: Optional[float] = None
    """drop instances whose maximum probability is below this (0..1)"""
    connectivity: int = 26
    """6, 18 or 26"""
    min_size: int = 50
    """drop instances with fewer voxels (judged after stitching)"""
    max_size: Optional[int] = None
    """drop instances with more voxels"""
    block_shape: tuple = (32, 256, 256)
    """write block shape, voxels"""
    missing_chunks: str = "error"
    """never-written chunks of this stage's input volumes: error or zeros; zeros here or in the
    top-level missing_chunks reads them as zeros"""
    decoding: str = "cleftwise"
    """cleftwise (connected components of the thresholded channel; sides decided by the
    partners stage), pytc (PyTorch Connectomics' polarity2instance on pre/post/union: small
    pre/post fragments removed, (1, d, d) dilation, 6-connected labels, voxels on both sides go
    to post; uses threshold and the pytc_* keys; channel, connectivity, min_size, max_size and
    min_peak are unused) or pytc_exclusive (the same on the arg-max of background/pre/post
    softmax channels; needs partners.polarity_mode exclusive). See docs/decoding.md"""
    pytc_small: int = 128
    """pytc decodings: pre and post fragments (6-connected) with fewer voxels are removed
    (PyTC's thres_small)"""
    pytc_dilation: int = 5
    """pytc decodings: the foreground is dilated by a (1, d, d) box before labelling, d odd
    voxels, 1 = none (PyTC's dilate_sz)"""
    pytc_connectivity: int = 6
    """pytc decodings: connectivity of the dilated-foreground labelling, 6, 18 or 26 (PyTC since
    May 2025: 6; before: skimage label, 26)"""
    sides: str = ""
    """pytc decodings: uint8 side volume written beside the labels, 1 pre, 2 post (the pipeline
    fills it: <output>_sides)"""

    #: fields that do not change the output (left out of the job identity)
    NOT_IDENTITY = ("work_dir", "missing_chunks")
    #: fields of the pytc decodings only (left out of the identity of the default decoding)
    PYTC_FIELDS = ("decoding", "pytc_small", "pytc_dilation", "pytc_connectivity", "sides")

    def __post_init__(self):
        if self.connectivity not in (6, 18, 26):
            raise PostprocessError(f"segment: connectivity must be 6, 18 or 26, got {self.connectivity}")
        if not 0.0 <= self.threshold <= 1.0:
            raise PostprocessError(f"segment: threshold must be in [0, 1], got {self.threshold}")
        if self.decoding not in DECODINGS:
            raise PostprocessError(f"segment.decoding must be one of {list(DECODINGS)}, got {self.decoding!r}")
        if self.pytc_connectivity not in (6, 18, 26):
            raise PostprocessError(
                f"segment.pytc_connectivity must be 6, 18 or 26, got {self.pytc_connectivity!r}")
        if isinstance(self.pytc_small, bool) or not isinstance(self.pytc_small, int) or self.pytc_small < 0:
            raise PostprocessError(f"segment.pytc_small must be an integer >= 0 (voxels), got {self.pytc_small!r}")
        d = self.pytc_dilation
        if isinstance(d, bool) or not isinstance(d, int) or d < 1 or d % 2 == 0:
            raise PostprocessError(
                f"segment.pytc_dilation must be an odd integer >= 1 (voxels; an even box has no "
                f"centre voxel), got {d!r}")

    def identity_fields(self) -> dict:
        """The fields that change the output (the pytc keys only with a pytc decoding, so
        default-decoding jobs keep their identity)."""
        skip = self.NOT_IDENTITY + (self.PYTC_FIELDS if self.decoding == "cleftwise" else ())
        return {k: v for k, v in asdict(self).items() if k not in skip}


#: values of SegmentConfig.decoding
DECODINGS = ("cleftwise", "pytc", "pytc_exclusive")


def sides_url(cfg: SegmentConfig) -> str:
    """The side volume of a pytc decoding: ``cfg.sides`` or ``<output>_sides``."""
    return cfg.sides or (cfg.output.rstrip("/") + "_sides")


class _SegmentPass(BlockStep):
    """Shared geometry: blocks tile the prediction volume's ROI; voxel indices are global."""

    def __init__(self, cfg: SegmentConfig):
        for key in ("predictions", "output", "work_dir"):
            if not getattr(cfg, key):
                raise PostprocessError(f"segment: '{key}' is not set")
        self.cfg = cfg
        pred = open_volume(cfg.predictions)
        if pred.num_channels is None:
            raise PostprocessError(
                f"{cfg.predictions}: expected a (c, z, y, x) prediction volume, got shape {pred.shape}")
        self.channel = segment_channel(pred, cfg.channel)
        self.voxel_size = pred.voxel_size
        self.total_roi = pred.roi
        self.volume_shape = tuple(pred.spatial_shape)
        self.write_size = Coordinate(int(b) for b in cfg.block_shape)
        self.work_dir = os.path.abspath(cfg.work_dir)

    @property
    def block(self) -> Coordinate:
        return self.write_size

    def identity(self) -> dict:
        return {"channel_index": self.channel, **self.cfg.identity_fields()}

    def begin_vox(self, roi: Roi) -> tuple:
        return tuple(int(x) for x in (roi.begin - self.total_roi.begin) / self.voxel_size)

    def id_offset(self, block: Block) -> int:
        return block_id_offset(self.begin_vox(block.write_roi), tuple(self.block), self.volume_shape)

    def face_path(self, begin_vox: tuple) -> str:
        """Boundary faces of the block starting at global voxel ``begin_vox`` (z, y, x)."""
        return os.path.join(self.work_dir, "faces", "_".join(str(int(b)) for b in begin_vox) + ".npz")

    def subdir(self, name: str) -> str:
        d = os.path.join(self.work_dir, name)
        os.makedirs(d, exist_ok=True)
        return d


def segment_channel(pred, name: Optional[str]) -> int:
    """Index of the channel to segment in prediction volume ``pred`` (by name; see SegmentConfig)."""
    from cleftwise.storage.errors import StorageError

    names = pred.channel_names or (["pre", "post", "union"] if pred.num_channels == 3 else
                                   ["cleft"] if pred.num_channels == 1 else None)
    if name is None:
        name = "union" if names and "union" in names else "cleft"
    try:
        return pred.channel_index(name, names)
    except StorageError as e:
        raise PostprocessError(f"segment: {e}; set segment.channel to the channel to segment") from e


class SegmentLabel(_SegmentPass):
    """Pass 1: per-block connected components; records and boundary faces, no label volume."""

    name = "segment_label"

    def prepare_scratch(self, fresh: bool) -> None:
        if fresh:
            for sub, ext in (("records", "parquet"), ("faces", "npz"), ("pairs", "npy")):
                for f in glob.glob(os.path.join(self.work_dir, sub, f"*.{ext}")):
                    os.remove(f)

    @contextlib.contextmanager
    def open_worker(self):
        self.subdir("records"), self.subdir("faces")
        yield open_volume(self.cfg.predictions, missing=self.cfg.missing_chunks)

    def process(self, block: Block, pred) -> None:
        c = self.cfg
        union = pred.read(block.write_roi)[self.channel]
        begin = self.begin_vox(block.write_roi)
        offset = self.id_offset(block)
        local, records = label_block_local(union_mask(union, c.threshold), begin,
                                           c.connectivity, id_offset=offset, probs_block=union)
        if union.dtype == np.uint8:  # statistics on the 0..1 probability scale
            records["prob_sum"] /= 255.0
            records["prob_max"] /= 255.0
        save_npz(self.face_path(begin), **block_faces(local, offset))
        save_parquet(records, os.path.join(self.work_dir, "records", f"{block.block_id}.parquet"))


class SegmentStitch(_SegmentPass):
    """Pass 2: equivalences across block boundaries from the stored faces of each block and
    its high-side neighbours (the +1 voxel halo on the high sides); then the resolve."""

    name = "segment_stitch"

    @contextlib.contextmanager
    def open_worker(self):
        self.subdir("pairs")
        yield collections.OrderedDict()  # each block's faces serve 8 blocks: an LRU cache

    def _faces(self, cache: collections.OrderedDict, begin: tuple) -> dict:
        if begin in cache:
            cache.move_to_end(begin)
            return cache[begin]
        path = self.face_path(begin)
        if not os.path.exists(path):
            raise PostprocessError(
                f"segment: faces of the block at voxel {begin} are missing ({path}); "
                f"re-run the segment stage")
        try:
            with np.load(path) as f:
                found = {k: f[k] for k in f.files}
            missing = {"shape", "counts", "idx", "ids"} - set(found)
            if missing:
                raise ValueError(f"arrays {sorted(missing)} are missing")
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise PostprocessError(
                f"segment: faces file {path} is unreadable ({e}); re-run the segment stage "
                f"with overwrite") from e
        cache[begin] = found
        while len(cache) > 1 and sum(a.nbytes for d in cache.values() for a in d.values()) > 128 * 2**20:
            cache.popitem(last=False)  # bounded memory: least recently used faces go first
        return found

    def process(self, block: Block, cache) -> None:
        begin = self.begin_vox(block.write_roi)
        near = []
        for step in itertools.product((0, 1), repeat=3):
            other = tuple(b + d * s for b, d, s in zip(begin, step, self.block))
            if all(o < n for o, n in zip(other, self.volume_shape)):
                near.append((other, self._faces(cache, other)))
        pairs = face_equivalences(begin, tuple(block.write_roi.shape / self.voxel_size), near,
                                  self.cfg.connectivity)
        save_npy(np.asarray(pairs, dtype=np.uint64).reshape(-1, 2),
                    os.path.join(self.work_dir, "pairs", f"{block.block_id}.npy"))

    def finish(self) -> None:
        resolve_segmentation(self)


def resolve_segmentation(step: _SegmentPass) -> pd.DataFrame:
    """Union-find over all pairs → ``mapping.npz`` and ``instances.parquet`` (driver, once)."""
    import pandas as pd  # only the driver's resolve reads records (workers need not)

    c, work = step.cfg, step.work_dir
    rec_files = [os.path.join(work, "records", f"{b.block_id}.parquet") for b in step.blocks()]
    pair_files = [os.path.join(work, "pairs", f"{b.block_id}.npy") for b in step.blocks()]
    missing = [f for f in rec_files + pair_files if not os.path.exists(f)]
    if missing:
        raise PostprocessError(f"segment: {len(missing)} per-block results are missing, e.g. "
                               f"{missing[0]}; re-run the segment stage")

    def read(path, reader):
        try:
            return reader(path)
        except Exception as e:  # truncated/corrupt per-block file: name it
            raise PostprocessError(f"segment: {path} is unreadable ({e}); re-run the segment stage "
                                   f"with overwrite") from e

    records = [read(f, pd.read_parquet) for f in rec_files]
    pairs = [read(f, np.load) for f in pair_files]
    res = resolve(pairs, records, min_size=c.min_size, max_size=c.max_size, min_peak_prob=c.min_peak)
    save_npz(os.path.join(work, "mapping.npz"), provisional=res.provisional_ids,
                final=res.final_ids)
    save_parquet(res.instances, os.path.join(work, "instances.parquet"))
    log.info("segment: %d instances after stitching and size filtering", len(res.instances))
    return res.instances


class SegmentRelabel(_SegmentPass):
    """Pass 3: provisional → final ids, written to the output label volume."""

    name = "segment_relabel"

    def outputs(self) -> list[ArraySpec]:
        return [ArraySpec(self.cfg.output, "uint64", chunk_shape=tuple(self.block),
                          attrs={"cleftwise_step": "segment"})]

    def identity(self) -> dict:
        s = super().identity()
        path = os.path.join(self.work_dir, "mapping.npz")
        if os.path.exists(path):  # a new resolution (e.g. other min_size) invalidates old blocks
            import hashlib

            with open(path, "rb") as f:
                s["mapping_sha256"] = hashlib.sha256(f.read()).hexdigest()
        return s

    @contextlib.contextmanager
    def open_worker(self):
        with np.load(os.path.join(self.work_dir, "mapping.npz")) as m:
            prov, final = m["provisional"], m["final"]
        yield {"prov": prov, "final": final, "pred": open_volume(self.cfg.predictions, missing=self.cfg.missing_chunks),
               "out": open_volume(self.cfg.output, mode="r+"),
               "per_thread": threading.local()}  # a dask worker may run blocks in several threads

    def process(self, block: Block, w) -> None:
        # The local labels of pass 1 are recomputed (cc3d is deterministic) and mapped to the
        # final ids; local_lut checks that the block still has as many labels.
        c = self.cfg
        union = w["pred"].read(block.write_roi)[self.channel]
        mask = union_mask(union, c.threshold)
        local, n = label_components(mask, c.connectivity)
        lut = local_lut(w["prov"], w["final"], self.id_offset(block), n)
        buffers = w["per_thread"].__dict__.setdefault("buffers", {})
        if buffers.get(local.shape) is None:  # reused: no page faults on every block
            buffers[local.shape] = np.empty(local.shape, dtype=np.uint64)
        # the write returns once committed, so the buffer is free for the next block
        w["out"].write(block.write_roi, apply_lut(lut, local, mask, out=buffers[local.shape]))


def segment_passes(cfg: SegmentConfig) -> list:
    """The three passes of the segment stage, in order (a later pass reads an earlier one's
    outputs when it runs, so run them in this order); the pytc decodings' passes
    (:mod:`cleftwise.postprocess.pytc_decoding`) when ``cfg.decoding`` names one."""
    if cfg.decoding != "cleftwise":
        from cleftwise.postprocess.pytc_decoding import pytc_passes

        return pytc_passes(SegmentConfig(**{**asdict(cfg), "sides": sides_url(cfg)}))
    return [SegmentLabel(cfg), SegmentStitch(cfg), SegmentRelabel(cfg)]


def _segment_steps(run, cfg: SegmentConfig):
    return segment_passes(SegmentConfig(**{
        **asdict(cfg), "predictions": cfg.predictions or run.predict.output or run.predictions_url,
        "output": cfg.output or run.labels_url, "work_dir": cfg.work_dir or run.stage_dir("segment"),
        "missing_chunks": run.missing_for(cfg)}))


#: the ``segment`` stage: probabilities → exactly stitched synapse label volume
STAGE = Stage(
    "segment",
    config=SegmentConfig,
    after=("predict",),
    work_dir=lambda run, cfg: cfg.work_dir or run.stage_dir("segment"),
    steps=_segment_steps,
    doc="stitched connected components → label volume <output_dir>/synapses.zarr/labels",
)
