"""Blockwise synapse instances: exact stitched connected components, polarity and partners.

Stages, each a :class:`~blockwise.task.BlockTask` (resumable, any backend):

``segment`` — connected components of the thresholded union channel, exactly equal to one
global ``cc3d`` labelling (up to the deterministic renumbering of
:mod:`cleftwise.postprocess.cc_stitch`):

1. ``segment_label``: per block, cc3d on the write ROI (local labels stand for block-unique
   provisional ids), per-label statistics to ``records/<block>.parquet`` and the block's six
   boundary slices to ``faces/<z>_<y>_<x>.npz`` (sparse); no label volume is written;
2. ``segment_stitch``: per block, its faces and those of its high-side neighbours give the
   one-voxel halo on the high sides → the id pairs that touch across block faces, edges and
   corners (``pairs/<block>.npy``);
3. resolve (driver): union-find over all pairs, statistics merged, size filter applied to
   whole instances, final ids 1..N ordered by each instance's first voxel in z-y-x raster
   order (``mapping.npz``, ``instances.parquet``);
4. ``segment_relabel``: per block, the local labels are recomputed (cc3d is deterministic)
   and their final uint64 ids written to the output label volume.

``partners`` — per block (with context for the optional side dilation): pre/post side of each
voxel (PyTorch Connectomics polarity rules, :mod:`cleftwise.postprocess.polarity`), partial polarity
sums and neuron votes (:mod:`cleftwise.postprocess.partners`); merged in the driver into one record per
synapse (``synapses.parquet``: centroid, bbox, size, scores, pre/post sites, partner neurons
and confidences, flags), the table the synapse DB stores.

All positions in records are nm at voxel centres: ``offset + (index + 0.5) * voxel_size``;
bboxes are nm, half-open ``[begin, end)``.
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
from typing import Optional

import numpy as np
import pandas as pd
from funlib.geometry import Coordinate, Roi

from cleftwise.blockwise.grid import Block, plan_blocks
from cleftwise.blockwise.task import BlockTask
from cleftwise.storage.volume import create_volume, open_volume

from cleftwise.postprocess.cc_stitch import (apply_lut, block_faces, block_id_offset, face_equivalences,
                        label_block_local, label_components, local_lut, resolve, union_mask)
from cleftwise.postprocess.errors import PostprocessError
from cleftwise.postprocess.partners import dilation_radius_voxels, merge_partner_votes, partner_votes_block
from cleftwise.postprocess.polarity import assign_sides, merge_polarity_stats, polarity_stats_block

__all__ = ["SegmentConfig", "SegmentLabelTask", "SegmentStitchTask", "SegmentRelabelTask",
           "PartnersTask", "resolve_segmentation", "segment_tasks", "synapse_table"]

log = logging.getLogger(__name__)

#: synapse records whose pre + post neuron votes fall for more than this share on one neuron
#: get the flag ``one_neuron`` (see SegmentConfig.max_neuron_fraction)
ONE_NEURON_FLAG = 0.9


@dataclass
class SegmentConfig:
    """Instance segmentation and partner assignment settings. Shapes in voxels (z, y, x)."""

    predictions: str = ""
    """(c, z, y, x) probability volume from the predict step (the pipeline fills it)"""
    output: str = ""
    """final uint64 synapse label volume (the pipeline fills it)"""
    work_dir: str = ""
    """folder for per-block records, pairs, mapping and tables (the pipeline fills it)"""
    neurons: Optional[str] = None
    """uint64 neuron segmentation on the same voxel grid (for partners); optional"""
    union_channel: int = 2
    """channel thresholded for instances: 2 = union of a (pre, post, union) model, 0 = cleft"""
    threshold: float = 0.5
    """probability threshold on the union channel, 0..1"""
    min_peak: Optional[float] = None
    """drop instances whose maximum union probability is below this (0..1)"""
    connectivity: int = 26
    """6, 18 or 26"""
    min_size: int = 50
    """drop instances with fewer voxels (judged after stitching)"""
    max_size: Optional[int] = None
    """drop instances with more voxels"""
    block_shape: tuple = (32, 256, 256)
    """write block shape, voxels"""
    polarity_mode: str = "nonexclusive"
    """nonexclusive (pre, post, union sigmoids) or exclusive (softmax bg/pre/post)"""
    side_threshold: float = 0.5
    """threshold of the pre/post channels (nonexclusive), 0..1"""
    side_rule: str = "threshold"
    """threshold (PyTC) or argmax"""
    dilate_nm: float = 0.0
    """grow each side by this many nm before voting for its neuron (reach past the cleft)"""
    max_neuron_fraction: Optional[float] = None
    """with neurons: drop detections whose pre + post votes fall for more than this share
    (0..1) on one neuron — a synapse joins two neurons, an intracellular look-alike such as a
    mitochondrion lies in one. They stay in the label volume, not in the synapse table. None
    keeps them (flagged ``one_neuron`` above 0.9)"""
    partner_rule: str = "majority"
    """majority (per side, the neuron with most votes; PyTorch Connectomics) or contrast (the
    neuron with the largest surplus of pre over post votes vs the one with the largest surplus of
    post over pre votes; see postprocess.partners)"""

    def __post_init__(self):
        if self.max_neuron_fraction is not None and not 0.0 < float(self.max_neuron_fraction) <= 1.0:
            raise PostprocessError(
                f"segment.max_neuron_fraction must be in (0, 1] or null, got {self.max_neuron_fraction!r}")
        if self.partner_rule not in ("majority", "contrast"):
            raise PostprocessError(f"segment.partner_rule must be 'majority' or 'contrast', got {self.partner_rule!r}")


def _atomic_parquet(df: pd.DataFrame, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def _atomic_npy(arr: np.ndarray, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}.npy"
    np.save(tmp, arr)
    os.replace(tmp, path)


def _atomic_npz(path: str, **arrays: np.ndarray) -> None:
    tmp = f"{path}.tmp{os.getpid()}.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


class _SegmentStep(BlockTask):
    """Shared geometry: blocks tile the prediction volume's ROI; voxel indices are global."""

    def __init__(self, cfg: SegmentConfig):
        for key in ("predictions", "output", "work_dir"):
            if not getattr(cfg, key):
                raise PostprocessError(f"segment: '{key}' is not set")
        if cfg.connectivity not in (6, 18, 26):
            raise PostprocessError(f"segment: connectivity must be 6, 18 or 26, got {cfg.connectivity}")
        if not 0.0 <= cfg.threshold <= 1.0:
            raise PostprocessError(f"segment: threshold must be in [0, 1], got {cfg.threshold}")
        self.cfg = cfg
        pred = open_volume(cfg.predictions)
        if pred.num_channels is None or cfg.union_channel >= pred.num_channels:
            raise PostprocessError(
                f"{cfg.predictions}: expected a (c, z, y, x) prediction volume with channel "
                f"{cfg.union_channel}, got shape {pred.shape}")
        self.voxel_size = pred.voxel_size
        self.roi = pred.roi
        self.volume_shape = tuple(pred.spatial_shape)
        self.num_channels = pred.num_channels
        self.block = Coordinate(int(b) for b in cfg.block_shape)
        self._blocks = plan_blocks(self.roi, self.block * self.voxel_size, (0, 0, 0),
                                   self.block * self.voxel_size, self.voxel_size)
        self.work = os.path.abspath(cfg.work_dir)

    def blocks(self) -> list[Block]:
        return self._blocks

    def settings(self) -> dict:
        return {"step": self.name, **asdict(self.cfg)}

    def ledger_path(self) -> str:
        return os.path.join(self.work, "ledger", self.name)

    def begin_vox(self, roi: Roi) -> tuple:
        return tuple(int(x) for x in (roi.begin - self.roi.begin) / self.voxel_size)

    def id_offset(self, block: Block) -> int:
        return block_id_offset(self.begin_vox(block.write_roi), tuple(self.block), self.volume_shape)

    def face_path(self, begin_vox: tuple) -> str:
        """Boundary faces of the block starting at global voxel ``begin_vox`` (z, y, x)."""
        return os.path.join(self.work, "faces", "_".join(str(int(b)) for b in begin_vox) + ".npz")

    def subdir(self, name: str) -> str:
        d = os.path.join(self.work, name)
        os.makedirs(d, exist_ok=True)
        return d


