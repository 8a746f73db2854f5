"""Training data: random anisotropic patches from any number of zarr (or any TensorStore) volumes.

A training volume is a raw EM dataset plus a label dataset on the same voxel grid
(:class:`VolumeSpec`); targets are computed per patch by :mod:`cleftwise.train.targets`. Sampling:

1. pick a volume with probability proportional to its size, then a patch position uniformly
   among those whose patch (plus the in-plane misalignment margin) lies inside the region
   covered by both raw and labels;
2. rejection sampling (gunpowder's ``Reject``): a patch with fewer than
   ``reject.min_foreground`` target foreground voxels is rejected with probability
   ``reject.probability`` and a new position is drawn (at most ``reject.max_tries`` times);
3. augmentation (:mod:`cleftwise.train.augment`), then tensors.

Sample ``i`` of a :class:`PatchDataset` is a pure function of ``(seed, i)``, whatever the worker
or process that computes it; a loader that starts at index ``step * batch_size``
(:func:`make_loader`) therefore resumes training on exactly the batches it would have seen.

Raw is scaled to float32 [0, 1] (uint8 / 255; float volumes used as they are). Targets:
``polarity`` float32 (3, z, y, x) 0/1 (pre, post, union); ``exclusive`` int64 (z, y, x) classes
0/1/2 (background, pre, post); ``cleft`` float32 (1, z, y, x) 0/1. Auxiliary masks
(``DataConfig.aux``, e.g. membranes and mitochondria drawn on the same sections) add one 0/1
channel each after those of a sigmoid target; they take no part in rejection sampling or in the
validation metrics.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
import torch
from funlib.geometry import Coordinate, Roi

from cleftwise.storage.errors import StorageError
from cleftwise.storage.volume import Volume, open_volume

from cleftwise.train.augment import AugmentConfig, augment_patch
from cleftwise.train.errors import TrainError
from cleftwise.train.targets import (cleft_target, dilation_context, foreground_count, polarity_to_exclusive,
                      seg_to_polarity)

__all__ = ["VolumeSpec", "RejectConfig", "DataConfig", "TARGETS", "LABEL_FORMATS",
           "VolumeSource", "open_sources", "PatchDataset", "make_loader", "target_channels",
           "TARGET_CHANNEL_NAMES"]

log = logging.getLogger(__name__)

#: Output channel names of each target, in network order.
TARGET_CHANNEL_NAMES = {"polarity": ("pre", "post", "union"), "exclusive": ("background", "pre", "post"),
                        "cleft": ("cleft",)}
TARGETS = tuple(TARGET_CHANNEL_NAMES)
LABEL_FORMATS = ("polarity", "prepost", "instances")


@dataclass
class VolumeSpec:
    """One training or validation volume: raw plus labels on the same voxel grid."""

    raw: str = ""
    """raw EM volume URL, (z, y, x) uint8 or float32 in [0, 1], e.g. train.zarr/raw"""
    labels: str = ""
    """label volume URL; what it holds is given by label_format"""
    label_format: str = "polarity"
    """polarity: (3, z, y, x) 0/1 pre/post/union (the synthetic 'polarity' dataset); prepost:
    ids, odd = presynaptic, even = postsynaptic side of a synapse (PyTorch Connectomics);
    instances: synapse (or cleft) ids, with per-voxel side codes in 'sides' for polarity targets"""
    sides: Optional[str] = None
    """volume of per-voxel side codes (1 pre, 2 post, 3 both) for label_format instances"""
    aux: dict = field(default_factory=dict)
    """auxiliary mask volumes, ``{name: URL}`` of (z, y, x) volumes (non-zero = 1) on the same
    voxel grid; must name every entry of ``DataConfig.aux``"""
    roi: Optional[tuple] = None
    """[[z, y, x] begin nm, [z, y, x] shape nm]: sample only inside this region (e.g. a training
    band of a volume whose other band is held out for validation); nothing outside it is read.
    Default: everything raw and labels cover"""


@dataclass
class RejectConfig:
    """Rejection sampling of background patches."""

    min_foreground: int = 1000
    """a patch with fewer target foreground voxels than this is a background patch"""
    probability: float = 0.95
    """probability of rejecting a background patch (0 = plain uniform sampling)"""
    max_tries: int = 100
    """positions tried per sample before the last one is taken whatever it holds"""


@dataclass
class DataConfig:
    """Training and validation data. Shapes are voxels (z, y, x), sizes nm."""

    train: list[VolumeSpec] = field(default_factory=list)
    """training volumes"""
    val: list[VolumeSpec] = field(default_factory=list)
    """held-out validation volumes (may be empty: no validation)"""
    voxel_size: Optional[tuple[int, int, int]] = None
    """expected voxel size (nm); default the first training raw volume's"""
    patch_shape: tuple[int, int, int] = (18, 160, 160)
    """network input patch, voxels"""
    target: str = "polarity"
    """polarity (3 sigmoids pre/post/union), exclusive (softmax bg/pre/post) or cleft (1 sigmoid)"""
    aux: list = field(default_factory=list)
    """names of auxiliary sigmoid outputs (one channel each, after the target's), taken from each
    volume's ``aux`` masks; not for the exclusive target"""
    cleft_dilation_nm: float = 0.0
    """cleft target only: grow the label mask by this distance"""
    both: str = "pre"
    """exclusive target: class of a voxel labelled both pre and post (pre or post)"""
    reject: RejectConfig = field(default_factory=RejectConfig)
    """rejection sampling of background patches"""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """augmentation of training patches"""
    batch_size: int = 1
    """patches per optimisation step"""
    num_workers: int = 0
    """DataLoader worker processes (0 = load in the training process)"""
    cache: bool = True
    """read each volume's region into memory once (per process) instead of per patch"""
    val_patches: int = 8
    """fixed validation patches (drawn once with rejection sampling, never augmented)"""

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise TrainError(f"data.target must be one of {TARGETS}, got {self.target!r}")
        self.patch_shape = tuple(int(p) for p in self.patch_shape)
        if len(self.patch_shape) != 3 or min(self.patch_shape) < 1:
            raise TrainError(f"data.patch_shape must be 3 positive sizes (z, y, x), got {self.patch_shape}")
        if self.voxel_size is not None:
            self.voxel_size = tuple(int(v) for v in self.voxel_size)
        if not 0.0 <= self.reject.probability <= 1.0:
            raise TrainError(f"data.reject.probability must lie in [0, 1], got {self.reject.probability}")
        if self.reject.max_tries < 1:
            raise TrainError(f"data.reject.max_tries must be >= 1, got {self.reject.max_tries}")
        if self.batch_size < 1 or self.num_workers < 0 or self.val_patches < 0:
            raise TrainError("data.batch_size must be >= 1, num_workers >= 0 and val_patches >= 0")
        if self.both not in ("pre", "post"):
            raise TrainError(f"data.both must be 'pre' or 'post', got {self.both!r}")
        if self.cleft_dilation_nm < 0:
            raise TrainError(f"data.cleft_dilation_nm must be >= 0, got {self.cleft_dilation_nm}")
        self.aux = [str(a) for a in self.aux]
        if len(set(self.aux)) != len(self.aux):
            raise TrainError(f"data.aux names must be unique, got {self.aux}")
        if self.aux and self.target == "exclusive":
            raise TrainError("data.aux (auxiliary sigmoid channels) cannot be combined with the "
                             "exclusive (softmax) target")
        for spec in list(self.train) + list(self.val):
            missing = [a for a in self.aux if a not in (spec.aux or {})]
            if missing:
                raise TrainError(f"volume {spec.raw}: data.aux names {missing} but its 'aux' has "
                                 f"only {sorted(spec.aux or {})}")


