"""Signed connectome from synapse records (pure pandas/numpy; no I/O).

Input: a synapse table with at least ``pre_neuron``, ``post_neuron`` and optionally ``size``,
``score_union``, ``pre_conf``, ``post_conf``, ``ei_prob`` (probability that the presynaptic
neuron is excitatory, per synapse), ``flags``.

Neuron signs by Dale's principle (:func:`neuron_signs_from_synapses`): each presynaptic neuron
has one sign. Its synapses' probabilities are combined as independent evidence in log-odds,
damped by ``evidence_weight`` (1 = naive Bayes; smaller = less trust in independence):

    logit p(E | synapses) = evidence_weight · Σ_s logit(clip(p_s, eps, 1 - eps))

``sign`` = +1 (excitatory) if p(E) ≥ 0.5 else −1; ``confidence`` = max(p, 1 − p). A neuron is
flagged ``weak`` when it has fewer than ``min_synapses`` classified synapses or its
confidence is below ``min_confidence``, and ``mixed`` when more than ``mixed_fraction`` of its
synapses vote against the neuron's sign.

Edges (:func:`build_edges`): directed pre → post with synapse count, summed size, mean
scores; each edge carries its presynaptic neuron's sign and ``weight = sign · n_synapses``
(0 where the sign is unknown).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Optional

import numpy as np
import pandas as pd

from .errors import PostprocessError

__all__ = ["SignConfig", "neuron_signs_from_synapses", "signs_from_table", "combine_signs",
           "filter_synapses", "build_edges", "node_table", "signed_adjacency"]


@dataclass
class SignConfig:
    """How neuron signs and edges are derived."""

    evidence_weight: float = 0.5
    """damping of summed per-synapse log-odds (1 = naive Bayes)"""
    min_synapses: int = 3
    """neurons with fewer classified synapses are flagged weak"""
    min_confidence: float = 0.9
    """neurons with lower posterior confidence are flagged weak"""
    mixed_fraction: float = 0.3
    """flag mixed when more than this fraction of synapses vote against the neuron's sign"""
    min_synapse_score: float = 0.0
    """drop synapses with a lower union score before building edges"""
    min_partner_conf: float = 0.0
    """drop synapses whose pre or post neuron vote fraction is lower"""
    drop_autapses: bool = True
    """drop synapses whose pre and post neuron are the same"""
    drop_background: bool = True
    """drop synapses with a background (0) pre or post neuron"""
    drop_weak_neurons: bool = False
    """give weak/mixed neurons sign 0 in the edges (kept, but unsigned)"""


