"""Chunked volumes through TensorStore, addressed in world coordinates (nm).

Formats: zarr v2 (default), zarr v3, N5 and neuroglancer precomputed. A volume is named by a
URL or path:

- ``/abs/path/out.zarr/raw`` or ``out.zarr/raw``: local; the format follows the suffix of the
  container (``.zarr`` → zarr v2 on create, v2 or v3 detected on open; ``.n5`` → N5); a folder
  holding an ``info`` file is neuroglancer precomputed.
- ``zarr://``, ``zarr3://``, ``n5://``, ``precomputed://`` prefixes force the format; what
  follows is a local path or any TensorStore kvstore URL (``gs://bucket/x``, ``s3://…``,
  ``file:///abs``), passed to TensorStore unchanged.

Every volume has a spatial axis order (z, y, x), optionally preceded by one channel axis
(c, z, y, x), a voxel size (nm), an offset (nm, a multiple of the voxel size), axis names, a
dtype and a chunk shape. On zarr the metadata is written as the attributes ``voxel_size``,
``offset``, ``axis_names``, ``units`` and ``types`` (the funlib.persistence layout), so
``funlib.persistence.open_ds`` and ``zarr.open`` see the same array, voxel size and offset.
N5 and precomputed store their axes as (x, y, z[, c]) as their viewers expect; this module
presents them as (c, z, y, x) too.

Missing chunks: a chunk that was never written (or whose file was deleted) is an error on read
from a read-only handle (:class:`StorageError` naming the volume, the ROI and the chunk), not
zeros; ``open_volume(url, missing="zeros")`` reads such chunks as zeros for a volume that is
sparse on purpose. Handles that write (``create_volume``, ``mode="r+"``) read unwritten chunks
as zeros and store every chunk they write, zeros included, so a finished volume has no gaps.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import tensorstore as ts
from funlib.geometry import Coordinate, Roi

from cleftwise.storage.errors import StorageError

__all__ = ["Volume", "create_volume", "open_volume", "parse_volume_url", "VolumeURL"]

log = logging.getLogger(__name__)

_FORMATS = ("zarr", "zarr3", "n5", "precomputed")
_PREFIX = {"zarr://": "zarr", "zarr3://": "zarr3", "n5://": "n5", "precomputed://": "precomputed"}
_REMOTE = ("gs://", "s3://", "http://", "https://", "memory://", "file://")
_MISSING = ("error", "zeros")


@dataclass(frozen=True)
class VolumeURL:
    """A parsed volume location: format (or None = infer) and TensorStore kvstore spec."""

    format: Optional[str]
    kvstore: Any  # dict spec for local files, URL string otherwise
    local_path: Optional[str]  # absolute path for local volumes, else None
    url: str

    def child_kvstore(self, suffix: str) -> Any:
        """The kvstore spec of ``suffix`` appended to this location (for metadata files)."""
        if isinstance(self.kvstore, dict):
            return {"driver": "file", "path": os.path.join(self.kvstore["path"], suffix)}
        return self.kvstore.rstrip("/") + "/" + suffix


def parse_volume_url(url: str, fmt: Optional[str] = None) -> VolumeURL:
    """Split a volume URL/path into format and kvstore (see the module docstring)."""
    if not isinstance(url, (str, os.PathLike)) or str(url) == "":
        raise StorageError(f"volume path must be a non-empty string, got {url!r}")
    url = str(url)
    rest = url
    for prefix, name in _PREFIX.items():
        if url.startswith(prefix):
            rest = url[len(prefix):]
            if fmt is not None and fmt != name:
                raise StorageError(f"{url}: format {fmt!r} contradicts the URL prefix {prefix!r}")
            fmt = name
            break
    if fmt is not None and fmt not in _FORMATS:
        raise StorageError(f"{url}: unknown volume format {fmt!r}; use one of {_FORMATS}")
    if rest.startswith("file://"):
        rest = rest[len("file://"):]
    if rest.startswith(_REMOTE):
        return VolumeURL(fmt, rest, None, url)
    path = os.path.abspath(os.path.expanduser(rest))
    return VolumeURL(fmt, {"driver": "file", "path": path}, path, url)


def _container_root(path: str) -> Optional[str]:
    """The ``*.zarr``/``*.n5`` folder containing ``path`` (or None)."""
    parts = path.split(os.sep)
    for i in range(len(parts), 0, -1):
        if parts[i - 1].endswith((".zarr", ".n5", ".zarr3")):
            return os.sep.join(parts[:i])
    return None


def _infer_format_local(path: str, creating: bool) -> str:
    if not creating:
        if os.path.exists(os.path.join(path, ".zarray")):
            return "zarr"
        if os.path.exists(os.path.join(path, "zarr.json")):
            return "zarr3"
        if os.path.exists(os.path.join(path, "attributes.json")):
            return "n5"
        if os.path.exists(os.path.join(path, "info")):
            return "precomputed"
    root = _container_root(path)
    if root is not None and root.endswith(".n5"):
        return "n5"
    if root is not None and root.endswith(".zarr3"):
        return "zarr3"
    if root is not None:
        return "zarr"
    if creating:
        raise StorageError(
            f"{path}: cannot infer the volume format; put the dataset inside a .zarr/.n5 "
            "container or prefix the URL with zarr://, zarr3://, n5:// or precomputed://"
        )
    raise StorageError(f"{path}: no volume found (no .zarray, zarr.json, attributes.json or info)")


def _kv_read_json(kvstore: Any) -> Optional[dict]:
    try:
        res = ts.KvStore.open(kvstore).result().read("").result()
    except Exception:
        return None
    if res.state != "value":
        return None
    try:
        return json.loads(bytes(res.value).decode())
    except ValueError as e:
        raise StorageError(f"{kvstore}: metadata file is not valid JSON ({e})") from e


def _kv_write_json(kvstore: Any, obj: dict) -> None:
    ts.KvStore.open(kvstore).result().write("", json.dumps(obj, indent=1).encode()).result()


def _remote_format(loc: VolumeURL) -> str:
    for name, fname in (("zarr", ".zarray"), ("zarr3", "zarr.json"), ("n5", "attributes.json"),
                        ("precomputed", "info")):
        if _kv_read_json(loc.child_kvstore(fname)) is not None:
            return name
    raise StorageError(f"{loc.url}: no volume found (no .zarray, zarr.json, attributes.json or info)")


def _as_coord(value: Sequence[int] | int, name: str, url: str, n: int = 3) -> Coordinate:
    if isinstance(value, (int, np.integer)):
        value = (int(value),) * n
    try:
        c = Coordinate(tuple(int(v) for v in value))
        if any(float(v) != int(v) for v in value):
            raise ValueError
    except (TypeError, ValueError) as e:
        raise StorageError(f"{url}: {name} must be {n} integers (z, y, x), got {value!r}") from e
    if len(c) != n:
        raise StorageError(f"{url}: {name} must have {n} values (z, y, x), got {tuple(value)}")
    return c


class Volume:
    """An open chunked volume: TensorStore handle plus world-coordinate geometry.

    Arrays are (z, y, x) or (c, z, y, x); ROIs are ``funlib.geometry.Roi`` in nm over the spatial
    axes only.
    """

    def __init__(self, store: ts.TensorStore, loc: VolumeURL, fmt: str, voxel_size: Coordinate,
                 offset: Coordinate, axis_names: list[str], num_channels: Optional[int],
                 attrs: dict, mode: str, missing: str = "zeros"):
        self._store = store
        self.loc = loc
        self.url = loc.url
        self.format = fmt
        self.voxel_size = voxel_size
        self.offset = offset
        self.axis_names = axis_names
        self.num_channels = num_channels
        self._attrs = attrs
        self.mode = mode
        self.missing = missing  # "error": unwritten chunks raise on read; "zeros": read as zeros

    # -- geometry -----------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        """Full array shape in voxels, channel axis included."""
        return tuple(int(s) for s in self._store.shape)

    @property
    def spatial_shape(self) -> Coordinate:
        return Coordinate(self.shape[-3:])

    @property
    def roi(self) -> Roi:
        """Spatial extent in nm."""
        return Roi(self.offset, self.spatial_shape * self.voxel_size)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self._store.dtype.numpy_dtype)

    @property
    def chunk_shape(self) -> Coordinate:
        """Spatial write-chunk shape in voxels."""
        return Coordinate(tuple(int(c) for c in self._store.chunk_layout.write_chunk.shape[-3:]))

    @property
    def store(self) -> ts.TensorStore:
        """The underlying TensorStore view, axes (c?, z, y, x), origin 0."""
        return self._store

    @property
    def attrs(self) -> dict:
        return dict(self._attrs)

    @property
    def channel_names(self) -> Optional[list]:
        """Names of the channels of a (c, z, y, x) array (attribute ``channels``), or None."""
        names = self._attrs.get("channels")
        if self.num_channels is None or not isinstance(names, list) or len(names) != self.num_channels:
            return None
        return [str(n) for n in names]

    def channel_index(self, name: str, default_names: Optional[Sequence[str]] = None) -> int:
        """Index of channel ``name``; ``default_names`` stands in for an array without channel
        names (e.g. written by another tool). Raises :class:`StorageError` naming the array."""
        names = self.channel_names or (list(default_names) if default_names is not None and
                                       self.num_channels == len(default_names) else None)
        if names is None:
            raise StorageError(f"{self.url}: the array has no channel names (attribute 'channels'), "
                               f"so channel {name!r} cannot be found; shape {self.shape}")
        if name not in names:
            raise StorageError(f"{self.url}: no channel named {name!r}; its channels are {names}")
        return names.index(name)

    def __repr__(self) -> str:
        return (f"Volume({self.url!r}, format={self.format}, shape={self.shape}, "
                f"dtype={self.dtype}, voxel_size={tuple(self.voxel_size)}, "
                f"offset={tuple(self.offset)})")

    # -- ROI maths ----------------------------------------------------------------------
    def _check_roi(self, roi: Roi) -> Roi:
        if not isinstance(roi, Roi):
            try:
                roi = Roi(*roi)
            except Exception as e:
                raise StorageError(f"{self.url}: ROI must be a funlib Roi, got {roi!r}") from e
        if roi.dims != 3:
            raise StorageError(f"{self.url}: ROI must be 3D (z, y, x) in nm, got {roi}")
        if roi.unbounded:
            raise StorageError(f"{self.url}: ROI {roi} is unbounded")
        if not (roi.begin % self.voxel_size == Coordinate(0, 0, 0)
                and roi.shape % self.voxel_size == Coordinate(0, 0, 0)):
            raise StorageError(
                f"{self.url}: ROI {roi} is not aligned to the voxel size "
                f"{tuple(self.voxel_size)} nm (begin and shape must be multiples of it; "
                f"volume offset {tuple(self.offset)} nm)")
        if not ((roi.begin - self.offset) % self.voxel_size == Coordinate(0, 0, 0)):
            raise StorageError(f"{self.url}: ROI {roi} is not on this volume's voxel grid")
        return roi

    def _to_voxels(self, roi: Roi) -> tuple[slice, ...]:
        begin = (roi.begin - self.offset) / self.voxel_size
        end = begin + roi.shape / self.voxel_size
        return tuple(slice(int(b), int(e)) for b, e in zip(begin, end))

    # -- I/O ---------------------------------------------------------------------------
    def read(self, roi: Optional[Roi] = None, fill_outside: bool = False) -> np.ndarray:
        """Read ``roi`` (nm, voxel-aligned) as a numpy array (c?, z, y, x).

        Parts of ``roi`` outside the volume are zeros when ``fill_outside``; otherwise a ROI not
        contained in the volume raises :class:`StorageError`.
        """
        roi = self.roi if roi is None else self._check_roi(roi)
        if self.roi.contains(roi):
            return self._read_inside(roi)
        if not fill_outside:
            raise StorageError(
                f"{self.url}: ROI {roi} reaches outside the volume {self.roi} "
                "(pass fill_outside=True to read zeros there)")
        lead = self.shape[:-3]
        out = np.zeros(lead + tuple(roi.shape / self.voxel_size), dtype=self.dtype)
        inter = roi.intersect(self.roi)
        if not inter.empty:
            sl = tuple(slice(None) for _ in lead) + tuple(
                slice(int(b), int(b + s)) for b, s in
                zip((inter.begin - roi.begin) / self.voxel_size, inter.shape / self.voxel_size))
            out[sl] = self._read_inside(inter)
        return out

    def read_async(self, roi: Roi) -> "ReadFuture":
        """Start reading ``roi`` (inside the volume) without blocking; ``.result()`` gives the array."""
        roi = self._check_roi(roi)
        if not self.roi.contains(roi):
            raise StorageError(f"{self.url}: ROI {roi} reaches outside the volume {self.roi}")
        idx = (Ellipsis,) + self._to_voxels(roi)
        return ReadFuture(self._store[idx].read(), self.url, roi)

    def _read_inside(self, roi: Roi) -> np.ndarray:
        idx = (Ellipsis,) + self._to_voxels(roi)
        try:
            return self._store[idx].read().result()
        except Exception as e:  # corrupt or missing chunk, vanished file, permission…
            raise _read_error(self.url, roi, e) from e

    def write(self, roi: Roi, data: np.ndarray) -> None:
        """Write ``data`` (c?, z, y, x) into ``roi`` (nm); dtype and shape must match exactly."""
        if self.mode == "r":
            raise StorageError(f"{self.url}: volume was opened read-only (mode='r')")
        roi = self._check_roi(roi)
        if not self.roi.contains(roi):
            raise StorageError(f"{self.url}: write ROI {roi} is outside the volume {self.roi}")
        data = np.asarray(data)
        if data.dtype != self.dtype:
            raise StorageError(
                f"{self.url}: dtype mismatch on write: volume is {self.dtype}, data is {data.dtype}")
        expected = self.shape[:-3] + tuple(roi.shape / self.voxel_size)
        if data.shape != expected:
            raise StorageError(
                f"{self.url}: shape mismatch on write to {roi}: expected {expected}, got {data.shape}")
        idx = (Ellipsis,) + self._to_voxels(roi)
        try:
            self._store[idx].write(data).result()
        except Exception as e:
            raise StorageError(f"{self.url}: writing ROI {roi} failed: {e}") from e

    def set_attrs(self, extra: dict) -> None:
        """Merge user attributes into the volume's metadata (all formats)."""
        self._attrs.update(extra)
        _write_attrs(self.loc, self.format, self._attrs)