class SegmentLabelTask(_SegmentStep):
    """Pass 1: per-block connected components; records and boundary faces, no label volume."""

    name = "segment_label"

    def prepare(self, fresh: bool) -> None:
        if fresh:
            for sub, ext in (("records", "parquet"), ("faces", "npz"), ("pairs", "npy")):
                for f in glob.glob(os.path.join(self.work, sub, f"*.{ext}")):
                    os.remove(f)

    @contextlib.contextmanager
    def worker(self):
        pred = open_volume(self.cfg.predictions)
        rec_dir, face_dir = self.subdir("records"), self.subdir("faces")
        c = self.cfg

        def process(block: Block) -> None:
            union = pred.read(block.write_roi)[c.union_channel]
            begin = self.begin_vox(block.write_roi)
            offset = self.id_offset(block)
            local, records = label_block_local(union_mask(union, c.threshold), begin,
                                               c.connectivity, id_offset=offset, probs_block=union)
            if union.dtype == np.uint8:  # statistics on the 0..1 probability scale
                records["prob_sum"] /= 255.0
                records["prob_max"] /= 255.0
            _atomic_npz(self.face_path(begin), **block_faces(local, offset))
            _atomic_parquet(records, os.path.join(rec_dir, f"{block.block_id}.parquet"))

        yield process


