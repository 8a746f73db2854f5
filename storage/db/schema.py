"""The synapse record: one column list shared by every synapse-database backend.

:data:`COLUMNS` is the single definition of the schema (names, kinds, units, meaning); the
SQLite DDL, the MongoDB documents, the Arrow/Parquet schema of exports and the table in
``docs/synapse_db.md`` all follow it. Bump :data:`SCHEMA_VERSION` whenever it changes.

Column kinds and how they come back from a query (pandas dtypes):

- ``key``: ``id``, the int64 synapse id (primary key / MongoDB ``_id``); never missing.
- ``neuron``: ``pre_neuron``, ``post_neuron``: neuron ids, int64, never missing
  (0 = background / unknown). uint64 ids are stored with the same 64 bits as int64, so an id
  >= 2**63 comes back negative; ``df.pre_neuron.to_numpy().view(np.uint64)`` recovers it.
- ``count``: voxel counts and the writing block id: pandas nullable ``Int64`` (``<NA>``).
- ``float``: float64, ``NaN`` when missing (stored as NULL / an absent field).
- ``text``: pandas' default string dtype (pandas >= 3: ``str``, missing = ``NaN``; pandas 2:
  object, missing = ``None``).

Coordinates are nm in (z, y, x) world space. Bounding boxes are half-open: ``[bbox_z0, bbox_z1)``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import pandas as pd

from cleftwise.storage.errors import StorageError

__all__ = [
    "SCHEMA_VERSION",
    "SCHEMA_KIND",
    "Column",
    "COLUMNS",
    "COLUMN_NAMES",
    "FLAG_NAMES",
    "SPATIAL_COLUMNS",
    "TEXT_DTYPE",
    "QueryFilter",
    "as_int64_ids",
    "normalize_records",
    "normalize_update",
    "frame_from_columns",
    "empty_frame",
    "parse_roi",
    "select_columns",
    "arrow_schema",
    "make_filter",
]

#: Version of the on-disk schema; a database written with another version is refused.
SCHEMA_VERSION = 1
#: Marker stored beside the version so foreign databases are recognised.
SCHEMA_KIND = "cleftwise.synapses"


@dataclass(frozen=True)
class Column:
    """One field of a synapse record."""

    name: str
    """column / document field name"""
    kind: str
    """``key``, ``neuron``, ``count``, ``float`` or ``text`` (see the module docstring)"""
    unit: str
    """unit of the value (``nm``, ``voxels``, ``prob``, ``fraction``, ``id`` or ``-``)"""
    doc: str
    """one-line meaning"""


def _zyx(prefix: str, unit: str, doc: str) -> tuple[Column, ...]:
    return tuple(Column(f"{prefix}{a}", "float", unit, f"{doc} ({a})") for a in "zyx")


#: The schema, in storage and export order.
COLUMNS: tuple[Column, ...] = (
    Column("id", "key", "id", "synapse id (int64), unique in the database"),
    *_zyx("", "nm", "centroid of the synaptic cleft"),
    *(Column(f"bbox_{a}0", "float", "nm", f"bounding box begin ({a}), inclusive") for a in "zyx"),
    *(Column(f"bbox_{a}1", "float", "nm", f"bounding box end ({a}), exclusive") for a in "zyx"),
    Column("size", "count", "voxels", "cleft size"),
    Column("score_union", "float", "prob", "mean predicted cleft probability over the instance (0..1)"),
    Column("score_pre", "float", "prob", "mean presynaptic-side probability (0..1)"),
    Column("score_post", "float", "prob", "mean postsynaptic-side probability (0..1)"),
    Column("score_max", "float", "prob", "maximum cleft probability"),
    *_zyx("pre_", "nm", "presynaptic site centroid"),
    *_zyx("post_", "nm", "postsynaptic site centroid"),
    Column("pre_size", "count", "voxels", "presynaptic side size"),
    Column("post_size", "count", "voxels", "postsynaptic side size"),
    Column("pre_neuron", "neuron", "id", "presynaptic neuron id (0 = background / unknown)"),
    Column("post_neuron", "neuron", "id", "postsynaptic neuron id (0 = background / unknown)"),
    Column("pre_conf", "float", "fraction", "vote fraction of the presynaptic neuron"),
    Column("post_conf", "float", "fraction", "vote fraction of the postsynaptic neuron"),
    Column("flags", "text", "-", "comma-separated flag names (see FLAG_NAMES), '' when none"),
    Column("block_id", "count", "id", "id of the block that wrote the record"),
    Column("ei_prob", "float", "prob", "probability that the synapse is excitatory (E/I stage)"),
    Column("ei_label", "text", "-", "E/I label, e.g. 'E', 'I' or a transmitter name"),
    Column("classifier", "text", "-", "name/version of the E/I classifier"),
    Column("source", "text", "-", "where the record came from, e.g. 'cleftwise' or a table name"),
)

COLUMN_NAMES: tuple[str, ...] = tuple(c.name for c in COLUMNS)
_KIND = {c.name: c.kind for c in COLUMNS}

#: Flag names written by the pipeline into ``flags``.
FLAG_NAMES = ("autapse", "pre_background", "post_background", "pre_tie", "post_tie",
              "no_pre_side", "no_post_side", "one_neuron", "out_of_range")

#: Columns that place a record in space (the spatial index follows them): not updatable.
SPATIAL_COLUMNS = ("z", "y", "x", "bbox_z0", "bbox_y0", "bbox_x0", "bbox_z1", "bbox_y1", "bbox_x1")

_I64_MAX = np.iinfo(np.int64).max
#: dtype of text columns in query results (pandas' default string dtype)
TEXT_DTYPE = "str" if int(pd.__version__.split(".")[0]) >= 3 else object


def _python_int(v: Any) -> int:
    if isinstance(v, (float, np.floating)):
        if not np.isfinite(v) or not float(v).is_integer():
            raise ValueError(f"{v!r} is not an integer")
        return int(v)
    return int(operator.index(v)) if not isinstance(v, str) else int(v)


def as_int64_ids(values: Any, what: str = "ids") -> np.ndarray:
    """Integer ids (int or uint64, scalar or sequence) as an int64 array with the same bits.

    uint64 values >= 2**63 map to negative int64 (a bit-for-bit view), so every uint64 id
    fits. Floats must be integral; anything else raises :class:`StorageError`. Python lists
    are converted element by element (numpy would turn ``[1, 2**63]`` into inexact floats).
    """
    if isinstance(values, (np.ndarray, pd.Series, pd.Index, np.generic)):
        arr = np.asarray(values)
    else:  # Python ints / lists: exact, element by element
        arr = np.asarray(values, dtype=object)
    if arr.dtype == np.uint64:
        return np.ascontiguousarray(arr).view(np.int64).reshape(arr.shape)
    if arr.dtype.kind in "iub":
        return arr.astype(np.int64)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise StorageError(f"{what} must be integers, got non-integral or missing values")
        if np.any(np.abs(arr) >= 2.0 ** 63):
            raise StorageError(f"{what}: float values beyond int64 cannot be exact ids")
        return arr.astype(np.int64)
    if arr.dtype.kind in "OUS":
        try:
            ints = [_python_int(v) for v in arr.reshape(-1).tolist()]
        except (TypeError, ValueError) as e:
            raise StorageError(f"{what} must be integers: {e}") from None
        if any(v < -(2 ** 63) or v >= 2 ** 64 for v in ints):
            raise StorageError(f"{what} must fit in 64 bits")
        out = np.array([v - 2 ** 64 if v > _I64_MAX else v for v in ints], dtype=np.int64)
        return out.reshape(arr.shape)
    raise StorageError(f"{what} must be integers, got dtype {arr.dtype}")


def _as_float(series: pd.Series, name: str) -> np.ndarray:
    try:
        return pd.to_numeric(series, errors="raise").to_numpy(dtype=np.float64, na_value=np.nan)
    except (TypeError, ValueError) as e:
        raise StorageError(f"column {name!r} must be numeric: {e}") from None


def _as_count(series: pd.Series, name: str) -> pd.arrays.IntegerArray:
    if series.dtype == np.uint64:
        return pd.array(series.to_numpy().view(np.int64), dtype="Int64")
    missing = series.isna().to_numpy()
    out = np.zeros(len(series), np.int64)
    if (~missing).any():
        out[~missing] = as_int64_ids(series[~missing].to_numpy(), f"column {name!r}")
    return pd.arrays.IntegerArray(out, missing)


_TEXT_PD_DTYPE = pd.array(np.zeros(0, dtype=object), dtype=TEXT_DTYPE).dtype


def _as_text(series: pd.Series, name: str):
    if TEXT_DTYPE is not object and series.dtype == _TEXT_PD_DTYPE:
        return series.array  # already pandas' default string array
    values = series.to_numpy(dtype=object)
    missing = pd.isna(values)
    out = np.empty(len(values), dtype=object)
    out[missing] = None
    present = ~missing
    if present.any():
        given = values[present]
        if pd.api.types.infer_dtype(given, skipna=False) != "string":  # not all str: convert
            given = np.array([v if isinstance(v, str) else str(v) for v in given], dtype=object)
        out[present] = given
    return out if TEXT_DTYPE is object else pd.array(out, dtype=TEXT_DTYPE)


def _to_frame(records: Any, where: str) -> pd.DataFrame:
    if isinstance(records, pd.DataFrame):
        return records
    if isinstance(records, dict):
        raise StorageError(f"{where}: pass a list of records or a DataFrame, not one dict")
    try:
        return pd.DataFrame.from_records(list(records))
    except (TypeError, ValueError) as e:
        raise StorageError(f"{where}: records must be dicts with column names: {e}") from None


def normalize_records(records: Any, block_id: Optional[int] = None, extra: str = "error",
                      where: str = "synapse records") -> pd.DataFrame:
    """Validate synapse records and return them with every schema column, typed.

    Args:
        records: a DataFrame or an iterable of dicts keyed by column name; absent columns
            are missing values (neuron ids default to 0).
        block_id: when given, every record gets this ``block_id`` (a record carrying another
            block id is an error).
        extra: ``"error"`` (default) rejects columns not in the schema; ``"ignore"`` drops them;
            ``"keep"`` keeps them as typed extra fields after the schema columns
            (:mod:`cleftwise.storage.db.extra_fields`).
        where: what to name in error messages.

    Returns:
        DataFrame with the columns of :data:`COLUMN_NAMES` in order and the dtypes described in
        the module docstring; a fresh RangeIndex.

    Raises:
        StorageError: missing ``id``, duplicate ids, missing/non-finite centroid, unknown
            columns, wrong types, conflicting block ids.
    """
    df = _to_frame(records, where)
    unknown = [c for c in df.columns if c not in _KIND]
    if unknown and extra == "error":
        raise StorageError(f"{where}: unknown columns {unknown} (schema: {list(COLUMN_NAMES)})")
    if extra not in ("error", "ignore", "keep"):
        raise StorageError(f"extra must be 'error', 'ignore' or 'keep', got {extra!r}")
    n = len(df)
    if n and "id" not in df.columns:
        raise StorageError(f"{where}: no 'id' column")
    out: dict[str, Any] = {}
    for col in COLUMNS:
        name, kind = col.name, col.kind
        if name not in df.columns:
            series = pd.Series([None] * n, dtype=object)
        else:
            series = df[name].reset_index(drop=True)
        if kind == "key":
            if series.isna().any():
                raise StorageError(f"{where}: 'id' has missing values")
            out[name] = as_int64_ids(series.to_numpy(), f"{where}: column 'id'")
        elif kind == "neuron":
            if series.dtype == np.uint64:
                out[name] = series.to_numpy().view(np.int64)
            else:
                filled = series.astype(object).where(series.notna(), 0) if series.dtype == object \
                    else series.fillna(0)
                out[name] = as_int64_ids(filled.to_numpy(), f"{where}: column {name!r}")
        elif kind == "count":
            out[name] = _as_count(series, name)
        elif kind == "float":
            out[name] = _as_float(series, name)
        else:
            out[name] = _as_text(series, name)
    names = list(COLUMN_NAMES)
    if extra == "keep" and unknown:
        from cleftwise.storage.db.extra_fields import extra_type

        for name in unknown:
            _, series = extra_type(df[name], name, where)
            out[name] = series.array
        names += unknown
    frame = pd.DataFrame(out, columns=names)
    if block_id is not None:
        bid = int(as_int64_ids(block_id, "block_id"))
        given = frame["block_id"]
        clash = given.notna().to_numpy() & (given.fillna(bid).to_numpy() != bid)
        if clash.any():
            raise StorageError(f"{where}: records carry block ids "
                               f"{sorted(set(given[clash].tolist()))[:5]} but block_id={bid} was given")
        frame["block_id"] = pd.array(np.full(n, bid, np.int64), dtype="Int64")
    ids = frame["id"].to_numpy()
    if n:
        if n > 1 and not bool(np.all(ids[1:] > ids[:-1])):  # increasing ids are unique
            uniq, counts = np.unique(ids, return_counts=True)
            if uniq.size != n:
                raise StorageError(f"{where}: duplicate synapse ids {uniq[counts > 1][:5].tolist()}")
        centroid = frame[["z", "y", "x"]].to_numpy()
        bad = ~np.isfinite(centroid).all(axis=1)
        if bad.any():
            raise StorageError(f"{where}: synapses {ids[bad][:5].tolist()} lack a finite centroid (z, y, x)")
    return frame


def normalize_update(records: Any, fields: Optional[Sequence[str]] = None,
                     where: str = "update") -> tuple[pd.DataFrame, list[str]]:
    """Validate an update table keyed by ``id``; returns (typed frame, fields to set).

    ``fields`` defaults to every schema column of ``records`` except ``id``. Spatial columns
    (centroid, bbox) and ``id`` cannot be updated (rewrite the record with ``upsert_many``).
    """
    df = _to_frame(records, where)
    if "id" not in df.columns:
        raise StorageError(f"{where}: no 'id' column")
    if fields is None:
        fields = [c for c in df.columns if c != "id"]
    fields = list(fields)
    unknown = [f for f in fields if f not in _KIND]
    if unknown:
        raise StorageError(f"{where}: unknown fields {unknown}")
    fixed = [f for f in fields if f == "id" or f in SPATIAL_COLUMNS]
    if fixed:
        raise StorageError(f"{where}: fields {fixed} place the synapse in space and cannot be "
                           f"updated; rewrite the records with upsert_many")
    absent = [f for f in fields if f not in df.columns]
    if absent:
        raise StorageError(f"{where}: fields {absent} are not columns of the update table")
    if not fields:
        raise StorageError(f"{where}: no fields to update")
    sub = df[["id", *fields]].reset_index(drop=True)
    full = normalize_records(
        sub.assign(z=0.0, y=0.0, x=0.0), extra="error", where=where)
    return full[["id", *fields]], fields


def empty_frame(columns: Sequence[str] = COLUMN_NAMES, extra_types: Optional[dict] = None) -> pd.DataFrame:
    """A zero-row result with the schema dtypes (and those of extra fields ``{name: type}``)."""
    return frame_from_columns({c: [] for c in columns}, columns, extra_types)


def frame_from_columns(data: dict, columns: Sequence[str], extra_types: Optional[dict] = None) -> pd.DataFrame:
    """Typed DataFrame from column sequences as read from a database (None = missing).

    Columns outside the schema are extra fields typed by ``extra_types`` ({name: type}).
    """
    out = {}
    for name in columns:
        values = data[name]
        if name not in _KIND:
            from cleftwise.storage.db.extra_fields import typed_extra

            out[name] = typed_extra(list(values), (extra_types or {})[name])
            continue
        kind = _KIND[name]
        if kind in ("key", "neuron"):
            out[name] = np.array(values, dtype=np.int64)
        elif kind == "count":
            out[name] = pd.array(list(values), dtype="Int64")
        elif kind == "float":
            out[name] = np.array(values, dtype=np.float64)
        else:
            arr = np.empty(len(values), dtype=object)
            arr[:] = list(values)
            out[name] = arr if TEXT_DTYPE is object else pd.array(arr, dtype=TEXT_DTYPE)
    return pd.DataFrame(out, columns=list(columns))


def select_columns(columns: Optional[Iterable[str]], extra_names: Sequence[str] = ()) -> list[str]:
    """Validated output columns; ``id`` always first. None = all columns (the schema's, then
    the extra fields ``extra_names``)."""
    if columns is None:
        return list(COLUMN_NAMES) + [c for c in extra_names if c not in _KIND]
    if isinstance(columns, str):
        columns = [columns]
    cols = list(dict.fromkeys(columns))
    unknown = [c for c in cols if c not in _KIND and c not in extra_names]
    if unknown:
        more = f"; extra fields: {list(extra_names)}" if extra_names else ""
        raise StorageError(f"unknown columns {unknown} (schema: {list(COLUMN_NAMES)}{more})")
    return ["id", *[c for c in cols if c != "id"]]


def arrow_schema(columns: Sequence[str] = COLUMN_NAMES, extra_types: Optional[dict] = None):
    """pyarrow schema of exported tables (fixed, so empty batches keep their types); columns
    outside the schema are extra fields typed by ``extra_types`` ({name: type})."""
    import pyarrow as pa
    from cleftwise.storage.db.extra_fields import arrow_type

    types = {"key": pa.int64(), "neuron": pa.int64(), "count": pa.int64(),
             "float": pa.float64(), "text": pa.string()}
    return pa.schema([pa.field(c, types[_KIND[c]], nullable=_KIND[c] not in ("key", "neuron"))
                      if c in _KIND else pa.field(c, arrow_type((extra_types or {})[c]))
                      for c in columns])


def parse_roi(roi: Any) -> Optional[tuple[tuple[float, float, float], tuple[float, float, float]]]:
    """(begin, end) in nm of a funlib Roi or ``((z0, y0, x0), (z1, y1, x1))``; None passes.

    Unbounded sides (None in a funlib Roi or tuple) become -inf/+inf. The query interval is
    half-open: ``begin <= c < end``.
    """
    if roi is None:
        return None
    if hasattr(roi, "begin") and hasattr(roi, "end"):
        begin, end = roi.begin, roi.end
    else:
        try:
            begin, end = roi
        except (TypeError, ValueError):
            raise StorageError(f"roi must be a funlib Roi or ((z0, y0, x0), (z1, y1, x1)) in nm, "
                               f"got {roi!r}") from None
    try:
        b = tuple(-np.inf if v is None else float(v) for v in begin)
        e = tuple(np.inf if v is None else float(v) for v in end)
    except (TypeError, ValueError):
        raise StorageError(f"roi bounds must be numbers (nm), got {roi!r}") from None
    if len(b) != 3 or len(e) != 3:
        raise StorageError(f"roi must have 3 axes (z, y, x), got {roi!r}")
    if any(np.isnan(v) for v in b + e) or any(lo > hi for lo, hi in zip(b, e)):
        raise StorageError(f"roi end must not precede begin, got begin={b} end={e}")
    return b, e


@dataclass(frozen=True)
class QueryFilter:
    """Normalised query conditions shared by the backends (all combine with AND)."""

    roi: Optional[tuple[tuple[float, float, float], tuple[float, float, float]]] = None
    """(begin, end) nm, half-open"""
    roi_match: str = "centroid"
    """``centroid``: centroid inside the ROI; ``bbox``: bounding box overlaps the ROI"""
    pre: Optional[np.ndarray] = None
    """int64 presynaptic neuron ids (any of)"""
    post: Optional[np.ndarray] = None
    """int64 postsynaptic neuron ids (any of)"""
    neuron: Optional[np.ndarray] = None
    """int64 neuron ids on either side (any of)"""
    min_score: Optional[float] = None
    """lower bound on score_union (inclusive)"""
    block_id: Optional[int] = None
    """only records written by this block"""
    ids: Optional[np.ndarray] = None
    """only these synapse ids"""


def _ids_or_none(values: Any, what: str) -> Optional[np.ndarray]:
    if values is None:
        return None
    return np.unique(as_int64_ids(values, what).ravel())


def make_filter(roi=None, pre=None, post=None, neuron=None, min_score=None, block_id=None,
                roi_match: str = "centroid", ids=None) -> QueryFilter:
    """Validate user query arguments into a :class:`QueryFilter`."""
    if roi_match not in ("centroid", "bbox"):
        raise StorageError(f"roi_match must be 'centroid' or 'bbox', got {roi_match!r}")
    if min_score is not None:
        try:
            min_score = float(min_score)
        except (TypeError, ValueError):
            raise StorageError(f"min_score must be a number, got {min_score!r}") from None
    return QueryFilter(
        roi=parse_roi(roi), roi_match=roi_match,
        pre=_ids_or_none(pre, "pre"), post=_ids_or_none(post, "post"),
        neuron=_ids_or_none(neuron, "neuron"), min_score=min_score,
        block_id=None if block_id is None else int(as_int64_ids(block_id, "block_id")),
        ids=_ids_or_none(ids, "ids"),
    )
