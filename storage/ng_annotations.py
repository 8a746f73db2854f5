"""Write synapses as neuroglancer precomputed annotations (lines pre → post, or points).

Format: neuroglancer's ``neuroglancer_annotations_v1`` (info JSON, one spatial level with a
single chunk, and a ``by_id`` index), readable by neuroglancer as
``precomputed://file:///…/annotations``. Coordinates are nm with dimensions z, y, x (1 nm
units), so the annotations overlay any volume whose voxel size is given in nm.

Encoding of one annotation (little endian): geometry as float32 (point: 3, line: 6 values),
then properties (float32/uint32 in declaration order, padded to 4 bytes). A spatial chunk is
``uint64 count``, the annotations, then their ``uint64`` ids; a ``by_id`` entry is one
annotation followed by its relationship counts (none here).
"""

from __future__ import annotations

import json
import os
import struct
from typing import Sequence

import numpy as np
import pandas as pd

from cleftwise.storage.atomic import atomic_dir
from cleftwise.storage.errors import StorageError

__all__ = ["write_synapse_annotations", "read_annotation_chunk"]

_DEFAULT_PROPS = (("size", "uint32"), ("score_union", "float32"), ("ei_prob", "float32"),
                  ("pre_neuron_lo", "uint32"), ("post_neuron_lo", "uint32"))


def _property_columns(df: pd.DataFrame, props: Sequence[tuple]) -> list[np.ndarray]:
    cols = []
    for name, typ in props:
        if name.endswith("_lo"):
            src = df[name[:-3]].fillna(0).to_numpy(np.int64) if name[:-3] in df else np.zeros(len(df), np.int64)
            cols.append((src & 0xFFFFFFFF).astype(np.uint32))
        elif typ == "uint32":
            cols.append(df[name].fillna(0).to_numpy(np.int64).astype(np.uint32) if name in df
                        else np.zeros(len(df), np.uint32))
        else:
            cols.append(df[name].to_numpy(np.float32) if name in df else np.full(len(df), np.nan, np.float32))
    return cols


def write_synapse_annotations(df: pd.DataFrame, path: str, kind: str = "line",
                              properties: Sequence[tuple] = _DEFAULT_PROPS) -> str:
    """Write ``df`` (needs id and pre_z/y/x + post_z/y/x for lines, z/y/x for points) to the
    folder ``path``, replacing it as a whole once complete (a failed write leaves the old one)."""
    if kind not in ("line", "point"):
        raise StorageError(f"annotation kind must be line or point, got {kind!r}")
    geo_cols = ([f"pre_{a}" for a in "zyx"] + [f"post_{a}" for a in "zyx"]) if kind == "line" else list("zyx")
    missing = [c for c in ["id"] + geo_cols if c not in df.columns]
    if missing:
        raise StorageError(f"{path}: synapse table lacks columns {missing} for {kind} annotations")
    d = df.dropna(subset=geo_cols)
    geom = d[geo_cols].to_numpy(np.float32)
    ids = d["id"].to_numpy(np.int64).astype(np.uint64)
    props = _property_columns(d, properties)
    rec = np.dtype([("g", "<f4", (len(geo_cols),))] + [(n, "<u4" if t == "uint32" else "<f4")
                                                        for n, t in properties])
    arr = np.zeros(len(d), rec)
    arr["g"] = geom
    for (n, _), col in zip(properties, props):
        arr[n] = col
    lo = geom.reshape(len(d), -1, 3).min(axis=(0, 1)) if len(d) else np.zeros(3, np.float32)
    hi = geom.reshape(len(d), -1, 3).max(axis=(0, 1)) + 1 if len(d) else np.ones(3, np.float32)
    info = {
        "@type": "neuroglancer_annotations_v1",
        "dimensions": {"z": [1, "nm"], "y": [1, "nm"], "x": [1, "nm"]},
        "lower_bound": [float(v) for v in lo], "upper_bound": [float(v) for v in hi],
        "annotation_type": kind.upper(),
        "properties": [{"id": n, "type": t} for n, t in properties],
        "relationships": [],
        "by_id": {"key": "by_id"},
        "spatial": [{"key": "spatial0", "grid_shape": [1, 1, 1],
                     "chunk_size": [float(h - l) for l, h in zip(lo, hi)], "limit": max(1, len(d))}],
    }
    with atomic_dir(path, "neuroglancer annotations") as tmp:
        os.makedirs(os.path.join(tmp, "spatial0"))
        os.makedirs(os.path.join(tmp, "by_id"))
        with open(os.path.join(tmp, "info"), "w") as f:
            json.dump(info, f, indent=1)
        with open(os.path.join(tmp, "spatial0", "0_0_0"), "wb") as f:
            f.write(struct.pack("<Q", len(d)))
            f.write(arr.tobytes())
            f.write(ids.astype("<u8").tobytes())
        for i, a in zip(ids, arr):
            with open(os.path.join(tmp, "by_id", str(int(i))), "wb") as f:
                f.write(a.tobytes())
    return path


def read_annotation_chunk(path: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """Decode ``spatial0/0_0_0`` back to (records, ids, info) — used by tests and tools."""
    with open(os.path.join(path, "info")) as f:
        info = json.load(f)
    n_geo = 6 if info["annotation_type"] == "LINE" else 3
    rec = np.dtype([("g", "<f4", (n_geo,))] + [(p["id"], "<u4" if p["type"] == "uint32" else "<f4")
                                                for p in info["properties"]])
    with open(os.path.join(path, "spatial0", "0_0_0"), "rb") as f:
        buf = f.read()
    (n,) = struct.unpack("<Q", buf[:8])
    arr = np.frombuffer(buf[8:8 + n * rec.itemsize], rec)
    ids = np.frombuffer(buf[8 + n * rec.itemsize:], "<u8")
    return arr, ids, info
