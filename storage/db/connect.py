"""Open a synapse database by URL: the one place that knows both backends.

Backends import :mod:`cleftwise.storage.db.base` (the interface); this module imports the
backends lazily, so there is no import cycle and pymongo is imported only for MongoDB URLs.
"""

from __future__ import annotations

import inspect
import os

from cleftwise.storage.db.base import SynapseStore
from cleftwise.storage.db.urls import redact, sqlite_file
from cleftwise.storage.errors import StorageError

__all__ = ["open_store"]


def _known_options(cls, backend: str, opts: dict) -> dict:
    """``opts`` unchanged, or a :class:`StorageError` naming options ``cls`` does not take."""
    params = list(inspect.signature(cls.__init__).parameters)[2:]  # after self and the URL/path
    unknown = sorted(set(opts) - set(params))
    if unknown:
        raise StorageError(f"unknown option(s) {unknown} for the {backend} synapse database; "
                           f"it takes {params}")
    return opts


def open_store(url: str, **opts) -> SynapseStore:
    """Open (creating if allowed) the synapse database named by ``url``.

    SQLite URLs follow SQLAlchemy: ``sqlite:///rel/s.db`` is relative to the working directory,
    ``sqlite:////abs/s.db`` absolute; a plain path ending in ``.db``/``.sqlite``/``.sqlite3``
    is taken as it is.

    Options (keyword): both backends take ``create`` (default True; False raises
    :class:`StorageError` when the database does not exist yet), ``readonly`` (never creates
    or changes anything; an SQLite file in a read-only folder is opened immutable) and
    ``batch_size``.
    SQLite: ``timeout_s`` (busy timeout, default 30), ``retries`` (on SQLITE_BUSY, default 8),
    ``cache_mb`` (page cache, default 64), ``bulk_min_rows`` (default 20 000: a
    write at least this large into a table holding no more is a bulk load, one transaction
    with indexes rebuilt and the R*Tree packed; 0 disables). MongoDB: ``timeout_s`` (server selection, default 3), ``collection``
    (default ``"synapses"``), ``write_concern`` (int, ``"majority"`` or a dict of
    ``pymongo.WriteConcern`` arguments), ``client`` (an existing MongoClient to use).
    """
    url = os.fspath(url)
    if "@" in url:  # a user without a password: the password from the environment, never stored
        from cleftwise.storage.db.credentials import with_password

        url = with_password(url)
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    path = sqlite_file(url)
    if path is not None:
        from cleftwise.storage.db.sqlite import SQLiteSynapseStore

        return SQLiteSynapseStore(path, **_known_options(SQLiteSynapseStore, "SQLite", opts))
    if scheme in ("mongodb", "mongodb+srv", "mongomock"):
        from cleftwise.storage.db.mongo import MongoSynapseStore

        return MongoSynapseStore(url, **_known_options(MongoSynapseStore, "MongoDB", opts))
    raise StorageError(f"unknown synapse database URL {redact(url)!r}: use sqlite:///rel/path.db, "
                       f"sqlite:////abs/path.db, mongodb://host:port/db or mongomock://db")
