"""The synapse database interface (:class:`SynapseStore`) that both backends implement.

Open a store by URL with :func:`open_store`:

- ``sqlite:////abs/path/synapses.db`` (or a plain path ending in ``.db``/``.sqlite``): an
  embedded SQLite file in WAL mode with an R*Tree spatial index. SQLAlchemy's convention:
  three slashes, then the path, so ``sqlite:///data/s.db`` is ``data/s.db`` relative to the
  working directory and ``sqlite:////data/s.db`` is ``/data/s.db``
  (:func:`cleftwise.storage.db.urls.sqlite_url` builds one from a path). Safe for several
  writer processes (busy timeout,
  ``BEGIN IMMEDIATE`` transactions, retries on SQLITE_BUSY).
- ``mongodb://host:port/db`` (or ``mongodb+srv://``): pymongo; ``_id`` is the synapse id, so
  rewriting a record replaces it. An unreachable server raises :class:`StorageError` after
  ``timeout_s`` (default 3 s).
- ``mongomock://db``: the same MongoDB code on mongomock (in-process, for tests; one shared
  in-memory server per process, so reopening the URL sees the same data).

The record schema lives in :mod:`cleftwise.storage.db.schema` (``COLUMNS``); see
``docs/synapse_db.md``. Example::

    from cleftwise.storage.db import open_store
    with open_store("sqlite:////tmp/syn.db") as db:
        db.upsert_many(block_df, block_id=7)          # replaces block 7's synapses
        df = db.query(roi=((0, 0, 0), (400, 4000, 4000)), min_score=0.5)
        db.update_fields(ei_df, fields=["ei_prob", "ei_label", "classifier"])
        db.export("synapses.parquet")
"""

from __future__ import annotations

import abc
import inspect
import logging
import os
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import pandas as pd

from cleftwise.storage.errors import StorageError
from cleftwise.storage.atomic import atomic_path
from cleftwise.storage.db.schema import (
    COLUMN_NAMES,
    QueryFilter,
    as_int64_ids,
    empty_frame,
    make_filter,
    normalize_records,
    normalize_update,
    select_columns,
)

__all__ = ["SynapseStore", "ONE_BATCH"]

log = logging.getLogger(__name__)

ONE_BATCH = 1 << 62  #: batch size asking a backend for the whole result in one frame