def _need(df: pd.DataFrame, cols: Iterable[str], what: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise PostprocessError(f"{what}: synapse table lacks columns {missing}")


def filter_synapses(syn: pd.DataFrame, cfg: SignConfig = SignConfig()) -> pd.DataFrame:
    """Apply the synapse-level filters of ``cfg`` (autapses, background, scores)."""
    _need(syn, ("pre_neuron", "post_neuron"), "filter_synapses")
    keep = np.ones(len(syn), bool)
    pre = syn["pre_neuron"].fillna(0).to_numpy(np.int64)
    post = syn["post_neuron"].fillna(0).to_numpy(np.int64)
    if cfg.drop_background:
        keep &= (pre != 0) & (post != 0)
    if cfg.drop_autapses:
        keep &= pre != post
    if cfg.min_synapse_score > 0 and "score_union" in syn:
        keep &= syn["score_union"].fillna(0).to_numpy(float) >= cfg.min_synapse_score
    if cfg.min_partner_conf > 0 and "pre_conf" in syn and "post_conf" in syn:
        keep &= (syn["pre_conf"].fillna(0).to_numpy(float) >= cfg.min_partner_conf) & \
                (syn["post_conf"].fillna(0).to_numpy(float) >= cfg.min_partner_conf)
    return syn.loc[keep]


def neuron_signs_from_synapses(syn: pd.DataFrame, cfg: SignConfig = SignConfig(),
                               prob_col: str = "ei_prob", eps: float = 1e-3) -> pd.DataFrame:
    """Per presynaptic neuron: p(E), sign, confidence, counts and weak/mixed flags."""
    _need(syn, ("pre_neuron", prob_col), "neuron_signs_from_synapses")
    d = syn[["pre_neuron", prob_col]].dropna()
    d = d[d["pre_neuron"].astype(np.int64) != 0]
    p = np.clip(d[prob_col].to_numpy(float), eps, 1 - eps)
    d = d.assign(logit=np.log(p / (1 - p)), vote_e=(p >= 0.5))
    g = d.groupby(d["pre_neuron"].astype(np.int64))
    out = pd.DataFrame({"n_classified": g.size(), "logit_sum": g["logit"].sum(),
                        "frac_e": g["vote_e"].mean()})
    out.index.name = "neuron"
    z = cfg.evidence_weight * out["logit_sum"].to_numpy()
    p_e = 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))
    out["p_excitatory"] = p_e
    out["sign"] = np.where(p_e >= 0.5, 1, -1)
    out["confidence"] = np.maximum(p_e, 1 - p_e)
    against = np.where(out["sign"] > 0, 1 - out["frac_e"], out["frac_e"])
    out["weak"] = (out["n_classified"] < cfg.min_synapses) | (out["confidence"] < cfg.min_confidence)
    out["mixed"] = against > cfg.mixed_fraction
    out["source"] = "synapses"
    return out.drop(columns=["logit_sum"]).reset_index()


def signs_from_table(table: pd.DataFrame, neuron_col: str, class_col: str,
                     class_to_sign: Mapping[str, int], confidence_col: Optional[str] = None
                     ) -> pd.DataFrame:
    """Per-neuron signs from a cell-type / transmitter table and a class → sign map.

    Classes missing from the map raise (listing them) unless mapped explicitly to 0 (unknown).
    """
    _need(table, (neuron_col, class_col), "signs_from_table")
    classes = table[class_col].astype(str)
    unknown = sorted(set(classes) - set(map(str, class_to_sign)))
    if unknown:
        raise PostprocessError(f"signs_from_table: classes {unknown} are not in the class→sign map "
                               f"{dict(class_to_sign)}; map them (0 = unknown) or drop those rows")
    sign = classes.map({str(k): int(v) for k, v in class_to_sign.items()}).to_numpy(int)
    out = pd.DataFrame({"neuron": table[neuron_col].astype(np.int64).to_numpy(), "sign": sign,
                        "class": classes.to_numpy()})
    out["confidence"] = table[confidence_col].to_numpy(float) if confidence_col else np.where(sign != 0, 1.0, 0.0)
    out["p_excitatory"] = np.where(sign > 0, out["confidence"], np.where(sign < 0, 1 - out["confidence"], 0.5))
    out["weak"] = sign == 0
    out["mixed"] = False
    out["source"] = "table"
    return out


def combine_signs(sources: list[pd.DataFrame]) -> pd.DataFrame:
    """Combine sign sources (each with neuron, sign, confidence, source), in priority order.

    Rule: the first source (highest priority) with a non-weak sign for a neuron decides it;
    where two non-weak sources give opposite signs the neuron is flagged ``disagree`` and keeps
    the priority source's sign. Neurons only weakly signed keep the first source's sign, weak.
    """
    if not sources:
        raise PostprocessError("combine_signs: no sign sources given")
    frames = []
    for rank, s in enumerate(sources):
        _need(s, ("neuron", "sign", "confidence"), f"combine_signs source {rank}")
        f = s.copy()
        f["rank"] = rank
        if "weak" not in f:
            f["weak"] = False
        frames.append(f)
    allf = pd.concat(frames, ignore_index=True)
    allf["strong"] = ~allf["weak"].astype(bool) & (allf["sign"] != 0)
    allf = allf.sort_values(["neuron", "strong", "rank"], ascending=[True, False, True])
    best = allf.groupby("neuron", sort=True).head(1).set_index("neuron")
    strong = allf[allf["strong"]]
    n_signs = strong.groupby("neuron")["sign"].nunique()
    best["disagree"] = n_signs.reindex(best.index).fillna(1).to_numpy() > 1
    best["n_sources"] = allf.groupby("neuron").size().reindex(best.index).to_numpy()
    return best.drop(columns=["strong", "rank"]).reset_index()


