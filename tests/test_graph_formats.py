"""Graph exports for networkx / pandas / scipy: positive weight, separate sign (missing when
unknown, never 0), signed_weight; the docs/networkx.md example runs on an exported graph."""

import os
import re

import networkx as nx
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from cleftwise.postprocess.connectome import SignConfig
from cleftwise.postprocess.errors import PostprocessError
from cleftwise.postprocess.export import export_graph

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIG = 2**40 + 1  # a neuron id above 2^32


def _synapses() -> pd.DataFrame:
    """1 → 2 (E, 3 synapses), 2 → 3 (I, 2), BIG → 1 (E, 1), 3 → 1 (no E/I data: unknown sign),
    1 → BIG (E, 2), plus an autapse."""
    rows = []
    rows += [dict(pre_neuron=1, post_neuron=2, ei_prob=0.95, score_union=0.5) for _ in range(3)]
    rows += [dict(pre_neuron=2, post_neuron=3, ei_prob=0.05, score_union=0.25) for _ in range(2)]
    rows += [dict(pre_neuron=BIG, post_neuron=1, ei_prob=0.9, score_union=0.75)]
    rows += [dict(pre_neuron=3, post_neuron=1, ei_prob=np.nan, score_union=0.5) for _ in range(4)]
    rows += [dict(pre_neuron=1, post_neuron=BIG, ei_prob=0.9, score_union=1.0) for _ in range(2)]
    rows += [dict(pre_neuron=2, post_neuron=2, ei_prob=0.05, score_union=0.9)]
    df = pd.DataFrame(rows)
    df["id"] = np.arange(1, len(df) + 1)
    df["size"] = 10
    for a in "zyx":
        df[a] = 100.0
    return df


@pytest.fixture
def exported(tmp_path):
    out = tmp_path / "g"
    export_graph(_synapses(), str(out), ["csv", "parquet", "graphml", "npz"])
    return out


def test_weight_sign_and_signed_weight_in_every_format(exported):
    pq = pd.read_parquet(exported / "edges.parquet").set_index(["pre", "post"])
    csv = pd.read_csv(exported / "edges.csv").set_index(["pre", "post"])
    for e in (pq, csv):
        assert (e["weight"] > 0).all() and (e["weight"] == e["n_synapses"]).all()
        assert e.loc[(2, 3), "sign"] == -1 and e.loc[(2, 3), "signed_weight"] == -2
        assert e.loc[(1, BIG), "sign"] == 1 and e.loc[(1, BIG), "signed_weight"] == 2
        assert pd.isna(e.loc[(3, 1), "sign"]) and pd.isna(e.loc[(3, 1), "signed_weight"])
        assert e.loc[(3, 1), "weight"] == 4 and not (e["sign"] == 0).any()
        assert (2, 2) not in e.index  # autapse dropped
    assert np.isnan(csv.loc[(3, 1), "sign"])  # NaN in CSV, null in Parquet
    assert str(pq["sign"].dtype) == "Int8" and pq["sign"].isna().sum() == 1
    nodes = pd.read_csv(exported / "nodes.csv").set_index("neuron")
    assert np.isnan(nodes.loc[3, "sign"]) and nodes.loc[2, "sign"] == -1 and BIG in nodes.index

    g = nx.read_graphml(exported / "graph.graphml")
    assert g.edges["3", "1"].get("sign") is None and "signed_weight" not in g.edges["3", "1"]
    assert g.edges["3", "1"]["weight"] == 4
    assert g.edges["2", "3"]["sign"] == -1 and g.edges["2", "3"]["weight"] == 2
    assert g.edges["2", "3"]["signed_weight"] == -2
    assert str(BIG) in g and "sign" not in g.nodes["3"]
    assert all(w > 0 for _, _, w in g.edges(data="weight"))
    # shortest paths and flows accept the weights (Dijkstra raises on negative weights)
    nx.dijkstra_path(g, "2", str(BIG), weight="weight")

    A = sparse.load_npz(exported / "adjacency.npz")
    W = sparse.load_npz(exported / "weights.npz")
    ids = list(np.load(exported / "neurons.npy"))
    i = {n: ids.index(n) for n in (1, 2, 3, BIG)}
    assert A.nnz == len(pq) - 1 and W.nnz == len(pq)  # the unknown-sign edge only in W
    assert A[i[2], i[3]] == -2 and A[i[1], i[BIG]] == 2 and (3, 1) not in set(zip(*[
        [ids[k] for k in A.nonzero()[0]], [ids[k] for k in A.nonzero()[1]]]))
    assert W[i[3], i[1]] == 4 and W.min() >= 0


def test_weight_by_score(tmp_path):
    out = tmp_path / "s"
    export_graph(_synapses(), str(out), ["parquet", "graphml"], cfg=SignConfig(edge_weight="score"))
    e = pd.read_parquet(out / "edges.parquet").set_index(["pre", "post"])
    assert e.loc[(1, 2), "weight"] == pytest.approx(1.5) and e.loc[(2, 3), "signed_weight"] == pytest.approx(-0.5)
    assert pd.isna(e.loc[(3, 1), "signed_weight"]) and e.loc[(3, 1), "weight"] == pytest.approx(2.0)
    assert nx.read_graphml(out / "graph.graphml").edges["1", "2"]["weight"] == pytest.approx(1.5)
    with pytest.raises(PostprocessError, match="edge_weight must be one of count, score"):
        SignConfig(edge_weight="size")


def _doc_code() -> str:
    text = open(os.path.join(REPO, "docs", "networkx.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 1, "docs/networkx.md has one python example"
    return blocks[0]


def test_networkx_doc_example_runs(exported, monkeypatch, capsys):
    monkeypatch.chdir(exported)
    ns: dict = {}
    exec(compile(_doc_code(), "docs/networkx.md", "exec"), ns)
    assert ns["hub"] == "1" and ns["E"].number_of_edges() == 3 and ns["I"].number_of_edges() == 1
    assert ns["unknown"] == [("3", "1")]
    assert ns["path"][0] == "1" and ns["flow"] > 0
    assert ns["net_input"]["3"] == -2 and ns["net_input"]["1"] == 1  # 3 → 1 unknown: left out
    assert "excitatory" in capsys.readouterr().out