class SynapseStore(abc.ABC):
    """A table of synapse records (schema: :data:`cleftwise.storage.db.schema.COLUMNS`).

    Query methods share the filter arguments ``roi`` (funlib Roi or ``((z0, y0, x0),
    (z1, y1, x1))`` in nm, half-open, matched on the centroid or, with
    ``roi_match="bbox"``, on bounding-box overlap), ``pre``/``post``/``neuron`` (a neuron id
    or a list: any of), ``min_score`` (``score_union >= min_score``) and ``block_id``; all
    conditions combine with AND. Results are ordered by synapse id.
    """

    #: the URL the store was opened with (passwords redacted)
    url: str

    # ----------------------------------------------------------- backend primitives
    @abc.abstractmethod
    def _write(self, frame: pd.DataFrame, block_id: Optional[int]) -> None:
        """Write normalised records; with block_id, first drop that block's records."""

    @abc.abstractmethod
    def _select(self, filt: QueryFilter, columns: list[str], limit: Optional[int],
                batch_size: int) -> Iterator[pd.DataFrame]:
        """Yield typed frames of at most batch_size matching rows, ordered by id.

        ``batch_size == ONE_BATCH`` asks for one frame (the backend may sort it after fetching).
        """

    @abc.abstractmethod
    def _count(self, filt: QueryFilter) -> int:
        """Number of matching records."""

    @abc.abstractmethod
    def _pair_counts(self, filt: QueryFilter) -> pd.DataFrame:
        """Matching records grouped by (pre_neuron, post_neuron): columns pre, post, n."""

    @abc.abstractmethod
    def _update(self, frame: pd.DataFrame, fields: list[str]) -> int:
        """Set ``fields`` of existing records keyed by ``frame.id``; returns records matched."""

    @abc.abstractmethod
    def neurons(self) -> np.ndarray:
        """Sorted int64 ids of every non-zero neuron seen as pre or post partner."""

    @abc.abstractmethod
    def block_ids(self) -> list[int]:
        """Sorted ids of the blocks that wrote records."""

    @abc.abstractmethod
    def delete_block(self, block_id: int) -> int:
        """Delete the records written by ``block_id``; returns how many."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the connection (idempotent)."""

    def extra_fields(self) -> list:
        """The extra fields the database holds, ``[[name, type], ...]`` in first-seen order
        (:mod:`cleftwise.storage.db.extra_fields`); empty when none."""
        return []

    def _columns(self, columns: Optional[Sequence[str]]) -> tuple[list[str], dict]:
        """(validated output columns, {extra name: type})."""
        types = dict((n, t) for n, t in self.extra_fields())
        return select_columns(columns, list(types)), types

    # ----------------------------------------------------------- public API
    def upsert_many(self, records: Any, block_id: Optional[int] = None, extra: str = "error") -> int:
        """Insert or replace records (a DataFrame or list of dicts); returns how many.

        A record whose id exists replaces the stored one entirely. With ``block_id``, the
        block's previous records are deleted first and every record is tagged with it, so
        rewriting a block is idempotent (SQLite: one transaction; MongoDB: delete, then bulk
        upserts). Columns outside the schema are an error (``extra="error"``), dropped
        (``"ignore"``) or kept as typed extra fields (``"keep"``; table imports).
        """
        frame = normalize_records(records, block_id=block_id, extra=extra,
                                  where=f"records for {self.url}" + (f" block {block_id}" if block_id is not None else ""))
        self._write(frame, None if block_id is None else int(as_int64_ids(block_id, "block_id")))
        log.debug("%s: wrote %d records (block %s)", self.url, len(frame), block_id)
        return len(frame)

    def replace_block(self, block_id: int, records: Any) -> int:
        """Replace every record of ``block_id`` by ``records`` (same as ``upsert_many``)."""
        return self.upsert_many(records, block_id=block_id)

    def query(self, roi=None, pre=None, post=None, neuron=None, min_score=None,
              limit: Optional[int] = None, columns: Optional[Sequence[str]] = None,
              block_id: Optional[int] = None, roi_match: str = "centroid") -> pd.DataFrame:
        """Matching records as one DataFrame (``id`` first, then ``columns`` or all: the
        schema's, then the extra fields)."""
        cols, types = self._columns(columns)
        filt = make_filter(roi, pre, post, neuron, min_score, block_id, roi_match)
        frames = list(self._select(filt, cols, _check_limit(limit), batch_size=ONE_BATCH))
        return _concat(frames, cols, types)

    def iter_query(self, roi=None, pre=None, post=None, neuron=None, min_score=None,
                   limit: Optional[int] = None, columns: Optional[Sequence[str]] = None,
                   block_id: Optional[int] = None, roi_match: str = "centroid",
                   batch_size: int = 50_000) -> Iterator[pd.DataFrame]:
        """Like :meth:`query` but yields DataFrames of at most ``batch_size`` rows."""
        if int(batch_size) < 1:
            raise StorageError(f"batch_size must be >= 1, got {batch_size}")
        cols, _ = self._columns(columns)
        filt = make_filter(roi, pre, post, neuron, min_score, block_id, roi_match)
        yield from self._select(filt, cols, _check_limit(limit), batch_size=int(batch_size))

    def count(self, roi=None, pre=None, post=None, neuron=None, min_score=None,
              block_id: Optional[int] = None, roi_match: str = "centroid") -> int:
        """Number of matching records."""
        return self._count(make_filter(roi, pre, post, neuron, min_score, block_id, roi_match))

    def get(self, ids, columns: Optional[Sequence[str]] = None) -> pd.DataFrame:
        """Records with these synapse ids, ordered by id (absent ids are skipped)."""
        cols, types = self._columns(columns)
        filt = make_filter(ids=ids)
        if filt.ids.size == 0:
            return empty_frame(cols, types)
        return _concat(list(self._select(filt, cols, None, batch_size=ONE_BATCH)), cols, types)

    def degrees(self, roi=None, min_score=None, block_id: Optional[int] = None,
                roi_match: str = "centroid") -> pd.DataFrame:
        """Per-neuron degrees over the matching records (neuron 0 excluded).

        Returns:
            DataFrame sorted by ``neuron`` with ``out_synapses`` / ``in_synapses`` (records
            with the neuron as pre / post partner) and ``out_degree`` / ``in_degree``
            (distinct non-zero post / pre partners).
        """
        pairs = self._pair_counts(make_filter(roi, None, None, None, min_score, block_id, roi_match))
        out_syn = pairs[pairs.pre != 0].groupby("pre")["n"].sum()
        in_syn = pairs[pairs.post != 0].groupby("post")["n"].sum()
        linked = pairs[(pairs.pre != 0) & (pairs.post != 0)]
        out_deg = linked.groupby("pre").size()
        in_deg = linked.groupby("post").size()
        ids = np.union1d(out_syn.index.to_numpy(np.int64), in_syn.index.to_numpy(np.int64))
        res = pd.DataFrame({"neuron": ids})
        for name, s in (("out_synapses", out_syn), ("in_synapses", in_syn),
                        ("out_degree", out_deg), ("in_degree", in_deg)):
            res[name] = s.reindex(ids, fill_value=0).to_numpy(np.int64)
        return res

    def update_fields(self, records: Any, fields: Optional[Sequence[str]] = None) -> int:
        """Set ``fields`` of existing records from a table keyed by ``id`` (E/I stage).

        Missing values (NaN/None) clear a field. Ids not in the store are ignored (logged).
        Returns the number of records matched.
        """
        frame, fields = normalize_update(records, fields, where=f"update of {self.url}")
        if frame.empty:
            return 0
        matched = self._update(frame, fields)
        if matched < len(frame):
            log.warning("%s: update_fields matched %d of %d ids", self.url, matched, len(frame))
        return matched

    def export(self, path: str, format: Optional[str] = None, batch_size: int = 50_000,
               columns: Optional[Sequence[str]] = None, layout: str = "cleftwise",
               voxel_size: Optional[Sequence[float]] = None, **filters) -> int:
        """Stream matching records to a Parquet or CSV file; returns the row count.

        Memory is bounded by ``batch_size`` rows (pyarrow writers, one batch at a time; about
        2.5 KiB of transient memory per row of a batch with all columns). The
        file is written beside ``path`` and renamed into place when complete. ``format``
        defaults to the suffix (``.parquet``/``.pq`` or ``.csv``); ``filters`` are those of
        :meth:`query` (``roi``, ``pre``, ``min_score``, ``limit``, ...). ``layout``:
        ``cleftwise`` (the records, extra fields included), ``cave`` or ``manc`` with positions
        in voxels of ``voxel_size`` (z, y, x) nm (:mod:`cleftwise.storage.db.table_layouts`).
        Parquet files carry key-value metadata ``cleftwise`` (layout, resolution); a CSV gets
        the same, with the column dtypes, in ``<path>.meta.json``.
        """
        import json

        import pyarrow as pa

        from cleftwise.storage.db import table_layouts as tl

        path = os.fspath(path)
        fmt = format or ("csv" if path.lower().endswith(".csv") else "parquet")
        if fmt not in ("parquet", "csv"):
            raise StorageError(f"export format must be 'parquet' or 'csv', got {fmt!r} for {path}")
        vs = tl.check_layout(layout, voxel_size)
        if layout != "cleftwise" and columns is not None:
            raise StorageError(f"columns select from the cleftwise layout; the {layout} layout has "
                               f"fixed columns")
        cols, types = self._columns(columns)
        fields = tl.layout_fields(layout, cols, types, fmt)
        schema = pa.schema([pa.field(n, t, nullable=not (layout == "cleftwise" and n in
                                                         ("id", "pre_neuron", "post_neuron")))
                            for n, t in fields])
        empty = tl.to_layout(empty_frame(cols, types), layout, vs, types, fmt)
        # pandas metadata lets pd.read_parquet restore the nullable Int64 / str dtypes
        meta = dict(pa.Table.from_pandas(empty, schema=schema, preserve_index=False).schema.metadata)
        meta[tl.META_KEY] = json.dumps(tl.file_metadata(layout, vs)).encode()
        meta[b"PANDAS_ATTRS"] = json.dumps(tl.pandas_attrs(layout, vs)).encode()
        schema = schema.with_metadata(meta)
        rows = 0
        with atomic_path(path, "export") as tmp:
            if fmt == "parquet":
                import pyarrow.parquet as pq
                writer = pq.ParquetWriter(tmp, schema)
            else:
                import pyarrow.csv as pcsv
                writer = pcsv.CSVWriter(tmp, schema)
            try:
                for df in self.iter_query(columns=cols, batch_size=batch_size, **filters):
                    df = tl.to_layout(df, layout, vs, types, fmt)
                    writer.write_table(pa.Table.from_pandas(df, schema=schema, preserve_index=False))
                    rows += len(df)
            finally:
                writer.close()
        if fmt == "csv":
            side = tl.file_metadata(layout, vs, tl.csv_dtypes(fields))
            with atomic_path(tl.sidecar_path(path), "export metadata") as tmp, open(tmp, "w") as f:
                json.dump(side, f, indent=1)
        log.info("%s: exported %d records to %s", self.url, rows, path)
        return rows

    def __enter__(self) -> "SynapseStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


def _check_limit(limit) -> Optional[int]:
    if limit is None:
        return None
    if int(limit) < 0:
        raise StorageError(f"limit must be >= 0, got {limit}")
    return int(limit)


def _concat(frames: list[pd.DataFrame], cols: list[str], types: Optional[dict] = None) -> pd.DataFrame:
    if not frames:
        return empty_frame(cols, types)
    if len(frames) == 1:
        return frames[0]
    return pd.concat(frames, ignore_index=True)
