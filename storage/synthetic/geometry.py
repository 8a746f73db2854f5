"""The world model behind the synthetic EM volume: neurites, mitochondria, synapses, vesicles.

Everything here is a pure function of global coordinates (nm, axis order z, y, x, origin at
voxel (0, 0, 0) of the volume) and of the seed, so any block of the volume can be rendered on
its own and agrees byte for byte with its neighbours:

- **Neurites** are capsules (line segments) seeded one per cell of a global cubic lattice
  (spacing ``neuron_spacing_nm``); each lattice cell's randomness comes from an integer hash
  of (seed, stream, i, j, k), never from a sequential RNG. A point belongs to the neurite with
  the smallest *scaled distance* ``D = distance_to_segment * scale`` with
  ``scale = (100 + offset) / (weight + offset)`` (a multiplicatively weighted Voronoi diagram
  of segments: curved, round boundaries; a skeleton always owns itself), evaluated at the
  point displaced by a smooth sinusoidal warp field. Dendrites are thick; axons thin, and the
  axon capsules of a block of lattice cells are the branches of one axon neuron (one id, one
  transmitter class: Dale's principle).
- **Synapses** are found from sample points along synapse-forming axons: where the axon's
  boundary with a dendrite is near, the point is moved onto it by bisection, kept where no
  third neurite comes close and thinned so that no two synapses overlap.
- **Vesicles** and **mitochondria** are placed with per-synapse / per-neurite hashes.

Every neurite that can own a voxel lies within :func:`neuron_margin_nm` of it, which is how a
block knows which seeds it needs; D is ``scale``-Lipschitz, which bounds the culling.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from cleftwise.storage.errors import StorageError

__all__ = [
    "SyntheticConfig", "Neurons", "Mitochondria", "Synapses", "Vesicles", "WarpField",
    "hash_u64", "hash_uniform", "capsule_distance", "neurite_scale", "neurons_in_box",
    "mitochondria_of", "synapses_in_box", "vesicles_of", "neuron_margin_nm",
    "synapse_extent_nm", "synapse_neuron_margin_nm", "lattice_box", "scaled_distances",
    "candidate_capsules", "grouped_candidates", "refine_candidates", "capsule_tables",
    "SynapseTiles",
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
    axon_radius_nm: tuple[float, float] = (50.0, 110.0)
    """Size weight of non-synaptic axons (see ``weight_offset_nm``)."""
    synaptic_axon_radius_nm: tuple[float, float] = (130.0, 220.0)
    """Size weight of synapse-forming axons (their boutons hold the vesicle clouds)."""
    dendrite_radius_nm: tuple[float, float] = (120.0, 300.0)
    """Size weight of dendrites."""
    weight_offset_nm: float = 100.0
    """A point belongs to the neurite with the smallest distance-to-skeleton / (weight +
    this offset): a multiplicatively weighted Voronoi diagram of segments, whose curved
    (Apollonius) boundaries give round profiles and never cut a neurite's own skeleton."""
    axon_half_length_nm: tuple[float, float] = (900.0, 2200.0)
    """Half length of an axon's skeleton segment."""
    dendrite_half_length_nm: tuple[float, float] = (500.0, 1400.0)
    """Half length of a dendrite's skeleton segment."""
    warp_amplitude_nm: float = 30.0
    """Largest in-plane displacement of the smooth warp that bends the neurites."""
    warp_wavelength_nm: tuple[float, float] = (800.0, 2500.0)
    """Wavelengths of the warp's sinusoids."""
    axon_group_cells: int = 3
    """The axon capsules seeded in one (g x g x g) block of lattice cells are branches of one
    axon: one neuron id, one transmitter class; where they touch they fuse (no membrane)."""
    light_fraction: float = 0.04
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
    texture_amplitude: float = 0.09
    """Relative amplitude of the granular cytoplasm texture."""
    mottle_amplitude: float = 0.06
    """Relative amplitude of the smooth mid-scale mottling of the cytoplasm."""
    mottle_cell_px: int = 14
    """Lattice spacing (pixels) of the mottling value noise."""
    texture_sigma_px: float = 1.5
    """In-plane correlation length of the texture (pixels)."""
    blur_sigma_px: float = 0.8
    """In-plane Gaussian blur standing in for the microscope's point spread (pixels)."""
    noise_std: float = 0.03
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
    synapse_probability: float = 1.0
    """Probability that a sample point along a synaptic axon is tried as a synapse site
    (scales the synapse density)."""
    e_fraction: float = 0.78
    """Fraction of axons that are excitatory (the rest inhibitory)."""
    synapse_radius_nm: tuple[float, float] = (130.0, 200.0)
    """Radius of the synaptic disc on the shared membrane (260-400 nm wide)."""
    synapse_max_normal_z: float = 0.7
    """Contacts whose membrane is closer than acos(this) to the section plane are skipped
    (en-face synapses cannot be polarity-annotated in anisotropic EM)."""
    contact_clearance_nm: float = 25.0
    """A contact is valid when every third neurite's scaled distance at the contact point
    exceeds the pair's by this much (keeps synapse centres off triple junctions)."""
    synaptic_axon_fraction: float = 0.6
    """Fraction of axons (branched axon neurons) that form synapses; each makes several."""
    synapse_sample_step_nm: float = 160.0
    """Spacing of the sample points along a synaptic axon from which contacts are sought."""
    synapse_move_nm: float = 250.0
    """A sample point becomes a contact only if its axon's boundary with a dendrite is
    within this distance."""
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
    vesicles_per_synapse: tuple[int, int] = (70, 130)
    """Range of vesicle counts per synapse (fewer where the bouton is too small to hold them)."""
    vesicle_diameter_e_nm: tuple[float, float] = (38.0, 50.0)
    """Diameter of round excitatory vesicles."""
    vesicle_diameter_i_nm: tuple[float, float] = (26.0, 34.0)
    """Long diameter of flattened inhibitory vesicles."""
    vesicle_flattening_i: float = 0.6
    """Short/long axis ratio of inhibitory vesicles."""
    vesicle_cloud_depth_nm: float = 220.0
    """Largest distance of a vesicle centre from the cleft."""

    # implementation
    synapse_tile_nm: float = 2048.0
    """Synapses are computed per cube of this size on a global grid and cached (a bounded
    LRU), so neighbouring blocks share the work; never changes results."""
    tile_shape: tuple[int, int, int] = (1, 16, 16)
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
        for name in ("axon_radius_nm", "dendrite_radius_nm", "synaptic_axon_radius_nm", "axon_half_length_nm",
                     "dendrite_half_length_nm", "warp_wavelength_nm", "mito_radius_nm",
                     "mito_half_length_nm", "synapse_radius_nm", "vesicle_diameter_e_nm",
                     "vesicle_diameter_i_nm"):
            vec(name, 2, integer=False)
            lo, hi = getattr(self, name)
            if lo > hi:
                raise StorageError(f"SyntheticConfig.{name}: low {lo} > high {hi}")
        vec("vesicles_per_synapse", 2)
        for name in ("axon_fraction", "light_fraction", "synapse_probability", "e_fraction",
                     "synaptic_axon_fraction",
                     "synapse_max_normal_z", "vesicle_flattening_i"):
            v = float(getattr(self, name))
            if not 0.0 <= v <= 1.0:
                raise StorageError(f"SyntheticConfig.{name} must lie in [0, 1], got {v}")
        need = 0.5 * self.cleft_width_nm + 0.5 * self.membrane_thickness_nm + self.psd_thickness_e_nm
        need_pre = need - self.psd_thickness_e_nm + self.psd_thickness_i_nm
        if self.post_band_nm < need or self.pre_band_nm < need_pre:
            raise StorageError(
                f"SyntheticConfig.post_band_nm ({self.post_band_nm}) must be >= half cleft + half "
                f"membrane + excitatory PSD ({need}) and pre_band_nm must hold the presynaptic density")
        for name in ("synapse_sample_step_nm", "synapse_move_nm"):
            if getattr(self, name) <= 0:
                raise StorageError(f"SyntheticConfig.{name} must be > 0, got {getattr(self, name)}")
        if int(self.mottle_cell_px) < 1:
            raise StorageError(f"SyntheticConfig.mottle_cell_px must be >= 1, got {self.mottle_cell_px}")
        if self.section_thickness_nm is not None and self.section_thickness_nm <= 0:
            raise StorageError("SyntheticConfig.section_thickness_nm must be positive or None, "
                               f"got {self.section_thickness_nm}")
        for name in ("texture_sigma_px", "blur_sigma_px", "noise_std", "texture_amplitude",
                     "mottle_amplitude", "section_gain_std", "section_offset_std"):
            if getattr(self, name) < 0:
                raise StorageError(f"SyntheticConfig.{name} must be >= 0, got {getattr(self, name)}")
        if int(self.axon_group_cells) < 1:
            raise StorageError(f"SyntheticConfig.axon_group_cells must be >= 1, got {self.axon_group_cells}")
        if self.weight_offset_nm <= 0 or min(self.axon_radius_nm[0], self.dendrite_radius_nm[0],
                                              self.synaptic_axon_radius_nm[0]) < 0:
            raise StorageError("SyntheticConfig: weight_offset_nm must be > 0 and radii >= 0")
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

    @property
    def scale_range(self) -> tuple[float, float]:
        """(smallest, largest) distance scale of any neurite (see :func:`neurite_scale`)."""
        radii = self.axon_radius_nm + self.synaptic_axon_radius_nm + self.dendrite_radius_nm
        return neurite_scale(self, max(radii)), neurite_scale(self, min(radii))

    @property
    def max_half_length_nm(self) -> float:
        return max(self.axon_half_length_nm[1], self.dendrite_half_length_nm[1])

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
(ST_NEURON, ST_MITO, ST_SYN, ST_VES, ST_WARP, ST_PIX, ST_SECTION, ST_PIXROW, ST_PIXCOL,
 ST_MOTTLE) = range(1, 11)


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

