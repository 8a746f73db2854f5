"""Write synapses as neuroglancer precomputed annotations (lines pre → post site, or points).

Format: neuroglancer's ``neuroglancer_annotations_v1`` (``src/datasource/precomputed/
annotations.md`` in google/neuroglancer), unsharded, readable as
``precomputed://http://…/annotations`` (or ``file://``). Coordinates are nm, dimensions
z, y, x with 1 nm units, so the annotations overlay any volume whose voxel size is in nm.

What is written (folder ``path``, replaced as a whole once complete):

- ``info``: type ``LINE`` (pre site → post site; a missing site falls back to the cleft
  centroid) or ``POINT`` (cleft centroid), bounds, properties, relationships, indexes;
- ``by_id/<id>``: one annotation (geometry, properties) plus its related segment ids;
- ``rel_pre_neuron/<segment>``, ``rel_post_neuron/<segment>``: every annotation of a neuron
  (uint64 segment ids; background 0 is not indexed): selecting a segment in neuroglancer
  shows its synapses;
- ``spatial<level>/<i>_<j>_<k>``: a multi-level spatial index; level 0 is one cell over the
  bounds, each finer level halves the longest cell sides; each cell holds at most ``limit``
  annotations (a uniform subsample, chosen by a hash of the id, so a rewrite is identical)
  and the rest go on to the finer cells.

Binary encoding (little endian): geometry float32 (point: 3, line: 6 values, z y x), then the
properties grouped by size as the spec orders them (4-byte types, then 2-byte, then 1-byte,
each group in the given order; ``info`` lists them in that same order, the one order both
neuroglancer's viewer and its Python reader decode), zero padding to a multiple of 4 bytes.
Property types are the spec's ``uint8 int8 uint16 int16 uint32 int32 float32``; integer
properties store a missing value (NaN) as 0 and clip to the type's range. Synapse and neuron
ids are uint64 in the binary files, never properties.

Scale: one file per annotation (``by_id``) and per related segment (unsharded index); fine
for up to ~10⁶ synapses on a local disk, sharding (not written here) would be the next step.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections import defaultdict
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from cleftwise.storage.atomic import atomic_dir
from cleftwise.storage.errors import StorageError

__all__ = ["write_synapse_annotations", "read_annotation_chunk", "DEFAULT_PROPERTIES",
           "RELATIONSHIPS", "PROPERTY_TYPES"]

#: property type → numpy little-endian dtype (the spec's numeric types)
PROPERTY_TYPES = {"uint8": "<u1", "int8": "<i1", "uint16": "<u2", "int16": "<i2",
                  "uint32": "<u4", "int32": "<i4", "float32": "<f4"}
#: (column, relationship id shown in neuroglancer, sub-folder)
RELATIONSHIPS = (("pre_neuron", "pre_neuron", "rel_pre_neuron"),
                 ("post_neuron", "post_neuron", "rel_post_neuron"))
#: default properties (column, type, description); ``ei_sign`` and ``flag_bits`` are derived
DEFAULT_PROPERTIES = (
    ("size", "uint32", "cleft size (voxels)"),
    ("score_union", "float32", "mean cleft probability"),
    ("pre_conf", "float32", "vote fraction of the presynaptic neuron"),
    ("post_conf", "float32", "vote fraction of the postsynaptic neuron"),
    ("ei_prob", "float32", "probability that the synapse is excitatory (NaN: not classified)"),
    ("ei_sign", "int8", "per-synapse E/I call from ei_prob: +1 E, -1 I, 0 not classified"),
    ("flag_bits", "uint16", "bit i set = flag i of cleftwise FLAG_NAMES"),
)
_NAME = re.compile(r"^[a-z][a-zA-Z0-9_]*$")
_MAX_LEVELS = 24


def _flag_bits(df: pd.DataFrame) -> np.ndarray:
    from cleftwise.storage.db.schema import FLAG_NAMES

    out = np.zeros(len(df), np.uint16)
    if "flags" not in df:
        return out
    for row, text in enumerate(df["flags"].fillna("").astype(str)):
        for name in filter(None, (t.strip() for t in text.split(","))):
            if name in FLAG_NAMES:
                out[row] |= np.uint16(1 << FLAG_NAMES.index(name))
    return out


def _column(df: pd.DataFrame, name: str, typ: str) -> np.ndarray:
    """The values of property ``name`` as ``typ`` (missing column: NaN / 0)."""
    dt = np.dtype(PROPERTY_TYPES[typ])
    if name == "ei_sign" and "ei_sign" not in df:
        p = df["ei_prob"].to_numpy(float) if "ei_prob" in df else np.full(len(df), np.nan)
        vals = np.where(np.isnan(p), 0, np.where(p >= 0.5, 1, -1)).astype(float)
    elif name == "flag_bits" and "flag_bits" not in df:
        vals = _flag_bits(df).astype(float)
    elif name in df:
        vals = pd.to_numeric(df[name], errors="coerce").to_numpy(float)
    else:
        vals = np.full(len(df), np.nan)
    if dt.kind == "f":
        return vals.astype(dt)
    info = np.iinfo(dt)
    return np.clip(np.nan_to_num(np.rint(vals), nan=0.0), info.min, info.max).astype(dt)


def _properties(props: Sequence) -> list[tuple[str, str, str]]:
    out = []
    for p in props:
        name, typ, desc = (tuple(p) + ("",))[:3]
        if not _NAME.match(str(name)):
            raise StorageError(f"annotation property {name!r}: names must match {_NAME.pattern}")
        if typ not in PROPERTY_TYPES:
            raise StorageError(f"annotation property {name!r}: type {typ!r} is not one of "
                               f"{', '.join(PROPERTY_TYPES)}")
        out.append((str(name), typ, str(desc)))
    if len({n for n, _, _ in out}) != len(out):
        raise StorageError("annotation properties: a name is given twice")
    return out


def _record_dtype(n_geo: int, props: Sequence[tuple]) -> np.dtype:
    """The single-annotation encoding: geometry, properties by size group, padding to 4 bytes."""
    ordered = sorted(props, key=lambda p: -np.dtype(PROPERTY_TYPES[p[1]]).itemsize)  # stable
    fields = [("geometry", "<f4", (n_geo,))] + [(n, PROPERTY_TYPES[t]) for n, t, *_ in ordered]
    size = sum(np.dtype(f[1]).itemsize * (f[2][0] if len(f) > 2 else 1) for f in fields)
    if size % 4:
        fields.append(("_pad", "V%d" % (4 - size % 4)))
    return np.dtype(fields)


def _hash01(ids: np.ndarray, salt: int) -> np.ndarray:
    """A pseudo-random number in [0, 1) per id (splitmix64), reproducible across writes."""
    with np.errstate(over="ignore"):
        z = ids.astype(np.uint64) + np.uint64((0x9E3779B97F4A7C15 * (salt + 1)) % 2**64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(2**53)


def _encode_list(records: np.ndarray, ids: np.ndarray) -> bytes:
    """Multiple-annotation encoding: uint64 count, the records, then their uint64 ids."""
    return (np.uint64(len(records)).astype("<u8").tobytes() + records.tobytes()
            + ids.astype("<u8").tobytes())


def _spatial_levels(box_lo: np.ndarray, box_hi: np.ndarray, ids: np.ndarray, lower: np.ndarray,
                    upper: np.ndarray, limit: int):
    """Yield (level metadata, {cell: annotation indices}) from coarse to fine (see module doc).

    ``box_lo``/``box_hi`` (n, 3): each annotation's bounding box; an annotation goes into
    every cell its box intersects, and leaves a cell's lineage once emitted there.
    """
    chunk = (upper - lower).astype(np.float64)
    grid = np.ones(3, np.int64)
    # remaining (annotation, cell) pairs; cells as integer coordinates of the current level
    ann = np.arange(len(ids))
    cells = np.zeros((len(ids), 3), np.int64)
    for level in range(_MAX_LEVELS):
        if not len(ann):
            return
        key = np.ravel_multi_index(cells.T, grid) if len(ann) else np.zeros(0, np.int64)
        uniq, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
        frac = 1.0 if level == _MAX_LEVELS - 1 else min(1.0, limit / counts.max())
        take = np.ceil(frac * counts).astype(np.int64)  # ≤ limit per cell
        order = np.lexsort((_hash01(ids[ann], level), key))
        rank = np.empty(len(ann), np.int64)
        starts = np.r_[0, np.cumsum(counts)[:-1]]
        rank[order] = np.arange(len(ann)) - np.repeat(starts, counts)
        emit = rank < take[inverse]
        emitted: dict[tuple, np.ndarray] = {}
        for sel in np.split(order[emit[order]], np.cumsum([int(c) for c in np.minimum(take, counts)])[:-1]):
            if len(sel):
                emitted[tuple(int(v) for v in cells[sel[0]])] = ann[sel]
        yield ({"key": f"spatial{level}", "grid_shape": [int(g) for g in grid],
                "chunk_size": [float(c) for c in chunk], "limit": int(limit)}, emitted)
        # the rest go to the child cells they intersect
        rest_ann, rest_cells = ann[~emit], cells[~emit]
        halve = chunk >= chunk.max() / 2
        new_chunk = np.where(halve, chunk / 2, chunk)
        new_grid = np.where(halve, grid * 2, grid)
        lo_c = np.floor((box_lo[rest_ann] - lower) / new_chunk).astype(np.int64)
        hi_c = np.floor((box_hi[rest_ann] - lower) / new_chunk).astype(np.int64)
        # children of the parent cell only
        first = rest_cells * np.where(halve, 2, 1)
        last = first + np.where(halve, 1, 0)
        lo_c = np.clip(lo_c, first, last)
        hi_c = np.clip(hi_c, first, last)
        next_ann, next_cells = [], []
        for dz in (0, 1):
            for dy in (0, 1):
                for dx in (0, 1):
                    c = lo_c + np.array([dz, dy, dx])
                    ok = np.all(c <= hi_c, axis=1)
                    next_ann.append(rest_ann[ok])
                    next_cells.append(c[ok])
        ann = np.concatenate(next_ann)
        cells = np.concatenate(next_cells)
        chunk, grid = new_chunk, new_grid


def write_synapse_annotations(df: pd.DataFrame, path: str, kind: str = "line",
                              properties: Optional[Sequence[tuple]] = None,
                              limit: int = 5000) -> str:
    """Write the synapses of ``df`` to the annotation folder ``path`` (replaced as a whole once
    complete; a failed write leaves the old one); returns ``path``.

    Args:
        df: synapse records: ``id`` and the geometry (line: ``pre_z/y/x`` and ``post_z/y/x``,
            each side falling back to the centroid ``z/y/x``; point: ``z/y/x``), nm; optional
            ``pre_neuron``/``post_neuron`` (uint64 segment ids, 0 = none) and property columns.
            Rows without any geometry are skipped.
        kind: ``line`` (pre site → post site) or ``point`` (cleft centroid).
        properties: (column, type[, description]) triples; default :data:`DEFAULT_PROPERTIES`.
        limit: most annotations per spatial index cell.
    """
    if kind not in ("line", "point"):
        raise StorageError(f"annotation kind must be line or point, got {kind!r}")
    if limit < 1:
        raise StorageError(f"annotation spatial limit must be >= 1, got {limit}")
    props = _properties(DEFAULT_PROPERTIES if properties is None else properties)
    # declared in the encoded order (4-, 2-, then 1-byte types): neuroglancer's viewer groups
    # by size, its Python reader follows the declaration; both agree on this order
    props = sorted(props, key=lambda p: -np.dtype(PROPERTY_TYPES[p[1]]).itemsize)
    centroid = [c for c in "zyx" if c in df.columns]
    if kind == "line":
        ends = []
        for side in ("pre", "post"):
            cols = [f"{side}_{a}" for a in "zyx"]
            if not all(c in df.columns for c in cols) and len(centroid) < 3:
                raise StorageError(f"{path}: synapse table lacks columns "
                                   f"{[c for c in cols if c not in df.columns]} for line annotations")
            xyz = (np.array(df[cols].to_numpy(float)) if all(c in df.columns for c in cols)
                   else np.full((len(df), 3), np.nan))
            if len(centroid) == 3:
                fill = np.isnan(xyz).any(axis=1)
                xyz[fill] = df[list("zyx")].to_numpy(float)[fill]
            ends.append(xyz)
        geom = np.concatenate(ends, axis=1)
    else:
        if len(centroid) < 3:
            raise StorageError(f"{path}: synapse table lacks columns "
                               f"{[c for c in 'zyx' if c not in df.columns]} for point annotations")
        geom = df[list("zyx")].to_numpy(float)
    if "id" not in df.columns:
        raise StorageError(f"{path}: synapse table lacks columns ['id'] for {kind} annotations")
    keep = ~np.isnan(geom).any(axis=1)
    d, geom = df.loc[keep], geom[keep]
    try:
        ids = d["id"].to_numpy(np.int64).astype(np.uint64)
    except (TypeError, ValueError) as e:
        raise StorageError(f"{path}: synapse ids must be integers: {e}") from None
    if len(np.unique(ids)) != len(ids):
        raise StorageError(f"{path}: synapse ids are not unique")
    n_geo = geom.shape[1]
    rec = np.zeros(len(d), _record_dtype(n_geo, props))
    rec["geometry"] = geom.astype(np.float32)
    for name, typ, _ in props:
        rec[name] = _column(d, name, typ)
    pts = geom.reshape(len(d), n_geo // 3, 3)
    box_lo, box_hi = (pts.min(axis=1), pts.max(axis=1)) if len(d) else (np.zeros((0, 3)), np.zeros((0, 3)))
    lower = np.floor(box_lo.min(axis=0)) if len(d) else np.zeros(3)
    upper = np.floor(box_hi.max(axis=0)) + 1 if len(d) else np.ones(3)
    segs = []
    for col, _, _ in RELATIONSHIPS:
        if col in d:
            v = pd.to_numeric(d[col], errors="coerce").fillna(0).to_numpy(np.int64)
            segs.append(v.astype(np.uint64))
        else:
            segs.append(np.zeros(len(d), np.uint64))
    levels = list(_spatial_levels(box_lo, box_hi, ids, lower, upper, limit))
    info = {
        "@type": "neuroglancer_annotations_v1",
        "dimensions": {"z": [1, "nm"], "y": [1, "nm"], "x": [1, "nm"]},
        "lower_bound": [float(v) for v in lower], "upper_bound": [float(v) for v in upper],
        "annotation_type": kind.upper(),
        "properties": [dict({"id": n, "type": t}, **({"description": s} if s else {})) for n, t, s in props],
        "relationships": [{"id": rid, "key": key} for _, rid, key in RELATIONSHIPS],
        "by_id": {"key": "by_id"},
        "spatial": [meta for meta, _ in levels] or [{"key": "spatial0", "grid_shape": [1, 1, 1],
                                                     "chunk_size": [1.0, 1.0, 1.0], "limit": int(limit)}],
    }
    with atomic_dir(path, "neuroglancer annotations") as tmp:
        for sub in ["by_id"] + [key for _, _, key in RELATIONSHIPS] + [m["key"] for m in info["spatial"]]:
            os.makedirs(os.path.join(tmp, sub))
        with open(os.path.join(tmp, "info"), "w") as f:
            json.dump(info, f, indent=1)
        for meta, cells in levels:
            for cell, sel in cells.items():
                _write_bytes(os.path.join(tmp, meta["key"], "_".join(map(str, cell))),
                             _encode_list(rec[sel], ids[sel]))
        for (_, _, key), seg in zip(RELATIONSHIPS, segs):
            groups: dict[int, list] = defaultdict(list)
            nz = np.flatnonzero(seg)
            order = nz[np.argsort(seg[nz], kind="stable")]
            if len(order):
                bounds = np.flatnonzero(np.diff(seg[order])) + 1
                for sel in np.split(order, bounds):
                    groups[int(seg[sel[0]])] = sel
            for s, sel in groups.items():
                _write_bytes(os.path.join(tmp, key, str(s)), _encode_list(rec[sel], ids[sel]))
        raw, size = rec.tobytes(), rec.dtype.itemsize
        one, none = struct.pack("<I", 1), struct.pack("<I", 0)
        seg_lists = [s.tolist() for s in segs]
        for i, annotation_id in enumerate(ids.tolist()):
            rel = b"".join(one + struct.pack("<Q", s[i]) if s[i] else none for s in seg_lists)
            _write_bytes(os.path.join(tmp, "by_id", str(annotation_id)), raw[i * size:(i + 1) * size] + rel)
    return path


def _write_bytes(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def read_annotation_chunk(path: str, key: str = "spatial0/0_0_0") -> tuple[np.ndarray, np.ndarray, dict]:
    """Decode one multiple-annotation file (a spatial cell or a relationship entry) back to
    (records, ids, info); records have ``geometry`` and one field per property."""
    with open(os.path.join(path, "info")) as f:
        info = json.load(f)
    n_geo = 6 if info["annotation_type"] == "LINE" else 3
    rec = _record_dtype(n_geo, [(p["id"], p["type"]) for p in info["properties"]])
    with open(os.path.join(path, key), "rb") as f:
        buf = f.read()
    n = int(np.frombuffer(buf[:8], "<u8")[0])
    arr = np.frombuffer(buf[8:8 + n * rec.itemsize], rec)
    ids = np.frombuffer(buf[8 + n * rec.itemsize:], "<u8")
    if len(ids) != n:
        raise StorageError(f"{path}/{key}: {len(buf)} bytes do not hold {n} annotations")
    return arr, ids, info
