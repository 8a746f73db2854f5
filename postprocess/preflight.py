"""Checks a stage runs before any work starts, each failing with one :class:`PostprocessError`
naming the file and the problem (used by the stages' ``preflight`` hooks)."""

from __future__ import annotations

from cleftwise.postprocess.errors import PostprocessError

__all__ = ["check_checkpoint", "check_neurons", "check_db"]


def _raw(url: str):
    from cleftwise.storage.errors import StorageError
    from cleftwise.storage.volume import open_volume

    try:
        return open_volume(url)
    except StorageError as e:
        raise PostprocessError(f"raw volume {url!r} cannot be opened: {e}") from e


def check_checkpoint(where: str, path: str, raw_url: str) -> None:
    """Checkpoint ``path`` is present, readable and trained at the raw volume's voxel size (nm)."""
    from cleftwise.models.checkpoint import read_checkpoint_meta
    from cleftwise.models.errors import ModelError

    if not path:
        raise PostprocessError(f"{where}: no checkpoint configured ({where}.checkpoint)")
    try:
        meta = read_checkpoint_meta(path)
    except ModelError as e:
        raise PostprocessError(f"{where}.checkpoint {path!r}: {e}") from e
    raw = _raw(raw_url)
    vs = tuple(int(v) for v in raw.voxel_size)
    if tuple(int(v) for v in meta.voxel_size) != vs:
        raise PostprocessError(f"{where}.checkpoint {path} was trained at {tuple(meta.voxel_size)} nm but the "
                               f"raw volume {raw.url} has voxel size {vs} nm")


def check_neurons(url: str, raw_url: str) -> None:
    """Neuron segmentation ``url`` opens and lies on the raw volume's voxel grid."""
    from cleftwise.storage.errors import StorageError
    from cleftwise.storage.volume import check_same_voxel_size, open_volume

    try:
        seg = open_volume(url)
    except StorageError as e:
        raise PostprocessError(f"neuron segmentation {url!r} cannot be opened: {e}") from e
    try:
        check_same_voxel_size([_raw(raw_url), seg])
    except StorageError as e:
        raise PostprocessError(f"neuron segmentation and raw volume: {e}") from e


def check_db(url: str) -> None:
    """A server DB is reachable (an SQLite file is created when first written)."""
    if url.startswith("sqlite"):
        return
    from cleftwise.storage.db import open_store
    from cleftwise.storage.errors import StorageError

    try:
        open_store(url).close()
    except StorageError as e:
        raise PostprocessError(f"synapse DB unreachable: {e}") from e
