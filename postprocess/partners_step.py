"""The ``partners`` stage: synapse instances → one record per synapse, written to the DB.

Per block (with context for the optional side dilation), :class:`PartnersStep` decides the
pre/post side of each voxel (PyTorch Connectomics polarity rules,
:mod:`cleftwise.postprocess.polarity`), keeps partial polarity sums and, given a neuron
segmentation, neuron votes (:mod:`cleftwise.postprocess.partners`). In the driver
(:meth:`PartnersStep.finish`) they are merged with the segment stage's instances into one
record per synapse (centroid, bbox, size, scores, pre/post sites, partner neurons and
confidences, flags) and written **once**, straight to the synapse DB, block by block
(idempotent: each block's records replace that block's). A marker (``db_written.json``:
redacted DB URL + digest of the records) makes a re-run that would write the same records a
no-op, so fields added later (the E/I calls) survive it.

Channels of the prediction volume are addressed by name (``pre``, ``post``, ``union``).
Positions in records are nm at voxel centres, ``offset + (index + 0.5) * voxel_size``;
bboxes are nm, half-open ``[begin, end)``.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import pandas as pd
from funlib.geometry import Coordinate, Roi

from cleftwise.blockwise import crashpoints
from cleftwise.blockwise.grid import Block
from cleftwise.blockwise.stages import Stage
from cleftwise.postprocess.preflight import check_db, check_neurons
from cleftwise.blockwise.step import BlockStep
from cleftwise.postprocess.errors import PostprocessError
from cleftwise.postprocess.partners import dilation_radius_voxels, merge_partner_votes, partner_votes_block
from cleftwise.postprocess.segment import SegmentConfig, sides_url
from cleftwise.postprocess.polarity import assign_sides, merge_polarity_stats, polarity_stats_block
from cleftwise.storage.errors import StorageError
from cleftwise.storage.atomic import save_parquet
from cleftwise.storage.volume import open_volume

__all__ = ["PartnersConfig", "PartnersStep", "synapse_table", "write_records", "partners_config", "POLARITY_CHANNELS",
           "ONE_NEURON_FLAG", "STAGE"]

log = logging.getLogger(__name__)

#: synapse records whose pre + post neuron votes fall for more than this share on one neuron
#: get the flag ``one_neuron`` (see PartnersConfig.max_neuron_fraction)
ONE_NEURON_FLAG = 0.9
#: the prediction channels polarity reads, by name, in the order the polarity maths expect
#: (:mod:`cleftwise.postprocess.polarity`), per polarity mode
POLARITY_CHANNELS = {"nonexclusive": ("pre", "post", "union"), "exclusive": ("background", "pre", "post")}


@dataclass
class PartnersConfig:
    """Pre/post sides, partner neurons and the synapse records. Shapes in voxels (z, y, x)."""

    predictions: str = ""
    """(c, z, y, x) probability volume with pre, post and union channels (the pipeline fills it)"""
    labels: str = ""
    """uint64 synapse label volume of the segment stage (the pipeline fills it)"""
    instances: str = ""
    """the segment stage's instances.parquet (the pipeline fills it)"""
    db: str = ""
    """synapse DB URL the records are written to (the pipeline fills it)"""
    work_dir: str = ""
    """folder for per-block polarity and votes and the DB marker (the pipeline fills it)"""
    neurons: Optional[str] = None
    """uint64 neuron segmentation on the same voxel grid; optional (no partner neurons without)"""
    block_shape: Optional[tuple] = None
    """write block shape, voxels; default the segment stage's block shape"""
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
    post over pre votes; see cleftwise.postprocess.partners)"""
    missing_chunks: str = "error"
    """never-written chunks of this stage's input volumes: error or zeros; zeros here or in the
    top-level missing_chunks reads them as zeros"""
    sides: Optional[str] = None
    """uint8 side volume (1 pre, 2 post) of a segment run with a pytc decoding: voxel sides are
    read from it instead of decided here (side_threshold, side_rule unused) (the pipeline fills it)"""

    #: fields that do not change the records (left out of the job identity)
    NOT_IDENTITY = ("work_dir", "db", "missing_chunks")

    def __post_init__(self):
        if self.max_neuron_fraction is not None and not 0.0 < float(self.max_neuron_fraction) <= 1.0:
            raise PostprocessError(
                f"partners.max_neuron_fraction must be in (0, 1] or null, got {self.max_neuron_fraction!r}")
        if self.partner_rule not in ("majority", "contrast"):
            raise PostprocessError(f"partners.partner_rule must be 'majority' or 'contrast', "
                                   f"got {self.partner_rule!r}")


class PartnersStep(BlockStep):
    """Per block: voxel sides, partial polarity sums and neuron votes (final ids); the records
    are merged and written to the DB in :meth:`finish`."""

    name = "partners"

    def __init__(self, cfg: PartnersConfig):
        for key in ("predictions", "labels", "instances", "db", "work_dir"):
            if not getattr(cfg, key):
                raise PostprocessError(f"partners: '{key}' is not set")
        if cfg.block_shape is None:
            raise PostprocessError("partners: 'block_shape' is not set")
        self.cfg = cfg
        pred = open_volume(cfg.predictions)
        names = POLARITY_CHANNELS.get(cfg.polarity_mode)
        if names is None:
            raise PostprocessError(f"partners.polarity_mode must be one of {sorted(POLARITY_CHANNELS)}, "
                                   f"got {cfg.polarity_mode!r}")
        try:
            self.channels = [pred.channel_index(n, names) for n in names]
        except StorageError as e:
            raise PostprocessError(f"partners: {cfg.polarity_mode} polarity needs channels {list(names)}: {e}") from e
        self.voxel_size = pred.voxel_size
        self.total_roi = pred.roi
        self.volume_shape = tuple(pred.spatial_shape)
        self.write_size = Coordinate(int(b) for b in cfg.block_shape)
        self.radius = Coordinate(dilation_radius_voxels(cfg.dilate_nm, tuple(self.voxel_size)))
        self.context = Coordinate(max(r, 1) if cfg.dilate_nm > 0 else r for r in self.radius)
        self.work_dir = os.path.abspath(cfg.work_dir)
        if cfg.neurons:
            seg = open_volume(cfg.neurons)
            if seg.voxel_size != self.voxel_size:
                raise PostprocessError(
                    f"voxel size mismatch: neurons {cfg.neurons} has {tuple(seg.voxel_size)} nm but "
                    f"predictions {cfg.predictions} have {tuple(self.voxel_size)} nm")
            if not seg.roi.contains(self.total_roi):
                raise PostprocessError(
                    f"neuron segmentation {cfg.neurons} ({seg.roi}) does not cover the predictions "
                    f"({self.total_roi})")
            if seg.num_channels is not None:
                raise PostprocessError(f"{cfg.neurons}: neuron segmentation must be (z, y, x)")
        if cfg.sides:
            sv = open_volume(cfg.sides)
            if sv.roi != self.total_roi or sv.voxel_size != self.voxel_size or sv.num_channels is not None:
                raise PostprocessError(
                    f"partners: side volume {cfg.sides} ({sv.roi}, {tuple(sv.voxel_size)} nm) does not "
                    f"match the predictions ({self.total_roi}, {tuple(self.voxel_size)} nm); re-run segment")

    @property
    def block(self) -> Coordinate:
        return self.write_size

    def identity(self) -> dict:
        s = {k: v for k, v in asdict(self.cfg).items() if k not in PartnersConfig.NOT_IDENTITY
             and not (k == "sides" and v is None)}  # jobs without a side volume keep their identity
        s["channel_indices"] = list(self.channels)
        if os.path.exists(self.cfg.instances):  # other instances (a new segmentation) re-run partners
            with open(self.cfg.instances, "rb") as f:
                s["instances_sha256"] = hashlib.sha256(f.read()).hexdigest()
        return s

    def begin_vox(self, roi: Roi) -> tuple:
        return tuple(int(x) for x in (roi.begin - self.total_roi.begin) / self.voxel_size)

    @contextlib.contextmanager
    def open_worker(self):
        c = self.cfg
        for sub in ("polarity", "votes"):
            os.makedirs(os.path.join(self.work_dir, sub), exist_ok=True)
        m = c.missing_chunks
        yield {"pred": open_volume(c.predictions, missing=m), "labels": open_volume(c.labels, missing=m),
               "seg": open_volume(c.neurons, missing=m) if c.neurons else None,
               "sides": open_volume(c.sides, missing=m) if c.sides else None}

    def process(self, block: Block, w) -> None:
        c = self.cfg
        roi = block.read_roi
        lab = w["labels"].read(roi, fill_outside=True)
        probs = w["pred"].read(roi, fill_outside=True)[self.channels]
        if w["sides"] is not None:  # decided by the segment stage (pytc decodings)
            sides = np.where(lab != 0, w["sides"].read(roi, fill_outside=True), 0).astype(np.uint8)
        else:
            sides = assign_sides(lab, probs, mode=c.polarity_mode, threshold=c.side_threshold, rule=c.side_rule)
        core = tuple(slice(int(k), int(k + s)) for k, s in
                     zip(self.context, block.write_roi.shape / self.voxel_size))
        stats = polarity_stats_block(lab[core], probs[(slice(None),) + core],
                                     self.begin_vox(block.write_roi), mode=c.polarity_mode,
                                     sides=sides[core])
        save_parquet(stats, os.path.join(self.work_dir, "polarity", f"{block.block_id}.parquet"))
        if w["seg"] is not None:
            neurons = w["seg"].read(roi, fill_outside=True).astype(np.uint64)
            votes = partner_votes_block(lab, sides, neurons, tuple(self.voxel_size), c.dilate_nm,
                                        context=tuple(self.context))
            save_parquet(votes, os.path.join(self.work_dir, "votes", f"{block.block_id}.parquet"))

    def prepare_scratch(self, fresh: bool) -> None:
        if fresh:
            for sub in ("polarity", "votes"):
                for f in glob.glob(os.path.join(self.work_dir, sub, "*.parquet")):
                    os.remove(f)

    def finish(self) -> dict:
        """Merge the blocks into records and write them to the DB (skipped when the marker
        says the DB already holds exactly these records)."""
        n, wrote = write_records(self, synapse_table(self))
        return {"synapses_in_db": n, "rewrote": wrote}


def partners_config(segment: SegmentConfig, db: str, work_dir: str, **settings) -> PartnersConfig:
    """A partners config reading what the segment run ``segment`` wrote (predictions, labels,
    instances, block shape), writing records to ``db``; ``settings`` are PartnersConfig fields."""
    extra = {}
    if segment.decoding != "cleftwise":
        extra = {"sides": sides_url(segment),
                 "polarity_mode": _pytc_polarity_mode(segment, settings.pop("polarity_mode", None))}
    return PartnersConfig(**{"predictions": segment.predictions, "labels": segment.output,
                             "instances": os.path.join(segment.work_dir, "instances.parquet"), "db": db,
                             "work_dir": work_dir, "block_shape": tuple(segment.block_shape),
                             **extra, **settings})


def _pytc_polarity_mode(segment: SegmentConfig, chosen: Optional[str] = None) -> str:
    """The polarity mode a pytc decoding needs (its channels); a different ``chosen`` one is an error."""
    need = "exclusive" if segment.decoding == "pytc_exclusive" else "nonexclusive"
    if chosen is not None and chosen != need:
        channels = "background/pre/post" if need == "exclusive" else "pre/post/union"
        raise PostprocessError(f"segment.decoding {segment.decoding} decodes {channels} channels: "
                               f"set partners.polarity_mode to {need} (got {chosen})")
    return need


def _nm(vox: np.ndarray, axis: int, roi: Roi, vs: Coordinate) -> np.ndarray:
    return roi.begin[axis] + (np.asarray(vox, dtype=np.float64) + 0.5) * vs[axis]


def synapse_table(step: PartnersStep) -> pd.DataFrame:
    """Merge instances, polarity and votes into one record per synapse (in memory)."""
    c, vs, roi = step.cfg, step.voxel_size, step.total_roi
    inst = pd.read_parquet(c.instances)
    pol = merge_polarity_stats([pd.read_parquet(f) for f in sorted(
        glob.glob(os.path.join(step.work_dir, "polarity", "*.parquet")))])
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
        votes = [pd.read_parquet(f) for f in sorted(glob.glob(os.path.join(step.work_dir, "votes", "*.parquet")))]
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
    log.info("partners: %d synapse records", len(df))
    return df


def records_digest(df: pd.DataFrame) -> str:
    """sha256 of the records' values (row order and dtypes included)."""
    h = hashlib.sha256(",".join(f"{c}:{t}" for c, t in df.dtypes.astype(str).items()).encode())
    h.update(pd.util.hash_pandas_object(df, index=False).to_numpy().tobytes())
    return h.hexdigest()