class ReadFuture:
    """A pending TensorStore read; ``result()`` returns the array or raises StorageError."""

    def __init__(self, future, url: str, roi: Roi):
        self._future, self._url, self._roi = future, url, roi

    def result(self) -> np.ndarray:
        try:
            return self._future.result()
        except Exception as e:
            raise _read_error(self._url, self._roi, e) from e


def _read_error(url: str, roi: Roi, e: Exception) -> StorageError:
    """The StorageError of a failed read of ``roi``; a missing chunk says so and how to opt in."""
    msg = str(e)
    if msg.startswith("NOT_FOUND") and "missing" in msg:
        return StorageError(
            f"{url}: reading ROI {roi} failed: a chunk was never written or was deleted "
            f"({msg.split(': ', 1)[-1]}); if the volume is sparse on purpose, open it with "
            "missing='zeros' (pipeline setting missing_chunks: zeros)")
    return StorageError(f"{url}: reading ROI {roi} failed: {msg}")


# -- metadata helpers ---------------------------------------------------------------------

def _geometry_attrs(voxel_size: Coordinate, offset: Coordinate, axis_names: list[str],
                    num_channels: Optional[int]) -> dict:
    types = (["channel"] if num_channels is not None else []) + ["space"] * 3
    return {
        "voxel_size": list(map(int, voxel_size)),
        "offset": list(map(int, offset)),
        "axis_names": list(axis_names),
        "units": ["nm"] * 3,
        "types": types,
    }


