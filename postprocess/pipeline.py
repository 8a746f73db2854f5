"""The cleftwise pipeline: one YAML config, stages run in order, each resumable.

Stages (run any subset, in this order): ``predict`` (blockwise CNN → probability volume),
``segment`` (exact stitched connected components → synapse label volume), ``partners``
(pre/post voting and partner neurons → one record per synapse in ``synapses.parquet``,
written to the synapse DB), ``classify`` (E/I of every synapse in the DB, from EM cubes around
it), ``connectome`` (DB → neuron signs → signed edges → exports). Each blockwise stage is a :class:`blockwise.task.BlockTask` run by :func:`cleftwise.blockwise.runner.run_task`,
so every stage resumes through its ledger and can run on any backend.

Config layout (YAML; every key optional unless noted)::

    raw: data.zarr/raw              # required: raw EM volume URL
    output_dir: cleftwise_out       # where outputs and ledgers go
    roi: null                       # [[z, y, x] begin nm, [z, y, x] shape nm]
    backend: {backend: local, workers: 1, ...}     # blockwise.runner.BackendConfig
    predict: {checkpoint: model.pt, block_shape: [32, 256, 256], ...}  # PredictConfig
    neurons: null                   # uint64 neuron segmentation URL (for partners)
    segment: {threshold: 0.5, connectivity: 26, min_size: 50, ...}     # SegmentConfig
    classify: {checkpoint: ei.pt, block_shape: [64, 512, 512], ...}    # ClassifyConfig
    connectome: {min_synapses: 1, ...}                                 # SignConfig

A stage that writes the DB invalidates the stages downstream of it: when ``partners`` rewrites
the synapse records, the ``classify`` ledger is dropped so the E/I fields are filled again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Optional

from cleftwise.postprocess.predict import PredictConfig, PredictTask
from cleftwise.blockwise.runner import BackendConfig, run_task, task_status
from cleftwise.blockwise.task import BlockTask
from cleftwise.postprocess.classify import ClassifyConfig, ClassifyTask
from cleftwise.postprocess.connectome import SignConfig
from cleftwise.postprocess.segment import PartnersTask, SegmentConfig, segment_tasks
from cleftwise.storage.config_io import ConfigError, from_dict, to_dict

__all__ = ["PipelineConfig", "STAGES", "build_task", "run_pipeline", "pipeline_status"]

log = logging.getLogger(__name__)

STAGES = ("predict", "segment", "partners", "classify", "connectome")


@dataclass
class PipelineConfig:
    """The whole job: inputs, outputs, backend and one section per stage."""

    raw: str = ""
    """raw EM volume URL (z, y, x), uint8"""
    output_dir: str = "cleftwise_out"
    """folder for predictions, labels, ledgers, DB and exports"""
    roi: Optional[tuple] = None
    """[[z, y, x] begin nm, [z, y, x] shape nm]; default the whole raw volume"""
    backend: BackendConfig = field(default_factory=BackendConfig)
    """how blocks run: backend (local/daisy/ray/dask), workers, address, …"""
    predict: PredictConfig = field(default_factory=PredictConfig)
    """predict stage: checkpoint, block/patch/stride shapes (voxels), blending, dtype"""
    neurons: Optional[str] = None
    """uint64 neuron segmentation URL on the raw voxel grid (needed for partner neurons)"""
    db: Optional[str] = None
    """synapse DB URL: sqlite:///path.db or mongodb://host:port/db; default sqlite in output_dir"""
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    """segment + partners stages: thresholds, connectivity, size filter, polarity rule"""
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    """classify stage: E/I classifier checkpoint, block shape (voxels), batch, TTA, threshold;
    without a checkpoint the stage is skipped (with a warning) and neurons stay unsigned"""
    connectome: SignConfig = field(default_factory=SignConfig)
    """connectome stage: neuron signs (Dale's principle) and synapse/edge filters"""
    export_formats: tuple = ("csv", "parquet", "graphml", "npz", "neuroglancer")
    """files written by the connectome stage into <output_dir>/graph"""

    def __post_init__(self):
        if not self.raw:
            raise ConfigError("config: 'raw' (the raw EM volume URL) is required")

    @property
    def db_url(self) -> str:
        return self.db or "sqlite:///" + os.path.join(os.path.abspath(self.output_dir), "synapses.db")

    @property
    def predictions_url(self) -> str:
        return os.path.join(os.path.abspath(self.output_dir), "predictions.zarr", "pred")


def segment_config(cfg: PipelineConfig) -> SegmentConfig:
    s = cfg.segment
    return SegmentConfig(**{**to_dict(s), "predictions": s.predictions or cfg.predictions_url,
                            "output": s.output or os.path.join(os.path.abspath(cfg.output_dir),
                                                               "synapses.zarr", "labels"),
                            "work_dir": s.work_dir or os.path.join(os.path.abspath(cfg.output_dir),
                                                                   "segment"),
                            "neurons": s.neurons or cfg.neurons})


