"""Extra fields: typed columns of imported tables that the synapse schema does not define.

A table import keeps every column it does not map (CAVE ``valid``, supervoxel ids, neuPrint
confidences, …) as an *extra field* of the record. A database holds one **registry** of its
extra fields, ``[[name, type], …]`` in first-seen order, with type one of :data:`EXTRA_TYPES`;
a record stores only its present values (SQLite: a JSON object in column ``extra``; MongoDB: the
sub-document ``extra``).

Query results carry every registered extra field after the schema columns, with nullable pandas
dtypes so that a missing value never changes the type (:data:`PANDAS_DTYPES`): ``int64`` →
``Int64``, ``uint64`` → ``UInt64`` (every value up to 2**64 - 1 exact), ``float64`` → float64
(NaN), ``bool`` → ``boolean``, ``str`` → pandas' string dtype.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import pandas as pd

from cleftwise.storage.errors import StorageError

__all__ = ["EXTRA_TYPES", "PANDAS_DTYPES", "extra_type", "typed_extra", "merge_registry",
           "encode_json_rows", "decode_json_rows", "mongo_values", "from_mongo_values",
           "arrow_type", "empty_extra", "parse_registry", "ID_COLUMN"]

log = logging.getLogger(__name__)

#: storable types of extra fields
EXTRA_TYPES = ("int64", "uint64", "float64", "bool", "str")
_TEXT = "str" if int(pd.__version__.split(".")[0]) >= 3 else object
#: pandas dtype of each type in query results
PANDAS_DTYPES = {"int64": "Int64", "uint64": "UInt64", "float64": "float64", "bool": "boolean",
                 "str": _TEXT}
#: names of integer columns that hold 64-bit ids (written as decimal strings in JSON)
ID_COLUMN = re.compile(r"(^|_)ids?$|Ids?(_|$)")
_I64 = 2 ** 63


def _check_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not name or name.startswith("$") or "." in name or name == "_id":
        raise StorageError(f"{where}: extra column name {name!r} cannot be stored (it must be a "
                           f"non-empty string without '.', not starting with '$', not '_id')")
    return name


def extra_type(series: pd.Series, name: str, where: str) -> tuple[Optional[str], pd.Series]:
    """(type, canonical series) of a table column; type None when every value is missing and
    the dtype says nothing (object column of None).

    Integers become ``Int64`` (``UInt64`` for uint64 columns or Python ints beyond int64),
    bools ``boolean``, floats float64, strings pandas' string dtype. Lists/arrays and other
    objects (timestamps, …) are kept as text (JSON for lists) with a warning.
    """
    _check_name(name, where)
    s = series.reset_index(drop=True)
    dt = s.dtype
    if pd.api.types.is_bool_dtype(dt):
        return "bool", s.astype("boolean")
    if pd.api.types.is_unsigned_integer_dtype(dt) and dt.itemsize == 8:
        return "uint64", s.astype("UInt64")
    if pd.api.types.is_integer_dtype(dt):
        return "int64", s.astype("Int64")
    if pd.api.types.is_float_dtype(dt):
        return "float64", pd.Series(s.to_numpy(np.float64, na_value=np.nan))
    values = s.to_numpy(dtype=object)
    present = ~pd.isna(values) if len(values) else np.zeros(0, bool)
    given = values[present] if values.ndim == 1 and present.ndim == 1 else values
    if not len(given):
        if pd.api.types.is_string_dtype(dt) and not dt == object:
            return "str", s.astype(_TEXT)
        return None, s
    kind = pd.api.types.infer_dtype(given, skipna=True)
    if kind == "string":
        return "str", s.astype(_TEXT)
    if kind == "boolean":
        return "bool", s.astype("boolean")
    if kind == "integer":
        ints = [int(v) for v in given]
        if min(ints) >= -_I64 and max(ints) < _I64:
            return "int64", pd.Series(pd.array([None if m else int(v) for v, m in
                                                 zip(values, ~present)], dtype="Int64"))
        if min(ints) >= 0 and max(ints) < 2 ** 64:
            return "uint64", pd.Series(pd.array([None if m else int(v) for v, m in
                                                  zip(values, ~present)], dtype="UInt64"))
        raise StorageError(f"{where}: column {name!r} holds integers beyond 64 bits")
    if kind in ("floating", "mixed-integer-float", "decimal"):
        return "float64", pd.Series(pd.to_numeric(s, errors="coerce"), dtype=np.float64)
    log.warning("%s: column %r (%s values) is kept as text", where, name, kind)

    def text(v):
        if isinstance(v, (list, tuple, np.ndarray)):
            return json.dumps(np.asarray(v).tolist())
        return str(v)
    return "str", pd.Series(pd.array([None if m else text(v) for v, m in zip(values, ~present)],
                                     dtype=_TEXT))


def typed_extra(values: Sequence, type_: str) -> pd.api.extensions.ExtensionArray:
    """Array of ``type_``'s pandas dtype from Python values (None = missing)."""
    if type_ == "float64":
        return np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    if type_ == "uint64":  # Int64-bit patterns from MongoDB come back negative
        values = [None if v is None else (v + 2 ** 64 if v < 0 else v) for v in values]
    if type_ == "str":
        arr = np.empty(len(values), dtype=object)
        arr[:] = list(values)
        return pd.array(arr, dtype=_TEXT)
    return pd.array(list(values), dtype=PANDAS_DTYPES[type_])


