"""The cleftwise pipeline: one YAML config, registered stages run in order, each resumable.

The stages are those of :mod:`cleftwise.postprocess.stages` (run any subset, in this order):
``predict`` (blockwise CNN → probability volume), ``segment`` (exact stitched connected
components → synapse label volume), ``partners`` (pre/post sides and partner neurons → one
record per synapse, written to the synapse DB), ``classify`` (E/I of every synapse in the DB,
from EM cubes around it), ``connectome`` (DB → neuron signs → signed edges → exports). The
engine (:mod:`cleftwise.blockwise.stages`) runs them: every blockwise step resumes through
its ledger; a stage whose settings changed runs again (predict refuses instead: --overwrite),
and a stage that did work re-runs the stages downstream of it — never those upstream.

Config layout (YAML; every key optional unless noted; one section per stage)::

    raw: data.zarr/raw              # required: raw EM volume URL
    output_dir: cleftwise_out       # where outputs and ledgers go
    roi: null                       # [[z, y, x] begin nm, [z, y, x] shape nm]
    neurons: null                   # uint64 neuron segmentation URL (for partners)
    db: null                        # synapse DB URL (default sqlite in output_dir)
    backend: {backend: local, workers: 1, ...}     # blockwise.runner.BackendConfig
    predict: {checkpoint: model.pt, block_shape: [32, 256, 256], ...}  # PredictConfig
    segment: {threshold: 0.5, connectivity: 26, min_size: 50, ...}     # SegmentConfig
    partners: {partner_rule: majority, dilate_nm: 0, ...}              # PartnersConfig
    classify: {checkpoint: ei.pt, block_shape: [64, 512, 512], ...}    # ClassifyConfig
    connectome: {min_synapses: 1, ...}                                 # SignConfig
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Optional

from cleftwise.blockwise import crashpoints
from cleftwise.blockwise.pool import worker_pool
from cleftwise.blockwise.runner import BackendConfig
from cleftwise.blockwise.stages import preflight_stages, run_stages, stages_status
from cleftwise.postprocess.errors import PostprocessError
from cleftwise.postprocess.run_lock import output_lock
from cleftwise.postprocess.stages import REGISTRY, STAGES
from cleftwise.storage.config_io import from_dict, to_dict

__all__ = ["RunConfig", "PipelineConfig", "STAGES", "parse_config", "run_pipeline", "pipeline_status",
           "preflight", "output_lock"]

log = logging.getLogger(__name__)


@dataclass
class RunConfig:
    """What every stage shares: inputs, outputs, backend."""

    raw: str = ""
    """raw EM volume URL (z, y, x), uint8"""
    output_dir: str = "cleftwise_out"
    """folder for predictions, labels, ledgers, DB and exports"""
    roi: Optional[tuple] = None
    """[[z, y, x] begin nm, [z, y, x] shape nm]; default the whole raw volume"""
    backend: BackendConfig = field(default_factory=BackendConfig)
    """how blocks run: backend (local/daisy/ray/dask), workers, address, …"""
    neurons: Optional[str] = None
    """uint64 neuron segmentation URL on the raw voxel grid (needed for partner neurons)"""
    db: Optional[str] = None
    """synapse DB URL: sqlite:///rel/path.db (relative), sqlite:////abs/path.db or
    mongodb://host:port/db; default sqlite in output_dir"""
    db_password_file: Optional[str] = None
    """file holding the DB password (first line), put into a DB URL that names a user without a
    password (mongodb://user@host/db) only when the DB is opened; or set CLEFTWISE_DB_PASSWORD"""
    export_formats: tuple = ("csv", "parquet", "graphml", "npz", "neuroglancer")
    """files written by the connectome stage into <output_dir>/graph"""
    missing_chunks: str = "error"
    """a chunk of an input volume (raw, neurons, predictions, labels) that was never written or
    was deleted: error (stop, naming the volume and ROI) or zeros (read it as zeros: only for a
    volume that is sparse on purpose)"""

    def __post_init__(self):
        if not self.raw:
            raise PostprocessError("config: 'raw' (the raw EM volume URL) is required")

    @property
    def db_url(self) -> str:
        return self.db or "sqlite:///" + os.path.join(os.path.abspath(self.output_dir), "synapses.db")

    @property
    def predictions_url(self) -> str:
        return os.path.join(os.path.abspath(self.output_dir), "predictions.zarr", "pred")

    @property
    def labels_url(self) -> str:
        return os.path.join(os.path.abspath(self.output_dir), "synapses.zarr", "labels")

    def missing_for(self, section) -> str:
        """A stage's ``missing_chunks``: "zeros" when the stage or the run opts in, else "error"."""
        return "zeros" if "zeros" in (section.missing_chunks, self.missing_chunks) else section.missing_chunks

    def stage_dir(self, name: str) -> str:
        """``<output_dir>/<stage>``: a stage's ledgers and scratch files."""
        return os.path.join(os.path.abspath(self.output_dir), name)