def _write_attrs(loc: VolumeURL, fmt: str, attrs: dict) -> None:
    if fmt == "zarr":
        _kv_write_json(loc.child_kvstore(".zattrs"), attrs)
    elif fmt == "zarr3":
        meta = _kv_read_json(loc.child_kvstore("zarr.json")) or {}
        meta["attributes"] = attrs
        _kv_write_json(loc.child_kvstore("zarr.json"), meta)
    elif fmt == "n5":
        # TensorStore parses "units"/"resolution" itself (full rank, x y z [c] order), so our
        # geometry lives under a "cleftwise" key; "resolution" follows the n5-viewer convention.
        meta = _kv_read_json(loc.child_kvstore("attributes.json")) or {}
        meta["cleftwise"] = attrs
        channel = [1] if attrs.get("types", [""])[0] == "channel" else []
        meta["resolution"] = list(reversed(attrs["voxel_size"])) + channel
        meta["offset_xyz_nm"] = list(reversed(attrs["offset"]))
        _kv_write_json(loc.child_kvstore("attributes.json"), meta)
    elif fmt == "precomputed":
        _kv_write_json(loc.child_kvstore("cleftwise.json"), attrs)


def _read_attrs(loc: VolumeURL, fmt: str) -> dict:
    if fmt == "zarr":
        return _kv_read_json(loc.child_kvstore(".zattrs")) or {}
    if fmt == "zarr3":
        return (_kv_read_json(loc.child_kvstore("zarr.json")) or {}).get("attributes", {}) or {}
    if fmt == "n5":
        meta = _kv_read_json(loc.child_kvstore("attributes.json")) or {}
        if "cleftwise" in meta:
            return dict(meta["cleftwise"])
        if "resolution" in meta:
            return {"voxel_size": list(reversed(meta["resolution"][:3]))}
        return {}
    return _kv_read_json(loc.child_kvstore("cleftwise.json")) or {}


