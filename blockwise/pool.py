"""One worker pool per run: worker processes that live across all passes of all stages.

``with worker_pool(backend_cfg) as pool:`` gives a pool whose workers start on the first pass
that has blocks to run and are closed when the ``with`` ends (also on an error or Ctrl-C);
``run_task(step, backend, pool=pool)`` runs a pass on it. Each worker opens a step's
resources (``BlockStep.worker()``: model, DB connection, volume handles) once for the pass
and closes them when the pass ends, so nothing outlives the run.

- ``daisy``: daisy stays the block scheduler (its ``Client.acquire_block`` protocol, retries,
  ``block_timeout``). ``workers`` long-lived processes (``python -m
  cleftwise.blockwise.daisy_worker``, locally or through ``worker_command`` such as ``srun -n1
  {command}``) connect to a broker in the driver (``multiprocessing.connection`` on ``host``,
  random authkey). The process daisy spawns for each worker slot of a pass
  (:mod:`cleftwise.blockwise.daisy_handoff`) hands its ``DAISY_CONTEXT`` to an idle pool worker
  through the broker and waits; the pool worker pulls that pass's blocks. A pool worker that
  dies (killed, or daisy's block watchdog) fails its slot, so daisy re-runs its block, and the
  pool starts a replacement.
- ``ray``: ``workers`` actors created once, each holding its open step contexts by pass; a
  dead actor is replaced and its block re-queued.
- ``dask``: one ``LocalCluster`` per run (no dashboard, distributed's INFO lines silenced), or
  the scheduler at ``address``; each worker keeps a pass's step context open between blocks;
  a worker that dies is restarted by its nanny and its block re-run (dask retries).

:meth:`WorkerPool.stats` reports the worker processes started and each one's start-up time
(launch → ready to take blocks, s).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import shlex
import subprocess
import sys
import threading
import time
import warnings
from typing import Optional

from cleftwise.blockwise.errors import BlockwiseError
from cleftwise.blockwise.grid import Block
from cleftwise.blockwise.ledger import Ledger
from cleftwise.blockwise.progress import ProgressBar
from cleftwise.blockwise.runner import (BackendConfig, _run_local, _worker_name,
                                        process_block_with_ledger)
from cleftwise.blockwise.step import BlockStep

__all__ = ["WorkerPool", "worker_pool"]

log = logging.getLogger(__name__)

#: seconds to wait for the pool's workers to report ready (srun may queue)
START_TIMEOUT_S = 600.0
#: seconds a closing pool waits for a worker to finish its block before killing it
CLOSE_TIMEOUT_S = 20.0


class WorkerPool:
    """The local backend's "pool": blocks run in the driver (no worker processes)."""

    def __init__(self, cfg: BackendConfig, log_dir: Optional[str] = None):
        self.cfg = cfg
        self.log_dir = log_dir
        self.started = False
        self.closed = False
        self.startup_s: dict = {}  # worker name (host:pid) → launch → ready, s
        self.workers_started = 0
        self.pool_start_s: Optional[float] = None

    # -- lifecycle ---------------------------------------------------------------------
    def _ensure_started(self) -> None:
        if self.closed:
            raise BlockwiseError("the worker pool is closed")
        if not self.started:
            t0 = time.perf_counter()
            self._start()
            self.started = True
            self.pool_start_s = time.perf_counter() - t0
            log.info("%s pool: %d workers ready in %.1f s", self.cfg.backend, self.workers_started,
                     self.pool_start_s)

    def _start(self) -> None:
        pass

    def close(self) -> None:
        """End every worker (idempotent)."""
        self.closed = True

    def stats(self) -> dict:
        """Worker processes started in this run and their start-up times (s)."""
        return {"backend": self.cfg.backend, "pool_size": 0 if self.cfg.backend == "local" else int(self.cfg.workers),
                "workers_started": self.workers_started,
                "pool_start_s": None if self.pool_start_s is None else round(self.pool_start_s, 3),
                "worker_startup_s": {k: (None if v is None else round(v, 3)) for k, v in self.startup_s.items()}}

    # -- one pass ----------------------------------------------------------------------
    def run_pass(self, task: BlockStep, todo: list[Block], ledger: Ledger, progress: ProgressBar,
                 done_before: int) -> None:
        """Run the blocks ``todo`` of ``task`` (its ledger records them)."""
        _run_local(task, todo, ledger, self.cfg, progress, done_before)


# -- daisy ----------------------------------------------------------------------------------

class _DaisyMember:
    """The broker's handle of one connected pool worker."""

    def __init__(self, conn, name: str):
        self.conn = conn
        self.name = name
        self.lock = threading.Lock()

    def send(self, msg) -> None:
        with self.lock:
            self.conn.send(msg)


