"""The world model behind the synthetic EM volume: neurites, mitochondria, synapses, vesicles.

Everything here is a pure function of global coordinates (nm, axis order z, y, x, origin at
voxel (0, 0, 0) of the volume) and of the seed, so any block of the volume can be rendered on
its own and agrees byte for byte with its neighbours:

- **Neurites** are capsules (line segments with a radius) seeded one per cell of a global
  cubic lattice (spacing ``neuron_spacing_nm``); each lattice cell's randomness comes from an
  integer hash of (seed, stream, i, j, k), never from a sequential RNG. A point belongs to the
  neurite with the smallest ``distance_to_segment - radius`` (an additively weighted Voronoi
  diagram of segments), evaluated at the point displaced by a smooth sinusoidal warp field, so
  boundaries are curved and wavy. Thin long capsules are axons (presynaptic, each with one
  transmitter class: Dale's principle), thick ones dendrites (postsynaptic).
- **Synapses** sit where an axon and a dendrite touch: on the line between the closest points
  of their segments, at the exact point where the two weighted distances are equal (found by
  bisection), kept only where no third neurite comes close, accepted with a hashed coin flip
  and thinned so that no two synapses overlap.
- **Vesicles** and **mitochondria** are placed with per-synapse / per-neurite hashes.

Every neurite that can own a voxel of a block lies within :func:`neuron_margin_nm` of it,
which is how a block knows which seeds it needs.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from .errors import StorageError

__all__ = [
    "SyntheticConfig", "Neurons", "Mitochondria", "Synapses", "Vesicles", "WarpField",
    "hash_u64", "hash_uniform", "capsule_distance", "neurons_in_box", "mitochondria_of",
    "synapses_in_box", "vesicles_of", "neuron_margin_nm", "synapse_extent_nm", "lattice_box",
    "weighted_distances", "synapse_neuron_margin_nm",
]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SyntheticConfig:
    """Everything that determines a synthetic volume; the same config gives the same bytes.

    Lengths are nm, shapes voxels, axis order (z, y, x). Ranges are (low, high) of a uniform
    draw.
    """

    shape: tuple[int, int, int] = (64, 512, 512)
    """Volume shape in voxels (z, y, x)."""
    voxel_size: tuple[int, int, int] = (40, 4, 4)
    """Voxel size in nm (z, y, x); (40, 4, 4) is CREMI-like serial-section TEM."""
    offset: tuple[int, int, int] = (0, 0, 0)
    """World offset of voxel (0, 0, 0) in nm, written as metadata; the content does not depend
    on it (table positions include it)."""
    seed: int = 1
    """Master seed; every random quantity is a hash of it and of global indices."""
    block_shape: tuple[int, int, int] = (32, 256, 256)
    """Voxels rendered per block; peak memory scales with this, not with ``shape``."""
    chunk_shape: tuple[int, int, int] = (32, 256, 256)
    """Storage chunk shape in voxels (clipped to ``shape``)."""

    # neurites
    neuron_spacing_nm: float = 480.0
    """Spacing of the global seed lattice: one neurite per lattice cell."""
    axon_fraction: float = 0.55
    """Fraction of neurites that are axons (thin, long, presynaptic)."""
    axon_radius_nm: tuple[float, float] = (45.0, 110.0)
    """Additive weight of axons (roughly their minimum radius)."""
    dendrite_radius_nm: tuple[float, float] = (140.0, 330.0)
    """Additive weight of dendrites."""
    axon_half_length_nm: tuple[float, float] = (900.0, 2200.0)
    """Half length of an axon's skeleton segment."""
    dendrite_half_length_nm: tuple[float, float] = (500.0, 1400.0)
    """Half length of a dendrite's skeleton segment."""
    warp_amplitude_nm: float = 30.0
    """Largest in-plane displacement of the smooth warp that bends the neurites."""
    warp_wavelength_nm: tuple[float, float] = (800.0, 2500.0)
    """Wavelengths of the warp's sinusoids."""
    light_fraction: float = 0.06
    """Fraction of neurites drawn light and smooth (glia-like / swollen profiles)."""

    # membranes and look
    membrane_thickness_nm: float = 11.0
    """Full width of a dark plasma membrane seen edge-on (~2.75 px at 4 nm)."""
    section_thickness_nm: Optional[float] = None
    """Physical section thickness; oblique structures are projected through it (default: z
    voxel size)."""
    cytoplasm_intensity: float = 0.64
    """Mean grey of cytoplasm (0 black, 1 white)."""
    cytoplasm_intensity_std: float = 0.05
    """Spread of the grey level between neurites."""
    membrane_darkness: float = 0.62
    """Fraction of brightness removed on a membrane seen edge-on."""
    texture_amplitude: float = 0.13
    """Relative amplitude of the granular cytoplasm texture."""
    texture_sigma_px: float = 1.3
    """In-plane correlation length of the texture (pixels)."""
    blur_sigma_px: float = 0.8
    """In-plane Gaussian blur standing in for the microscope's point spread (pixels)."""
    noise_std: float = 0.045
    """Standard deviation of the additive pixel noise (intensity units, 1 = white)."""
    section_gain_std: float = 0.05
    """Per-section contrast variation (relative)."""
    section_offset_std: float = 0.025
    """Per-section brightness variation (intensity units)."""

    # mitochondria
    mito_per_dendrite: float = 0.9
    """Expected mitochondria per dendrite (up to 2)."""
    mito_per_axon: float = 0.35
    """Expected mitochondria per axon (up to 2)."""
    mito_radius_nm: tuple[float, float] = (38.0, 85.0)
    """Radius of a mitochondrion (capped at 0.6 x the neurite's radius)."""
    mito_half_length_nm: tuple[float, float] = (120.0, 600.0)
    """Half length of a mitochondrion's axis (it runs along the neurite)."""

    # synapses
    synapse_probability: float = 0.5
    """Probability that a valid axon-dendrite contact carries a synapse."""
    e_fraction: float = 0.78
    """Fraction of axons that are excitatory (the rest inhibitory)."""
    synapse_radius_nm: tuple[float, float] = (150.0, 240.0)
    """Radius of the synaptic disc on the shared membrane (300-480 nm wide)."""
    synapse_max_normal_z: float = 0.8
    """Contacts whose membrane is closer than acos(this) to the section plane are skipped
    (en-face synapses cannot be polarity-annotated in anisotropic EM)."""
    contact_clearance_nm: float = 110.0
    """A contact is valid when every third neurite's weighted distance at the contact point
    exceeds the pair's by this much."""
    cleft_width_nm: float = 22.0
    """Width of the synaptic cleft (between the two membranes)."""
    pre_band_nm: float = 50.0
    """Depth of the presynaptic ground-truth band measured from the cleft centre."""
    post_band_nm: float = 60.0
    """Depth of the postsynaptic ground-truth band measured from the cleft centre (must hold
    the cleft half width, the membrane and the thickest PSD)."""
    psd_thickness_e_nm: float = 38.0
    """Postsynaptic density thickness of excitatory (asymmetric) synapses."""
    psd_thickness_i_nm: float = 11.0
    """Postsynaptic density thickness of inhibitory (symmetric) synapses."""
    vesicles_per_synapse: tuple[int, int] = (22, 48)
    """Range of vesicle counts per synapse (before rejecting those outside the bouton)."""
    vesicle_diameter_e_nm: tuple[float, float] = (38.0, 50.0)
    """Diameter of round excitatory vesicles."""
    vesicle_diameter_i_nm: tuple[float, float] = (26.0, 34.0)
    """Long diameter of flattened inhibitory vesicles."""
    vesicle_flattening_i: float = 0.6
    """Short/long axis ratio of inhibitory vesicles."""
    vesicle_cloud_depth_nm: float = 260.0
    """Largest distance of a vesicle centre from the cleft."""

    # implementation
    tile_shape: tuple[int, int, int] = (2, 32, 32)
    """Tiles (voxels) used to cull candidate neurites; speed only, never changes results."""

    def __post_init__(self):
        def vec(name, n=3, positive=True, integer=True):
            v = getattr(self, name)
            try:
                t = tuple(int(x) if integer else float(x) for x in v)
            except (TypeError, ValueError) as e:
                raise StorageError(f"SyntheticConfig.{name} must be {n} numbers, got {v!r}") from e
            if len(t) != n or (positive and any(x <= 0 for x in t)):
                raise StorageError(f"SyntheticConfig.{name} must be {n} positive numbers, got {v!r}")
            object.__setattr__(self, name, t)

        for name in ("shape", "voxel_size", "block_shape", "chunk_shape", "tile_shape"):
            vec(name)
        vec("offset", positive=False)
        for name in ("axon_radius_nm", "dendrite_radius_nm", "axon_half_length_nm",
                     "dendrite_half_length_nm", "warp_wavelength_nm", "mito_radius_nm",
                     "mito_half_length_nm", "synapse_radius_nm", "vesicle_diameter_e_nm",
                     "vesicle_diameter_i_nm"):
            vec(name, 2, integer=False)
            lo, hi = getattr(self, name)
            if lo > hi:
                raise StorageError(f"SyntheticConfig.{name}: low {lo} > high {hi}")
        vec("vesicles_per_synapse", 2)
        for name in ("axon_fraction", "light_fraction", "synapse_probability", "e_fraction",
                     "synapse_max_normal_z", "vesicle_flattening_i"):
            v = float(getattr(self, name))
            if not 0.0 <= v <= 1.0:
                raise StorageError(f"SyntheticConfig.{name} must lie in [0, 1], got {v}")
        need = 0.5 * self.cleft_width_nm + 0.5 * self.membrane_thickness_nm + self.psd_thickness_e_nm
        if self.post_band_nm < need or self.pre_band_nm < need - self.psd_thickness_e_nm + self.psd_thickness_i_nm:
            raise StorageError(
                f"SyntheticConfig.post_band_nm ({self.post_band_nm}) must be >= half cleft + half "
                f"membrane + excitatory PSD ({need}) and pre_band_nm must hold the presynaptic density")
        if self.neuron_spacing_nm <= 0:
            raise StorageError(f"SyntheticConfig.neuron_spacing_nm must be > 0, got {self.neuron_spacing_nm}")
        if any(o % v for o, v in zip(self.offset, self.voxel_size)):
            raise StorageError(f"SyntheticConfig.offset {self.offset} nm is not a multiple of "
                               f"voxel_size {self.voxel_size} nm")
        if self.warp_amplitude_nm < 0 or self.warp_amplitude_nm > 0.15 * self.warp_wavelength_nm[0]:
            raise StorageError("SyntheticConfig.warp_amplitude_nm must be in [0, 0.15 x shortest "
                               f"warp wavelength] so the warp stays invertible, got {self.warp_amplitude_nm}")
        if not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise StorageError(f"SyntheticConfig.seed must be a non-negative integer, got {self.seed!r}")

    @property
    def section_nm(self) -> float:
        """Physical section thickness in nm."""
        return float(self.section_thickness_nm or self.voxel_size[0])

    def replace(self, **changes) -> "SyntheticConfig":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """JSON-serialisable dict of all fields."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


# ----------------------------------------------------------------------------------------
# hashing: random numbers as functions of integer keys
# ----------------------------------------------------------------------------------------

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLD = np.uint64(0x9E3779B97F4A7C15)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)

# stream ids: one per kind of random quantity
(ST_NEURON, ST_MITO, ST_SYN, ST_VES, ST_WARP, ST_PIX, ST_SECTION, ST_PIXROW, ST_PIXCOL) = range(1, 10)


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, in place on a uint64 array (returns it)."""
    with np.errstate(over="ignore"):
        h ^= h >> _S30
        h *= _M1
        h ^= h >> _S27
        h *= _M2
        h ^= h >> _S31
    return h


