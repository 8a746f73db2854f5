"""Database URLs: shown with passwords redacted; SQLite URLs to and from file paths."""

from __future__ import annotations

import os
import re

from cleftwise.storage.errors import StorageError

__all__ = ["redact", "sqlite_file", "sqlite_path", "sqlite_url", "db_files"]

_SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")


def redact(url: str) -> str:
    """The URL with any password replaced by ``***`` (for logs, ledgers, markers and errors).

    The password runs to the last ``@`` before any query, so an unescaped ``@`` or ``/`` in it
    is hidden too."""
    return re.sub(r"(://[^:/@?#]+:)[^?#]*@", r"\1***@", str(url))


def sqlite_path(url: str) -> str:
    """The file named by an SQLite URL, SQLAlchemy's convention: ``sqlite:///rel/s.db`` is
    relative to the working directory, ``sqlite:////abs/s.db`` absolute (``~`` expanded)."""
    rest = str(url)[len("sqlite://"):]
    if not rest.startswith("/") or rest == "/":
        raise StorageError(f"bad SQLite URL {url!r}: use sqlite:///relative/path.db or "
                           "sqlite:////absolute/path.db (three slashes, then the path)")
    return os.path.expanduser(rest[1:])


def sqlite_file(url: str) -> str | None:
    """The file of an SQLite database URL (``sqlite:///…`` or a plain ``*.db``/``*.sqlite``
    path), or None for any other URL."""
    url = str(url)
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme == "sqlite":
        return sqlite_path(url)
    if not scheme and url.lower().endswith(_SQLITE_SUFFIXES):
        return url
    return None


def db_files(url: str) -> list[str]:
    """The local files of a synapse database (an SQLite file and its -wal/-shm), [] for
    MongoDB: what an output path must not overwrite."""
    f = sqlite_file(url)
    return [] if f is None else [f + s for s in ("", "-wal", "-shm")]


def sqlite_url(path: str) -> str:
    """The SQLite URL of the file ``path`` (made absolute): ``sqlite:////abs/path.db``."""
    return "sqlite:///" + os.path.abspath(os.path.expanduser(os.fspath(path)))