class DaisyPool(WorkerPool):
    """Long-lived daisy workers fed through a broker (see the module docstring)."""

    def __init__(self, cfg: BackendConfig, log_dir: Optional[str] = None):
        super().__init__(cfg, log_dir)
        self._procs: list = []
        self._logs: list = []
        self._members: list[_DaisyMember] = []
        self._idle: "queue.Queue[_DaisyMember]" = queue.Queue()
        self._lock = threading.Lock()
        self._listener = None
        self._authkey = b""

    def _start(self) -> None:
        from multiprocessing.connection import Listener

        self._authkey = os.urandom(32)
        self._listener = Listener((self.cfg.host, 0), authkey=self._authkey)
        threading.Thread(target=self._accept_loop, name="cleftwise-pool-broker", daemon=True).start()
        for _ in range(int(self.cfg.workers)):
            self._launch()
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            with self._lock:
                ready = len(self._members)
            if ready >= int(self.cfg.workers):
                return
            dead = [p for p in self._procs if p.poll() is not None and p.returncode != 0]
            if dead or time.monotonic() > deadline:
                where = f"; its output is in {self.log_dir}" if self.log_dir else ""
                why = (f"exited with code {dead[0].returncode}" if dead
                       else f"did not report ready within {START_TIMEOUT_S:.0f} s")
                raise BlockwiseError(f"daisy worker pool: a worker {why} ({ready} of "
                                     f"{self.cfg.workers} ready){where}")
            time.sleep(0.02)

    @property
    def address(self) -> tuple:
        return self._listener.address

    def _launch(self) -> None:
        """Start one pool worker (locally, or through ``worker_command``)."""
        host, port = self.address
        cmd = [sys.executable, "-m", "cleftwise.blockwise.daisy_worker", "--pool", f"{host}:{port}"]
        from cleftwise.blockwise.daisy_worker import ENV_AUTHKEY, ENV_T0

        env = dict(os.environ)
        env[ENV_AUTHKEY] = self._authkey.hex()
        env[ENV_T0] = repr(time.time())
        out = None
        if self.log_dir:
            os.makedirs(self.log_dir, exist_ok=True)
            out = open(os.path.join(self.log_dir, f"pool_worker_{len(self._procs)}.log"), "ab")
            self._logs.append(out)
        if self.cfg.worker_command:
            full = self.cfg.worker_command.format(command=shlex.join(cmd))
            proc = subprocess.Popen(full, shell=True, env=env, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT if out else None)
        else:
            proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT if out else None)
        self._procs.append(proc)
        self.workers_started += 1

    def _accept_loop(self) -> None:
        while not self.closed:
            try:
                conn = self._listener.accept()
            except Exception:  # noqa: BLE001 - closed listener, or a client that failed the authkey
                if self.closed:
                    return
                continue
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                conn.close()
                continue
            if msg[0] == "worker":
                member = _DaisyMember(conn, msg[1])
                with self._lock:
                    self._members.append(member)
                    self.startup_s[msg[1]] = msg[2]
                self._idle.put(member)
            elif msg[0] == "run":
                threading.Thread(target=self._serve_slot, args=(conn, msg[1], msg[2]),
                                 name="cleftwise-pool-slot", daemon=True).start()
            else:
                conn.close()

    def _take_idle(self) -> Optional[_DaisyMember]:
        """An idle pool worker; None when the pool closes or every worker process has exited."""
        while not self.closed:
            try:
                return self._idle.get(timeout=0.2)
            except queue.Empty:
                with self._lock:
                    if self._procs and all(p.poll() is not None for p in self._procs):
                        return None
        return None

    def _serve_slot(self, conn, context: str, payload_path: str) -> None:
        """One daisy worker slot: hand its context to an idle pool worker, relay the answer."""
        member = self._take_idle()
        if member is None:
            reply = ("error", "the worker pool is closing or has no live worker")
        else:
            try:
                member.send(("run", context, payload_path))
                reply = member.conn.recv()
            except (EOFError, OSError):
                reply = ("died", f"pool worker {member.name} died")
                log.warning("daisy pool: worker %s died; starting a replacement", member.name)
                with self._lock:
                    if member in self._members:
                        self._members.remove(member)
                    if not self.closed:
                        self._launch()
            else:
                self._idle.put(member)
        with contextlib.suppress(OSError, EOFError):
            conn.send(reply)
        with contextlib.suppress(OSError):
            conn.close()

    def run_pass(self, task, todo, ledger, progress, done_before) -> None:
        self._ensure_started()
        import cloudpickle
        import daisy
        from funlib.geometry import Roi

        from cleftwise.blockwise import daisy_handoff

        blocks = task.blocks()
        # daisy tiles the same grid: total = union of write ROIs, block = the full write shape
        total = blocks[0].write_roi
        for b in blocks[1:]:
            total = total.union(b.write_roi)
        template = Roi((0,) * 3, blocks[0].write_roi.shape)
        todo_begins = {tuple(b.write_roi.begin) for b in todo}
        payload_path = os.path.join(ledger.path, "daisy_worker_payload.pkl")
        tmp = f"{payload_path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            cloudpickle.dump({"task": task, "ledger_path": ledger.path, "max_retries": self.cfg.max_retries}, f)
        os.replace(tmp, payload_path)
        with self._lock:
            members = list(self._members)
        for m in members:  # workers unpickle the step (its imports) while daisy starts up
            with contextlib.suppress(Exception):
                m.send(("load", payload_path))
        # daisy pickles the handoff into each slot process by value: no cleftwise import there
        cloudpickle.register_pickle_by_value(daisy_handoff)

        def check(dblock) -> bool:
            return tuple(dblock.write_roi.begin) not in todo_begins

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dtask = daisy.Task(
                f"cleftwise_{task.name}", total_roi=total, read_roi=template, write_roi=template,
                process_function=daisy_handoff.DaisyHandoff(self.address, self._authkey, payload_path),
                check_function=check, read_write_conflict=False, fit="shrink",
                max_workers=int(self.cfg.workers), max_retries=int(self.cfg.max_retries),
                timeout=self.cfg.block_timeout)
        # daisy's worker logs go under the job's ledger, not ./daisy_logs of whatever the cwd is
        # (process-global in daisy 2; workers adopt it from the scheduler's context)
        from daisy.logging import get_log_basedir, set_log_basedir

        before = get_log_basedir()
        set_log_basedir(os.path.join(ledger.path, "daisy_logs"))
        try:
            daisy.run_blockwise([dtask], host=self.cfg.host, progress=False, summary=False)  # our bar polls the ledger
        except RuntimeError as e:  # abandonment after repeated worker deaths
            log.error("daisy abandoned the task: %s", e)
        finally:
            set_log_basedir(before)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with self._lock:
            members = list(self._members)
        for m in members:  # an idle worker exits at once; a busy one after its pass
            with contextlib.suppress(Exception):
                m.send(("stop",))
            with contextlib.suppress(Exception):
                m.conn.close()
        if self._listener is not None:
            with contextlib.suppress(Exception):
                self._listener.close()
        deadline = time.monotonic() + CLOSE_TIMEOUT_S
        for p in self._procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("daisy pool: worker process %d did not stop; killing it", p.pid)
                p.kill()
                with contextlib.suppress(Exception):
                    p.wait(timeout=5)
        for f in self._logs:
            with contextlib.suppress(Exception):
                f.close()