def classify_config(cfg: PipelineConfig) -> ClassifyConfig:
    c = cfg.classify
    return ClassifyConfig(**{**to_dict(c), "raw": c.raw or cfg.raw, "db": c.db or cfg.db_url,
                             "work_dir": c.work_dir or os.path.join(os.path.abspath(cfg.output_dir),
                                                                    "classify")})


def parse_config(data: dict, where: str = "config") -> PipelineConfig:
    return from_dict(PipelineConfig, data, where)


def build_tasks(cfg: PipelineConfig, stage: str) -> list[BlockTask]:
    """The BlockTasks of ``stage``, in order."""
    if stage == "segment":
        return segment_tasks(segment_config(cfg))
    if stage == "partners":
        return [PartnersTask(segment_config(cfg))]
    if stage == "classify":
        if not cfg.classify.checkpoint:
            raise ConfigError("classify: no classifier checkpoint configured (classify.checkpoint)")
        return [ClassifyTask(classify_config(cfg))]
    return [build_task(cfg, stage)]


def build_task(cfg: PipelineConfig, stage: str) -> BlockTask:
    """The (single) BlockTask of ``predict``; other stages see :func:`build_tasks`."""
    if stage == "predict":
        p = cfg.predict
        pc = PredictConfig(**{**to_dict(p), "input": p.input or cfg.raw,
                              "output": p.output or cfg.predictions_url,
                              "roi": p.roi if p.roi is not None else cfg.roi})
        return PredictTask(pc)
    raise ConfigError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")