#: the whole job: :class:`RunConfig` plus one section per registered stage (built from the
#: registry, so a new stage adds its section here without an edit)
PipelineConfig = dataclasses.make_dataclass(
    "PipelineConfig",
    [(s.name, s.config, field(default_factory=s.config)) for s in REGISTRY],
    bases=(RunConfig,), namespace={"__module__": __name__, "__doc__": RunConfig.__doc__ + " One section per stage.",
                                   "__field_docs__": {s.name: f"{s.name} stage: {s.doc}" for s in REGISTRY}})

#: keys that moved between sections: a config using the old place gets an error naming the new one
_MOVED = {("segment", k): ("partners", k) for k in (
    "neurons", "polarity_mode", "side_threshold", "side_rule", "dilate_nm", "max_neuron_fraction",
    "partner_rule")}
_MOVED[("segment", "union_channel")] = ("segment", "channel")


def parse_config(data: dict, where: str = "config") -> "PipelineConfig":
    """The pipeline config from plain data; unknown keys and bad values raise
    :class:`PostprocessError` naming the file and key."""
    for (sec, key), (new_sec, new_key) in _MOVED.items():
        if key in ((data or {}).get(sec) or {}):
            hint = ("a channel name such as 'union' or 'cleft'" if new_key == "channel"
                    else f"its value under {new_sec}:")
            raise PostprocessError(f"{where}: {sec}.{key} is now {new_sec}.{new_key} ({hint})")
    return from_dict(PipelineConfig, data, where, error=PostprocessError)


def run_pipeline(cfg, stages: tuple = STAGES, overwrite: bool = False) -> dict:
    """Run ``stages`` in pipeline order; returns the run summary (also written as JSON)."""
    stages = REGISTRY.check(stages)
    preflight(cfg, stages)
    os.makedirs(cfg.output_dir, exist_ok=True)
    with output_lock(cfg.output_dir), \
            worker_pool(cfg.backend, log_dir=os.path.join(os.path.abspath(cfg.output_dir), "logs")) as pool:
        # one worker pool for every pass of every stage; ``workers`` in the summary: processes
        # started and each one's start-up (launch → ready, s)
        summary = {"config": _shown(to_dict(cfg)),
                   **run_stages(REGISTRY, cfg, stages, cfg.backend, overwrite=overwrite, pool=pool)}
        tmp = os.path.join(cfg.output_dir, f"run_summary.json.tmp{os.getpid()}")
        with open(tmp, "w") as f:
            json.dump(summary, f, indent=1, default=str)
        os.replace(tmp, os.path.join(cfg.output_dir, "run_summary.json"))
        crashpoints.hit("export_written", "run_summary")
    return summary


def _shown(conf: dict) -> dict:
    """The config as it may be written: DB URLs with passwords redacted."""
    from cleftwise.storage.db.urls import redact

    def conv(v, key=""):
        if isinstance(v, dict):
            return {k: conv(x, k) for k, x in v.items()}
        return redact(v) if key == "db" and isinstance(v, str) else v
    return conv(conf)


def preflight(cfg, stages: tuple = STAGES) -> None:
    """Check what ``stages`` need before any work starts: the raw volume opens, then each
    stage's own checks (checkpoints, neuron segmentation, DB); one :class:`PostprocessError`
    naming the problem."""
    from cleftwise.storage.db.credentials import use_password_file
    from cleftwise.storage.errors import StorageError
    from cleftwise.storage.volume import open_volume

    use_password_file(cfg.db_password_file)
    try:
        open_volume(cfg.raw)
    except StorageError as e:
        raise PostprocessError(f"raw volume {cfg.raw!r} cannot be opened: {e}") from e
    preflight_stages(REGISTRY, cfg, stages)


def pipeline_status(cfg) -> dict:
    """Per step: blocks done/remaining/failed (stages whose inputs don't exist yet: not_started)."""
    from cleftwise.storage.db.credentials import use_password_file

    use_password_file(cfg.db_password_file)
    out = stages_status(REGISTRY, cfg)
    out["synapse_db"] = _db_status(cfg.db_url)
    return out


def _db_status(url: str) -> dict:
    """Records in the synapse DB and how many carry an E/I call (or why it cannot be read)."""
    from cleftwise.storage.db import open_store

    from cleftwise.storage.db.urls import redact

    shown = redact(url)
    if url.startswith("sqlite:///") and not os.path.exists(url[len("sqlite:///"):]):
        return {"url": shown, "synapses": 0}
    try:
        with open_store(url) as store:
            n = store.count()
            classified = int(store.query(columns=["ei_prob"])["ei_prob"].notna().sum()) if n else 0
        return {"url": shown, "synapses": int(n), "classified": classified}
    except Exception as e:  # noqa: BLE001 - status reports, it does not fail
        return {"url": shown, "error": redact(str(e).splitlines()[0])}
