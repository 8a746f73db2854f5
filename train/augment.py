"""Patch augmentation for anisotropic EM: geometry, intensity and section defects.

:class:`AugmentConfig` (RSUNet patches, ``data.augment``) and :class:`CubeAugmentConfig`
(classifier cubes, ``augment``; applied by ``train_classifier.augment_batch``) share the
switches of :class:`AugmentBase`.

Arrays are (z, y, x), or (c, z, y, x) for multi-channel targets; raw is float32 in [0, 1].
Every function draws its randomness from the ``numpy.random.Generator`` it is given, so a
sample is a pure function of its seed.

* geometry (raw and target alike): flips along z, y, x; y↔x transpose and in-plane rot90
  (square in-plane patches only; otherwise only 180° turns) — polarity channels move with the
  voxels, so pre stays pre;
* misaligned sections (raw and target alike, as in a mis-registered stack whose annotation
  follows the image): either one section slips, or every section from a random z on is
  translated, by up to ``misalign_max_px`` pixels; the patch is cut from a region read with
  that margin around it, so no padding enters;
* intensity (raw only): contrast and brightness, gamma, per-section brightness jitter and
  Gaussian noise;
* missing sections (raw only): a section is replaced by a constant value, the label keeps
  what was there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from cleftwise.train.errors import TrainError

__all__ = ["AugmentBase", "AugmentConfig", "CubeAugmentConfig", "geometric_params", "apply_geometric",
           "misalign_offsets", "crop_misaligned", "intensity_augment", "missing_sections", "augment_patch"]


@dataclass
class AugmentBase:
    """The switches shared by RSUNet patch and classifier cube augmentation."""

    enabled: bool = True
    """False = no augmentation at all (validation data never is augmented)."""
    flip_z: bool = True
    """Random flip along z."""
    flip_yx: bool = True
    """Random flips along y and x."""
    rot90: bool = True
    """Random in-plane rotation by k·90° (k·180° when the in-plane shape is not square)."""
    intensity_p: float = 0.8
    """Probability of the contrast/brightness/gamma change (per patch or cube)."""


@dataclass
class AugmentConfig(AugmentBase):
    """RSUNet patch augmentation: which augmentations run and how strong they are (pixels are
    in-plane voxels)."""

    transpose: bool = True
    """Random y↔x transpose (square in-plane patches only)."""
    contrast_range: tuple[float, float] = (0.75, 1.25)
    """Contrast factor around the patch mean."""
    brightness_range: tuple[float, float] = (-0.1, 0.1)
    """Added brightness (intensity units, 1 = white)."""
    gamma_range: tuple[float, float] = (0.75, 1.35)
    """Gamma exponent range."""
    section_jitter: float = 0.03
    """Std of an extra per-section brightness offset."""
    noise_std_max: float = 0.03
    """Gaussian noise with std uniform in [0, this]."""
    missing_section_p: float = 0.03
    """Probability, per section, that it is missing (replaced by ``missing_value``)."""
    missing_value: float = 0.0
    """Value of a missing section (0 = black)."""
    misalign_p: float = 0.2
    """Probability, per patch, of a misalignment."""
    misalign_max_px: int = 8
    """Largest in-plane shift of a misaligned section (pixels); also the read margin."""
    misalign_slip_fraction: float = 0.5
    """Of the misalignments, the fraction that are one-section slips (the rest translate all
    sections from a random z on)."""

    def __post_init__(self) -> None:
        for name in ("intensity_p", "missing_section_p", "misalign_p", "misalign_slip_fraction"):
            v = float(getattr(self, name))
            if not 0.0 <= v <= 1.0:
                raise TrainError(f"augment.{name} must lie in [0, 1], got {v}")
        for name in ("contrast_range", "brightness_range", "gamma_range"):
            lo, hi = (float(v) for v in getattr(self, name))
            if lo > hi:
                raise TrainError(f"augment.{name}: low {lo} > high {hi}")
            setattr(self, name, (lo, hi))
        if self.gamma_range[0] <= 0 or self.contrast_range[0] < 0:
            raise TrainError("augment.gamma_range must be > 0 and contrast_range >= 0")
        if int(self.misalign_max_px) < 0:
            raise TrainError(f"augment.misalign_max_px must be >= 0, got {self.misalign_max_px}")
        self.misalign_max_px = int(self.misalign_max_px)

    @property
    def margin_px(self) -> int:
        """In-plane margin (pixels, per side) a patch must be read with."""
        if not self.enabled or self.misalign_p <= 0:
            return 0
        return self.misalign_max_px


@dataclass
class CubeAugmentConfig(AugmentBase):
    """Classifier training-cube augmentation (validation/test cubes are never augmented)."""

    shift: bool = True
    """random shift of the cube within data.margin"""
    contrast: tuple[float, float] = (0.75, 1.25)
    """contrast factor around the cube mean"""
    brightness: float = 0.08
    """largest brightness shift (intensity units, 1 = white)"""
    gamma: tuple[float, float] = (0.8, 1.25)
    """gamma range"""
    noise_std: float = 0.03
    """largest standard deviation of additive Gaussian noise"""
    mixup_alpha: float = 0.0
    """MixUp Beta(α, α) (0 = off)"""
    mixup_p: float = 0.5
    """probability that a batch is mixed (when mixup_alpha > 0)"""


def geometric_params(rng: np.random.Generator, cfg: AugmentConfig, square: bool) -> dict:
    """Random flips (z, y, x), transpose and in-plane quarter turns; identity if disabled."""
    flips = (bool(cfg.flip_z and rng.random() < 0.5),
             bool(cfg.flip_yx and rng.random() < 0.5),
             bool(cfg.flip_yx and rng.random() < 0.5))
    transpose = bool(cfg.transpose and square and rng.random() < 0.5)
    k = int(rng.integers(4)) if cfg.rot90 else 0
    if not square:
        k = k - k % 2
    return {"flips": flips, "transpose": transpose, "k": k}


def apply_geometric(array: np.ndarray, params: dict) -> np.ndarray:
    """Apply :func:`geometric_params` to the last three axes (z, y, x) of ``array``."""
    out = array
    for axis, flip in zip((-3, -2, -1), params["flips"]):
        if flip:
            out = np.flip(out, axis=axis)
    if params["transpose"]:
        out = np.swapaxes(out, -2, -1)
    if params["k"]:
        out = np.rot90(out, k=params["k"], axes=(-2, -1))
    return np.ascontiguousarray(out)


def misalign_offsets(rng: np.random.Generator, cfg: AugmentConfig, depth: int) -> np.ndarray:
    """(depth, 2) int (dy, dx) shift per section, all in [-margin, margin]; mostly zeros."""
    out = np.zeros((depth, 2), np.int64)
    m = cfg.margin_px
    if m == 0 or depth < 2 or rng.random() >= cfg.misalign_p:
        return out
    shift = rng.integers(-m, m + 1, size=2)
    z = int(rng.integers(1, depth))
    if rng.random() < cfg.misalign_slip_fraction:
        out[z] = shift
    else:
        out[z:] = shift
    return out


def crop_misaligned(array: np.ndarray, offsets: np.ndarray, margin: int,
                    out_yx: tuple[int, int]) -> np.ndarray:
    """Cut (…, z, Y, X) from (…, z, Y + 2·margin, X + 2·margin), each section shifted by ``offsets``.

    Section z of the result is ``array[..., z, margin + dy : margin + dy + Y, …]``.
    """
    ny, nx = out_yx
    if array.shape[-2] != ny + 2 * margin or array.shape[-1] != nx + 2 * margin:
        raise TrainError(f"crop_misaligned: array in-plane shape {array.shape[-2:]} is not "
                         f"{(ny, nx)} + 2 x margin {margin}")
    if margin == 0:
        return array
    out = np.empty(array.shape[:-2] + (ny, nx), array.dtype)
    for z in range(array.shape[-3]):
        y0 = margin + int(offsets[z, 0])
        x0 = margin + int(offsets[z, 1])
        out[..., z, :, :] = array[..., z, y0:y0 + ny, x0:x0 + nx]
    return out


def intensity_augment(raw: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """Contrast, brightness, gamma, section jitter and noise on float32 (z, y, x) raw in [0, 1]."""
    out = raw.astype(np.float32, copy=True)
    if rng.random() < cfg.intensity_p:
        mean = float(out.mean())
        contrast = rng.uniform(*cfg.contrast_range)
        brightness = rng.uniform(*cfg.brightness_range)
        out = (out - mean) * np.float32(contrast) + np.float32(mean + brightness)
        np.clip(out, 0.0, 1.0, out=out)
        gamma = rng.uniform(*cfg.gamma_range)
        out **= np.float32(gamma)
    if cfg.section_jitter > 0:
        out += rng.normal(0.0, cfg.section_jitter, size=(out.shape[0], 1, 1)).astype(np.float32)
    if cfg.noise_std_max > 0:
        std = rng.uniform(0.0, cfg.noise_std_max)
        out += rng.normal(0.0, std, size=out.shape).astype(np.float32)
    np.clip(out, 0.0, 1.0, out=out)
    return out


def missing_sections(raw: np.ndarray, rng: np.random.Generator, p: float,
                     value: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Replace each (z, y, x) section with probability ``p`` by ``value``.

    Returns ``(raw, missing)`` where ``missing`` is a bool (z,) vector; ``raw`` is a copy only
    when a section was replaced.
    """
    missing = rng.random(raw.shape[0]) < p
    if missing.any():
        raw = raw.copy()
        raw[missing] = value
    return raw, missing


