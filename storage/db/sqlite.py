"""SQLite backend of the synapse database (embedded, one file, several writer processes).

Layout: table ``synapses`` (one row per record, ``id`` is the rowid), R*Tree
``synapses_rtree(id, z0, z1, y0, y1, x0, x1)`` holding each record's bounding box united with
its centroid (so it answers centroid and bbox ROI queries; R*Tree stores float32 boxes
rounded outwards, and the exact test runs on the float64 columns), indexes on
``(pre_neuron, post_neuron)``, ``post_neuron`` and ``block_id``, and table ``cleftwise_meta``
with the schema kind and version and the file layout.

Layout 2 (files made since 2026-11): ``synapses`` has an SQL column for every field a query
filters or indexes on, the E/I fields and the text fields (:data:`SQL_COLUMNS`), plus
``packed``, a BLOB with all 29 numeric fields of the record (:mod:`cleftwise.storage.db.record_pack`).
Python's :mod:`sqlite3` makes one object per fetched value, ~45 ms for 10,000 records of 33
fields; one BLOB per record decodes in a single ``np.frombuffer``, so queries of many
columns read ``packed`` (and the text columns). The fields of :data:`PACKED_ONLY` (sizes,
secondary scores, pre/post sites, partner confidences) are kept only there: in SQL they are
not columns; cleftwise's ``query``, the CLI and the exports return them. ``update_fields``
patches ``packed`` in the same statement, and a trigger refuses hand-made UPDATEs of a numeric
SQL column that would leave it stale. Layout 1 (one SQL column per field, no ``packed``) is
still read and written as such.

Layout 3 (files made since 2026-12) is layout 2 plus ``extra``, a TEXT column holding each
record's extra fields (columns of imported tables outside the schema) as a JSON object of its
present values, typed by the registry in ``cleftwise_meta`` key ``extra_fields``
(:mod:`cleftwise.storage.db.extra_fields`; SQL tools read them with ``json_extract``). A layout-2
file is upgraded in place (``ALTER TABLE … ADD COLUMN``) the first time records with extra
fields are written to it; a layout-1 file refuses them. cleftwise versions before layout 3
refuse layout-3 files clearly ("SQLite layout 3 is not one this cleftwise reads").

Concurrency: WAL journal (readers never block the writer), a busy timeout, every write in a
short ``BEGIN IMMEDIATE`` transaction (the write lock is taken up front, so two writers never
deadlock upgrading read locks), and whole-transaction retries with backoff when SQLITE_BUSY
still comes through.

Writes: rows are bound as Python int/float/str with missing values as float NaN (SQLite
stores a bound NaN as NULL; binding ``None`` costs ~5x more in :mod:`sqlite3`), several rows
per ``INSERT`` statement. A *bulk load* -- a write of at least ``bulk_min_rows`` records into
a table holding no more records than the write -- runs as one transaction that drops and
re-creates the secondary indexes around the inserts and packs the R*Tree in one pass
(:mod:`cleftwise.storage.db.sqlite_rtree`), instead of ~8 µs of R*Tree insertion per record. Its result is
the same as the ordinary path's: records replaced by id, a block's old records removed.
"""

from __future__ import annotations

import contextlib
import gc
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

try:  # pandas' C loop behind DataFrame.from_records: 4x faster than np.array(rows, object)
    from pandas._libs.lib import to_object_array_tuples as _to_object_array_tuples
except ImportError:  # pragma: no cover - other pandas versions
    _to_object_array_tuples = None

from cleftwise.storage.db import sqlite_rtree
from cleftwise.storage.errors import StorageError
from cleftwise.storage.db.record_pack import PACKED_COLUMNS, PACKED_DTYPE, pack_records, unpack_records
from cleftwise.storage.db.extra_fields import decode_json_rows, encode_json_rows, merge_registry, parse_registry
from cleftwise.storage.db.base import ONE_BATCH, SynapseStore
from cleftwise.storage.db.urls import sqlite_url
from cleftwise.storage.db.schema import (
    COLUMNS,
    COLUMN_NAMES,
    SCHEMA_KIND,
    SCHEMA_VERSION,
    TEXT_DTYPE,
    QueryFilter,
    empty_frame,
)

