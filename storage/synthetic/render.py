"""Rendering one block of the synthetic EM volume from the world model.

:func:`render_block` turns a box of global voxel indices into the image and every ground-truth
array. Each voxel's value is a function of its global index only (neurite ownership at the
warped position, hashed per-voxel noise, per-section gains), and the in-plane blurs read a
halo that is rendered the same way, so blocks tile the volume seamlessly.

Speed comes from culling: each slab of sections is cut into small tiles
(``SyntheticConfig.tile_shape``, grouped 4 x 4 for a first pass) and only capsules that can be
the nearest, or the nearest of another neuron, somewhere in a tile's box of warped positions
are evaluated there (each scaled distance is ``scale``-Lipschitz, so a bound from the box
centre is exact). Tiles are processed sorted by candidate count, so the k-th pass touches only
tiles that have a k-th candidate. Culling never changes a result; ties go to the capsule
earlier in lattice order.

Sections are treated as slabs of physical thickness T (``section_nm``): a membrane, cleft or
vesicle seen obliquely is widened by T/2 |n_z| and diluted, as in a TEM projection image.
"""

from __future__ import annotations

import logging
import math
from typing import Optional

import numpy as np
from scipy import ndimage

from cleftwise.storage.errors import StorageError
from cleftwise.storage.synthetic.geometry import (
    ST_MOTTLE, ST_PIX, ST_PIXCOL, ST_PIXROW, ST_SECTION, Mitochondria, Neurons, SynapseTiles,
    Synapses, SyntheticConfig, Vesicles, WarpField, _mix, candidate_capsules, capsule_distance,
    hash_u64, hash_uniform, mitochondria_of, neuron_margin_nm, neurons_in_box, synapse_extent_nm,
)

__all__ = ["render_block", "halo_px"]

log = logging.getLogger(__name__)

_F = np.float32
_FAR = 1.0e6  # nm; position of the padding neurite that never wins


def halo_px(cfg: SyntheticConfig) -> int:
    """In-plane halo (pixels) the blurs need around a block."""
    return int(3.0 * cfg.texture_sigma_px + 0.5) + int(3.0 * cfg.blur_sigma_px + 0.5) + 1


def _smooth_band(g: np.ndarray, lo, hi, soft: float = 1.5) -> np.ndarray:
    """1 inside [lo, hi], linear ramps of half-width ``soft`` (nm) at the edges, 0 outside."""
    return np.clip(np.minimum(g - lo, hi - g) / (2.0 * soft) + 0.5, 0.0, 1.0)


def _value_noise(seed: int, zi, yi, xi, cell: int) -> np.ndarray:
    """Smooth per-section value noise in [-0.5, 0.5), float32 (len(zi), len(yi), len(xi)).

    Values hashed on a global lattice of ``cell`` pixels are interpolated with smoothstep
    weights, so any block sees the same field."""
    out = None
    ly0 = np.floor_divide(yi, cell)
    lx0 = np.floor_divide(xi, cell)
    fy = ((yi - ly0 * cell) / cell).astype(_F)
    fx = ((xi - lx0 * cell) / cell).astype(_F)
    fy = fy * fy * (3 - 2 * fy)
    fx = fx * fx * (3 - 2 * fx)
    ly = np.arange(ly0.min(), ly0.max() + 2)
    lx = np.arange(lx0.min(), lx0.max() + 2)
    v = (hash_uniform(seed, ST_MOTTLE, zi[:, None, None], ly[None, :, None], lx[None, None, :])
         - 0.5).astype(_F)
    iy, ix = ly0 - ly[0], lx0 - lx[0]
    vx = v[:, :, ix] * (1 - fx) + v[:, :, ix + 1] * fx                     # (z, ny, x)
    out = vx[:, iy, :] * (1 - fy)[None, :, None] + vx[:, iy + 1, :] * fy[None, :, None]
    return out


_COARSE = 4  # tiles per side of a culling group
_TOL = 1.0  # culling tolerance (nm), far above float32 rounding of the distances