def hash_u64(*keys) -> np.ndarray:
    """Hash integer keys (scalars or broadcastable int arrays, negatives allowed) to uint64.

    The result has the broadcast shape of the keys; equal keys give equal hashes on every call.
    """
    arrays = [np.asarray(k).astype(np.int64).astype(np.uint64) for k in keys]
    shape = np.broadcast_shapes(*(a.shape for a in arrays))
    h = np.zeros(shape, np.uint64)
    with np.errstate(over="ignore"):
        for a in arrays:
            h = h ^ (a + _GOLD)
            h = _mix(h)
    return h


def hash_uniform(*keys) -> np.ndarray:
    """Uniform float64 numbers in [0, 1) from integer keys (see :func:`hash_u64`)."""
    return (hash_u64(*keys) >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)


def _lerp(rng: Sequence[float], u):
    return rng[0] + (rng[1] - rng[0]) * u


def _unit_vectors(u1, u2) -> np.ndarray:
    """Uniformly distributed unit vectors (n, 3) (z, y, x) from two uniform arrays."""
    z = 2.0 * u1 - 1.0
    rho = np.sqrt(np.maximum(0.0, 1.0 - z * z))
    phi = 2.0 * np.pi * u2
    return np.stack([z, rho * np.sin(phi), rho * np.cos(phi)], axis=-1)