def neurite_scale(cfg: SyntheticConfig, radius):
    """Distance scale of a neurite of size weight ``radius`` (nm): (100 + c) / (radius + c)."""
    c = cfg.weight_offset_nm
    return (100.0 + c) / (np.asarray(radius, np.float64) + c)


@dataclass
class Neurons:
    """Neurite capsules; arrays have one row per capsule.

    ``pos`` (n, 3) segment centre nm, ``dir`` (n, 3) unit axis, ``half_len`` (n,) nm,
    ``radius`` (n,) size weight nm, ``scale`` (n,) distance scale, ``ids`` (n,) uint64
    neuron label ids (nonzero; the capsules of one branched axon share their id), ``keys``
    (n,) uint64 unique capsule keys, ``lattice`` (n, 3) int64 lattice cell, ``is_axon`` /
    ``is_synaptic`` / ``is_exc`` / ``is_light`` (n,) bool (``is_exc`` is the transmitter
    class of axons), ``grey`` (n,) base intensity. Rows are in lattice (C) order, which is
    also the tie-breaking order everywhere.
    """

    pos: np.ndarray
    dir: np.ndarray
    half_len: np.ndarray
    radius: np.ndarray
    scale: np.ndarray
    ids: np.ndarray
    keys: np.ndarray
    lattice: np.ndarray
    is_axon: np.ndarray
    is_synaptic: np.ndarray
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
    v0, v1, v2 = p[..., 0] - pos[..., 0], p[..., 1] - pos[..., 1], p[..., 2] - pos[..., 2]
    d0, d1, d2 = direction[..., 0], direction[..., 1], direction[..., 2]
    t = np.clip(v0 * d0 + v1 * d1 + v2 * d2, -half_len, half_len)
    v0 -= t * d0
    v1 -= t * d1
    v2 -= t * d2
    return np.sqrt(v0 * v0 + v1 * v1 + v2 * v2)


