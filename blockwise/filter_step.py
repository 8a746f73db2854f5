"""A blockwise Gaussian filter of a volume: a generic step that needs context.

Useful on its own (smoothing probability maps before thresholding) and as the reference
step for the engine: its blockwise result equals a whole-volume
``scipy.ndimage.gaussian_filter(..., mode="constant")`` exactly, because each block reads its
write ROI grown by 4σ (zeros outside the volume).
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
from funlib.geometry import Coordinate, Roi
from scipy import ndimage

from cleftwise.storage.volume import open_volume

from cleftwise.blockwise.errors import BlockwiseError
from cleftwise.blockwise.grid import Block
from cleftwise.blockwise.step import ArraySpec, BlockStep


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


class FilterStep(BlockStep):
    """Gaussian smoothing, block by block, with 4σ of context (see the module docstring)."""

    name = "filter"

    def __init__(self, cfg: FilterConfig):
        self.cfg = cfg
        src = open_volume(cfg.input)
        if src.num_channels is not None:
            raise BlockwiseError(f"{cfg.input}: filter expects a 3D volume, got channels")
        self.voxel_size = src.voxel_size
        self.total_roi = Roi(*cfg.roi) if cfg.roi else src.roi
        self.sigma_vox = tuple(float(s) / v for s, v in zip(cfg.sigma_nm, self.voxel_size))
        self.context = Coordinate(int(np.ceil(4 * s)) for s in self.sigma_vox)
        self.write_size = Coordinate(cfg.block_shape_nm) / self.voxel_size
        self.chunk = Coordinate(cfg.chunk_shape) if cfg.chunk_shape else self.write_size
        self.work_dir = cfg.output.rstrip("/") + ".work"

    def outputs(self) -> list[ArraySpec]:
        return [ArraySpec(self.cfg.output, "float32", chunk_shape=tuple(self.chunk))]

    def identity(self) -> dict:
        return asdict(self.cfg)

    @contextlib.contextmanager
    def open_worker(self):
        yield open_volume(self.cfg.input), open_volume(self.cfg.output, mode="r+")

    def process(self, block: Block, volumes) -> None:
        src, dst = volumes
        data = src.read(block.read_roi, fill_outside=True).astype(np.float32)
        out = ndimage.gaussian_filter(data, self.sigma_vox, mode="constant", truncate=4.0)
        inner = (block.write_roi.begin - block.read_roi.begin) / self.voxel_size
        shape = block.write_roi.shape / self.voxel_size
        dst.write(block.write_roi, out[tuple(slice(b, b + s) for b, s in zip(inner, shape))])
