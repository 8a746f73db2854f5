"""Output layouts of synapse query results: cleftwise's own, CAVE's synapse table, neuPrint/MANC.

Pure conversions of a query result (schema columns + extra fields, see
:mod:`cleftwise.storage.db.extra_fields`) to another table layout, the metadata that marks a
file as written by cleftwise, and the JSON encoding with 64-bit ids as decimal strings.

- ``cleftwise``: the records as stored (schema columns, then extra fields), (z, y, x) nm.
- ``cave``: CAVE's synapse-table columns ``id``, ``valid``, ``pre_pt_supervoxel_id``,
  ``pre_pt_root_id``, ``post_pt_supervoxel_id``, ``post_pt_root_id``, ``size``,
  ``pre_pt_position``, ``post_pt_position``, ``ctr_pt_position``, then cleftwise's
  ``score_union``, ``ei_prob``, ``ei_label``, ``sign`` and the other extra fields. Positions
  are voxels in **x, y, z** order at the stated resolution (default 4 × 4 × 40 nm, x, y, z),
  as caveclient returns them with ``desired_resolution``: float64 lists in Parquet/JSON, split
  columns ``pre_pt_position_x`` … (caveclient's ``split_positions=True``) in CSV/text. Supervoxel
  ids and ``valid`` come from extra fields of those names (``valid`` is true where absent); the
  supervoxel columns appear only when the database has them. Root ids are int64 as CAVE stores
  them (a uint64 id >= 2**63 keeps its bits). ``sign``: +1 where ``ei_prob >= 0.5``, -1 below,
  missing where unknown (no E/I probability).
- ``manc``: neuPrint/MANC synapse exports: ``bodyId_pre``, ``bodyId_post``, ``bbox_xmin`` …
  ``bbox_zmax``, ``x_pre`` … ``z_post`` (float64 voxels, default 8 nm), ``confidence``
  (``score_union``), ``neurotransmitter`` (``ei_label``), ``any_out_of_range`` (flag
  ``out_of_range``), then the extra fields.

Every layout imports back without a column mapping (``storage/importers/tables.py`` detects it
from :data:`META_KEY` or the column names), and export → import → export gives the same file.
"""

from __future__ import annotations

import json
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from cleftwise.storage.errors import StorageError
from cleftwise.storage.db.extra_fields import ID_COLUMN, arrow_type
from cleftwise.storage.db.schema import COLUMNS, SCHEMA_VERSION

__all__ = ["LAYOUTS", "DEFAULT_VOXEL_SIZE", "META_KEY", "DERIVED", "check_layout", "layout_fields",
           "to_layout", "file_metadata", "pandas_attrs", "csv_dtypes", "json_text", "sidecar_path"]

LAYOUTS = ("cleftwise", "cave", "manc")
#: default (z, y, x) nm per voxel of the foreign layouts
DEFAULT_VOXEL_SIZE = {"cave": (40.0, 4.0, 4.0), "manc": (8.0, 8.0, 8.0)}
#: Parquet key-value metadata key (and sidecar content) marking a file cleftwise wrote
META_KEY = b"cleftwise"
_UNSIGNED_IDS = {"pre_neuron", "post_neuron", "pre_pt_root_id", "post_pt_root_id", "bodyId_pre",
                 "bodyId_post"}
_SCHEMA_IDS = {c.name for c in COLUMNS if c.unit == "id"}
_CAVE_FROM_EXTRA = ("valid", "pre_pt_supervoxel_id", "post_pt_supervoxel_id")
#: columns a layout derives from the record: not kept as extra fields when re-imported
DERIVED = {"cave": ("sign",), "manc": (), "cleftwise": ()}


def sidecar_path(path: str) -> str:
    """Where a CSV's metadata sidecar lies: ``<path>.meta.json``."""
    return f"{path}.meta.json"


