"""SQLite backend of the synapse database (embedded, one file, several writer processes).

Layout: table ``synapses`` (one row per record, ``id`` is the rowid), R*Tree
``synapses_rtree(id, z0, z1, y0, y1, x0, x1)`` holding each record's bounding box united with
its centroid (so it answers centroid and bbox ROI queries; R*Tree stores float32 boxes
rounded outwards, and the exact test runs on the float64 columns), indexes on
``(pre_neuron, post_neuron)``, ``post_neuron`` and ``block_id``, and table ``cleftwise_meta``
with the schema kind and version.

Concurrency: WAL journal (readers never block the writer), a busy timeout, every write in a
short ``BEGIN IMMEDIATE`` transaction (the write lock is taken up front, so two writers never
deadlock upgrading read locks), and whole-transaction retries with backoff when SQLITE_BUSY
still comes through.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sqlite3
import time
from typing import Callable, Iterator, Optional
from urllib.parse import quote

import numpy as np
import pandas as pd

from .errors import StorageError
from .synapse_db import ONE_BATCH, SynapseStore
from .synapse_schema import (
    COLUMNS,
    COLUMN_NAMES,
    SCHEMA_KIND,
    SCHEMA_VERSION,
    QueryFilter,
    frame_from_columns,
)

__all__ = ["SQLiteSynapseStore"]

log = logging.getLogger(__name__)

_SQL_TYPE = {"key": "INTEGER PRIMARY KEY", "neuron": "INTEGER NOT NULL DEFAULT 0",
             "count": "INTEGER", "float": "REAL", "text": "TEXT"}
_NOT_NULL = {"z", "y", "x"}
_HEADER = b"SQLite format 3\x00"
_META = "cleftwise_meta"


def _ddl() -> list[str]:
    cols = ",\n  ".join(
        f"{c.name} {_SQL_TYPE[c.kind]}{' NOT NULL' if c.name in _NOT_NULL else ''}" for c in COLUMNS)
    return [
        f"CREATE TABLE {_META} (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        f"CREATE TABLE synapses (\n  {cols}\n)",
        "CREATE VIRTUAL TABLE synapses_rtree USING rtree(id, z0, z1, y0, y1, x0, x1)",
        "CREATE INDEX synapses_pre_post ON synapses(pre_neuron, post_neuron)",
        "CREATE INDEX synapses_post ON synapses(post_neuron)",
        "CREATE INDEX synapses_block ON synapses(block_id)",
    ]


def _is_busy(e: Exception) -> bool:
    code = getattr(e, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    msg = str(e).lower()
    return "locked" in msg or "busy" in msg


class SQLiteSynapseStore(SynapseStore):
    """Synapse records in one SQLite file; see :class:`storage.synapse_db.SynapseStore`."""

    def __init__(self, path: str, create: bool = True, readonly: bool = False,
                 timeout_s: float = 30.0, retries: int = 8, batch_size: int = 50_000,
                 cache_mb: int = 64):
        self.path = os.path.abspath(os.path.expanduser(os.fspath(path)))
        self.url = f"sqlite://{self.path}"
        self.retries = int(retries)
        self.batch_size = int(batch_size)
        self._conn: Optional[sqlite3.Connection] = None
        if os.path.isdir(self.path):
            raise StorageError(f"synapse database {self.path} is a directory")
        exists = os.path.exists(self.path)
        if not exists and (readonly or not create):
            raise StorageError(f"no synapse database at {self.path}")
        if exists:
            self._check_header()
        elif os.path.dirname(self.path):
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
        try:
            if readonly:
                self._conn = sqlite3.connect(f"file:{quote(self.path)}?mode=ro", uri=True,
                                             timeout=timeout_s, isolation_level=None)
            else:
                self._conn = sqlite3.connect(self.path, timeout=timeout_s, isolation_level=None)
            self._retry(lambda: self._pragmas(readonly, cache_mb))
            self._check_schema(create and not readonly)
        except sqlite3.DatabaseError as e:
            self.close()
            if _is_busy(e):
                raise StorageError(f"synapse database {self.path} stayed locked by another writer: {e}") from e
            raise StorageError(f"{self.path} is not a readable cleftwise synapse database: {e}") from e
        except StorageError:
            self.close()
            raise

    # ----------------------------------------------------------- opening
    def _check_header(self) -> None:
        try:
            with open(self.path, "rb") as f:
                head = f.read(len(_HEADER))
        except OSError as e:
            raise StorageError(f"cannot read synapse database {self.path}: {e}") from e
        if head and head != _HEADER:
            raise StorageError(f"{self.path} is not an SQLite database (foreign or corrupt file)")

    def _pragmas(self, readonly: bool, cache_mb: int) -> None:
        c = self._conn
        if not readonly:
            mode = c.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                log.warning("%s: could not switch to WAL (journal_mode=%s)", self.path, mode)
            c.execute("PRAGMA synchronous=NORMAL")
        c.execute(f"PRAGMA cache_size=-{int(cache_mb) * 1024}")
        c.execute("PRAGMA temp_store=MEMORY")

    def _tables(self) -> set[str]:
        rows = self._conn.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()
        return {r[0] for r in rows if not r[0].startswith("sqlite_") and not r[0].startswith("synapses_rtree_")}

    def _check_schema(self, create: bool) -> None:
        def init(cur: sqlite3.Cursor) -> None:
            tables = self._tables()
            if _META in tables:  # another process created it meanwhile
                return
            if tables:
                raise StorageError(f"{self.path} is an SQLite database but not a cleftwise synapse "
                                   f"database (tables: {sorted(tables)[:8]})")
            if not create:
                raise StorageError(f"no synapse database at {self.path} (empty file)")
            for stmt in _ddl():
                cur.execute(stmt)
            cur.executemany(f"INSERT INTO {_META} VALUES (?, ?)",
                            [("kind", SCHEMA_KIND), ("schema_version", str(SCHEMA_VERSION)),
                             ("created", time.strftime("%Y-%m-%dT%H:%M:%S%z"))])
            log.info("created synapse database %s (schema %d)", self.path, SCHEMA_VERSION)

        # An existing database is checked without taking the write lock.
        if _META not in self._retry(self._tables):
            if create:
                self._transaction(init)
            else:
                init(self._conn.cursor())
        meta = dict(self._conn.execute(f"SELECT key, value FROM {_META}").fetchall())
        if meta.get("kind") != SCHEMA_KIND:
            raise StorageError(f"{self.path}: not a cleftwise synapse database (kind {meta.get('kind')!r})")
        if meta.get("schema_version") != str(SCHEMA_VERSION):
            raise StorageError(f"{self.path}: synapse database schema version "
                               f"{meta.get('schema_version')}, this cleftwise reads version {SCHEMA_VERSION}")
        missing = {"synapses", "synapses_rtree"} - {
            r[0] for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if missing:
            raise StorageError(f"{self.path}: synapse database lacks tables {sorted(missing)}")

    # ----------------------------------------------------------- transactions
    def _retry(self, fn: Callable[[], object]) -> object:
        delay = 0.01
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except sqlite3.OperationalError as e:
                if not _is_busy(e) or attempt == self.retries:
                    raise
                log.warning("%s busy (%s), retry %d/%d", self.path, e, attempt + 1, self.retries)
                time.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 2.0)

    def _transaction(self, fn: Callable[[sqlite3.Cursor], object]) -> object:
        """Run ``fn(cursor)`` inside BEGIN IMMEDIATE … COMMIT, retried whole on SQLITE_BUSY."""
        conn = self._live()

        def attempt():
            cur = conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                result = fn(cur)
                cur.execute("COMMIT")
                return result
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

        try:
            return self._retry(attempt)
        except sqlite3.Error as e:
            raise StorageError(f"{self.path}: write failed: {e}") from e

    def _live(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StorageError(f"synapse database {self.path} is closed")
        return self._conn

    # ----------------------------------------------------------- writes
    def _write(self, frame: pd.DataFrame, block_id: Optional[int]) -> None:
        placeholders = ", ".join("?" * len(COLUMN_NAMES))
        insert = f"INSERT OR REPLACE INTO synapses ({', '.join(COLUMN_NAMES)}) VALUES ({placeholders})"
        insert_box = "INSERT OR REPLACE INTO synapses_rtree VALUES (?, ?, ?, ?, ?, ?, ?)"

        if not frame["id"].is_monotonic_increasing:  # rowid order: appends, not page splits
            frame = frame.iloc[np.argsort(frame["id"].to_numpy(), kind="stable")]

        def write_rows(cur: sqlite3.Cursor, part: pd.DataFrame) -> None:
            # rows are rebuilt per attempt: a retried transaction gets fresh iterators
            cur.executemany(insert, _rows(part))
            cur.executemany(insert_box, _boxes(part))

        if block_id is not None:
            def replace(cur: sqlite3.Cursor) -> None:
                cur.execute("DELETE FROM synapses_rtree WHERE id IN "
                            "(SELECT id FROM synapses WHERE block_id = ?)", (block_id,))
                cur.execute("DELETE FROM synapses WHERE block_id = ?", (block_id,))
                write_rows(cur, frame)
            self._transaction(replace)
            return
        for start in range(0, len(frame), self.batch_size):
            part = frame.iloc[start:start + self.batch_size]
            self._transaction(lambda cur, part=part: write_rows(cur, part))

    def _update(self, frame: pd.DataFrame, fields: list[str]) -> int:
        conn = self._live()
        sql = f"UPDATE synapses SET {', '.join(f'{f} = ?' for f in fields)} WHERE id = ?"
        matched = 0
        for start in range(0, len(frame), self.batch_size):
            part = frame.iloc[start:start + self.batch_size]
            def run(cur: sqlite3.Cursor, part=part) -> int:
                before = conn.total_changes
                cur.executemany(sql, zip(*[_py_list(part[f]) for f in fields], part["id"].tolist()))
                return conn.total_changes - before

            matched += self._transaction(run)
        return matched

    def delete_block(self, block_id: int) -> int:
        bid = int(block_id)

        def run(cur: sqlite3.Cursor) -> int:
            cur.execute("DELETE FROM synapses_rtree WHERE id IN "
                        "(SELECT id FROM synapses WHERE block_id = ?)", (bid,))
            cur.execute("DELETE FROM synapses WHERE block_id = ?", (bid,))
            return cur.rowcount

        return self._transaction(run)

    # ----------------------------------------------------------- reads
    def _where(self, filt: QueryFilter) -> tuple[str, list]:
        """FROM … WHERE … clause (aliases s = synapses, r = rtree) and its parameters."""
        conds: list[str] = []
        params: list = []
        source = "synapses s"
        if filt.roi is not None:
            begin, end = filt.roi
            rconds = []
            for ax, b, e in zip("zyx", begin, end):
                # The R*Tree box contains the bbox and the centroid (float32, rounded outwards):
                # a superset test here, the exact float64 test below.
                if np.isfinite(b):
                    rconds.append(f"r.{ax}1 >= ?")
                    params.append(b)
                if np.isfinite(e):
                    rconds.append(f"r.{ax}0 <= ?")
                    params.append(e)
            if rconds:
                source = "synapses_rtree r CROSS JOIN synapses s"
                conds.append("s.id = r.id")
                conds.extend(rconds)
            centroid = []
            cparams = []
            for ax, b, e in zip("zyx", begin, end):
                if np.isfinite(b):
                    centroid.append(f"s.{ax} >= ?")
                    cparams.append(b)
                if np.isfinite(e):
                    centroid.append(f"s.{ax} < ?")
                    cparams.append(e)
            if filt.roi_match == "centroid":
                conds.extend(centroid)
                params.extend(cparams)
            else:
                overlap = []
                oparams = []
                for ax, b, e in zip("zyx", begin, end):
                    if np.isfinite(e):
                        overlap.append(f"s.bbox_{ax}0 < ?")
                        oparams.append(e)
                    if np.isfinite(b):
                        overlap.append(f"s.bbox_{ax}1 > ?")
                        oparams.append(b)
                if overlap:
                    conds.append(f"((s.bbox_z0 IS NOT NULL AND {' AND '.join(overlap)}) OR "
                                 f"(s.bbox_z0 IS NULL AND {' AND '.join(centroid) or '1'}))")
                    params.extend(oparams + cparams)
        for col, ids in (("pre_neuron", filt.pre), ("post_neuron", filt.post), ("id", filt.ids)):
            if ids is not None:
                cond, p = _in(f"s.{col}", ids)
                conds.append(cond)
                params.extend(p)
        if filt.neuron is not None:
            c1, p1 = _in("s.pre_neuron", filt.neuron)
            c2, p2 = _in("s.post_neuron", filt.neuron)
            conds.append(f"({c1} OR {c2})")
            params.extend(p1 + p2)
        if filt.min_score is not None:
            conds.append("s.score_union >= ?")
            params.append(filt.min_score)
        if filt.block_id is not None:
            conds.append("s.block_id = ?")
            params.append(filt.block_id)
        where = f" WHERE {' AND '.join(conds)}" if conds else ""
        return f"FROM {source}{where}", params

    def _select(self, filt: QueryFilter, columns: list[str], limit: Optional[int],
                batch_size: int) -> Iterator[pd.DataFrame]:
        conn = self._live()
        clause, params = self._where(filt)
        everything = batch_size >= ONE_BATCH and limit is None
        sql = f"SELECT {', '.join('s.' + c for c in columns)} {clause}"
        if not everything:  # one result: sorted below, cheaper than SQLite's sorter
            sql += " ORDER BY s.id"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        try:
            cur = self._retry(lambda: conn.execute(sql, params))
            while True:
                rows = cur.fetchall() if batch_size >= ONE_BATCH else cur.fetchmany(batch_size)
                if not rows:
                    break
                frame = frame_from_columns(dict(zip(columns, zip(*rows))), columns)
                yield _sorted_by_id(frame) if everything else frame
                if batch_size >= ONE_BATCH:
                    break
        except sqlite3.Error as e:
            raise StorageError(f"{self.path}: query failed: {e}") from e

    def _scalar_query(self, sql: str, params: list) -> list:
        conn = self._live()
        try:
            return self._retry(lambda: conn.execute(sql, params).fetchall())
        except sqlite3.Error as e:
            raise StorageError(f"{self.path}: query failed: {e}") from e

    def _count(self, filt: QueryFilter) -> int:
        clause, params = self._where(filt)
        return int(self._scalar_query(f"SELECT COUNT(*) {clause}", params)[0][0])

    def _pair_counts(self, filt: QueryFilter) -> pd.DataFrame:
        clause, params = self._where(filt)
        rows = self._scalar_query(
            f"SELECT s.pre_neuron, s.post_neuron, COUNT(*) {clause} GROUP BY 1, 2", params)
        arr = np.array(rows, dtype=np.int64).reshape(-1, 3)
        return pd.DataFrame({"pre": arr[:, 0], "post": arr[:, 1], "n": arr[:, 2]})

    def neurons(self) -> np.ndarray:
        rows = self._scalar_query(
            "SELECT pre_neuron FROM synapses WHERE pre_neuron != 0 UNION "
            "SELECT post_neuron FROM synapses WHERE post_neuron != 0 ORDER BY 1", [])
        return np.array([r[0] for r in rows], dtype=np.int64)

    def block_ids(self) -> list[int]:
        rows = self._scalar_query(
            "SELECT DISTINCT block_id FROM synapses WHERE block_id IS NOT NULL ORDER BY 1", [])
        return [int(r[0]) for r in rows]

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None


def _sorted_by_id(frame: pd.DataFrame) -> pd.DataFrame:
    ids = frame["id"].to_numpy()
    if ids.size < 2 or bool(np.all(ids[1:] > ids[:-1])):
        return frame
    return frame.take(np.argsort(ids, kind="stable")).reset_index(drop=True)


def _in(col: str, ids: np.ndarray) -> tuple[str, list]:
    if ids.size == 1:
        return f"{col} = ?", [int(ids[0])]
    return f"{col} IN (SELECT value FROM json_each(?))", [json.dumps(ids.tolist())]


def _py_list(series: pd.Series) -> list:
    """Column values as Python objects for sqlite3 (None = NULL; float NaN also binds as NULL)."""
    arr = series.array
    if isinstance(arr, pd.arrays.IntegerArray):
        out = arr._data.tolist()
        for k in np.flatnonzero(arr._mask):
            out[k] = None
        return out
    if isinstance(series.dtype, np.dtype) and series.dtype.kind in "fiub":
        return series.to_numpy().tolist()
    return series.to_numpy(dtype=object, na_value=None).tolist()


def _rows(frame: pd.DataFrame) -> Iterator[tuple]:
    """Lazy row tuples in schema order (one Python list per column, zipped)."""
    return zip(*[_py_list(frame[c]) for c in COLUMN_NAMES])


def _boxes(frame: pd.DataFrame) -> Iterator[tuple]:
    """R*Tree rows: id and, per axis, the bbox united with the centroid (NaN bbox ignored)."""
    cols = [frame["id"].tolist()]
    for ax in "zyx":
        c = frame[ax].to_numpy()
        cols.append(np.fmin(frame[f"bbox_{ax}0"].to_numpy(), c).tolist())
        cols.append(np.fmax(frame[f"bbox_{ax}1"].to_numpy(), c).tolist())
    return zip(*cols)