class SegmentStitchTask(_SegmentStep):
    """Pass 2: equivalences across block boundaries from the stored faces of each block and
    its high-side neighbours (the +1 voxel halo on the high sides)."""

    name = "segment_stitch"

    @contextlib.contextmanager
    def worker(self):
        pair_dir = self.subdir("pairs")
        cache: collections.OrderedDict = collections.OrderedDict()  # each block's faces serve 8 blocks

        def faces(begin: tuple) -> dict:
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

        def process(block: Block) -> None:
            begin = self.begin_vox(block.write_roi)
            near = []
            for step in itertools.product((0, 1), repeat=3):
                other = tuple(b + d * s for b, d, s in zip(begin, step, self.block))
                if all(o < n for o, n in zip(other, self.volume_shape)):
                    near.append((other, faces(other)))
            pairs = face_equivalences(begin, tuple(block.write_roi.shape / self.voxel_size), near,
                                      self.cfg.connectivity)
            _atomic_npy(np.asarray(pairs, dtype=np.uint64).reshape(-1, 2),
                        os.path.join(pair_dir, f"{block.block_id}.npy"))

        yield process

    def finish(self) -> None:
        resolve_segmentation(self)


def resolve_segmentation(step: _SegmentStep) -> pd.DataFrame:
    """Union-find over all pairs → ``mapping.npz`` and ``instances.parquet`` (driver, once)."""
    c = step.cfg
    rec_files = [os.path.join(step.work, "records", f"{b.block_id}.parquet") for b in step.blocks()]
    pair_files = [os.path.join(step.work, "pairs", f"{b.block_id}.npy") for b in step.blocks()]
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
    _atomic_npz(os.path.join(step.work, "mapping.npz"), provisional=res.provisional_ids,
                final=res.final_ids)
    _atomic_parquet(res.instances, os.path.join(step.work, "instances.parquet"))
    log.info("segment: %d instances after stitching and size filtering", len(res.instances))
    return res.instances


class SegmentRelabelTask(_SegmentStep):
    """Pass 3: provisional → final ids, written to the output label volume."""

    name = "segment_relabel"

    def settings(self) -> dict:
        s = super().settings()
        path = os.path.join(self.work, "mapping.npz")
        if os.path.exists(path):  # a new resolution (e.g. other min_size) invalidates old blocks
            import hashlib

            with open(path, "rb") as f:
                s["mapping_sha256"] = hashlib.sha256(f.read()).hexdigest()
        return s

    def prepare(self, fresh: bool) -> None:
        if fresh:
            create_volume(self.cfg.output, shape=self.volume_shape, voxel_size=self.voxel_size,
                          offset=self.roi.begin, dtype="uint64", chunk_shape=self.block, overwrite=True,
                          attrs={"cleftwise_step": "segment"})

    @contextlib.contextmanager
    def worker(self):
        with np.load(os.path.join(self.work, "mapping.npz")) as m:
            prov, final = m["provisional"], m["final"]
        pred = open_volume(self.cfg.predictions)
        out = open_volume(self.cfg.output, mode="r+")
        c = self.cfg
        per_thread = threading.local()  # a dask worker may run blocks in several threads

        def process(block: Block) -> None:
            # The local labels of pass 1 are recomputed (cc3d is deterministic) and mapped to
            # the final ids; local_lut checks that the block still has as many labels.
            union = pred.read(block.write_roi)[c.union_channel]
            mask = union_mask(union, c.threshold)
            local, n = label_components(mask, c.connectivity)
            lut = local_lut(prov, final, self.id_offset(block), n)
            buffers = per_thread.__dict__.setdefault("buffers", {})
            if buffers.get(local.shape) is None:  # reused: no page faults on every block
                buffers[local.shape] = np.empty(local.shape, dtype=np.uint64)
            # the write returns once committed, so the buffer is free for the next block
            out.write(block.write_roi, apply_lut(lut, local, mask, out=buffers[local.shape]))

        yield process