def scaled_distances(p: np.ndarray, nr: Neurons) -> np.ndarray:
    """Scaled distances D of warped points p (m, 3) nm to every neurite: (m, n) float64.

    The owner of a warped point is the argmin over neurites (ties: lower row)."""
    p = np.asarray(p, np.float64).reshape(-1, 3)
    out = np.empty((len(p), len(nr)), np.float64)
    step = max(1, 250_000 // max(len(nr), 1))  # bounded temporaries
    for a in range(0, len(p), step):
        out[a:a + step] = capsule_distance(p[a:a + step, None, :], nr.pos[None], nr.dir[None],
                                           nr.half_len[None]) * nr.scale[None]
    return out


def owner_reach_nm(cfg: SyntheticConfig, extra: float = 0.0) -> float:
    """Largest distance (nm) from a point p to the skeleton of a neurite k with
    D_k(p) <= min_j D_j(p) + extra. The seed of p's own lattice cell is within
    spacing * sqrt(3), so min_j D_j(p) <= spacing * sqrt(3) * s_max."""
    s_min, s_max = cfg.scale_range
    return (cfg.neuron_spacing_nm * math.sqrt(3.0) * s_max + extra) / s_min


def neuron_margin_nm(cfg: SyntheticConfig, warp: Optional["WarpField"] = None) -> float:
    """Distance from a voxel within which every neurite that can own it has its seed."""
    w = (warp or WarpField.from_config(cfg)).max_displacement
    return owner_reach_nm(cfg) + cfg.max_half_length_nm + w + 1.0


def synapse_extent_nm(cfg: SyntheticConfig) -> float:
    """Largest distance from a synapse centre to any voxel it renders (disc, bands, vesicles)."""
    return (cfg.synapse_radius_nm[1] * 1.2 + cfg.vesicle_cloud_depth_nm
            + max(cfg.vesicle_diameter_e_nm[1], cfg.vesicle_diameter_i_nm[1]) + cfg.section_nm)


def _synapse_spacing_nm(cfg: SyntheticConfig) -> float:
    """Minimum distance between two synapse centres."""
    return 2.0 * cfg.synapse_radius_nm[1] + 20.0


def _vesicle_reach_nm(cfg: SyntheticConfig, warp: "WarpField") -> float:  # noqa: D401
    """Largest distance between a synapse centre and one of its vesicle centres (warped)."""
    return (math.hypot(cfg.synapse_radius_nm[1] * 1.15, cfg.vesicle_cloud_depth_nm)
            + 2.0 * warp.max_displacement + 1.0)


def _vesicle_margin_nm(cfg: SyntheticConfig, radius) -> np.ndarray:
    """Distance a vesicle centre keeps from its bouton's membrane."""
    return np.asarray(radius) + 0.5 * cfg.membrane_thickness_nm + 6.0


def synapse_neuron_margin_nm(cfg: SyntheticConfig) -> float:
    """Margin around a box of synapse centres within which all neurites that decide those
    synapses (partners, third neurites checked for clearance, vesicle hosts and thinning
    neighbours) have their seeds."""
    warp = WarpField.from_config(cfg)
    w = warp.max_displacement
    s_min, s_max = cfg.scale_range
    e = _vesicle_reach_nm(cfg, warp)
    m = float(_vesicle_margin_nm(cfg, 0.5 * max(cfg.vesicle_diameter_e_nm[1], cfg.vesicle_diameter_i_nm[1])))
    extra = max(cfg.contact_clearance_nm + 2 * s_max * (cfg.synapse_move_nm + w),
                2.0 * s_max * (e + m))
    return (owner_reach_nm(cfg, extra) + cfg.max_half_length_nm + w + _synapse_spacing_nm(cfg)
            + cfg.synapse_move_nm + 1.0)


def lattice_box(cfg: SyntheticConfig) -> tuple[np.ndarray, np.ndarray]:
    """Inclusive lattice index range (lo (3,), hi (3,)) of all neurites the volume can see,
    partners and neighbours included; ids are derived from indices inside this box."""
    ext = np.array(cfg.shape, np.float64) * np.array(cfg.voxel_size, np.float64)
    m = synapse_neuron_margin_nm(cfg) + synapse_extent_nm(cfg) + 1000.0
    s = cfg.neuron_spacing_nm
    return np.floor(-m / s).astype(np.int64), np.floor((ext + m) / s).astype(np.int64)


def neurons_in_box(cfg: SyntheticConfig, lo_nm, hi_nm) -> Neurons:
    """All neurites whose seed lattice cell intersects the box [lo_nm, hi_nm] (nm, (z, y, x)),
    clipped to the volume's lattice box, in lattice order."""
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
    u = [hash_uniform(cfg.seed, ST_NEURON, i, j, k, c) for c in range(8)]
    pos = (lat + np.stack(u[0:3], axis=-1)) * s
    direction = _unit_vectors(u[3], u[4])
    is_axon = u[5] < cfg.axon_fraction
    # neuron-level properties: a dendrite is its own neuron; the axon capsules of one
    # (g x g x g) block of lattice cells are the branches of one axon (one id, one class)
    grp = np.floor_divide(lat, cfg.axon_group_cells)
    key = np.where(is_axon[:, None], grp, lat)
    kind = np.where(is_axon, 1, 2)
    v = [hash_uniform(cfg.seed, ST_NEURON, key[:, 0], key[:, 1], key[:, 2], kind, 100 + c)
         for c in range(5)]
    is_exc = v[0] < cfg.e_fraction
    is_synaptic = is_axon & (v[4] < cfg.synaptic_axon_fraction)
    is_light = (v[1] < cfg.light_fraction) & ~is_axon
    radius = np.where(is_axon, _lerp(cfg.axon_radius_nm, u[6]), _lerp(cfg.dendrite_radius_nm, u[6]))
    radius = np.where(is_synaptic, _lerp(cfg.synaptic_axon_radius_nm, u[6]), radius)
    half_len = np.where(is_axon, _lerp(cfg.axon_half_length_nm, u[7]),
                        _lerp(cfg.dendrite_half_length_nm, u[7]))
    z = np.sqrt(-2 * np.log(np.maximum(v[2], 1e-12))) * np.cos(2 * np.pi * v[3])  # N(0, 1)
    grey = cfg.cytoplasm_intensity + cfg.cytoplasm_intensity_std * np.clip(z, -2.5, 2.5)
    grey = np.where(is_axon, grey + 0.03, grey)
    grey = np.where(is_light, np.minimum(0.85, grey + 0.14), grey)
    vlo, vhi = lattice_box(cfg)
    dims = tuple(vhi - vlo + 1)
    glo = np.floor_divide(vlo, cfg.axon_group_cells)
    gdims = tuple(np.floor_divide(vhi, cfg.axon_group_cells) - glo + 1)
    if len(lat):
        cell = np.ravel_multi_index(tuple((lat - vlo).T), dims).astype(np.uint64) + np.uint64(1)
        gid = np.ravel_multi_index(tuple((grp - glo).T), gdims).astype(np.uint64)
        ids = np.where(is_axon, np.uint64(np.prod(dims)) + np.uint64(1) + gid, cell)
    else:
        cell = ids = np.zeros(0, np.uint64)
    return Neurons(pos=pos, dir=direction, half_len=half_len, radius=radius,
                   scale=neurite_scale(cfg, radius), ids=ids, keys=cell, lattice=lat,
                   is_axon=is_axon, is_synaptic=is_synaptic, is_exc=is_exc, is_light=is_light,
                   grey=grey)


def candidate_capsules(centres: np.ndarray, pos, direc, half_len, scale, offset, bound,
                       second: bool = True, ids: Optional[np.ndarray] = None,
                       slack: float = 0.0) -> np.ndarray:
    """Per cell, the sorted row indices of capsules that can matter within ``bound`` nm of the
    cell centre; rows padded with ``len(pos)``.

    The function of capsule i is ``D_i = capsule_distance * scale_i - offset_i``, which
    changes by at most ``scale_i * bound`` within the cell. With ``second``, kept are all
    capsules that can be the nearest, or the nearest of another id (``ids``; capsule-wise
    without), or within ``slack`` of that, anywhere in the cell. Without ``second``, those
    whose D can be <= ``slack`` there (objects drawn where D < 0).
    centres (t, 3) nm; scale/offset (n,) or scalars; returns (t, k) int64.
    """
    n = len(pos)
    if n == 0:
        return np.zeros((len(centres), 0), np.int64)
    scale = np.broadcast_to(np.asarray(scale, np.float64), (n,))
    offset = np.broadcast_to(np.asarray(offset, np.float64), (n,))
    d = np.empty((len(centres), n), np.float64)
    step = max(1, 250_000 // n)
    for a in range(0, len(centres), step):
        d[a:a + step] = (capsule_distance(centres[a:a + step, None, :], pos[None], direc[None],
                                          half_len[None]) * scale[None] - offset[None])
    bound = np.asarray(bound, np.float64).reshape(-1, 1)                 # scalar or (t,)
    lower = d - bound * scale[None]
    if second:
        upper = d + bound * scale[None]
        if ids is not None:
            first = ids[np.argmin(upper, axis=1)]
            ref = np.where(ids[None, :] == first[:, None], np.inf, upper).min(axis=1)
            # the second-nearest id's distance is at most the larger of the two smallest
            # per-id upper bounds; if every capsule has one id, any bound works
            ref = np.maximum(ref, upper.min(axis=1))
            ref = np.where(np.isfinite(ref), ref, upper.min(axis=1))
        else:
            j = min(1, n - 1)
            ref = np.partition(upper, j, axis=1)[:, j]
        keep = lower <= (ref + slack + 1.0)[:, None]
    else:
        keep = lower <= slack + 1.0
    k = int(keep.sum(axis=1).max())
    idx = np.where(keep, np.arange(n)[None, :], n)
    idx.sort(axis=1)
    return idx[:, :k]


def capsule_tables(pos, direc, half_len, scale, ids=None, offset=None) -> dict:
    """Row tables for :func:`refine_candidates`, padded with one far-away row."""
    n = len(half_len)
    t = dict(pos=_padded_rows(np.asarray(pos, np.float64), _FAR_NM),
             dir=_padded_rows(np.asarray(direc, np.float64), 1.0),
             hl=_padded_rows(np.asarray(half_len, np.float64), 0.0),
             s=_padded_rows(np.broadcast_to(np.asarray(scale, np.float64), (n,)).copy(), 1.0))
    if ids is not None:
        t["ids"] = _padded_rows(np.asarray(ids).astype(np.int64), -1)
    if offset is not None:
        t["r"] = _padded_rows(np.broadcast_to(np.asarray(offset, np.float64), (n,)).copy(), 0.0)
    return t


def refine_candidates(centres: np.ndarray, bounds: np.ndarray, pool: np.ndarray, C: dict,
                      second: bool = True, slack: float = 0.0) -> np.ndarray:
    """Narrow a per-cell candidate ``pool`` (t, k) of rows (padded with n) to the rows that
    can matter within ``bounds`` (t,) nm of ``centres`` (t, 3), by the rule of
    :func:`candidate_capsules` (capsule-wise when the tables ``C`` have no ``ids``).
    Returns sorted rows (t, k') padded with n."""
    n = len(C["hl"]) - 1
    if pool.shape[1] == 0:
        return pool
    d = capsule_distance(centres[:, None, :], C["pos"][pool], C["dir"][pool], C["hl"][pool])
    sc = C["s"][pool]
    d = d * sc - (C["r"][pool] if "r" in C else 0.0)
    lower = d - bounds[:, None] * sc
    real = pool < n
    if second:
        upper = np.where(real, d + bounds[:, None] * sc, np.inf)
        if "ids" in C:
            ids = C["ids"][pool]
            first = np.take_along_axis(ids, np.argmin(upper, axis=1)[:, None], 1)
            ref = np.where(ids == first, np.inf, upper).min(axis=1)
            ref = np.where(np.isfinite(ref), ref, upper.min(axis=1))
        else:
            j = min(1, pool.shape[1] - 1)
            ref = np.partition(upper, j, axis=1)[:, j]
        keep = lower <= (ref + slack + 1.0)[:, None]
    else:
        keep = lower <= slack + 1.0
    keep &= real
    k = max(int(keep.sum(axis=1).max()), 1)
    idx = np.where(keep, pool, n)
    idx.sort(axis=1)
    return idx[:, :k]


def grouped_candidates(points: np.ndarray, nr: Neurons, rows: np.ndarray, cell: float,
                       slack: float = 0.0) -> np.ndarray:
    """For each point (m, 3) nm, the sorted rows of ``nr`` (from ``rows``) that can be its
    nearest capsule or its nearest capsule of another id, or within ``slack`` of that.

    Culling from one box around all points down an octree of cubes to cubes of ``cell`` nm,
    each level refining its parent's list (vectorised). ``rows`` must contain every capsule
    that can matter. Returns (m, k) int64 padded with ``len(nr)``.
    """
    m = len(points)
    if m == 0 or len(rows) == 0:
        return np.full((m, 1), len(nr), np.int64)
    C = capsule_tables(nr.pos, nr.dir, nr.half_len, nr.scale, ids=nr.ids)
    rows = np.asarray(rows, np.int64)
    sub = nr.subset(rows)
    levels = max(0, int(round(math.log2(max(_TOP_CELL_NM / cell, 1.0)))))
    pool = point_cell = None
    for lev in range(levels, -1, -1):
        size = cell * 2.0 ** lev
        ijk = np.floor(points / size).astype(np.int64)
        ijk -= ijk.min(axis=0)
        span = ijk.max(axis=0) + 1
        flat = (ijk[:, 0] * span[1] + ijk[:, 1]) * span[2] + ijk[:, 2]
        _, first_of, inv = np.unique(flat, return_index=True, return_inverse=True)
        keys = np.floor(points[first_of] / size).astype(np.int64)
        centres = (keys + 0.5) * size
        bounds = np.full(len(keys), math.sqrt(3.0) * 0.5 * size)
        if pool is None:    # top level: from all given rows
            idx = candidate_capsules(centres, sub.pos, sub.dir, sub.half_len, sub.scale, 0.0,
                                     bounds, ids=sub.ids, slack=slack)
            pool = _padded_rows(rows, len(nr))[idx]
        else:
            pool = refine_candidates(centres, bounds, pool[point_cell[first_of]], C, second=True,
                                     slack=slack)
        point_cell = inv.ravel()
    return pool[point_cell]


def _near_box(nr: Neurons, idx: np.ndarray, lo_nm, hi_nm, reach: float) -> np.ndarray:
    """The rows ``idx`` whose skeleton passes within ``reach`` nm of the box (conservative)."""
    c = 0.5 * (np.asarray(lo_nm) + np.asarray(hi_nm))
    half = float(np.linalg.norm(0.5 * (np.asarray(hi_nm) - np.asarray(lo_nm))))
    d = capsule_distance(c[None], nr.pos[idx], nr.dir[idx], nr.half_len[idx])
    return idx[d <= half + reach]


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

_FAR_NM = 1.0e6
_TOP_CELL_NM = 1000.0  # coarsest cell of grouped_candidates
_MAX_SAMPLES = 256  # synapse sample slots per capsule (ids are capsule key * 256 + slot + 1)


@dataclass
class Synapses:
    """Synapse definitions; one row per synapse, ordered by id. Self-contained (no row
    indices into a Neurons table), so the synapses of different regions concatenate.

    ``ids`` (s,) uint64 nonzero; ``pre_id``/``post_id`` (s,) neuron ids; ``pre_key`` /
    ``post_key`` (s,) capsule keys; ``pre_capsule``/``post_capsule`` (s, 8) the two capsules
    (centre z, y, x nm, unit axis z, y, x, half length nm, distance scale); ``exc`` (s,) bool
    (the axon's class); ``center`` (s, 3) real-space point on the shared membrane, nm;
    ``center_warped`` (s, 3) the same point in warped space; ``normal`` (s, 3) unit normal
    pointing from pre to post; ``e1``/``e2`` (s, 3) in-membrane axes; ``radii`` (s, 2) disc
    semi-axes nm.
    """

    ids: np.ndarray
    pre_id: np.ndarray
    post_id: np.ndarray
    pre_key: np.ndarray
    post_key: np.ndarray
    pre_capsule: np.ndarray
    post_capsule: np.ndarray
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

    @staticmethod
    def concatenate(parts: Sequence["Synapses"]) -> "Synapses":
        """Rows of several Synapses, deduplicated by id, ordered by id."""
        if not parts:
            return _empty_synapses()
        cat = Synapses(**{f.name: np.concatenate([getattr(p, f.name) for p in parts])
                          for f in dataclasses.fields(Synapses)})
        _, first = np.unique(cat.ids, return_index=True)
        return cat.subset(first)

    def sites(self, cfg: SyntheticConfig) -> tuple[np.ndarray, np.ndarray]:
        """Pre and post site (s, 3) nm, real space: on the normal, 20 nm beyond the cleft."""
        d = 0.5 * cfg.cleft_width_nm + 20.0
        return self.center - d * self.normal, self.center + d * self.normal


def _empty_synapses() -> Synapses:
    z3 = np.zeros((0, 3))
    return Synapses(ids=np.zeros(0, np.uint64), pre_id=np.zeros(0, np.uint64),
                    post_id=np.zeros(0, np.uint64), pre_key=np.zeros(0, np.uint64),
                    post_key=np.zeros(0, np.uint64), pre_capsule=np.zeros((0, 8)),
                    post_capsule=np.zeros((0, 8)),
                    exc=np.zeros(0, bool), center=z3, center_warped=z3, normal=z3, e1=z3, e2=z3,
                    radii=np.zeros((0, 2)))


def _padded_rows(a: np.ndarray, fill) -> np.ndarray:
    return np.concatenate([a, np.full((1,) + a.shape[1:], fill, a.dtype)])


def synapses_in_box(cfg: SyntheticConfig, nr: Neurons, lo_nm, hi_nm,
                    warp: Optional[WarpField] = None) -> Synapses:
    """Synapses whose centre lies in the box [lo_nm, hi_nm) (nm, real space), ordered by id.

    ``nr`` must hold every neurite with a seed within :func:`synapse_neuron_margin_nm` of the
    box (see :func:`neurons_in_box`); then the result depends on nothing else, so every block
    sees the same synapses.
    """
    warp = warp or WarpField.from_config(cfg)
    lo_nm = np.asarray(lo_nm, np.float64)
    hi_nm = np.asarray(hi_nm, np.float64)
    spacing = _synapse_spacing_nm(cfg)
    cand = _contact_candidates(cfg, nr, lo_nm - spacing, hi_nm + spacing, warp)
    if len(cand) == 0:
        return cand
    # thinning: drop a candidate when a higher-priority one lies within the spacing
    prio = hash_uniform(cfg.seed, ST_SYN, cand.ids, 99)
    diff = cand.center[:, None, :] - cand.center[None, :, :]
    close = (diff * diff).sum(-1) < spacing * spacing
    beats = close & ((prio[None, :] < prio[:, None]) |
                     ((prio[None, :] == prio[:, None]) & (cand.ids[None, :] < cand.ids[:, None])))
    keep = ~beats.any(axis=1)
    inside = np.all((cand.center >= lo_nm) & (cand.center < hi_nm), axis=1)
    return cand.subset(keep & inside)


def _contact_candidates(cfg: SyntheticConfig, nr: Neurons, lo_nm, hi_nm, warp: WarpField) -> Synapses:
    """Axon-dendrite contacts with centres in [lo_nm, hi_nm), before thinning.

    Along the skeleton of each synapse-forming axon capsule, sample points are spaced
    ``synapse_sample_step_nm`` apart (warped space, hashed jitter, each kept with
    ``synapse_probability``). A sample whose nearest neurite is its capsule and whose nearest
    neurite of another neuron is a dendrite within ``synapse_move_nm`` is moved onto their
    boundary along the gradient of the distance difference (bisection). The contact is valid
    when every other capsule's D there exceeds the pair's by ``contact_clearance_nm`` and the
    membrane is not too close to the section plane. Ids are ``capsule key * 256 + slot + 1``.
    """
    step_nm = cfg.synapse_sample_step_nm
    move = cfg.synapse_move_nm
    W = warp.max_displacement
    if len(nr) < 2:
        return _empty_synapses()
    axons = np.flatnonzero(nr.is_synaptic)
    axons = _near_box(nr, axons, lo_nm, hi_nm, move + W + 0.3 * max(cfg.synaptic_axon_radius_nm[1], 1.0))
    nsamp = np.minimum(np.floor(2 * nr.half_len[axons] / step_nm).astype(np.int64), _MAX_SAMPLES)
    if nsamp.sum() == 0:
        return _empty_synapses()
    owner = np.repeat(axons, nsamp)
    slot = np.concatenate([np.arange(k) for k in nsamp])
    sid = nr.keys[owner] * np.uint64(_MAX_SAMPLES) + slot.astype(np.uint64)
    u = [hash_uniform(cfg.seed, ST_SYN, sid, c) for c in range(1, 5)]
    t = -nr.half_len[owner] + (slot + u[0]) * step_nm
    g = (nr.pos[owner] + t[:, None] * nr.dir[owner]
         + (0.3 * nr.radius[owner] * u[1])[:, None] * _perpendicular(nr.dir[owner], u[2]))
    ok = (u[3] < cfg.synapse_probability) & np.all((g >= lo_nm - move - W) & (g < hi_nm + move + W), axis=1)
    g, owner, sid = g[ok], owner[ok], sid[ok]
    if len(g) == 0:
        return _empty_synapses()
    s_min, s_max = cfg.scale_range
    pos, direc = _padded_rows(nr.pos, _FAR_NM), _padded_rows(nr.dir, 1.0)
    hl, sc = _padded_rows(nr.half_len, 0.0), _padded_rows(nr.scale, 1.0)
    is_axon = _padded_rows(nr.is_axon, True)
    nid = _padded_rows(nr.ids, 0)

    def dist(p, idx):  # scaled distances of points p (..., 3) to capsules idx (...)
        return capsule_distance(p, pos[idx], direc[idx], hl[idx]) * sc[idx]

    def grad(p, idx):  # gradient of the scaled distance
        v = p - pos[idx]
        tt = np.clip((v * direc[idx]).sum(-1), -hl[idx], hl[idx])
        q = v - tt[..., None] * direc[idx]
        return q * (sc[idx] / np.maximum(np.linalg.norm(q, axis=-1), 1e-9))[..., None]

    # every capsule that can be (nearly) nearest anywhere near the samples and contacts
    near = _near_box(nr, np.arange(len(nr)), g.min(0) - move, g.max(0) + move,
                     owner_reach_nm(cfg, cfg.contact_clearance_nm) + 1.0)
    cell = 2.0 * step_nm
    ci = grouped_candidates(g, nr, near, cell)                           # (G, K)
    d = dist(g[:, None, :], ci)
    rows = np.arange(len(g))
    j1 = np.argmin(d, axis=1)                                           # first = lowest row on ties
    n1 = ci[rows, j1]
    d_other = np.where(nid[ci] == nid[n1][:, None], np.inf, d)
    j2 = np.argmin(d_other, axis=1)
    n2 = ci[rows, j2]
    d1, d2 = d[rows, j1], d_other[rows, j2]
    ok = (n1 == owner) & np.isfinite(d2) & ~is_axon[n2] & (d2 - d1 <= 2.0 * s_max * move)
    g, ci, n1, n2, sid = g[ok], ci[ok], n1[ok], n2[ok], sid[ok]
    if len(g) == 0:
        return _empty_synapses()
    step = grad(g, n1) - grad(g, n2)
    step /= np.maximum(np.linalg.norm(step, axis=1, keepdims=True), 1e-9)
    f = lambda p: dist(p, n1) - dist(p, n2)  # noqa: E731  (< 0 on the axon's side)
    ok = f(g + move * step) > 0
    lo_t, hi_t = np.zeros(len(g)), np.full(len(g), move)
    for _ in range(32):
        mid = 0.5 * (lo_t + hi_t)
        neg = f(g + mid[:, None] * step) < 0
        lo_t = np.where(neg, mid, lo_t)
        hi_t = np.where(neg, hi_t, mid)
    q0 = g + (0.5 * (lo_t + hi_t))[:, None] * step
    # clearance from every other capsule at the contact point
    ci = grouped_candidates(q0, nr, near, cell, slack=cfg.contact_clearance_nm)
    dq = dist(q0[:, None, :], ci)
    dq[(ci == n1[:, None]) | (ci == n2[:, None])] = np.inf
    ok &= dq.min(axis=1) - dist(q0, n1) >= cfg.contact_clearance_nm
    n = grad(q0, n1) - grad(q0, n2)                                    # pre -> post
    n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-9)
    ok &= np.abs(n[:, 0]) <= cfg.synapse_max_normal_z
    pre, post, q0, n, sid = n1[ok], n2[ok], q0[ok], n[ok], sid[ok]
    if len(pre) == 0:
        return _empty_synapses()
    q = warp.invert(q0)
    ok = np.all((q >= lo_nm) & (q < hi_nm), axis=1)
    pre, post, q0, q, n, ids = pre[ok], post[ok], q0[ok], q[ok], n[ok], sid[ok] + np.uint64(1)
    if len(pre) == 0:
        return _empty_synapses()
    u = [hash_uniform(cfg.seed, ST_SYN, ids, c) for c in range(10, 13)]
    e1 = _perpendicular(n, u[0])
    e2 = np.cross(n, e1)
    r = _lerp(cfg.synapse_radius_nm, u[1])
    radii = np.stack([r * (1.0 + 0.15 * (2 * u[2] - 1)), r * (1.0 - 0.15 * (2 * u[2] - 1))], axis=1)
    def capsule(rows):
        return np.concatenate([nr.pos[rows], nr.dir[rows], nr.half_len[rows, None],
                               nr.scale[rows, None]], axis=1)

    s = Synapses(ids=ids, pre_id=nr.ids[pre], post_id=nr.ids[post], pre_key=nr.keys[pre],
                 post_key=nr.keys[post], pre_capsule=capsule(pre), post_capsule=capsule(post),
                 exc=nr.is_exc[pre], center=q, center_warped=q0, normal=n, e1=e1, e2=e2,
                 radii=radii)
    return s.subset(np.argsort(ids, kind="stable"))


# ----------------------------------------------------------------------------------------
# vesicles
# ----------------------------------------------------------------------------------------

@dataclass
class Vesicles:
    """Synaptic vesicles (ellipsoids, real space). ``center`` (v, 3) nm, ``axes`` (v, 3, 3)
    rows = unit axes, ``radii`` (v, 3) nm semi-axes, ``synapse_id`` (v,) uint64 id of the
    synapse they belong to."""

    center: np.ndarray
    axes: np.ndarray
    radii: np.ndarray
    synapse_id: np.ndarray

    def __len__(self) -> int:
        return len(self.synapse_id)

    def subset(self, sel) -> "Vesicles":
        return Vesicles(self.center[sel], self.axes[sel], self.radii[sel], self.synapse_id[sel])

    @staticmethod
    def concatenate(parts: Sequence["Vesicles"]) -> "Vesicles":
        if not parts:
            return _empty_vesicles()
        return Vesicles(*(np.concatenate([getattr(p, f) for p in parts])
                          for f in ("center", "axes", "radii", "synapse_id")))


def _empty_vesicles() -> Vesicles:
    return Vesicles(np.zeros((0, 3)), np.zeros((0, 3, 3)), np.zeros((0, 3)), np.zeros(0, np.uint64))


def vesicles_of(cfg: SyntheticConfig, syn: Synapses, nr: Neurons, warp: WarpField) -> Vesicles:
    """Vesicle cloud of each synapse: inside the presynaptic capsule, away from its membrane.

    ``nr`` must be the Neurons the synapses were computed from (all neurites near them).
    Every decision uses only neurites that can matter (by the Lipschitz bound), so the
    result does not depend on which block asks.
    """
    nmax = 2 * cfg.vesicles_per_synapse[1]  # tries; the first valid ``count`` are kept
    if len(syn) == 0:
        return _empty_vesicles()
    si = np.repeat(np.arange(len(syn)), nmax)
    slot = np.tile(np.arange(nmax), len(syn))
    u = [hash_uniform(cfg.seed, ST_VES, syn.ids[si], slot, c) for c in range(8)]
    lo_n, hi_n = cfg.vesicles_per_synapse
    count = lo_n + np.floor(hash_uniform(cfg.seed, ST_VES, syn.ids, 10**6) * (hi_n - lo_n + 1))
    exc = syn.exc[si]
    diam = np.where(exc, _lerp(cfg.vesicle_diameter_e_nm, u[0]), _lerp(cfg.vesicle_diameter_i_nm, u[0]))
    rad_long = 0.5 * diam
    # position: uniform over 80% of the disc, depth biased towards the active zone
    rho = 0.8 * np.sqrt(u[1])
    th = 2 * np.pi * u[2]
    a = rho * np.cos(th) * syn.radii[si, 0]
    b = rho * np.sin(th) * syn.radii[si, 1]
    depth_min = 0.5 * cfg.cleft_width_nm + rad_long + 6.0
    depth = depth_min + (cfg.vesicle_cloud_depth_nm - depth_min) * u[3] ** 1.3
    c = (syn.center[si] + a[:, None] * syn.e1[si] + b[:, None] * syn.e2[si]
         - depth[:, None] * syn.normal[si])
    keep = np.ones(len(si), bool)
    # inside the bouton: the presynaptic capsule must beat every other capsule k at the
    # warped centre by (s_k + s_pre) * margin, which keeps the whole vesicle inside; the
    # capsules that can matter are found per cell (see grouped_candidates)
    margin = _vesicle_margin_nm(cfg, rad_long)
    m_max = float(margin.max())
    s_min, s_max = cfg.scale_range
    cw = c + warp.at_points(c)
    reach = _vesicle_reach_nm(cfg, warp)
    q0 = syn.center_warped
    near = _near_box(nr, np.arange(len(nr)), q0.min(0), q0.max(0),
                     owner_reach_nm(cfg, 2 * s_max * (m_max + reach)) + reach + 1.0)
    sub = nr.subset(near)
    per_syn = candidate_capsules(q0, sub.pos, sub.dir, sub.half_len, sub.scale, 0.0, reach,
                                 ids=sub.ids, slack=2 * s_max * m_max)     # (s, k)
    per_syn = _padded_rows(near, len(nr))[per_syn]
    pos, direc = _padded_rows(nr.pos, _FAR_NM), _padded_rows(nr.dir, 1.0)
    hl, sc = _padded_rows(nr.half_len, 0.0), _padded_rows(nr.scale, 1.0)
    keys = _padded_rows(nr.keys, 0)
    step = max(1, 400_000 // max(per_syn.shape[1] * nmax, 1)) * nmax          # bounded memory
    for a in range(0, len(si), step):
        sl = slice(a, a + step)
        nbv = per_syn[si[sl]]                                                # (v, k)
        wd = capsule_distance(cw[sl, None], pos[nbv], direc[nbv], hl[nbv]) * sc[nbv]
        wd[keys[nbv] == syn.pre_key[si[sl]][:, None]] = np.inf
        pc = syn.pre_capsule[si[sl]]
        own = capsule_distance(cw[sl], pc[:, 0:3], pc[:, 3:6], pc[:, 6]) * pc[:, 7]
        need = (sc[nbv] + pc[:, 7:8]) * margin[sl, None]
        keep[sl] &= np.all(wd - own[:, None] >= need, axis=1)
    axes_long = _unit_vectors(u[4], u[5])
    flat = np.where(exc, 1.0, cfg.vesicle_flattening_i)
    ax2 = _perpendicular(axes_long, u[6])
    ax3 = np.cross(axes_long, ax2)
    axes = np.stack([axes_long, ax2, ax3], axis=1)
    radii = np.stack([rad_long, rad_long * np.where(exc, 1.0, 0.5 * (1 + flat)), rad_long * flat], axis=1)
    # a vesicle overlapping an earlier valid vesicle of the same synapse is dropped
    cs = c.reshape(len(syn), nmax, 3)
    rs = rad_long.reshape(len(syn), nmax)
    ks = keep.reshape(len(syn), nmax).copy()
    for j in range(len(syn)):
        v = np.flatnonzero(ks[j])
        cj, rj = cs[j][v], rs[j][v]
        d2 = ((cj[:, None, :] - cj[None, :, :]) ** 2).sum(-1)
        lim = (0.85 * (rj[:, None] + rj[None, :])) ** 2
        ks[j, v] = ~np.tril(d2 < lim, k=-1).any(axis=1)
    keep = ks.ravel()
    rank = np.cumsum(keep.reshape(len(syn), nmax), axis=1).ravel()
    keep &= rank <= count[si]
    return Vesicles(center=c[keep], axes=axes[keep], radii=radii[keep], synapse_id=syn.ids[si[keep]])


class SynapseTiles:
    """Synapses and vesicles of one config, computed per cube of a global grid
    (``synapse_tile_nm``) and kept in a bounded LRU cache so neighbouring blocks share them.

    A tile holds exactly the synapses whose centre lies in it (:func:`synapses_in_box` is
    exact for any box), so the answer never depends on the order of queries.
    """

    def __init__(self, cfg: SyntheticConfig, warp: Optional[WarpField] = None, max_tiles: int = 24):
        self.cfg = cfg
        self.warp = warp or WarpField.from_config(cfg)
        self.max_tiles = int(max_tiles)
        self._cache: "dict[tuple, tuple[Synapses, Vesicles]]" = {}
        self._margin = synapse_neuron_margin_nm(cfg)

    def _tile(self, key: tuple) -> "tuple[Synapses, Vesicles]":
        hit = self._cache.pop(key, None)
        if hit is None:
            size = self.cfg.synapse_tile_nm
            lo = (np.array(key, np.float64) - 0.5) * size   # tiles are centred on the grid
            hi = lo + size
            nr = neurons_in_box(self.cfg, lo - self._margin, hi + self._margin)
            syn = synapses_in_box(self.cfg, nr, lo, hi, self.warp)
            hit = (syn, vesicles_of(self.cfg, syn, nr, self.warp))
            log.debug("synthetic: synapse tile %s -> %d synapses", key, len(syn))
        self._cache[key] = hit                                   # most recently used last
        while len(self._cache) > self.max_tiles:
            self._cache.pop(next(iter(self._cache)))
        return hit

    def query(self, lo_nm, hi_nm) -> "tuple[Synapses, Vesicles]":
        """Synapses with centre in [lo_nm, hi_nm) (real space, nm) and their vesicles."""
        size = self.cfg.synapse_tile_nm
        lo_nm = np.asarray(lo_nm, np.float64)
        hi_nm = np.asarray(hi_nm, np.float64)
        if np.prod(hi_nm - lo_nm) < size ** 3:      # small query: cheaper to compute directly
            nr = neurons_in_box(self.cfg, lo_nm - self._margin, hi_nm + self._margin)
            syn = synapses_in_box(self.cfg, nr, lo_nm, hi_nm, self.warp)
            return syn, vesicles_of(self.cfg, syn, nr, self.warp)
        a = np.floor(lo_nm / size + 0.5).astype(np.int64)
        b = np.floor(hi_nm / size + 0.5).astype(np.int64)
        parts = [self._tile((i, j, k)) for i in range(a[0], b[0] + 1)
                 for j in range(a[1], b[1] + 1) for k in range(a[2], b[2] + 1)]
        syn = Synapses.concatenate([p[0] for p in parts])
        syn = syn.subset(np.all((syn.center >= lo_nm) & (syn.center < hi_nm), axis=1))
        ves = Vesicles.concatenate([p[1] for p in parts])
        ves = ves.subset(np.isin(ves.synapse_id, syn.ids))
        return syn, ves
