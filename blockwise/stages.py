"""Stages: named groups of blockwise steps that register themselves and run in order.

A stage is one :class:`Stage` record: its name, its own config dataclass (one section of the
run's config, named after the stage), the stages whose outputs it reads (``after``), and
either ``steps`` (a function building its :class:`~cleftwise.blockwise.step.BlockStep` passes,
called lazily, pass by pass, because a later pass may read an earlier one's outputs) or ``run``
(a function doing a small non-blockwise job in the driver). A :class:`Registry` holds the
stages of an application in run order; nothing else dispatches on stage names.

What the engine does with them (:func:`run_stages`):

- each step resumes through its ledger; a step whose identity (config fields that change its
  output) changed since its ledger was written is re-run from scratch when the stage allows
  it (``rerun_on_change``), else refused as before (``--overwrite`` to discard);
- a stage that did work (processed blocks — or, when its ``finish`` reports ``rewrote``, that
  it rewrote its outputs) drops the
  ledgers of every stage downstream of it, so those run again on their new inputs — and only
  those: changing the partner rule re-runs partners and what follows, never the segmentation;
  a run interrupted inside a stage (killed, failed: ``stage_running.json`` is left in the
  stage's ledger folder) counts as work there, so the next run drops the stages downstream;
- every pass of every stage of one call runs on one worker pool
  (:mod:`cleftwise.blockwise.pool`): worker processes start once per run, not per pass.

Knows nothing of synapses: the run config is opaque here (stage sections are its attributes).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

from cleftwise.blockwise import crashpoints
from cleftwise.blockwise.errors import BlockwiseError
from cleftwise.blockwise.ledger import Ledger, atomic_write_json, job_identity
from cleftwise.blockwise.pool import WorkerPool, worker_pool
from cleftwise.blockwise.runner import BackendConfig, run_task, task_status
from cleftwise.blockwise.step import BlockStep

__all__ = ["Stage", "Registry", "run_stages", "stages_status", "preflight_stages", "drop_stage"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    """One registered stage (see the module docstring)."""

    name: str
    """stage name: the key of its config section and of ``--stages``"""
    config: type
    """its config dataclass (the section ``<name>:`` of the run config)"""
    work_dir: Callable[[Any, Any], str]
    """(run config, stage config) → folder of this stage's ledgers and scratch files (the same
    folder its steps use, so dropping the stage drops their ledgers)"""
    after: tuple = ()
    """stages whose outputs it reads (they run first; their changes re-run this one)"""
    steps: Optional[Callable[[Any, Any], Iterable[BlockStep]]] = None
    """(run config, stage config) → its blockwise passes, in order (built lazily)"""
    run: Optional[Callable[[Any, Any], dict]] = None
    """(run config, stage config) → summary: a non-blockwise stage run in the driver"""
    skip: Optional[Callable[[Any, Any], Optional[str]]] = None
    """(run config, stage config) → a reason to skip the stage, or None"""
    preflight: Optional[Callable[[Any, Any], None]] = None
    """(run config, stage config) → raises if the stage's inputs are unusable (before any work)"""
    rerun_on_change: bool = True
    """re-run from scratch when the identity changed (False: refuse; --overwrite discards)"""
    doc: str = ""
    """one line for the config reference"""

    def __post_init__(self):
        if (self.steps is None) == (self.run is None):
            raise BlockwiseError(f"stage {self.name}: give exactly one of steps or run")
        if not dataclasses.is_dataclass(self.config):
            raise BlockwiseError(f"stage {self.name}: config must be a dataclass")