class PartnersTask(_SegmentStep):
    """Per block: voxel sides, partial polarity sums and neuron votes (final ids)."""

    name = "partners"

    def __init__(self, cfg: SegmentConfig):
        super().__init__(cfg)
        self.radius = Coordinate(dilation_radius_voxels(cfg.dilate_nm, tuple(self.voxel_size)))
        self.context = Coordinate(max(r, 1) if cfg.dilate_nm > 0 else r for r in self.radius)
        if cfg.neurons:
            seg = open_volume(cfg.neurons)
            if seg.voxel_size != self.voxel_size:
                raise PostprocessError(
                    f"voxel size mismatch: neurons {cfg.neurons} has {tuple(seg.voxel_size)} nm but "
                    f"predictions {cfg.predictions} have {tuple(self.voxel_size)} nm")
            if not seg.roi.contains(self.roi):
                raise PostprocessError(
                    f"neuron segmentation {cfg.neurons} ({seg.roi}) does not cover the predictions "
                    f"({self.roi})")
            if seg.num_channels is not None:
                raise PostprocessError(f"{cfg.neurons}: neuron segmentation must be (z, y, x)")

    def settings(self) -> dict:
        s = super().settings()
        s["labels"] = self.cfg.output
        return s

    @contextlib.contextmanager
    def worker(self):
        c = self.cfg
        pred = open_volume(c.predictions)
        labels = open_volume(c.output)
        seg = open_volume(c.neurons) if c.neurons else None
        pol_dir, vote_dir = self.subdir("polarity"), self.subdir("votes")
        ctx = self.context * self.voxel_size

        def process(block: Block) -> None:
            roi = block.write_roi.grow(ctx, ctx)
            lab = labels.read(roi, fill_outside=True)
            probs = pred.read(roi, fill_outside=True)
            if probs.shape[0] != 3:
                raise PostprocessError(f"{c.predictions}: polarity needs 3 channels, got {probs.shape[0]}")
            sides = assign_sides(lab, probs, mode=c.polarity_mode, threshold=c.side_threshold,
                                 rule=c.side_rule)
            core = tuple(slice(int(k), int(k + s)) for k, s in
                         zip(self.context, block.write_roi.shape / self.voxel_size))
            stats = polarity_stats_block(lab[core], probs[(slice(None),) + core],
                                         self.begin_vox(block.write_roi), mode=c.polarity_mode,
                                         sides=sides[core])
            _atomic_parquet(stats, os.path.join(pol_dir, f"{block.block_id}.parquet"))
            if seg is not None:
                neurons = seg.read(roi, fill_outside=True).astype(np.uint64)
                votes = partner_votes_block(lab, sides, neurons, tuple(self.voxel_size), c.dilate_nm,
                                            context=tuple(self.context))
                _atomic_parquet(votes, os.path.join(vote_dir, f"{block.block_id}.parquet"))

        yield process

    def finish(self) -> None:
        synapse_table(self)


def _nm(vox: np.ndarray, axis: int, roi: Roi, vs: Coordinate) -> np.ndarray:
    return roi.begin[axis] + (np.asarray(vox, dtype=np.float64) + 0.5) * vs[axis]


