"""Neuron-level E/I: per-neuron features, grouped CV classifier, sign maps and source combination."""

import warnings

import numpy as np
import pandas as pd
import pytest

from cleftwise.postprocess.connectome import (SIGN_PRESETS, combine_signs, resolve_sign_map, signs_from_class_probs,
                                    signs_from_table)
from cleftwise.postprocess.errors import PostprocessError
from cleftwise.postprocess.neuron_classifier import (NeuronClassifier, NeuronClassifierConfig, binary_metrics,
                                           cross_validate, labels_from_signs, neuron_folds)
from cleftwise.postprocess.neuron_features import FeatureTable, features_from_synapses, features_from_table, join_features

warnings.filterwarnings("ignore", category=FutureWarning)


def _synthetic(n_e=30, n_i=12, rows_per_neuron=3, seed=0):
    """Rows = (neuron, observation); I neurons have higher 'density', sizes are noise."""
    rng = np.random.default_rng(seed)
    neurons = np.arange(100, 100 + n_e + n_i)
    label = np.r_[np.ones(n_e, int), np.zeros(n_i, int)]
    rows = []
    for nid, y in zip(neurons, label):
        centre = rng.normal(0.25 if y else 0.5, 0.04)
        for _ in range(rows_per_neuron):
            rows.append({"neuron": nid, "y": y, "density": centre + rng.normal(0, 0.02),
                         "size": rng.normal(300, 50)})
    return pd.DataFrame(rows)


def test_folds_never_split_a_neuron():
    d = _synthetic()
    y, g = d["y"].to_numpy(), d["neuron"].to_numpy()
    folds = neuron_folds(y, g, 4, seed=3)
    seen = np.zeros(len(y), int)
    for tr, te in folds:
        assert not set(g[tr]) & set(g[te])
        assert 0 < y[te].mean() < 1  # stratified: both classes in every test fold
        seen[te] += 1
    assert (seen == 1).all()  # every row tested exactly once
    with pytest.raises(PostprocessError, match="class 0 has 12 neurons, fewer than the 20 folds"):
        neuron_folds(y, g, 20, seed=0)


def test_cross_validation_grouped_calibrated_and_better_than_baseline():
    d = _synthetic()
    y, g = d["y"].to_numpy(), d["neuron"].to_numpy()
    cfg = NeuronClassifierConfig(n_splits=4, n_repeats=2, calibration_folds=3, seed=1)
    res = cross_validate(d[["density", "size"]], y, g, cfg)
    for r, folds in enumerate(res.folds):
        for k, (tr, te) in enumerate(folds):
            assert not set(g[tr]) & set(g[te])
            for itr, ite in res.inner_folds[r][k]:  # calibration folds inside the training rows
                gt = g[tr]
                assert not set(gt[itr]) & set(gt[ite])
    assert res.p_excitatory.shape == (2, len(y))
    assert ((res.p_excitatory > 0) & (res.p_excitatory < 1)).all()
    assert res.metrics["balanced_accuracy"]["mean"] >= 0.9
    assert res.metrics["roc_auc"]["mean"] >= 0.95
    assert res.baseline["balanced_accuracy"]["mean"] == 0.5
    assert res.metrics["accuracy"]["mean"] > res.baseline["accuracy"]["mean"] + 0.15
    # noise alone stays near chance: the CV does not leak labels across folds
    noise = cross_validate(d[["size"]], y, g, cfg)
    assert noise.metrics["roc_auc"]["mean"] < 0.8