# -- ray ------------------------------------------------------------------------------------

_RAY_ACTOR_CLS = None


class _RayPoolWorker:
    """A Ray actor of the pool: holds each pass's open step context until the pass ends."""

    def __init__(self):
        self._pending: dict = {}
        self._open: dict = {}

    def info(self) -> str:
        return _worker_name()

    def open(self, key: str, task: BlockStep, ledger_path: str, max_retries: int) -> None:
        """Register pass ``key``; its resources open with its first block."""
        self._pending[key] = (task, ledger_path, max_retries)

    def process(self, key: str, block: Block):
        entry = self._open.get(key)
        if entry is None:
            task, ledger_path, retries = self._pending[key]
            ledger = Ledger(ledger_path)
            try:
                cm = task.worker()
                fn = cm.__enter__()
            except Exception:  # noqa: BLE001 - e.g. a model that fails to load: the block fails
                import traceback

                err = traceback.format_exc(limit=8)
                ledger.mark_failed(block.block_id, err, 1, _worker_name())
                return err
            entry = self._open[key] = (cm, fn, ledger, retries)
        return process_block_with_ledger(entry[1], block, entry[2], entry[3])

    def close(self, key: str) -> int:
        """Close pass ``key``'s resources (model, DB connection) on this actor."""
        self._pending.pop(key, None)
        entry = self._open.pop(key, None)
        if entry is not None:
            entry[0].__exit__(None, None, None)
            return 1
        return 0


def _ray_actor_class():
    global _RAY_ACTOR_CLS
    if _RAY_ACTOR_CLS is None:
        import ray

        _RAY_ACTOR_CLS = ray.remote(_RayPoolWorker)
    return _RAY_ACTOR_CLS