def _our_block_ids(store) -> np.ndarray:
    """Block ids (one per record) of the records the pipeline wrote (``source`` cleftwise);
    records imported from elsewhere are not ours to count or delete."""
    got = store.query(columns=["block_id", "source"])
    mine = got["source"].astype(str) == "cleftwise"
    return pd.to_numeric(got.loc[mine, "block_id"]).fillna(-1).to_numpy(np.int64)


def write_records(step: PartnersStep, df: pd.DataFrame) -> tuple[int, bool]:
    """Write ``df`` to the synapse DB, block by block (idempotent).

    Every block of the grid is replaced, also those left without synapses, and blocks of an
    earlier grid that the current one lacks are emptied, so a re-run after a change never
    leaves stale records behind (records of other sources are left alone). The marker ``db_written.json`` (redacted DB URL +
    digest of the records) is written after the last block; when it matches and the DB holds
    as many records, nothing is rewritten. Returns (records, whether the DB was written).
    """
    from cleftwise.storage.db import open_store
    from cleftwise.storage.db.urls import redact

    db = step.cfg.db
    want = {"db": redact(db), "sha256": records_digest(df)}
    marker = os.path.join(step.work_dir, "db_written.json")
    with open_store(db) as store:
        ours = _our_block_ids(store)  # block id of every record this stage wrote (source cleftwise)
        if os.path.exists(marker):
            with open(marker) as f:
                done = json.load(f)
            if done == want and len(ours) == len(df):
                log.info("partners: %s already holds these %d synapses", redact(db), len(df))
                return len(df), False
            os.remove(marker)  # a write killed half-way must never pass for a finished one
        groups = {int(k): g for k, g in df.groupby("block_id")}
        grid = [b.block_id for b in step.blocks()]
        for bid in sorted(set(ours.tolist()) - set(grid)):  # blocks of an earlier, larger grid
            store.delete_block(bid)
        for bid in grid:
            store.replace_block(bid, groups.get(bid, df.iloc[:0]))
            crashpoints.hit("db_block_written", step.name)
    tmp = f"{marker}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(want, f)
    os.replace(tmp, marker)
    crashpoints.hit("db_marker_written", step.name)
    log.info("partners: %d synapses written to %s", len(df), redact(db))
    return len(df), True