def test_balanced_rule_and_signs_compose():
    d = _synthetic(rows_per_neuron=1)
    X = d[["density"]].set_index(d["neuron"])
    model = NeuronClassifier(NeuronClassifierConfig(min_confidence=0.5)).fit(X, d["y"], d["neuron"])
    p = model.predict_proba(X)
    pi = model.prior_
    assert pi == pytest.approx(30 / 42)
    pb = model.decision_proba(p)
    # equal-prior re-weighting: odds divided by the prior odds
    assert np.allclose(pb / (1 - pb), (p / (1 - p)) / (pi / (1 - pi)))
    s = model.signs(X)
    assert list(s.columns[:3]) == ["neuron", "sign", "p_excitatory"]
    assert (s["sign"].to_numpy() == np.where(d["y"] == 1, 1, -1)).mean() > 0.9
    table = signs_from_table(pd.DataFrame({"n": [100, 141], "t": ["e", "e"]}), "n", "t", "microns")
    both = combine_signs([table, s]).set_index("neuron")
    # neuron 141 is inhibitory in the features (I block), the table says E: flagged, table wins
    assert both.loc[141, "sign"] == 1 and bool(both.loc[141, "disagree"])
    assert both.loc[141, "disagree_sources"] == "classifier"
    assert not both.loc[100, "disagree"] and both.loc[120, "source"] == "classifier"
    # a weak (low-confidence) source never raises a disagreement
    weak = combine_signs([table, s.assign(weak=True)]).set_index("neuron")
    assert not weak["disagree"].any() and weak.loc[120, "weak"]
    with pytest.raises(PostprocessError, match="features lack columns"):
        model.signs(pd.DataFrame({"size": [1.0]}, index=[5]))
    with pytest.raises(PostprocessError, match="labels must contain both"):
        NeuronClassifier().fit(X, np.ones(len(X)), d["neuron"])


def test_binary_metrics_by_hand():
    y = np.array([1, 1, 1, 0])
    p = np.array([0.9, 0.8, 0.4, 0.3])
    m = binary_metrics(y, p)
    assert m["accuracy"] == 0.75 and m["balanced_accuracy"] == pytest.approx((2 / 3 + 1) / 2)
    assert m["roc_auc"] == 1.0 and m["tnr_i"] == 1.0


def test_features_from_synapses_by_hand():
    syn = pd.DataFrame({
        "pre_neuron":  [1, 1, 1, 2, 2, 3, 0, 1],
        "post_neuron": [2, 2, 3, 1, 3, 1, 2, 1],   # last row: autapse (dropped)
        "size":        [10, 30, 20, 100, 200, 50, 999, 5],
        "ei_prob":     [0.9, 0.9, 0.9, 0.1, 0.1, np.nan, 0.5, 0.5],
    })
    ft = features_from_synapses(syn, lengths={1: 10.0, 2: 20.0, 3: 5.0})
    f = ft.frame
    assert list(f.index) == [1, 2, 3]
    assert f.loc[1, "log_out_synapses"] == pytest.approx(np.log1p(3))
    assert f.loc[2, "log_in_synapses"] == pytest.approx(np.log1p(3))  # incl. the background-pre synapse
    assert f.loc[2, "log_in_degree"] == pytest.approx(np.log1p(1))      # background is no partner
    assert f.loc[1, "out_size_p50"] == 20 and f.loc[3, "in_size_p50"] == 110
    assert f.loc[1, "out_per_partner"] == 1.5
    assert f.loc[1, "reciprocity"] == 1.0 and f.loc[3, "reciprocity"] == 1.0 and f.loc[2, "reciprocity"] == 0.5
    assert f.loc[1, "in_density"] == pytest.approx(2 / 10) and f.loc[3, "out_density"] == pytest.approx(1 / 5)
    assert f.loc[1, "mean_out_ei_logit"] == pytest.approx(np.log(9))
    assert np.isnan(f.loc[3, "mean_out_ei_logit"])
    assert set(ft.groups) == {"size_in", "size_out", "degree", "partners", "density", "image"}
    assert ft.select(["degree"]).matrix().shape == (3, 4)