__all__ = ["SQLiteSynapseStore"]

log = logging.getLogger(__name__)

_SQL_TYPE = {"key": "INTEGER PRIMARY KEY", "neuron": "INTEGER NOT NULL DEFAULT 0",
             "count": "INTEGER", "float": "REAL", "text": "TEXT"}
_NOT_NULL = {"z", "y", "x"}
_HEADER = b"SQLite format 3\x00"
_META = "cleftwise_meta"
_RTREE = "synapses_rtree"
_KIND = {c.name: c.kind for c in COLUMNS}
_ROWS_PER_STATEMENT = 32  #: rows per multi-row INSERT (fewer sqlite3 steps than one per row)
_PAGE_SIZE = 16384  #: page size of new database files (existing files keep theirs)
_WAL_LIMIT = 64 << 20  #: bytes the WAL file is truncated to when SQLite resets it
#: File layout of this backend (meta key ``sqlite_layout``; absent = 1). Layout 1: one SQL
#: column per schema field. Layout 2 (new files): the SQL columns of :data:`SQL_COLUMNS` plus
#: ``packed``, every numeric field of the record in one BLOB (:mod:`cleftwise.storage.db.record_pack`); the
#: fields of :data:`PACKED_ONLY` live only there. Layout 3 (new files): layout 2 plus ``extra``
#: (JSON of the extra fields). Files of any of these layouts are read and written.
_LAYOUT = 3
_PACKED = "packed"
_EXTRA = "extra"  #: SQL column of the extra fields (layout 3)
_EXTRA_KEY = "extra_fields"  #: meta key of the extra-field registry
_EXTRA_JSON = "\x00extra_json"  #: frame column carrying the encoded extra fields into _write_rows
#: Fields kept only in ``packed`` (layout 2): never filtered or indexed in SQL; read them
#: through cleftwise (``query``, the CLI, exports).
PACKED_ONLY = ("size", "score_pre", "score_post", "score_max", "pre_z", "pre_y", "pre_x",
               "post_z", "post_y", "post_x", "pre_size", "post_size", "pre_conf", "post_conf")
#: SQL columns of a layout-2 table besides ``packed`` (in schema order).
SQL_COLUMNS = tuple(c for c in COLUMN_NAMES if c not in PACKED_ONLY)
#: Layout-2 queries asking for at least this many numeric columns decode ``packed`` (at 10k
#: rows all 29 numeric fields come ~2x faster than as SQL columns; 6 columns about even).
_PACKED_MIN_COLUMNS = 8


def _ddl(layout: int = _LAYOUT) -> list[str]:
    names = SQL_COLUMNS if layout >= 2 else COLUMN_NAMES
    cols = ",\n  ".join(
        f"{c.name} {_SQL_TYPE[c.kind]}{' NOT NULL' if c.name in _NOT_NULL else ''}"
        for c in COLUMNS if c.name in names)
    if layout >= 2:
        cols += f",\n  {_PACKED} BLOB NOT NULL CHECK (length({_PACKED}) = {PACKED_DTYPE.itemsize})"
    if layout == 3:
        cols += f",\n  {_EXTRA} TEXT"
    both = [c for c in PACKED_COLUMNS if c in SQL_COLUMNS]  # fields held twice
    changed = " OR ".join(f"NEW.{c} IS NOT OLD.{c}" for c in both)
    stale_guard = [
        # a hand-made UPDATE of a numeric SQL column would leave the packed copy stale
        f"CREATE TRIGGER synapses_packed_in_step BEFORE UPDATE OF {', '.join(both)} ON synapses "
        f"WHEN NEW.{_PACKED} IS OLD.{_PACKED} AND ({changed}) BEGIN SELECT RAISE(ABORT, "
        f"'numeric fields of synapse records are changed through cleftwise "
        f"(SynapseStore.update_fields), which keeps the packed copy in step'); END",
    ]
    return [
        f"CREATE TABLE {_META} (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        f"CREATE TABLE synapses (\n  {cols}\n)",
        "CREATE VIRTUAL TABLE synapses_rtree USING rtree(id, z0, z1, y0, y1, x0, x1)",
        "CREATE INDEX synapses_pre_post ON synapses(pre_neuron, post_neuron)",
        "CREATE INDEX synapses_post ON synapses(post_neuron)",
        "CREATE INDEX synapses_block ON synapses(block_id)",
        *(stale_guard if layout >= 2 else []),
    ]


