"""The one interface every blockwise step implements.

A step is one class deriving from :class:`BlockTask`. It declares its blocks, the settings
that define its output (the job identity), how to create its outputs, and — as a context
manager — how a worker opens its resources once (a model, volumes, a DB connection) and
processes blocks with them. The runner (:mod:`cleftwise.blockwise.runner`) does everything else:
ledger, resume, retries, backends, progress.

Tasks are pickled to worker processes (daisy, dask, ray), so they hold only plain settings;
resources are opened inside :meth:`BlockTask.worker`.
"""

from __future__ import annotations

import abc
import contextlib
from typing import Callable, Iterator

from cleftwise.blockwise.grid import Block

__all__ = ["BlockTask"]


class BlockTask(abc.ABC):
    """Abstract blockwise step."""

    #: short name of the step, used for the ledger folder and logs
    name: str = "task"

    @abc.abstractmethod
    def blocks(self) -> list[Block]:
        """All blocks of the step, in block-id order."""

    @abc.abstractmethod
    def settings(self) -> dict:
        """Everything that changes the output (hashed into the job identity)."""

    @abc.abstractmethod
    def ledger_path(self) -> str:
        """Folder of this step's ledger (next to its output)."""

    def prepare(self, fresh: bool) -> None:
        """Create or check the outputs, once, in the driver before any block runs.

        ``fresh`` is True when the job starts from scratch (new or ``--overwrite``): outputs
        are (re)created; otherwise they must exist and are reused.
        """

    def finish(self) -> None:
        """Called once in the driver after every block is done (e.g. to merge results)."""

    @abc.abstractmethod
    @contextlib.contextmanager
    def worker(self) -> Iterator[Callable[[Block], None]]:
        """Open the worker's resources once and yield a function processing one block.

        The function must write the block's outputs durably before returning; the runner
        marks the block done only after it returns. If the function has a ``prefetch(block)``
        attribute, backends that know the next block call it first so the step can start
        reading that block's input while the current one computes.
        """
        yield lambda block: None  # pragma: no cover

    def drop_outputs(self) -> None:
        """Delete this step's outputs and ledger ("never ran")."""
        import shutil

        shutil.rmtree(self.ledger_path(), ignore_errors=True)