def _refine(centres: np.ndarray, bounds: np.ndarray, pool: np.ndarray, C: dict,
            second: bool) -> np.ndarray:
    """Narrow per-tile candidate ``pool`` (t, k) rows (padded with n) to the rows that can
    matter within ``bounds`` (t,) nm of ``centres`` (t, 3) (same rule as
    :func:`candidate_capsules`); returns sorted rows (t, k') padded with n."""
    n = len(C["hl"]) - 1
    if pool.shape[1] == 0:
        return pool
    d = capsule_distance(centres[:, None, :], C["pos"][pool], C["dir"][pool], C["hl"][pool])
    sc = C["s"][pool]
    d = d * sc - (C["r"][pool] if "r" in C else 0.0)
    lower = d - bounds[:, None] * sc
    if second:
        upper = d + bounds[:, None] * sc
        ids = C["ids"][pool]
        first = np.take_along_axis(ids, np.argmin(upper, axis=1)[:, None], 1)
        ref = np.where(ids == first, np.inf, upper).min(axis=1)
        ref = np.where(np.isfinite(ref), ref, upper.min(axis=1))
        keep = lower <= (ref + _TOL)[:, None]
    else:
        keep = lower <= _TOL
    keep &= pool < n
    k = max(int(keep.sum(axis=1).max()), 1)
    idx = np.where(keep, pool, n)
    idx.sort(axis=1)
    return idx[:, :k]


def _padded(arr: np.ndarray, fill) -> np.ndarray:
    return np.concatenate([arr, np.full((1,) + arr.shape[1:], fill, arr.dtype)])


