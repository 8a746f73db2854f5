"""MongoDB backend of the synapse database (pymongo; mongomock for tests, same code).

Layout in the URL's database: collection ``synapses`` (configurable) with one document per
record, ``_id`` = synapse id (so a rewrite replaces the document); missing values are absent
fields. Indexes: ``(z, y, x)``, ``(pre_neuron, post_neuron)``, ``post_neuron``, ``block_id``.
Collection ``<collection>_meta`` holds ``{_id: "schema", kind, version}`` and, once records
with extra fields (columns of imported tables outside the schema) were written, their registry
``extra_fields: [[name, type], …]``; a record keeps its extra values in the sub-document
``extra`` (uint64 values >= 2**63 as the int64 with the same bits; see
:mod:`cleftwise.storage.db.extra_fields`). The registry is extended read-modify-write: two
processes adding *different new* extra fields at the same moment may lose one registration.

Writes go in unordered ``bulk_write`` batches: inserts first (cheapest for new ids, which is
the common case), then ``ReplaceOne(upsert=True)`` for the ids that already existed (duplicate
key errors of the first pass). ``upsert_many(..., block_id=b)`` first deletes block ``b``'s
documents. There are no multi-document transactions (a standalone server has none): a crash
between the delete and the writes leaves the block partly written until it is rewritten, which
the block ledger of the pipeline does anyway.

mongomock 4.3 predates the ``sort`` argument that pymongo >= 4.9 passes from
``ReplaceOne``/``UpdateOne`` into the bulk builder; :func:`_mongomock_client` wraps those two
builder methods to accept it (only ``sort=None``), so the same ``bulk_write`` code runs on both.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
import threading
from typing import Any, Iterator, Optional
from urllib.parse import urlsplit

import numpy as np
import pandas as pd

from cleftwise.storage.errors import StorageError
from cleftwise.storage.db.base import ONE_BATCH, SynapseStore
from cleftwise.storage.db.extra_fields import from_mongo_values, merge_registry, mongo_values, parse_registry
from cleftwise.storage.db.urls import redact
from cleftwise.storage.db.schema import (
    COLUMN_NAMES,
    SCHEMA_KIND,
    SCHEMA_VERSION,
    QueryFilter,
    frame_from_columns,
)

__all__ = ["MongoSynapseStore"]

log = logging.getLogger(__name__)

_DUPLICATE_KEY = 11000
_mock_lock = threading.Lock()
_mock_clients: dict[str, Any] = {}


def _patch_mongomock() -> None:
    """Let mongomock's bulk builder accept pymongo's ``sort`` argument (see module docstring)."""
    import mongomock.collection as mcol

    builder = mcol.BulkOperationBuilder
    if "sort" not in inspect.signature(builder.add_replace).parameters:
        _accept_sort(builder)


def _mongomock_client(host: str):
    """The process-wide mongomock client for ``host`` (reopening a URL sees its data)."""
    try:
        import mongomock
    except ImportError as e:  # pragma: no cover - mongomock is a listed requirement
        raise StorageError("mongomock:// URLs need the mongomock package") from e
    with _mock_lock:
        _patch_mongomock()
        if host not in _mock_clients:
            _mock_clients[host] = mongomock.MongoClient()
        return _mock_clients[host]


def _accept_sort(builder) -> None:
    add_replace, add_update = builder.add_replace, builder.add_update

    def replace(self, selector, doc, upsert, collation=None, hint=None, sort=None):
        if sort is not None:
            raise NotImplementedError("mongomock bulk replace with sort")
        return add_replace(self, selector, doc, upsert, collation=collation, hint=hint)

    def update(self, selector, doc, multi=False, upsert=False, collation=None,
               array_filters=None, hint=None, sort=None):
        if sort is not None:
            raise NotImplementedError("mongomock bulk update with sort")
        return add_update(self, selector, doc, multi, upsert, collation=collation,
                          array_filters=array_filters, hint=hint)

    builder.add_replace, builder.add_update = replace, update


def _write_concern(value):
    from pymongo import WriteConcern

    if value is None:
        return None
    if isinstance(value, WriteConcern):
        return value
    if isinstance(value, dict):
        return WriteConcern(**value)
    if isinstance(value, (int, str)):
        return WriteConcern(w=value)
    raise StorageError(f"write_concern must be an int, 'majority' or a dict, got {value!r}")


class MongoSynapseStore(SynapseStore):
    """Synapse records in a MongoDB collection; see :class:`cleftwise.storage.db.base.SynapseStore`."""

    def __init__(self, url: str, client=None, collection: str = "synapses", timeout_s: float = 3.0,
                 write_concern=None, batch_size: int = 10_000, create: bool = True,
                 readonly: bool = False):
        from pymongo.errors import PyMongoError

        create = create and not readonly  # a reader never creates the collection

        self.url = redact(url)
        self.batch_size = int(batch_size)
        try:
            parts = urlsplit(url)
        except ValueError as e:  # e.g. "Invalid IPv6 URL" (an unclosed [ )
            raise StorageError(f"bad MongoDB URL {self.url}: {redact(str(e))}") from None
        scheme = parts.scheme.lower()
        self._own_client = False
        if scheme == "mongomock":
            db_name = parts.path.strip("/") or parts.netloc
            if client is None:
                client = _mongomock_client(parts.netloc if parts.path.strip("/") else "localhost")
        else:
            from pymongo.uri_parser import parse_uri

            try:
                db_name = parse_uri(url)["database"]
            except Exception as e:
                raise StorageError(f"bad MongoDB URL {self.url}: {redact(str(e))}") from None
            if client is None:
                from pymongo import MongoClient

                ms = max(1, int(float(timeout_s) * 1000))
                try:
                    client = MongoClient(url, serverSelectionTimeoutMS=ms, connectTimeoutMS=ms)
                except PyMongoError as e:
                    raise StorageError(f"bad MongoDB URL {self.url}: {redact(str(e))}") from None
                self._own_client = True
        if type(client).__module__.startswith("mongomock"):
            with _mock_lock:
                _patch_mongomock()
        if not db_name:
            raise StorageError(f"MongoDB URL {self.url} names no database: use mongodb://host:port/dbname")
        self._client = client
        try:
            if self._own_client:
                client.admin.command("ping")
            db = client[db_name]
            wc = _write_concern(write_concern)
            self._col = db.get_collection(collection, write_concern=wc) if wc else db[collection]
            self._meta = db[f"{collection}_meta"]
            self._check_schema(create)
        except PyMongoError as e:
            self.close()
            reason = str(e).split(", Timeout:")[0].split(" (configured timeouts")[0]
            raise StorageError(f"cannot use MongoDB at {self.url} (timeout {timeout_s} s): {reason}") from None
        except StorageError:
            self.close()
            raise

    # ----------------------------------------------------------- opening
    def _check_schema(self, create: bool) -> None:
        meta = self._meta.find_one({"_id": "schema"})
        if meta is None:
            if self._col.find_one({}, {"_id": 1}) is not None:
                raise StorageError(f"{self.url}: collection {self._col.name!r} holds documents but no "
                                   f"cleftwise schema record (foreign collection?)")
            if not create:
                raise StorageError(f"no synapse database at {self.url} (collection {self._col.name!r})")
            self._meta.update_one({"_id": "schema"}, {"$setOnInsert": {
                "kind": SCHEMA_KIND, "version": SCHEMA_VERSION}}, upsert=True)
            meta = self._meta.find_one({"_id": "schema"})
            log.info("created synapse collection %s at %s (schema %d)", self._col.name, self.url,
                     SCHEMA_VERSION)
        if meta.get("kind") != SCHEMA_KIND:
            raise StorageError(f"{self.url}: {self._meta.name!r} is not a cleftwise schema record")
        if meta.get("version") != SCHEMA_VERSION:
            raise StorageError(f"{self.url}: synapse database schema version {meta.get('version')}, "
                               f"this cleftwise reads version {SCHEMA_VERSION}")
        self._col.create_index([("z", 1), ("y", 1), ("x", 1)], name="zyx")
        self._col.create_index([("pre_neuron", 1), ("post_neuron", 1)], name="pre_post")
        self._col.create_index([("post_neuron", 1)], name="post")
        self._col.create_index([("block_id", 1)], name="block")

    def _call(self, what: str, fn, *args, **kwargs):
        from pymongo.errors import PyMongoError

        try:
            return fn(*args, **kwargs)
        except PyMongoError as e:
            raise StorageError(f"{self.url}: {what} failed: {str(e)[:300]}") from e

    # ----------------------------------------------------------- writes
    def extra_fields(self) -> list:
        meta = self._call("metadata read", self._meta.find_one, {"_id": "schema"}) or {}
        return parse_registry(json.dumps(meta.get("extra_fields") or []), self.url)

    def _write(self, frame: pd.DataFrame, block_id: Optional[int]) -> None:
        names = [c for c in frame.columns if c not in COLUMN_NAMES]
        registry = []
        if names:
            old = self.extra_fields()
            registry, frame = merge_registry(old, frame.copy(), names, f"records for {self.url}")
            if registry != old:
                self._call("metadata update", self._meta.update_one, {"_id": "schema"},
                           {"$set": {"extra_fields": registry}})
        if block_id is not None:
            self._call(f"delete of block {block_id}", self._col.delete_many, {"block_id": block_id})
        docs = _documents(frame, registry)
        for start in range(0, len(docs), self.batch_size):
            self._write_batch(docs[start:start + self.batch_size])

    def _write_batch(self, docs: list[dict]) -> None:
        from pymongo import InsertOne, ReplaceOne
        from pymongo.errors import BulkWriteError

        if not docs:
            return
        if not self._col.write_concern.acknowledged:  # w=0 reports no duplicate-key errors
            self._call("bulk upsert", self._col.bulk_write,
                       [ReplaceOne({"_id": d["_id"]}, d, upsert=True) for d in docs], ordered=False)
            return
        try:
            self._col.bulk_write([InsertOne(dict(d)) for d in docs], ordered=False)
            return
        except BulkWriteError as e:
            errors = e.details.get("writeErrors", [])
            other = [w for w in errors if w.get("code") != _DUPLICATE_KEY]
            if other:
                raise StorageError(f"{self.url}: bulk insert failed: {other[0].get('errmsg')}") from e
            existing = [docs[w["index"]] for w in errors]
        self._call("bulk upsert", self._col.bulk_write,
                   [ReplaceOne({"_id": d["_id"]}, d, upsert=True) for d in existing], ordered=False)

    def _update(self, frame: pd.DataFrame, fields: list[str]) -> int:
        from pymongo import UpdateOne

        values = {f: _column_values(frame[f]) for f in fields}
        ids = frame["id"].tolist()
        matched = 0
        for start in range(0, len(ids), self.batch_size):
            ops = []
            for k in range(start, min(start + self.batch_size, len(ids))):
                set_, unset = {}, {}
                for f in fields:
                    v = values[f][k]
                    if v is None:
                        unset[f] = ""
                    else:
                        set_[f] = v
                op = {}
                if set_:
                    op["$set"] = set_
                if unset:
                    op["$unset"] = unset
                ops.append(UpdateOne({"_id": ids[k]}, op))
            res = self._call("bulk update", self._col.bulk_write, ops, ordered=False)
            matched += res.matched_count
        return matched

    def delete_block(self, block_id: int) -> int:
        return self._call(f"delete of block {block_id}", self._col.delete_many,
                          {"block_id": int(block_id)}).deleted_count

    # ----------------------------------------------------------- reads
    def _filter(self, filt: QueryFilter) -> dict:
        conds: list[dict] = []
        if filt.roi is not None:
            begin, end = filt.roi
            centroid = {}
            for ax, b, e in zip("zyx", begin, end):
                rng = {}
                if np.isfinite(b):
                    rng["$gte"] = b
                if np.isfinite(e):
                    rng["$lt"] = e
                if rng:
                    centroid[ax] = rng
            if filt.roi_match == "centroid":
                if centroid:
                    conds.append(centroid)
            else:
                overlap = {}
                for ax, b, e in zip("zyx", begin, end):
                    if np.isfinite(e):
                        overlap[f"bbox_{ax}0"] = {"$lt": e}
                    if np.isfinite(b):
                        overlap[f"bbox_{ax}1"] = {"$gt": b}
                if overlap:
                    overlap.setdefault("bbox_z0", {})["$ne"] = None
                    conds.append({"$or": [overlap, {"bbox_z0": None, **centroid}]})
        for field, ids in (("pre_neuron", filt.pre), ("post_neuron", filt.post), ("_id", filt.ids)):
            if ids is not None:
                conds.append({field: _match(ids)})
        if filt.neuron is not None:
            m = _match(filt.neuron)
            conds.append({"$or": [{"pre_neuron": m}, {"post_neuron": m}]})
        if filt.min_score is not None:
            conds.append({"score_union": {"$gte": filt.min_score}})
        if filt.block_id is not None:
            conds.append({"block_id": filt.block_id})
        if not conds:
            return {}
        return conds[0] if len(conds) == 1 else {"$and": conds}

    def _select(self, filt: QueryFilter, columns: list[str], limit: Optional[int],
                batch_size: int) -> Iterator[pd.DataFrame]:
        from pymongo.errors import PyMongoError

        if limit == 0:
            return
        names = set(COLUMN_NAMES)
        extras = [c for c in columns if c not in names]
        registry = self.extra_fields() if extras else []
        projection = {c: 1 for c in columns if c != "id" and c in names}
        projection["_id"] = 1
        if extras:
            projection["extra"] = 1
        everything = batch_size >= ONE_BATCH and limit is None
        try:
            # One result is sorted here, not by the server (no in-memory sort limits there).
            cursor = self._col.find(self._filter(filt), projection,
                                    sort=None if everything else [("_id", 1)],
                                    limit=limit or 0, allow_disk_use=True,
                                    batch_size=min(batch_size, 50_000))
            batch: list[dict] = []
            for doc in cursor:
                batch.append(doc)
                if len(batch) >= batch_size:
                    yield _frame(batch, columns, registry)
                    batch = []
            if batch:
                frame = _frame(batch, columns, registry)
                yield frame.sort_values("id", kind="stable", ignore_index=True) if everything else frame
        except PyMongoError as e:
            raise StorageError(f"{self.url}: query failed: {str(e)[:300]}") from e

    def _count(self, filt: QueryFilter) -> int:
        return int(self._call("count", self._col.count_documents, self._filter(filt)))

    def _pair_counts(self, filt: QueryFilter) -> pd.DataFrame:
        pipeline = [{"$match": self._filter(filt)},
                    {"$group": {"_id": {"pre": "$pre_neuron", "post": "$post_neuron"},
                                "n": {"$sum": 1}}}]
        rows = list(self._call("aggregation", self._col.aggregate, pipeline, allowDiskUse=True))
        return pd.DataFrame({
            "pre": np.array([r["_id"].get("pre", 0) for r in rows], dtype=np.int64),
            "post": np.array([r["_id"].get("post", 0) for r in rows], dtype=np.int64),
            "n": np.array([r["n"] for r in rows], dtype=np.int64),
        })

    def neurons(self) -> np.ndarray:
        ids: set[int] = set()
        for field in ("pre_neuron", "post_neuron"):
            rows = self._call("aggregation", self._col.aggregate,
                              [{"$match": {field: {"$ne": 0}}}, {"$group": {"_id": f"${field}"}}],
                              allowDiskUse=True)
            ids.update(int(r["_id"]) for r in rows if r["_id"] is not None)
        return np.array(sorted(ids), dtype=np.int64)

    def block_ids(self) -> list[int]:
        rows = self._call("aggregation", self._col.aggregate,
                          [{"$match": {"block_id": {"$ne": None}}}, {"$group": {"_id": "$block_id"}}],
                          allowDiskUse=True)
        return sorted(int(r["_id"]) for r in rows)

    def close(self) -> None:
        if self._own_client and self._client is not None:
            self._client.close()
        self._client = None


def _match(ids: np.ndarray):
    return int(ids[0]) if ids.size == 1 else {"$in": ids.tolist()}


def _column_values(series: pd.Series) -> list:
    """Python values of a column, None where missing (NaN, <NA>)."""
    arr = series.array
    if isinstance(arr, pd.arrays.IntegerArray):
        out = arr._data.tolist()
        for k in np.flatnonzero(arr._mask):
            out[k] = None
        return out
    if isinstance(series.dtype, np.dtype) and series.dtype.kind in "iub":
        return series.to_numpy().tolist()
    if isinstance(series.dtype, np.dtype) and series.dtype.kind == "f":
        values = series.to_numpy()
        out = values.tolist()
        for k in np.flatnonzero(np.isnan(values)):
            out[k] = None
        return out
    return series.to_numpy(dtype=object, na_value=None).tolist()


def _documents(frame: pd.DataFrame, registry: list = ()) -> list[dict]:
    """One document per record: ``_id`` = id, missing values left out, extra fields in the
    sub-document ``extra``."""
    names = [c for c in COLUMN_NAMES if c != "id"]
    columns = [_column_values(frame[c]) for c in names]
    extra = mongo_values(frame, registry) if registry else [None] * len(frame)
    docs = []
    for k, sid in enumerate(frame["id"].tolist()):
        doc = {"_id": sid}
        for name, col in zip(names, columns):
            v = col[k]
            if v is not None:
                doc[name] = v
        if extra[k] is not None:
            doc["extra"] = extra[k]
        docs.append(doc)
    return docs


def _frame(docs: list[dict], columns: list[str], registry: list = ()) -> pd.DataFrame:
    data = {}
    schema = set(COLUMN_NAMES)
    extras = [c for c in columns if c not in schema]
    for c in columns:
        if c not in schema:
            continue
        key = "_id" if c == "id" else c
        default = 0 if c in ("pre_neuron", "post_neuron") else None
        data[c] = [d.get(key, default) for d in docs]
    frame = frame_from_columns(data, [c for c in columns if c in schema])
    if not extras:
        return frame
    for name, values in from_mongo_values([d.get("extra") for d in docs], registry, extras).items():
        frame[name] = values
    return frame[list(columns)]