class Registry:
    """The stages of an application, in registration (= run) order."""

    def __init__(self, *stages: Stage):
        self._stages: dict[str, Stage] = {}
        for s in stages:
            self.register(s)

    def register(self, stage: Stage) -> Stage:
        if stage.name in self._stages:
            raise BlockwiseError(f"stage {stage.name!r} is registered twice")
        missing = [a for a in stage.after if a not in self._stages]
        if missing:
            raise BlockwiseError(f"stage {stage.name!r} runs after {missing}, which are not registered "
                                 "before it")
        self._stages[stage.name] = stage
        return stage

    @property
    def names(self) -> tuple:
        return tuple(self._stages)

    def __iter__(self):
        return iter(self._stages.values())

    def __getitem__(self, name: str) -> Stage:
        return self._stages[name]

    def check(self, names: Iterable[str]) -> tuple:
        """``names`` in run order; unknown names raise :class:`BlockwiseError`."""
        names = tuple(names)
        unknown = [n for n in names if n not in self._stages]
        if unknown:
            raise BlockwiseError(f"unknown stage(s) {unknown}; stages are {', '.join(self.names)}")
        return tuple(n for n in self._stages if n in names)

    def downstream(self, name: str) -> list[str]:
        """Every stage that reads ``name``'s outputs, directly or through others, in run order."""
        out: list[str] = []
        for s in self._stages.values():
            if any(a == name or a in out for a in s.after):
                out.append(s.name)
        return out


def _changed_identity(step: BlockStep) -> Optional[list]:
    """The settings that changed since ``step``'s ledger was written (None: same or no ledger)."""
    old = Ledger(step.ledger_path()).read_job()
    if old is None:
        return None
    settings = step.job_settings()
    if old.get("identity") == job_identity(settings):
        return None
    import json

    before = old.get("settings", {})
    return sorted(k for k in set(before) | set(settings)
                  if json.dumps(before.get(k), sort_keys=True, default=str)
                  != json.dumps(settings.get(k), sort_keys=True, default=str))


def drop_stage(registry: Registry, run_cfg: Any, name: str) -> None:
    """Forget that ``name`` ran: its ledgers go (outputs are recreated when it runs again)."""
    ledgers = os.path.join(os.path.abspath(registry[name].work_dir(run_cfg, getattr(run_cfg, name))), "ledger")
    if os.path.isdir(ledgers):
        log.info("stage %s: its inputs changed, it will run again (%s dropped)", name, ledgers)
        for sub in sorted(os.listdir(ledgers)):  # job.json files first: a kill half-way never
            if os.path.isdir(os.path.join(ledgers, sub)):  # leaves a ledger that resumes
                Ledger(os.path.join(ledgers, sub)).clear()
        shutil.rmtree(ledgers)


def _running_marker(stage: Stage, run_cfg: Any) -> str:
    """``<work_dir>/ledger/stage_running.json``: present while the stage runs. Found at the
    start of a run, it says an earlier run was interrupted inside the stage, which may have
    changed its outputs without dropping the stages downstream yet: they are dropped now."""
    return os.path.join(os.path.abspath(stage.work_dir(run_cfg, getattr(run_cfg, stage.name))), "ledger",
                        "stage_running.json")


def preflight_stages(registry: Registry, run_cfg: Any, names: Iterable[str]) -> None:
    """Run the ``preflight`` checks of the stages ``names`` (not skipped) before any work."""
    for name in registry.check(names):
        stage = registry[name]
        cfg = getattr(run_cfg, name)
        if stage.preflight and not (stage.skip and stage.skip(run_cfg, cfg)):
            stage.preflight(run_cfg, cfg)


