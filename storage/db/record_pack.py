"""Packed copy of a synapse record's numeric fields: one BLOB per row, decoded with numpy.

Reading a query result column by column through :mod:`sqlite3` creates one Python object per
value (33 per record); at 10,000 records that alone costs ~45 ms. The SQLite backend (file
layout 2) therefore stores, per record, every non-text field of
:data:`cleftwise.storage.db.schema.COLUMNS` in one BLOB (column ``packed``; some fields live only
there) and decodes a whole result with one ``np.frombuffer``.

Layout of one BLOB (:data:`PACKED_DTYPE`, 8-byte little-endian values, no padding): the fields
of :data:`PACKED_COLUMNS` in schema order -- ``int64`` for ``key``/``neuron``/``count`` kinds,
``float64`` for ``float`` kinds (a missing float is NaN) -- then ``nulls``, a ``uint64`` bit mask
of the missing ``count`` fields (bit ``i`` = the ``i``-th of :data:`PACKED_COUNT_COLUMNS`; the
stored ``int64`` is 0 there). The layout follows ``COLUMNS``, whose every change bumps
``SCHEMA_VERSION``: a file whose BLOBs have another layout is refused when opened.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from cleftwise.storage.db.schema import COLUMNS

__all__ = [
    "PACKED_COLUMNS",
    "PACKED_COUNT_COLUMNS",
    "PACKED_DTYPE",
    "pack_records",
    "unpack_records",
]

#: Non-text schema columns, in schema order: the fields of a packed BLOB.
PACKED_COLUMNS: tuple[str, ...] = tuple(c.name for c in COLUMNS if c.kind != "text")
#: The nullable integer columns among them, in order (bit i of ``nulls``).
PACKED_COUNT_COLUMNS: tuple[str, ...] = tuple(c.name for c in COLUMNS if c.kind == "count")
_FLOAT = {c.name for c in COLUMNS if c.kind == "float"}
#: Structured dtype of one BLOB.
PACKED_DTYPE = np.dtype(
    [(name, "<f8" if name in _FLOAT else "<i8") for name in PACKED_COLUMNS] + [("nulls", "<u8")]
)
assert len(PACKED_COUNT_COLUMNS) <= 64


def pack_records(frame: pd.DataFrame) -> list[bytes]:
    """One BLOB per row of ``frame`` (every :data:`PACKED_COLUMNS` column, schema dtypes as
    returned by :func:`cleftwise.storage.db.schema.normalize_records`)."""
    out = np.zeros(len(frame), dtype=PACKED_DTYPE)
    nulls = np.zeros(len(frame), dtype=np.uint64)
    for name in PACKED_COLUMNS:
        series = frame[name]
        if name in PACKED_COUNT_COLUMNS:
            missing = series.isna().to_numpy()
            out[name] = series.to_numpy(dtype=np.int64, na_value=0)
            nulls |= missing.astype(np.uint64) << np.uint64(PACKED_COUNT_COLUMNS.index(name))
        elif name in _FLOAT:
            out[name] = series.to_numpy(dtype=np.float64, na_value=np.nan)
        else:
            out[name] = series.to_numpy(dtype=np.int64)
    out["nulls"] = nulls
    return out.view(f"V{PACKED_DTYPE.itemsize}").tolist()


def unpack_records(blobs: Sequence[bytes], columns: Sequence[str]) -> dict[str, object]:
    """Decode BLOBs of :func:`pack_records` into ``{column: array}`` for the requested packed
    columns: ``int64``/``float64`` numpy arrays, and ``pd.arrays.IntegerArray`` (``Int64``)
    for ``count`` columns."""
    raw = b"".join(blobs)
    if len(raw) != len(blobs) * PACKED_DTYPE.itemsize:
        raise ValueError(f"packed records of {len(raw)} bytes are not {len(blobs)} records of "
                         f"{PACKED_DTYPE.itemsize} bytes")
    rec = np.frombuffer(raw, dtype=PACKED_DTYPE)
    out: dict[str, object] = {}
    for name in columns:
        values = rec[name].copy()
        if name in PACKED_COUNT_COLUMNS:
            bit = np.uint64(1) << np.uint64(PACKED_COUNT_COLUMNS.index(name))
            out[name] = pd.arrays.IntegerArray(values, (rec["nulls"] & bit) != 0)
        else:
            out[name] = values
    return out