def augment_patch(raw: np.ndarray, target: np.ndarray, rng: np.random.Generator,
                  cfg: Optional[AugmentConfig], patch_yx: tuple[int, int],
                  margin: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Augment one training sample.

    Args:
        raw: float32 (z, Y + 2m, X + 2m) in [0, 1], read with in-plane margin ``m = margin``.
        target: (z, Y + 2m, X + 2m) or (c, z, Y + 2m, X + 2m) target on the same grid.
        rng: the sample's generator.
        cfg: augmentation settings (None or disabled: only the margin is cut off).
        patch_yx: (Y, X) in-plane patch size.
        margin: in-plane margin (pixels per side) of the inputs; must be >= ``cfg.margin_px``
            for misalignment to happen.

    Returns:
        ``(raw, target)`` of in-plane size (Y, X), C-contiguous.
    """
    depth = raw.shape[0]
    if cfg is None or not cfg.enabled:
        offsets = np.zeros((depth, 2), np.int64)
        return (np.ascontiguousarray(crop_misaligned(raw, offsets, margin, patch_yx)),
                np.ascontiguousarray(crop_misaligned(target, offsets, margin, patch_yx)))
    offsets = misalign_offsets(rng, cfg, depth)
    np.clip(offsets, -margin, margin, out=offsets)
    raw = crop_misaligned(raw, offsets, margin, patch_yx)
    target = crop_misaligned(target, offsets, margin, patch_yx)
    params = geometric_params(rng, cfg, square=patch_yx[0] == patch_yx[1])
    raw = apply_geometric(raw, params)
    target = apply_geometric(target, params)
    raw = intensity_augment(raw, rng, cfg)
    raw, _ = missing_sections(raw, rng, cfg.missing_section_p, cfg.missing_value)
    return np.ascontiguousarray(raw), np.ascontiguousarray(target)
