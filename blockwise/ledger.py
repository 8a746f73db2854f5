"""The completion ledger: which blocks of a job are durably done, and the job's identity.

The ledger is a folder next to the output (``<output>.ledger/<task_name>/`` by default):

- ``job.json``: the job identity (a sha256 over every setting that changes the output) and the
  settings themselves, so a refusal can name what changed;
- ``done/<block_id>.json``: one marker per finished block (id, time, worker, duration s),
  written atomically (temp file + rename) *after* the block's output was written and flushed;
- ``failed/<block_id>.json``: the last error of a block that failed all its tries.

One file per block works on any shared file system (NFS, Lustre) without locks, and any
backend can resume a job started by another.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from typing import Iterable, Optional

from cleftwise.blockwise import crashpoints
from cleftwise.blockwise.errors import BlockwiseError

__all__ = ["Ledger", "job_identity", "LedgerStatus", "atomic_write_json"]


def job_identity(settings: dict) -> str:
    """sha256 of a JSON-canonical form of ``settings`` (sorted keys)."""
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def atomic_write_json(path: str, obj: dict) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (temp file, fsync, rename)."""
    tmp = f"{path}.tmp.{os.getpid()}.{time.monotonic_ns()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class LedgerStatus:
    total: int
    done: int
    failed: int

    @property
    def remaining(self) -> int:
        return self.total - self.done

    def __str__(self) -> str:
        return f"{self.done}/{self.total} blocks done, {self.remaining} remaining, {self.failed} failed"


class Ledger:
    """Per-job completion records in ``path`` (a folder)."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self.done_dir = os.path.join(self.path, "done")
        self.failed_dir = os.path.join(self.path, "failed")

    @property
    def name(self) -> str:
        """The job's name (the ledger folder's name: the step name for a step's ledger)."""
        return os.path.basename(self.path)

    # -- identity -------------------------------------------------------------------
    def job_file(self) -> str:
        return os.path.join(self.path, "job.json")

    def read_job(self) -> Optional[dict]:
        try:
            with open(self.job_file()) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except ValueError as e:
            raise BlockwiseError(f"ledger {self.job_file()} is corrupt ({e}); re-run with --overwrite") from e

    def start(self, settings: dict, overwrite: bool = False) -> bool:
        """Begin or resume the job described by ``settings``.

        Returns True when resuming an existing job with the same identity. A different
        identity raises :class:`BlockwiseError` naming the changed settings, unless
        ``overwrite`` (then the ledger is wiped and the job starts fresh).
        """
        ident = job_identity(settings)
        old = self.read_job()
        if old is not None and old.get("identity") != ident:
            if not overwrite:
                before = old.get("settings", {})
                changed = sorted(k for k in set(before) | set(settings)
                                 if json.dumps(before.get(k), sort_keys=True, default=str)
                                 != json.dumps(settings.get(k), sort_keys=True, default=str))
                raise BlockwiseError(
                    f"refusing to resume: the job in {self.path} was started with different "
                    f"settings (changed: {', '.join(changed) or 'unknown'}); its outputs would mix "
                    "results of two configurations. Re-run with --overwrite to start fresh, or "
                    "point the output elsewhere.")
        resumed = old is not None and old.get("identity") == ident and not overwrite
        if not resumed:  # also drops markers a kill during an earlier clear() left behind
            self.clear()
        os.makedirs(self.done_dir, exist_ok=True)
        os.makedirs(self.failed_dir, exist_ok=True)
        if not resumed:
            atomic_write_json(self.job_file(), {"identity": ident, "settings": json.loads(
                json.dumps(settings, default=str)), "created": time.time()})
            crashpoints.hit("job_written", self.name)
        return resumed

    def clear(self) -> None:
        """Forget the job. ``job.json`` goes first, so a kill half-way leaves a ledger that
        starts fresh, never one that resumes with some markers missing."""
        try:
            os.remove(self.job_file())
        except FileNotFoundError:
            pass
        shutil.rmtree(self.path, ignore_errors=True)

    # -- blocks ---------------------------------------------------------------------
    def _marker(self, block_id: int) -> str:
        return os.path.join(self.done_dir, f"{int(block_id)}.json")

    def is_done(self, block_id: int) -> bool:
        return os.path.exists(self._marker(block_id))

    def done_ids(self) -> set[int]:
        try:
            names = os.listdir(self.done_dir)
        except FileNotFoundError:
            return set()
        return {int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit()}

    def failed(self) -> dict[int, dict]:
        out = {}
        try:
            names = os.listdir(self.failed_dir)
        except FileNotFoundError:
            return out
        for n in names:
            if n.endswith(".json") and n[:-5].isdigit():
                try:
                    with open(os.path.join(self.failed_dir, n)) as f:
                        out[int(n[:-5])] = json.load(f)
                except (OSError, ValueError):
                    out[int(n[:-5])] = {"error": "unreadable failure record"}
        done = self.done_ids()
        return {k: v for k, v in out.items() if k not in done}

    def mark_done(self, block_id: int, duration_s: float, worker: Optional[str] = None,
                  extra: Optional[dict] = None, counters: Optional[dict] = None) -> None:
        """Record a block as done. Call only after its output is written and flushed.

        ``counters``: the step's integer counters for this block (name → int, e.g. forward
        passes run), stored as ``counters`` in the record for the step to sum (``records()``);
        a re-run block replaces its record, so nothing is counted twice."""
        rec = {"block_id": int(block_id), "time": time.time(), "duration_s": float(duration_s),
               "worker": worker or f"{socket.gethostname()}:{os.getpid()}"}
        if extra:
            rec.update(extra)
        if counters:
            import numbers

            bad = {k: v for k, v in counters.items()
                   if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, numbers.Integral)}
            if bad:
                raise BlockwiseError(f"block {block_id}: counters must map names to integers, got {bad!r}")
            rec["counters"] = {k: int(v) for k, v in counters.items()}
        atomic_write_json(self._marker(block_id), rec)
        crashpoints.hit("marker_written", self.name)
        try:
            os.remove(os.path.join(self.failed_dir, f"{int(block_id)}.json"))
        except FileNotFoundError:
            pass

    def mark_failed(self, block_id: int, error: str, attempts: int, worker: Optional[str] = None) -> None:
        os.makedirs(self.failed_dir, exist_ok=True)
        atomic_write_json(os.path.join(self.failed_dir, f"{int(block_id)}.json"), {
            "block_id": int(block_id), "time": time.time(), "error": error, "attempts": attempts,
            "worker": worker or f"{socket.gethostname()}:{os.getpid()}"})

    def clear_failed(self, block_ids: Iterable[int]) -> None:
        for b in block_ids:
            try:
                os.remove(os.path.join(self.failed_dir, f"{int(b)}.json"))
            except FileNotFoundError:
                pass

    def records(self) -> list[dict]:
        recs = []
        for b in sorted(self.done_ids()):
            try:
                with open(self._marker(b)) as f:
                    recs.append(json.load(f))
            except (OSError, ValueError):
                continue
        return recs

    def status(self, total: int) -> LedgerStatus:
        return LedgerStatus(total=total, done=len(self.done_ids()), failed=len(self.failed()))
