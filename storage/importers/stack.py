"""Import image stacks (a folder of per-section TIFF/PNG files, or a multi-page TIFF) as volumes.

Sections are sorted by file name (natural order: ``2.png`` before ``10.png``) and become z;
each image is (y, x). Raw stacks keep their dtype (uint8 expected for EM); masks become uint8
0/1 (``kind="mask"``) or uint64 instance labels by 3D connected components
(``kind="instances"``). The volume is written section-block by section-block, so memory holds
one chunk-deep slab at a time.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from cleftwise.storage.errors import StorageError
from cleftwise.storage.volume import Volume, create_volume

__all__ = ["StackImportConfig", "list_sections", "import_stack"]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".tif", ".tiff", ".png")


@dataclass
class StackImportConfig:
    """What to import and how."""

    source: str
    """folder of per-section images (sorted by name) or one multi-page TIFF"""
    output: str
    """output volume URL, e.g. vnc.zarr/raw"""
    voxel_size: tuple = (50, 4, 4)
    """nm per voxel (z, y, x); ints (round sub-nm sizes, e.g. 4.6 → 5, and say so)"""
    offset: tuple = (0, 0, 0)
    """nm (z, y, x)"""
    kind: str = "raw"
    """raw (keep values), mask (uint8 0/1: value > 0) or instances (uint64, 3D CC of the mask)"""
    connectivity: int = 6
    """connected components for kind=instances (6, 18, 26)"""
    chunk_shape: Optional[tuple] = None
    """voxels (z, y, x); default (min(depth, 8), 256, 256)"""
    overwrite: bool = False


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def list_sections(folder: str) -> list[str]:
    """Image files in ``folder`` in natural name order; raises if none."""
    if not os.path.isdir(folder):
        raise StorageError(f"{folder}: not a folder of section images")
    files = sorted((f for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES)), key=_natural_key)
    if not files:
        raise StorageError(f"{folder}: no TIFF/PNG images found (looked for {', '.join(IMAGE_SUFFIXES)})")
    return [os.path.join(folder, f) for f in files]


def _read_image(path: str) -> np.ndarray:
    import imageio.v3 as iio

    try:
        img = iio.imread(path)
    except Exception as e:  # noqa: BLE001 - any decoder error is reported with the file
        raise StorageError(f"{path}: unreadable image ({e})") from e
    if img.ndim == 3 and img.shape[-1] in (3, 4):  # RGB(A) of a grey image or mask
        if not (np.all(img[..., 0] == img[..., 1]) and np.all(img[..., 0] == img[..., 2])):
            raise StorageError(f"{path}: colour image; EM sections and masks must be single-channel")
        img = img[..., 0]
    if img.ndim != 2:
        raise StorageError(f"{path}: expected a 2D (y, x) section, got shape {img.shape}")
    return img


class _Sections:
    """Uniform access to sections of a folder or a multi-page TIFF."""

    def __init__(self, source: str):
        self.source = source
        if os.path.isdir(source):
            self.files = list_sections(source)
            first = _read_image(self.files[0])
            self.depth = len(self.files)
            self._tiff = None
        elif os.path.isfile(source) and source.lower().endswith((".tif", ".tiff")):
            import tifffile

            try:
                self._tiff = tifffile.TiffFile(source)
                series = self._tiff.series[0]
            except Exception as e:  # noqa: BLE001
                raise StorageError(f"{source}: unreadable TIFF ({e})") from e
            shape = series.shape
            if len(shape) == 2:
                shape = (1,) + tuple(shape)
            if len(shape) != 3:
                raise StorageError(f"{source}: expected a (z, y, x) multi-page TIFF, got shape {shape}")
            self.depth = int(shape[0])
            self.files = None
            first = series.asarray()[0] if len(series.shape) == 3 else series.asarray()
        else:
            raise StorageError(f"{source}: no such folder or multi-page TIFF")
        self.shape2d = first.shape
        self.dtype = first.dtype

    def read(self, z0: int, z1: int) -> np.ndarray:
        if self.files is not None:
            out = []
            for f in self.files[z0:z1]:
                img = _read_image(f)
                if img.shape != self.shape2d:
                    raise StorageError(f"{f}: section shape {img.shape} differs from the first "
                                       f"section's {self.shape2d} ({self.files[0]})")
                if img.dtype != self.dtype:
                    raise StorageError(f"{f}: dtype {img.dtype} differs from the first section's "
                                       f"{self.dtype} ({self.files[0]})")
                out.append(img)
            return np.stack(out)
        arr = self._tiff.series[0].asarray()
        arr = arr[None] if arr.ndim == 2 else arr
        return arr[z0:z1]


def import_stack(cfg: StackImportConfig) -> Volume:
    """Write the stack as a volume and return it (see module docstring)."""
    if cfg.kind not in ("raw", "mask", "instances"):
        raise StorageError(f"kind must be raw, mask or instances, got {cfg.kind!r}")
    sec = _Sections(cfg.source)
    shape = (sec.depth,) + tuple(sec.shape2d)
    chunk = tuple(cfg.chunk_shape) if cfg.chunk_shape else (min(sec.depth, 8), min(shape[1], 256),
                                                             min(shape[2], 256))
    dtype = {"raw": sec.dtype, "mask": np.uint8, "instances": np.uint64}[cfg.kind]
    vol = create_volume(cfg.output, shape=shape, voxel_size=cfg.voxel_size, offset=cfg.offset,
                        dtype=dtype, chunk_shape=chunk, overwrite=cfg.overwrite,
                        attrs={"source": os.path.abspath(cfg.source), "kind": cfg.kind})
    from funlib.geometry import Coordinate, Roi

    vs = Coordinate(cfg.voxel_size)
    if cfg.kind == "instances":
        # 3D CC needs the whole mask; masks are 1 byte/voxel, labels are written by slabs
        import cc3d

        mask = sec.read(0, sec.depth) > 0
        labels = cc3d.connected_components(mask, connectivity=cfg.connectivity, out_dtype=np.uint64)
        vol.write(vol.roi, labels)
        log.info("%s: %d instances", cfg.output, int(labels.max()))
        return vol
    step = chunk[0]
    for z0 in range(0, sec.depth, step):
        z1 = min(sec.depth, z0 + step)
        data = sec.read(z0, z1)
        if cfg.kind == "mask":
            data = (data > 0).astype(np.uint8)
        roi = Roi(Coordinate(cfg.offset) + Coordinate(z0, 0, 0) * vs,
                  Coordinate(z1 - z0, shape[1], shape[2]) * vs)
        vol.write(roi, np.ascontiguousarray(data))
    return vol
