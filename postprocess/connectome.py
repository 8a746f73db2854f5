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
(0 where the sign is unknown). Exports (:mod:`cleftwise.postprocess.export`) turn this into a
positive ``weight``, a ``sign`` that is missing when unknown and a ``signed_weight``.

Sign sources — every one returns the same per-neuron frame (``neuron``, ``sign`` ∈ {+1, −1, 0},
``p_excitatory``, ``confidence``, ``weak``, ``mixed``, ``source``), so they compose in
:func:`combine_signs`:

(a) :func:`neuron_signs_from_synapses`: per-synapse E/I probabilities, Dale's principle (above);
(b) :func:`signs_from_table`: a per-neuron cell-type / transmitter table with a class → sign map
    (:data:`SIGN_PRESETS`: ``fly`` — acetylcholine +, GABA/glutamate/glycine/histamine −,
    modulators 0; ``microns`` — ``e`` +, basket/bipolar/chandelier/martinotti/neurogliaform −,
    ``unknown_type`` 0), and :func:`signs_from_class_probs` for per-class probabilities
    (e.g. predicted transmitters: sign of the argmax class, or of the summed + / − mass);
(c) a neuron-level classifier on per-neuron features
    (:meth:`postprocess.neuron_classifier.NeuronClassifier.signs`).

Combination (:func:`combine_signs`): sources are given in priority order; the first source with
a *strong* sign (non-zero and not weak) decides; a neuron whose strong signs disagree is flagged
``disagree`` (and ``disagree_sources`` names the sources against the chosen sign), keeping the
priority source's sign.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Optional

import numpy as np
import pandas as pd

from cleftwise.postprocess.errors import PostprocessError

__all__ = ["SignConfig", "EDGE_WEIGHTS", "SIGN_PRESETS", "resolve_sign_map", "neuron_signs_from_synapses",
           "signs_from_table", "signs_from_class_probs", "combine_signs", "filter_synapses",
           "build_edges", "node_table", "signed_adjacency"]

#: class → sign maps (+1 excitatory, −1 inhibitory, 0 unknown / modulatory); keys are matched
#: case-insensitively.
SIGN_PRESETS: dict[str, dict[str, int]] = {
    # Drosophila: acetylcholine excitatory; GABA, glutamate (GluCl), glycine and histamine
    # inhibitory; monoamines and NO modulatory (0).
    "fly": {"acetylcholine": 1, "gaba": -1, "glutamate": -1, "glycine": -1, "histamine": -1,
            "dopamine": 0, "serotonin": 0, "octopamine": 0, "tyramine": 0, "nitric_oxide": 0,
            "unknown": 0, "unclear": 0},
    # MICrONS pinky100 cell types: "e" pyramidal / excitatory, interneuron classes inhibitory.
    "microns": {"e": 1, "basket": -1, "bipolar": -1, "chandelier": -1, "martinotti": -1,
                "neurogliaform": -1, "unknown_type": 0},
}


#: what an exported edge's positive ``weight`` measures (:attr:`SignConfig.edge_weight`)
EDGE_WEIGHTS = ("count", "score")


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
    """give weak/mixed neurons sign 0 in the edges (kept, but unsigned: no sign in exports)"""
    edge_weight: str = "count"
    """exported edge ``weight`` (always ≥ 0): count (number of synapses) or score (summed
    score_union of the edge's synapses); the sign is a separate attribute"""

    def __post_init__(self):
        if self.edge_weight not in EDGE_WEIGHTS:
            raise PostprocessError(f"edge_weight must be one of {', '.join(EDGE_WEIGHTS)}, "
                                   f"got {self.edge_weight!r}")


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


def resolve_sign_map(spec) -> dict[str, int]:
    """A class → sign map from a preset name, a mapping, ``"cls=+1,cls=-1"`` or a JSON file.

    Signs must be +1, −1 or 0. Keys are returned lower-cased; two keys that differ only in
    case must agree.
    """
    raw = spec
    if isinstance(spec, str):
        if spec in SIGN_PRESETS:
            raw = SIGN_PRESETS[spec]
        elif spec.lower().endswith(".json"):
            import json

            try:
                with open(spec) as f:
                    raw = json.load(f)
            except (OSError, ValueError) as e:
                raise PostprocessError(f"sign map file {spec}: {e}") from e
        elif "=" in spec:
            raw = {}
            for item in spec.split(","):
                k, _, v = item.partition("=")
                raw[k.strip()] = v.strip()
        else:
            raise PostprocessError(f"sign map {spec!r}: not a preset ({', '.join(SIGN_PRESETS)}), "
                                   f"a JSON file or 'class=sign,...'")
    if not isinstance(raw, Mapping):
        raise PostprocessError(f"sign map must be a mapping class → sign, got {type(raw).__name__}")
    out: dict[str, int] = {}
    for k, v in raw.items():
        try:
            sign = int(float(v))
        except (TypeError, ValueError):
            sign = None
        if sign not in (-1, 0, 1) or (isinstance(v, float) and not float(v).is_integer()):
            raise PostprocessError(f"sign map: class {k!r} has sign {v!r}; use +1, -1 or 0")
        key = str(k).strip().lower()
        if key in out and out[key] != sign:
            raise PostprocessError(f"sign map: class {k!r} is given twice with different signs")
        out[key] = sign
    return out


