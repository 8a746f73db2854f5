"""Run a :class:`~cleftwise.blockwise.step.BlockStep` on a backend, with ledger, resume and retries.

Backends (``BackendConfig.backend``):

- ``local``: in-process, serial; for tests and debugging.
- ``daisy``: daisy 2.x ``Task`` + ``run_blockwise``; each worker process opens the task's
  resources once and pulls blocks from the daisy scheduler (bound to 127.0.0.1 unless
  ``host`` says otherwise). With ``worker_command`` (e.g. ``"srun -N1 -n1 {command}"``) each
  worker is launched through that template so it can land on another node.
- ``ray``: Ray actors (``workers`` of them, ``gpus_per_worker`` each) that open the resources
  once and process blocks handed out from a queue; ``address`` joins an existing cluster
  (``auto``, ``ray://host:port``); otherwise a local Ray without dashboard is started once
  per process and reused.
- ``dask``: ``dask.distributed`` workers (a ``LocalCluster`` of ``workers`` processes, or an
  existing scheduler ``address`` as dask-jobqueue gives on SLURM/PBS); each worker process
  keeps the task's resources open across blocks.

All backends share the ledger, so a job started on one can be resumed on another. A block
whose processing raises is retried ``max_retries`` times in the worker; a worker process that
dies has its block re-run elsewhere by the backend. Blocks that still fail end the job with a
:class:`BlockwiseError` naming them and their errors; other blocks' outputs stay intact.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import shlex
import socket
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

from cleftwise.blockwise import crashpoints
from cleftwise.blockwise.errors import BlockwiseError
from cleftwise.blockwise.grid import Block
from cleftwise.blockwise.ledger import Ledger, LedgerStatus
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
                              max_retries: int) -> Optional[str]:
    """Run ``fn(block)`` with retries; mark done on success. Returns the error text or None."""
    err = None
    for attempt in range(max_retries + 1):
        t0 = time.perf_counter()
        try:
            fn(block)
        except Exception:  # noqa: BLE001 - any error of the step is recorded for the report
            err = traceback.format_exc(limit=8)
            log.warning("block %d failed (try %d/%d): %s", block.block_id, attempt + 1,
                        max_retries + 1, err.strip().splitlines()[-1])
            continue
        crashpoints.hit("block_written", ledger.name)  # written, not yet marked done
        ledger.mark_done(block.block_id, time.perf_counter() - t0, _worker_name())
        return None
    ledger.mark_failed(block.block_id, err or "unknown error", max_retries + 1, _worker_name())
    return err


class _Progress:
    def __init__(self, total: int, initial: int, desc: str, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="block",
                            dynamic_ncols=True, mininterval=0.5)

    def set(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(max(0, n - self.bar.n))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# -- backends --------------------------------------------------------------------------------

def _run_local(task: BlockStep, todo: list[Block], ledger: Ledger, cfg: BackendConfig,
               progress: _Progress, done_before: int) -> None:
    with task.worker() as fn:
        prefetch = getattr(fn, "prefetch", None)
        for i, block in enumerate(todo):
            if prefetch is not None and i + 1 < len(todo):
                prefetch(todo[i + 1])  # start reading the next block's input while this one runs
            process_block_with_ledger(fn, block, ledger, cfg.max_retries)
            progress.set(done_before + i + 1)


class _DaisyWorker:
    """0-arg daisy worker function: opens the task once, then pulls blocks from daisy."""

    def __init__(self, task: BlockStep, ledger_path: str, max_retries: int,
                 worker_command: Optional[str], payload_path: str):
        self.task = task
        self.ledger_path = ledger_path
        self.max_retries = max_retries
        self.worker_command = worker_command
        self.payload_path = payload_path

    def __call__(self):
        if self.worker_command:
            command = f"{shlex.quote(sys.executable)} -m cleftwise.blockwise.daisy_worker {shlex.quote(self.payload_path)}"
            full = self.worker_command.format(command=command)
            proc = subprocess.run(full, shell=True, env=os.environ.copy())
            if proc.returncode != 0:
                raise RuntimeError(f"worker command exited with {proc.returncode}: {full}")
            return
        daisy_worker_loop(self.task, self.ledger_path, self.max_retries)


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


def _run_daisy(task: BlockStep, todo: list[Block], ledger: Ledger, cfg: BackendConfig,
               progress: _Progress, done_before: int) -> None:
    import daisy
    from funlib.geometry import Roi

    blocks = task.blocks()
    # daisy tiles the same grid: total = union of write ROIs, block = the full write shape
    total = blocks[0].write_roi
    for b in blocks[1:]:
        total = total.union(b.write_roi)
    shape = blocks[0].write_roi.shape
    template = Roi((0,) * 3, shape)
    todo_begins = {tuple(b.write_roi.begin) for b in todo}
    payload_path = os.path.join(ledger.path, "daisy_worker_payload.pkl")
    with open(payload_path, "wb") as f:
        import cloudpickle

        cloudpickle.dump({"task": task, "ledger_path": ledger.path, "max_retries": cfg.max_retries}, f)

    def check(dblock) -> bool:
        return tuple(dblock.write_roi.begin) not in todo_begins

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dtask = daisy.Task(
            f"cleftwise_{task.name}", total_roi=total, read_roi=template, write_roi=template,
            process_function=_DaisyWorker(task, ledger.path, cfg.max_retries, cfg.worker_command,
                                          payload_path),
            check_function=check, read_write_conflict=False, fit="shrink",
            max_workers=int(cfg.workers), max_retries=int(cfg.max_retries),
            timeout=cfg.block_timeout)
    # daisy's worker logs go under the job's ledger, not ./daisy_logs of whatever the cwd is
    # (process-global in daisy 2; workers adopt it from the scheduler's context)
    from daisy.logging import get_log_basedir, set_log_basedir

    before = get_log_basedir()
    set_log_basedir(os.path.join(ledger.path, "daisy_logs"))
    try:
        daisy.run_blockwise([dtask], host=cfg.host, progress=cfg.progress, summary=False)
    except RuntimeError as e:  # abandonment after repeated worker deaths
        log.error("daisy abandoned the task: %s", e)
    finally:
        set_log_basedir(before)


_RAY_ACTOR_CLS = None


def _ray_actor_class():
    global _RAY_ACTOR_CLS
    if _RAY_ACTOR_CLS is None:
        import ray

        class _RayBlockWorker:
            def __init__(self, task: BlockStep, ledger_path: str, max_retries: int):
                self._cm = task.worker()
                self._fn = self._cm.__enter__()
                self._ledger = Ledger(ledger_path)
                self._retries = max_retries

            def process(self, block: Block):
                return process_block_with_ledger(self._fn, block, self._ledger, self._retries)

            def close(self):
                self._cm.__exit__(None, None, None)

        _RAY_ACTOR_CLS = ray.remote(_RayBlockWorker)
    return _RAY_ACTOR_CLS


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


def _run_ray(task: BlockStep, todo: list[Block], ledger: Ledger, cfg: BackendConfig,
             progress: _Progress, done_before: int) -> None:
    ray = ensure_ray(cfg.address, num_cpus=max(int(cfg.workers), os.cpu_count() or 1))
    from ray.exceptions import RayActorError

    Actor = _ray_actor_class()
    opts = dict(num_cpus=cfg.cpus_per_worker, num_gpus=cfg.gpus_per_worker, max_restarts=0)
    task_ref = ray.put(task)
    n = min(int(cfg.workers), len(todo))
    actors = [Actor.options(**opts).remote(task_ref, ledger.path, cfg.max_retries) for _ in range(n)]
    queue = list(reversed(todo))
    deaths: dict[int, int] = {}
    dead: list = []
    running = {}
    finished = 0

    def submit(actor):
        block = queue.pop()
        running[actor.process.remote(block)] = (actor, block)

    for a in actors:
        if queue:
            submit(a)
    try:
        while running:
            ready, _ = ray.wait(list(running), num_returns=1)
            ref = ready[0]
            actor, block = running.pop(ref)
            try:
                ray.get(ref)
            except RayActorError as e:  # the worker process died: replace it, re-queue the block
                deaths[block.block_id] = deaths.get(block.block_id, 0) + 1
                if deaths[block.block_id] > cfg.max_retries:
                    ledger.mark_failed(block.block_id, f"worker died: {e}", deaths[block.block_id])
                else:
                    queue.append(block)
                dead.append(actor)
                actor = Actor.options(**opts).remote(task_ref, ledger.path, cfg.max_retries)
                actors.append(actor)
            else:
                finished += 1
                progress.set(done_before + finished)
            if queue:
                submit(actor)
    finally:
        live = [a for a in actors if a not in dead]
        closing = []
        for a in live:  # close each worker's resources (model, DB connection) before ending it
            with contextlib.suppress(Exception):
                closing.append(a.close.remote())
        with contextlib.suppress(Exception):
            ray.wait(closing, num_returns=len(closing), timeout=30)
        for a in actors:
            with contextlib.suppress(Exception):
                ray.kill(a)


def _dask_contexts() -> dict:
    """This dask worker's open step contexts, by run key (kept on the worker object)."""
    from distributed import get_worker

    worker = get_worker()
    if not hasattr(worker, "_cleftwise_contexts"):
        worker._cleftwise_contexts = {}
    return worker._cleftwise_contexts


