"""Run a :class:`~cleftwise.blockwise.step.BlockStep` on a backend, with ledger, resume and retries.

Backends (``BackendConfig.backend``; their workers: :mod:`cleftwise.blockwise.pool`):

- ``local``: in-process, serial; for tests and debugging.
- ``daisy``: daisy 2.x ``Task`` + ``run_blockwise`` schedules the blocks (bound to 127.0.0.1
  unless ``host`` says otherwise); long-lived worker processes, launched directly or through
  ``worker_command`` (e.g. ``"srun -N1 -n1 {command}"``) so they can land on other nodes,
  open each pass's resources once and pull its blocks.
- ``ray``: Ray actors (``workers`` of them, ``gpus_per_worker`` each) that open the resources
  once per pass and process blocks handed out from a queue; ``address`` joins an existing
  cluster (``auto``, ``ray://host:port``); otherwise a local Ray without dashboard is started
  once per process and reused.
- ``dask``: ``dask.distributed`` workers (a ``LocalCluster`` of ``workers`` processes, or an
  existing scheduler ``address`` as dask-jobqueue gives on SLURM/PBS); each worker process
  keeps the pass's resources open across blocks.

Workers live for a whole run when the caller passes a pool (``with worker_pool(cfg) as pool:
run_task(step, cfg, pool=pool)``, as :func:`~cleftwise.blockwise.stages.run_stages` does);
without one, ``run_task`` starts and closes a pool for its pass alone.

All backends share the ledger, so a job started on one can be resumed on another. A block
whose processing raises is retried ``max_retries`` times in the worker; a worker process that
dies has its block re-run elsewhere by the backend. Blocks that still fail end the job with a
:class:`BlockwiseError` naming them and their errors; other blocks' outputs stay intact.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional

from cleftwise.blockwise import crashpoints
from cleftwise.blockwise.errors import BlockwiseError
from cleftwise.blockwise.grid import Block
from cleftwise.blockwise.ledger import Ledger, LedgerStatus
from cleftwise.blockwise.progress import ProgressBar, block_progress, progress_dir
from cleftwise.blockwise.step import BlockStep

__all__ = ["BackendConfig", "RunReport", "run_task", "task_status", "BACKENDS"]

log = logging.getLogger(__name__)

BACKENDS = ("local", "daisy", "ray", "dask")


@dataclass
class BackendConfig:
    """How blocks are executed."""

    backend: str = "local"
    """one of local, daisy, ray, dask"""
    workers: int = 1
    """number of worker processes/actors"""
    max_retries: int = 2
    """extra tries of a block whose processing raises"""
    address: Optional[str] = None
    """ray: 'auto' or 'ray://host:port'; dask: scheduler address 'tcp://host:port'"""
    gpus_per_worker: float = 0.0
    """ray: GPUs per actor (1 for one actor per GPU)"""
    cpus_per_worker: float = 1.0
    """ray: CPUs per actor"""
    worker_command: Optional[str] = None
    """daisy: template launching one worker, with '{command}' (e.g. 'srun -n1 {command}')"""
    host: str = "127.0.0.1"
    """daisy: address the scheduler binds to and tells workers"""
    block_timeout: Optional[float] = None
    """daisy: seconds after which a stuck block's worker is killed and the block re-run"""
    progress: bool = True
    """show a tqdm progress bar"""

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise BlockwiseError(f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        if int(self.workers) < 1:
            raise BlockwiseError(f"workers must be >= 1, got {self.workers}")
        if int(self.max_retries) < 0:
            raise BlockwiseError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.worker_command is not None and "{command}" not in self.worker_command:
            raise BlockwiseError(
                f"worker_command {self.worker_command!r} must contain '{{command}}' where the "
                "worker command goes")


@dataclass
class RunReport:
    """What a run did."""

    task: str
    total: int
    skipped: int
    processed: int
    seconds: float
    resumed: bool
    failed: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    """what the step's ``finish`` reported (e.g. ``rewrote``: it rewrote shared outputs)"""

    def to_dict(self) -> dict:
        return dict(task=self.task, total=self.total, skipped=self.skipped,
                    processed=self.processed, seconds=round(self.seconds, 3),
                    resumed=self.resumed, failed={str(k): v for k, v in self.failed.items()},
                    **self.extra)


def _worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def process_block_with_ledger(fn: Callable[[Block], None], block: Block, ledger: Ledger,
                              max_retries: int,
                              on_progress: Optional[Callable[[int, float], None]] = None) -> Optional[str]:
    """Run ``fn(block)`` with retries; mark done on success, with the integer counters ``fn``
    returned (a dict, e.g. forward passes run; None: none). Returns the error text or None.

    Progress the step reports inside the block (:func:`cleftwise.blockwise.progress.report`)
    goes to ``on_progress(block_id, fraction)`` (the driver's bar, local backend), else to this
    worker's progress file under the ledger, which the driver's bar polls."""
    err = None
    for attempt in range(max_retries + 1):
        t0 = time.perf_counter()
        try:
            with block_progress(block.block_id, callback=on_progress,
                                folder=None if on_progress else progress_dir(ledger.path),
                                worker=_worker_name()):
                counters = fn(block)
        except Exception:  # noqa: BLE001 - any error of the step is recorded for the report
            err = traceback.format_exc(limit=8)
            log.warning("block %d failed (try %d/%d): %s", block.block_id, attempt + 1,
                        max_retries + 1, err.strip().splitlines()[-1])
            continue
        crashpoints.hit("block_written", ledger.name)  # written, not yet marked done
        ledger.mark_done(block.block_id, time.perf_counter() - t0, _worker_name(),
                         counters=counters if isinstance(counters, dict) else None)
        return None
    ledger.mark_failed(block.block_id, err or "unknown error", max_retries + 1, _worker_name())
    return err


# -- backends --------------------------------------------------------------------------------

def _run_local(task: BlockStep, todo: list[Block], ledger: Ledger, cfg: BackendConfig,
               progress: ProgressBar, done_before: int) -> None:
    with task.worker() as fn:
        prefetch = getattr(fn, "prefetch", None)
        for i, block in enumerate(todo):
            if prefetch is not None and i + 1 < len(todo):
                prefetch(todo[i + 1])  # start reading the next block's input while this one runs
            process_block_with_ledger(fn, block, ledger, cfg.max_retries, on_progress=progress.partial)
            progress.block_done(block.block_id)
            progress.set(done_before + i + 1)


def daisy_worker_loop(task: BlockStep, ledger_path: str, max_retries: int) -> None:
    """Pull blocks from the daisy scheduler named in ``DAISY_CONTEXT`` until none are left."""
    import daisy

    ledger = Ledger(ledger_path)
    by_begin = {tuple(b.write_roi.begin): b for b in task.blocks()}
    client = daisy.Client()
    with task.worker() as fn:
        while True:
            with client.acquire_block() as dblock:
                if dblock is None:
                    return
                block = by_begin.get(tuple(dblock.write_roi.begin))
                if block is None:
                    raise BlockwiseError(f"daisy handed out an unknown block at {dblock.write_roi}")
                process_block_with_ledger(fn, block, ledger, max_retries)


def ensure_ray(address: Optional[str] = None, num_cpus: Optional[int] = None):
    """Start (once per process) or join Ray: no dashboard, no usage stats."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if not ray.is_initialized():
        kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=True,
                      logging_level=logging.WARNING)
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=num_cpus, **kwargs)
    return ray

# -- public entry points -------------------------------------------------------------------

def task_status(task: BlockStep) -> LedgerStatus:
    """Blocks done / remaining / failed of ``task`` according to its ledger."""
    return Ledger(task.ledger_path()).status(len(task.blocks()))


def run_task(task: BlockStep, backend: Optional[BackendConfig] = None, overwrite: bool = False,
             pool=None, label: Optional[str] = None) -> RunReport:
    """Run every block of ``task`` that is not done yet; raise if any block fails for good.

    The job identity (``task.job_settings()``) is checked against the ledger: resuming a job whose
    settings changed raises :class:`BlockwiseError` unless ``overwrite``. ``pool``: a
    :class:`~cleftwise.blockwise.pool.WorkerPool` of the run whose workers run the blocks
    (default: a pool for this pass alone, on ``backend``).
    """
    cfg = pool.cfg if pool is not None else (backend or BackendConfig())
    if backend is not None and pool is not None and backend.backend != pool.cfg.backend:
        raise BlockwiseError(f"task {task.name}: backend {backend.backend!r} but the worker pool "
                             f"runs {pool.cfg.backend!r}")
    t0 = time.perf_counter()
    blocks = task.blocks()
    if not blocks:
        raise BlockwiseError(f"task {task.name}: no blocks to process (empty ROI?)")
    ledger = Ledger(task.ledger_path())
    resumed = ledger.start(task.job_settings(), overwrite=overwrite)
    done = ledger.done_ids()
    # no block done yet (e.g. killed after job.json, before the outputs existed): start fresh
    task.prepare(fresh=not resumed or not done, overwrite=overwrite)
    todo = [b for b in blocks if b.block_id not in done]
    ledger.clear_failed(b.block_id for b in todo)
    log.info("%s: %d blocks, %d done before, %d to run on %s x%d", task.name, len(blocks),
             len(blocks) - len(todo), len(todo), cfg.backend, cfg.workers)
    remote = cfg.backend != "local"  # workers in other processes report through files
    shutil.rmtree(progress_dir(ledger.path), ignore_errors=True)  # a killed worker's leftovers
    progress = ProgressBar(len(blocks), len(blocks) - len(todo), label or task.name, cfg.progress,
                           folder=progress_dir(ledger.path) if remote else None,
                           done_fn=(lambda: len(ledger.done_ids())) if remote else None)
    try:
        if todo and cfg.backend == "local" and pool is None:
            _run_local(task, todo, ledger, cfg, progress, len(blocks) - len(todo))
        elif todo:
            if pool is None:
                from cleftwise.blockwise.pool import worker_pool

                with worker_pool(cfg, log_dir=os.path.join(ledger.path, "daisy_logs")) as own:
                    own.run_pass(task, todo, ledger, progress, len(blocks) - len(todo))
            else:
                pool.run_pass(task, todo, ledger, progress, len(blocks) - len(todo))
    except KeyboardInterrupt as e:  # Ctrl-C: the caller reports where it stopped, in one line
        e.cleftwise_where = f"{task.name}, {len(ledger.done_ids())} of {len(blocks)} blocks done"
        raise
    finally:
        progress.close()
    done_now = ledger.done_ids()
    failed = ledger.failed()
    missing = [b.block_id for b in blocks if b.block_id not in done_now and b.block_id not in failed]
    for b in missing:
        failed[b] = {"error": "block was not processed (worker lost or job abandoned)"}
    report = RunReport(task.name, len(blocks), len(blocks) - len(todo),
                       len([b for b in todo if b.block_id in done_now]), time.perf_counter() - t0,
                       resumed, failed)
    if failed:
        lines = []
        for bid in sorted(failed)[:10]:
            err = str(failed[bid].get("error", "")).strip().splitlines()
            lines.append(f"  block {bid}: {err[-1] if err else 'unknown error'}")
        more = f"\n  … and {len(failed) - 10} more" if len(failed) > 10 else ""
        raise BlockwiseError(
            f"task {task.name}: {len(failed)} of {len(blocks)} blocks failed "
            f"(block ids {sorted(failed)[:10]}); other blocks are done and kept. Errors:\n"
            + "\n".join(lines) + more + f"\nFull records: {ledger.failed_dir}. Re-run to retry them.")
    report.extra = dict(task.finish() or {})
    crashpoints.hit("pass_finished", task.name)
    log.info("%s: done in %.1f s (%d processed, %d skipped)", task.name, report.seconds,
             report.processed, report.skipped)
    return report