def _neuron_ids(values, what: str) -> np.ndarray:
    ser = pd.Series(values)
    if ser.isna().any():
        raise PostprocessError(f"{what}: neuron ids are missing in {int(ser.isna().sum())} rows")
    try:
        return ser.astype(np.int64).to_numpy()
    except (TypeError, ValueError, OverflowError) as e:
        raise PostprocessError(f"{what}: neuron ids must be integers: {e}") from None


def _unique_neurons(out: pd.DataFrame, what: str) -> pd.DataFrame:
    """Drop exact repeats of a neuron; conflicting repeats raise."""
    dup = out["neuron"].duplicated(keep=False)
    if not dup.any():
        return out
    conflict = out[dup].groupby("neuron")["sign"].nunique()
    bad = conflict[conflict > 1].index.tolist()
    if bad:
        raise PostprocessError(f"{what}: neurons {bad[:5]} appear with different signs")
    return out.drop_duplicates("neuron", keep="first").reset_index(drop=True)


def signs_from_table(table: pd.DataFrame, neuron_col: str, class_col: str,
                     class_to_sign, confidence_col: Optional[str] = None, *,
                     source: str = "table", unmapped: str = "error",
                     min_confidence: float = 0.0) -> pd.DataFrame:
    """Per-neuron signs from a cell-type / transmitter table and a class → sign map.

    Args:
        table: one row per neuron.
        neuron_col, class_col: columns with the neuron id and its class (cell type or
            transmitter name).
        class_to_sign: a mapping, a preset name (:data:`SIGN_PRESETS`) or any form
            :func:`resolve_sign_map` accepts; matched case-insensitively.
        confidence_col: optional column with the probability of the class call (default 1 for
            signed classes).
        source: name written into ``source``.
        unmapped: ``error`` (default): classes missing from the map raise, listing them;
            ``unknown``: they get sign 0.
        min_confidence: rows with a lower confidence are flagged ``weak``.

    Missing classes (NaN) are sign 0. Classes mapped to 0 are unknown (sign 0, weak).
    """
    _need(table, (neuron_col, class_col), "signs_from_table")
    smap = resolve_sign_map(class_to_sign)
    if unmapped not in ("error", "unknown"):
        raise PostprocessError(f"signs_from_table: unmapped must be 'error' or 'unknown', got {unmapped!r}")
    present = table[class_col].notna().to_numpy()
    classes = table[class_col].astype(str).where(present, "")
    keys = classes.str.strip().str.lower()
    unknown = sorted(set(classes[present & ~keys.isin(list(smap)).to_numpy()]))
    if unknown and unmapped == "error":
        raise PostprocessError(f"signs_from_table: classes {unknown} are not in the class→sign map "
                               f"{dict(smap)}; map them (0 = unknown) or drop those rows")
    sign = np.where(present, keys.map(smap).fillna(0).to_numpy(int), 0)
    out = pd.DataFrame({"neuron": _neuron_ids(table[neuron_col].to_numpy(), f"signs_from_table {neuron_col!r}"),
                        "sign": sign, "class": classes.to_numpy()})
    if confidence_col:
        _need(table, (confidence_col,), "signs_from_table")
        conf = pd.to_numeric(table[confidence_col], errors="coerce").to_numpy(float)
        conf = np.where(np.isnan(conf), 0.5, conf)
    else:
        conf = np.where(sign != 0, 1.0, 0.5)
    out["confidence"] = np.where(sign != 0, conf, 0.5)
    out["p_excitatory"] = np.where(sign > 0, out["confidence"], np.where(sign < 0, 1 - out["confidence"], 0.5))
    out["weak"] = (sign == 0) | (out["confidence"].to_numpy() < min_confidence)
    out["mixed"] = False
    out["source"] = source
    return _unique_neurons(out, f"signs_from_table ({source})")