def check_layout(layout: str, voxel_size: Optional[Sequence[float]]) -> Optional[tuple]:
    """Validated (z, y, x) nm voxel size of ``layout`` (None for ``cleftwise``)."""
    if layout not in LAYOUTS:
        raise StorageError(f"unknown table layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    if layout == "cleftwise":
        if voxel_size is not None:
            raise StorageError("a voxel size applies to the cave and manc layouts; the cleftwise "
                               "layout is in nm")
        return None
    vs = DEFAULT_VOXEL_SIZE[layout] if voxel_size is None else voxel_size
    try:
        vs = tuple(float(v) for v in vs)
    except (TypeError, ValueError):
        raise StorageError(f"voxel size must be 3 numbers (z, y, x) nm, got {voxel_size!r}") from None
    if len(vs) != 3 or not all(np.isfinite(v) and v > 0 for v in vs):
        raise StorageError(f"voxel size must be 3 positive numbers (z, y, x) nm, got {voxel_size!r}")
    return vs


def _packed_positions(fmt: str) -> bool:
    return fmt in ("parquet", "json")


def layout_fields(layout: str, columns: Sequence[str], extra_types: dict, fmt: str) -> list:
    """``[(name, pyarrow type)]`` of the output columns of ``layout`` for a result with
    ``columns`` (schema + extra names) in format ``fmt`` (parquet, csv, json, table)."""
    import pyarrow as pa
    from cleftwise.storage.db.schema import arrow_schema

    if layout == "cleftwise":
        return [(f.name, f.type) for f in arrow_schema(columns, extra_types)]
    extras = [c for c in columns if c in extra_types]
    f64 = pa.float64()
    if layout == "cave":
        pos = pa.list_(f64)
        out = [("id", pa.int64()), ("valid", pa.bool_())]
        for side in ("pre", "post"):
            sv = f"{side}_pt_supervoxel_id"
            if sv in extra_types:
                out.append((sv, arrow_type(extra_types[sv])))
            out.append((f"{side}_pt_root_id", pa.int64()))
        out.append(("size", pa.int64()))
        for p in ("pre_pt_position", "post_pt_position", "ctr_pt_position"):
            out += [(p, pos)] if _packed_positions(fmt) else [(f"{p}_{a}", f64) for a in "xyz"]
        out += [("score_union", f64), ("ei_prob", f64), ("ei_label", pa.string()), ("sign", pa.int8())]
        taken = {n for n, _ in out}
        return out + [(c, arrow_type(extra_types[c])) for c in extras if c not in taken]
    out = [("bodyId_pre", pa.int64()), ("bodyId_post", pa.int64())]
    out += [(f"bbox_{a}{e}", f64) for a in "xyz" for e in ("min", "max")]
    out += [(f"{a}_{s}", f64) for s in ("pre", "post") for a in "xyz"]
    out += [("confidence", f64), ("neurotransmitter", pa.string()), ("any_out_of_range", pa.bool_())]
    taken = {n for n, _ in out}
    return out + [(c, arrow_type(extra_types[c])) for c in extras if c not in taken]


def _voxels(df: pd.DataFrame, prefix: str, vs: tuple) -> np.ndarray:
    """(n, 3) float64 voxels in x, y, z of the nm columns ``{prefix}z/y/x``."""
    return np.stack([df[f"{prefix}{a}"].to_numpy(np.float64, na_value=np.nan) / vs["zyx".index(a)]
                     for a in "xyz"], axis=1)


def to_layout(df: pd.DataFrame, layout: str, voxel_size: Optional[tuple], extra_types: dict,
              fmt: str) -> pd.DataFrame:
    """A query result (every schema column, then extra fields) in ``layout`` (see the module
    docstring); ``voxel_size`` (z, y, x) nm from :func:`check_layout`."""
    if layout == "cleftwise":
        return df
    fields = layout_fields(layout, list(df.columns), extra_types, fmt)
    out: dict = {}
    n = len(df)
    vs = voxel_size
    if layout == "cave":
        out["id"] = df["id"].to_numpy(np.int64)
        valid = df["valid"].astype("boolean") if "valid" in df.columns else pd.Series(pd.array([pd.NA] * n, "boolean"))
        out["valid"] = valid.fillna(True).to_numpy(bool)
        for side in ("pre", "post"):
            sv = f"{side}_pt_supervoxel_id"
            if sv in extra_types:
                out[sv] = df[sv].array
            out[f"{side}_pt_root_id"] = df[f"{side}_neuron"].to_numpy(np.int64)
        out["size"] = df["size"].array
        for p, prefix in (("pre_pt_position", "pre_"), ("post_pt_position", "post_"), ("ctr_pt_position", "")):
            v = _voxels(df, prefix, vs)
            if _packed_positions(fmt):
                col = np.empty(n, dtype=object)
                col[:] = list(v) if n else []
                out[p] = col
            else:
                for k, a in enumerate("xyz"):
                    out[f"{p}_{a}"] = v[:, k]
        out["score_union"] = df["score_union"].to_numpy(np.float64)
        p = df["ei_prob"].to_numpy(np.float64)
        out["ei_prob"] = p
        out["ei_label"] = df["ei_label"].array
        # unknown E/I: missing (<NA>, empty in CSV), never 0, which reads as a sign
        out["sign"] = pd.array(np.where(p >= 0.5, 1, -1).astype(np.int8), dtype="Int8")
        out["sign"][np.isnan(p)] = pd.NA
    else:
        out["bodyId_pre"] = df["pre_neuron"].to_numpy(np.int64)
        out["bodyId_post"] = df["post_neuron"].to_numpy(np.int64)
        for a in "xyz":
            for e, k in (("min", 0), ("max", 1)):
                out[f"bbox_{a}{e}"] = df[f"bbox_{a}{k}"].to_numpy(np.float64) / vs["zyx".index(a)]
        for s in ("pre", "post"):
            v = _voxels(df, f"{s}_", vs)
            for k, a in enumerate("xyz"):
                out[f"{a}_{s}"] = v[:, k]
        out["confidence"] = df["score_union"].to_numpy(np.float64)
        out["neurotransmitter"] = df["ei_label"].array
        flags = df["flags"].fillna("").astype(str)
        out["any_out_of_range"] = np.array([("out_of_range" in f.split(",")) for f in flags], dtype=bool)
    for name, _ in fields:
        if name not in out:
            out[name] = df[name].array
    return pd.DataFrame(out, columns=[name for name, _ in fields])


def file_metadata(layout: str, voxel_size: Optional[tuple], dtypes: Optional[dict] = None) -> dict:
    """What cleftwise states about a file it writes (Parquet key ``cleftwise``; CSV sidecar).

    ``voxel_size_zyx_nm`` / ``resolution_xyz_nm`` give the voxel size of the foreign layouts'
    positions (caveclient's ``desired_resolution`` is the x, y, z one); ``dtypes`` (CSV only)
    the pandas dtype of every column, so a re-import keeps the types.
    """
    meta = {"writer": "cleftwise", "layout": layout, "schema_version": SCHEMA_VERSION}
    if voxel_size is not None:
        meta["voxel_size_zyx_nm"] = list(voxel_size)
        meta["resolution_xyz_nm"] = list(voxel_size[::-1])
        meta["position_order"] = "xyz"
    if dtypes is not None:
        meta["dtypes"] = dtypes
    return meta


def pandas_attrs(layout: str, voxel_size: Optional[tuple]) -> dict:
    """``DataFrame.attrs`` of a Parquet file (pandas restores them on ``read_parquet``):
    caveclient's ``dataframe_resolution`` (x, y, z nm) for the foreign layouts."""
    if voxel_size is None:
        return {"cleftwise_layout": layout}
    return {"cleftwise_layout": layout, "dataframe_resolution": list(voxel_size[::-1])}


def csv_dtypes(fields: list) -> dict:
    """pandas dtypes to read a CSV of these ``(name, arrow type)`` fields back exactly."""
    import pyarrow as pa

    out = {}
    for name, t in fields:
        if pa.types.is_boolean(t):
            out[name] = "boolean"
        elif pa.types.is_unsigned_integer(t):
            out[name] = "UInt64"
        elif pa.types.is_integer(t):
            out[name] = "Int8" if t == pa.int8() else "Int64"
        elif pa.types.is_floating(t):
            out[name] = "float64"
        else:
            out[name] = "str"
    return out


def _json_values(series: pd.Series, name: str) -> list:
    """Python values of a column for JSON: 64-bit ids as decimal strings, missing as None."""
    dt = series.dtype
    if pd.api.types.is_integer_dtype(dt) and (name in _SCHEMA_IDS or name in _UNSIGNED_IDS or ID_COLUMN.search(name)):
        mask = series.isna().to_numpy()
        if name in _UNSIGNED_IDS and dt == np.int64:
            vals = series.to_numpy().view(np.uint64).tolist()
        else:
            vals = series.to_numpy(dtype=object, na_value=None).tolist()
        return [None if m else str(int(v)) for v, m in zip(vals, mask)]
    if pd.api.types.is_float_dtype(dt):
        vals = series.to_numpy(np.float64)
        out = vals.tolist()
        for k in np.flatnonzero(~np.isfinite(vals)):
            out[k] = None
        return out
    if dt == object:
        return [v.tolist() if isinstance(v, np.ndarray)
                else (None if v is None or (np.isscalar(v) and pd.isna(v)) else v) for v in series.tolist()]
    return series.astype(object).where(series.notna(), None).tolist()


def json_text(df: pd.DataFrame) -> str:
    """JSON array of records; every 64-bit id (``id``, ``pre_neuron``, ``post_neuron``,
    ``block_id``, ``*_root_id``, ``*_supervoxel_id``, ``bodyId_*``, other integer ``*_id``
    columns) is a decimal string, so ``jq`` and JavaScript keep it exact."""
    cols = {c: _json_values(df[c], str(c)) for c in df.columns}
    names = list(cols)
    rows = [dict(zip(names, vals)) for vals in zip(*cols.values())] if names else []
    return json.dumps(rows, allow_nan=False, default=_json_default) + "\n"


def _json_default(v):
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        return float(v)
    if isinstance(v, np.bool_):
        return bool(v)
    raise TypeError(f"cannot write {type(v).__name__} as JSON")