def _write_parent_groups(loc: VolumeURL, fmt: str) -> None:
    """Write group metadata for the folders between the container and the dataset."""
    if loc.local_path is None or fmt not in ("zarr", "zarr3", "n5"):
        return
    root = _container_root(loc.local_path)
    if root is None:
        return
    d = os.path.dirname(loc.local_path)
    dirs = []
    while len(d) >= len(root):
        dirs.append(d)
        d = os.path.dirname(d)
    for d in dirs:
        os.makedirs(d, exist_ok=True)
        if fmt == "zarr":
            f, content = os.path.join(d, ".zgroup"), {"zarr_format": 2}
        elif fmt == "zarr3":
            f, content = os.path.join(d, "zarr.json"), {"zarr_format": 3, "node_type": "group",
                                                        "attributes": {}}
        else:
            f, content = os.path.join(d, "attributes.json"), {"n5": "2.0.0"}
        if not os.path.exists(f):
            with open(f, "w") as fh:
                json.dump(content, fh)


def _ts_dtype_zarr2(dtype: np.dtype) -> str:
    return dtype.str if dtype.itemsize > 1 else "|" + dtype.str[1:]


# -- public constructors -------------------------------------------------------------------

def create_volume(
    url: str,
    shape: Sequence[int],
    voxel_size: Sequence[int],
    offset: Sequence[int] = (0, 0, 0),
    dtype: Any = "uint8",
    chunk_shape: Optional[Sequence[int]] = None,
    num_channels: Optional[int] = None,
    format: Optional[str] = None,
    overwrite: bool = False,
    axis_names: Optional[Sequence[str]] = None,
    attrs: Optional[dict] = None,
    compression: str = "zstd",
) -> Volume:
    """Create a chunked volume and return it opened read-write.

    Args:
        url: volume path or URL (see module docstring).
        shape: spatial shape in voxels (z, y, x).
        voxel_size: nm per voxel (z, y, x).
        offset: world offset in nm (z, y, x); must be a multiple of ``voxel_size``.
        dtype: numpy dtype of the voxels.
        chunk_shape: spatial chunk shape in voxels (default: min(shape, (32, 256, 256))).
        num_channels: if given, the array is (c, z, y, x) with all channels in one chunk.
        format: "zarr" (v2), "zarr3", "n5" or "precomputed"; inferred when None.
        overwrite: delete an existing dataset at ``url`` first; otherwise an existing one raises.
        axis_names: defaults to ["c^", "z", "y", "x"] / ["z", "y", "x"].
        attrs: extra user attributes stored with the metadata.
        compression: "zstd" (zarr v2: blosc zstd level 3 with byte shuffle, but plain zstd
            level 3 for multi-byte integer dtypes, where shuffle and blosc cost time and space),
            "gzip" or "raw".
    """
    loc = parse_volume_url(url, format)
    shape = _as_coord(shape, "shape", url)
    voxel_size = _as_coord(voxel_size, "voxel_size", url)
    offset = _as_coord(offset, "offset", url)
    if any(v <= 0 for v in voxel_size):
        raise StorageError(f"{url}: voxel_size must be positive, got {tuple(voxel_size)}")
    if any(s <= 0 for s in shape):
        raise StorageError(f"{url}: shape must be positive, got {tuple(shape)}")
    if offset % voxel_size != Coordinate(0, 0, 0):
        raise StorageError(
            f"{url}: offset {tuple(offset)} nm is not a multiple of voxel size {tuple(voxel_size)} nm")
    if chunk_shape is None:
        chunk_shape = Coordinate(min(s, c) for s, c in zip(shape, (32, 256, 256)))
    chunk_shape = _as_coord(chunk_shape, "chunk_shape", url)
    if any(c <= 0 for c in chunk_shape):
        raise StorageError(f"{url}: chunk_shape must be positive, got {tuple(chunk_shape)}")
    try:
        dtype = np.dtype(dtype)
    except TypeError as e:
        raise StorageError(f"{url}: unknown dtype {dtype!r}") from e
    if num_channels is not None and (int(num_channels) < 1):
        raise StorageError(f"{url}: num_channels must be >= 1, got {num_channels}")
    fmt = loc.format
    if fmt is None:
        fmt = _infer_format_local(loc.local_path, creating=True) if loc.local_path else "zarr"
    if axis_names is None:
        axis_names = (["c^"] if num_channels is not None else []) + ["z", "y", "x"]
    axis_names = list(axis_names)
    if len(axis_names) != 3 + (num_channels is not None):
        raise StorageError(f"{url}: axis_names {axis_names} do not match the array's dimensions")

    exists = _exists(loc)
    if exists and not overwrite:
        raise StorageError(f"{url}: a dataset exists already (pass overwrite=True to replace it)")
    if exists and overwrite and loc.local_path is not None:
        shutil.rmtree(loc.local_path, ignore_errors=True)
    _write_parent_groups(loc, fmt)

    full_shape = ([int(num_channels)] if num_channels is not None else []) + list(shape)
    full_chunks = ([int(num_channels)] if num_channels is not None else []) + list(chunk_shape)
    # every written chunk is stored, all-zero ones included, so that a missing chunk always
    # means "never written" (an error on read-only opens, see open_volume)
    spec: dict[str, Any] = {"kvstore": loc.kvstore, "store_data_equal_to_fill_value": True}
    if fmt == "zarr":
        # Byte shuffle helps floats but not integer labels. On uint64 synapse and neuron label
        # blocks (64 x 256 x 256) plain zstd wrote ~25 % faster than blosc-zstd without shuffle
        # (which was 35 % faster and 2-3x smaller than with it) and the files are as small.
        labels = dtype.kind in "iu" and dtype.itemsize > 1
        zstd = {"id": "zstd", "level": 3} if labels else \
            {"id": "blosc", "cname": "zstd", "clevel": 3, "shuffle": 1}
        comp = {"zstd": zstd, "gzip": {"id": "zlib", "level": 5}, "raw": None}[compression]
        spec.update(driver="zarr", metadata={
            "shape": full_shape, "chunks": full_chunks, "dtype": _ts_dtype_zarr2(dtype),
            "compressor": comp, "fill_value": 0, "order": "C"})
    elif fmt == "zarr3":
        codecs = [{"name": "bytes", "configuration": {"endian": "little"}}]
        if compression == "zstd":
            codecs.append({"name": "zstd", "configuration": {"level": 3}})
        elif compression == "gzip":
            codecs.append({"name": "gzip", "configuration": {"level": 5}})
        spec.update(driver="zarr3", metadata={
            "shape": full_shape, "data_type": dtype.name, "fill_value": 0,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": full_chunks}},
            "codecs": codecs,
            "dimension_names": [a.rstrip("^") for a in axis_names]})
    elif fmt == "n5":
        comp = {"zstd": {"type": "gzip"}, "gzip": {"type": "gzip"}, "raw": {"type": "raw"}}
        spec.update(driver="n5", metadata={
            "dimensions": list(reversed(full_shape)), "blockSize": list(reversed(full_chunks)),
            "dataType": dtype.name, "compression": comp[compression]})
    else:  # precomputed: axes x, y, z, channel
        spec.update(driver="neuroglancer_precomputed",
                    multiscale_metadata={"type": "segmentation" if dtype.kind == "u" and dtype.itemsize >= 4
                                         else "image",
                                         "data_type": dtype.name, "num_channels": int(num_channels or 1)},
                    scale_metadata={"resolution": [float(v) for v in reversed(voxel_size)],
                                    "size": list(reversed(list(shape))),
                                    "voxel_offset": [int(v) for v in reversed(offset / voxel_size)],
                                    "chunk_size": list(reversed(list(chunk_shape))),
                                    "encoding": "raw"})
    try:
        raw = ts.open(spec, create=True, delete_existing=bool(exists and overwrite)).result()
    except Exception as e:
        raise StorageError(f"{url}: could not create {fmt} volume: {e}") from e
    geometry = _geometry_attrs(voxel_size, offset, axis_names, num_channels)
    all_attrs = dict(attrs or {})
    all_attrs.update(geometry)
    _write_attrs(loc, fmt, all_attrs)
    store = _present(raw, fmt, num_channels)
    return Volume(store, loc, fmt, voxel_size, offset, axis_names, num_channels, all_attrs, "r+")


