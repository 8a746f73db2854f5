"""The block grid: deterministic blocks over a total ROI (pure functions, no I/O).

All geometry is in world units (nm, z y x). Blocks tile the total ROI with a write shape that
is a multiple of the output's chunk shape, starting at the total ROI's begin, so (when the
output volume starts at the same place) no two blocks ever write the same chunk. Blocks on
the high border shrink to the total ROI. Block ids are the raster index (z-major) of the
block in the grid: deterministic, 0..N-1, independent of backend and worker order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
from funlib.geometry import Coordinate, Roi

from cleftwise.blockwise.errors import BlockwiseError

__all__ = ["Block", "plan_blocks", "grid_shape", "block_at", "neighbours"]


@dataclass(frozen=True)
class Block:
    """One block: ``write_roi`` is written by this block only; ``read_roi`` is what it reads."""

    block_id: int
    index: tuple[int, int, int]
    write_roi: Roi
    read_roi: Roi

    def to_dict(self) -> dict:
        return {"block_id": self.block_id, "index": list(self.index),
                "write_begin": list(self.write_roi.begin), "write_shape": list(self.write_roi.shape),
                "read_begin": list(self.read_roi.begin), "read_shape": list(self.read_roi.shape)}


def _coord(v, name: str) -> Coordinate:
    try:
        c = Coordinate(tuple(int(x) for x in v))
    except TypeError as e:
        raise BlockwiseError(f"{name} must be 3 integers (z, y, x) in nm, got {v!r}") from e
    if len(c) != 3:
        raise BlockwiseError(f"{name} must be 3 integers (z, y, x) in nm, got {tuple(v)}")
    return c


def grid_shape(total_roi: Roi, write_shape: Sequence[int]) -> tuple[int, int, int]:
    """Number of blocks along z, y, x."""
    ws = _coord(write_shape, "write_shape")
    return tuple(int(-(-int(t) // int(w))) for t, w in zip(total_roi.shape, ws))


def _check(total_roi: Roi, write_shape: Coordinate, chunk_shape: Optional[Coordinate],
           voxel_size: Optional[Coordinate]) -> None:
    if total_roi.empty:
        raise BlockwiseError(f"total ROI {total_roi} is empty")
    if any(w <= 0 for w in write_shape):
        raise BlockwiseError(f"write block shape must be positive, got {tuple(write_shape)} nm")
    if voxel_size is not None:
        for name, c in (("write block shape", write_shape), ("total ROI begin", total_roi.begin),
                        ("total ROI shape", total_roi.shape)):
            if c % voxel_size != Coordinate(0, 0, 0):
                raise BlockwiseError(
                    f"{name} {tuple(c)} nm is not a multiple of the voxel size {tuple(voxel_size)} nm")
    if chunk_shape is not None and write_shape % chunk_shape != Coordinate(0, 0, 0):
        raise BlockwiseError(
            f"write block shape {tuple(write_shape)} nm is not a multiple of the output chunk "
            f"shape {tuple(chunk_shape)} nm: two blocks would write the same chunk")


def block_at(index: Sequence[int], total_roi: Roi, write_shape: Sequence[int],
             context: Sequence[int] = (0, 0, 0), grid: Optional[tuple] = None) -> Block:
    """The block at grid ``index`` (z, y, x); its read ROI is the write ROI grown by ``context``."""
    ws = _coord(write_shape, "write_shape")
    ctx = _coord(context, "context")
    grid = grid or grid_shape(total_roi, ws)
    index = tuple(int(i) for i in index)
    begin = total_roi.begin + Coordinate(index) * ws
    write_roi = Roi(begin, ws).intersect(total_roi)
    block_id = int(np.ravel_multi_index(index, grid))
    return Block(block_id, index, write_roi, write_roi.grow(ctx, ctx))


def plan_blocks(total_roi: Roi, write_shape: Sequence[int], context: Sequence[int] = (0, 0, 0),
                chunk_shape: Optional[Sequence[int]] = None,
                voxel_size: Optional[Sequence[int]] = None,
                clip_read_to: Optional[Roi] = None) -> list[Block]:
    """All blocks over ``total_roi`` in block-id order.

    Args:
        total_roi: region to write (nm).
        write_shape: block write shape (nm); a multiple of ``chunk_shape`` when given.
        context: nm added on each side of the write ROI to make the read ROI.
        chunk_shape: the output's chunk shape (nm), to check chunk alignment.
        voxel_size: nm; checks that every block is voxel-aligned.
        clip_read_to: if given, read ROIs are shrunk to this ROI (the input volume); otherwise
            read ROIs may reach outside it and the reader fills zeros there.
    """
    ws = _coord(write_shape, "write_shape")
    cs = _coord(chunk_shape, "chunk_shape") if chunk_shape is not None else None
    vs = _coord(voxel_size, "voxel_size") if voxel_size is not None else None
    _check(total_roi, ws, cs, vs)
    grid = grid_shape(total_roi, ws)
    blocks = []
    for index in np.ndindex(*grid):
        b = block_at(index, total_roi, ws, context, grid)
        if clip_read_to is not None:
            b = Block(b.block_id, b.index, b.write_roi, b.read_roi.intersect(clip_read_to))
        blocks.append(b)
    return blocks


def neighbours(index: Sequence[int], grid: Sequence[int], include_diagonal: bool = True
               ) -> Iterator[tuple[int, int, int]]:
    """Grid indices of the blocks adjacent to ``index`` (faces, or faces+edges+corners)."""
    for off in np.ndindex(3, 3, 3):
        d = tuple(o - 1 for o in off)
        if d == (0, 0, 0) or (not include_diagonal and sum(abs(x) for x in d) != 1):
            continue
        n = tuple(i + di for i, di in zip(index, d))
        if all(0 <= x < g for x, g in zip(n, grid)):
            yield n
