"""Deterministic crash points — TEST-ONLY.

The engine and the stages call :func:`hit` at every ledger and stage boundary (job identity
written, outputs created, block written, marker written, pass finished, DB batch written, DB
marker written, export written). When the environment variable ``CLEFTWISE_CRASH_AT`` names
that point, the process kills itself with SIGKILL there — no cleanup, no ``finally``, exactly
like ``kill -9`` or a node lost at that instant — so tests can prove that a plain re-run
resumes from every such moment. Unset (always, outside tests), :func:`hit` costs one
environment lookup.

``CLEFTWISE_CRASH_AT`` is ``NAME``, ``NAME/WHERE`` or either followed by ``:N``:

- ``NAME`` matches every hit of that point (e.g. ``block_written``);
- ``NAME/WHERE`` only hits whose ``where`` is ``WHERE`` (a step name: ``job_written/predict``);
- ``:N`` kills at the N-th matching hit of this process (default the first).

Counts are per process: with the daisy, ray or dask backends, worker processes count their
own hits (and a worker killed there is a worker lost, not the driver).
"""

from __future__ import annotations

import os
import signal
from typing import Optional

__all__ = ["ENV", "hit"]

#: the environment variable naming the crash point
ENV = "CLEFTWISE_CRASH_AT"

_counts: dict = {}


def hit(name: str, where: Optional[str] = None) -> None:
    """Crash point ``name`` (at ``where``, e.g. a step name): SIGKILL this process if
    ``CLEFTWISE_CRASH_AT`` selects it (see the module docstring); otherwise nothing."""
    target = os.environ.get(ENV)
    if not target:
        return
    point, _, nth = target.partition(":")
    if point != name and (where is None or point != f"{name}/{where}"):
        return
    _counts[target] = _counts.get(target, 0) + 1
    if _counts[target] == (int(nth) if nth else 1):
        os.kill(os.getpid(), signal.SIGKILL)
