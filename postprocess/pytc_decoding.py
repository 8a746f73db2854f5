"""PyTorch Connectomics' ``polarity2instance``, blockwise and exact (``segment.decoding: pytc``).

The decoding of ``connectomics.utils.process.polarity2instance`` (PyTC, zudi-lin/pytorch_connectomics;
``connectomics/decoding/synapse.py`` since late 2025), on the whole volume:

1. masks: non-exclusive (channels pre, post, union; uint8): ``m = volume > int(255 * thres)``,
   ``fg = m[union]``, ``pre = m[pre] & fg``, ``post = m[post] & fg``; exclusive (channels
   background, pre, post after a softmax): ``k = argmax`` over the channels (ties to the lower
   index), ``pre = k == 1``, ``post = k == 2``, ``fg = k != 0``;
2. ``pre`` and ``post`` each lose their 6-connected components of fewer than ``thres_small``
   voxels (skimage ``remove_small_objects(min_size=thres_small, connectivity=1)``);
3. ``fg`` is dilated by a ``(1, d, d)`` box (skimage ``binary_dilation``; outside the volume is
   background) and labelled (cc3d, 6-connected);
4. a voxel of component ``n`` is post (``2n``) if it is in the filtered ``post``, else pre
   (``2n - 1``) if in the filtered ``pre``: voxels on both sides go to post.

Here the instance label volume holds ``n`` (renumbered 1..N in the order of PyTC's ``n``:
components without a surviving pre or post voxel have no voxels in PyTC's output and get no id)
on exactly PyTC's labelled voxels, and a uint8 side volume holds 1 (pre) or 2 (post) there.

Blockwise, in three passes (each a :class:`~cleftwise.blockwise.step.BlockStep`, any block
shape, any backend, same result as the whole volume), named like the default decoding's so
that they share its ledgers: a change of ``segment.decoding`` re-runs the stage from scratch
and replaces its outputs:

1. ``segment_label``: per block, with a ``(0, d // 2, d // 2)`` context for the dilation,
   three local labellings of the write region — dilated ``fg`` (``pytc_connectivity``), ``pre``
   and ``post`` (6-connected) — with their records and boundary faces
   (:mod:`cleftwise.postprocess.cc_stitch`); pre/post records also name the dilated-fg label
   holding each fragment (``fg_id``: a 6-connected fragment inside the dilated fg lies in one
   of its components);
2. ``segment_stitch``: face equivalences of the three labellings; in the driver the exact
   global components of each, the size filter on the *global* pre/post fragment sizes and the
   instances (dilated components holding a kept fragment) → ``mapping.npz``;
3. ``segment_relabel``: local labels recomputed, mapped, written (labels and sides), plus
   per-block statistics merged into ``instances.parquet`` (same columns as the default decoding).

Arrays are (c, z, y, x) / (z, y, x); positions are voxel indices of the prediction grid.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import hashlib
import itertools
import logging
import os

import numpy as np
import pandas as pd
from funlib.geometry import Coordinate

from cleftwise.blockwise.grid import Block
from cleftwise.blockwise.step import ArraySpec
from cleftwise.postprocess.cc_stitch import (INSTANCE_COLUMNS, _per_label_stats, apply_lut, block_faces,
                                             face_equivalences, label_block_local, label_components,
                                             local_lut, resolve)
from cleftwise.postprocess.errors import PostprocessError
from cleftwise.postprocess.segment import SegmentConfig, _SegmentPass
from cleftwise.storage.atomic import save_npy, save_npz, save_parquet
from cleftwise.storage.errors import StorageError
from cleftwise.storage.volume import open_volume

__all__ = ["PYTC_CHANNELS", "pytc_masks", "dilate_yx", "PytcLabel", "PytcStitch", "PytcRelabel",
           "pytc_passes"]

log = logging.getLogger(__name__)

#: prediction channels read, by name and in this order, per decoding
PYTC_CHANNELS = {"pytc": ("pre", "post", "union"), "pytc_exclusive": ("background", "pre", "post")}
#: the three labellings of the label pass
SUBSETS = ("fg", "pre", "post")
SIDE_PRE, SIDE_POST = np.uint8(1), np.uint8(2)


def pytc_masks(probs: np.ndarray, threshold: float, exclusive: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PyTC's foreground, pre and post masks (bool (z, y, x) each) before size filtering.

    Args:
        probs: (3, z, y, x): (pre, post, union) sigmoids, or (background, pre, post) softmax
            when ``exclusive``; uint8 0..255 (PyTC's input) or float 0..1.
        threshold: PyTC's ``thres`` in [0, 1]; compared as ``value > int(255 * thres)`` on
            uint8 (exactly PyTC), ``value > int(255 * thres) / 255`` on float maps. Unused when
            ``exclusive``.
        exclusive: arg-max decoding of a softmax output (ties to the lower channel).
    """
    if probs.ndim != 4 or probs.shape[0] != 3:
        raise PostprocessError(f"pytc decoding needs a (3, z, y, x) probability block, got {probs.shape}")
    if exclusive:
        k = np.argmax(probs, axis=0)
        return k != 0, k == 1, k == 2
    cut = int(255.0 * threshold)
    if probs.dtype == np.uint8:
        if cut >= 255:
            m = np.zeros(probs.shape, bool)
        else:
            m = probs > np.uint8(cut)
    else:
        m = probs > cut / 255.0
    fg = m[2]
    return fg, m[0] & fg, m[1] & fg