def signs_from_class_probs(table: pd.DataFrame, neuron_col: str, prob_cols: Mapping[str, str],
                           class_to_sign, *, rule: str = "argmax", source: str = "predicted",
                           min_confidence: float = 0.0) -> pd.DataFrame:
    """Per-neuron signs from per-class probabilities (e.g. predicted transmitters).

    ``prob_cols`` maps probability column → class name; ``class`` is the argmax class.

    - ``rule="argmax"`` (default): the sign of the most probable class; ``confidence`` = its
      probability; ``p_excitatory`` = confidence for +, 1 − confidence for −. An argmax class
      signed 0 (unknown, modulatory) gives sign 0.
    - ``rule="sum"``: with P+ and P− the summed probabilities of the classes signed +1 and −1
      (classes signed 0 only dilute): ``p_excitatory = P+ / (P+ + P−)``, sign = +1 if
      P+ ≥ P− else −1, ``confidence = max(P+, P−)``. Right only when the class probabilities
      are calibrated; on MANC's predictions it disagrees with FISH more often than argmax
      (``docs/reports/real_tables.md``).

    Rows without probabilities (all NaN) get sign 0, weak; rows below ``min_confidence`` are weak.
    """
    if not prob_cols:
        raise PostprocessError("signs_from_class_probs: no probability columns given")
    _need(table, (neuron_col, *prob_cols), "signs_from_class_probs")
    smap = resolve_sign_map(class_to_sign)
    names = [str(c).strip().lower() for c in prob_cols.values()]
    missing = sorted(set(names) - set(smap))
    if missing:
        raise PostprocessError(f"signs_from_class_probs: classes {missing} are not in the class→sign "
                               f"map {dict(smap)}")
    P = np.stack([pd.to_numeric(table[c], errors="coerce").to_numpy(float) for c in prob_cols], axis=1)
    empty = np.isnan(P).all(axis=1)
    P = np.nan_to_num(P, nan=0.0)
    if np.any(P < 0):
        raise PostprocessError("signs_from_class_probs: probabilities must be >= 0")
    if rule not in ("argmax", "sum"):
        raise PostprocessError(f"signs_from_class_probs: rule must be 'argmax' or 'sum', got {rule!r}")
    signs = np.array([smap[n] for n in names])
    top = P.argmax(axis=1)
    if rule == "sum":
        p_plus, p_minus = P[:, signs > 0].sum(axis=1), P[:, signs < 0].sum(axis=1)
        denom = p_plus + p_minus
        p_e = np.where(denom > 0, p_plus / np.where(denom > 0, denom, 1), 0.5)
        sign = np.where(denom > 0, np.where(p_plus >= p_minus, 1, -1), 0)
        conf = np.maximum(p_plus, p_minus)
    else:
        sign = signs[top].astype(int)
        conf = P[np.arange(len(P)), top]
        p_e = np.where(sign > 0, conf, 1 - conf)
    sign[empty] = 0
    conf = np.where(sign != 0, conf, 0.5)
    klass = np.array(list(prob_cols.values()), dtype=object)[top]
    klass[empty] = ""
    out = pd.DataFrame({"neuron": _neuron_ids(table[neuron_col].to_numpy(), f"signs_from_class_probs {neuron_col!r}"),
                        "sign": sign, "class": klass, "confidence": conf,
                        "p_excitatory": np.where(sign != 0, p_e, 0.5)})
    out["weak"] = (sign == 0) | (conf < min_confidence)
    out["mixed"] = False
    out["source"] = source
    return _unique_neurons(out, f"signs_from_class_probs ({source})")


def combine_signs(sources: list[pd.DataFrame]) -> pd.DataFrame:
    """Combine sign sources (each with neuron, sign, confidence, source), in priority order.

    Rule: the first source (highest priority) with a strong sign (non-zero, not weak) for a
    neuron decides it; where two strong sources give opposite signs the neuron is flagged
    ``disagree`` and keeps the priority source's sign; ``disagree_sources`` lists the sources
    whose strong sign is against it ('' when none). Neurons only weakly signed keep the first
    source's sign, weak. ``n_sources``: how many sources know the neuron. A source naming a
    neuron twice with different signs raises.
    """
    if not sources:
        raise PostprocessError("combine_signs: no sign sources given")
    frames = []
    for rank, s in enumerate(sources):
        _need(s, ("neuron", "sign", "confidence"), f"combine_signs source {rank}")
        f = s.copy()
        f["neuron"] = _neuron_ids(f["neuron"].to_numpy(), f"combine_signs source {rank}")
        f["rank"] = rank
        if "weak" not in f:
            f["weak"] = False
        if "source" not in f:
            f["source"] = f"source{rank}"
        frames.append(_unique_neurons(f, f"combine_signs source {rank}"))
    allf = pd.concat(frames, ignore_index=True)
    allf["strong"] = ~allf["weak"].astype(bool) & (allf["sign"] != 0)
    allf = allf.sort_values(["neuron", "strong", "rank"], ascending=[True, False, True])
    best = allf.groupby("neuron", sort=True).head(1).set_index("neuron")
    strong = allf[allf["strong"]]
    n_signs = strong.groupby("neuron")["sign"].nunique()
    best["disagree"] = n_signs.reindex(best.index).fillna(1).to_numpy() > 1
    chosen = best["sign"].reindex(strong["neuron"]).to_numpy()
    against = strong[strong["sign"].to_numpy() != chosen]
    names = against.groupby("neuron")["source"].agg(lambda v: ",".join(map(str, v)))
    best["disagree_sources"] = names.reindex(best.index).fillna("").astype(str).to_numpy()
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
        cols = [c for c in ("sign", "p_excitatory", "confidence", "weak", "mixed", "disagree",
                            "disagree_sources", "n_sources", "class", "source")
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