# ----------------------------------------------------------------------------------------
# warp field
# ----------------------------------------------------------------------------------------

_N_WARP = 3  # sinusoids per displacement component


@dataclass(frozen=True)
class WarpField:
    """Smooth in-plane displacement w(p) = (0, w_y(p), w_x(p)), nm.

    Each component is a sum of ``_N_WARP`` sinusoids ``a sin(k . p + phi)`` with wave vectors
    k (rad/nm, (z, y, x)) drawn from the seed; the amplitudes sum to ``warp_amplitude_nm``.
    """

    k: np.ndarray       # (2, n, 3) wave vectors for w_y, w_x
    phase: np.ndarray   # (2, n)
    amp: np.ndarray     # (2, n)

    @classmethod
    def from_config(cls, cfg: SyntheticConfig) -> "WarpField":
        idx = np.arange(2 * _N_WARP).reshape(2, _N_WARP)
        u = [hash_uniform(cfg.seed, ST_WARP, idx, j) for j in range(5)]
        direction = _unit_vectors(u[0], u[1])
        wavelength = _lerp(cfg.warp_wavelength_nm, u[2])
        k = direction * (2 * np.pi / wavelength)[..., None]
        w = 0.5 + u[3]
        amp = cfg.warp_amplitude_nm * w / w.sum(axis=1, keepdims=True)
        return cls(k=k, phase=2 * np.pi * u[4], amp=amp)

    @property
    def max_displacement(self) -> float:
        """Upper bound of |w| in nm."""
        return float(np.sqrt((self.amp.sum(axis=1) ** 2).sum()))

    def on_grid(self, z_nm: np.ndarray, y_nm: np.ndarray, x_nm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(w_y, w_x) float32 arrays of shape (len(z), len(y), len(x)) on a separable grid.

        Uses sin(A + B) = sin A cos B + cos A sin B with A from z and B from (y, x), so the
        3D cost is three multiply-adds per sinusoid.
        """
        out = []
        for c in range(2):
            acc = np.zeros((len(z_nm), len(y_nm), len(x_nm)), np.float32)
            for n in range(self.k.shape[1]):
                kz, ky, kx = self.k[c, n]
                a = kz * z_nm + self.phase[c, n]
                b = ky * y_nm[:, None] + kx * x_nm[None, :]
                sb = (self.amp[c, n] * np.sin(b)).astype(np.float32)
                cb = (self.amp[c, n] * np.cos(b)).astype(np.float32)
                sa = np.sin(a).astype(np.float32)[:, None, None]
                ca = np.cos(a).astype(np.float32)[:, None, None]
                acc += sa * cb
                acc += ca * sb
            out.append(acc)
        return out[0], out[1]

    def at_points(self, p: np.ndarray) -> np.ndarray:
        """Displacement (n, 3) at points p (n, 3) nm (z component 0), float64."""
        p = np.asarray(p, np.float64)
        w = np.zeros_like(p)
        for c in range(2):
            for n in range(self.k.shape[1]):
                kz, ky, kx = self.k[c, n]
                a = kz * p[:, 0] + self.phase[c, n]
                b = ky * p[:, 1] + kx * p[:, 2]
                # same factorisation as on_grid, in float64
                w[:, 1 + c] += self.amp[c, n] * (np.sin(a) * np.cos(b) + np.cos(a) * np.sin(b))
        return w

    def invert(self, q0: np.ndarray, iterations: int = 30) -> np.ndarray:
        """Points q (n, 3) with q + w(q) = q0 (fixed-point iteration; the warp is a contraction)."""
        q0 = np.asarray(q0, np.float64)
        q = q0.copy()
        for _ in range(iterations):
            q = q0 - self.at_points(q)
        return q


# ----------------------------------------------------------------------------------------
# neurites
# ----------------------------------------------------------------------------------------

@dataclass
class Neurons:
    """Neurite capsules; arrays have one row per neurite.

    ``pos`` (n, 3) segment centre nm, ``dir`` (n, 3) unit axis, ``half_len`` (n,) nm,
    ``radius`` (n,) additive weight nm, ``ids`` (n,) uint64 label ids (nonzero), ``lattice``
    (n, 3) int64 lattice cell, ``is_axon`` / ``is_exc`` / ``is_light`` (n,) bool (``is_exc``
    is meaningful for axons only), ``grey`` (n,) base intensity.
    """

    pos: np.ndarray
    dir: np.ndarray
    half_len: np.ndarray
    radius: np.ndarray
    ids: np.ndarray
    lattice: np.ndarray
    is_axon: np.ndarray
    is_exc: np.ndarray
    is_light: np.ndarray
    grey: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, sel) -> "Neurons":
        return Neurons(**{f.name: getattr(self, f.name)[sel] for f in dataclasses.fields(self)})


def capsule_distance(p: np.ndarray, pos: np.ndarray, direction: np.ndarray, half_len) -> np.ndarray:
    """Euclidean distance (nm) from points to segments; 1-Lipschitz in p.

    ``p`` (..., 3) broadcasts against ``pos``/``direction`` (..., 3) and ``half_len`` (...).
    """
    v = p - pos
    t = np.clip((v * direction).sum(-1), -half_len, half_len)
    q = v - t[..., None] * direction
    return np.sqrt((q * q).sum(-1))


def weighted_distances(p: np.ndarray, nr: Neurons) -> np.ndarray:
    """``capsule distance - radius`` (nm) of points p (m, 3) (already warped) to every
    neurite: (m, n) float64. The owner of a warped point is the argmin over neurites."""
    p = np.asarray(p, np.float64).reshape(-1, 3)
    out = np.empty((len(p), len(nr)), np.float64)
    step = max(1, 250_000 // max(len(nr), 1))  # bounded temporaries
    for a in range(0, len(p), step):
        out[a:a + step] = capsule_distance(p[a:a + step, None, :], nr.pos[None], nr.dir[None],
                                           nr.half_len[None]) - nr.radius[None]
    return out


def neuron_margin_nm(cfg: SyntheticConfig, warp: Optional[WarpField] = None) -> float:
    """Distance from a voxel within which every neurite that can own it has its seed.

    The seed in the warped point's own lattice cell is at most ``spacing * sqrt(3)`` away,
    so the owner's segment is within that plus the largest radius, its seed within that plus
    the largest half length, and the warp moves points by at most its amplitude.
    """
    w = warp.max_displacement if warp is not None else WarpField.from_config(cfg).max_displacement
    return (cfg.neuron_spacing_nm * math.sqrt(3.0)
            + max(cfg.axon_radius_nm[1], cfg.dendrite_radius_nm[1])
            + max(cfg.axon_half_length_nm[1], cfg.dendrite_half_length_nm[1]) + w + 1.0)


def synapse_extent_nm(cfg: SyntheticConfig) -> float:
    """Largest distance from a synapse centre to any voxel it renders (disc, bands, vesicles)."""
    return (cfg.synapse_radius_nm[1] * 1.2 + cfg.vesicle_cloud_depth_nm
            + max(cfg.vesicle_diameter_e_nm[1], cfg.vesicle_diameter_i_nm[1]) + cfg.section_nm)


def synapse_neuron_margin_nm(cfg: SyntheticConfig) -> float:
    """Margin around a box of synapse centres within which all neurites that decide those
    synapses (partners, third neurites checked for clearance, thinning neighbours) have seeds."""
    return neuron_margin_nm(cfg) + cfg.contact_clearance_nm + _synapse_spacing_nm(cfg)


def _synapse_spacing_nm(cfg: SyntheticConfig) -> float:
    """Minimum distance between two synapse centres."""
    return 2.4 * cfg.synapse_radius_nm[1] + 100.0


def lattice_box(cfg: SyntheticConfig) -> tuple[np.ndarray, np.ndarray]:
    """Inclusive lattice index range (lo (3,), hi (3,)) of all neurites the volume can see,
    also as synapse partners; ids are 1 + the raveled index inside this box."""
    ext = np.array(cfg.shape, np.float64) * np.array(cfg.voxel_size, np.float64)
    m = synapse_neuron_margin_nm(cfg) + synapse_extent_nm(cfg) + 1000.0
    s = cfg.neuron_spacing_nm
    return np.floor(-m / s).astype(np.int64), np.floor((ext + m) / s).astype(np.int64)


def neurons_in_box(cfg: SyntheticConfig, lo_nm, hi_nm) -> Neurons:
    """All neurites whose seed lattice cell intersects the box [lo_nm, hi_nm] (nm, (z, y, x)),
    clipped to the volume's lattice box. Ordered by id."""
    s = cfg.neuron_spacing_nm
    vlo, vhi = lattice_box(cfg)
    lo = np.maximum(np.floor(np.asarray(lo_nm, np.float64) / s).astype(np.int64), vlo)
    hi = np.minimum(np.floor(np.asarray(hi_nm, np.float64) / s).astype(np.int64), vhi)
    if np.any(hi < lo):
        return _make_neurons(cfg, np.zeros((0, 3), np.int64))
    grids = np.meshgrid(*[np.arange(a, b + 1) for a, b in zip(lo, hi)], indexing="ij")
    lat = np.stack([g.ravel() for g in grids], axis=-1)
    return _make_neurons(cfg, lat)


def _make_neurons(cfg: SyntheticConfig, lat: np.ndarray) -> Neurons:
    s = cfg.neuron_spacing_nm
    i, j, k = lat[:, 0], lat[:, 1], lat[:, 2]
    u = [hash_uniform(cfg.seed, ST_NEURON, i, j, k, c) for c in range(12)]
    pos = (lat + np.stack(u[0:3], axis=-1)) * s
    direction = _unit_vectors(u[3], u[4])
    is_axon = u[5] < cfg.axon_fraction
    radius = np.where(is_axon, _lerp(cfg.axon_radius_nm, u[6]), _lerp(cfg.dendrite_radius_nm, u[6]))
    half_len = np.where(is_axon, _lerp(cfg.axon_half_length_nm, u[7]),
                        _lerp(cfg.dendrite_half_length_nm, u[7]))
    is_exc = u[8] < cfg.e_fraction
    is_light = (u[9] < cfg.light_fraction) & ~is_axon
    z = np.sqrt(-2 * np.log(np.maximum(u[10], 1e-12))) * np.cos(2 * np.pi * u[11])  # N(0, 1)
    grey = cfg.cytoplasm_intensity + cfg.cytoplasm_intensity_std * np.clip(z, -2.5, 2.5)
    grey = np.where(is_axon, grey + 0.03, grey)
    grey = np.where(is_light, np.minimum(0.93, grey + 0.2), grey)
    vlo, vhi = lattice_box(cfg)
    dims = vhi - vlo + 1
    ids = (np.ravel_multi_index(tuple((lat - vlo).T), tuple(dims)) + 1).astype(np.uint64) \
        if len(lat) else np.zeros(0, np.uint64)
    return Neurons(pos=pos, dir=direction, half_len=half_len, radius=radius, ids=ids,
                   lattice=lat, is_axon=is_axon, is_exc=is_exc, is_light=is_light, grey=grey)


# ----------------------------------------------------------------------------------------
# mitochondria
# ----------------------------------------------------------------------------------------

@dataclass
class Mitochondria:
    """Mitochondria as capsules inside their neurite.

    ``pos``/``dir`` (m, 3) nm / unit, ``half_len``/``radius`` (m,) nm, ``owner`` (m,) index
    into the Neurons they were made from, ``phase`` (m,) cristae phase, ``perp`` (m, 3) unit
    vector perpendicular to the axis (cristae run across it).
    """

    pos: np.ndarray
    dir: np.ndarray
    half_len: np.ndarray
    radius: np.ndarray
    owner: np.ndarray
    phase: np.ndarray
    perp: np.ndarray

    def __len__(self) -> int:
        return len(self.owner)


def _perpendicular(d: np.ndarray, u: np.ndarray) -> np.ndarray:
    """A unit vector perpendicular to each unit vector d (n, 3), rotated by angle 2 pi u."""
    ref = np.where(np.abs(d[:, :1]) < 0.9, np.array([[1.0, 0, 0]]), np.array([[0, 1.0, 0]]))
    a = np.cross(d, ref)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b = np.cross(d, a)
    th = 2 * np.pi * u[:, None]
    return np.cos(th) * a + np.sin(th) * b


def mitochondria_of(cfg: SyntheticConfig, nr: Neurons) -> Mitochondria:
    """The (up to two) mitochondria of each neurite, in neurite order."""
    slots = 2
    owner = np.repeat(np.arange(len(nr)), slots)
    slot = np.tile(np.arange(slots), len(nr))
    i, j, k = (nr.lattice[owner, c] for c in range(3))
    u = [hash_uniform(cfg.seed, ST_MITO, i, j, k, slot, c) for c in range(8)]
    rate = np.where(nr.is_axon[owner], cfg.mito_per_axon, cfg.mito_per_dendrite) / slots
    keep = (u[0] < rate) & ~nr.is_light[owner]
    owner, u = owner[keep], [x[keep] for x in u]
    d = nr.dir[owner]
    rn = nr.radius[owner]
    radius = np.minimum(_lerp(cfg.mito_radius_nm, u[1]), 0.6 * rn)
    half_len = _lerp(cfg.mito_half_length_nm, u[2])
    t = (2 * u[3] - 1) * np.maximum(nr.half_len[owner] - half_len, 0.0)
    off = _perpendicular(d, u[4]) * (0.25 * rn * u[5])[:, None]
    pos = nr.pos[owner] + t[:, None] * d + off
    return Mitochondria(pos=pos, dir=d, half_len=half_len, radius=radius, owner=owner,
                        phase=2 * np.pi * u[6], perp=_perpendicular(d, u[7]))


# ----------------------------------------------------------------------------------------
# synapses
# ----------------------------------------------------------------------------------------

@dataclass
class Synapses:
    """Synapse definitions; one row per synapse, ordered by id.

    ``ids`` (s,) uint64 nonzero; ``pre``/``post`` (s,) indices into the Neurons they were
    made from, ``pre_id``/``post_id`` (s,) their label ids; ``exc`` (s,) bool (the axon's
    class); ``center`` (s, 3) real-space point on the shared membrane, nm; ``center_warped``
    (s, 3) the same point in warped space; ``normal`` (s, 3) unit normal pointing from pre
    to post; ``e1``/``e2`` (s, 3) in-membrane axes; ``radii`` (s, 2) disc semi-axes nm.
    """

    ids: np.ndarray
    pre: np.ndarray
    post: np.ndarray
    pre_id: np.ndarray
    post_id: np.ndarray
    exc: np.ndarray
    center: np.ndarray
    center_warped: np.ndarray
    normal: np.ndarray
    e1: np.ndarray
    e2: np.ndarray
    radii: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, sel) -> "Synapses":
        return Synapses(**{f.name: getattr(self, f.name)[sel] for f in dataclasses.fields(self)})

    def sites(self, cfg: SyntheticConfig) -> tuple[np.ndarray, np.ndarray]:
        """Pre and post site (s, 3) nm: points on the normal just outside the cleft."""
        d = 0.5 * cfg.cleft_width_nm + 20.0
        return self.center - d * self.normal, self.center + d * self.normal


