"""Figures of a pipeline run: a montage of detected synapses over the EM, the signed adjacency.

:func:`synapse_montage` draws, for the largest detected synapses, the EM section through the
synapse centroid with the synapse's pre side (voxels whose pre probability beats post) in
orange and its post side in cyan. :func:`adjacency_plot` draws the signed, weighted adjacency
matrix (rows: presynaptic neurons sorted by sign, columns: postsynaptic), red excitatory,
blue inhibitory, grey unsigned. Both read a finished run's outputs; matplotlib (Agg).
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
import pandas as pd

__all__ = ["synapse_montage", "adjacency_plot", "run_figures"]

PRE_RGB = np.array([1.0, 0.55, 0.0])
POST_RGB = np.array([0.0, 0.85, 1.0])


def _overlay(em: np.ndarray, pre: np.ndarray, post: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """RGB (y, x, 3) float of a uint8 EM section with pre/post masks blended in."""
    rgb = np.repeat((em.astype(np.float32) / 255.0)[..., None], 3, axis=2)
    for mask, colour in ((pre, PRE_RGB), (post, POST_RGB)):
        rgb[mask] = (1 - alpha) * rgb[mask] + alpha * colour
    return rgb


def synapse_montage(raw, labels, predictions, table: pd.DataFrame, path: str, n: int = 12,
                    window: int = 96, title: Optional[str] = None) -> str:
    """PNG of up to ``n`` synapses (largest first), ``window`` voxels wide in y and x.

    Args:
        raw, labels, predictions: :class:`storage.volume.Volume` of the raw EM (z, y, x), the
            synapse labels (z, y, x) and the (3, z, y, x) pre/post/union probabilities.
        table: synapse records with ``id``, ``z``, ``y``, ``x`` (nm) and ``size``.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from funlib.geometry import Coordinate, Roi

    rows = table.sort_values(["size", "id"], ascending=[False, True]).head(n)
    vs = raw.voxel_size
    half = window // 2
    cols = min(4, max(1, len(rows)))
    nrows = max(1, -(-len(rows) // cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(3 * cols, 3 * nrows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, r in zip(axes.flat, rows.itertuples()):
        c = (np.array([r.z, r.y, r.x]) - np.asarray(raw.roi.begin)) // np.asarray(vs)
        begin = Coordinate(int(c[0]), int(c[1]) - half, int(c[2]) - half) * vs + raw.roi.begin
        roi = Roi(begin, Coordinate(1, window, window) * vs)
        em = raw.read(roi, fill_outside=True)[0]
        lab = labels.read(roi, fill_outside=True)[0] == r.id
        prob = predictions.read(roi, fill_outside=True)[:, 0]
        pre = lab & (prob[0] >= prob[1])
        ax.imshow(_overlay(em, pre, lab & ~pre), interpolation="nearest")
        ax.set_title(f"synapse {int(r.id)}\nz={int(r.z)} nm, {int(r.size)} vox", fontsize=8)
    fig.suptitle(title or "detected synapses: pre side orange, post side cyan", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def adjacency_plot(edges: pd.DataFrame, nodes: pd.DataFrame, path: str, title: Optional[str] = None) -> str:
    """PNG of the signed adjacency: cell (i, j) coloured by sign, shaded by synapse count."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pre = nodes[nodes["neuron"].isin(edges["pre"])].sort_values(["sign", "neuron"], ascending=[False, True])
    post = nodes[nodes["neuron"].isin(edges["post"])].sort_values("neuron")
    ri = {int(v): i for i, v in enumerate(pre["neuron"])}
    ci = {int(v): i for i, v in enumerate(post["neuron"])}
    img = np.ones((max(1, len(ri)), max(1, len(ci)), 3))
    top = max(1.0, float(edges["n_synapses"].max())) if len(edges) else 1.0
    colours = {1: np.array([0.85, 0.1, 0.1]), -1: np.array([0.1, 0.25, 0.9]), 0: np.array([0.4, 0.4, 0.4])}
    for e in edges.itertuples():
        sign = getattr(e, "sign", 0)
        s = 0 if pd.isna(sign) else int(np.sign(sign))
        k = 0.35 + 0.65 * float(e.n_synapses) / top
        img[ri[int(e.pre)], ci[int(e.post)]] = 1 - k * (1 - colours[s])
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.imshow(img, interpolation="nearest", aspect="auto")
    ax.set_xlabel(f"postsynaptic neuron ({len(ci)})")
    ax.set_ylabel(f"presynaptic neuron ({len(ri)}), excitatory first")
    n_e = int((pre["sign"] > 0).sum())
    n_i = int((pre["sign"] < 0).sum())
    ax.set_title(title or f"signed connectome: {len(edges)} edges; {n_e} E (red), {n_i} I (blue), "
                 f"{len(pre) - n_e - n_i} unsigned (grey)", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_figures(output_dir: str, raw_url: str, db_url: str, out_dir: Optional[str] = None) -> dict:
    """Both figures of a finished pipeline run into ``out_dir`` (default ``<output_dir>/figures``)."""
    from cleftwise.storage.db import open_store
    from cleftwise.storage.volume import open_volume

    out_dir = out_dir or os.path.join(output_dir, "figures")
    with open_store(db_url) as store:
        table = store.query(columns=["z", "y", "x", "size"])
    written = {}
    if len(table):
        written["montage"] = synapse_montage(
            open_volume(raw_url), open_volume(os.path.join(output_dir, "synapses.zarr", "labels")),
            open_volume(os.path.join(output_dir, "predictions.zarr", "pred")), table,
            os.path.join(out_dir, "synapse_montage.png"))
    g = os.path.join(output_dir, "graph")
    if os.path.exists(os.path.join(g, "edges.parquet")):
        written["adjacency"] = adjacency_plot(pd.read_parquet(os.path.join(g, "edges.parquet")),
                                              pd.read_parquet(os.path.join(g, "nodes.parquet")),
                                              os.path.join(out_dir, "signed_adjacency.png"))
    return written
