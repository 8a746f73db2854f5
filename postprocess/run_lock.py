"""One run per output folder: a lock file holding the host, pid and start time of the run.

A second run on the same output folder refuses, naming the run that holds the lock; a lock left
by a run that is gone (same host, its pid dead or reused) is taken over with a warning.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from typing import Optional

from cleftwise.postprocess.errors import PostprocessError

__all__ = ["LOCK_NAME", "output_lock"]

log = logging.getLogger(__name__)


#: the lock file of a run, in its output folder
LOCK_NAME = ".cleftwise.lock"


@contextlib.contextmanager
def output_lock(output_dir: str):
    """One run per output folder: hold ``<output_dir>/.cleftwise.lock`` (host, pid, start time;
    created with O_CREAT|O_EXCL) while the body runs; released on exit, errors included.

    A lock held by a live run raises :class:`PostprocessError` naming its host and pid. A lock
    of a run that is gone (same host, its pid no longer alive or now another process) is stale:
    it is taken over with a warning. A lock of another host cannot be checked from here: the
    error says to delete the file if that run is gone."""
    path = os.path.join(os.path.abspath(output_dir), LOCK_NAME)
    mine = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(path)
            why = _stale(holder, path)
            if why is None:
                raise PostprocessError(_held_message(path, holder)) from None
            if _read_lock(path) == holder:  # not replaced meanwhile by another run taking it over
                log.warning("%s: taking over the lock of a run that is gone (%s)", path, why)
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(mine, f)
            f.flush()
            os.fsync(f.fileno())
        break
    else:
        raise PostprocessError(f"{path}: could not take the lock of {output_dir} (another run is "
                               "starting there?)")
    try:
        yield path
    finally:
        if _read_lock(path) == mine:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


def _read_lock(path: str) -> Optional[dict]:
    """The lock's content; {} when unreadable or still being written; None when gone."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _stale(holder: Optional[dict], path: str) -> Optional[str]:
    """Why the lock of ``holder`` is stale, or None when its run may be alive."""
    if holder is None:
        return "released"
    if not holder:  # empty or torn: the taker was killed while writing it, or is writing it now
        try:
            age = time.time() - os.stat(path).st_mtime
        except FileNotFoundError:
            return "released"
        return f"unreadable lock, {age:.0f} s old" if age > 30 else None
    if holder.get("host") != socket.gethostname():
        return None
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return f"no valid pid in the lock ({pid!r})"
    if pid == os.getpid():
        return f"pid {pid} is this process"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"pid {pid} is not running"
    except PermissionError:
        pass  # alive, another user's
    try:  # Linux: a pid reused by a process started after the lock is not its holder
        with open(f"/proc/{pid}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        if boot + ticks / os.sysconf("SC_CLK_TCK") > float(holder.get("started", 0)) + 1:
            return f"pid {pid} is now another process"
    except (OSError, ValueError, IndexError, StopIteration):
        pass
    return None


def _held_message(path: str, holder: Optional[dict]) -> str:
    if not holder:
        return f"{path}: another run is taking the lock of this output folder right now"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0))))
    return (f"another run (host {holder.get('host')}, pid {holder.get('pid')}, started {started}) "
            f"is using this output folder ({path}); wait for it to end, or use another output_dir. "
            "If that run is gone (killed on another machine), delete the lock file.")