def _segment_closest_points(pa, da, la, pb, db, lb):
    """Closest points between segments a(s) = pa + s da, |s| <= la and b(t) likewise.

    All inputs (n, 3) / (n,), unit directions; returns (ca, cb) (n, 3).
    """
    r = pa - pb
    b = (da * db).sum(1)
    c = (da * r).sum(1)
    f = (db * r).sum(1)
    denom = 1.0 - b * b
    s = np.where(denom > 1e-9, (b * f - c) / np.maximum(denom, 1e-9), 0.0)
    s = np.clip(s, -la, la)
    t = b * s + f
    t_cl = np.clip(t, -lb, lb)
    s = np.where(t != t_cl, np.clip(b * t_cl - c, -la, la), s)
    return pa + s[:, None] * da, pb + t_cl[:, None] * db


def synapses_in_box(cfg: SyntheticConfig, nr: Neurons, lo_nm, hi_nm,
                    warp: Optional[WarpField] = None) -> Synapses:
    """Synapses whose centre lies in the box [lo_nm, hi_nm] (nm, real space).

    ``nr`` must hold every neurite within ``neuron_margin_nm + synapse spacing`` of the box
    (see :func:`neurons_in_box`). The result depends only on the config and the box
    membership of each synapse, never on ``nr`` beyond that.
    """
    warp = warp or WarpField.from_config(cfg)
    lo_nm = np.asarray(lo_nm, np.float64)
    hi_nm = np.asarray(hi_nm, np.float64)
    spacing = _synapse_spacing_nm(cfg)
    cand = _contact_candidates(cfg, nr, lo_nm - spacing, hi_nm + spacing, warp)
    if len(cand) == 0:
        return cand
    # thinning: drop a candidate when a higher-priority one lies within the spacing
    prio = hash_uniform(cfg.seed, ST_SYN, cand.pre_id, cand.post_id, 99)
    diff = cand.center[:, None, :] - cand.center[None, :, :]
    close = (diff * diff).sum(-1) < spacing * spacing
    beats = close & ((prio[None, :] < prio[:, None]) |
                     ((prio[None, :] == prio[:, None]) & (cand.ids[None, :] < cand.ids[:, None])))
    keep = ~beats.any(axis=1)
    inside = np.all((cand.center >= lo_nm) & (cand.center < hi_nm), axis=1)
    return cand.subset(keep & inside)


