"""Per-neuron features for the neuron-level E/I classifier (pure pandas/numpy; no I/O).

A :class:`FeatureTable` is a float frame indexed by neuron id (int64) plus named feature
groups (``group → columns``), so ablations can ask for "size statistics alone" or "density
alone". Two builders:

- :func:`features_from_table`: a per-neuron table that already holds statistics (e.g. the
  MICrONS ``neurons.csv``; :data:`MICRONS_GROUPS` names its groups and
  :data:`MICRONS_EXCLUDED` the columns that must not be used);
- :func:`features_from_synapses`: statistics computed from synapse records (as the synapse DB
  returns them), per neuron as the **postsynaptic** partner (``in_*``: synapses it receives)
  and as the **presynaptic** partner (``out_*``: synapses it makes):

  ========== ===========================================================================
  group      columns
  ========== ===========================================================================
  size_in    ``in_size_p25/p50/p75``: quartiles of received synapse sizes (``size``, voxels)
  size_out   ``out_size_p25/p50/p75``: quartiles of made synapse sizes
  degree     ``log_in_synapses``, ``log_out_synapses``, ``log_in_degree``, ``log_out_degree``
             (log1p of counts; degree = distinct non-zero partners)
  partners   ``in_per_partner``, ``out_per_partner`` (synapses per partner),
             ``reciprocity`` (fraction of post partners that also synapse back),
             ``partner_log_in_degree`` (mean log1p in-degree of the post partners)
  density    ``in_density``, ``out_density``: synapses per µm of neuron length, only when
             ``lengths`` (µm per neuron) are given
  image      ``mean_out_ei_logit``: mean logit of the image classifier's per-synapse
             ``ei_prob`` over the neuron's outgoing synapses (when present)
  ========== ===========================================================================

Missing values (e.g. no outgoing synapses) stay NaN; the classifier imputes them with the
training-fold median.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from cleftwise.postprocess.errors import PostprocessError

__all__ = ["FeatureTable", "MICRONS_GROUPS", "MICRONS_EXCLUDED", "features_from_table",
           "features_from_synapses", "join_features"]

#: feature groups of the MICrONS pinky100 ``neurons.csv`` (statistics of the synapses each neuron
#: *receives*, and one morphology measure).
MICRONS_GROUPS: dict[str, list[str]] = {
    "size": ["synapse_size_dend_p25", "synapse_size_dend_p50", "synapse_size_dend_p75",
             "synapse_size_soma_p25", "synapse_size_soma_p50", "synapse_size_soma_p75"],
    "density": ["syn_density_dend", "syn_density_soma"],
    "morphology": ["dend_surface_per_length"],
}

#: ``neurons.csv`` columns left out of the classifier, and why.
MICRONS_EXCLUDED: dict[str, str] = {
    "path_len": "10000 (a cap/placeholder) for all 65 E neurons and < 2,400 for all 20 I neurons: "
                "it encodes how the table was made, not a measurement comparable across classes",
    "soma_qc": "a quality-control flag of the soma segmentation, not a property of the cell",
    "cell_type": "the label",
    "oid": "the neuron id",
}


@dataclass
class FeatureTable:
    """Per-neuron features: ``frame`` (index ``neuron``, float64 columns) and named groups."""

    frame: pd.DataFrame
    """rows = neurons (int64 index named ``neuron``), columns = features (float64)"""
    groups: dict
    """group name → list of columns of ``frame``"""

    def __post_init__(self) -> None:
        cols = set(self.frame.columns)
        for g, c in self.groups.items():
            missing = [x for x in c if x not in cols]
            if missing:
                raise PostprocessError(f"feature group {g!r} names columns {missing} not in the table")

    @property
    def neurons(self) -> np.ndarray:
        return self.frame.index.to_numpy(np.int64)

    def columns(self, groups: Optional[Iterable[str]] = None) -> list[str]:
        """Columns of the given groups (all groups when None), in group order, deduplicated."""
        names = list(self.groups) if groups is None else list(groups)
        unknown = [g for g in names if g not in self.groups]
        if unknown:
            raise PostprocessError(f"unknown feature groups {unknown}; have {list(self.groups)}")
        return list(dict.fromkeys(c for g in names for c in self.groups[g]))

    def select(self, groups: Iterable[str]) -> "FeatureTable":
        names = list(groups)
        cols = self.columns(names)
        return FeatureTable(self.frame[cols], {g: list(self.groups[g]) for g in names})

    def matrix(self, groups: Optional[Iterable[str]] = None) -> np.ndarray:
        """(n_neurons, n_features) float64 array of the groups' columns."""
        return self.frame[self.columns(groups)].to_numpy(np.float64)


