"""Map external synapse tables (CAVE, neuPrint/MANC, lab pipelines) to synapse records.

Pure mapping: :func:`map_table` turns a DataFrame into records of the synapse schema
(:data:`cleftwise.storage.db.schema.COLUMNS`); :func:`read_table` reads CSV/Parquet;
:func:`import_tables` writes them to a synapse DB (``SynapseStore.upsert_many``).

A :class:`TableImportConfig` says which table column fills which record **field**:

- neuron ids: ``pre_neuron``, ``post_neuron`` (required; int or uint64, no missing values);
- sites: ``pre_z``/``pre_y``/``pre_x`` and ``post_z``/… as separate columns, or packed columns
  ``pre_position``/``post_position`` holding three numbers in ``packed_order`` (lists, arrays or
  strings such as ``"[314028 159940 77280]"``; a packed column ``c`` that is absent but has split
  columns ``c_x``, ``c_y``, ``c_z`` is read from those);
- centroid: ``z``/``y``/``x`` or packed ``position``; default: midpoint of the pre and post sites;
- bounding box: ``bbox_z0`` … ``bbox_x1`` (half-open); default: the box spanning both sites,
  ``[min(pre, post), max(pre, post) + voxel_size)``;
- anything else of the schema (``size``, ``score_union``, ``ei_prob``, ``ei_label``, ``pre_conf``,
  ``flags``, ``id``, …) directly; ``flag_columns`` turn boolean columns into flag names.

Positions and boxes are in ``units``: ``voxel`` (multiplied by ``voxel_size``, (z, y, x) nm,
no offset) or ``nm``. Records are (z, y, x) nm like everything in cleftwise.

Ids are deterministic from the row content (unless an ``id`` column is mapped):
:func:`synapse_ids` hashes (pre neuron, post neuron, pre site nm, post site nm) into 63 bits
(splitmix64 chain), so importing a table twice — or once in voxels and once in nm — writes the
same ids and the second import replaces records instead of adding them. Two rows with the same
content are duplicate synapses: an error naming both rows (or, with ``on_duplicate="drop"``,
the later row is dropped and logged).

A table column whose name is a record field (``id``, ``size``, ``score_union``, ``ei_prob``,
``flags``, ``source``, …) fills that field unless the mapping fills it from another column
(then it is an error naming both). Every other column the mapping does not use is kept as a
typed **extra field** (int64, uint64, float64, bool or str; :mod:`cleftwise.storage.db.extra_fields`),
stored with the record and returned by queries and exports under its own name
(``keep_extra=False`` drops them, as cleftwise did before).

Presets (:data:`PRESETS`): ``manc`` (neuPrint/MANC exports: ``bodyId_pre``, ``x_pre`` …,
``bbox_xmin`` …, 8 nm voxels), ``cave`` (CAVE synapse tables: ``pre_pt_position``,
``post_pt_position``, ``pre_pt_root_id``, ``post_pt_root_id``, ``size``, optional ``id`` (kept
as the synapse id) and ``ctr_pt_position``; (40, 4, 4) nm voxels, positions stored x, y, z) and
``cleftwise`` (cleftwise's own query exports: the record fields by name, nm). Without a preset
and a mapping the layout is detected (:func:`detect_layout`): from the ``cleftwise`` metadata
cleftwise writes into Parquet files and CSV sidecars (``<file>.meta.json``, which also give
the voxel size and the column dtypes), else from the column names. Example::

    from cleftwise.storage.importers.tables import TableImportConfig, import_tables
    cfg = TableImportConfig(preset="manc")
    import_tables(["synapses_gaba.csv"], "sqlite:////abs/manc.db", cfg)
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from cleftwise.storage.errors import StorageError
from cleftwise.storage.db.schema import COLUMN_NAMES, as_int64_ids, normalize_records
from cleftwise.storage.db.table_layouts import DERIVED, META_KEY, sidecar_path

__all__ = ["FIELDS", "PRESETS", "TablePreset", "TableImportConfig", "resolve_columns", "read_table",
           "map_table", "synapse_ids", "import_tables", "parse_mapping", "config_from_dict",
           "detect_layout"]

log = logging.getLogger(__name__)

_SITE_FIELDS = tuple(f"{s}_{a}" for s in ("pre", "post") for a in "zyx")
_CENTROID_FIELDS = ("z", "y", "x")
_BBOX_FIELDS = tuple(f"bbox_{a}{e}" for e in "01" for a in "zyx")
_PACKED_FIELDS = ("pre_position", "post_position", "position")
#: record fields a table column can fill (schema columns plus packed positions)
FIELDS: tuple[str, ...] = tuple(COLUMN_NAMES) + _PACKED_FIELDS
_SPATIAL = set(_SITE_FIELDS) | set(_CENTROID_FIELDS) | set(_BBOX_FIELDS) | set(_PACKED_FIELDS)


@dataclass(frozen=True)
class TablePreset:
    """A known table layout: which column fills which field."""

    columns: Mapping[str, str]
    """field → column; these must be present"""
    optional: Mapping[str, str] = field(default_factory=dict)
    """field → column; used when present"""
    flag_columns: Mapping[str, str] = field(default_factory=dict)
    """boolean column → flag name written into ``flags`` where true (when the column is present)"""
    voxel_size: tuple = (1.0, 1.0, 1.0)
    """(z, y, x) nm per voxel"""
    units: str = "voxel"
    packed_order: str = "xyz"
    doc: str = ""


PRESETS: dict[str, TablePreset] = {
    "manc": TablePreset(
        columns={"pre_neuron": "bodyId_pre", "post_neuron": "bodyId_post",
                 **{f"{s}_{a}": f"{a}_{s}" for s in ("pre", "post") for a in "zyx"}},
        optional={**{f"bbox_{a}0": f"bbox_{a}min" for a in "zyx"},
                  **{f"bbox_{a}1": f"bbox_{a}max" for a in "zyx"},
                  "ei_label": "neurotransmitter", "score_union": "confidence"},
        flag_columns={"any_out_of_range": "out_of_range"},
        voxel_size=(8.0, 8.0, 8.0),
        doc="neuPrint/MANC synapse exports (bodyId_pre/post, x_pre … z_post, bbox_xmin …; 8 nm voxels)"),
    "cave": TablePreset(
        columns={"pre_neuron": "pre_pt_root_id", "post_neuron": "post_pt_root_id",
                 "pre_position": "pre_pt_position", "post_position": "post_pt_position"},
        optional={"position": "ctr_pt_position", "size": "size", "id": "id"},
        voxel_size=(40.0, 4.0, 4.0),
        doc="CAVE synapse tables (pre/post_pt_position as x, y, z voxels, *_pt_root_id, size, id)"),
    "cleftwise": TablePreset(
        columns={"pre_neuron": "pre_neuron", "post_neuron": "post_neuron", "z": "z", "y": "y", "x": "x"},
        units="nm",
        doc="cleftwise query exports (record fields by name, nm; extra fields kept)"),
}


@dataclass
class TableImportConfig:
    """How to read an external synapse table into synapse records."""

    preset: Optional[str] = None
    """``manc``, ``cave`` or None (only ``columns``)"""
    columns: dict = field(default_factory=dict)
    """field → table column; overrides the preset (see :data:`FIELDS`)"""
    units: Optional[str] = None
    """``voxel`` or ``nm`` for positions and boxes (default: the preset's, else ``voxel``)"""
    voxel_size: Optional[tuple] = None
    """(z, y, x) nm per voxel (default: the preset's, else (1, 1, 1))"""
    packed_order: Optional[str] = None
    """axis order inside packed position columns, a permutation of ``xyz`` (default ``xyz``)"""
    flag_columns: Optional[dict] = None
    """boolean column → flag name (default: the preset's)"""
    source: Optional[str] = None
    """value of the ``source`` field (default: the table's file name without suffix)"""
    on_duplicate: str = "error"
    """``error``: duplicate rows raise; ``drop``: keep the first, log the rest"""
    keep_extra: bool = True
    """keep the columns the mapping does not use as typed extra fields (False: drop them)"""


def parse_mapping(items: Sequence[str], where: str = "--map") -> dict:
    """``["field=column", ...]`` → ``{field: column}`` (CLI helper)."""
    out = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip() or not value.strip():
            raise StorageError(f"{where}: {item!r} is not field=column")
        out[key.strip()] = value.strip()
    return out


def _settings(cfg: TableImportConfig) -> tuple[dict, dict, dict, str, np.ndarray, str]:
    """(required field→col, optional field→col, flag cols, units, voxel size, packed order)."""
    if cfg.preset is not None and cfg.preset not in PRESETS:
        raise StorageError(f"unknown table preset {cfg.preset!r}; choose from {', '.join(PRESETS)}")
    pre = PRESETS.get(cfg.preset) if cfg.preset else None
    unknown = [f for f in cfg.columns if f not in FIELDS]
    if unknown:
        raise StorageError(f"column mapping names unknown fields {unknown}; fields are {', '.join(FIELDS)}")
    required = dict(pre.columns) if pre else {}
    optional = dict(pre.optional) if pre else {}
    for f_, col in cfg.columns.items():
        optional.pop(f_, None)
        required[f_] = str(col)
    # a user-given field replaces the preset's alternatives for the same quantity
    for group in (_SITE_FIELDS[:3], _SITE_FIELDS[3:], _CENTROID_FIELDS):
        side = group[0].rsplit("_", 1)[0] if "_" in group[0] else ""
        packed = f"{side}_position" if side else "position"
        if any(g in cfg.columns for g in group):
            required.pop(packed, None)
            optional.pop(packed, None)
        if packed in cfg.columns:
            for g in group:
                required.pop(g, None)
                optional.pop(g, None)
    units = cfg.units or (pre.units if pre else "voxel")
    if units not in ("voxel", "nm"):
        raise StorageError(f"units must be 'voxel' or 'nm', got {units!r}")
    vs = cfg.voxel_size if cfg.voxel_size is not None else (pre.voxel_size if pre else (1.0, 1.0, 1.0))
    try:
        vs = np.asarray([float(v) for v in vs], dtype=np.float64)
    except (TypeError, ValueError):
        raise StorageError(f"voxel_size must be 3 numbers (z, y, x) nm, got {vs!r}") from None
    if vs.shape != (3,) or not np.all(vs > 0):
        raise StorageError(f"voxel_size must be 3 positive numbers (z, y, x) nm, got {vs.tolist()}")
    order = cfg.packed_order or (pre.packed_order if pre else "xyz")
    if sorted(order) != ["x", "y", "z"]:
        raise StorageError(f"packed_order must be a permutation of 'xyz', got {order!r}")
    flags = dict(cfg.flag_columns if cfg.flag_columns is not None else (pre.flag_columns if pre else {}))
    if cfg.on_duplicate not in ("error", "drop"):
        raise StorageError(f"on_duplicate must be 'error' or 'drop', got {cfg.on_duplicate!r}")
    return required, optional, flags, units, vs, order


def resolve_columns(table: pd.DataFrame, cfg: TableImportConfig, where: str = "table") -> dict:
    """field → column actually used for ``table`` (required ones checked, optional if present)."""
    required, optional, _, _, _, _ = _settings(cfg)
    cols = set(map(str, table.columns))

    def present(field_: str, col: str) -> bool:
        return col in cols or (field_ in _PACKED_FIELDS and all(f"{col}_{a}" in cols for a in "xyz"))

    missing = [f"{col!r} (for {f_})" for f_, col in required.items() if not present(f_, col)]
    if missing:
        raise StorageError(f"{where}: missing columns {', '.join(missing)}; "
                           f"the table has {sorted(cols)}")
    used = dict(required)
    used.update({f_: c for f_, c in optional.items() if present(f_, c) and f_ not in used})
    return used


def read_table(path: str) -> pd.DataFrame:
    """A CSV (``.csv``, ``.tsv``, optionally ``.gz``) or Parquet (``.parquet``, ``.pq``) table.

    What cleftwise stated about a file it wrote (Parquet key-value metadata ``cleftwise``, or a
    CSV's sidecar ``<path>.meta.json``: layout, voxel size, CSV column dtypes) is returned in
    ``table.attrs["cleftwise"]``; a sidecar's dtypes are used to parse the CSV exactly.
    """
    path = os.fspath(path)
    low = path.lower()
    if not os.path.exists(path):
        raise StorageError(f"synapse table {path} not found")
    meta = None
    try:
        if low.endswith((".parquet", ".pq")):
            import pyarrow.parquet as pq

            table = pd.read_parquet(path)
            raw = (pq.read_schema(path).metadata or {}).get(META_KEY)
            meta = _json_meta(raw, path)
        elif low.endswith((".csv", ".csv.gz", ".tsv", ".tsv.gz", ".txt")):
            side = sidecar_path(path)
            if os.path.exists(side):
                with open(side, "rb") as f:
                    meta = _json_meta(f.read(), side)
            dtypes = (meta or {}).get("dtypes") or None
            table = pd.read_csv(path, sep="\t" if ".tsv" in low else ",", dtype=dtypes,
                                keep_default_na=dtypes is None, na_values=[""] if dtypes else None)
        else:
            raise StorageError(f"synapse table {path}: unknown format; use .csv, .tsv or .parquet")
    except (OSError, ValueError, TypeError) as e:
        raise StorageError(f"cannot read synapse table {path}: {e}") from e
    table.attrs = {"cleftwise": meta} if meta else {}
    return table


def _json_meta(raw: Optional[bytes], where: str) -> Optional[dict]:
    if not raw:
        return None
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise StorageError(f"{where}: unreadable cleftwise metadata: {e}") from None
    if not isinstance(meta, dict) or meta.get("writer") != "cleftwise":
        return None
    return meta


def detect_layout(table: pd.DataFrame) -> Optional[str]:
    """The preset fitting ``table``: the layout cleftwise recorded in the file, else ``cleftwise``
    (columns ``pre_neuron``, ``post_neuron``, ``z``, ``y``, ``x``), ``cave`` (``pre_pt_root_id``,
    ``post_pt_root_id``) or ``manc`` (``bodyId_pre``, ``bodyId_post``); None when none fits."""
    meta = table.attrs.get("cleftwise") or {}
    if meta.get("layout") in PRESETS:
        return meta["layout"]
    cols = set(map(str, table.columns))
    for name in ("cleftwise", "cave", "manc"):
        if set(PRESETS[name].columns.values()) <= cols or (
                name == "cave" and {"pre_pt_root_id", "post_pt_root_id"} <= cols):
            return name
    return None


_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _packed(table: pd.DataFrame, col: str, order: str, where: str) -> np.ndarray:
    """(n, 3) float array in (z, y, x) from a packed column (or its split ``_x/_y/_z`` columns)."""
    if col not in table.columns:
        return np.stack([_numeric(table[f"{col}_{a}"], f"{col}_{a}", where) for a in "zyx"], axis=1)
    values = table[col].to_numpy(dtype=object)
    out = np.full((len(values), 3), np.nan)
    for i, v in enumerate(values):
        if isinstance(v, str):
            nums = [float(t) for t in _NUMBER.findall(v)]
        elif v is None or (np.isscalar(v) and pd.isna(v)):
            nums = []
        else:
            try:
                nums = [float(t) for t in np.asarray(v, dtype=np.float64).ravel()]
            except (TypeError, ValueError):
                nums = []
        if len(nums) != 3:
            raise StorageError(f"{where}: column {col!r} row {i}: expected 3 numbers "
                               f"({', '.join(order)}), got {v!r}")
        out[i] = nums
    perm = [order.index(a) for a in "zyx"]
    return out[:, perm]


def _numeric(series: pd.Series, col: str, where: str) -> np.ndarray:
    if series.dtype == bool or not (pd.api.types.is_numeric_dtype(series) or series.dtype == object
                                    or pd.api.types.is_string_dtype(series)):
        raise StorageError(f"{where}: column {col!r} must be numeric, got dtype {series.dtype}")
    vals = pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = np.flatnonzero(series.notna().to_numpy() & np.isnan(vals))
    if bad.size:
        raise StorageError(f"{where}: column {col!r} must be numeric; row {bad[0]} holds "
                           f"{series.iloc[bad[0]]!r}")
    return vals


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def synapse_ids(pre_neuron: np.ndarray, post_neuron: np.ndarray, pre_site: np.ndarray,
                post_site: np.ndarray) -> np.ndarray:
    """Deterministic non-negative 63-bit int64 ids from (pre id, post id, pre site, post site).

    Args:
        pre_neuron, post_neuron: (n,) int64 (or uint64) neuron ids.
        pre_site, post_site: (n, 3) float (z, y, x) nm; NaN allowed (hashed as NaN).

    Returns:
        (n,) int64 in [0, 2**63): a splitmix64 chain over the 64-bit words of each row
        (floats by their IEEE bits, -0.0 folded to 0.0, every NaN to one NaN).
    """
    words = [as_int64_ids(pre_neuron, "pre_neuron").view(np.uint64),
             as_int64_ids(post_neuron, "post_neuron").view(np.uint64)]
    for site in (pre_site, post_site):
        s = np.asarray(site, dtype=np.float64).reshape(-1, 3) + 0.0
        s = np.where(np.isnan(s), np.nan, s)
        words += [np.ascontiguousarray(s[:, k]).view(np.uint64) for k in range(3)]
    with np.errstate(over="ignore"):
        h = np.full(len(words[0]), 0x9E3779B97F4A7C15, dtype=np.uint64)
        for w in words:
            h = _mix64(h ^ w) + np.uint64(0x9E3779B97F4A7C15)
        h = _mix64(h)
    return (h & np.uint64((1 << 63) - 1)).view(np.int64)


def map_table(table: pd.DataFrame, cfg: TableImportConfig = TableImportConfig(),
              where: str = "table", source: Optional[str] = None) -> pd.DataFrame:
    """Synapse records (every schema column, typed) from an external table.

    Args:
        table: the external rows.
        cfg: column mapping, units and preset.
        where: name of the table in error messages (e.g. its path).
        source: value of the ``source`` field when ``cfg.source`` is None.

    Returns:
        DataFrame as :func:`cleftwise.storage.db.schema.normalize_records` returns it, one record per
        row (minus dropped duplicates), centroid/sites/bbox in (z, y, x) nm.

    Raises:
        StorageError: missing columns, non-numeric or missing values, duplicate rows.
    """
    cfg = _effective_config(table, cfg, where)
    used = resolve_columns(table, cfg, where)
    _, _, flag_cols, units, vs, order = _settings(cfg)
    for side in ("pre", "post"):
        if f"{side}_neuron" not in used:
            raise StorageError(f"{where}: no column is mapped to {side}_neuron (the {side}synaptic "
                               f"neuron id); map it or choose a preset ({', '.join(PRESETS)})")
    used, extras = _name_matches_and_extras(table, cfg, used, flag_cols, where)
    scale = vs if units == "voxel" else np.ones(3)
    n = len(table)
    rec: dict[str, Any] = {}

    for side in ("pre", "post"):
        col = used.get(f"{side}_neuron")
        ser = table[col]
        miss = np.flatnonzero(ser.isna().to_numpy())
        if miss.size:
            raise StorageError(f"{where}: column {col!r} ({side} neuron id) is missing in row {miss[0]}")
        if ser.dtype == bool:
            raise StorageError(f"{where}: column {col!r} ({side} neuron id) must hold integers, got bool")
        try:
            rec[f"{side}_neuron"] = as_int64_ids(ser.to_numpy(), f"{where}: column {col!r}")
        except StorageError as e:
            raise StorageError(f"{e} ({side} neuron id)") from None

    def zyx(prefix: str, packed: str) -> Optional[np.ndarray]:
        if packed in used:
            arr = _packed(table, used[packed], order, where)
        elif any(f"{prefix}{a}" in used for a in "zyx"):
            absent = [f"{prefix}{a}" for a in "zyx" if f"{prefix}{a}" not in used]
            if absent:
                raise StorageError(f"{where}: fields {absent} are not mapped (all of z, y, x are needed)")
            arr = np.stack([_numeric(table[used[f"{prefix}{a}"]], used[f"{prefix}{a}"], where)
                            for a in "zyx"], axis=1)
        else:
            return None
        bad = np.flatnonzero(~np.isfinite(arr).all(axis=1))
        if bad.size and prefix and cfg.preset == "cleftwise":  # records may lack their sites
            bad = np.flatnonzero(~np.isfinite(arr).all(axis=1) & ~np.isnan(arr).all(axis=1))
        if bad.size:
            raise StorageError(f"{where}: {packed.replace('_', ' ')} has missing or non-finite values "
                               f"in row {bad[0]}")
        return arr * scale

    pre, post, ctr = zyx("pre_", "pre_position"), zyx("post_", "post_position"), zyx("", "position")
    if ctr is None:
        if pre is None or post is None:
            raise StorageError(f"{where}: no position: map the pre and post sites (pre_z … or "
                               f"pre_position) or the centroid (z, y, x or position)")
        ctr = (pre + post) / 2.0
    nan3 = np.full((n, 3), np.nan)
    for name, arr in (("pre", pre), ("post", post)):
        a = nan3 if arr is None else arr
        for k, ax in enumerate("zyx"):
            rec[f"{name}_{ax}"] = a[:, k]
    for k, ax in enumerate("zyx"):
        rec[ax] = ctr[:, k]

    if any(f in used for f in _BBOX_FIELDS):
        absent = [f for f in _BBOX_FIELDS if f not in used]
        if absent:
            raise StorageError(f"{where}: bounding-box fields {absent} are not mapped (all six are needed)")
        for f_ in _BBOX_FIELDS:
            rec[f_] = _numeric(table[used[f_]], used[f_], where) * scale["zyx".index(f_[5])]
    else:  # the box spanning the sites (or the centroid voxel)
        pts = [p for p in (pre, post, ctr) if p is not None]
        lo, hi = np.fmin.reduce(pts), np.fmax.reduce(pts) + vs
        for k, ax in enumerate("zyx"):
            rec[f"bbox_{ax}0"], rec[f"bbox_{ax}1"] = lo[:, k], hi[:, k]

    for f_, col in used.items():
        if f_ in _SPATIAL or f_ in ("pre_neuron", "post_neuron"):
            continue
        rec[f_] = table[col].to_numpy()

    flags = [[] for _ in range(n)]
    if "flags" in rec:
        flags = [[t for t in str(v).split(",") if t] if isinstance(v, str) else [] for v in rec["flags"]]
    for col, name in flag_cols.items():
        if col not in table.columns:
            continue
        vals = table[col]
        if vals.dtype != bool:
            low = vals.astype(str).str.strip().str.lower()
            if not low.isin(["true", "false", "1", "0", "nan", "none", ""]).all():
                raise StorageError(f"{where}: flag column {col!r} must be boolean")
            vals = low.isin(["true", "1"])
        for i in np.flatnonzero(vals.to_numpy(bool)):
            flags[i].append(name)
    rec["flags"] = [",".join(dict.fromkeys(f)) for f in flags]
    if cfg.source or "source" not in used:  # else the table's own source column
        rec["source"] = cfg.source or source or where

    if "id" not in used:
        pre_h = pre if pre is not None else ctr
        post_h = post if post is not None else ctr
        rec["id"] = synapse_ids(rec["pre_neuron"], rec["post_neuron"], pre_h, post_h)
    frame = pd.DataFrame(rec)
    for col in extras:  # typed as in the table (normalize_records makes them canonical)
        frame[col] = table[col].reset_index(drop=True)
    ids = as_int64_ids(frame["id"].to_numpy(), f"{where}: column {used.get('id', 'id')!r}")
    dup = pd.Series(ids).duplicated(keep="first").to_numpy()
    if dup.any():
        first = {}
        for i, v in enumerate(ids):
            first.setdefault(int(v), i)
        pairs = [(first[int(ids[i])], int(i)) for i in np.flatnonzero(dup)]
        what = "the same id" if "id" in used else "the same pre/post neurons and sites"
        if cfg.on_duplicate == "error":
            raise StorageError(f"{where}: {len(pairs)} duplicate row(s) with {what}, e.g. rows "
                               f"{pairs[0][0]} and {pairs[0][1]} (0-based); remove them or use "
                               f"on_duplicate='drop'")
        log.warning("%s: dropped %d duplicate row(s) with %s (first: row %d duplicates row %d)",
                    where, len(pairs), what, pairs[0][1], pairs[0][0])
        frame = frame.loc[~dup]
    out = normalize_records(frame, extra="keep", where=where)
    out.attrs["id_column"] = used.get("id")  # ids taken from the table (None: hashed)
    return out


def _effective_config(table: pd.DataFrame, cfg: TableImportConfig, where: str) -> TableImportConfig:
    """``cfg`` with the detected preset (no preset and no mapping given) and the voxel size that
    cleftwise recorded in the file (when none is given and the file's layout is the preset)."""
    meta = table.attrs.get("cleftwise") or {}
    if cfg.preset is None and not cfg.columns:
        preset = detect_layout(table)
        if preset is None:
            raise StorageError(f"{where}: cannot tell the table's layout from its columns "
                               f"{sorted(map(str, table.columns))[:12]}; choose a preset "
                               f"({', '.join(PRESETS)}) or map the columns (pre_neuron=…, "
                               f"post_neuron=…, positions)")
        log.info("%s: detected the %s layout", where, preset)
        cfg = replace(cfg, preset=preset)
    if cfg.voxel_size is None and meta.get("layout") == cfg.preset and meta.get("voxel_size_zyx_nm"):
        cfg = replace(cfg, voxel_size=tuple(meta["voxel_size_zyx_nm"]))
    return cfg


def _name_matches_and_extras(table: pd.DataFrame, cfg: TableImportConfig, used: dict,
                             flag_cols: dict, where: str) -> tuple[dict, list]:
    """(``used`` plus columns named like unmapped record fields, the extra columns to keep)."""
    used = dict(used)
    taken = set(used.values())
    for f_ in _PACKED_FIELDS:  # split columns read for a packed field
        if f_ in used and used[f_] not in table.columns:
            taken |= {f"{used[f_]}_{a}" for a in "xyz"}
    taken |= {c for c in flag_cols if c in table.columns}
    packed_of = {**{f: "pre_position" for f in _SITE_FIELDS[:3]},
                 **{f: "post_position" for f in _SITE_FIELDS[3:]},
                 **{f: "position" for f in _CENTROID_FIELDS}}
    for col in map(str, table.columns):
        if col in taken or col not in COLUMN_NAMES:
            continue
        other = used.get(col) or used.get(packed_of.get(col, ""))
        if other is not None:
            raise StorageError(f"{where}: column {col!r} has the name of the record field {col!r}, "
                               f"which is filled from column {other!r}; rename or drop one of them")
        used[col] = col
        taken.add(col)
    meta = table.attrs.get("cleftwise") or {}
    derived = set(DERIVED.get(meta.get("layout"), ())) if meta.get("layout") == cfg.preset else set()
    rest = [c for c in table.columns if c not in taken and c not in derived]
    if rest and not cfg.keep_extra:
        log.info("%s: dropped unmapped columns %s", where, rest)
        return used, []
    bad = [c for c in rest if not isinstance(c, str)]
    if bad:
        raise StorageError(f"{where}: column names {bad[:5]} are not strings")
    return used, rest


def import_tables(paths: Sequence[str], url: str, cfg: TableImportConfig = TableImportConfig(),
                  **store_opts) -> dict:
    """Read, map and upsert each table into the synapse DB at ``url``; returns {path: records}.

    All tables are mapped before anything is written, so a bad table leaves the DB untouched.
    Re-importing writes the same ids (records are replaced, the count does not grow). Ids taken
    from a table (CAVE ``id``, a cleftwise export) that the database already holds for records
    of another ``source`` are an error (two tables numbered 1, 2, … would overwrite each other).
    """
    from cleftwise.storage.db import open_store

    frames = []
    for path in paths:
        stem = os.path.basename(os.fspath(path))
        for suffix in (".gz", ".csv", ".tsv", ".txt", ".parquet", ".pq"):
            stem = stem[: -len(suffix)] if stem.lower().endswith(suffix) else stem
        frames.append((path, map_table(read_table(path), cfg, where=os.fspath(path), source=stem)))
    counts = {}
    with open_store(url, **store_opts) as store:
        for path, frame in frames:
            if frame.attrs.get("id_column"):  # hashed ids name the content: replacing is right
                _check_id_owners(store, frame, os.fspath(path))
        for path, frame in frames:
            counts[os.fspath(path)] = store.upsert_many(frame, extra="keep")
    return counts


def _check_id_owners(store, frame: pd.DataFrame, where: str) -> None:
    """Raise when stored records with the frame's ids came from another source."""
    if not len(frame):
        return
    old = store.get(frame["id"].to_numpy(), columns=["source"])
    if not len(old):
        return
    new = frame.set_index("id")["source"].astype(object)
    mine = new.reindex(old["id"].to_numpy()).to_numpy()
    theirs = old["source"].astype(object).to_numpy()
    clash = np.flatnonzero([not (a == b or (pd.isna(a) and pd.isna(b))) for a, b in zip(mine, theirs)])
    if clash.size:
        k = clash[0]
        raise StorageError(f"{where}: {clash.size} id(s) already belong to records of another source, "
                           f"e.g. id {int(old['id'].iloc[k])} from {theirs[k]!r} (this table: "
                           f"{mine[k]!r}); tables numbered alike would overwrite each other: import "
                           f"into another database, or give --source {theirs[k]} to replace them")


def config_from_dict(data: Optional[dict]) -> TableImportConfig:
    """Build a :class:`TableImportConfig` from a mapping (YAML), strictly checked."""
    from cleftwise.storage.config_io import from_dict

    return from_dict(TableImportConfig, data, where="table_import")