def target_channels(target: str, n_aux: int = 0) -> int:
    """Network output channels a target needs: 3 (polarity, exclusive) or 1 (cleft), plus one
    per auxiliary mask."""
    return len(TARGET_CHANNEL_NAMES[target]) + int(n_aux)


def _open(url: str, what: str, role: str) -> Volume:
    if not url:
        raise TrainError(f"{role}: '{what}' volume is not set")
    try:
        return open_volume(url, mode="r")
    except StorageError as e:
        raise TrainError(f"{role}: cannot open {what} dataset {url}: {e}") from e


def _region(value, voxel_size: Coordinate, name: str) -> Roi:
    """``[[z, y, x] begin nm, [z, y, x] shape nm]`` as a voxel-aligned, non-empty Roi."""
    try:
        begin, shape = (tuple(int(v) for v in part) for part in value)
    except (TypeError, ValueError) as e:
        raise TrainError(f"{name}: roi must be [[z, y, x] begin nm, [z, y, x] shape nm], "
                         f"got {value!r}") from e
    if len(begin) != 3 or len(shape) != 3 or min(shape) < 1:
        raise TrainError(f"{name}: roi must be [[z, y, x] begin nm, [z, y, x] positive shape nm], "
                         f"got {value!r}")
    region = Roi(begin, shape)
    if (region.begin % voxel_size != Coordinate(0, 0, 0)
            or region.shape % voxel_size != Coordinate(0, 0, 0)):
        raise TrainError(f"{name}: roi {value!r} is not aligned to the voxel size "
                         f"{tuple(voxel_size)} nm")
    return region