def dilate_yx(mask: np.ndarray, size: int) -> np.ndarray:
    """Binary dilation of a bool (z, y, x) mask by a ``(1, size, size)`` box (``size`` odd),
    voxels outside the array count as background; done as two 1-D passes (same result)."""
    r = int(size) // 2
    if r == 0:
        return mask.copy()
    out = mask.copy()
    for axis in (1, 2):
        src, n = out.copy(), out.shape[axis]
        for d in range(1, r + 1):
            if d >= n:
                break
            hi = [slice(None)] * 3
            lo = [slice(None)] * 3
            hi[axis], lo[axis] = slice(d, None), slice(None, n - d)
            out[tuple(hi)] |= src[tuple(lo)]
            out[tuple(lo)] |= src[tuple(hi)]
    return out


class _PytcPass(_SegmentPass):
    """Geometry and masks shared by the three pytc passes; context (0, d//2, d//2) voxels."""

    def __init__(self, cfg: SegmentConfig):
        for key in ("predictions", "output", "work_dir"):
            if not getattr(cfg, key):
                raise PostprocessError(f"segment: '{key}' is not set")
        if cfg.decoding not in PYTC_CHANNELS:
            raise PostprocessError(f"segment: pytc passes need decoding pytc or pytc_exclusive, got {cfg.decoding!r}")
        self.cfg = cfg
        pred = open_volume(cfg.predictions)
        if pred.num_channels is None:
            raise PostprocessError(
                f"{cfg.predictions}: expected a (c, z, y, x) prediction volume, got shape {pred.shape}")
        names = PYTC_CHANNELS[cfg.decoding]
        try:
            self.channels = [pred.channel_index(n, names) for n in names]
        except StorageError as e:
            raise PostprocessError(f"segment: decoding {cfg.decoding} needs channels {list(names)}: {e}") from e
        self.exclusive = cfg.decoding == "pytc_exclusive"
        self.channel = self.channels[2]
        self.voxel_size = pred.voxel_size
        self.total_roi = pred.roi
        self.volume_shape = tuple(pred.spatial_shape)
        self.write_size = Coordinate(int(b) for b in cfg.block_shape)
        r = int(cfg.pytc_dilation) // 2
        self.context = Coordinate(0, r, r)
        self.work_dir = os.path.abspath(cfg.work_dir)

    def identity(self) -> dict:
        return {"channel_indices": list(self.channels), **self.cfg.identity_fields()}

    def sub_path(self, kind: str, subset: str, name: str) -> str:
        return os.path.join(self.work_dir, f"{kind}_{subset}", name)

    def face_file(self, subset: str, begin_vox: tuple) -> str:
        return self.sub_path("faces", subset, "_".join(str(int(b)) for b in begin_vox) + ".npz")

    def conn(self, subset: str) -> int:
        return int(self.cfg.pytc_connectivity) if subset == "fg" else 6

    def read_masks(self, block: Block, pred) -> tuple[dict, np.ndarray]:
        """The block's write-region masks {fg (dilated), pre, post} and its probs (3, z, y, x)."""
        probs = pred.read(block.read_roi, fill_outside=True)[self.channels]
        fg, pre, post = pytc_masks(probs, self.cfg.threshold, self.exclusive)
        inner = (block.write_roi.begin - block.read_roi.begin) / self.voxel_size
        shape = block.write_roi.shape / self.voxel_size
        core = tuple(slice(int(b), int(b + s)) for b, s in zip(inner, shape))
        fg_d = dilate_yx(fg, self.cfg.pytc_dilation)
        masks = {"fg": np.ascontiguousarray(fg_d[core]), "pre": np.ascontiguousarray(pre[core]),
                 "post": np.ascontiguousarray(post[core])}
        return masks, probs[(slice(None),) + core]