def _dask_process(task: BlockStep, key: str, ledger_path: str, max_retries: int, block: Block):
    """Runs inside a dask worker process; the task's resources stay open between blocks."""
    contexts = _dask_contexts()
    entry = contexts.get(key)
    if entry is None:
        cm = task.worker()
        entry = (cm, cm.__enter__(), Ledger(ledger_path))
        contexts[key] = entry
    return process_block_with_ledger(entry[1], block, entry[2], max_retries)


def _dask_close(key: str, dask_worker=None) -> int:
    """Close the step context of run ``key`` on this worker (called on every worker at the end)."""
    contexts = getattr(dask_worker, "_cleftwise_contexts", {})
    entry = contexts.pop(key, None)
    if entry is not None:
        entry[0].__exit__(None, None, None)
        return 1
    return 0


def _run_dask(task: BlockStep, todo: list[Block], ledger: Ledger, cfg: BackendConfig,
              progress: _Progress, done_before: int) -> None:
    from distributed import Client, LocalCluster, as_completed

    cluster = None
    key = ""
    if cfg.address:
        client = Client(cfg.address, timeout="20s")
    else:
        cluster = LocalCluster(n_workers=int(cfg.workers), threads_per_worker=1, processes=True,
                               dashboard_address=None, silence_logs=logging.ERROR)
        client = Client(cluster)
    try:
        key = f"{task.name}:{ledger.path}:{time.time_ns()}"
        task_f = client.scatter(task, broadcast=True)
        futures = [client.submit(_dask_process, task_f, key, ledger.path, cfg.max_retries, b,
                                 pure=False, retries=cfg.max_retries, key=f"{task.name}-{b.block_id}-{key}")
                   for b in todo]
        finished = 0
        for fut in as_completed(futures):
            if fut.status == "error":
                b = todo[futures.index(fut)]
                ledger.mark_failed(b.block_id, f"dask worker failed: {fut.exception()!r}", cfg.max_retries + 1)
            finished += 1
            progress.set(done_before + finished)
    finally:
        with contextlib.suppress(Exception):
            client.run(_dask_close, key)
        client.close()
        if cluster is not None:
            cluster.close()


_RUNNERS = {"local": _run_local, "daisy": _run_daisy, "ray": _run_ray, "dask": _run_dask}


# -- public entry points -------------------------------------------------------------------

def task_status(task: BlockStep) -> LedgerStatus:
    """Blocks done / remaining / failed of ``task`` according to its ledger."""
    return Ledger(task.ledger_path()).status(len(task.blocks()))


def run_task(task: BlockStep, backend: Optional[BackendConfig] = None, overwrite: bool = False
             ) -> RunReport:
    """Run every block of ``task`` that is not done yet; raise if any block fails for good.

    The job identity (``task.job_settings()``) is checked against the ledger: resuming a job whose
    settings changed raises :class:`BlockwiseError` unless ``overwrite``.
    """
    cfg = backend or BackendConfig()
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
    progress = _Progress(len(blocks), len(blocks) - len(todo), task.name, cfg.progress)
    try:
        if todo:
            _RUNNERS[cfg.backend](task, todo, ledger, cfg, progress, len(blocks) - len(todo))
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
