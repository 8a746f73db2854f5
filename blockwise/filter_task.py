"""A blockwise Gaussian filter of a volume: a generic step that needs context.

Useful on its own (smoothing probability maps before thresholding) and as the reference
step for the engine: its blockwise result equals a whole-volume
``scipy.ndimage.gaussian_filter(..., mode="constant")`` exactly, because each block reads its
write ROI grown by 4σ (zeros outside the volume).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
from funlib.geometry import Coordinate, Roi
from scipy import ndimage

from cleftwise.storage.volume import create_volume, open_volume

from cleftwise.blockwise.errors import BlockwiseError
from cleftwise.blockwise.grid import Block, plan_blocks
from cleftwise.blockwise.task import BlockTask


@dataclass
class FilterConfig:
    """Gaussian smoothing of a 3D volume."""

    input: str
    """input volume URL (z, y, x)"""
    output: str
    """output volume URL (created)"""
    sigma_nm: tuple = (40.0, 8.0, 8.0)
    """Gaussian sigma per axis (z, y, x), nm"""
    block_shape_nm: tuple = (320, 256, 256)
    """write block shape, nm (a multiple of the output chunk)"""
    chunk_shape: Optional[tuple] = None
    """output chunk (voxels); default = block shape"""
    roi: Optional[tuple] = None
    """((z, y, x) begin nm, (z, y, x) shape nm); default the whole input"""


class FilterTask(BlockTask):
    name = "filter"

    def __init__(self, cfg: FilterConfig):
        self.cfg = cfg
        src = open_volume(cfg.input)
        if src.num_channels is not None:
            raise BlockwiseError(f"{cfg.input}: filter expects a 3D volume, got channels")
        self.voxel_size = src.voxel_size
        self.dtype = src.dtype
        self.roi = Roi(*cfg.roi) if cfg.roi else src.roi
        self.sigma_vox = tuple(float(s) / v for s, v in zip(cfg.sigma_nm, self.voxel_size))
        ctx_vox = Coordinate(int(np.ceil(4 * s)) for s in self.sigma_vox)
        self.context = ctx_vox * self.voxel_size
        block = Coordinate(cfg.block_shape_nm)
        self.chunk = Coordinate(cfg.chunk_shape) if cfg.chunk_shape else block / self.voxel_size
        self._blocks = plan_blocks(self.roi, block, self.context, self.chunk * self.voxel_size,
                                   self.voxel_size)

    def blocks(self) -> list[Block]:
        return self._blocks

    def settings(self) -> dict:
        return {"step": self.name, **asdict(self.cfg), "roi": [list(self.roi.begin), list(self.roi.shape)]}

    def ledger_path(self) -> str:
        return os.path.join(self.cfg.output.rstrip("/") + ".ledger", self.name)

    def prepare(self, fresh: bool) -> None:
        if fresh:
            create_volume(self.cfg.output, shape=self.roi.shape / self.voxel_size,
                          voxel_size=self.voxel_size, offset=self.roi.begin, dtype="float32",
                          chunk_shape=self.chunk, overwrite=True)
        else:
            open_volume(self.cfg.output)

    @contextlib.contextmanager
    def worker(self):
        src = open_volume(self.cfg.input)
        dst = open_volume(self.cfg.output, mode="r+")

        def process(block: Block) -> None:
            data = src.read(block.read_roi, fill_outside=True).astype(np.float32)
            out = ndimage.gaussian_filter(data, self.sigma_vox, mode="constant", truncate=4.0)
            inner = (block.write_roi.begin - block.read_roi.begin) / self.voxel_size
            shape = block.write_roi.shape / self.voxel_size
            dst.write(block.write_roi, out[tuple(slice(b, b + s) for b, s in zip(inner, shape))])

        yield process