def _read_padded(array: np.ndarray, begin: tuple, shape: tuple) -> np.ndarray:
    """``array[..., begin:begin+shape]`` over the last 3 axes, zeros where it reaches outside."""
    lead = array.shape[:-3]
    out = np.zeros(lead + tuple(shape), array.dtype)
    src, dst = [], []
    for b, s, n in zip(begin, shape, array.shape[-3:]):
        lo, hi = max(b, 0), min(b + s, n)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - b, hi - b))
    out[(Ellipsis, *dst)] = array[(Ellipsis, *src)]
    return out


class VolumeSource:
    """One volume's raw, labels (and sides) over the region all of them cover.

    Positions are voxels (z, y, x) relative to ``roi.begin``. Handles are opened lazily per
    process; with ``cache`` the whole region is read into memory on first use.
    """

    def __init__(self, spec: VolumeSpec, cfg: DataConfig, role: str):
        self.spec = spec
        self.target = cfg.target
        self.aux = list(cfg.aux)
        self.cache = cfg.cache
        self.both = cfg.both
        self.dilation_nm = cfg.cleft_dilation_nm
        self.name = f"{role} volume {spec.raw}"
        if spec.label_format not in LABEL_FORMATS:
            raise TrainError(f"{self.name}: label_format must be one of {LABEL_FORMATS}, "
                             f"got {spec.label_format!r}")
        raw = _open(spec.raw, "raw", role)
        labels = _open(spec.labels, "labels", role)
        if raw.num_channels is not None or len(raw.shape) != 3:
            raise TrainError(f"{spec.raw}: raw must be a (z, y, x) volume, got shape {raw.shape}")
        if raw.dtype not in (np.uint8, np.float32):
            raise TrainError(f"{spec.raw}: raw must be uint8 or float32, got {raw.dtype}")
        vols = {"labels": labels}
        if spec.label_format == "polarity":
            if labels.num_channels != 3:
                raise TrainError(f"{spec.labels}: label_format polarity needs a (3, z, y, x) volume "
                                 f"(pre, post, union), got shape {labels.shape}")
        elif labels.num_channels is not None or len(labels.shape) != 3:
            raise TrainError(f"{spec.labels}: label_format {spec.label_format} needs a (z, y, x) "
                             f"id volume, got shape {labels.shape}")
        elif not np.issubdtype(labels.dtype, np.integer):
            raise TrainError(f"{spec.labels}: label_format {spec.label_format} needs integer ids, "
                             f"got {labels.dtype}")
        if spec.label_format == "instances" and cfg.target != "cleft":
            if not spec.sides:
                raise TrainError(f"{spec.labels}: label_format instances with target {cfg.target} "
                                 "needs a 'sides' volume (per-voxel side codes)")
        if spec.sides:
            vols["sides"] = _open(spec.sides, "sides", role)
        for name in self.aux:
            vol = _open(spec.aux[name], f"aux {name}", role)
            if vol.num_channels is not None or len(vol.shape) != 3:
                raise TrainError(f"{spec.aux[name]}: aux mask {name!r} must be a (z, y, x) volume, "
                                 f"got shape {vol.shape}")
            vols[f"aux:{name}"] = vol
        for key, vol in vols.items():
            if vol.voxel_size != raw.voxel_size:
                raise TrainError(
                    f"voxel size mismatch in {role} volume: raw {spec.raw} has "
                    f"{tuple(raw.voxel_size)} nm but {key} {vol.url} has {tuple(vol.voxel_size)} nm")
            if (vol.offset - raw.offset) % raw.voxel_size != Coordinate(0, 0, 0):
                raise TrainError(f"{vol.url}: offset {tuple(vol.offset)} nm is not on the voxel grid "
                                 f"of raw {spec.raw} (offset {tuple(raw.offset)} nm)")
        roi = raw.roi
        for vol in vols.values():
            roi = roi.intersect(vol.roi)
        if roi.empty:
            raise TrainError(f"{self.name}: raw {raw.roi} and labels {labels.roi} do not overlap")
        if spec.roi is not None:
            region = _region(spec.roi, raw.voxel_size, self.name)
            if not roi.contains(region):
                raise TrainError(f"{self.name}: roi {region} is not inside the region covered by "
                                 f"raw and labels ({roi})")
            roi = region
        self.roi: Roi = roi
        self.voxel_size = raw.voxel_size
        self.shape = tuple(int(s) for s in roi.shape / raw.voxel_size)
        self._raw_scale = 255.0 if raw.dtype == np.uint8 else 1.0
        self._vols: Optional[dict] = None
        self._arrays: Optional[dict] = None
        self.context = dilation_context(self.dilation_nm, tuple(self.voxel_size)) \
            if self.target == "cleft" else (0, 0, 0)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_vols"] = None  # reopened lazily in each worker process
        return state

    @property
    def size(self) -> int:
        """Voxels in the sampling region."""
        return int(np.prod(self.shape))

    def _handles(self) -> dict:
        if self._vols is None:
            spec = self.spec
            self._vols = {"raw": open_volume(spec.raw), "labels": open_volume(spec.labels)}
            if spec.sides:
                self._vols["sides"] = open_volume(spec.sides)
            for name in self.aux:
                self._vols[f"aux:{name}"] = open_volume(spec.aux[name])
        return self._vols

    def load(self) -> None:
        """Read the whole region of every dataset into memory (``cache``)."""
        if self._arrays is None:
            self._arrays = {k: v.read(self.roi) for k, v in self._handles().items()}
            log.info("%s: cached %s voxels", self.name, self.shape)

    def read(self, key: str, begin: tuple, shape: tuple) -> np.ndarray:
        """Dataset ``key`` (raw/labels/sides) over [begin, begin + shape) voxels; zeros outside."""
        if self.cache:
            self.load()
            return _read_padded(self._arrays[key], tuple(begin), tuple(shape))
        vol = self._handles()[key]
        vs = self.voxel_size
        want = Roi(self.roi.begin + Coordinate(begin) * vs, Coordinate(shape) * vs)
        inside = want.intersect(self.roi)  # as with the cache: nothing outside the region
        lead = () if vol.num_channels is None else (vol.num_channels,)
        out = np.zeros(lead + tuple(shape), vol.dtype)
        if inside.empty:
            return out
        lo = (inside.begin - want.begin) / vs
        hi = lo + inside.shape / vs
        out[(Ellipsis,) + tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))] = vol.read(inside)
        return out

    def read_raw(self, begin: tuple, shape: tuple) -> np.ndarray:
        """float32 (z, y, x) raw in [0, 1]."""
        raw = self.read("raw", begin, shape).astype(np.float32)
        if self._raw_scale != 1.0:
            raw *= np.float32(1.0 / self._raw_scale)
        return raw

    def read_aux(self, begin: tuple, shape: tuple) -> np.ndarray:
        """uint8 (n_aux, z, y, x) 0/1 auxiliary masks over [begin, begin + shape), in ``aux`` order."""
        return np.stack([self.read(f"aux:{name}", begin, shape) != 0 for name in self.aux]).astype(np.uint8)

    def read_target(self, begin: tuple, shape: tuple) -> np.ndarray:
        """The target over [begin, begin + shape): uint8 (3, z, y, x), (z, y, x) or (1, z, y, x)."""
        fmt = self.spec.label_format
        if self.target == "cleft":
            ctx = self.context
            b = tuple(x - c for x, c in zip(begin, ctx))
            s = tuple(x + 2 * c for x, c in zip(shape, ctx))
            lab = self.read("labels", b, s)
            mask = lab[2] if fmt == "polarity" else lab
            out = cleft_target(mask, self.dilation_nm, tuple(self.voxel_size))
            core = tuple(slice(c, c + n) for c, n in zip(ctx, shape))
            return out[(None,) + core]
        lab = self.read("labels", begin, shape)
        exclusive = self.target == "exclusive"
        if fmt == "polarity":
            pol = (lab != 0).astype(np.uint8)
            return polarity_to_exclusive(pol, self.both) if exclusive else pol
        sides = self.read("sides", begin, shape) if fmt == "instances" else None
        return seg_to_polarity(lab, sides, exclusive=exclusive, both=self.both)