def render_block(cfg: SyntheticConfig, start, shape, warp: Optional[WarpField] = None,
                 tiles: Optional[SynapseTiles] = None) -> dict:
    """Render the voxels [start, start + shape) (global indices, (z, y, x)).

    Returns a dict of arrays over exactly that box:

    - ``raw`` uint8 (z, y, x): the EM-like image.
    - ``neurons`` uint64 (z, y, x): neurite id of every voxel (no zeros; each membrane is
      split between the two cells it separates, at the exact boundary).
    - ``synapses`` uint64 (z, y, x): synapse instance ids on cleft + pre band + post band.
    - ``polarity`` uint8 (3, z, y, x): 0/1 pre side, post side, union.
    - ``cleft`` uint8 (z, y, x): 0/1 cleft (both membranes and the gap between them).
    - ``synapse_defs``: the :class:`Synapses` whose centre lies within reach of the box.
    - ``neuron_defs``: the :class:`Neurons` (capsules) that can own voxels of the box.

    ``warp`` and ``tiles`` (a :class:`SynapseTiles` cache) may be shared between calls for
    speed; they never change the result.
    """
    start = np.asarray(start, np.int64)
    shape = np.asarray(shape, np.int64)
    if start.shape != (3,) or shape.shape != (3,) or np.any(shape <= 0):
        raise StorageError(f"synthetic block: start {start.tolist()} / shape {shape.tolist()} "
                           "must be 3 integers (z, y, x), shape positive")
    warp = warp or WarpField.from_config(cfg)
    vs = np.asarray(cfg.voxel_size, np.float64)
    tz, ty, tx = cfg.tile_shape
    halo = halo_px(cfg)
    # padded region: no halo in z (nothing mixes sections), halo in y/x, tile multiples
    p0 = np.array([start[0], start[1] - halo, start[2] - halo])
    pshape = np.array([
        -(-shape[0] // tz) * tz,
        -(-(shape[1] + 2 * halo) // ty) * ty,
        -(-(shape[2] + 2 * halo) // tx) * tx,
    ])
    Zp, Yp, Xp = (int(v) for v in pshape)
    z_nm = (p0[0] + np.arange(Zp)) * vs[0]
    y_nm = (p0[1] + np.arange(Yp)) * vs[1]
    x_nm = (p0[2] + np.arange(Xp)) * vs[2]
    lo = np.array([z_nm[0], y_nm[0], x_nm[0]])
    hi = np.array([z_nm[-1], y_nm[-1], x_nm[-1]])

    # ---- world model near the region ------------------------------------------------------
    tiles = tiles if tiles is not None else SynapseTiles(cfg, warp)
    ext = synapse_extent_nm(cfg)
    syn, ves = tiles.query(lo - ext, hi + ext)
    m_own = neuron_margin_nm(cfg, warp)
    nr_all = neurons_in_box(cfg, lo - m_own, hi + m_own)
    W = warp.max_displacement
    centre = 0.5 * (lo + hi)
    rb = float(np.linalg.norm(0.5 * (hi - lo))) + W
    sel = candidate_capsules(centre[None], nr_all.pos, nr_all.dir, nr_all.half_len,
                             nr_all.scale, 0.0, rb, ids=nr_all.ids)[0]
    sel = sel[sel < len(nr_all)]
    nr = nr_all.subset(sel)
    mito = mitochondria_of(cfg, nr)

    # ---- warped coordinates ---------------------------------------------------------------
    wy, wx = warp.on_grid(z_nm, y_nm, x_nm)
    wy += y_nm.astype(_F)[None, :, None]
    wx += x_nm.astype(_F)[None, None, :]
    Yw, Xw = wy, wx  # warped y / x (nm), float32 (Zp, Yp, Xp)

    lab, h, nz, mdist, mcrist, midx = _label_pass(cfg, nr, mito, z_nm, Yw, Xw)

    # ---- intensities ----------------------------------------------------------------------
    ids = nr.ids[lab]                                               # uint64 (Zp, Yp, Xp)
    grey = nr.grey.astype(_F)[lab]
    t = cfg.membrane_thickness_nm
    T = cfg.section_nm
    inside_mito = np.zeros(lab.shape, bool)
    if len(mito):
        own_ok = mito.owner[np.maximum(midx, 0)] == lab
        inside_mito = (midx >= 0) & own_ok & (mdist < 0) & (h > 0.5 * t + 4.0)
        if inside_mito.any():
            md = mdist[inside_mito]
            cr = mcrist[inside_mito]
            phase = mito.phase.astype(_F)[midx[inside_mito]]
            cristae = np.maximum(np.cos(cr * _F(2 * np.pi / 34.0) + phase), 0) ** 3
            val = _F(0.37) + _F(0.16) * cristae
            val = np.where(md > -6.0, _F(0.28), val)                  # outer membrane
            grey[inside_mito] = val
    # membranes seen through a slab of thickness T
    width = _F(0.5 * t) + _F(0.5 * T) * nz
    dil = _F(t) / (_F(t) + _F(T) * nz)
    mem = _F(cfg.membrane_darkness) * dil * np.clip((width + _F(1.5) - h) / _F(3.0), 0, 1)

    syn_ids = np.zeros(lab.shape, np.uint64)
    pre = np.zeros(lab.shape, bool)
    post = np.zeros(lab.shape, bool)
    cleft = np.zeros(lab.shape, bool)
    _render_synapses(cfg, syn, p0, pshape, z_nm, y_nm, x_nm, Yw, Xw, ids,
                     mem, syn_ids, pre, post, cleft)
    img = grey * (1 - mem)
    _render_vesicles(cfg, ves, syn, p0, pshape, vs, ids, img)

    # ---- texture, blur, noise, section variation -----------------------------------------
    zi = p0[0] + np.arange(Zp)
    yi = p0[1] + np.arange(Yp)
    xi = p0[2] + np.arange(Xp)
    hz = hash_u64(cfg.seed, ST_PIX, zi)
    hy = hash_u64(cfg.seed, ST_PIXROW, yi)
    hx = hash_u64(cfg.seed, ST_PIXCOL, xi)
    hv = (hz[:, None, None] ^ hy[None, :, None]) + hx[None, None, :]
    hv = _mix(hv)
    mask16 = np.uint64(0xFFFF)
    scale = _F(1.0 / 65536.0)
    # texture: band-limited noise (sum of two uniforms, blurred), unit std after blurring
    tex = ((hv & mask16).astype(_F) + (hv >> np.uint64(16) & mask16).astype(_F)) * scale - _F(1.0)
    s_t = cfg.texture_sigma_px
    if s_t > 0:
        for ax in (1, 2):
            tex = ndimage.gaussian_filter1d(tex, s_t, axis=ax, mode="nearest", truncate=3.0)
        tex *= _F(2.0 * math.sqrt(math.pi) * s_t / math.sqrt(1.0 / 6.0))
    else:
        tex *= _F(1.0 / math.sqrt(1.0 / 6.0))
    tex_gain = np.where(nr.is_light, 0.35, 1.0).astype(_F)[lab] * _F(cfg.texture_amplitude)
    img *= 1 + tex_gain * tex
    del tex
    if cfg.mottle_amplitude > 0:
        img *= 1 + _F(cfg.mottle_amplitude) * _value_noise(cfg.seed, zi, yi, xi, cfg.mottle_cell_px)
    if cfg.blur_sigma_px > 0:
        for ax in (1, 2):
            img = ndimage.gaussian_filter1d(img, cfg.blur_sigma_px, axis=ax, mode="nearest", truncate=3.0)
    noise = ((hv >> np.uint64(32) & mask16).astype(_F)
             + (hv >> np.uint64(48)).astype(_F)) * scale - _F(1.0)
    del hv
    img += _F(cfg.noise_std / math.sqrt(1.0 / 6.0)) * noise
    del noise
    u = [hash_uniform(cfg.seed, ST_SECTION, zi, c) for c in range(4)]
    gz = np.sqrt(-2 * np.log(np.maximum(u[0], 1e-12))) * np.cos(2 * np.pi * u[1])
    oz = np.sqrt(-2 * np.log(np.maximum(u[2], 1e-12))) * np.cos(2 * np.pi * u[3])
    gain = (1.0 + cfg.section_gain_std * np.clip(gz, -3, 3)).astype(_F)[:, None, None]
    off = (cfg.section_offset_std * np.clip(oz, -3, 3)).astype(_F)[:, None, None]
    img = (img - _F(0.5)) * gain + (_F(0.5) + off)
    img = np.clip(img * _F(255.0) + _F(0.5), 0, 255).astype(np.uint8)

    # ---- crop --------------------------------------------------------------------------
    c = (slice(0, int(shape[0])), slice(halo, halo + int(shape[1])), slice(halo, halo + int(shape[2])))
    union = pre | post
    out = {
        "raw": np.ascontiguousarray(img[c]),
        "neurons": np.ascontiguousarray(ids[c]),
        "synapses": np.ascontiguousarray(syn_ids[c]),
        "polarity": np.ascontiguousarray(np.stack([pre[c], post[c], union[c]]).astype(np.uint8)),
        "cleft": np.ascontiguousarray(cleft[c].astype(np.uint8)),
        "synapse_defs": syn,
        "neuron_defs": nr,
    }
    return out


def _label_pass(cfg, nr: Neurons, mito: Mitochondria, z_nm, Yw, Xw):
    """Nearest neurite, boundary distance and mitochondrion fields, slab by slab.

    ``z_nm`` (Zp,) section positions, ``Yw``/``Xw`` (Zp, Yp, Xp) float32 warped y/x (nm).
    Returns (Zp, Yp, Xp) arrays: ``lab`` int32 row of the nearest capsule in ``nr``; ``h``
    float32 distance (nm, first order) to the boundary with the nearest capsule of another
    neuron id; ``nz`` float32 |z component| of that boundary's normal; ``mdist`` float32
    signed distance to the nearest candidate mitochondrion surface (inf if none),
    ``mcrist`` its cristae coordinate (nm) and ``midx`` int32 its row (-1 if none).

    Each slab of ``tile_shape[0]`` sections is cut into tiles; tiles are processed in
    tile-major order sorted by their number of candidates, so the k-th candidate pass only
    touches the tiles that have a k-th candidate (a contiguous prefix).
    """
    tz, ty, tx = cfg.tile_shape
    Zp, Yp, Xp = Yw.shape
    nty, ntx = Yp // ty, Xp // tx
    nt, V = nty * ntx, tz * ty * tx
    vox_z = float(cfg.voxel_size[0])
    G = _COARSE
    gy, gx = np.arange(0, nty, G), np.arange(0, ntx, G)
    group = ((np.arange(nty)[:, None] // G) * len(gx) + (np.arange(ntx)[None, :] // G)).ravel()
    # float64 tables for the culling, float32 tables for the voxel work; padded with a
    # far-away capsule
    C = dict(pos=_padded(nr.pos, _FAR), dir=_padded(nr.dir, 1.0), hl=_padded(nr.half_len, 0.0),
             s=_padded(nr.scale, 1.0), ids=_padded(nr.ids.astype(np.int64), -1))
    _, code = np.unique(nr.ids, return_inverse=True)
    P = np.stack([C["pos"][:, 0], C["pos"][:, 1], C["pos"][:, 2], C["dir"][:, 0], C["dir"][:, 1],
                  C["dir"][:, 2], C["hl"], C["s"]], 1).astype(_F)
    P_id = _padded(code.ravel().astype(np.int32), -1)
    if len(mito):
        CM = dict(pos=_padded(mito.pos, _FAR), dir=_padded(mito.dir, 1.0),
                  hl=_padded(mito.half_len, 0.0), s=np.ones(len(mito) + 1),
                  r=_padded(mito.radius, 0.0))
        MP = np.stack([CM["pos"][:, 0], CM["pos"][:, 1], CM["pos"][:, 2], CM["dir"][:, 0],
                       CM["dir"][:, 1], CM["dir"][:, 2], CM["hl"], CM["r"],
                       _padded(mito.perp[:, 0], 0.0), _padded(mito.perp[:, 1], 0.0),
                       _padded(mito.perp[:, 2], 0.0)], 1).astype(_F)

    lab = np.empty((Zp, Yp, Xp), np.int32)
    h = np.empty((Zp, Yp, Xp), _F)
    nz = np.empty((Zp, Yp, Xp), _F)
    mdist = np.full((Zp, Yp, Xp), np.inf, _F)
    mcrist = np.zeros((Zp, Yp, Xp), _F)
    midx = np.full((Zp, Yp, Xp), -1, np.int32)
    tshape = (tz, nty, ty, ntx, tx)

    def to_tiles(a):  # (tz, Yp, Xp) -> (nt, V) tile-major copy
        return np.ascontiguousarray(a.reshape(tshape).transpose(1, 3, 0, 2, 4)).reshape(nt, V)

    def from_tiles(a, order, out):  # (nt, V) in ``order`` -> out (tz, Yp, Xp)
        full = np.empty_like(a)
        full[order] = a
        out[...] = full.reshape(nty, ntx, tz, ty, tx).transpose(2, 0, 3, 1, 4).reshape(tz, Yp, Xp)

    for z0 in range(0, Zp, tz):
        zsl = slice(z0, z0 + tz)
        ys3, xs3 = Yw[zsl], Xw[zsl]
        # boxes of the warped sample positions: per tile and per group of G x G tiles
        y5, x5 = ys3.reshape(tshape), xs3.reshape(tshape)
        zc, zh = float(z_nm[zsl].mean()), 0.5 * (tz - 1) * vox_z
        ext = [y5.min(axis=(0, 2, 4)), y5.max(axis=(0, 2, 4)),
               x5.min(axis=(0, 2, 4)), x5.max(axis=(0, 2, 4))]
        ext = [e.astype(np.float64) for e in ext]
        red = [np.minimum, np.maximum, np.minimum, np.maximum]
        gext = [f.reduceat(f.reduceat(e, gy, axis=0), gx, axis=1) for f, e in zip(red, ext)]

        def boxes(e):
            cy, cx = 0.5 * (e[0] + e[1]), 0.5 * (e[2] + e[3])
            hy, hx = 0.5 * (e[1] - e[0]), 0.5 * (e[3] - e[2])
            centres = np.stack([np.full(cy.shape, zc), cy, cx], -1).reshape(-1, 3)
            return centres, np.sqrt(zh * zh + hy * hy + hx * hx).ravel()

        centres, bounds = boxes(ext)
        gcentres, gbounds = boxes(gext)
        pool = candidate_capsules(gcentres, nr.pos, nr.dir, nr.half_len, nr.scale, 0.0,
                                  gbounds, ids=nr.ids)
        cand = _refine(centres, bounds, pool[group], C, second=True)       # (nt, K)
        count = (cand < len(nr)).sum(axis=1)
        order = np.argsort(-count, kind="stable")
        cand, count = cand[order], count[order]
        K = cand.shape[1]
        m_k = [int((count > k).sum()) for k in range(K)]
        yt, xt = to_tiles(ys3)[order], to_tiles(xs3)[order]
        zt = (z_nm[zsl].astype(_F)[None, :, None, None] *
              np.ones((1, 1, ty, tx), _F)).reshape(1, V) if tz > 1 else np.full((1, 1), z_nm[z0], _F)
        D1 = np.full((nt, V), np.inf, _F)
        D2 = np.full((nt, V), np.inf, _F)
        i1 = np.zeros((nt, V), np.int16)
        i2 = np.zeros((nt, V), np.int16)
        id1 = np.full((nt, V), -2, np.int32)
        Q = np.empty((K, 3, nt, V), _F)           # skeleton-to-point vectors per candidate
        for k in range(K):
            m = m_k[k]
            if m == 0:
                break
            c = cand[:m, k]
            pz, py, px, dz, dy, dx, L, sc = (P[c, j][:, None] for j in range(8))
            idk = P_id[c][:, None]
            vz = zt - pz
            qy = np.subtract(yt[:m], py, out=Q[k, 1, :m])
            qx = np.subtract(xt[:m], px, out=Q[k, 2, :m])
            a = qy * dy
            a += qx * dx
            a += vz * dz
            np.clip(a, -L, L, out=a)
            qz = np.subtract(vz, a * dz, out=Q[k, 0, :m])
            qy -= a * dy
            qx -= a * dx
            d = qz * qz
            d += qy * qy
            d += qx * qx
            np.sqrt(d, out=d)
            d *= sc                                                 # scaled distance D
            # running nearest capsule and nearest capsule of another neuron id
            sD1, sD2, si1, si2, sid1 = D1[:m], D2[:m], i1[:m], i2[:m], id1[:m]
            other = sid1 != idk
            lt1 = d < sD1
            to2_old = lt1 & other                      # old best becomes second
            to2_new = ~lt1 & other & (d < sD2)         # this capsule becomes second
            np.copyto(sD2, sD1, where=to2_old)
            np.copyto(si2, si1, where=to2_old)
            np.copyto(sD2, d, where=to2_new)
            np.copyto(si2, np.int16(k), where=to2_new)
            np.copyto(sD1, d, where=lt1)
            np.copyto(si1, np.int16(k), where=lt1)
            np.copyto(sid1, idk, where=lt1)
        # only entries k < count of each tile are ever selected, and those were written
        q1 = [np.take_along_axis(Q[:, j], i1[None], 0)[0] for j in range(3)]
        q2 = [np.take_along_axis(Q[:, j], i2[None], 0)[0] for j in range(3)]
        rowsel = np.arange(nt)[:, None]
        c1 = cand[rowsel, i1]
        c2 = cand[rowsel, i2]
        # gradients of D: scale * unit vector away from the skeleton
        n1 = P[c1, 7] / (np.sqrt(q1[0] ** 2 + q1[1] ** 2 + q1[2] ** 2) + _F(1e-6))
        n2 = P[c2, 7] / (np.sqrt(q2[0] ** 2 + q2[1] ** 2 + q2[2] ** 2) + _F(1e-6))
        dn = [q2[j] * n2 - q1[j] * n1 for j in range(3)]
        dnorm = np.sqrt(dn[0] ** 2 + dn[1] ** 2 + dn[2] ** 2)
        from_tiles(c1, order, lab[zsl])
        from_tiles((D2 - D1) / np.maximum(dnorm, _F(0.2)), order, h[zsl])
        from_tiles(np.abs(dn[0]) / np.maximum(dnorm, _F(1e-6)), order, nz[zsl])
        del q1, q2, dn, D1, D2, Q

        if not len(mito):
            continue
        mpool = candidate_capsules(gcentres, mito.pos, mito.dir, mito.half_len, 1.0, mito.radius,
                                   gbounds, second=False)
        mc = _refine(centres, bounds, mpool[group], CM, second=False)[order]
        mcount = (mc < len(mito)).sum(axis=1)
        if mcount.max() == 0:
            continue
        morder = np.argsort(-mcount, kind="stable")
        mc, mcount = mc[morder], mcount[morder]
        yt, xt = yt[morder], xt[morder]
        MD = np.full((nt, V), np.inf, _F)
        MC = np.zeros((nt, V), _F)
        MI = np.full((nt, V), -1, np.int32)
        for k in range(mc.shape[1]):
            m = int((mcount > k).sum())
            if m == 0:
                break
            c = mc[:m, k]
            pz, py, px, dz, dy, dx, L, r, ez, ey, ex = (MP[c, j][:, None] for j in range(11))
            vz = zt - pz
            vy = yt[:m] - py
            vx = xt[:m] - px
            cr = vy * ey
            cr += vx * ex
            cr += vz * ez
            a = vy * dy
            a += vx * dx
            a += vz * dz
            np.clip(a, -L, L, out=a)
            vy -= a * dy
            vx -= a * dx
            qz = vz - a * dz
            d = np.sqrt(qz * qz + vy * vy + vx * vx) - r
            better = d < MD[:m]
            np.copyto(MD[:m], d, where=better)
            np.copyto(MC[:m], cr, where=better)
            np.copyto(MI[:m], np.broadcast_to(c[:, None].astype(np.int32), d.shape), where=better)
        full_order = order[morder]
        from_tiles(MD, full_order, mdist[zsl])
        from_tiles(MC, full_order, mcrist[zsl])
        from_tiles(MI, full_order, midx[zsl])
    return lab, h, nz, mdist, mcrist, midx


def _render_synapses(cfg, syn: Synapses, p0, pshape, z_nm, y_nm, x_nm, Yw, Xw,
                     ids, mem, syn_ids, pre, post, cleft) -> None:
    """Write synapse ground truth and darkening into the region arrays (in place).

    The signed distance g (nm, > 0 on the presynaptic side) to the pre/post boundary is
    computed from the two neurites' own distance fields, so the bands follow the rendered
    membrane exactly; the disc is an ellipse in the membrane's tangent plane.
    """
    if len(syn) == 0:
        return
    vs = np.asarray(cfg.voxel_size, np.float64)
    t = cfg.membrane_thickness_nm
    T = cfg.section_nm
    c2 = 0.5 * cfg.cleft_width_nm
    reach_n = max(cfg.pre_band_nm, cfg.post_band_nm) + 0.5 * T + 2.0 * cfg.warp_amplitude_nm + 10.0
    for s in range(len(syn)):
        q, n, e1, e2 = syn.center[s], syn.normal[s], syn.e1[s], syn.e2[s]
        R1, R2 = syn.radii[s]
        rmax = max(R1, R2)
        half = rmax * np.sqrt(np.maximum(0.0, 1.0 - n * n)) + reach_n * np.abs(n) + vs
        a = np.maximum(np.floor((q - half) / vs).astype(np.int64) - p0, 0)
        b = np.minimum(np.ceil((q + half) / vs).astype(np.int64) + 1 - p0, pshape)
        if np.any(b <= a):
            continue
        zz = z_nm[a[0]:b[0]] - q[0]
        yy = y_nm[a[1]:b[1]] - q[1]
        xx = x_nm[a[2]:b[2]] - q[2]
        rz, ry, rx = zz[:, None, None], yy[None, :, None], xx[None, None, :]
        tn = rz * n[0] + ry * n[1] + rx * n[2]
        t1 = (rz * e1[0] + ry * e1[1] + rx * e1[2]) / R1
        t2 = (rz * e2[0] + ry * e2[1] + rx * e2[2]) / R2
        rho2 = t1 * t1 + t2 * t2
        m = (rho2 <= 1.0) & (np.abs(tn) <= reach_n)
        loc = np.nonzero(m)
        if len(loc[0]) == 0:
            continue
        gi = tuple(l + o for l, o in zip(loc, a))
        rho2 = rho2[loc]
        pw = np.stack([z_nm[gi[0]], Yw[gi].astype(np.float64), Xw[gi].astype(np.float64)], -1)
        def dist_and_grad(cap):
            v = pw - cap[0:3]
            tt = np.clip(v @ cap[3:6], -cap[6], cap[6])
            qv = v - tt[:, None] * cap[3:6]
            d = np.linalg.norm(qv, axis=1)
            return d * cap[7], qv * (cap[7] / np.maximum(d, 1e-9))[:, None]

        da, ua = dist_and_grad(syn.pre_capsule[s])
        db, ub = dist_and_grad(syn.post_capsule[s])
        g = (db - da) / np.maximum(np.linalg.norm(ua - ub, axis=1), 0.2)    # > 0: presynaptic
        lab = ids[gi]
        is_pre = lab == syn.pre_id[s]
        is_post = lab == syn.post_id[s]
        ok = is_pre | is_post
        w = 0.5 * T * abs(n[0])
        union = ok & (g <= cfg.pre_band_nm + w) & (g >= -(cfg.post_band_nm + w))
        cl = ok & (np.abs(g) <= c2 + 0.5 * t + w)
        sel = tuple(x[union] for x in gi)
        syn_ids[sel] = syn.ids[s]
        pre[sel] = is_pre[union]
        post[sel] = is_post[union]
        cl_sel = tuple(x[cl] for x in gi)
        cleft[cl_sel] = True
        # darkening: presynaptic membrane (+ density), cleft material, postsynaptic
        # membrane + PSD; thickness tapers towards the disc edge
        taper = np.sqrt(np.maximum(0.0, 1.0 - rho2))
        exc = bool(syn.exc[s])
        psd = (cfg.psd_thickness_e_nm if exc else cfg.psd_thickness_i_nm) * (0.35 + 0.65 * taper)
        pre_d = 0.0 if exc else cfg.psd_thickness_i_nm * (0.35 + 0.65 * taper)
        dil = lambda th: np.sqrt(th / (th + T * abs(n[0])))  # noqa: E731  (dense: stays visible)
        d_pre = 0.62 * dil(t) * _smooth_band(g, c2 - 0.5 * t - w, c2 + 0.5 * t + pre_d + w)
        d_cleft = 0.30 * _smooth_band(g, -c2 + 0.5 * t, c2 - 0.5 * t)
        d_post = 0.78 * dil(t + 10.0) * _smooth_band(g, -(c2 + 0.5 * t + psd) - w, -c2 + 0.5 * t + w)
        dark = np.maximum(np.maximum(d_pre, d_cleft), d_post).astype(_F)
        mem[sel] = dark[union]


def _render_vesicles(cfg, ves: Vesicles, syn: Synapses, p0, pshape, vs, ids, img) -> None:
    """Draw vesicles (dark rim, light lumen) into ``img`` in place, only inside their
    presynaptic neurite; overlapping vesicles combine by the minimum normalised radius."""
    if len(ves) == 0:
        return
    T = cfg.section_nm
    rmax = float(ves.radii.max())
    bz = int(math.floor((rmax + 0.5 * T) / vs[0]))
    by = int(math.ceil(rmax / vs[1])) + 1
    bx = int(math.ceil(rmax / vs[2])) + 1
    cidx = np.round(ves.center / vs).astype(np.int64)
    lo_v = cidx - np.array([bz, by, bx])
    keep = np.all((lo_v + 2 * np.array([bz, by, bx]) >= p0) & (lo_v < p0 + pshape), axis=1)
    if not keep.any():
        return
    cidx, center, axes, radii = cidx[keep], ves.center[keep], ves.axes[keep], ves.radii[keep]
    si = np.searchsorted(syn.ids, ves.synapse_id[keep])
    oz, oy, ox = np.meshgrid(np.arange(-bz, bz + 1), np.arange(-by, by + 1), np.arange(-bx, bx + 1),
                             indexing="ij")
    off = np.stack([oz.ravel(), oy.ravel(), ox.ravel()], -1)                  # (b, 3)
    vox = cidx[:, None, :] + off[None]                                        # (v, b, 3)
    v = vox * vs - center[:, None, :]
    dz = np.abs(v[..., 0])
    v[..., 0] = np.sign(v[..., 0]) * np.maximum(dz - 0.5 * T, 0.0)          # slab projection
    proj = np.einsum("vbc,vkc->vbk", v, axes) / radii[:, None, :]
    rho = np.sqrt((proj * proj).sum(-1))                                     # (v, b)
    local = vox - p0
    inside = np.all((local >= 0) & (local < pshape), axis=-1) & (rho < 1.1)
    local = local[inside]
    rho = rho[inside]
    owner = np.broadcast_to(syn.pre_id[si][:, None], inside.shape)[inside]
    flat = np.ravel_multi_index(tuple(local.T), tuple(int(p) for p in pshape))
    ok = ids.ravel()[flat] == owner
    flat, rho = flat[ok], rho[ok]
    if len(flat) == 0:
        return
    order = np.lexsort((rho, flat))
    flat, rho = flat[order], rho[order]
    first = np.ones(len(flat), bool)
    first[1:] = flat[1:] != flat[:-1]
    flat, rho = flat[first], rho[first].astype(_F)                           # min rho per voxel
    cur = img.ravel()[flat]
    ring = 0.55 * _smooth_band(rho, 0.66, 1.0, soft=0.06)
    lumen = rho < 0.62
    new = cur * (1 - ring) + np.where(lumen, _F(0.07), _F(0.0))
    img.ravel()[flat] = new.astype(_F)
