"""Rendering one block of the synthetic EM volume from the world model.

:func:`render_block` turns a box of global voxel indices into the image and every ground-truth
array. Each voxel's value is a function of its global index only (neurite ownership at the
warped position, hashed per-voxel noise, per-section gains), and the in-plane blurs read a
halo that is rendered the same way, so blocks tile the volume seamlessly.

Speed comes from culling: the region is cut into small tiles (``SyntheticConfig.tile_shape``)
and only neurites that can be the nearest or second nearest somewhere in a tile (the distance
functions are 1-Lipschitz, so a bound from the tile centre is exact) are evaluated there.
Culling never changes a result; ties are broken by the lower neurite id.

Sections are treated as slabs of physical thickness T (``section_nm``): a membrane, cleft or
vesicle seen obliquely is widened by T/2 |n_z| and diluted, as in a TEM projection image.
"""

from __future__ import annotations

import logging
import math
from typing import Optional

import numpy as np
from scipy import ndimage

from .synthetic_geometry import (
    ST_PIX, ST_PIXCOL, ST_PIXROW, ST_SECTION, Mitochondria, Neurons, SyntheticConfig,
    Synapses, Vesicles, WarpField, _mix, capsule_distance, hash_u64, hash_uniform,
    mitochondria_of, neuron_margin_nm, neurons_in_box, synapse_extent_nm,
    synapse_neuron_margin_nm, synapses_in_box, vesicles_of,
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


def _tile_candidates(centres: np.ndarray, pos, direc, half_len, radius, bound: float,
                     second: bool = True) -> np.ndarray:
    """Per tile, the sorted indices of capsules that can be the nearest (or second nearest)
    anywhere within ``bound`` nm of the tile centre; padded with ``len(pos)``.

    centres (t, 3) nm; returns (t, k) int64.
    """
    n = len(pos)
    if n == 0:
        return np.zeros((len(centres), 0), np.int64)
    d = capsule_distance(centres[:, None, :], pos[None], direc[None], half_len[None]) - radius[None]
    if second:
        ref = np.partition(d, min(1, n - 1), axis=1)[:, min(1, n - 1)]
        keep = d <= (ref + 2.0 * bound + 1.0)[:, None]
    else:  # objects drawn where their own distance is negative
        keep = d <= bound + 1.0
    k = int(keep.sum(axis=1).max())
    idx = np.where(keep, np.arange(n)[None, :], n)
    idx.sort(axis=1)
    return idx[:, :k]


def _padded(arr: np.ndarray, fill) -> np.ndarray:
    return np.concatenate([arr, np.full((1,) + arr.shape[1:], fill, arr.dtype)])


def render_block(cfg: SyntheticConfig, start, shape, warp: Optional[WarpField] = None) -> dict:
    """Render the voxels [start, start + shape) (global indices, (z, y, x)).

    Returns a dict of arrays over exactly that box:

    - ``raw`` uint8 (z, y, x): the EM-like image.
    - ``neurons`` uint64 (z, y, x): neurite id of every voxel (no zeros; each membrane is
      split between the two cells it separates, at the exact boundary).
    - ``synapses`` uint64 (z, y, x): synapse instance ids on cleft + pre band + post band.
    - ``polarity`` uint8 (3, z, y, x): 0/1 pre side, post side, union.
    - ``cleft`` uint8 (z, y, x): 0/1 cleft (both membranes and the gap between them).
    - ``synapse_defs``: the :class:`Synapses` whose centre lies in the region's reach (ids,
      partners; used for the table), with ``neurons`` the :class:`Neurons` they index.
    """
    start = np.asarray(start, np.int64)
    shape = np.asarray(shape, np.int64)
    if start.shape != (3,) or shape.shape != (3,) or np.any(shape <= 0):
        from .errors import StorageError
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
    ext = synapse_extent_nm(cfg)
    m_syn = synapse_neuron_margin_nm(cfg)
    nr_all = neurons_in_box(cfg, lo - ext - m_syn, hi + ext + m_syn)
    syn = synapses_in_box(cfg, nr_all, lo - ext, hi + ext, warp)
    ves = vesicles_of(cfg, syn, nr_all, warp)

    W = warp.max_displacement
    centre = 0.5 * (lo + hi)
    rb = float(np.linalg.norm(0.5 * (hi - lo))) + W
    sel = _tile_candidates(centre[None], nr_all.pos, nr_all.dir, nr_all.half_len,
                           nr_all.radius, rb)[0]
    sel = sel[sel < len(nr_all)]
    nr = nr_all.subset(sel)
    mito = mitochondria_of(cfg, nr)

    # ---- warped coordinates ---------------------------------------------------------------
    wy, wx = warp.on_grid(z_nm, y_nm, x_nm)
    wy += y_nm.astype(_F)[None, :, None]
    wx += x_nm.astype(_F)[None, None, :]
    Yw, Xw = wy, wx  # warped y / x (nm), float32 (Zp, Yp, Xp)

    lab, h, nz, mdist, mcrist, midx = _label_pass(cfg, nr, mito, z_nm, y_nm, x_nm, Yw, Xw, W)

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
    mem = _F(cfg.membrane_darkness) * np.sqrt(dil) * np.clip((width + _F(1.5) - h) / _F(3.0), 0, 1)

    syn_ids = np.zeros(lab.shape, np.uint64)
    pre = np.zeros(lab.shape, bool)
    post = np.zeros(lab.shape, bool)
    cleft = np.zeros(lab.shape, bool)
    _render_synapses(cfg, syn, nr_all, p0, pshape, z_nm, y_nm, x_nm, Yw, Xw, ids,
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
        "synapse_neurons": nr_all,
    }
    return out


def _label_pass(cfg, nr: Neurons, mito: Mitochondria, z_nm, y_nm, x_nm, Yw, Xw, W):
    """Nearest neurite, boundary distance and mitochondrion fields, slab by slab.

    Returns (Zp, Yp, Xp) arrays: ``lab`` int64 index into ``nr``; ``h`` float32 distance (nm)
    to the boundary with the second-nearest neurite; ``nz`` float32 |z component| of that
    boundary's normal; ``mdist`` float32 signed distance to the nearest candidate
    mitochondrion surface (inf if none), ``mcrist`` its cristae coordinate (nm), ``midx``
    int64 its index (-1 if none).
    """
    tz, ty, tx = cfg.tile_shape
    Zp, Yp, Xp = Yw.shape
    nty, ntx = Yp // ty, Xp // tx
    vs = np.asarray(cfg.voxel_size, np.float64)
    tile_half = 0.5 * np.array([(tz - 1) * vs[0], (ty - 1) * vs[1], (tx - 1) * vs[2]])
    bound = float(np.linalg.norm(tile_half)) + W
    cy = y_nm.reshape(nty, ty).mean(1)
    cx = x_nm.reshape(ntx, tx).mean(1)

    # neurite parameters (float32), padded with a far-away neurite
    P = {
        "pz": _padded(nr.pos[:, 0], _FAR), "py": _padded(nr.pos[:, 1], _FAR),
        "px": _padded(nr.pos[:, 2], _FAR), "dz": _padded(nr.dir[:, 0], 1.0),
        "dy": _padded(nr.dir[:, 1], 0.0), "dx": _padded(nr.dir[:, 2], 0.0),
        "L": _padded(nr.half_len, 0.0), "r": _padded(nr.radius, 0.0),
    }
    P = {k: v.astype(_F) for k, v in P.items()}
    MP = None
    if len(mito):
        MP = {
            "pz": _padded(mito.pos[:, 0], _FAR), "py": _padded(mito.pos[:, 1], _FAR),
            "px": _padded(mito.pos[:, 2], _FAR), "dz": _padded(mito.dir[:, 0], 1.0),
            "dy": _padded(mito.dir[:, 1], 0.0), "dx": _padded(mito.dir[:, 2], 0.0),
            "L": _padded(mito.half_len, 0.0), "r": _padded(mito.radius, 0.0),
            "ez": _padded(mito.perp[:, 0], 0.0), "ey": _padded(mito.perp[:, 1], 0.0),
            "ex": _padded(mito.perp[:, 2], 0.0),
        }
        MP = {k: v.astype(_F) for k, v in MP.items()}

    lab = np.empty((Zp, Yp, Xp), np.int64)
    h = np.empty((Zp, Yp, Xp), _F)
    nz = np.empty((Zp, Yp, Xp), _F)
    mdist = np.full((Zp, Yp, Xp), np.inf, _F)
    mcrist = np.zeros((Zp, Yp, Xp), _F)
    midx = np.full((Zp, Yp, Xp), -1, np.int64)
    tshape = (tz, nty, ty, ntx, tx)
    pshape = (1, nty, 1, ntx, 1)
    tile_index = np.arange(nty * ntx).reshape(pshape)

    for z0 in range(0, Zp, tz):
        zc = z_nm[z0:z0 + tz].mean()
        centres = np.stack(np.broadcast_arrays(zc, cy[:, None], cx[None, :]), -1).reshape(-1, 3)
        cand = _tile_candidates(centres, nr.pos, nr.dir, nr.half_len, nr.radius, bound)
        K = cand.shape[1]
        zs = z_nm[z0:z0 + tz].astype(_F).reshape(tz, 1, 1, 1, 1)
        ys = Yw[z0:z0 + tz].reshape(tshape)
        xs = Xw[z0:z0 + tz].reshape(tshape)
        Q = np.empty((3, K) + tshape, _F)
        D1 = np.full(tshape, np.inf, _F)
        D2 = np.full(tshape, np.inf, _F)
        i1 = np.zeros(tshape, np.int64)
        i2 = np.zeros(tshape, np.int64)
        a = np.empty(tshape, _F)
        tmp = np.empty(tshape, _F)
        for k in range(K):
            c = cand[:, k]
            g = {key: P[key][c].reshape(pshape) for key in P}
            vz = zs - g["pz"]                                           # (tz, nty, 1, ntx, 1)
            qy = np.subtract(ys, g["py"], out=Q[1, k])
            qx = np.subtract(xs, g["px"], out=Q[2, k])
            np.multiply(qy, g["dy"], out=a)
            a += qx * g["dx"]
            a += vz * g["dz"]
            np.clip(a, -g["L"], g["L"], out=a)
            qz = np.multiply(a, -g["dz"], out=Q[0, k])
            qz += vz
            np.multiply(a, g["dy"], out=tmp)
            qy -= tmp
            np.multiply(a, g["dx"], out=tmp)
            qx -= tmp
            np.multiply(qz, qz, out=a)
            a += qy * qy
            a += qx * qx
            np.sqrt(a, out=a)
            a -= g["r"]                                                  # weighted distance
            lt1 = a < D1
            lt2 = a < D2
            np.copyto(D2, np.where(lt1, D1, np.where(lt2, a, D2)))
            np.copyto(i2, np.where(lt1, i1, np.where(lt2, k, i2)))
            np.copyto(D1, a, where=lt1)
            np.copyto(i1, k, where=lt1)
        sl = slice(z0, z0 + tz)
        lab[sl] = cand.ravel()[tile_index * K + i1].reshape(tz, Yp, Xp)
        u1 = [np.take_along_axis(Q[c], i1[None], 0)[0] for c in range(3)]
        u2 = [np.take_along_axis(Q[c], i2[None], 0)[0] for c in range(3)]
        n1 = np.sqrt(u1[0] ** 2 + u1[1] ** 2 + u1[2] ** 2) + _F(1e-6)
        n2 = np.sqrt(u2[0] ** 2 + u2[1] ** 2 + u2[2] ** 2) + _F(1e-6)
        dn = [u2[c] / n2 - u1[c] / n1 for c in range(3)]
        dnorm = np.sqrt(dn[0] ** 2 + dn[1] ** 2 + dn[2] ** 2)
        h[sl] = ((D2 - D1) / np.maximum(dnorm, _F(0.25))).reshape(tz, Yp, Xp)
        nz[sl] = (np.abs(dn[0]) / np.maximum(dnorm, _F(1e-6))).reshape(tz, Yp, Xp)
        del Q, u1, u2, dn

        if MP is None:
            continue
        mc = _tile_candidates(centres, mito.pos, mito.dir, mito.half_len, mito.radius,
                              bound, second=False)
        Km = mc.shape[1]
        if Km == 0 or np.all(mc == len(mito)):
            continue
        MD = np.full(tshape, np.inf, _F)
        MC = np.zeros(tshape, _F)
        MI = np.full(tshape, -1, np.int64)
        for k in range(Km):
            c = mc[:, k]
            g = {key: MP[key][c].reshape(pshape) for key in MP}
            vz = zs - g["pz"]
            vy = ys - g["py"]
            vx = xs - g["px"]
            cr = vy * g["ey"]
            cr += vx * g["ex"]
            cr += vz * g["ez"]
            np.multiply(vy, g["dy"], out=a)
            a += vx * g["dx"]
            a += vz * g["dz"]
            np.clip(a, -g["L"], g["L"], out=a)
            vy -= a * g["dy"]
            vx -= a * g["dx"]
            qz = vz - a * g["dz"]
            d = np.sqrt(qz * qz + vy * vy + vx * vx) - g["r"]
            better = d < MD
            np.copyto(MD, d, where=better)
            np.copyto(MC, cr, where=better)
            np.copyto(MI, np.broadcast_to((c.reshape(pshape)).astype(np.int64), tshape), where=better)
        MI[MI >= len(mito)] = -1
        mdist[sl] = MD.reshape(tz, Yp, Xp)
        mcrist[sl] = MC.reshape(tz, Yp, Xp)
        midx[sl] = MI.reshape(tz, Yp, Xp)
    return lab, h, nz, mdist, mcrist, midx


def _render_synapses(cfg, syn: Synapses, nr: Neurons, p0, pshape, z_nm, y_nm, x_nm, Yw, Xw,
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
        ia, ib = syn.pre[s], syn.post[s]

        def dist_and_unit(i):
            v = pw - nr.pos[i]
            tt = np.clip(v @ nr.dir[i], -nr.half_len[i], nr.half_len[i])
            qv = v - tt[:, None] * nr.dir[i]
            d = np.linalg.norm(qv, axis=1)
            return d - nr.radius[i], qv / np.maximum(d, 1e-9)[:, None]

        da, ua = dist_and_unit(ia)
        db, ub = dist_and_unit(ib)
        g = (db - da) / np.maximum(np.linalg.norm(ua - ub, axis=1), 0.25)   # > 0: presynaptic
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
        dil = lambda th: np.sqrt(th / (th + T * abs(n[0])))  # noqa: E731
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
    cidx, center, axes, radii, si = (cidx[keep], ves.center[keep], ves.axes[keep],
                                     ves.radii[keep], ves.synapse[keep])
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
