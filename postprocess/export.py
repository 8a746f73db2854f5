"""Export a signed connectome: edge list + node table (CSV/Parquet), GraphML, sparse npz,
and neuroglancer annotations of the synapses.

Input is a synapse table (as the synapse DB returns it); signs come from
:mod:`cleftwise.postprocess.connectome`. Every format sees the same synapses: the filters of
:class:`~cleftwise.postprocess.connectome.SignConfig` (min score, min partner confidence,
autapses, background) apply to the annotations as to the edges. Files written under ``out``:

- ``edges.{csv,parquet}``: pre, post, n_synapses, total_size, mean scores, ``weight``,
  ``sign``, ``signed_weight``, sign_confidence;
- ``nodes.{csv,parquet}``: neuron, degrees, synapse counts, sign, p_excitatory, flags;
- ``graph.graphml``: the same as a networkx DiGraph (node/edge attributes);
- ``adjacency.npz``: scipy CSR *signed* adjacency (``signed_weight``) + ``neurons.npy``
  (row/column index); edges whose sign is unknown are **not** stored in it (no explicit 0s);
  ``weights.npz``: the positive ``weight`` of every edge, same index;
- ``annotations/``: neuroglancer precomputed annotations (LINE pre site → post site, or POINT
  at the cleft centroid) with pre/post neuron relationships (:mod:`cleftwise.storage.ng_annotations`).

Edge attributes: ``weight`` ≥ 0 is the synapse count (``edge_weight: count``, default) or the
summed ``score_union`` of the edge's synapses (``edge_weight: score``), so shortest-path and
flow algorithms can use it; ``sign`` is +1 / −1, the presynaptic neuron's sign, and
**missing** when unknown (no GraphML attribute; empty in CSV, null in Parquet — pandas reads
NaN / <NA>), never 0; ``signed_weight = sign · weight`` (missing when the sign is). Node
``sign`` follows the same rule.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from cleftwise.storage.atomic import atomic_path
from cleftwise.storage.ng_annotations import write_synapse_annotations

from cleftwise.postprocess.connectome import (EDGE_WEIGHTS, SignConfig, build_edges, combine_signs, filter_synapses,
                                              neuron_signs_from_synapses, node_table, signs_from_class_probs,
                                              signs_from_table)
from cleftwise.postprocess.errors import PostprocessError

__all__ = ["FORMATS", "FILES", "SignTableConfig", "export_graph", "export_paths", "graph_tables",
           "signs_for", "table_signs"]

#: what each format writes under the output folder (``annotations`` is a folder)
FILES = {"csv": ("edges.csv", "nodes.csv"), "parquet": ("edges.parquet", "nodes.parquet"),
         "graphml": ("graph.graphml",), "npz": ("adjacency.npz", "weights.npz", "neurons.npy"),
         "neuroglancer": ("annotations",)}
FORMATS = tuple(FILES)


def export_paths(out: str, formats: Sequence[str]) -> list[str]:
    """The files and folders :func:`export_graph` writes (replaces) for ``formats``."""
    return [os.path.join(out, name) for f in formats for name in FILES.get(f, ())]


@dataclass
class SignTableConfig:
    """A per-neuron table used as a sign source (cell types, FISH or predicted transmitters)."""

    path: str
    """CSV/TSV/Parquet file, one row per neuron"""
    neuron_col: str
    """column with the neuron id (the synapse table's pre_neuron ids)"""
    class_col: Optional[str] = None
    """column with the class (cell type / transmitter); or use ``prob_cols``"""
    sign_map: str = "fly"
    """class → sign: a preset (fly, microns), a JSON file or 'class=+1,class=-1'"""
    confidence_col: Optional[str] = None
    """optional column with the probability of the class call"""
    prob_cols: dict = field(default_factory=dict)
    """probability column → class (instead of ``class_col``), see signs_from_class_probs"""
    prob_rule: str = "argmax"
    """with ``prob_cols``: sign of the argmax class (``argmax``) or of the summed mass (``sum``)"""
    unmapped: str = "error"
    """classes missing from the map: error, or unknown (sign 0)"""
    min_confidence: float = 0.0
    """calls with lower confidence are weak"""
    source: Optional[str] = None
    """name of the source in the node table (default: the file name)"""


def table_signs(cfg: SignTableConfig) -> pd.DataFrame:
    """Read ``cfg.path`` and return its per-neuron sign frame (see :mod:`cleftwise.postprocess.connectome`)."""
    from cleftwise.storage.errors import StorageError
    from cleftwise.storage.importers.tables import read_table

    try:
        table = read_table(cfg.path)
    except StorageError as e:
        raise PostprocessError(f"sign table: {e}") from e
    name = cfg.source or os.path.basename(cfg.path)
    if cfg.prob_cols:
        return signs_from_class_probs(table, cfg.neuron_col, cfg.prob_cols, cfg.sign_map, rule=cfg.prob_rule,
                                      source=name, min_confidence=cfg.min_confidence)
    if not cfg.class_col:
        raise PostprocessError(f"sign table {cfg.path}: give class_col or prob_cols")
    return signs_from_table(table, cfg.neuron_col, cfg.class_col, cfg.sign_map, cfg.confidence_col,
                            source=name, unmapped=cfg.unmapped, min_confidence=cfg.min_confidence)


def signs_for(syn: pd.DataFrame, cfg: SignConfig = SignConfig(),
              sources: Sequence[pd.DataFrame] = (), use_synapses: bool = True) -> Optional[pd.DataFrame]:
    """Neuron signs for ``syn``: ``sources`` (in priority order) then the per-synapse evidence.

    With no ``sources`` this is the Dale's-principle sign from per-synapse E/I probabilities,
    or None when no synapse is classified. Otherwise the sources — table signs
    (:func:`table_signs`), classifier signs, … — and, when ``use_synapses`` and the synapses
    carry ``ei_prob``, the synapse signs last, are merged by
    :func:`cleftwise.postprocess.connectome.combine_signs` (priority rule, ``disagree`` flags).
    """
    syn_signs = None
    if use_synapses and "ei_prob" in syn and syn["ei_prob"].notna().sum() > 0:
        syn_signs = neuron_signs_from_synapses(syn, cfg)
    frames = [s for s in sources if s is not None and len(s)]
    if syn_signs is not None:
        frames.append(syn_signs)
    if not frames:
        return None
    if len(frames) == 1 and not sources:
        return frames[0]
    return combine_signs(frames)


def graph_tables(syn: pd.DataFrame, signs: Optional[pd.DataFrame] = None,
                 cfg: SignConfig = SignConfig()) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(edges, nodes) as exported: positive ``weight`` (``cfg.edge_weight``), nullable
    ``sign`` (+1/−1, <NA> when unknown) and ``signed_weight`` (see the module docstring)."""
    if cfg.edge_weight not in EDGE_WEIGHTS:
        raise PostprocessError(f"edge_weight must be one of {', '.join(EDGE_WEIGHTS)}, got {cfg.edge_weight!r}")
    edges = build_edges(syn, signs, cfg)
    nodes = node_table(edges, signs)
    if cfg.edge_weight == "score":
        kept = filter_synapses(syn, cfg)
        if "score_union" not in kept:
            raise PostprocessError("edge_weight score needs the synapses' score_union")
        score = kept.assign(pre=kept["pre_neuron"].astype(np.int64), post=kept["post_neuron"].astype(np.int64),
                            s=kept["score_union"].fillna(0).astype(float)).groupby(["pre", "post"])["s"].sum()
        weight = score.reindex(pd.MultiIndex.from_frame(edges[["pre", "post"]])).to_numpy(np.float64)
    else:
        weight = edges["n_synapses"].to_numpy(np.int64)
    nullable = "Float64" if weight.dtype.kind == "f" else "Int64"
    sign = edges["sign"].astype("Int8").where(edges["sign"] != 0, pd.NA)
    edges = edges.drop(columns=["weight", "sign"])
    at = edges.columns.get_loc("sign_confidence") if "sign_confidence" in edges else len(edges.columns)
    edges.insert(at, "weight", weight)
    edges.insert(at + 1, "sign", sign.to_numpy())
    edges.insert(at + 2, "signed_weight", pd.array(weight, dtype=nullable) * sign.astype(nullable).array)
    edges["sign"] = edges["sign"].astype("Int8")
    nodes["sign"] = nodes["sign"].astype("Int8").where(nodes["sign"] != 0, pd.NA)
    return edges, nodes


def export_graph(syn: pd.DataFrame, out: str, formats: Sequence[str] = ("csv",),
                 signs: Optional[pd.DataFrame] = None, cfg: SignConfig = SignConfig(),
                 annotation_kind: str = "line") -> dict:
    """Build edges/nodes from ``syn`` and write the requested formats; returns {format: path}.

    ``annotation_kind``: ``line`` (pre site → post site) or ``point`` (cleft centroid)."""
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise PostprocessError(f"unknown export format(s) {bad}; choose from {', '.join(FORMATS)}")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise PostprocessError(f"cannot create the export folder {out}: {e.strerror or e}") from e
    if signs is None:
        signs = signs_for(syn, cfg)
    edges, nodes = graph_tables(syn, signs, cfg)
    written = {}
    if "csv" in formats:
        _write(out, "edges.csv", lambda tmp: edges.to_csv(tmp, index=False))
        _write(out, "nodes.csv", lambda tmp: nodes.to_csv(tmp, index=False))
        written["csv"] = os.path.join(out, "edges.csv")
    if "parquet" in formats:
        _write(out, "edges.parquet", lambda tmp: edges.to_parquet(tmp, index=False))
        _write(out, "nodes.parquet", lambda tmp: nodes.to_parquet(tmp, index=False))
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
        written["graphml"] = _write(out, "graph.graphml", lambda tmp: nx.write_graphml(g, tmp))
    if "npz" in formats:
        from scipy import sparse

        index = pd.Index(nodes["neuron"].to_numpy(np.int64))
        rows, cols = index.get_indexer(edges["pre"]), index.get_indexer(edges["post"])
        n = len(index)
        known = edges["signed_weight"].notna().to_numpy()
        A = sparse.csr_matrix((edges["signed_weight"][known].to_numpy(float), (rows[known], cols[known])), shape=(n, n))
        W = sparse.csr_matrix((edges["weight"].to_numpy(float), (rows, cols)), shape=(n, n))
        written["npz"] = _write(out, "adjacency.npz", lambda tmp: sparse.save_npz(tmp, A))
        _write(out, "weights.npz", lambda tmp: sparse.save_npz(tmp, W))
        _write(out, "neurons.npy", lambda tmp: np.save(tmp, index.to_numpy(np.int64)))
    if "neuroglancer" in formats:
        written["neuroglancer"] = write_synapse_annotations(filter_synapses(syn, cfg), os.path.join(out, "annotations"),
                                                            kind=annotation_kind)
    return written


def _write(out: str, name: str, writer) -> str:
    """``writer(tmp)`` writes the file; it is renamed to ``out/name`` only when complete (a
    failed write raises StorageError naming the file and leaves no partial file)."""
    path = os.path.join(out, name)
    with atomic_path(path, "export") as tmp:
        writer(tmp)
    return path


def _plain(v):
    """numpy scalars → Python (GraphML needs str/int/float/bool); NaN / <NA> → None (omitted)."""
    if v is pd.NA:
        return None
    if isinstance(v, (np.bool_, bool)):
        return bool(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating, float)):
        return None if np.isnan(v) else float(v)
    if v is None or (isinstance(v, str) and v == ""):
        return None
    return v if isinstance(v, (int, str)) else str(v)