class RayPool(WorkerPool):
    """``workers`` Ray actors created once per run (see the module docstring)."""

    def __init__(self, cfg: BackendConfig, log_dir: Optional[str] = None):
        super().__init__(cfg, log_dir)
        self.actors: list = []
        self._ray = None

    def _new_actors(self, n: int) -> list:
        actor_cls = _ray_actor_class()
        opts = dict(num_cpus=self.cfg.cpus_per_worker, num_gpus=self.cfg.gpus_per_worker, max_restarts=0)
        t0 = time.perf_counter()
        actors = [actor_cls.options(**opts).remote() for _ in range(n)]
        self.workers_started += n
        refs = {a.info.remote(): a for a in actors}
        pending = list(refs)
        while pending:  # each actor's start-up: creation request → answering
            ready, pending = self._ray.wait(pending, num_returns=1)
            with contextlib.suppress(Exception):
                self.startup_s[self._ray.get(ready[0])] = time.perf_counter() - t0
        return actors

    def _start(self) -> None:
        from cleftwise.blockwise.runner import ensure_ray

        self._ray = ensure_ray(self.cfg.address, num_cpus=max(int(self.cfg.workers), os.cpu_count() or 1))
        self.actors = self._new_actors(int(self.cfg.workers))

    def run_pass(self, task, todo, ledger, progress, done_before) -> None:
        self._ensure_started()
        ray = self._ray
        from ray.exceptions import RayActorError, RayTaskError

        cfg = self.cfg
        key = f"{task.name}:{ledger.path}:{time.time_ns()}"
        task_ref = ray.put(task)
        use = self.actors[:min(len(self.actors), len(todo))]
        try:  # wait for the step to arrive (and unpickle) on every actor: its error, said once
            ray.get([a.open.remote(key, task_ref, ledger.path, cfg.max_retries) for a in use])
        except RayTaskError as e:
            raise BlockwiseError(f"task {task.name}: the step could not be sent to the Ray workers: "
                                 f"{str(e).strip().splitlines()[-1]}") from e
        queue_ = list(reversed(todo))
        deaths: dict[int, int] = {}
        running = {}
        finished = 0

        def submit(actor):
            block = queue_.pop()
            running[actor.process.remote(key, block)] = (actor, block)

        for a in use:
            if queue_:
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
                        queue_.append(block)
                    log.warning("ray pool: a worker died (%s); starting a replacement", type(e).__name__)
                    new = self._new_actors(1)[0]
                    self.actors[self.actors.index(actor)] = new
                    use[use.index(actor)] = new
                    new.open.remote(key, task_ref, ledger.path, cfg.max_retries)
                    actor = new
                except RayTaskError as e:  # the step could not even be opened or unpickled there
                    ledger.mark_failed(block.block_id, str(e), 1)
                    finished += 1
                    progress.set(done_before + finished)
                else:
                    finished += 1
                    progress.set(done_before + finished)
                if queue_:
                    submit(actor)
        finally:
            closing = []
            for a in use:  # close each worker's resources for this pass (model, DB connection)
                with contextlib.suppress(Exception):
                    closing.append(a.close.remote(key))
            with contextlib.suppress(Exception):
                ray.wait(closing, num_returns=len(closing), timeout=60)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for a in self.actors:
            with contextlib.suppress(Exception):
                self._ray.kill(a)
        self.actors = []


# -- dask -----------------------------------------------------------------------------------

def _dask_contexts() -> dict:
    """This dask worker's open step contexts, by pass key (kept on the worker object)."""
    from distributed import get_worker

    worker = get_worker()
    if not hasattr(worker, "_cleftwise_contexts"):
        worker._cleftwise_contexts = {}
    return worker._cleftwise_contexts


def _dask_process(task: BlockStep, key: str, ledger_path: str, max_retries: int, block: Block):
    """Runs inside a dask worker process; the pass's resources stay open between blocks."""
    contexts = _dask_contexts()
    entry = contexts.get(key)
    if entry is None:
        cm = task.worker()
        entry = (cm, cm.__enter__(), Ledger(ledger_path))
        contexts[key] = entry
    return process_block_with_ledger(entry[1], block, entry[2], max_retries)


def _dask_close(key: str, dask_worker=None) -> int:
    """Close the step context of pass ``key`` on this worker (called on every worker)."""
    contexts = getattr(dask_worker, "_cleftwise_contexts", {})
    entry = contexts.pop(key, None)
    if entry is not None:
        entry[0].__exit__(None, None, None)
        return 1
    return 0


def _dask_probe() -> tuple:
    """(host:pid, process start time s since the epoch, now): a worker's start-up figures."""
    import psutil

    return _worker_name(), psutil.Process().create_time(), time.time()