def _partners_steps(run, cfg: PartnersConfig):
    seg = run.segment
    yield PartnersStep(PartnersConfig(**{
        **asdict(cfg),
        "predictions": cfg.predictions or seg.predictions or run.predict.output or run.predictions_url,
        "labels": cfg.labels or seg.output or run.labels_url,
        "instances": cfg.instances or os.path.join(seg.work_dir or run.stage_dir("segment"), "instances.parquet"),
        "db": cfg.db or run.db_url, "work_dir": cfg.work_dir or run.stage_dir("partners"),
        "neurons": cfg.neurons or run.neurons,
        "block_shape": cfg.block_shape or seg.block_shape,
        "missing_chunks": run.missing_for(cfg), **_pytc_settings(run, cfg)}))


def _pytc_settings(run, cfg: PartnersConfig) -> dict:
    """With a pytc segment decoding: its side volume (and a checked polarity mode)."""
    seg = run.segment
    if seg.decoding == "cleftwise":
        return {}
    _pytc_polarity_mode(seg, cfg.polarity_mode)
    return {"sides": cfg.sides or sides_url(SegmentConfig(**{**asdict(seg), "output": seg.output or run.labels_url}))}


def _partners_preflight(run, cfg: PartnersConfig) -> None:
    if run.segment.decoding != "cleftwise":
        _pytc_polarity_mode(run.segment, cfg.polarity_mode)
    if cfg.neurons or run.neurons:
        check_neurons(cfg.neurons or run.neurons, run.raw)
    check_db(cfg.db or run.db_url)


#: the ``partners`` stage: instances → synapse records (sides, partner neurons) in the DB
STAGE = Stage(
    "partners",
    config=PartnersConfig,
    after=("segment",),
    work_dir=lambda run, cfg: cfg.work_dir or run.stage_dir("partners"),
    steps=_partners_steps,
    preflight=_partners_preflight,
    doc="pre/post sides and partner neurons → one record per synapse in the synapse DB",
)