def test_features_from_table_and_join_errors():
    t = pd.DataFrame({"id": [1, 2], "a": [0.1, 0.2], "b": ["3", "x"]})
    with pytest.raises(PostprocessError, match="column 'b' must be numeric"):
        features_from_table(t, "id", {"g": ["a", "b"]})
    with pytest.raises(PostprocessError, match=r"lacks columns \['c'\]"):
        features_from_table(t, "id", {"g": ["c"]})
    with pytest.raises(PostprocessError, match="repeat"):
        features_from_table(pd.DataFrame({"id": [1, 1], "a": [1, 2]}), "id", {"g": ["a"]})
    a = features_from_table(t, "id", {"g": ["a"]})
    b = FeatureTable(pd.DataFrame({"c": [5.0]}, index=pd.Index([2], name="neuron")), {"h": ["c"]})
    j = join_features(a, b)
    assert list(j.neurons) == [2] and j.columns() == ["a", "c"]
    with pytest.raises(PostprocessError, match="unknown feature groups"):
        j.columns(["size"])


def test_sign_maps_presets_and_errors():
    assert resolve_sign_map("fly")["acetylcholine"] == 1 and resolve_sign_map("fly")["glutamate"] == -1
    assert all(resolve_sign_map("microns")[k] == -1
               for k in ("basket", "bipolar", "chandelier", "martinotti", "neurogliaform"))
    assert resolve_sign_map("ACh=+1, GABA=-1") == {"ach": 1, "gaba": -1}
    with pytest.raises(PostprocessError, match="has sign '2'"):
        resolve_sign_map("a=2")
    with pytest.raises(PostprocessError, match="not a preset"):
        resolve_sign_map("mouse")
    assert set(SIGN_PRESETS) == {"fly", "microns"}
    t = pd.DataFrame({"n": [1, 2, 3, 4, 4], "c": ["E", "Basket", "unknown_type", None, None]})
    s = signs_from_table(t, "n", "c", "microns").set_index("neuron")
    assert list(s["sign"]) == [1, -1, 0, 0] and bool(s.loc[3, "weak"]) and s.loc[1, "class"] == "E"
    with pytest.raises(PostprocessError, match=r"classes \['pyramid'\] are not in"):
        signs_from_table(pd.DataFrame({"n": [1], "c": ["pyramid"]}), "n", "c", "microns")
    u = signs_from_table(pd.DataFrame({"n": [1], "c": ["pyramid"]}), "n", "c", "microns", unmapped="unknown")
    assert u["sign"].tolist() == [0]
    with pytest.raises(PostprocessError, match="appear with different signs"):
        signs_from_table(pd.DataFrame({"n": [1, 1], "c": ["e", "basket"]}), "n", "c", "microns")


def test_class_probability_rules_differ_where_they_should():
    t = pd.DataFrame({"id": [1, 2, 3, 4], "ach": [0.45, 0.9, 0.2, np.nan], "gaba": [0.30, 0.05, 0.1, np.nan],
                      "glu": [0.25, 0.05, 0.1, np.nan], "unk": [0.0, 0.0, 0.6, np.nan]})
    cols = {"ach": "acetylcholine", "gaba": "gaba", "glu": "glutamate", "unk": "unknown"}
    am = signs_from_class_probs(t, "id", cols, "fly").set_index("neuron")
    sm = signs_from_class_probs(t, "id", cols, "fly", rule="sum").set_index("neuron")
    assert am.loc[1, "sign"] == 1 and am.loc[1, "confidence"] == pytest.approx(0.45)
    assert sm.loc[1, "sign"] == -1 and sm.loc[1, "p_excitatory"] == pytest.approx(0.45)
    assert am.loc[2, "sign"] == sm.loc[2, "sign"] == 1
    assert am.loc[3, "sign"] == 0 and sm.loc[3, "sign"] == 1 and am.loc[3, "class"] == "unknown"
    assert am.loc[4, "sign"] == 0 and bool(am.loc[4, "weak"])
    c = combine_signs([am.reset_index(), sm.reset_index().assign(source="sum")]).set_index("neuron")
    assert bool(c.loc[1, "disagree"]) and c.loc[1, "sign"] == 1 and c.loc[1, "disagree_sources"] == "sum"
    assert c.loc[3, "sign"] == 1 and c.loc[3, "source"] == "sum"  # argmax unknown → next strong source
    assert labels_from_signs(am.reset_index()).to_dict() == {1: 1, 2: 1}
