"""The one class every blockwise step derives from: it declares, the engine derives.

A step says *what* it writes and *what it needs to see*:

- ``name``: short name (ledger folder, logs, ``--status``);
- ``total_roi`` (nm), ``voxel_size`` (nm), ``write_size`` (voxels) and ``context`` (voxels
  added on every side of a block's write ROI to make its read ROI), set in ``__init__``;
- ``work_dir``: the folder of its ledger and per-block scratch files;
- :meth:`outputs`: the arrays it writes (:class:`ArraySpec`), with channels named;
- :meth:`identity`: the settings that change its output (config fields, weights digest, …);
- :meth:`open_worker`: what a worker opens once (model, DB connection, volume handles);
- :meth:`process`: the work of one block, given what :meth:`open_worker` yielded.

From that alone the engine (:mod:`cleftwise.blockwise.runner`) derives the block grid
(:meth:`blocks`), the ledger (:meth:`ledger_path`), the job identity, creation of the outputs
on a fresh start and their check on resume (:meth:`prepare`), resume, retries and status.

Steps are pickled to worker processes (daisy, dask, ray), so they hold only plain settings;
resources are opened in :meth:`open_worker`, once per worker.
"""

from __future__ import annotations

import abc
import contextlib
import os
import shutil
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any, Callable, Iterator, Optional

from funlib.geometry import Coordinate, Roi

from cleftwise.blockwise import crashpoints
from cleftwise.blockwise.errors import BlockwiseError
from cleftwise.blockwise.grid import Block, plan_blocks

__all__ = ["ArraySpec", "BlockStep"]


@dataclass(frozen=True)
class ArraySpec:
    """An output array of a step, created by the engine over the step's ``total_roi``.

    ``channels`` names the channels of a (c, z, y, x) array (stored in its attributes as
    ``channels``, so later steps address channels by name); empty for a (z, y, x) array.
    """

    url: str
    """volume URL"""
    dtype: str
    """numpy dtype name"""
    channels: tuple = ()
    """channel names, in order; () for a 3D array"""
    chunk_shape: Optional[tuple] = None
    """chunk shape, voxels (z, y, x); default the step's write size"""
    attrs: dict = field(default_factory=dict)
    """extra attributes stored with the array"""


