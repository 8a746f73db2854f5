"""Atomic file output: write beside the target, rename into place when complete.

Every export (tables, graphs, annotations, query results) goes through :func:`atomic_path`
(one file) or :func:`atomic_dir` (a folder such as neuroglancer annotations): the writer gets
a temporary name in the target's folder, which is renamed over the target only when the
writer returns. A failed write (full disk, killed process, bad data) leaves the old target, or
nothing, never a 0-byte or half-written file: the temporary is removed and an ``OSError``
becomes one :class:`StorageError` naming the target.

    with atomic_path("out/edges.csv") as tmp:
        edges.to_csv(tmp, index=False)
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from typing import Iterator, Sequence

from cleftwise.storage.errors import StorageError

__all__ = ["atomic_path", "atomic_dir", "check_output_path", "save_parquet", "save_npy", "save_npz"]

#: folders that are volume containers (their content is chunks and metadata, never an export)
_CONTAINER_SUFFIXES = (".zarr", ".zarr3", ".n5")
_VOLUME_MARKERS = (".zarray", ".zgroup", "zarr.json", "attributes.json")


def check_output_path(out: str, inputs: Sequence[str] = (), what: str = "output") -> None:
    """Refuse an output path that would destroy an input: raise :class:`StorageError` when
    ``out`` is one of the local files/folders ``inputs`` (symlinks resolved), lies inside one,
    holds one (a folder output is replaced as a whole), or lies inside a volume container
    (a ``.zarr``/``.n5`` folder or a folder with zarr/N5 metadata)."""
    real = os.path.realpath(os.fspath(out))
    for inp in inputs:
        r = os.path.realpath(os.fspath(inp))
        if real == r or real.startswith(r + os.sep) or r.startswith(real + os.sep):
            raise StorageError(f"{what} {out} would overwrite the input {inp}; write it elsewhere")
    d = real
    while True:
        if d.endswith(_CONTAINER_SUFFIXES) or any(os.path.isfile(os.path.join(d, m))
                                                  for m in _VOLUME_MARKERS):
            raise StorageError(f"{what} {out} lies inside the volume container {d}; "
                               "write it outside the container")
        parent = os.path.dirname(d)
        if parent == d:
            return
        d = parent


def _temp_beside(path: str) -> str:
    """A fresh hidden name in ``path``'s folder that ends like ``path`` (writers such as
    ``np.save`` append their suffix to a name without it)."""
    folder, base = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".tmp-{os.getpid()}-{secrets.token_hex(4)}-{base}")


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        with contextlib.suppress(OSError):
            os.remove(path)


@contextlib.contextmanager
def atomic_path(path: str, what: str = "file") -> Iterator[str]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` when the block ends.

    On any exception the temporary is removed and nothing at ``path`` changes; an ``OSError``
    (e.g. ENOSPC) is raised as :class:`StorageError` ``"cannot write <what> <path>: <reason>"``.
    The folder of ``path`` is created if needed.
    """
    path = os.fspath(path)
    tmp = _temp_beside(path)
    try:
        os.makedirs(os.path.dirname(tmp), exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        raise StorageError(f"cannot write {what} {path}: {e.strerror or e}") from e
    finally:
        _remove(tmp)


@contextlib.contextmanager
def atomic_dir(path: str, what: str = "folder") -> Iterator[str]:
    """:func:`atomic_path` for a folder: yield an empty temporary folder beside ``path``; when
    the block ends an existing ``path`` is moved aside, the new folder renamed into place and
    the old one deleted (so no stale file of an earlier export survives either)."""
    path = os.fspath(path)
    tmp, old = _temp_beside(path), _temp_beside(path)
    try:
        os.makedirs(tmp)
        yield tmp
        moved = os.path.lexists(path)
        if moved:
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except OSError:
            if moved:  # put the previous export back
                os.replace(old, path)
            raise
    except OSError as e:
        raise StorageError(f"cannot write {what} {path}: {e.strerror or e}") from e
    finally:
        _remove(tmp)
        _remove(old)


def save_parquet(df, path: str) -> None:
    """``df.to_parquet(path)`` (no index), atomically."""
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def save_npy(arr, path: str) -> None:
    """``np.save(path, arr)``, atomically."""
    import numpy as np

    with atomic_path(path) as tmp:
        np.save(tmp, arr)


def save_npz(path: str, **arrays) -> None:
    """``np.savez(path, **arrays)``, atomically."""
    import numpy as np

    with atomic_path(path) as tmp:
        np.savez(tmp, **arrays)
