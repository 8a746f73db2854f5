"""Synapse-centred cube datasets for transmitter (E/I) classification, with neuron-held-out splits.

Sources: a raw volume plus a synapse table (CSV, Parquet or a synapse DB URL) with positions
(``z, y, x`` nm), a class label (default column ``ei_label``) and the presynaptic neuron
(default ``pre_neuron``). Any number of classes; ``class_signs`` maps each to +1 (excitatory),
-1 (inhibitory) or 0.

Splits (:func:`neuron_split`) hold out whole presynaptic neurons: no neuron has synapses in two
splits, so accuracy on validation/test measures generalisation to unseen neurons, not to other
synapses of neurons seen in training. Neurons are keyed ``<source>/<neuron id>`` (ids of
different volumes never collide); a synapse without a presynaptic neuron (0 or missing) is its
own key. Neurons are stratified by class (a neuron's class is the majority label of its
synapses; by Dale's principle there is one) and dealt to splits greedily by synapse count, after
a seeded shuffle, so every split gets about its fraction of each class's synapses. A source can
also be pinned to one split (``split: train|val|test``), e.g. one volume per split. The split
is saved as JSON and reused: a later run with the same file gets the same neurons per split.

Cubes are read blockwise-locally (:func:`cleftwise.postprocess.classify.read_cubes`): synapses are grouped
by block, each block's region (with half a cube of context) is read once, the cubes are cut
from it; outside the volume is zero padding. ``margin`` extra voxels per side let training
shift cubes randomly (:func:`crop_cubes`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from cleftwise.postprocess.classify import check_inside, positions_to_voxels, read_cubes
from cleftwise.postprocess.errors import PostprocessError
from cleftwise.storage.errors import StorageError
from cleftwise.storage.volume import open_volume

from cleftwise.train.errors import TrainError

__all__ = ["SourceSpec", "CubeDataConfig", "CubeSet", "SPLITS", "load_table", "class_indices",
           "neuron_keys", "neuron_split", "save_split", "load_split", "assign_splits",
           "extract_cubes", "crop_cubes", "centre_slices", "build_cube_sets", "split_summary"]

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclass
class SourceSpec:
    """One raw volume and its synapse table."""

    raw: str = ""
    """raw EM volume URL (z, y, x)"""
    synapses: str = ""
    """synapse table: .csv / .parquet file or synapse DB URL (sqlite:///…, mongodb://…)"""
    split: str = "auto"
    """auto (split by neuron with the other auto sources), train, val or test (whole source)"""
    name: Optional[str] = None
    """short name used in neuron keys and reports; default the raw path"""

    def key(self) -> str:
        return self.name or self.raw


@dataclass
class CubeDataConfig:
    """Where cubes come from and how they are cut and split."""

    sources: list[SourceSpec] = field(default_factory=list)
    """volumes + synapse tables"""
    cube_shape: tuple = (16, 96, 96)
    """cube (z, y, x) voxels given to the model"""
    margin: tuple = (0, 0, 0)
    """extra voxels per side read around each cube for random shifts in training (z, y, x)"""
    classes: tuple = ("E", "I")
    """class names, in logit order; class 0 is the one a threshold τ applies to"""
    class_signs: dict = field(default_factory=lambda: {"E": 1, "I": -1})
    """class → +1 (excitatory) / -1 (inhibitory) / 0"""
    label_column: str = "ei_label"
    """table column with the class name"""
    neuron_column: str = "pre_neuron"
    """table column with the presynaptic neuron id (held out as a whole)"""
    position_columns: tuple = ("z", "y", "x")
    """table columns with the cube centre in nm"""
    position_convention: str = "centre"
    """centre: a position anywhere in a voxel (e.g. its centre, offset + (i + 0.5)·vs, as the synapse
    DB stores) selects that voxel; index: positions are offset + i·vs (storage.synthetic tables),
    rounded to the nearest voxel"""
    split_fractions: tuple = (0.7, 0.15, 0.15)
    """train, val, test fractions of each class's synapses among the auto sources"""
    split_seed: int = 0
    """seed of the neuron shuffle"""
    split_file: Optional[str] = None
    """JSON with the split; written if missing, reused if present"""
    read_block_shape: tuple = (64, 512, 512)
    """voxels; cubes are read block by block (one read per block)"""
    drop_unlabeled: bool = True
    """skip rows whose label is empty/NaN (else they are an error)"""

    def __post_init__(self) -> None:
        self.cube_shape = _positive3(self.cube_shape, "cube_shape")
        self.read_block_shape = _positive3(self.read_block_shape, "read_block_shape")
        try:
            self.margin = tuple(int(m) for m in self.margin)
        except (TypeError, ValueError) as e:
            raise TrainError(f"data.margin must be 3 integers, got {self.margin!r}") from e
        if len(self.margin) != 3 or any(m < 0 for m in self.margin):
            raise TrainError(f"data.margin must be 3 non-negative integers, got {self.margin}")
        self.classes = tuple(str(c) for c in self.classes)
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise TrainError(f"data.classes must be >= 2 distinct names, got {list(self.classes)}")
        missing = [c for c in self.classes if c not in self.class_signs]
        if missing:
            raise TrainError(f"data.class_signs has no sign for class(es) {missing}")
        extra = [c for c in self.class_signs if c not in self.classes]
        if extra:
            raise TrainError(f"data.class_signs names unknown class(es) {extra}; classes are {list(self.classes)}")
        if any(int(v) not in (-1, 0, 1) for v in self.class_signs.values()):
            raise TrainError(f"data.class_signs values must be +1, -1 or 0, got {self.class_signs}")
        fr = tuple(float(f) for f in self.split_fractions)
        if len(fr) != 3 or any(f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
            raise TrainError(f"data.split_fractions must be 3 non-negative numbers summing to 1, got {fr}")
        self.split_fractions = fr
        if self.position_convention not in ("centre", "index"):
            raise TrainError(f"data.position_convention must be 'centre' or 'index', got {self.position_convention!r}")
        if len(tuple(self.position_columns)) != 3:
            raise TrainError(f"data.position_columns must name 3 columns, got {self.position_columns}")
        for s in self.sources:
            if s.split not in ("auto",) + SPLITS:
                raise TrainError(f"data.sources: split of {s.raw!r} must be auto, train, val or test, got {s.split!r}")
            if not s.raw or not s.synapses:
                raise TrainError(f"data.sources: every source needs 'raw' and 'synapses', got {s}")

    @property
    def signs(self) -> tuple:
        return tuple(int(self.class_signs[c]) for c in self.classes)

    @property
    def read_shape(self) -> tuple:
        """Cube shape read from the volume: cube_shape + 2 · margin."""
        return tuple(c + 2 * m for c, m in zip(self.cube_shape, self.margin))


def _positive3(v, name: str) -> tuple:
    try:
        t = tuple(int(x) for x in v)
    except (TypeError, ValueError) as e:
        raise TrainError(f"data.{name} must be 3 positive integers (z, y, x), got {v!r}") from e
    if len(t) != 3 or any(x < 1 for x in t):
        raise TrainError(f"data.{name} must be 3 positive integers (z, y, x), got {v!r}")
    return t


# ------------------------------------------------------------------------------------------
# tables
# ------------------------------------------------------------------------------------------

def load_table(path: str) -> pd.DataFrame:
    """A synapse table from ``.csv``, ``.parquet`` or a synapse DB URL (``<scheme>://…``)."""
    if "://" in path:
        try:
            from cleftwise.storage.db import open_store

            return open_store(path).query()
        except ImportError as e:
            raise TrainError(f"synapse DB support is unavailable for {path}: {e}") from e
        except StorageError as e:
            raise TrainError(f"synapse DB {path}: {e}") from e
    if not os.path.exists(path):
        raise TrainError(f"synapse table {path} not found")
    try:
        if path.endswith((".parquet", ".pq")):
            return pd.read_parquet(path)
        if path.endswith((".csv", ".csv.gz", ".tsv")):
            return pd.read_csv(path, sep="\t" if path.endswith(".tsv") else ",")
    except (OSError, ValueError) as e:
        raise TrainError(f"synapse table {path} is unreadable: {e}") from e
    raise TrainError(f"synapse table {path}: unknown format (use .csv, .parquet or a DB URL)")


def class_indices(labels: Sequence, classes: Sequence[str], where: str = "table",
                  ids: Optional[Sequence] = None) -> np.ndarray:
    """Class index (n,) int64 of each label name; unknown names raise TrainError naming them."""
    lab = pd.Series(labels).astype(str).to_numpy()
    lookup = {c: i for i, c in enumerate(classes)}
    idx = np.array([lookup.get(v, -1) for v in lab], dtype=np.int64)
    bad = np.flatnonzero(idx < 0)
    if len(bad):
        names = sorted(set(lab[bad].tolist()))[:5]
        rows = [str(ids[i]) for i in bad[:5]] if ids is not None else [str(i) for i in bad[:5]]
        raise TrainError(f"{where}: unknown class name(s) {names} (classes are {list(classes)}); "
                         f"{len(bad)} rows, e.g. synapse id(s) {', '.join(rows)}")
    return idx


def neuron_keys(source: str, neurons: Sequence, ids: Sequence) -> np.ndarray:
    """``<source>/<neuron>`` per synapse; no neuron (0/NaN) → ``<source>/syn<id>`` (its own group)."""
    n = pd.to_numeric(pd.Series(neurons), errors="coerce").fillna(0).to_numpy()
    ids = np.asarray(ids)
    return np.array([f"{source}/{int(v)}" if v != 0 else f"{source}/syn{i}" for v, i in zip(n, ids)],
                    dtype=object)


# ------------------------------------------------------------------------------------------
# splits
# ------------------------------------------------------------------------------------------

def neuron_split(keys: Sequence[str], labels: Sequence[int], fractions: Sequence[float] = (0.7, 0.15, 0.15),
                 seed: int = 0, names: Sequence[str] = SPLITS, num_classes: Optional[int] = None,
                 require_all_classes: bool = True) -> dict[str, list[str]]:
    """Assign whole neurons to splits, stratified by class, seeded.

    Args:
        keys: neuron key per synapse (n,).
        labels: class index per synapse (n,).
        fractions: target share of each class's synapses per split (sums to 1).
        seed: shuffle seed; the same inputs and seed give the same split.
        names: split names, one per fraction.
        num_classes: number of classes (default max label + 1).
        require_all_classes: raise TrainError when a split with a positive fraction would lack
            a class (the class has fewer neurons than such splits).

    Returns: split name → sorted neuron keys. Every neuron is in exactly one split.

    A neuron's class is the majority label of its synapses. Within each class the neurons are
    shuffled, then dealt one by one to the split furthest below its target synapse count (the
    first neurons go one to each split with a positive fraction, so each split gets the class
    when the class has enough neurons).
    """
    keys = np.asarray(keys, dtype=object)
    labels = np.asarray(labels, dtype=np.int64)
    fr = np.asarray(fractions, dtype=np.float64)
    if len(fr) != len(names):
        raise TrainError(f"neuron_split: {len(fr)} fractions for {len(names)} splits")
    nc = int(num_classes if num_classes is not None else (labels.max() + 1 if len(labels) else 0))
    uniq, inv = np.unique(keys.astype(str), return_inverse=True)
    counts = np.zeros((len(uniq), max(nc, 1)), dtype=np.int64)
    np.add.at(counts, (inv, labels), 1)
    neuron_class = counts.argmax(axis=1)
    sizes = counts.sum(axis=1)
    mixed = np.flatnonzero((counts > 0).sum(axis=1) > 1)
    if len(mixed):
        log.warning("neuron_split: %d neurons have synapses of several classes (e.g. %s); each goes by "
                    "its majority class", len(mixed), uniq[mixed[0]])
    rng = np.random.default_rng(seed)
    out: dict[str, list[str]] = {n: [] for n in names}
    active = np.flatnonzero(fr > 0)
    for c in range(nc):
        members = np.flatnonzero(neuron_class == c)
        if len(members) == 0:
            continue
        members = members[rng.permutation(len(members))]
        if require_all_classes and len(members) < len(active):
            raise TrainError(f"neuron_split: class {c} has {len(members)} neuron(s) but {len(active)} splits "
                             f"need one each; add data or set a split fraction to 0")
        target = fr * sizes[members].sum()
        got = np.zeros(len(names))
        for j, m in enumerate(members):
            if j < len(active):
                s = active[j]
            else:
                deficit = np.where(fr > 0, (target - got) / np.maximum(target, 1e-9), -np.inf)
                s = int(np.argmax(deficit))
            out[names[s]].append(str(uniq[m]))
            got[s] += sizes[m]
    return {n: sorted(v) for n, v in out.items()}


def save_split(path: str, split: dict[str, list[str]], info: Optional[dict] = None) -> None:
    """Write a split (split name → neuron keys) and provenance ``info`` as JSON, atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    doc = {"format": "cleftwise-neuron-split", "version": 1, "info": info or {},
           "splits": {k: list(v) for k, v in split.items()}}
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def load_split(path: str) -> dict[str, list[str]]:
    """Read a split JSON written by :func:`save_split`; checks no neuron is in two splits."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise TrainError(f"split file {path} is unreadable: {e}") from e
    if doc.get("format") != "cleftwise-neuron-split":
        raise TrainError(f"split file {path} is not a cleftwise neuron split")
    splits = {k: list(v) for k, v in doc["splits"].items()}
    seen: dict[str, str] = {}
    for name, keys in splits.items():
        for k in keys:
            if k in seen:
                raise TrainError(f"split file {path}: neuron {k} is in both {seen[k]} and {name}")
            seen[k] = name
    return splits


def assign_splits(keys: np.ndarray, split: dict[str, list[str]], where: str = "split") -> np.ndarray:
    """Split name per synapse from its neuron key; neurons missing from ``split`` raise TrainError."""
    lookup = {k: name for name, ks in split.items() for k in ks}
    out = np.array([lookup.get(str(k), "") for k in keys], dtype=object)
    missing = sorted({str(k) for k, s in zip(keys, out) if not s})
    if missing:
        raise TrainError(f"{where}: {len(missing)} neuron(s) are in no split, e.g. {missing[:3]}; the table "
                         "changed since the split was saved (delete the split file to re-split)")
    return out


# ------------------------------------------------------------------------------------------
# cubes
# ------------------------------------------------------------------------------------------

@dataclass
class CubeSet:
    """Cubes with their labels: ``cubes`` (n, z, y, x) raw dtype; per-synapse arrays (n,)."""

    cubes: np.ndarray
    labels: np.ndarray
    neurons: np.ndarray
    ids: np.ndarray
    sources: np.ndarray
    positions: np.ndarray
    """(n, 3) nm"""

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, sel) -> "CubeSet":
        return CubeSet(self.cubes[sel], self.labels[sel], self.neurons[sel], self.ids[sel],
                       self.sources[sel], self.positions[sel])

    def class_counts(self, num_classes: int) -> np.ndarray:
        return np.bincount(self.labels, minlength=num_classes)

    @staticmethod
    def concat(sets: Sequence["CubeSet"], cube_shape: Sequence[int], dtype=np.uint8) -> "CubeSet":
        if not sets:
            return CubeSet(np.zeros((0, *cube_shape), dtype), np.zeros(0, np.int64), np.zeros(0, object),
                           np.zeros(0, np.int64), np.zeros(0, object), np.zeros((0, 3)))
        return CubeSet(*(np.concatenate([getattr(s, f) for s in sets]) for f in
                         ("cubes", "labels", "neurons", "ids", "sources", "positions")))


def extract_cubes(raw_url: str, positions_nm: np.ndarray, cube_shape: Sequence[int],
                  block_shape: Sequence[int] = (64, 512, 512), ids: Optional[np.ndarray] = None,
                  convention: str = "centre") -> np.ndarray:
    """Cubes (n, *cube_shape) centred at ``positions_nm`` (n, 3) in ``raw_url``; zero padded at borders.

    ``convention``: "centre" — the voxel containing each position; "index" — positions are
    ``offset + i · voxel_size`` and are rounded to the nearest voxel.

    Raises TrainError for synapses outside the volume (naming their ids) or an unreadable volume.
    """
    try:
        vol = open_volume(raw_url)
    except StorageError as e:
        raise TrainError(f"raw volume {raw_url}: {e}") from e
    if vol.num_channels is not None:
        raise TrainError(f"raw volume {raw_url} must be (z, y, x), got shape {vol.shape}")
    try:
        pos = np.asarray(positions_nm, dtype=np.float64).reshape(-1, 3)
        if convention == "index":
            pos = pos + np.asarray(vol.voxel_size, dtype=np.float64) / 2
        vox = positions_to_voxels(pos, vol.offset, vol.voxel_size)
        check_inside(vox, tuple(vol.spatial_shape), ids, where=f"raw volume {raw_url}", error=TrainError)
        return read_cubes(vol, vox, cube_shape, block_shape)
    except (PostprocessError, StorageError) as e:
        raise TrainError(f"{raw_url}: {e}") from e


def crop_cubes(cubes: np.ndarray, cube_shape: Sequence[int], offsets: Optional[np.ndarray] = None) -> np.ndarray:
    """Crop (n, Z, Y, X) cubes to ``cube_shape`` at ``offsets`` (n, 3) voxels; None = centred."""
    cs = tuple(int(c) for c in cube_shape)
    extra = np.asarray(cubes.shape[1:]) - np.asarray(cs)
    if (extra < 0).any():
        raise TrainError(f"crop_cubes: cubes {cubes.shape[1:]} are smaller than {cs}")
    if not extra.any():
        return cubes
    n = len(cubes)
    if offsets is None:
        o = extra // 2
        return cubes[:, o[0]:o[0] + cs[0], o[1]:o[1] + cs[1], o[2]:o[2] + cs[2]]
    offsets = np.asarray(offsets, dtype=np.int64).reshape(n, 3)
    win = np.lib.stride_tricks.sliding_window_view(cubes, cs, axis=(1, 2, 3))
    return np.ascontiguousarray(win[np.arange(n), offsets[:, 0], offsets[:, 1], offsets[:, 2]])


def centre_slices(cubes: np.ndarray, n: int = 1) -> np.ndarray:
    """The ``n`` centre sections of cubes (N, Z, Y, X) → (N, n, Y, X) (2D / 2.5D images)."""
    z = cubes.shape[1]
    if n < 1 or n > z:
        raise TrainError(f"centre_slices: need 1..{z} sections, got {n}")
    start = (z - n) // 2
    return cubes[:, start:start + n]


def _source_frame(src: SourceSpec, cfg: CubeDataConfig) -> pd.DataFrame:
    df = load_table(src.synapses)
    cols = list(cfg.position_columns)
    need = [c for c in (*cols, cfg.label_column, cfg.neuron_column) if c not in df.columns]
    if need:
        raise TrainError(f"synapse table {src.synapses} lacks column(s) {need}; has {list(df.columns)}")
    if "id" not in df.columns:
        df = df.assign(id=np.arange(1, len(df) + 1))
    lab = df[cfg.label_column]
    empty = lab.isna() | (lab.astype(str).str.strip() == "")
    if empty.any():
        if not cfg.drop_unlabeled:
            raise TrainError(f"synapse table {src.synapses}: {int(empty.sum())} rows have no "
                             f"{cfg.label_column!r}, e.g. id {df['id'][empty].iloc[0]}")
        log.info("%s: skipping %d unlabeled synapses", src.synapses, int(empty.sum()))
        df = df[~empty]
    return df.reset_index(drop=True)


def build_cube_sets(cfg: CubeDataConfig, splits: Sequence[str] = SPLITS) -> dict[str, CubeSet]:
    """Read the sources, split by neuron (saving/reusing ``cfg.split_file``) and cut the cubes.

    Returns split name → :class:`CubeSet` with cubes of ``cfg.read_shape`` (cube + margins).
    Sources pinned to a split go there whole; the ``auto`` sources are split by neuron (that
    split is what ``split_file`` stores). Only sources that can feed the requested ``splits``
    are opened, and only those splits' cubes are read.
    """
    if not cfg.sources:
        raise TrainError("data.sources is empty")
    frames = []
    for src in cfg.sources:
        if src.split != "auto" and src.split not in splits:
            continue
        df = _source_frame(src, cfg)
        labels = class_indices(df[cfg.label_column], cfg.classes, where=f"synapse table {src.synapses}",
                               ids=df["id"].to_numpy())
        keys = neuron_keys(src.key(), df[cfg.neuron_column], df["id"].to_numpy())
        frames.append((src, df, labels, keys))
    pinned: dict[str, str] = {}
    for src, _, _, keys in frames:
        if src.split == "auto":
            continue
        for k in set(map(str, keys)):
            if pinned.setdefault(k, src.split) != src.split:
                raise TrainError(f"neuron {k} is in sources pinned to both {pinned[k]} and {src.split}; "
                                 "give the sources distinct names")
    auto = [f for f in frames if f[0].split == "auto"]
    split: dict[str, list[str]] = {n: [] for n in SPLITS}
    if auto:
        if cfg.split_file and os.path.exists(cfg.split_file):
            split = load_split(cfg.split_file)
            log.info("reusing neuron split %s", cfg.split_file)
        else:
            split = neuron_split(np.concatenate([f[3] for f in auto]), np.concatenate([f[2] for f in auto]),
                                 cfg.split_fractions, cfg.split_seed, SPLITS, len(cfg.classes))
            if cfg.split_file:
                save_split(cfg.split_file, split, {
                    "seed": cfg.split_seed, "fractions": list(cfg.split_fractions), "classes": list(cfg.classes),
                    "auto_sources": [f[0].key() for f in auto],
                    "pinned_sources": {s.key(): s.split for s in cfg.sources if s.split != "auto"}})
        clash = sorted(set(pinned) & {k for v in split.values() for k in v})
        if clash:
            raise TrainError(f"neuron {clash[0]} is both in a pinned source and in the auto split")
    sets: dict[str, list[CubeSet]] = {n: [] for n in splits}
    for src, df, labels, keys in frames:
        if src.split == "auto":
            where = assign_splits(keys, split, where=f"split of {src.synapses}")
        else:
            where = np.full(len(keys), src.split, dtype=object)
        for name in splits:
            sel = np.flatnonzero(where == name)
            if len(sel) == 0:
                continue
            pos = df[list(cfg.position_columns)].to_numpy(np.float64)[sel]
            ids = df["id"].to_numpy()[sel].astype(np.int64)
            cubes = extract_cubes(src.raw, pos, cfg.read_shape, cfg.read_block_shape, ids,
                                  cfg.position_convention)
            sets[name].append(CubeSet(cubes, labels[sel], keys[sel], ids,
                                      np.array([src.key()] * len(sel), dtype=object), pos))
    return {n: CubeSet.concat(v, cfg.read_shape) for n, v in sets.items()}


def split_summary(sets: dict[str, CubeSet], classes: Sequence[str]) -> dict:
    """Synapses and neurons per split and class (for logs and reports)."""
    out = {}
    for name, s in sets.items():
        counts = s.class_counts(len(classes))
        out[name] = {"synapses": int(len(s)), "neurons": int(len(set(s.neurons.tolist()))),
                     "per_class": {c: int(n) for c, n in zip(classes, counts)}}
    return out
