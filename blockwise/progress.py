"""Progress inside a block, reported by the step, shown by the driver's progress bar.

A step's ``process`` calls :func:`report` (``done`` of ``total`` units of this block, e.g.
predicted patch batches); outside a run it does nothing. The engine opens a
:func:`block_progress` around each block: in the driver's process (the ``local`` backend) the
report goes straight to the bar; in a worker process (daisy, ray, dask) it goes to a small file
``<ledger>/progress/<worker>.json`` (written whole, at most every ``interval`` seconds) that the
driver's :class:`ProgressBar` polls. The bar counts blocks with fractions, so a large block moves
it, and shows the pass's ETA.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import threading
import time
from typing import Callable, Iterator, Optional

__all__ = ["report", "block_progress", "ProgressBar", "progress_dir"]

_local = threading.local()


def progress_dir(ledger_path: str) -> str:
    """Folder of the per-worker progress files of the job whose ledger is ``ledger_path``."""
    return os.path.join(ledger_path, "progress")


def report(done: float, total: float) -> None:
    """This block has done ``done`` of ``total`` units (any unit; only the fraction counts)."""
    sink = getattr(_local, "sink", None)
    if sink is not None and total > 0:
        sink(min(1.0, max(0.0, float(done) / float(total))))


class _FileSink:
    """Writes the running block's fraction to ``<dir>/<worker>.json``, throttled."""

    def __init__(self, folder: str, worker: str, block_id: int, interval: float):
        self.path = os.path.join(folder, re.sub(r"[^A-Za-z0-9_.-]", "_", worker) + ".json")
        self.block_id = int(block_id)
        self.interval = interval
        self.last = 0.0
        os.makedirs(folder, exist_ok=True)

    def __call__(self, fraction: float) -> None:
        now = time.monotonic()
        if now - self.last < self.interval and fraction < 1.0:
            return
        self.last = now
        tmp = f"{self.path}.tmp{os.getpid()}"
        try:
            with open(tmp, "w") as f:
                json.dump({"block": self.block_id, "fraction": round(fraction, 4)}, f)
            os.replace(tmp, self.path)
        except OSError:  # progress is advisory: a full or read-only disk must not fail a block
            with contextlib.suppress(OSError):
                os.remove(tmp)

    def clear(self) -> None:
        with contextlib.suppress(OSError):
            os.remove(self.path)


@contextlib.contextmanager
def block_progress(block_id: int, callback: Optional[Callable[[int, float], None]] = None,
                   folder: Optional[str] = None, worker: str = "", interval: float = 0.5
                   ) -> Iterator[None]:
    """Route :func:`report` calls made while processing ``block_id`` to ``callback(block_id,
    fraction)`` (in the driver) or to a progress file in ``folder`` (in a worker); neither: off."""
    if callback is not None:
        sink = lambda fraction: callback(block_id, fraction)  # noqa: E731
        file_sink = None
    elif folder is not None:
        file_sink = sink = _FileSink(folder, worker, block_id, interval)
    else:
        yield
        return
    old = getattr(_local, "sink", None)
    _local.sink = sink
    try:
        yield
    finally:
        _local.sink = old
        if file_sink is not None:
            file_sink.clear()


class ProgressBar:
    """A tqdm bar over a pass's blocks that also counts the running blocks' fractions.

    ``set_done(n)`` sets the finished blocks; ``partial(block_id, fraction)`` (local backend)
    or, with ``folder``, a background thread polling the workers' progress files every
    ``poll`` seconds add the running blocks' fractions; ``done_fn`` (polled too) counts
    finished blocks where the backend does not report them (daisy). Disabled: nothing.
    """

    def __init__(self, total: int, initial: int, desc: str, enabled: bool,
                 folder: Optional[str] = None, poll: float = 1.0,
                 done_fn: Optional[Callable[[], int]] = None):
        self.bar = None
        self.done = int(initial)
        self.running: dict = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = None
        self.folder = folder
        self.done_fn = done_fn
        if not enabled:
            return
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="block", dynamic_ncols=True,
                        mininterval=0.5, bar_format="{l_bar}{bar}| {n:.1f}/{total} blocks "
                        "[{elapsed}<{remaining}, {rate_fmt}]")
        if folder is not None:
            self.thread = threading.Thread(target=self._poll, args=(poll,), daemon=True,
                                           name="cleftwise-progress")
            self.thread.start()

    def _show(self) -> None:
        if self.bar is None:
            return
        with self.lock:
            n = self.done + sum(f for f in self.running.values() if f < 1.0)
            n = min(float(self.bar.total), n)
            self.bar.update(n - self.bar.n)

    def set_done(self, n: int) -> None:
        with self.lock:
            self.done = int(n)
        self._show()

    set = set_done  # the name the backends call

    def partial(self, block_id: int, fraction: float) -> None:
        with self.lock:
            self.running[block_id] = fraction
        self._show()

    def block_done(self, block_id: int) -> None:
        with self.lock:
            self.running.pop(block_id, None)

    def _poll(self, every: float) -> None:
        while not self.stop.wait(every):
            running = {}
            for path in glob.glob(os.path.join(self.folder, "*.json")):
                try:
                    with open(path) as f:
                        d = json.load(f)
                    running[int(d["block"])] = float(d["fraction"])
                except (OSError, ValueError, KeyError, TypeError):
                    continue  # a file being replaced or removed right now
            done = None
            if self.done_fn is not None:
                with contextlib.suppress(Exception):  # e.g. the ledger folder being replaced
                    done = int(self.done_fn())
            with self.lock:
                self.running = running
                if done is not None:
                    self.done = max(self.done, done)
            self._show()

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=5)
        if self.bar is not None:
            self.bar.close()