def _ids(values, what: str) -> np.ndarray:
    s = pd.Series(values)
    if s.isna().any():
        raise PostprocessError(f"{what}: neuron ids are missing in {int(s.isna().sum())} rows")
    try:
        return s.astype(np.int64).to_numpy()
    except (TypeError, ValueError, OverflowError) as e:
        raise PostprocessError(f"{what}: neuron ids must be integers: {e}") from None


def features_from_table(table: pd.DataFrame, neuron_col: str,
                        groups: Mapping[str, Sequence[str]]) -> FeatureTable:
    """Features read from a per-neuron table (one row per neuron).

    Raises:
        PostprocessError: missing or non-numeric columns, duplicate neuron ids.
    """
    cols = list(dict.fromkeys(c for g in groups.values() for c in g))
    missing = [c for c in [neuron_col, *cols] if c not in table.columns]
    if missing:
        raise PostprocessError(f"features_from_table: table lacks columns {missing}")
    ids = _ids(table[neuron_col].to_numpy(), f"features_from_table {neuron_col!r}")
    dup = pd.Series(ids).duplicated()
    if dup.any():
        raise PostprocessError(f"features_from_table: neuron ids {ids[dup.to_numpy()][:5].tolist()} repeat")
    data = {}
    for c in cols:
        v = pd.to_numeric(table[c], errors="coerce")
        if (v.isna() & table[c].notna()).any():
            raise PostprocessError(f"features_from_table: column {c!r} must be numeric")
        data[c] = v.to_numpy(np.float64)
    frame = pd.DataFrame(data, index=pd.Index(ids, name="neuron"))
    return FeatureTable(frame, {g: list(c) for g, c in groups.items()})


def _quartiles(values: pd.Series, keys: pd.Series, prefix: str) -> pd.DataFrame:
    g = values.groupby(keys)
    return pd.DataFrame({f"{prefix}_p25": g.quantile(0.25), f"{prefix}_p50": g.median(),
                         f"{prefix}_p75": g.quantile(0.75)})