class PytcLabel(_PytcPass):
    """Pass 1: local labels of dilated fg, pre and post; records and faces, no volume."""

    name = "segment_label"

    def prepare_scratch(self, fresh: bool) -> None:
        if fresh:
            for kind, ext in (("records", "parquet"), ("faces", "npz"), ("pairs", "npy")):
                for s in SUBSETS:
                    for f in glob.glob(self.sub_path(kind, s, f"*.{ext}")):
                        os.remove(f)

    @contextlib.contextmanager
    def open_worker(self):
        for kind, s in itertools.product(("records", "faces"), SUBSETS):
            self.subdir(f"{kind}_{s}")
        yield open_volume(self.cfg.predictions, missing=self.cfg.missing_chunks)

    def process(self, block: Block, pred) -> None:
        masks, _ = self.read_masks(block, pred)
        begin = self.begin_vox(block.write_roi)
        offset = self.id_offset(block)
        fg_local = None
        for s in SUBSETS:
            local, records = label_block_local(masks[s], begin, self.conn(s), id_offset=offset)
            if s == "fg":
                fg_local = local
            else:  # the dilated-fg label holding each fragment (at its first voxel)
                at = tuple(records[f"first_{a}"].to_numpy(np.int64) - b for a, b in zip("zyx", begin))
                records["fg_id"] = fg_local[at].astype(np.uint64) + np.uint64(offset)
            save_npz(self.face_file(s, begin), **block_faces(local, offset))
            save_parquet(records, self.sub_path("records", s, f"{block.block_id}.parquet"))


class PytcStitch(_PytcPass):
    """Pass 2: face equivalences of the three labellings; then, in the driver, the resolve."""

    name = "segment_stitch"

    @contextlib.contextmanager
    def open_worker(self):
        for s in SUBSETS:
            self.subdir(f"pairs_{s}")
        yield collections.OrderedDict()

    def _faces(self, cache, subset: str, begin: tuple) -> dict:
        key = (subset, begin)
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        path = self.face_file(subset, begin)
        try:
            with np.load(path) as f:
                found = {k: f[k] for k in f.files}
        except Exception as e:  # missing or truncated: name it
            raise PostprocessError(f"segment: faces file {path} is missing or unreadable ({e}); "
                                   f"re-run the segment stage with overwrite") from e
        cache[key] = found
        while len(cache) > 1 and sum(a.nbytes for d in cache.values() for a in d.values()) > 128 * 2**20:
            cache.popitem(last=False)
        return found

    def process(self, block: Block, cache) -> None:
        begin = self.begin_vox(block.write_roi)
        others = []
        for step in itertools.product((0, 1), repeat=3):
            other = tuple(b + d * s for b, d, s in zip(begin, step, self.block))
            if all(o < n for o, n in zip(other, self.volume_shape)):
                others.append(other)
        core = tuple(block.write_roi.shape / self.voxel_size)
        for s in SUBSETS:
            near = [(o, self._faces(cache, s, o)) for o in others]
            pairs = face_equivalences(begin, core, near, self.conn(s))
            save_npy(np.asarray(pairs, dtype=np.uint64).reshape(-1, 2),
                     self.sub_path("pairs", s, f"{block.block_id}.npy"))

    def finish(self) -> None:
        resolve_pytc(self)


def _read(path: str, reader):
    try:
        return reader(path)
    except Exception as e:
        raise PostprocessError(f"segment: {path} is missing or unreadable ({e}); re-run the segment "
                               f"stage with overwrite") from e