def synapse_table(step: PartnersTask) -> pd.DataFrame:
    """Merge instances, polarity and votes into one record per synapse (``synapses.parquet``)."""
    c, vs, roi = step.cfg, step.voxel_size, step.roi
    inst = pd.read_parquet(os.path.join(step.work, "instances.parquet"))
    pol = merge_polarity_stats([pd.read_parquet(f) for f in sorted(
        glob.glob(os.path.join(step.work, "polarity", "*.parquet")))])
    df = pd.DataFrame({"id": inst["id"].astype(np.int64)})
    for i, ax in enumerate("zyx"):
        df[ax] = _nm(inst[f"centroid_{ax}"], i, roi, vs)
    for i, ax in enumerate("zyx"):
        df[f"bbox_{ax}0"] = roi.begin[i] + inst[f"{ax}0"].to_numpy(np.float64) * vs[i]
        df[f"bbox_{ax}1"] = roi.begin[i] + inst[f"{ax}1"].to_numpy(np.float64) * vs[i]
    df["size"] = inst["size"].astype(np.int64)
    df["score_union"] = inst["prob_mean"].astype(float) if "prob_mean" in inst else np.nan
    df["score_max"] = inst["prob_max"].astype(float) if "prob_max" in inst else np.nan
    pol = pol.set_index(pol["id"].astype(np.int64)).reindex(df["id"])
    df["score_pre"] = pol["pre_score"].to_numpy()
    df["score_post"] = pol["post_score"].to_numpy()
    for side in ("pre", "post"):
        for i, ax in enumerate("zyx"):
            df[f"{side}_{ax}"] = _nm(pol[f"{side}_{ax}"].to_numpy(), i, roi, vs)
        df[f"{side}_size"] = pol[f"{side}_count"].fillna(0).astype(np.int64).to_numpy()
    flags = [[] for _ in range(len(df))]
    for side in ("pre", "post"):
        empty = pol[f"{side}_empty"].fillna(True).to_numpy(bool)
        for k in np.flatnonzero(empty):
            flags[k].append(f"no_{side}_side")
    if c.neurons:
        votes = [pd.read_parquet(f) for f in sorted(glob.glob(os.path.join(step.work, "votes", "*.parquet")))]
        part = merge_partner_votes(votes, instance_ids=df["id"].to_numpy(np.uint64), rule=c.partner_rule)
        part = part.set_index(part["id"].astype(np.int64)).reindex(df["id"])
        for side in ("pre", "post"):
            df[f"{side}_neuron"] = part[f"{side}_neuron"].astype(np.int64).to_numpy()
            df[f"{side}_conf"] = part[f"{side}_confidence"].astype(float).to_numpy()
            for k in np.flatnonzero(part[f"{side}_background"].to_numpy(bool)):
                flags[k].append(f"{side}_background")
            for k in np.flatnonzero(part[f"{side}_tie"].to_numpy(bool)):
                flags[k].append(f"{side}_tie")
        for k in np.flatnonzero(part["autapse"].to_numpy(bool)):
            flags[k].append("autapse")
        fraction = part["neuron_fraction"].fillna(0.0).to_numpy(np.float64)
        for k in np.flatnonzero(fraction > ONE_NEURON_FLAG):
            flags[k].append("one_neuron")
    else:
        for side in ("pre", "post"):
            df[f"{side}_neuron"] = 0
            df[f"{side}_conf"] = np.nan
    df["flags"] = [",".join(f) for f in flags]
    df["source"] = "cleftwise"
    # the block holding the instance's first voxel "owns" it (idempotent DB writes per block)
    first = np.stack([inst[f"first_{ax}"].to_numpy(np.int64) for ax in "zyx"], axis=1)
    grid = tuple(int(-(-s // b)) for s, b in zip(step.volume_shape, step.block))
    df["block_id"] = np.ravel_multi_index(tuple((first // np.asarray(step.block)).T), grid).astype(np.int64)
    if c.neurons and c.max_neuron_fraction is not None:
        keep = fraction <= float(c.max_neuron_fraction)
        log.info("partners: %d of %d detections lie for more than %.2f in one neuron and are dropped",
                 int((~keep).sum()), len(df), c.max_neuron_fraction)
        df = df[keep].reset_index(drop=True)
    _atomic_parquet(df, os.path.join(step.work, "synapses.parquet"))
    log.info("partners: %d synapse records", len(df))
    return df


def store_synapses(step: PartnersTask, db_url: str) -> tuple[int, bool]:
    """Write ``synapses.parquet`` to the synapse DB, block by block (idempotent).

    Every block of the grid is replaced, also those left without synapses, so a re-run after a
    change never leaves stale records behind. A marker (``db_written.json`` in the work folder:
    DB URL + sha256 of the table) is written after the last block; when it matches and the DB
    holds as many records as the table, nothing is rewritten (fields added later, such as the
    E/I calls, survive a re-run). Returns (records in the table, whether the DB was written).
    """
    import hashlib
    import json

    from cleftwise.storage.db import open_store

    table = os.path.join(step.work, "synapses.parquet")
    with open(table, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    marker = os.path.join(step.work, "db_written.json")
    df = pd.read_parquet(table)
    with open_store(db_url) as store:
        if os.path.exists(marker):
            with open(marker) as f:
                done = json.load(f)
            if done == {"db": db_url, "sha256": digest} and store.count() == len(df):
                log.info("partners: %s already holds these %d synapses", db_url, len(df))
                return len(df), False
        groups = {int(k): g for k, g in df.groupby("block_id")}
        for b in step.blocks():
            store.replace_block(b.block_id, groups.get(b.block_id, df.iloc[:0]))
    tmp = f"{marker}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"db": db_url, "sha256": digest}, f)
    os.replace(tmp, marker)
    log.info("partners: %d synapses written to %s", len(df), db_url)
    return len(df), True


def segment_tasks(cfg: SegmentConfig) -> list[BlockTask]:
    """The three blockwise passes of the segment stage, in order."""
    return [SegmentLabelTask(cfg), SegmentStitchTask(cfg), SegmentRelabelTask(cfg)]