def open_sources(specs: list[VolumeSpec], cfg: DataConfig, role: str,
                 margin_px: int = 0) -> list[VolumeSource]:
    """Open and check ``specs``: voxel sizes agree, the patch (plus ``margin_px``) fits each one."""
    if not specs:
        raise TrainError(f"data.{role}: no volumes given")
    sources = [VolumeSource(s, cfg, role) for s in specs]
    expected = Coordinate(cfg.voxel_size) if cfg.voxel_size is not None else sources[0].voxel_size
    for src in sources:
        if src.voxel_size != expected:
            raise TrainError(f"voxel size mismatch: {src.name} has {tuple(src.voxel_size)} nm, "
                             f"expected {tuple(expected)} nm (data.voxel_size or the first volume)")
        need = (cfg.patch_shape[0], cfg.patch_shape[1] + 2 * margin_px, cfg.patch_shape[2] + 2 * margin_px)
        if any(p > s for p, s in zip(cfg.patch_shape, src.shape)):
            raise TrainError(f"patch {cfg.patch_shape} voxels (z, y, x) is larger than {src.name} "
                             f"(region covered by raw and labels: {src.shape} voxels); use a "
                             "smaller data.patch_shape")
        if any(p > s for p, s in zip(need, src.shape)):
            log.warning("%s: too small for the misalignment margin of %d px; no misalignment there",
                        src.name, margin_px)
    return sources