def _contact_candidates(cfg: SyntheticConfig, nr: Neurons, lo_nm, hi_nm, warp: WarpField) -> Synapses:
    """Accepted axon-dendrite contacts with centres in [lo_nm, hi_nm), before thinning."""
    empty = Synapses(*([np.zeros(0, np.uint64)] + [np.zeros(0, np.int64)] * 2
                       + [np.zeros(0, np.uint64)] * 2 + [np.zeros(0, bool)]
                       + [np.zeros((0, 3))] * 5 + [np.zeros((0, 2))]))
    w = warp.max_displacement
    ax = np.flatnonzero(nr.is_axon)
    de = np.flatnonzero(~nr.is_axon)
    if len(ax) == 0 or len(de) == 0:
        return empty
    # a contact point lies within (radius + spacing*sqrt3) of both segments; prefilter by
    # the segment's distance to the (warped) box
    reach = cfg.neuron_spacing_nm * math.sqrt(3.0) + max(cfg.dendrite_radius_nm[1], cfg.axon_radius_nm[1]) + w

    def near_box(idx):
        c = 0.5 * (lo_nm + hi_nm)
        half = 0.5 * (hi_nm - lo_nm)
        d = capsule_distance(c[None], nr.pos[idx], nr.dir[idx], nr.half_len[idx])
        return idx[d <= np.linalg.norm(half) + reach]

    ax, de = near_box(ax), near_box(de)
    if len(ax) == 0 or len(de) == 0:
        return empty
    # every neurite that can come within the clearance of a valid contact point in the box
    reach += cfg.contact_clearance_nm
    near_all = near_box(np.arange(len(nr)))
    reach -= cfg.contact_clearance_nm
    A, D = np.meshgrid(ax, de, indexing="ij")
    A, D = A.ravel(), D.ravel()
    sep = np.linalg.norm(nr.pos[A] - nr.pos[D], axis=1)
    ok = sep <= nr.half_len[A] + nr.half_len[D] + 2 * reach
    A, D = A[ok], D[ok]
    ca, cb = _segment_closest_points(nr.pos[A], nr.dir[A], nr.half_len[A],
                                     nr.pos[D], nr.dir[D], nr.half_len[D])
    gap = np.linalg.norm(cb - ca, axis=1)
    # the bisection below needs D_a < D_b at ca and D_a > D_b at cb
    ok = (gap - nr.radius[A] - nr.radius[D] <= 2 * cfg.neuron_spacing_nm) & \
         (gap > np.abs(nr.radius[A] - nr.radius[D]) + 1.0)
    # coin flip per pair
    ok &= hash_uniform(cfg.seed, ST_SYN, nr.ids[A], nr.ids[D], 0) < cfg.synapse_probability
    A, D, ca, cb = A[ok], D[ok], ca[ok], cb[ok]
    if len(A) == 0:
        return empty

    def f(p):  # weighted distance difference a - b at warped points p
        da = capsule_distance(p, nr.pos[A], nr.dir[A], nr.half_len[A]) - nr.radius[A]
        db = capsule_distance(p, nr.pos[D], nr.dir[D], nr.half_len[D]) - nr.radius[D]
        return da - db

    lo_t, hi_t = np.zeros(len(A)), np.ones(len(A))
    for _ in range(40):
        mid = 0.5 * (lo_t + hi_t)
        neg = f(ca + mid[:, None] * (cb - ca)) < 0
        lo_t = np.where(neg, mid, lo_t)
        hi_t = np.where(neg, hi_t, mid)
    q0 = ca + (0.5 * (lo_t + hi_t))[:, None] * (cb - ca)
    # the pair must be the two nearest neurites at q0, with clearance
    wd = weighted_distances(q0, nr.subset(near_all))               # (c, n_near)
    wd[(near_all[None, :] == A[:, None]) | (near_all[None, :] == D[:, None])] = np.inf
    own = capsule_distance(q0, nr.pos[A], nr.dir[A], nr.half_len[A]) - nr.radius[A]
    ok = wd.min(axis=1) - own >= cfg.contact_clearance_nm
    # normal (pre -> post) from the gradients of the two distances
    def grad(idx, p):
        v = p - nr.pos[idx]
        t = np.clip((v * nr.dir[idx]).sum(1), -nr.half_len[idx], nr.half_len[idx])
        g = v - t[:, None] * nr.dir[idx]
        return g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-9)
    n = grad(A, q0) - grad(D, q0)
    n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-9)
    ok &= np.abs(n[:, 0]) <= cfg.synapse_max_normal_z
    q = warp.invert(q0)
    ok &= np.all((q >= lo_nm) & (q < hi_nm), axis=1)
    A, D, q0, q, n = A[ok], D[ok], q0[ok], q[ok], n[ok]
    if len(A) == 0:
        return empty
    pre_id, post_id = nr.ids[A], nr.ids[D]
    u = [hash_uniform(cfg.seed, ST_SYN, pre_id, post_id, c) for c in range(1, 4)]
    e1 = _perpendicular(n, u[0])
    e2 = np.cross(n, e1)
    r = _lerp(cfg.synapse_radius_nm, u[1])
    radii = np.stack([r * (1.0 + 0.15 * (2 * u[2] - 1)), r * (1.0 - 0.15 * (2 * u[2] - 1))], axis=1)
    vlo, vhi = lattice_box(cfg)
    n_ids = np.uint64(np.prod(vhi - vlo + 1) + 1)
    ids = (pre_id * n_ids + post_id).astype(np.uint64)
    order = np.argsort(ids, kind="stable")
    s = Synapses(ids=ids, pre=A, post=D, pre_id=pre_id, post_id=post_id, exc=nr.is_exc[A],
                 center=q, center_warped=q0, normal=n, e1=e1, e2=e2, radii=radii)
    return s.subset(order)