def features_from_synapses(syn: pd.DataFrame, size_col: str = "size",
                           lengths: Optional[Mapping[int, float]] = None,
                           drop_autapses: bool = True) -> FeatureTable:
    """Per-neuron synapse statistics (see the module docstring for the groups).

    Args:
        syn: synapse records with ``pre_neuron``, ``post_neuron`` and optionally ``size_col``
            and ``ei_prob``; neuron 0 (background) is ignored as a neuron and as a partner.
        size_col: column with synapse sizes (any unit; voxels in cleftwise records).
        lengths: neuron id → length in µm (e.g. skeleton path length) for the density group.
        drop_autapses: ignore synapses whose pre and post neuron are the same.

    Returns:
        :class:`FeatureTable` over every neuron that makes or receives a synapse.
    """
    for c in ("pre_neuron", "post_neuron"):
        if c not in syn.columns:
            raise PostprocessError(f"features_from_synapses: synapse table lacks column {c!r}")
    pre = _ids(syn["pre_neuron"].fillna(0).to_numpy(), "features_from_synapses pre_neuron")
    post = _ids(syn["post_neuron"].fillna(0).to_numpy(), "features_from_synapses post_neuron")
    keep = np.ones(len(syn), bool) if not drop_autapses else pre != post
    s = pd.DataFrame({"pre": pre, "post": post})[keep]
    sizes = None
    if size_col in syn.columns:
        sizes = pd.to_numeric(syn[size_col], errors="coerce").astype(np.float64)[keep]
        if sizes.notna().sum() == 0:
            sizes = None
    neurons = np.setdiff1d(np.union1d(s["pre"], s["post"]), [0])
    idx = pd.Index(neurons, name="neuron")
    out = pd.DataFrame(index=idx)
    groups: dict[str, list[str]] = {}

    if sizes is not None:
        s = s.assign(size=sizes.to_numpy())
        sin = s[s["post"] != 0].dropna(subset=["size"])
        sout = s[s["pre"] != 0].dropna(subset=["size"])
        q_in = _quartiles(sin["size"], sin["post"], "in_size").reindex(idx)
        q_out = _quartiles(sout["size"], sout["pre"], "out_size").reindex(idx)
        out = out.join(q_in).join(q_out)
        groups["size_in"], groups["size_out"] = list(q_in.columns), list(q_out.columns)

    inc = s[s["post"] != 0]
    outg = s[s["pre"] != 0]
    linked = s[(s["pre"] != 0) & (s["post"] != 0)]
    in_syn = inc.groupby("post").size().reindex(idx, fill_value=0).astype(float)
    out_syn = outg.groupby("pre").size().reindex(idx, fill_value=0).astype(float)
    pairs = linked.drop_duplicates(["pre", "post"])
    in_deg = pairs.groupby("post").size().reindex(idx, fill_value=0).astype(float)
    out_deg = pairs.groupby("pre").size().reindex(idx, fill_value=0).astype(float)
    out["log_in_synapses"], out["log_out_synapses"] = np.log1p(in_syn), np.log1p(out_syn)
    out["log_in_degree"], out["log_out_degree"] = np.log1p(in_deg), np.log1p(out_deg)
    groups["degree"] = ["log_in_synapses", "log_out_synapses", "log_in_degree", "log_out_degree"]

    linked_in = linked.groupby("post").size().reindex(idx, fill_value=0).astype(float)
    linked_out = linked.groupby("pre").size().reindex(idx, fill_value=0).astype(float)
    out["in_per_partner"] = np.where(in_deg > 0, linked_in / in_deg.where(in_deg > 0, 1), np.nan)
    out["out_per_partner"] = np.where(out_deg > 0, linked_out / out_deg.where(out_deg > 0, 1), np.nan)
    edge_set = set(zip(pairs["pre"].tolist(), pairs["post"].tolist()))
    back = np.array([(b, a) in edge_set for a, b in zip(pairs["pre"], pairs["post"])], bool)
    recip = pd.Series(back, index=pairs.index).groupby(pairs["pre"]).mean() if len(pairs) else pd.Series(dtype=float)
    out["reciprocity"] = recip.reindex(idx).to_numpy(float)
    p_in = np.log1p(in_deg)
    partner = pairs.assign(pin=p_in.reindex(pairs["post"]).to_numpy()).groupby("pre")["pin"].mean() \
        if len(pairs) else pd.Series(dtype=float)
    out["partner_log_in_degree"] = partner.reindex(idx).to_numpy(float)
    groups["partners"] = ["in_per_partner", "out_per_partner", "reciprocity", "partner_log_in_degree"]

    if lengths is not None:
        ln = pd.Series(lengths, dtype=float)
        ln.index = ln.index.astype(np.int64)
        ln = ln.reindex(idx)
        bad = ln.notna() & (ln <= 0)
        if bad.any():
            raise PostprocessError(f"features_from_synapses: lengths of neurons {ln[bad].index[:5].tolist()} "
                                   f"are not positive")
        out["in_density"] = in_syn / ln
        out["out_density"] = out_syn / ln
        groups["density"] = ["in_density", "out_density"]

    if "ei_prob" in syn.columns and syn["ei_prob"].notna().any():
        p = np.clip(pd.to_numeric(syn["ei_prob"], errors="coerce").to_numpy(float)[keep], 1e-3, 1 - 1e-3)
        lg = pd.Series(np.log(p / (1 - p)), index=s.index)
        m = lg[(s["pre"] != 0).to_numpy()].groupby(s.loc[s["pre"] != 0, "pre"]).mean()
        out["mean_out_ei_logit"] = m.reindex(idx).to_numpy(float)
        groups["image"] = ["mean_out_ei_logit"]

    return FeatureTable(out.astype(np.float64), groups)


def join_features(*tables: FeatureTable, how: str = "inner") -> FeatureTable:
    """Join feature tables on the neuron id (``inner``: neurons present in all; ``outer``: any)."""
    if not tables:
        raise PostprocessError("join_features: no tables given")
    frame, groups = tables[0].frame, dict(tables[0].groups)
    for t in tables[1:]:
        clash = set(frame.columns) & set(t.frame.columns)
        if clash:
            raise PostprocessError(f"join_features: columns {sorted(clash)} appear in several tables")
        same = set(groups) & set(t.groups)
        if same:
            raise PostprocessError(f"join_features: groups {sorted(same)} appear in several tables")
        frame = frame.join(t.frame, how=how)
        groups.update(t.groups)
    return FeatureTable(frame, groups)
