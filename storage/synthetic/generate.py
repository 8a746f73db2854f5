"""Synthetic EM volumes with complete ground truth: neurites, membranes, mitochondria and
E/I synapses (cleft, polarity, partners), generated blockwise from a seed.

The image imitates serial-section TEM of neuropil (CREMI-like, 40 x 4 x 4 nm voxels): grey
textured neurites separated by dark membranes, dark mitochondria with cristae, synapses with a
dark postsynaptic density and a cloud of vesicles on the presynaptic side. Excitatory synapses
are asymmetric (thick PSD, round ~45 nm vesicles), inhibitory ones symmetric (thin densities,
smaller flattened vesicles); the class is a property of the presynaptic axon (Dale's
principle).

Everything is a function of global coordinates and the seed (see
:mod:`cleftwise.storage.synthetic.geometry`), so a volume can be rendered block by block with memory
bounded by the block, and one block or many give byte-identical arrays.

Outputs of :func:`generate_volume`, in one zarr container (written through
:mod:`cleftwise.storage.volume`, with voxel size and offset metadata):

- ``raw`` uint8 (z, y, x) image.
- ``neurons`` uint64 (z, y, x) neuron ids; every voxel has one (no background): a membrane is
  split between the two cells it separates at their exact boundary. The branches of one axon
  share an id.
- ``synapses`` uint64 (z, y, x) synapse instance ids on cleft + presynaptic band +
  postsynaptic band (the "union" a polarity model predicts), 0 elsewhere.
- ``polarity`` uint8 (3, z, y, x) 0/1 channels: pre side, post side, union (the pre and post
  channels are the union split by neuron label, as PyTorch Connectomics' seg_to_polarity).
- ``cleft`` uint8 (z, y, x) 0/1 cleft (the two membranes and the gap between them).
- ``synapses.csv`` / ``synapses.parquet`` (files inside the container): one row per synapse
  present in the volume, see :data:`TABLE_COLUMNS`.
- ``neurons.csv``: one row per neuron present: id, kind, ei_label, voxel count.

World positions in the tables are ``offset + index * voxel_size`` (nm, z, y, x).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np
import pandas as pd
from funlib.geometry import Coordinate, Roi

from cleftwise.storage.errors import StorageError
from cleftwise.storage.synthetic.geometry import SynapseTiles, SyntheticConfig
from cleftwise.storage.synthetic.render import render_block
from cleftwise.storage.volume import create_volume

__all__ = [
    "SyntheticConfig", "SyntheticResult", "TABLE_COLUMNS", "NEURON_COLUMNS", "DATASETS",
    "generate_block", "generate_arrays", "generate_volume", "iter_blocks", "read_synapse_table",
]

log = logging.getLogger(__name__)

TABLE_COLUMNS = [
    "id", "centroid_z", "centroid_y", "centroid_x",
    "pre_site_z", "pre_site_y", "pre_site_x", "post_site_z", "post_site_y", "post_site_x",
    "pre_neuron", "post_neuron", "ei_label", "size",
]
"""Synapse table columns: id (uint64, as in the ``synapses`` volume); centroid of its voxels,
pre site and post site (points on the synapse normal just outside the cleft) in nm;
pre/post neuron ids; "E" or "I"; size in voxels."""

NEURON_COLUMNS = ["id", "kind", "ei_label", "size"]
"""Neuron table columns: id; "axon" or "dendrite"; "E"/"I" for axons that form synapses,
"" otherwise; voxel count in the volume."""

DATASETS = {"raw": "uint8", "neurons": "uint64", "synapses": "uint64", "polarity": "uint8",
            "cleft": "uint8"}


@dataclass
class SyntheticResult:
    """What :func:`generate_volume` wrote."""

    path: str
    """The zarr container."""
    datasets: dict
    """Dataset name -> full path (container/name)."""
    table_csv: str
    table_parquet: str
    neuron_csv: str
    table: pd.DataFrame
    """The synapse table (see :data:`TABLE_COLUMNS`)."""
    seconds: float
    """Wall time of the generation."""
    voxels: int


def iter_blocks(cfg: SyntheticConfig) -> Iterator[tuple[tuple[int, int, int], tuple[int, int, int]]]:
    """(start, shape) voxel boxes tiling the volume in z, y, x raster order."""
    shape, block = cfg.shape, cfg.block_shape
    for z in range(0, shape[0], block[0]):
        for y in range(0, shape[1], block[1]):
            for x in range(0, shape[2], block[2]):
                start = (z, y, x)
                yield start, tuple(min(b, s - o) for b, s, o in zip(block, shape, start))


def generate_block(cfg: SyntheticConfig, start, shape, tiles: Optional[SynapseTiles] = None) -> dict:
    """The arrays of the voxel box [start, start + shape) (global indices, z, y, x).

    Returns ``raw``, ``neurons``, ``synapses``, ``polarity`` (3, z, y, x) and ``cleft`` (see
    the module docstring); identical to the same box cut out of any other tiling. ``tiles``
    (a :class:`SynapseTiles` for ``cfg``) may be shared between calls to reuse work.
    """
    out = render_block(cfg, start, shape, tiles.warp if tiles is not None else None, tiles)
    return {k: out[k] for k in DATASETS}


class _Accumulator:
    """Per-synapse and per-neuron statistics summed over blocks (exact integer sums)."""

    def __init__(self, cfg: SyntheticConfig):
        self.cfg = cfg
        self.syn_count: dict[int, int] = {}
        self.syn_sum: dict[int, np.ndarray] = {}
        self.syn_defs: dict[int, tuple] = {}
        self.neuron_count: dict[int, int] = {}
        self.neuron_props: dict[int, tuple[bool, bool, bool]] = {}

    def add(self, start, out: dict) -> None:
        syn = out["synapses"]
        nz = np.flatnonzero(syn)
        if len(nz):
            ids, inv, counts = np.unique(syn.ravel()[nz], return_inverse=True, return_counts=True)
            zyx = np.unravel_index(nz, syn.shape)
            for i, sid in enumerate(ids.tolist()):
                self.syn_count[sid] = self.syn_count.get(sid, 0) + int(counts[i])
            for axis in range(3):
                sums = np.bincount(inv, weights=zyx[axis] + int(start[axis]), minlength=len(ids))
                for i, sid in enumerate(ids.tolist()):
                    acc = self.syn_sum.setdefault(sid, np.zeros(3, np.int64))
                    acc[axis] += int(round(sums[i]))
        defs = out["synapse_defs"]
        pre_site, post_site = defs.sites(self.cfg)
        for i, sid in enumerate(defs.ids.tolist()):
            if sid not in self.syn_defs:
                self.syn_defs[sid] = (int(defs.pre_id[i]), int(defs.post_id[i]), bool(defs.exc[i]),
                                      pre_site[i], post_site[i])
        ids, counts = np.unique(out["neurons"], return_counts=True)
        for nid, c in zip(ids.tolist(), counts.tolist()):
            self.neuron_count[nid] = self.neuron_count.get(nid, 0) + c
        nr = out["neuron_defs"]
        for nid, ax, syn_ax, exc in zip(nr.ids.tolist(), nr.is_axon.tolist(),
                                        nr.is_synaptic.tolist(), nr.is_exc.tolist()):
            self.neuron_props.setdefault(nid, (ax, syn_ax, exc))

    def synapse_table(self) -> pd.DataFrame:
        vs = np.asarray(self.cfg.voxel_size, np.float64)
        off = np.asarray(self.cfg.offset, np.float64)
        rows = []
        for sid in sorted(self.syn_count):
            if sid not in self.syn_defs:
                raise StorageError(f"synthetic: synapse {sid} has voxels but no definition "
                                   "(internal inconsistency)")
            pre, post, exc, ps, qs = self.syn_defs[sid]
            n = self.syn_count[sid]
            c = self.syn_sum[sid] / n * vs + off
            rows.append((sid, *c, *(ps + off), *(qs + off), pre, post, "E" if exc else "I", n))
        df = pd.DataFrame(rows, columns=TABLE_COLUMNS)
        return df.astype({"id": np.uint64, "pre_neuron": np.uint64, "post_neuron": np.uint64,
                          "size": np.int64})

    def neuron_table(self) -> pd.DataFrame:
        rows = []
        for nid in sorted(self.neuron_count):
            ax, syn_ax, exc = self.neuron_props.get(nid, (False, False, False))
            rows.append((nid, "axon" if ax else "dendrite",
                         ("E" if exc else "I") if syn_ax else "", self.neuron_count[nid]))
        df = pd.DataFrame(rows, columns=NEURON_COLUMNS)
        return df.astype({"id": np.uint64, "size": np.int64})


def generate_arrays(cfg: SyntheticConfig, max_voxels: int = 64 * 1024 * 1024) -> dict:
    """The whole volume in memory (for tests and small volumes), rendered block by block.

    Returns the arrays of :func:`generate_block` over the full shape plus ``table`` (the
    synapse table DataFrame) and ``neuron_table``.
    """
    n = int(np.prod(cfg.shape))
    if n > max_voxels:
        raise StorageError(f"synthetic volume {cfg.shape} has {n} voxels, more than max_voxels="
                           f"{max_voxels}; use generate_volume to write it blockwise")
    arrays = {k: np.zeros(((3,) if k == "polarity" else ()) + tuple(cfg.shape), dt)
              for k, dt in DATASETS.items()}
    tiles = SynapseTiles(cfg)
    acc = _Accumulator(cfg)
    for start, shape in iter_blocks(cfg):
        out = render_block(cfg, start, shape, tiles.warp, tiles)
        sl = tuple(slice(s, s + d) for s, d in zip(start, shape))
        for k in DATASETS:
            arrays[k][(slice(None),) + sl if k == "polarity" else sl] = out[k]
        acc.add(start, out)
    arrays["table"] = acc.synapse_table()
    arrays["neuron_table"] = acc.neuron_table()
    return arrays


def generate_volume(cfg: SyntheticConfig, out_path: str, overwrite: bool = False,
                    progress: Optional[Callable[[int, int], None]] = None) -> SyntheticResult:
    """Render ``cfg`` block by block into the zarr container ``out_path`` (see the module
    docstring for the datasets and tables). Peak memory is bounded by ``cfg.block_shape``.

    ``progress(done, total)`` is called after each block. Raises :class:`StorageError` if the
    container's datasets exist and ``overwrite`` is False.
    """
    out_path = os.path.abspath(os.path.expanduser(str(out_path)))
    if not out_path.rstrip("/").endswith((".zarr", ".zarr3")):
        raise StorageError(f"{out_path}: the synthetic container must be a .zarr path")
    vs, off = Coordinate(cfg.voxel_size), Coordinate(cfg.offset)
    chunk = tuple(min(c, s) for c, s in zip(cfg.chunk_shape, cfg.shape))
    attrs = {"synthetic_config": cfg.to_dict(), "generator": "cleftwise.storage.synthetic"}
    vols, paths = {}, {}
    for name, dtype in DATASETS.items():
        paths[name] = os.path.join(out_path, name)
        extra = dict(attrs)
        if name == "polarity":
            extra["channels"] = ["pre", "post", "union"]
        vols[name] = create_volume(paths[name], shape=cfg.shape, voxel_size=cfg.voxel_size,
                                   offset=cfg.offset, dtype=dtype, chunk_shape=chunk,
                                   num_channels=3 if name == "polarity" else None,
                                   overwrite=overwrite, attrs=extra)
    tiles = SynapseTiles(cfg, max_tiles=64)
    acc = _Accumulator(cfg)
    blocks = list(iter_blocks(cfg))
    t0 = time.perf_counter()
    for i, (start, shape) in enumerate(blocks):
        out = render_block(cfg, start, shape, tiles.warp, tiles)
        roi = Roi(off + Coordinate(start) * vs, Coordinate(shape) * vs)
        for name, vol in vols.items():
            vol.write(roi, out[name])
        acc.add(start, out)
        del out
        if progress is not None:
            progress(i + 1, len(blocks))
        log.info("synthetic: block %d/%d %s done (%.1f s)", i + 1, len(blocks), start,
                 time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    table = acc.synapse_table()
    csv_path = os.path.join(out_path, "synapses.csv")
    pq_path = os.path.join(out_path, "synapses.parquet")
    neuron_path = os.path.join(out_path, "neurons.csv")
    try:
        table.to_csv(csv_path, index=False)
        table.to_parquet(pq_path, index=False)
        acc.neuron_table().to_csv(neuron_path, index=False)
        vols["synapses"].set_attrs({"table_csv": "../synapses.csv",
                                    "table_parquet": "../synapses.parquet",
                                    "neuron_table_csv": "../neurons.csv",
                                    "num_synapses": int(len(table))})
    except (OSError, ValueError) as e:
        raise StorageError(f"{out_path}: writing the synapse table failed: {e}") from e
    return SyntheticResult(path=out_path, datasets=paths, table_csv=csv_path,
                           table_parquet=pq_path, neuron_csv=neuron_path, table=table,
                           seconds=seconds, voxels=int(np.prod(cfg.shape)))


def read_synapse_table(container: str) -> pd.DataFrame:
    """The synapse table written by :func:`generate_volume` (Parquet, else CSV)."""
    pq = os.path.join(container, "synapses.parquet")
    csv = os.path.join(container, "synapses.csv")
    try:
        if os.path.exists(pq):
            return pd.read_parquet(pq)
        if os.path.exists(csv):
            return pd.read_csv(csv, dtype={"id": np.uint64, "pre_neuron": np.uint64,
                                           "post_neuron": np.uint64, "ei_label": str})
    except (OSError, ValueError) as e:
        raise StorageError(f"{container}: reading the synapse table failed: {e}") from e
    raise StorageError(f"{container}: no synapses.parquet or synapses.csv found")
