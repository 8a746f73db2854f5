"""Start and stop one-machine clusters the way users do (``ray start``, ``dask scheduler`` /
``dask worker``, a launcher in a daisy ``worker_command``), each command in its own process
group, so a test can always end every process it started — and check that none is left.

Used by tests/test_cluster_one_machine.py; no cleftwise imports, so it is plain test plumbing.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Optional

import psutil

BIN = os.path.dirname(sys.executable)


def tool(name: str) -> str:
    """The console script ``name`` (ray, dask, cleftwise) beside this interpreter, else on PATH."""
    here = os.path.join(BIN, name)
    return here if os.access(here, os.X_OK) else name


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ProcessGroups:
    """Commands started each in a new session (process group = session = its pid), with their
    output in ``log_dir``. Their processes (:meth:`members`) are those in the groups plus the
    leaders' descendants (Ray moves its workers into process groups of their own); :meth:`stop`
    ends them all (SIGTERM to the groups, then SIGKILL after ``grace`` s) and :meth:`alive`
    lists those still running (zombies excluded)."""

    def __init__(self, log_dir: str):
        self.log_dir = log_dir
        os.makedirs(log_dir, exist_ok=True)
        self.procs: list[subprocess.Popen] = []
        self.names: list[str] = []
        self._seen: dict = {}

    def start(self, name: str, args: list, env: Optional[dict] = None, cwd: Optional[str] = None
              ) -> subprocess.Popen:
        log = open(os.path.join(self.log_dir, f"{name}.log"), "ab")
        try:
            p = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                 start_new_session=True)
        finally:
            log.close()
        self.procs.append(p)
        self.names.append(name)
        return p

    def log(self, name: str) -> str:
        try:
            with open(os.path.join(self.log_dir, f"{name}.log"), errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    @property
    def pgids(self) -> set:
        """The leaders' pids: each is its group's and its session's id."""
        return {p.pid for p in self.procs}

    def members(self) -> dict:
        """Every live process of the groups: in one of their process groups or sessions, or a
        descendant of a leader (Ray puts its worker processes in process groups of their own),
        or remembered as such from an earlier call; ``{pid: psutil.Process}``."""
        found = {}
        for proc in psutil.process_iter(["pid", "status"]):
            try:
                if proc.info["status"] == psutil.STATUS_ZOMBIE:
                    continue
                pid = proc.info["pid"]
                if os.getpgid(pid) in self.pgids or os.getsid(pid) in self.pgids:
                    found[pid] = proc
            except (ProcessLookupError, PermissionError, psutil.Error):
                continue
        for p in self.procs:
            try:
                for child in psutil.Process(p.pid).children(recursive=True):
                    found[child.pid] = child
            except psutil.Error:
                continue
        for pid, proc in list(self._seen.items()):
            if pid not in found:
                found[pid] = proc
        live = {}
        for pid, proc in found.items():
            try:  # is_running also tells a reused pid from the process we saw
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    live[pid] = proc
            except psutil.Error:
                continue
        self._seen = dict(live)
        return live

    def alive(self) -> list:
        """``(pid, name)`` of every live (non-zombie) member process."""
        out = []
        for pid, proc in sorted(self.members().items()):
            try:
                out.append((pid, proc.name()))
            except psutil.Error:
                continue
        return out

    def is_member(self, pid: int) -> bool:
        return pid in self.members()

    def stop(self, grace: float = 5.0, kill_wait: float = 10.0) -> list:
        """End every group; returns what is still alive afterwards (should be ``[]``)."""
        self.members()  # remember the leaders' descendants before the leaders go
        for p in reversed(self.procs):
            _signal_group(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        for p in self.procs:  # ray start --block can hang on SIGTERM while its GCS is going away
            _signal_group(p.pid, signal.SIGKILL)
        for proc in self.members().values():  # members outside the groups
            try:
                proc.kill()
            except psutil.Error:
                pass
        deadline = time.monotonic() + kill_wait
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        for p in self.procs:  # reap the leaders
            try:
                p.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        return self.alive()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def wait_for(predicate, timeout: float, what: str, poll: float = 0.2, logs=None,
             proc: Optional[subprocess.Popen] = None):
    """Poll ``predicate()`` until it returns something truthy (returned), ``proc`` exits or
    ``timeout`` s pass (AssertionError naming ``what``, with the tail of ``logs()``)."""
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        why = None
        if proc is not None and proc.poll() is not None:
            why = f"{what}: the process exited with {proc.returncode}"
        elif time.monotonic() > deadline:
            why = f"timed out after {timeout:.0f} s waiting for {what}"
        if why:
            text = logs() if callable(logs) else (logs or "")
            raise AssertionError(f"{why}\n{text[-3000:]}")
        time.sleep(poll)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def done_records(done_dir: str) -> list:
    """The ledger's done markers in ``done_dir`` (``{block_id, worker: 'host:pid', …}``)."""
    out = []
    try:
        names = os.listdir(done_dir)
    except FileNotFoundError:
        return out
    for n in names:
        if n.endswith(".json"):
            try:
                with open(os.path.join(done_dir, n)) as f:
                    out.append(json.load(f))
            except (OSError, ValueError):
                continue
    return out


def kill_worker_mid_run(run: subprocess.Popen, done_dir: str, cluster: ProcessGroups, total: int,
                        timeout: float = 120.0) -> dict:
    """While ``run`` (the pipeline) works, wait for the first done marker in ``done_dir``, take
    the worker pid it names (``host:pid``), check that process belongs to ``cluster`` (not to
    the driver) and SIGKILL it — it is then busy with its next block.
    Returns ``{pid, done_at_kill, total}``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        recs = done_records(done_dir)
        if recs:
            pid = int(str(recs[0]["worker"]).rsplit(":", 1)[1])
            if not cluster.is_member(pid):
                raise AssertionError(f"worker pid {pid} of {recs[0]} is not a live process of the cluster "
                                     f"started by the test")
            done_at_kill = len(done_records(done_dir))
            os.kill(pid, signal.SIGKILL)
            return {"pid": pid, "done_at_kill": done_at_kill, "total": total}
        if run.poll() is not None:
            raise AssertionError(f"the run ended (exit {run.returncode}) before any block was done")
        time.sleep(0.05)
    raise AssertionError(f"no block of {done_dir} was done within {timeout:.0f} s")