def quiet_distributed() -> None:
    """Silence distributed's INFO lines in this process (its workers get ``silence_logs``)."""
    for name in ("distributed", "distributed.scheduler", "distributed.nanny", "distributed.worker",
                 "distributed.core", "distributed.http.proxy", "distributed.deploy"):
        logging.getLogger(name).setLevel(logging.WARNING)


class DaskPool(WorkerPool):
    """One dask cluster (or the user's scheduler at ``address``) for the whole run."""

    def __init__(self, cfg: BackendConfig, log_dir: Optional[str] = None):
        super().__init__(cfg, log_dir)
        self.client = None
        self.cluster = None

    def _start(self) -> None:
        quiet_distributed()
        from distributed import Client, LocalCluster

        if self.cfg.address:
            self.client = Client(self.cfg.address, timeout="20s")
            return self._record_workers()
        import dask

        method = dask.config.get("distributed.worker.multiprocessing-method", "spawn")
        if method == "spawn" and sys.platform.startswith("linux"):
            # workers forked from one forkserver (distributed and numpy imported there once)
            # instead of spawned afresh, each re-importing __main__: 2-4x faster start-up
            method = "forkserver"
        with dask.config.set({"distributed.worker.multiprocessing-method": method}):
            self.cluster = LocalCluster(n_workers=int(self.cfg.workers), threads_per_worker=1,
                                        processes=True, dashboard_address=None,
                                        silence_logs=logging.WARNING,
                                        # no dashboard; its bare HTTP server (health checks)
                                        # on a free local port, never a fixed public 8787
                                        scheduler_kwargs={"dashboard_address": "127.0.0.1:0"})
        self.client = Client(self.cluster)
        self.client.wait_for_workers(int(self.cfg.workers), timeout=START_TIMEOUT_S)
        self._record_workers()

    def _record_workers(self) -> None:
        """Note the workers present now (start-up: process start → probed, s; an upper bound)."""
        with contextlib.suppress(Exception):
            for name, created, now in self.client.run(_dask_probe).values():
                if name not in self.startup_s:
                    self.startup_s[name] = now - created
        if self.cluster is not None:  # every worker process that joined our cluster (restarts too)
            with contextlib.suppress(Exception):
                joined = [e for _, e in self.cluster.scheduler.get_events("all")
                          if isinstance(e, dict) and e.get("action") == "add-worker"]
                self.workers_started = max(self.workers_started, len(joined))
            self.workers_started = max(self.workers_started, len(self.startup_s))

    def run_pass(self, task, todo, ledger, progress, done_before) -> None:
        self._ensure_started()
        from distributed import as_completed

        cfg, client = self.cfg, self.client
        key = f"{task.name}:{ledger.path}:{time.time_ns()}"
        try:
            task_f = client.scatter(task, broadcast=True)
            futures = [client.submit(_dask_process, task_f, key, ledger.path, cfg.max_retries, b,
                                     pure=False, retries=cfg.max_retries,
                                     key=f"{task.name}-{b.block_id}-{key}")
                       for b in todo]
            block_of = {f.key: b for f, b in zip(futures, todo)}
            finished = 0
            done = as_completed(futures)
            del futures  # only as_completed holds them: each is released once seen, so a worker
            for fut in done:  # lost later does not make the scheduler recompute finished blocks
                if fut.status == "error":
                    b = block_of[fut.key]
                    ledger.mark_failed(b.block_id, f"dask worker failed: {fut.exception()!r}",
                                       cfg.max_retries + 1)
                fut.release()
                finished += 1
                progress.set(done_before + finished)
        finally:
            with contextlib.suppress(Exception):
                client.run(_dask_close, key)
            self._record_workers()  # a restarted worker is a new process

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.client is not None:
            self._record_workers()
            with contextlib.suppress(Exception):
                self.client.close()
        if self.cluster is not None:
            with contextlib.suppress(Exception):
                self.cluster.close()


_POOLS = {"local": WorkerPool, "daisy": DaisyPool, "ray": RayPool, "dask": DaskPool}


@contextlib.contextmanager
def worker_pool(cfg: Optional[BackendConfig] = None, log_dir: Optional[str] = None):
    """A :class:`WorkerPool` for ``cfg``'s backend, closed when the block ends (also on error
    or Ctrl-C). Workers start on the first pass with blocks to run. ``log_dir``: where daisy
    pool workers' own output goes (default: the driver's stderr)."""
    cfg = cfg or BackendConfig()
    pool = _POOLS[cfg.backend](cfg, log_dir)
    try:
        yield pool
    finally:
        pool.close()