def _exists(loc: VolumeURL) -> bool:
    if loc.local_path is not None:
        p = loc.local_path
        return any(os.path.exists(os.path.join(p, f))
                   for f in (".zarray", "zarr.json", "attributes.json", "info"))
    try:
        _remote_format(loc)
        return True
    except StorageError:
        return False


def _present(raw: ts.TensorStore, fmt: str, num_channels: Optional[int]) -> ts.TensorStore:
    """Reorder axes to (c?, z, y, x) with origin 0."""
    if fmt == "n5":
        store = raw.T
    elif fmt == "precomputed":
        store = raw[ts.d["channel", "z", "y", "x"].transpose[0, 1, 2, 3]]
        if num_channels is None:
            store = store[0]
    else:
        store = raw
    return store.translate_to[(0,) * store.rank]


def open_volume(url: str, mode: str = "r", format: Optional[str] = None,
                missing: Optional[str] = None) -> Volume:
    """Open an existing volume; ``mode`` is "r" (read-only) or "r+" (read-write).

    ``missing`` says what a read of a chunk that was never written (or was deleted) gives:
    "error" (:class:`StorageError` naming the volume and the ROI) or "zeros" (the fill value,
    for a volume that is sparse on purpose). Default: "error" with ``mode="r"``, "zeros" with
    ``mode="r+"`` (a volume being written reads its unwritten blocks as zeros).

    Raises :class:`StorageError` naming the path when the dataset is missing or its metadata
    is inconsistent.
    """
    if mode not in ("r", "r+"):
        raise StorageError(f"{url}: mode must be 'r' or 'r+', got {mode!r}")
    if missing is None:
        missing = "error" if mode == "r" else "zeros"
    if missing not in _MISSING:
        raise StorageError(f"{url}: missing must be 'error' or 'zeros', got {missing!r}")
    loc = parse_volume_url(url, format)
    fmt = loc.format
    if fmt is None:
        if loc.local_path is not None:
            if not os.path.exists(loc.local_path):
                root = _container_root(loc.local_path)
                if root and os.path.exists(root):
                    raise StorageError(
                        f"{url}: dataset {os.path.relpath(loc.local_path, root)!r} not found in "
                        f"container {root}")
                raise StorageError(f"{url}: no such volume (path does not exist)")
            fmt = _infer_format_local(loc.local_path, creating=False)
        else:
            fmt = _remote_format(loc)
    driver = {"zarr": "zarr", "zarr3": "zarr3", "n5": "n5",
              "precomputed": "neuroglancer_precomputed"}[fmt]
    try:
        spec = {"driver": driver, "kvstore": loc.kvstore,
                "fill_missing_data_reads": missing == "zeros"}
        if mode == "r+":
            spec["store_data_equal_to_fill_value"] = True
        raw = ts.open(spec, open=True, read=True, write=(mode == "r+")).result()
    except Exception as e:
        raise StorageError(f"{url}: could not open {fmt} volume: {e}") from e
    attrs = _read_attrs(loc, fmt)
    if fmt == "precomputed":
        info = _kv_read_json(loc.child_kvstore("info")) or {}
        scale = info["scales"][0]
        nch = int(info.get("num_channels", 1))
        has_channel_axis = attrs.get("types", ["space"])[0] == "channel" or nch > 1
        num_channels = nch if has_channel_axis else None
        voxel_size = Coordinate(int(round(v)) for v in reversed(scale["resolution"]))
        offset = Coordinate(int(o) for o in reversed(scale.get("voxel_offset", [0, 0, 0]))) * voxel_size
    else:
        rank = raw.rank
        if rank not in (3, 4):
            raise StorageError(f"{url}: expected a 3D (z, y, x) or 4D (c, z, y, x) array, got rank {rank}")
        num_channels = int(raw.shape[-1] if fmt == "n5" else raw.shape[0]) if rank == 4 else None
        if "voxel_size" in attrs:
            voxel_size = Coordinate(attrs["voxel_size"])
        else:
            voxel_size = Coordinate(1, 1, 1)
        offset = Coordinate(attrs.get("offset", [0] * 3))
        if len(voxel_size) != 3 or len(offset) != 3:
            raise StorageError(f"{url}: voxel_size {tuple(voxel_size)} / offset {tuple(offset)} "
                               "must have 3 values (z, y, x)")
    axis_names = attrs.get("axis_names") or (["c^"] if num_channels else []) + ["z", "y", "x"]
    store = _present(raw, fmt, num_channels)
    return Volume(store, loc, fmt, voxel_size, offset, list(axis_names), num_channels, attrs, mode,
                  missing)


def check_same_voxel_size(volumes: Sequence[Volume]) -> Coordinate:
    """Return the common voxel size or raise naming the volumes that disagree."""
    if not volumes:
        raise StorageError("no volumes given")
    ref = volumes[0]
    for v in volumes[1:]:
        if v.voxel_size != ref.voxel_size:
            raise StorageError(
                f"voxel size mismatch: {ref.url} has {tuple(ref.voxel_size)} nm but "
                f"{v.url} has {tuple(v.voxel_size)} nm")
    return ref.voxel_size