def run_stages(registry: Registry, run_cfg: Any, names: Iterable[str], backend: BackendConfig,
               overwrite: bool = False, pool: Optional[WorkerPool] = None) -> dict:
    """Run the stages ``names`` of ``registry`` in order; returns per-stage reports and seconds,
    and under ``workers`` the worker processes the run started and their start-up times (s).

    Every pass of every stage runs on one worker pool (``pool``, or one made for this call and
    closed at its end, also on an error or Ctrl-C)."""
    names = registry.check(names)
    if pool is None:
        with worker_pool(backend) as own:
            return run_stages(registry, run_cfg, names, backend, overwrite, pool=own)
    summary: dict = {"stages": {}, "seconds": {}}
    try:
        for k, name in enumerate(names, 1):
            try:
                _run_stage(registry, run_cfg, registry[name], backend, overwrite, summary, pool,
                           position=f"{k}/{len(names)}")
            except KeyboardInterrupt as e:  # Ctrl-C: where it stopped, for a one-line report
                where = getattr(e, "cleftwise_where", None)
                e.cleftwise_where = f"stage {name}" + (f" ({where})" if where else "")
                raise
            crashpoints.hit("stage_finished", name)
    finally:
        summary["workers"] = pool.stats()
    return summary


def _run_stage(registry: Registry, run_cfg: Any, stage: Stage, backend: BackendConfig,
               overwrite: bool, summary: dict, pool: WorkerPool, position: str = "") -> None:
    """One stage into ``summary``: its ``run``, or its passes in order (see the module docstring);
    ``position`` (``k/N``: the stage's place in the run) labels its progress bars."""
    name, cfg = stage.name, getattr(run_cfg, stage.name)
    t0 = time.perf_counter()
    reason = stage.skip(run_cfg, cfg) if stage.skip else None
    if reason:
        log.warning("stage %s: skipped, %s", name, reason)
        summary["stages"][name] = {"skipped": reason}
        return
    log.info("stage %s: start%s", name, f" ({position})" if position else "")
    if stage.run is not None:
        summary["stages"][name] = stage.run(run_cfg, cfg)
    else:
        marker = _running_marker(stage, run_cfg)
        did_work = os.path.exists(marker)  # interrupted inside this stage before
        os.makedirs(os.path.dirname(marker), exist_ok=True)
        atomic_write_json(marker, {"stage": name, "started": time.time()})
        reports, later_fresh = [], False
        for step in stage.steps(run_cfg, cfg):
            # a pass that ran afresh or processed blocks invalidates the later passes of the stage
            fresh = overwrite or later_fresh
            changed = None if fresh else _changed_identity(step)
            if changed and stage.rerun_on_change:
                log.info("%s: settings changed (%s): running it again from scratch", step.name,
                         ", ".join(changed))
                fresh = True
            report = run_task(step, backend, overwrite=fresh, pool=pool,
                              label=f"[{position}] {step.name}" if position else None)
            later_fresh |= fresh or report.processed > 0
            # a finish that reports ``rewrote`` decides (its product is what it rewrote, e.g.
            # DB records); otherwise processed blocks changed the outputs
            did_work |= (bool(report.extra["rewrote"]) if "rewrote" in report.extra
                         else report.processed > 0)
            reports.append(report.to_dict())
        if did_work:
            for later in registry.downstream(name):
                drop_stage(registry, run_cfg, later)
        os.remove(marker)
        summary["stages"][name] = reports[0] if len(reports) == 1 else reports
    summary["seconds"][name] = round(time.perf_counter() - t0, 2)
    log.info("stage %s: end (%.1f s)", name, time.perf_counter() - t0)


def stages_status(registry: Registry, run_cfg: Any) -> dict:
    """Per blockwise step: blocks done/remaining/failed (steps whose inputs do not exist yet:
    ``not_started`` with the reason)."""
    out: dict = {}
    for stage in registry:
        cfg = getattr(run_cfg, stage.name)
        if stage.steps is None or (stage.skip and stage.skip(run_cfg, cfg)):
            continue
        try:
            for step in stage.steps(run_cfg, cfg):
                st = task_status(step)
                out[step.name] = {"total": st.total, "done": st.done, "remaining": st.remaining,
                                  "failed": st.failed, **step.status_extra()}
        except Exception as e:  # noqa: BLE001 - a stage whose inputs are missing is "not started"
            out.setdefault(stage.name, {"not_started": str(e).splitlines()[0]})
    return out