def build_edges(syn: pd.DataFrame, signs: Optional[pd.DataFrame] = None,
                cfg: SignConfig = SignConfig()) -> pd.DataFrame:
    """Directed neuron → neuron edges with counts, sizes, mean scores, sign and weight."""
    s = filter_synapses(syn, cfg)
    s = s.assign(pre=s["pre_neuron"].astype(np.int64), post=s["post_neuron"].astype(np.int64))
    agg = {"n_synapses": ("pre", "size")}
    if "size" in s:
        agg["total_size"] = ("size", "sum")
    for col in ("score_union", "ei_prob"):
        if col in s:
            agg[f"mean_{col}"] = (col, "mean")
    edges = s.groupby(["pre", "post"], sort=True).agg(**agg).reset_index()
    if signs is not None and len(signs):
        sg = signs.set_index(signs["neuron"].astype(np.int64))
        sign = sg["sign"].reindex(edges["pre"]).fillna(0).to_numpy(int)
        if cfg.drop_weak_neurons:
            bad = (sg["weak"].astype(bool) | sg.get("mixed", False)).reindex(edges["pre"]).fillna(True).to_numpy(bool)
            sign = np.where(bad, 0, sign)
        edges["sign"] = sign
        edges["sign_confidence"] = sg["confidence"].reindex(edges["pre"]).to_numpy(float)
    else:
        edges["sign"] = 0
        edges["sign_confidence"] = np.nan
    edges["weight"] = edges["sign"] * edges["n_synapses"]
    return edges


def node_table(edges: pd.DataFrame, signs: Optional[pd.DataFrame] = None) -> pd.DataFrame:
    """One row per neuron in the graph: in/out degree and synapse counts, sign fields."""
    ids = np.union1d(edges["pre"].to_numpy(np.int64), edges["post"].to_numpy(np.int64))
    nodes = pd.DataFrame({"neuron": ids})
    out = edges.groupby("pre").agg(out_degree=("post", "size"), out_synapses=("n_synapses", "sum"))
    inn = edges.groupby("post").agg(in_degree=("pre", "size"), in_synapses=("n_synapses", "sum"))
    nodes = nodes.join(out, on="neuron").join(inn, on="neuron").fillna(0)
    for c in ("out_degree", "out_synapses", "in_degree", "in_synapses"):
        nodes[c] = nodes[c].astype(np.int64)
    if signs is not None and len(signs):
        cols = [c for c in ("sign", "p_excitatory", "confidence", "weak", "mixed", "disagree", "source")
                if c in signs]
        nodes = nodes.merge(signs[["neuron"] + cols], on="neuron", how="left")
        nodes["sign"] = nodes["sign"].fillna(0).astype(int)
    else:
        nodes["sign"] = 0
    return nodes


def signed_adjacency(edges: pd.DataFrame, nodes: pd.DataFrame):
    """scipy.sparse CSR matrix A[i, j] = weight of edge node i → node j (index = nodes.neuron)."""
    from scipy import sparse

    index = {int(n): i for i, n in enumerate(nodes["neuron"].to_numpy(np.int64))}
    rows = np.array([index[int(p)] for p in edges["pre"]], dtype=np.int64)
    cols = np.array([index[int(p)] for p in edges["post"]], dtype=np.int64)
    n = len(index)
    return sparse.csr_matrix((edges["weight"].to_numpy(float), (rows, cols)), shape=(n, n))