def run_pipeline(cfg: PipelineConfig, stages: tuple = STAGES, overwrite: bool = False) -> dict:
    """Run ``stages`` in pipeline order; returns the run summary (also written as JSON)."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown}; stages are {', '.join(STAGES)}")
    preflight(cfg, stages)
    os.makedirs(cfg.output_dir, exist_ok=True)
    summary = {"config": to_dict(cfg), "stages": {}, "seconds": {}}
    for stage in STAGES:
        if stage not in stages:
            continue
        t0 = time.perf_counter()
        log.info("stage %s: start", stage)
        if stage == "connectome":
            summary["stages"][stage] = run_connectome(cfg)
            summary["seconds"][stage] = round(time.perf_counter() - t0, 2)
            log.info("stage %s: end (%.1f s)", stage, time.perf_counter() - t0)
            continue
        if stage == "classify" and not cfg.classify.checkpoint:
            log.warning("stage classify: skipped, no classifier checkpoint (classify.checkpoint); "
                        "neurons will have no E/I sign")
            summary["stages"][stage] = {"skipped": "no classify.checkpoint"}
            continue
        reports = []
        for task in _lazy_tasks(cfg, stage):
            reports.append(run_task(task, cfg.backend, overwrite=overwrite).to_dict())
        if stage == "partners":
            from cleftwise.postprocess.segment import store_synapses

            n, written = store_synapses(PartnersTask(segment_config(cfg)), cfg.db_url)
            reports[0]["synapses_in_db"] = n
            if written:  # records were replaced: their E/I fields must be filled again
                _drop_classify_ledger(cfg)
        summary["stages"][stage] = reports[0] if len(reports) == 1 else reports
        summary["seconds"][stage] = round(time.perf_counter() - t0, 2)
        log.info("stage %s: end (%.1f s, %d blocks processed, %d skipped)", stage,
                 time.perf_counter() - t0, sum(r["processed"] for r in reports),
                 sum(r["skipped"] for r in reports))
    with open(os.path.join(cfg.output_dir, "run_summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    return summary


def preflight(cfg: PipelineConfig, stages: tuple = STAGES) -> None:
    """Check what ``stages`` need before any work starts; one :class:`ConfigError` naming the
    problem: raw volume, checkpoints (present, readable, same voxel size as the raw volume),
    neuron segmentation on the raw voxel grid, a reachable synapse DB."""
    from cleftwise.models.checkpoint import read_checkpoint_meta
    from cleftwise.models.errors import ModelError
    from cleftwise.storage.errors import StorageError
    from cleftwise.storage.volume import check_same_voxel_size, open_volume

    def fail(msg: str, e: Exception) -> None:
        raise ConfigError(f"{msg}: {e}") from e

    raw = None
    try:
        raw = open_volume(cfg.raw)
    except StorageError as e:
        fail(f"raw volume {cfg.raw!r} cannot be opened", e)
    vs = tuple(int(v) for v in raw.voxel_size)
    checkpoints = []
    if "predict" in stages:
        checkpoints.append(("predict", cfg.predict.checkpoint))
    if "classify" in stages and cfg.classify.checkpoint:
        checkpoints.append(("classify", cfg.classify.checkpoint))
    for stage, path in checkpoints:
        if not path:
            raise ConfigError(f"{stage}: no checkpoint configured ({stage}.checkpoint)")
        try:
            meta = read_checkpoint_meta(path)
        except ModelError as e:
            fail(f"{stage}.checkpoint {path!r}", e)
        if tuple(int(v) for v in meta.voxel_size) != vs:
            raise ConfigError(f"{stage}.checkpoint {path} was trained at {tuple(meta.voxel_size)} nm but the raw "
                              f"volume {cfg.raw} has voxel size {vs} nm")
    neurons = cfg.segment.neurons or cfg.neurons
    if "partners" in stages and neurons:
        try:
            seg = open_volume(neurons)
        except StorageError as e:
            fail(f"neuron segmentation {neurons!r} cannot be opened", e)
        try:
            check_same_voxel_size([raw, seg])
        except StorageError as e:
            fail("neuron segmentation and raw volume", e)
    if any(s in stages for s in ("partners", "classify", "connectome")) and not cfg.db_url.startswith("sqlite"):
        from cleftwise.storage.db import open_store

        try:
            open_store(cfg.db_url).close()
        except StorageError as e:
            fail("synapse DB unreachable", e)


def run_connectome(cfg: PipelineConfig) -> dict:
    """Synapse DB → neuron signs → edges/nodes → exports in ``<output_dir>/graph``."""
    from cleftwise.postprocess.export import export_graph, signs_for
    from cleftwise.storage.db import open_store

    with open_store(cfg.db_url) as store:
        syn = store.query()
    signs = signs_for(syn, cfg.connectome)
    out = os.path.join(cfg.output_dir, "graph")
    written = export_graph(syn, out, cfg.export_formats, signs, cfg.connectome)
    edges = nodes = None
    import pandas as pd

    if "parquet" in written:
        edges = pd.read_parquet(os.path.join(out, "edges.parquet"))
        nodes = pd.read_parquet(os.path.join(out, "nodes.parquet"))
    elif "csv" in written:
        edges = pd.read_csv(os.path.join(out, "edges.csv"))
        nodes = pd.read_csv(os.path.join(out, "nodes.csv"))
    # signed_neurons counts the graph's nodes with a sign (as the demo's summary does);
    # signed_presynaptic also counts signed neurons none of whose synapses became an edge
    signed_nodes = None if nodes is None or "sign" not in nodes else int((nodes["sign"].fillna(0) != 0).sum())
    return {"synapses": int(len(syn)), "signed_neurons": signed_nodes,
            "signed_presynaptic": int(0 if signs is None else len(signs)),
            "edges": None if edges is None else int(len(edges)), "files": written}


def _drop_classify_ledger(cfg: PipelineConfig) -> None:
    work = classify_config(cfg).work_dir
    if os.path.isdir(work):
        log.info("partners rewrote the synapse DB: classify will run again (%s dropped)", work)
        shutil.rmtree(work)


def _lazy_tasks(cfg: PipelineConfig, stage: str):
    """Build each pass only when the previous one finished (later passes read its outputs)."""
    if stage == "segment":
        from cleftwise.postprocess.segment import SegmentLabelTask, SegmentRelabelTask, SegmentStitchTask

        sc = segment_config(cfg)
        for cls in (SegmentLabelTask, SegmentStitchTask, SegmentRelabelTask):
            yield cls(sc)
    else:
        yield from build_tasks(cfg, stage)


def pipeline_status(cfg: PipelineConfig) -> dict:
    """Per stage: blocks done/remaining/failed (stages whose inputs don't exist yet: None)."""
    out = {}
    for stage in STAGES:
        if stage == "connectome" or (stage == "classify" and not cfg.classify.checkpoint):
            continue
        try:
            for task in build_tasks(cfg, stage):
                st = task_status(task)
                out[task.name] = {"total": st.total, "done": st.done, "remaining": st.remaining,
                                  "failed": st.failed}
        except Exception as e:  # noqa: BLE001 - a stage whose inputs are missing is "not started"
            out[stage] = {"not_started": str(e).splitlines()[0]}
    out["synapse_db"] = _db_status(cfg.db_url)
    return out


def _db_status(url: str) -> dict:
    """Records in the synapse DB and how many carry an E/I call (or why it cannot be read)."""
    from cleftwise.storage.db import open_store

    if url.startswith("sqlite:///") and not os.path.exists(url[len("sqlite:///"):]):
        return {"url": url, "synapses": 0}
    try:
        with open_store(url) as store:
            n = store.count()
            classified = int(store.query(columns=["ei_prob"])["ei_prob"].notna().sum()) if n else 0
        return {"url": url, "synapses": int(n), "classified": classified}
    except Exception as e:  # noqa: BLE001 - status reports, it does not fail
        return {"url": url, "error": str(e).splitlines()[0]}