class BlockStep(abc.ABC):
    """Abstract blockwise step (see the module docstring)."""

    #: short name of the step, used for the ledger folder and logs
    name: str = "step"

    # geometry, set by the subclass's __init__
    total_roi: Roi
    voxel_size: Coordinate
    write_size: Coordinate = Coordinate(32, 256, 256)
    context: Coordinate = Coordinate(0, 0, 0)
    #: shrink read ROIs to this ROI (nm), e.g. the input volume; None = reads may reach outside
    clip_read_to: Optional[Roi] = None
    work_dir: str = ""

    # -- declared by the step --------------------------------------------------------------
    def outputs(self) -> list[ArraySpec]:
        """Arrays this step writes (created on a fresh start, checked on resume)."""
        return []

    @abc.abstractmethod
    def identity(self) -> dict:
        """Everything that changes the output (hashed into the job identity)."""

    @contextlib.contextmanager
    def open_worker(self) -> Iterator[Any]:
        """Open what a worker needs once (model, volumes, DB) and yield it; closed on exit."""
        yield None

    @abc.abstractmethod
    def process(self, block: Block, resources: Any) -> Optional[dict]:
        """Compute and durably write ``block``'s outputs (the block is marked done after);
        may return a dict of integer counters (e.g. forward passes) that the ledger stores with
        the block's done record (a re-run block replaces them, so nothing counts twice)."""

    def prefetch(self, block: Block, resources: Any) -> None:
        """Start reading ``block``'s input while the current block computes (optional)."""

    def prepare_scratch(self, fresh: bool) -> None:
        """Step-specific preparation in the driver after the outputs exist (optional)."""

    def status_extra(self) -> dict:
        """Extra figures for ``--status`` from what the ledger holds (e.g. predict: forward
        passes run and the minimal count); default none."""
        return {}

    def finish(self) -> Optional[dict]:
        """Called once in the driver after every block is done (e.g. to merge results); may
        return fields for the run report (``rewrote: True`` when it rewrote shared outputs,
        which re-runs the stages downstream)."""

    # -- derived by the engine -------------------------------------------------------------
    def blocks(self) -> list[Block]:
        """All blocks of the step, in block-id order (cached)."""
        cached = self.__dict__.get("_blocks")
        if cached is None:
            vs = Coordinate(self.voxel_size)
            outs = self.outputs()
            chunk = None
            if outs:
                chunk = Coordinate(outs[0].chunk_shape or self.write_size) * vs
            cached = plan_blocks(self.total_roi, Coordinate(self.write_size) * vs,
                                 Coordinate(self.context) * vs, chunk, vs, self.clip_read_to)
            self.__dict__["_blocks"] = cached
        return cached

    def ledger_path(self) -> str:
        """``<work_dir>/ledger/<name>``."""
        if not self.work_dir:
            raise BlockwiseError(f"step {self.name}: work_dir is not set")
        return os.path.join(os.path.abspath(self.work_dir), "ledger", self.name)

    def job_settings(self) -> dict:
        """The job identity: the step's identity plus the geometry the engine derived."""
        return {"step": self.name, **_plain(self.identity()),
                "geometry": {"roi": [list(self.total_roi.begin), list(self.total_roi.shape)],
                             "voxel_size": list(self.voxel_size),
                             "write_size": list(self.write_size), "context": list(self.context)},
                "outputs": [{"url": o.url, "dtype": o.dtype, "channels": list(o.channels)}
                            for o in self.outputs()]}

    def prepare(self, fresh: bool, overwrite: bool = False) -> None:
        """Create the outputs (``fresh``) or check that they exist and match (resume).

        An output is recreated only when this step's ledger made it (attribute
        ``cleftwise_ledger``) or ``overwrite`` is given: an array that another job, an older
        cleftwise or a user put at that URL is never replaced silently."""
        from cleftwise.storage.errors import StorageError
        from cleftwise.storage.volume import create_volume, open_volume

        for spec in self.outputs():
            chunk = Coordinate(spec.chunk_shape or self.write_size)
            if fresh:
                if not overwrite:
                    self._check_owner(spec.url)
                attrs = {"cleftwise_step": self.name, "cleftwise_ledger": self.ledger_path(), **spec.attrs}
                if spec.channels:
                    attrs["channels"] = list(spec.channels)
                create_volume(spec.url, shape=self.total_roi.shape / self.voxel_size,
                              voxel_size=self.voxel_size, offset=self.total_roi.begin,
                              dtype=spec.dtype, chunk_shape=chunk,
                              num_channels=len(spec.channels) or None, overwrite=True, attrs=attrs)
                crashpoints.hit("output_created", self.name)
                continue
            try:
                out = open_volume(spec.url)
            except StorageError as e:
                raise BlockwiseError(f"resuming {self.name} but its output is missing ({e}); "
                                     "re-run with --overwrite") from e
            if out.roi != self.total_roi or (out.num_channels or 0) != len(spec.channels):
                raise BlockwiseError(f"{spec.url}: the existing output of {self.name} does not match "
                                     f"this job (ROI {out.roi}, {out.num_channels} channels)")
        self.prepare_scratch(fresh)
        crashpoints.hit("prepared", self.name)

    def _check_owner(self, url: str) -> None:
        """Refuse to replace an existing array at ``url`` that this step's ledger did not make."""
        from cleftwise.storage.errors import StorageError
        from cleftwise.storage.volume import open_volume

        try:
            owner = open_volume(url).attrs.get("cleftwise_ledger")
        except StorageError:  # nothing there (or a half-created array): free to create
            return
        if owner != self.ledger_path():
            made_by = f"the job whose ledger is {owner}" if owner else "another program or an older cleftwise"
            raise BlockwiseError(
                f"{self.name}: {url} already exists and was made by {made_by}, not by this job "
                f"(ledger {self.ledger_path()}); refusing to replace it. Re-run with --overwrite to "
                "replace it, or point the output elsewhere.")

    @contextlib.contextmanager
    def worker(self) -> Iterator[Callable[[Block], None]]:
        """What the backends call: open the resources once, yield a one-block function."""
        with self.open_worker() as resources:
            def run(block: Block) -> Optional[dict]:
                return self.process(block, resources)  # optional integer counters for the ledger

            if type(self).prefetch is not BlockStep.prefetch:
                run.prefetch = lambda block: self.prefetch(block, resources)
            yield run

    def drop_outputs(self) -> None:
        """Delete this step's ledger ("never ran"); outputs are recreated on the next fresh start."""
        shutil.rmtree(self.ledger_path(), ignore_errors=True)


def _plain(d: dict) -> dict:
    return {k: (asdict(v) if is_dataclass(v) else v) for k, v in d.items()}