class PatchDataset(torch.utils.data.Dataset):
    """Map-style dataset of random patches; item ``i`` depends only on ``(seed, i)``.

    Items are dicts: ``raw`` float32 (1, z, y, x); ``target`` float32 (C, z, y, x) or int64
    (z, y, x) (see module docstring); ``foreground`` target foreground voxels of the patch;
    ``tries`` positions drawn; ``volume`` index of the source volume; ``begin`` (z, y, x) voxel
    position of the patch in that volume's sampling region (before augmentation).
    """

    def __init__(self, sources: list[VolumeSource], cfg: DataConfig, seed: int, augment: bool,
                 length: int = 2 ** 62):
        if not sources:
            raise TrainError("PatchDataset: no volumes")
        self.sources = sources
        self.cfg = cfg
        self.seed = int(seed)
        self.augment = cfg.augment if augment and cfg.augment.enabled else None
        self.length = int(length)
        self.patch = cfg.patch_shape
        want = self.augment.margin_px if self.augment is not None else 0
        self.margins = [want if all(p + 2 * want <= s for p, s in zip(self.patch[1:], src.shape[1:]))
                        else 0 for src in sources]
        weights = np.array([s.size for s in sources], np.float64)
        self.weights = weights / weights.sum()

    def __len__(self) -> int:
        return self.length

    def _position(self, rng: np.random.Generator, k: int) -> tuple:
        m = self.margins[k]
        shape = self.sources[k].shape
        lo = (0, m, m)
        hi = tuple(s - p - mm for s, p, mm in zip(shape, self.patch, (0, m, m)))
        return tuple(int(rng.integers(a, b + 1)) for a, b in zip(lo, hi))

    def sample(self, index: int) -> dict:
        """Item ``index`` as numpy arrays (see class docstring)."""
        rng = np.random.default_rng([self.seed, int(index)])
        rej = self.cfg.reject
        exclusive = self.cfg.target == "exclusive"
        for tries in range(1, rej.max_tries + 1):
            k = int(rng.choice(len(self.sources), p=self.weights)) if len(self.sources) > 1 else 0
            src, m = self.sources[k], self.margins[k]
            begin = self._position(rng, k)
            read_begin = (begin[0], begin[1] - m, begin[2] - m)
            read_shape = (self.patch[0], self.patch[1] + 2 * m, self.patch[2] + 2 * m)
            target = src.read_target(read_begin, read_shape)
            core = target[..., :, m:m + self.patch[1], m:m + self.patch[2]]
            fg = foreground_count(core, exclusive)
            if fg >= rej.min_foreground or rej.probability == 0 or rng.random() >= rej.probability:
                break
        if src.aux:
            target = np.concatenate([target, src.read_aux(read_begin, read_shape)])
        raw = src.read_raw(read_begin, read_shape)
        raw, target = augment_patch(raw, target, rng, self.augment, self.patch[1:], m)
        if exclusive:
            target = target.astype(np.int64)
        else:
            target = target.astype(np.float32)
        return {"raw": raw[None], "target": target, "foreground": fg, "tries": tries, "volume": k,
                "begin": np.asarray(begin, np.int64)}

    def __getitem__(self, index: int) -> dict:
        item = self.sample(index)
        return {"raw": torch.from_numpy(item["raw"]), "target": torch.from_numpy(item["target"]),
                "foreground": item["foreground"], "tries": item["tries"], "volume": item["volume"],
                "begin": torch.from_numpy(item["begin"])}


class _IndexStream(torch.utils.data.Sampler):
    """Indices ``start, start + 1, …`` (endless, or ``count`` of them)."""

    def __init__(self, start: int = 0, count: Optional[int] = None):
        self.start = int(start)
        self.count = count

    def __iter__(self) -> Iterator[int]:
        i = self.start
        while self.count is None or i < self.start + self.count:
            yield i
            i += 1

    def __len__(self) -> int:
        if self.count is None:
            raise TypeError("endless index stream has no length")
        return int(self.count)


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)


def make_loader(dataset: PatchDataset, batch_size: int, num_workers: int = 0, start_index: int = 0,
                count: Optional[int] = None, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over items ``start_index, start_index + 1, …`` in order, in batches.

    With ``num_workers > 0`` items are made in worker processes (each opens its own volume
    handles and, with ``cache``, its own in-memory copy); batches still arrive in index order.
    """
    if num_workers > 0:
        for src in dataset.sources:  # read before forking so workers share the pages
            if src.cache and os.name == "posix":
                src.load()
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=_IndexStream(start_index, count),
        num_workers=num_workers, worker_init_fn=_worker_init if num_workers else None,
        pin_memory=pin_memory, persistent_workers=False,
        prefetch_factor=2 if num_workers else None)