# ----------------------------------------------------------------------------------------
# vesicles
# ----------------------------------------------------------------------------------------

@dataclass
class Vesicles:
    """Synaptic vesicles (ellipsoids, real space). ``center`` (v, 3) nm, ``axes`` (v, 3, 3)
    rows = unit axes, ``radii`` (v, 3) nm semi-axes, ``synapse`` (v,) index into Synapses."""

    center: np.ndarray
    axes: np.ndarray
    radii: np.ndarray
    synapse: np.ndarray

    def __len__(self) -> int:
        return len(self.synapse)


def vesicles_of(cfg: SyntheticConfig, syn: Synapses, nr: Neurons, warp: WarpField) -> Vesicles:
    """Vesicle cloud of each synapse: inside the presynaptic neurite, away from its membrane.

    ``nr`` must be the Neurons the synapses were computed from (all neurites near them).
    """
    nmax = cfg.vesicles_per_synapse[1]
    if len(syn) == 0:
        return Vesicles(np.zeros((0, 3)), np.zeros((0, 3, 3)), np.zeros((0, 3)), np.zeros(0, np.int64))
    si = np.repeat(np.arange(len(syn)), nmax)
    slot = np.tile(np.arange(nmax), len(syn))
    u = [hash_uniform(cfg.seed, ST_VES, syn.ids[si], slot, c) for c in range(8)]
    count = cfg.vesicles_per_synapse[0] + np.floor(
        hash_uniform(cfg.seed, ST_VES, syn.ids, 10**6) * (cfg.vesicles_per_synapse[1] - cfg.vesicles_per_synapse[0] + 1))
    exc = syn.exc[si]
    diam = np.where(exc, _lerp(cfg.vesicle_diameter_e_nm, u[0]), _lerp(cfg.vesicle_diameter_i_nm, u[0]))
    rad_long = 0.5 * diam
    # position: uniform over 85% of the disc, depth biased towards the active zone
    rho = 0.85 * np.sqrt(u[1])
    th = 2 * np.pi * u[2]
    a = rho * np.cos(th) * syn.radii[si, 0]
    b = rho * np.sin(th) * syn.radii[si, 1]
    depth_min = 0.5 * cfg.cleft_width_nm + rad_long + 6.0
    depth = depth_min + (cfg.vesicle_cloud_depth_nm - depth_min) * u[3] ** 1.7
    c = (syn.center[si] + a[:, None] * syn.e1[si] + b[:, None] * syn.e2[si]
         - depth[:, None] * syn.normal[si])
    keep = slot < count[si]
    # inside the bouton: the presynaptic neurite wins the warped point by a margin that
    # guarantees the whole vesicle (plus its membrane) stays inside. Only neurites whose
    # weighted distance at the synapse centre is within 2 * reach + margin of the
    # presynaptic one can matter (all distances are 1-Lipschitz).
    margin = 2.0 * (rad_long + 0.5 * cfg.membrane_thickness_nm + 8.0)
    reach = (math.hypot(max(cfg.synapse_radius_nm[1] * 1.15, 1.0), cfg.vesicle_cloud_depth_nm)
             + 2.0 * warp.max_displacement + 1.0)
    near = np.flatnonzero(capsule_distance(
        syn.center_warped.mean(0)[None], nr.pos, nr.dir, nr.half_len)
        <= np.linalg.norm(np.ptp(syn.center_warped, axis=0)) + reach * 3 + margin.max()
        + cfg.neuron_spacing_nm * math.sqrt(3.0) + max(cfg.dendrite_radius_nm[1], cfg.axon_radius_nm[1]))
    dq = weighted_distances(syn.center_warped, nr.subset(near))               # (s, n_near)
    dpre = capsule_distance(syn.center_warped, nr.pos[syn.pre], nr.dir[syn.pre],
                            nr.half_len[syn.pre]) - nr.radius[syn.pre]
    rel = (dq - dpre[:, None] <= 2 * reach + margin.max()) & (near[None, :] != syn.pre[:, None])
    kmax = max(int(rel.sum(1).max()), 1)
    nb = np.full((len(syn), kmax), -1, np.int64)
    for j in range(len(syn)):
        sel = near[rel[j]]
        nb[j, :len(sel)] = sel
    cw = c + warp.at_points(c)
    nbv = nb[si]                                                              # (v, kmax)
    nbc = np.maximum(nbv, 0)
    wd = capsule_distance(cw[:, None], nr.pos[nbc], nr.dir[nbc], nr.half_len[nbc]) - nr.radius[nbc]
    wd[nbv < 0] = np.inf
    pre = syn.pre[si]
    own = capsule_distance(cw, nr.pos[pre], nr.dir[pre], nr.half_len[pre]) - nr.radius[pre]
    keep &= wd.min(axis=1) - own >= margin
    # keep the cloud on its side of the synapse: no overlap with the disc of any other synapse
    axes_long = _unit_vectors(u[4], u[5])
    flat = np.where(exc, 1.0, cfg.vesicle_flattening_i)
    ax1 = axes_long
    ax2 = _perpendicular(ax1, u[6])
    ax3 = np.cross(ax1, ax2)
    axes = np.stack([ax1, ax2, ax3], axis=1)
    radii = np.stack([rad_long, rad_long * np.where(exc, 1.0, 0.5 * (1 + flat)), rad_long * flat], axis=1)
    # a vesicle overlapping an earlier valid vesicle of the same synapse is dropped
    cs = c.reshape(len(syn), nmax, 3)
    rs = rad_long.reshape(len(syn), nmax)
    ks = keep.reshape(len(syn), nmax)
    dist = np.linalg.norm(cs[:, :, None] - cs[:, None, :], axis=-1)          # (s, v, v)
    earlier = np.arange(nmax)[None, :] < np.arange(nmax)[:, None]             # [i, j]: j < i
    overlap = (dist < 0.9 * (rs[:, :, None] + rs[:, None, :])) & earlier[None] & ks[:, None, :]
    keep &= ~overlap.any(axis=2).ravel()
    return Vesicles(center=c[keep], axes=axes[keep], radii=radii[keep], synapse=si[keep])