def resolve_pytc(step: _PytcPass) -> dict:
    """Global components of the three labellings, the size filter of pre/post fragments and
    the instances → ``mapping.npz`` (driver, once). Returns counts for the log."""
    c, blocks = step.cfg, step.blocks()
    res, recs = {}, {}
    for s in SUBSETS:
        records = [_read(step.sub_path("records", s, f"{b.block_id}.parquet"), pd.read_parquet) for b in blocks]
        pairs = [_read(step.sub_path("pairs", s, f"{b.block_id}.npy"), np.load) for b in blocks]
        res[s] = resolve(pairs, records, min_size=1 if s == "fg" else max(int(c.pytc_small), 1))
        nonempty = [r for r in records if len(r)]
        frame = pd.concat(nonempty, ignore_index=True) if nonempty else records[0]
        recs[s] = frame.sort_values("id", kind="stable").reset_index(drop=True)
    fg = res["fg"]  # no filter: final ids 1..M in raster order of first voxel = cc3d's (PyTC's n)
    hit = np.zeros(len(fg.instances) + 1, dtype=bool)
    keep = {}
    for s in ("pre", "post"):
        keep[s] = res[s].final_ids != 0  # aligned with res[s].provisional_ids == recs[s]["id"]
        fg_prov = recs[s]["fg_id"].to_numpy(np.uint64)[keep[s]]
        where = np.searchsorted(fg.provisional_ids, fg_prov)
        hit[fg.final_ids[where].astype(np.intp)] = True
    hit[0] = False
    final_of_fg = np.zeros(hit.size, dtype=np.uint64)
    final_of_fg[hit] = np.arange(1, int(hit.sum()) + 1, dtype=np.uint64)
    save_npz(os.path.join(step.work_dir, "mapping.npz"),
             fg_provisional=fg.provisional_ids, fg_final=final_of_fg[fg.final_ids.astype(np.intp)],
             pre_provisional=res["pre"].provisional_ids, pre_keep=keep["pre"].astype(np.uint64),
             post_provisional=res["post"].provisional_ids, post_keep=keep["post"].astype(np.uint64))
    counts = {"components": len(fg.instances), "instances": int(hit.sum()),
              "pre_fragments": int(keep["pre"].sum()), "post_fragments": int(keep["post"].sum())}
    log.info("segment (pytc): %(instances)d instances of %(components)d dilated components; "
             "%(pre_fragments)d pre and %(post_fragments)d post fragments kept", counts)
    return counts