def empty_extra(type_: str):
    return typed_extra([], type_)


def _cast_to(series: pd.Series, have: str, want: str, name: str, where: str) -> pd.Series:
    """A column of type ``have`` as type ``want`` when lossless (int64 <-> uint64 by value)."""
    if have == want:
        return series
    if {have, want} == {"int64", "uint64"}:
        lo, hi = (0, 2 ** 64) if want == "uint64" else (-_I64, _I64)
        if all(lo <= int(v) < hi for v in series.dropna().tolist()):
            return series.astype(PANDAS_DTYPES[want])
    raise StorageError(f"{where}: extra column {name!r} holds {have} values but the database "
                       f"stores it as {want}; convert the column or use another database")


def merge_registry(registry: Sequence, frame: pd.DataFrame, names: Sequence[str],
                   where: str) -> tuple[list, pd.DataFrame]:
    """(registry with the frame's extra columns added, frame with them cast to the registered
    types). A column whose values are all missing never conflicts."""
    reg = [list(r) for r in registry]
    types = dict((n, t) for n, t in reg)
    for name in names:
        col = frame[name]
        have, col = extra_type(col, name, where)
        frame[name] = col.array
        if name in types:
            if have is not None and col.notna().any():
                frame[name] = _cast_to(frame[name], have, types[name], name, where).array
            elif have != types[name]:
                frame[name] = typed_extra([None] * len(frame), types[name])
        elif have is not None:
            reg.append([name, have])
            types[name] = have
    return reg, frame


def parse_registry(text: Optional[str], where: str) -> list:
    if not text:
        return []
    try:
        reg = json.loads(text)
        assert all(len(r) == 2 and r[1] in EXTRA_TYPES for r in reg)
    except (ValueError, TypeError, AssertionError):
        raise StorageError(f"{where}: unreadable extra-field registry {text[:80]!r}") from None
    return [list(r) for r in reg]


def _python_values(series: pd.Series, type_: str) -> list:
    """Python values (None where missing); uint64 as non-negative ints."""
    arr = series.array
    if type_ == "float64":
        vals = series.to_numpy(dtype=np.float64, na_value=np.nan)
        out = vals.tolist()
        for k in np.flatnonzero(np.isnan(vals)):
            out[k] = None
        return out
    return [None if m else v for v, m in zip(arr.to_numpy(dtype=object, na_value=None).tolist(),
                                              pd.isna(arr))]


def encode_json_rows(frame: pd.DataFrame, registry: Sequence) -> list:
    """Per row, a JSON object of its present extra values (None when it has none)."""
    names = [n for n, _ in registry if n in frame.columns]
    if not names or not len(frame):
        return [None] * len(frame)
    cols = [(n, _python_values(frame[n], t)) for n, t in registry if n in frame.columns]
    out = []
    dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=True).encode
    for k in range(len(frame)):
        doc = {n: v[k] for n, v in cols if v[k] is not None}
        out.append(dumps(doc) if doc else None)
    return out


def decode_json_rows(texts: Sequence, registry: Sequence, names: Sequence[str]) -> dict:
    """``{name: typed array}`` for ``names`` from the JSON objects of :func:`encode_json_rows`."""
    types = dict((n, t) for n, t in registry)
    docs = [json.loads(t) if t else {} for t in texts]
    return {n: typed_extra([d.get(n) for d in docs], types[n]) for n in names}


def mongo_values(frame: pd.DataFrame, registry: Sequence) -> list:
    """Per row, a sub-document of present extra values (uint64 as int64 bits; None when none)."""
    cols = [(n, _python_values(frame[n], t), t) for n, t in registry if n in frame.columns]
    out = []
    for k in range(len(frame)):
        doc = {}
        for n, v, t in cols:
            x = v[k]
            if x is not None:
                doc[n] = x - 2 ** 64 if (t == "uint64" and x >= _I64) else x
        out.append(doc or None)
    return out


def from_mongo_values(docs: Iterable, registry: Sequence, names: Sequence[str]) -> dict:
    types = dict((n, t) for n, t in registry)
    docs = [d or {} for d in docs]
    return {n: typed_extra([d.get(n) for d in docs], types[n]) for n in names}


def arrow_type(type_: str):
    import pyarrow as pa

    return {"int64": pa.int64(), "uint64": pa.uint64(), "float64": pa.float64(),
            "bool": pa.bool_(), "str": pa.string()}[type_]