def _is_busy(e: Exception) -> bool:
    code = getattr(e, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    msg = str(e).lower()
    return "locked" in msg or "busy" in msg


class SQLiteSynapseStore(SynapseStore):
    """Synapse records in one SQLite file; see :class:`cleftwise.storage.db.base.SynapseStore`.

    Options beyond :func:`cleftwise.storage.db.open_store`'s: ``cache_mb`` (SQLite page cache
    per connection), ``layout`` (of a new file: 3, default, 2 without extra fields, or 1, every
    field an SQL column and no extra fields; see
    the module docstring; an existing file keeps its own) and ``bulk_min_rows`` (writes of at
    least this many records into a table holding at most as many are bulk loads, see the module
    docstring; 0 disables them).
    """

    def __init__(self, path: str, create: bool = True, readonly: bool = False,
                 timeout_s: float = 30.0, retries: int = 8, batch_size: int = 50_000,
                 cache_mb: int = 64, bulk_min_rows: int = 20_000, layout: int = _LAYOUT):
        self.path = os.path.abspath(os.path.expanduser(os.fspath(path)))
        if self.path.startswith("//"):  # POSIX keeps a leading '//': the same file as '/'
            self.path = "/" + self.path.lstrip("/")
        self.url = sqlite_url(self.path)
        self.retries = int(retries)
        self.batch_size = int(batch_size)
        self.bulk_min_rows = int(bulk_min_rows)
        self._conn: Optional[sqlite3.Connection] = None
        self._packed = False  # layout >= 2 (set when the schema is checked)
        self._has_extra = False  # layout 3
        if layout not in (1, 2, 3):
            raise StorageError(f"SQLite layout must be 1, 2 or 3, got {layout!r}")
        self._new_layout = int(layout)
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
                # mode=ro still needs the -shm file of a WAL database beside it, which a
                # read-only folder cannot hold: there the file is opened immutable instead
                folder = os.path.dirname(self.path) or "."
                flag = "mode=ro" if os.access(folder, os.W_OK) else "immutable=1"
                self._conn = sqlite3.connect(f"file:{quote(self.path)}?{flag}", uri=True,
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
            c.execute(f"PRAGMA page_size={_PAGE_SIZE}")  # no-op unless the file is still empty
            mode = c.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                log.warning("%s: could not switch to WAL (journal_mode=%s)", self.path, mode)
            c.execute("PRAGMA synchronous=NORMAL")
            c.execute(f"PRAGMA journal_size_limit={_WAL_LIMIT}")  # after a bulk load's big WAL
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
            for stmt in _ddl(self._new_layout):
                cur.execute(stmt)
            cur.executemany(f"INSERT INTO {_META} VALUES (?, ?)",
                            [("kind", SCHEMA_KIND), ("schema_version", str(SCHEMA_VERSION)),
                             ("sqlite_layout", str(self._new_layout)),
                             ("created", time.strftime("%Y-%m-%dT%H:%M:%S%z"))])
            log.info("created synapse database %s (schema %d, SQLite layout %d)", self.path,
                     SCHEMA_VERSION, self._new_layout)

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
        self._set_layout(meta)

    def _set_layout(self, meta: dict) -> None:
        try:
            layout = int(meta.get("sqlite_layout", "1"))
        except ValueError:
            layout = -1
        if layout not in (1, 2, 3):
            raise StorageError(f"{self.path}: SQLite layout {meta.get('sqlite_layout')} is not one this "
                               f"cleftwise reads (1, 2, 3); update cleftwise")
        self._layout = layout
        self._packed = layout >= 2
        self._has_extra = layout == 3
        self._sql_columns = SQL_COLUMNS if self._packed else COLUMN_NAMES
        self._registry = parse_registry(meta.get(_EXTRA_KEY), self.path)

    def _read_meta(self, cur=None) -> dict:
        conn = cur if cur is not None else self._live()
        return dict(conn.execute(f"SELECT key, value FROM {_META}").fetchall())

    def extra_fields(self) -> list:
        try:
            self._set_layout(self._retry(self._read_meta))
        except sqlite3.Error as e:
            raise StorageError(f"{self.path}: cannot read the database metadata: {e}") from e
        return [list(r) for r in self._registry]

    def _add_extra_fields(self, cur: sqlite3.Cursor, frame: pd.DataFrame, names: list) -> pd.DataFrame:
        """Register the frame's extra fields (upgrading a layout-2 file to 3) in the current
        transaction; returns the frame with them cast to the registered types."""
        self._set_layout(self._read_meta(cur))
        if self._layout == 1:
            raise StorageError(f"{self.path}: SQLite layout 1 holds no extra fields ({names[:5]}); "
                               f"stream the file into a new one (layout 3, see docs/synapse_db.md) "
                               f"or drop those columns")
        reg, frame = merge_registry(self._registry, frame, names, f"records for {self.url}")
        if self._layout == 2:
            cur.execute(f"ALTER TABLE synapses ADD COLUMN {_EXTRA} TEXT")
            cur.execute(f"INSERT OR REPLACE INTO {_META} VALUES ('sqlite_layout', '3')")
            log.info("%s: upgraded SQLite layout 2 -> 3 to hold extra fields %s", self.path, names)
            self._set_layout(self._read_meta(cur))
        if reg != self._registry:
            cur.execute(f"INSERT OR REPLACE INTO {_META} VALUES (?, ?)", (_EXTRA_KEY, json.dumps(reg)))
            self._registry = reg
        return frame

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
        except StorageError:
            raise
        except (sqlite3.Error, ValueError, TypeError, MemoryError, AttributeError) as e:
            raise StorageError(f"{self.path}: write failed (rolled back): {e}") from e

    def _live(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StorageError(f"synapse database {self.path} is closed")
        return self._conn

    # ----------------------------------------------------------- writes
    def _write(self, frame: pd.DataFrame, block_id: Optional[int]) -> None:
        if not frame["id"].is_monotonic_increasing:  # rowid order: appends, not page splits
            frame = frame.iloc[np.argsort(frame["id"].to_numpy(), kind="stable")]
        n = len(frame)
        bulk = 0 < self.bulk_min_rows <= n
        extras = [c for c in frame.columns if c not in _KIND]
        state: dict = {"frame": frame}

        def first(cur: sqlite3.Cursor) -> bool:
            """Write the first transaction; True when it wrote everything."""
            frame = state["frame"]
            if extras:  # registry checked and extended under the write lock
                frame = self._add_extra_fields(cur, frame.copy(), extras)
                frame = frame.assign(**{_EXTRA_JSON: encode_json_rows(frame, self._registry)})
                state["frame"] = frame
            else:  # layout as of now (another process may have upgraded the file)
                self._set_layout(self._read_meta(cur))
            if bulk and self._stored_at_most(cur, n):
                self._bulk_load(cur, frame, block_id)
                return True
            if block_id is not None:  # one transaction: readers see the old block or the new one
                self._delete_block(cur, block_id)
                self._write_rows(cur, frame)
                return True
            self._write_rows(cur, frame.iloc[:self.batch_size])
            return n <= self.batch_size

        if self._transaction(first):
            return
        frame = state["frame"]
        for start in range(self.batch_size, n, self.batch_size):
            part = frame.iloc[start:start + self.batch_size]
            self._transaction(lambda cur, part=part: self._write_rows(cur, part))

    def _write_rows(self, cur: sqlite3.Cursor, frame: pd.DataFrame, rtree: bool = True,
                    rows_per_statement: int = 1) -> None:
        """INSERT OR REPLACE records (and, with ``rtree``, their R*Tree boxes).

        Several rows per statement pay only into a table without indexes (measured: ~30 %
        faster there, 15-30 % slower with the three indexes or into the R*Tree).
        """
        names = [*self._sql_columns, _PACKED] if self._packed else list(self._sql_columns)
        if self._has_extra:
            names.append(_EXTRA)
        mat = _bind_matrix(frame, self._sql_columns, extra=int(self._packed) + int(self._has_extra))
        if self._packed:
            mat[:, len(self._sql_columns)] = pack_records(frame)
        if self._has_extra:
            mat[:, -1] = frame[_EXTRA_JSON].to_numpy(dtype=object) if _EXTRA_JSON in frame.columns else None
        _insert_many(cur, f"INSERT OR REPLACE INTO synapses ({', '.join(names)})",
                     mat, self._max_params(), rows_per_statement)
        if rtree:
            ids, boxes = _rtree_boxes(frame)
            mat = np.empty((len(ids), 7), dtype=object)
            mat[:, 0], mat[:, 1:] = ids, boxes
            _insert_many(cur, f"INSERT OR REPLACE INTO {_RTREE}", mat, self._max_params())

    def _delete_block(self, cur: sqlite3.Cursor, block_id: int) -> int:
        cur.execute(f"DELETE FROM {_RTREE} WHERE id IN (SELECT id FROM synapses WHERE block_id = ?)",
                    (block_id,))
        cur.execute("DELETE FROM synapses WHERE block_id = ?", (block_id,))
        return cur.rowcount

    def _max_params(self) -> int:
        conn = self._live()
        if hasattr(conn, "getlimit"):  # Python >= 3.11
            return conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        return 32766 if sqlite3.sqlite_version_info >= (3, 32) else 999  # SQLite's defaults

    @staticmethod
    def _stored_at_most(cur: sqlite3.Cursor, n: int) -> bool:
        """True when the table holds at most n records (counts at most n + 1 R*Tree rows)."""
        got = cur.execute(f"SELECT COUNT(*) FROM (SELECT 1 FROM {_RTREE}_rowid LIMIT ?)",
                          (n + 1,)).fetchone()[0]
        return got <= n

    def _bulk_load(self, cur: sqlite3.Cursor, frame: pd.DataFrame, block_id: Optional[int]) -> None:
        """Write ``frame`` (replacing ``block_id``'s records) with indexes rebuilt after the rows.

        Same result as the ordinary path; meant for loads at least as large as the table. The
        R*Tree is packed only when no other statement of this connection is running (a paused
        ``iter_query`` holds R*Tree nodes in the module's cache): dropping an index fails with
        SQLITE_LOCKED exactly then, so the drops double as the check.
        """
        gone = np.zeros(0, np.int64)
        if block_id is not None:
            gone = np.array([r[0] for r in cur.execute(
                "SELECT id FROM synapses WHERE block_id = ?", (block_id,))], dtype=np.int64)
            cur.execute("DELETE FROM synapses WHERE block_id = ?", (block_id,))
        indexes, kept = _drop_indexes(cur)
        packed = bool(indexes) and not kept and _shadow_tables_writable(cur)
        if not packed and gone.size:
            cur.execute(f"DELETE FROM {_RTREE} WHERE id IN (SELECT value FROM json_each(?))",
                        (json.dumps(gone.tolist()),))
        per_statement = 1 if kept else _ROWS_PER_STATEMENT
        for start in range(0, len(frame), self.batch_size):  # bounded memory for the bound rows
            self._write_rows(cur, frame.iloc[start:start + self.batch_size], rtree=not packed,
                             rows_per_statement=per_statement)
        for sql in indexes:
            cur.execute(sql)
        if packed:
            old_ids, old_boxes = sqlite_rtree.read_entries(cur, _RTREE, 6)
            keep = ~np.isin(old_ids, np.concatenate([gone, frame["id"].to_numpy()]))
            ids, boxes = _rtree_boxes(frame)
            lo, hi = sqlite_rtree.round_outwards_f32(boxes[:, 0::2], boxes[:, 1::2])
            new = np.empty(boxes.shape, np.float32)
            new[:, 0::2], new[:, 1::2] = lo, hi
            node_bytes = sqlite_rtree.node_size(cur, _RTREE)
            tree = sqlite_rtree.pack_rtree(np.concatenate([old_ids[keep], ids]),
                                           np.concatenate([old_boxes[keep], new]), node_bytes)
            sqlite_rtree.clear_rtree(cur, _RTREE, node_bytes)
            sqlite_rtree.write_packed(cur, _RTREE, tree)
        log.debug("%s: bulk load of %d records (indexes rebuilt: %d, R*Tree packed: %s)",
                  self.path, len(frame), len(indexes), packed)

    def _update(self, frame: pd.DataFrame, fields: list[str]) -> int:
        conn = self._live()
        repack = self._packed and any(f in PACKED_COLUMNS for f in fields)
        in_sql = [f for f in fields if f in self._sql_columns]
        sets = [*in_sql, _PACKED] if repack else in_sql
        sql = f"UPDATE synapses SET {', '.join(f'{f} = ?' for f in sets)} WHERE id = ?"
        matched = 0
        for start in range(0, len(frame), self.batch_size):
            part = frame.iloc[start:start + self.batch_size]
            def run(cur: sqlite3.Cursor, part=part) -> int:
                before = conn.total_changes
                mat = _bind_matrix(part, [*in_sql, "id"], extra=1 if repack else 0)
                if repack:  # packed copies patched in the same transaction (read, modify, write)
                    mat[:, -1] = _repacked(cur, part, fields)
                    mat[:, [-2, -1]] = mat[:, [-1, -2]]  # id last
                cur.executemany(sql, map(np.ndarray.tolist, mat))
                return conn.total_changes - before

            matched += self._transaction(run)
        return matched

    def delete_block(self, block_id: int) -> int:
        bid = int(block_id)
        return self._transaction(lambda cur: self._delete_block(cur, bid))

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
        extras = [c for c in columns if c not in _KIND]
        order = list(columns)
        columns = [c for c in columns if c in _KIND]
        numeric = [c for c in columns if c in PACKED_COLUMNS]
        packed = self._packed and (len(numeric) >= _PACKED_MIN_COLUMNS
                                   or any(c not in self._sql_columns for c in columns))
        texts = [c for c in columns if c not in PACKED_COLUMNS]
        # packed: one BLOB per row and the text columns
        selected = [f"s.{_PACKED}", *("s." + c for c in texts)] if packed \
            else ["s." + c for c in columns]
        if extras:  # the JSON of the extra fields last (ignored by the frame builders)
            selected.append(f"s.{_EXTRA}" if self._has_extra else "NULL")
        sql = f"SELECT {', '.join(selected)} {clause}"
        if not everything:  # batches and limits need SQL's order; one whole result is sorted
            # in Python below (cheaper than SQLite's sorter)
            sql += " ORDER BY s.id"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        try:
            cur = self._retry(lambda: conn.execute(sql, params))
            while True:
                with _gc_paused():
                    rows = cur.fetchall() if batch_size >= ONE_BATCH else cur.fetchmany(batch_size)
                    if not rows:
                        break
                    more = decode_json_rows([r[-1] for r in rows], self._registry, extras) if extras else {}
                    frame = (_frame_from_packed(rows, columns, numeric, texts, sort=everything, more=more)
                             if packed else _frame_from_rows(rows, columns, sort=everything, more=more))
                    del rows
                yield frame if list(frame.columns) == order else frame[order]
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


@contextlib.contextmanager
def _gc_paused():
    """Python's cyclic GC paused while a result is fetched: every fetched row is a new tuple,
    and the collections they trigger scan every object of the process (measured at 10k rows:
    p95 of a query 47 -> 34 ms in a bare process, more in one holding large tables). The rows
    hold no cycles; collection resumes right after."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _in(col: str, ids: np.ndarray) -> tuple[str, list]:
    if ids.size == 1:
        return f"{col} = ?", [int(ids[0])]
    return f"{col} IN (SELECT value FROM json_each(?))", [json.dumps(ids.tolist())]


def _bind_values(series: pd.Series) -> np.ndarray:
    """Column values for binding: Python int/float/str, missing values as float NaN (NULL)."""
    arr = series.array
    if isinstance(arr, pd.arrays.IntegerArray):
        return arr.to_numpy(dtype=object, na_value=np.nan)
    if isinstance(series.dtype, np.dtype) and series.dtype.kind in "fiub":
        return series.to_numpy()
    return series.to_numpy(dtype=object, na_value=np.nan)


def _bind_matrix(frame: pd.DataFrame, names, extra: int = 0) -> np.ndarray:
    """(rows, len(names) + extra) object array of bindable values (see :func:`_bind_values`);
    the ``extra`` last columns are left for the caller."""
    out = np.empty((len(frame), len(names) + extra), dtype=object)
    for j, name in enumerate(names):
        out[:, j] = _bind_values(frame[name])  # numpy numbers become Python int / float
    return out


def _repacked(cur: sqlite3.Cursor, part: pd.DataFrame, fields: list[str]) -> list:
    """``packed`` values for the rows of an update: the stored copies with ``fields`` replaced
    (None for ids not stored; their UPDATE changes nothing)."""
    ids = part["id"].to_numpy(np.int64)
    rows = cur.execute(
        f"SELECT id, {_PACKED} FROM synapses WHERE id IN (SELECT value FROM json_each(?))",
        (json.dumps(ids.tolist()),)).fetchall()
    out: list = [None] * len(ids)
    if not rows:
        return out
    stored = pd.DataFrame(unpack_records([r[1] for r in rows], PACKED_COLUMNS))
    order = np.argsort(ids, kind="stable")
    at = order[np.searchsorted(ids, np.array([r[0] for r in rows], np.int64), sorter=order)]
    for f in fields:
        if f in PACKED_COLUMNS:
            stored[f] = part[f].iloc[at].reset_index(drop=True).array
    for i, blob in zip(at.tolist(), pack_records(stored)):
        out[i] = blob
    return out


def _insert_many(cur: sqlite3.Cursor, head: str, mat: np.ndarray, max_params: int,
                 rows_per_statement: int = 1) -> None:
    """Run ``head VALUES (...)[, (...)]`` over the rows of ``mat``."""
    n, k = mat.shape
    per = max(1, min(rows_per_statement, max_params // k))
    row = "(" + ", ".join("?" * k) + ")"
    full = n - n % per
    if full:  # parameter lists made one at a time: no GC passes over millions of live refs
        cur.executemany(f"{head} VALUES {', '.join([row] * per)}",
                        map(np.ndarray.tolist, mat[:full].reshape(-1, per * k)))
    if n > full:
        cur.execute(f"{head} VALUES {', '.join([row] * (n - full))}", mat[full:].reshape(-1).tolist())


def _rtree_boxes(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """ids and R*Tree boxes (n, 6) ``z0, z1, y0, y1, x0, x1``: bbox united with the centroid
    (a missing bbox leaves the centroid)."""
    boxes = np.empty((len(frame), 6), np.float64)
    for i, ax in enumerate("zyx"):
        c = frame[ax].to_numpy(np.float64)
        boxes[:, 2 * i] = np.fmin(frame[f"bbox_{ax}0"].to_numpy(np.float64), c)
        boxes[:, 2 * i + 1] = np.fmax(frame[f"bbox_{ax}1"].to_numpy(np.float64), c)
    return frame["id"].to_numpy(np.int64), boxes


def _shadow_tables_writable(cur: sqlite3.Cursor) -> bool:
    """False when SQLite protects the R*Tree shadow tables (SQLITE_DBCONFIG_DEFENSIVE)."""
    try:
        cur.execute(f"DELETE FROM {_RTREE}_parent WHERE 0")
        return True
    except sqlite3.OperationalError as e:
        if _is_busy(e):
            raise
        log.info("R*Tree shadow tables are read-only (%s): bulk loads insert boxes one by one", e)
        return False


def _drop_indexes(cur: sqlite3.Cursor) -> tuple[list[str], int]:
    """Drop the secondary indexes of ``synapses``; returns the SQL re-creating them and how
    many were kept (in use by an unfinished statement of this connection: SQLITE_LOCKED)."""
    dropped, kept = [], 0
    for name, sql in cur.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index' "
                                 "AND tbl_name = 'synapses' AND sql IS NOT NULL").fetchall():
        try:
            cur.execute(f'DROP INDEX "{name}"')
            dropped.append(sql)
        except sqlite3.OperationalError as e:
            if "locked" not in str(e).lower():
                raise
            kept += 1
            log.debug("index %s kept during bulk load: %s", name, e)
    return dropped, kept


def _frame_from_rows(rows: list, columns: list[str], sort: bool = False, more: Optional[dict] = None) -> pd.DataFrame:
    """Typed DataFrame from fetched row tuples (dtypes of :func:`cleftwise.storage.db.schema.frame_from_columns`).

    One 2-D object array, then one cast per column kind: no per-row Python work. With
    ``sort``, rows are ordered by the first column (``id``).
    """
    if not rows:
        return empty_frame(columns)
    obj = _object_rows(rows)
    kinds = [_KIND[c] for c in columns]
    arrays: dict[str, object] = {}
    for cast, wanted in ((np.int64, ("key", "neuron")), (np.float64, ("float",))):
        at = [j for j, k in enumerate(kinds) if k in wanted]
        if at:
            block = obj[:, at].astype(cast)  # None -> NaN for floats; ints are never NULL
            arrays.update((columns[j], block[:, i]) for i, j in enumerate(at))
    for j, (name, kind) in enumerate(zip(columns, kinds)):
        if kind == "count":
            col = obj[:, j]
            mask = pd.isna(col)
            data = col.copy()
            data[mask] = 0
            arrays[name] = pd.arrays.IntegerArray(data.astype(np.int64), mask)
        elif kind == "text":
            arrays[name] = obj[:, j].copy()
    arrays.update(more or {})
    return _typed_frame(arrays, [*columns, *(more or {})], sort)


def _frame_from_packed(rows: list, columns: list[str], numeric: list[str], texts: list[str],
                       sort: bool, more: Optional[dict] = None) -> pd.DataFrame:
    """Typed DataFrame from fetched rows ``(packed BLOB, *texts)`` (layout 2)."""
    cells = list(zip(*rows))
    arrays = unpack_records(cells[0], numeric)
    arrays.update((name, np.array(col, dtype=object)) for name, col in zip(texts, cells[1:]))
    arrays.update(more or {})
    return _typed_frame(arrays, [*columns, *(more or {})], sort)


def _typed_frame(arrays: dict, columns: list[str], sort: bool) -> pd.DataFrame:
    """DataFrame of ``columns`` from numpy arrays (``Int64`` IntegerArrays for counts, object
    arrays for text); with ``sort``, rows ordered by the first column (``id``)."""
    if sort:
        ids = np.asarray(arrays[columns[0]])
        if not bool(np.all(ids[1:] > ids[:-1])):
            order = np.argsort(ids, kind="stable")
            arrays = {k: v[order] for k, v in arrays.items()}
    out = {}
    for name in columns:
        if _KIND.get(name) == "text" and TEXT_DTYPE is not object:
            out[name] = pd.array(arrays[name], dtype=TEXT_DTYPE)
        else:
            out[name] = arrays[name]
    return pd.DataFrame(out, columns=list(columns))


def _object_rows(rows: list) -> np.ndarray:
    """(rows, columns) object array from equal-length tuples (sqlite3 values are never split)."""
    if _to_object_array_tuples is not None:
        try:
            return _to_object_array_tuples(rows)
        except (TypeError, ValueError):  # a private helper: fall back if its signature changes
            pass
    out = np.empty((len(rows), len(rows[0]) if rows else 0), dtype=object)
    out[:] = rows
    return out
