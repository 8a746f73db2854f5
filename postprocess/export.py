"""Export a signed connectome: edge list + node table (CSV/Parquet), GraphML, sparse npz,
and neuroglancer annotations of the synapses.

Input is a synapse table (as the synapse DB returns it); signs come from
:mod:`postprocess.connectome`. Files written under ``out`` (a folder):

- ``edges.{csv,parquet}``: pre, post, n_synapses, total_size, mean scores, sign, weight;
- ``nodes.{csv,parquet}``: neuron, degrees, synapse counts, sign, p_excitatory, flags;
- ``graph.graphml``: the same as a networkx DiGraph (node/edge attributes);
- ``adjacency.npz``: scipy CSR signed adjacency + ``neurons.npy`` (row/column index);
- ``annotations/``: neuroglancer precomputed LINE annotations pre site → post site.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from storage.ng_annotations import write_synapse_annotations

from .connectome import SignConfig, build_edges, neuron_signs_from_synapses, node_table, signed_adjacency
from .errors import PostprocessError

__all__ = ["FORMATS", "export_graph", "signs_for"]

FORMATS = ("csv", "parquet", "graphml", "npz", "neuroglancer")


def signs_for(syn: pd.DataFrame, cfg: SignConfig = SignConfig()) -> Optional[pd.DataFrame]:
    """Neuron signs from per-synapse E/I probabilities, or None when none are classified."""
    if "ei_prob" not in syn or syn["ei_prob"].notna().sum() == 0:
        return None
    return neuron_signs_from_synapses(syn, cfg)


def export_graph(syn: pd.DataFrame, out: str, formats: Sequence[str] = ("csv",),
                 signs: Optional[pd.DataFrame] = None, cfg: SignConfig = SignConfig()) -> dict:
    """Build edges/nodes from ``syn`` and write the requested formats; returns {format: path}."""
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise PostprocessError(f"unknown export format(s) {bad}; choose from {', '.join(FORMATS)}")
    os.makedirs(out, exist_ok=True)
    if signs is None:
        signs = signs_for(syn, cfg)
    edges = build_edges(syn, signs, cfg)
    nodes = node_table(edges, signs)
    written = {}
    if "csv" in formats:
        edges.to_csv(os.path.join(out, "edges.csv"), index=False)
        nodes.to_csv(os.path.join(out, "nodes.csv"), index=False)
        written["csv"] = os.path.join(out, "edges.csv")
    if "parquet" in formats:
        edges.to_parquet(os.path.join(out, "edges.parquet"), index=False)
        nodes.to_parquet(os.path.join(out, "nodes.parquet"), index=False)
        written["parquet"] = os.path.join(out, "edges.parquet")
    if "graphml" in formats:
        import networkx as nx

        g = nx.DiGraph()
        for rec in nodes.to_dict("records"):
            n = int(rec.pop("neuron"))
            g.add_node(str(n), **{k: _plain(v) for k, v in rec.items() if _plain(v) is not None})
        for rec in edges.to_dict("records"):
            a, b = str(int(rec.pop("pre"))), str(int(rec.pop("post")))
            g.add_edge(a, b, **{k: _plain(v) for k, v in rec.items() if _plain(v) is not None})
        path = os.path.join(out, "graph.graphml")
        nx.write_graphml(g, path)
        written["graphml"] = path
    if "npz" in formats:
        from scipy import sparse

        A = signed_adjacency(edges, nodes)
        sparse.save_npz(os.path.join(out, "adjacency.npz"), A)
        np.save(os.path.join(out, "neurons.npy"), nodes["neuron"].to_numpy(np.int64))
        written["npz"] = os.path.join(out, "adjacency.npz")
    if "neuroglancer" in formats:
        written["neuroglancer"] = write_synapse_annotations(syn, os.path.join(out, "annotations"))
    return written


def _plain(v):
    """numpy scalars → Python (GraphML needs str/int/float/bool); NaN → None (omitted)."""
    if isinstance(v, (np.bool_, bool)):
        return bool(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating, float)):
        return None if np.isnan(v) else float(v)
    if v is None or (isinstance(v, str) and v == ""):
        return None
    return v if isinstance(v, (int, str)) else str(v)