class PytcRelabel(_PytcPass):
    """Pass 3: final instance ids and sides written; per-block instance statistics merged."""

    name = "segment_relabel"

    def outputs(self) -> list[ArraySpec]:
        return [ArraySpec(self.cfg.output, "uint64", chunk_shape=tuple(self.block),
                          attrs={"cleftwise_step": "segment", "decoding": self.cfg.decoding}),
                ArraySpec(self.cfg.sides, "uint8", chunk_shape=tuple(self.block),
                          attrs={"cleftwise_step": "segment", "sides": "0 none, 1 pre, 2 post"})]

    def identity(self) -> dict:
        s = super().identity()
        path = os.path.join(self.work_dir, "mapping.npz")
        if os.path.exists(path):
            with open(path, "rb") as f:
                s["mapping_sha256"] = hashlib.sha256(f.read()).hexdigest()
        return s

    def prepare_scratch(self, fresh: bool) -> None:
        if fresh:
            for f in glob.glob(os.path.join(self.work_dir, "inst_records", "*.parquet")):
                os.remove(f)

    @contextlib.contextmanager
    def open_worker(self):
        self.subdir("inst_records")
        with np.load(os.path.join(self.work_dir, "mapping.npz")) as m:
            maps = {k: m[k] for k in m.files}
        m = self.cfg.missing_chunks
        yield {"maps": maps, "pred": open_volume(self.cfg.predictions, missing=m),
               "out": open_volume(self.cfg.output, mode="r+"), "sides": open_volume(self.cfg.sides, mode="r+")}

    def process(self, block: Block, w) -> None:
        masks, probs = self.read_masks(block, w["pred"])
        offset, maps = self.id_offset(block), w["maps"]
        mapped = {}
        for s in SUBSETS:
            local, n = label_components(masks[s], self.conn(s))
            lut = local_lut(maps[f"{s}_provisional"], maps[f"{s}_final" if s == "fg" else f"{s}_keep"], offset, n)
            mapped[s] = apply_lut(lut, local, masks[s])
        post = mapped["post"] != 0
        pre = (mapped["pre"] != 0) & ~post  # on both sides: post (PyTC's np.maximum)
        labels = np.where(pre | post, mapped["fg"], np.uint64(0))
        sides = np.where(post, SIDE_POST, np.where(pre, SIDE_PRE, np.uint8(0))).astype(np.uint8)
        w["out"].write(block.write_roi, labels)
        w["sides"].write(block.write_roi, sides)
        save_parquet(self.block_records(labels, probs, self.begin_vox(block.write_roi)),
                     os.path.join(self.work_dir, "inst_records", f"{block.block_id}.parquet"))

    def block_records(self, labels: np.ndarray, probs: np.ndarray, begin: tuple) -> pd.DataFrame:
        """Per-instance partial statistics of one block (global voxel coordinates); prob is
        the union channel (non-exclusive) or 1 - background (exclusive), 0..1."""
        fg = np.flatnonzero(labels)  # synapses cover a few per cent of a block: unique on them only
        ids, inv = np.unique(labels.reshape(-1)[fg], return_inverse=True)
        local = np.zeros(labels.shape, dtype=np.uint32)
        local.reshape(-1)[fg] = inv + 1
        fgp = probs[0] if self.exclusive else probs[2]
        fgp = fgp.astype(np.float64) / (255.0 if probs.dtype == np.uint8 else 1.0)
        if self.exclusive:
            fgp = 1.0 - fgp
        stats = _per_label_stats(local, ids.size, np.asarray(begin, dtype=np.int64), fgp, local != 0)
        return pd.DataFrame({"id": ids.astype(np.uint64), **stats})

    def finish(self) -> dict:
        frames = [_read(os.path.join(self.work_dir, "inst_records", f"{b.block_id}.parquet"), pd.read_parquet)
                  for b in self.blocks()]
        inst = merge_instance_records(frames)
        save_parquet(inst, os.path.join(self.work_dir, "instances.parquet"))
        log.info("segment (pytc): %d instances", len(inst))
        return {"instances": len(inst)}


def merge_instance_records(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Per-block instance statistics (ids already final) → one row per instance with the
    default decoding's columns (:data:`~cleftwise.postprocess.cc_stitch.INSTANCE_COLUMNS`,
    ``prob_mean``, ``prob_max``); ``n_fragments`` counts the blocks an instance spans."""
    frames = [f for f in frames if len(f)]
    cols = list(INSTANCE_COLUMNS) + ["prob_mean", "prob_max"]
    if not frames:
        return pd.DataFrame({k: np.zeros(0, np.uint64 if k == "id" else np.int64) for k in cols})
    f = pd.concat(frames, ignore_index=True)
    f = f.sort_values(["id", "first_z", "first_y", "first_x"], kind="stable")
    g = f.groupby("id", sort=True)
    first = g[["first_z", "first_y", "first_x"]].first()
    size = g["count"].sum()
    out = pd.DataFrame({"id": size.index.to_numpy(np.uint64), "size": size.to_numpy(np.int64)})
    for a in "zyx":
        out[f"first_{a}"] = first[f"first_{a}"].to_numpy(np.int64)
    for a in "zyx":
        out[f"{a}0"] = g[f"{a}0"].min().to_numpy(np.int64)
        out[f"{a}1"] = g[f"{a}1"].max().to_numpy(np.int64)
    for a in "zyx":
        out[f"centroid_{a}"] = g[f"sum_{a}"].sum().to_numpy(np.int64) / out["size"].to_numpy()
    out["n_fragments"] = g.size().to_numpy(np.int64)
    out["prob_mean"] = g["prob_sum"].sum().to_numpy() / out["size"].to_numpy()
    out["prob_max"] = g["prob_max"].max().to_numpy()
    return out[cols]


def pytc_passes(cfg: SegmentConfig) -> list:
    """The three passes of PyTC decoding, in order."""
    return [PytcLabel(cfg), PytcStitch(cfg), PytcRelabel(cfg)]
