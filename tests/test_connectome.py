"""Signed connectome: Dale's-principle neuron signs, table signs, combination, edges."""

import os

import numpy as np
import pandas as pd
import pytest

from cleftwise.postprocess.connectome import (SignConfig, build_edges, combine_signs, neuron_signs_from_synapses,
                                    node_table, signed_adjacency, signs_from_table)
from cleftwise.postprocess.errors import PostprocessError


def _synapses():
    rows = []
    # neuron 1: excitatory, 6 confident synapses onto 2 and 3
    rows += [dict(pre_neuron=1, post_neuron=2 + (i % 2), ei_prob=0.9, size=100, score_union=0.8)
             for i in range(6)]
    # neuron 2: inhibitory, 5 synapses onto 1
    rows += [dict(pre_neuron=2, post_neuron=1, ei_prob=0.15, size=50, score_union=0.7) for _ in range(5)]
    # neuron 3: mixed evidence
    rows += [dict(pre_neuron=3, post_neuron=1, ei_prob=p, size=10, score_union=0.6)
             for p in (0.9, 0.1, 0.8, 0.2, 0.85)]
    # neuron 4: only one synapse (weak); an autapse and a background partner to drop
    rows += [dict(pre_neuron=4, post_neuron=1, ei_prob=0.95, size=10, score_union=0.9),
             dict(pre_neuron=1, post_neuron=1, ei_prob=0.9, size=10, score_union=0.9),
             dict(pre_neuron=0, post_neuron=2, ei_prob=0.9, size=10, score_union=0.9)]
    return pd.DataFrame(rows)


def test_dale_signs_and_flags():
    s = neuron_signs_from_synapses(_synapses(), SignConfig()).set_index("neuron")
    assert s.loc[1, "sign"] == 1 and not s.loc[1, "weak"] and not s.loc[1, "mixed"]
    assert s.loc[2, "sign"] == -1 and s.loc[2, "confidence"] > 0.95
    assert s.loc[3, "mixed"]
    assert s.loc[4, "weak"]  # one synapse
    assert 0 not in s.index


def test_edges_and_adjacency():
    syn = _synapses()
    signs = neuron_signs_from_synapses(syn)
    e = build_edges(syn, signs).set_index(["pre", "post"])
    assert (1, 1) not in e.index and (0, 2) not in e.index  # autapse and background dropped
    assert e.loc[(1, 2), "n_synapses"] == 3 and e.loc[(1, 2), "total_size"] == 300
    assert e.loc[(2, 1), "weight"] == -5 and e.loc[(1, 3), "weight"] == 3
    nodes = node_table(e.reset_index(), signs)
    A = signed_adjacency(e.reset_index(), nodes)
    idx = {n: i for i, n in enumerate(nodes["neuron"])}
    assert A[idx[2], idx[1]] == -5 and A.sum() == pytest.approx(e["weight"].sum())
    weak_zero = build_edges(syn, signs, SignConfig(drop_weak_neurons=True)).set_index(["pre", "post"])
    assert weak_zero.loc[(3, 1), "sign"] == 0 and weak_zero.loc[(4, 1), "sign"] == 0


def test_table_signs_and_combination():
    table = pd.DataFrame({"bodyId": [1, 2, 5], "nt": ["acetylcholine", "gaba", "glutamate"]})
    t = signs_from_table(table, "bodyId", "nt", {"acetylcholine": 1, "gaba": -1, "glutamate": -1})
    assert list(t["sign"]) == [1, -1, -1]
    with pytest.raises(PostprocessError, match=r"\['gaba'\] are not in the class"):
        signs_from_table(table, "bodyId", "nt", {"acetylcholine": 1, "glutamate": -1})
    img = neuron_signs_from_synapses(_synapses())
    img.loc[img["neuron"] == 2, "sign"] = 1  # image evidence disagrees with the table for 2
    c = combine_signs([t, img]).set_index("neuron")
    assert c.loc[2, "sign"] == -1 and c.loc[2, "disagree"]
    assert c.loc[1, "sign"] == 1 and not c.loc[1, "disagree"]
    assert c.loc[3, "source"] == "synapses"


def test_exports_round_trip(tmp_path):
    import networkx as nx
    from scipy import sparse

    from cleftwise.postprocess.export import export_graph

    syn = _synapses()
    syn["id"] = range(1, len(syn) + 1)
    for side, dz in (("pre", 0.0), ("post", 40.0)):
        for a in "zyx":
            syn[f"{side}_{a}"] = 100.0 + dz
    out = export_graph(syn, str(tmp_path / "g"), ["csv", "parquet", "graphml", "npz", "neuroglancer"])
    edges = pd.read_parquet(out["parquet"])
    assert edges.equals(pd.read_csv(out["csv"]).astype(edges.dtypes.to_dict()))
    g = nx.read_graphml(out["graphml"])
    assert g.number_of_edges() == len(edges)
    for r in edges.itertuples():
        assert g.edges[str(r.pre), str(r.post)]["weight"] == r.weight
    A = sparse.load_npz(out["npz"])
    neurons = list(np.load(tmp_path / "g" / "neurons.npy"))
    for r in edges.itertuples():
        assert A[neurons.index(r.pre), neurons.index(r.post)] == r.signed_weight
    assert os.path.exists(tmp_path / "g" / "annotations" / "info")


def test_export_cli_from_sqlite(tmp_path):
    import subprocess
    import sys

    from cleftwise.storage.db import open_store

    syn = _synapses()
    syn["id"] = range(1, len(syn) + 1)
    for a in "zyx":
        syn[a] = 100.0
    url = f"sqlite:///{tmp_path}/s.db"
    with open_store(url) as store:
        store.upsert_many(syn)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(repo, "launch/export_graph.py"), "--db", url,
                        "--out", str(tmp_path / "g"), "--format", "parquet,graphml"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    edges = pd.read_parquet(tmp_path / "g" / "edges.parquet").set_index(["pre", "post"])
    assert edges.loc[(2, 1), "signed_weight"] == -5 and edges.loc[(2, 1), "weight"] == 5
    bad = subprocess.run([sys.executable, os.path.join(repo, "launch/export_graph.py"), "--db", url,
                          "--out", str(tmp_path / "h"), "--format", "xls"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown format" in bad.stderr
