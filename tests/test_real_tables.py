"""Real tables beside the project (../shared/data/tables): MANC import + signs, MICrONS classifier.

Skipped when the data folder is missing.
"""

import os
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLES = os.path.join(REPO, "..", "shared", "data", "tables")
MANC = os.path.join(TABLES, "manc-nt")
MICRONS = os.path.join(TABLES, "microns-pinky100")

pytestmark = pytest.mark.skipif(not (os.path.isdir(MANC) and os.path.isdir(MICRONS)),
                                reason=f"real tables not found at {TABLES} (see ../shared/data/README.md)")
warnings.filterwarnings("ignore", category=FutureWarning)

MANC_FILES = ["synapses_acetylcholine.csv", "synapses_gaba.csv", "synapses_glutamate.csv"]


def test_manc_import_cli_counts_determinism_idempotence(tmp_path):
    from cleftwise.storage.db import open_store
    from cleftwise.storage.importers.tables import TableImportConfig, map_table, read_table

    url = f"sqlite:///{tmp_path}/manc.db"
    paths = [os.path.join(MANC, f) for f in MANC_FILES]
    cmd = [sys.executable, os.path.join(REPO, "launch", "import_synapses.py"), "--preset", "manc", "--db", url]
    for p in paths:
        cmd += ["--table", p]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with open_store(url) as db:
        assert db.count() == 3000
        first = db.query(columns=["id", "pre_neuron", "z", "ei_label", "source"])
        for f in MANC_FILES:
            nt = f[len("synapses_"):-4]
            assert (first["ei_label"] == nt).sum() == 1000 and (first["source"] == f[:-4]).sum() == 1000
    r = subprocess.run(cmd, capture_output=True, text=True)  # again: replaced, not added
    assert r.returncode == 0, r.stderr
    with open_store(url) as db:
        again = db.query(columns=["id", "pre_neuron", "z", "ei_label", "source"])
        tables = pd.concat([pd.read_csv(p) for p in paths])
        assert db.count() == 3000
        assert len(db.neurons()) == len(np.union1d(tables["bodyId_pre"], tables["bodyId_post"]))
    pd.testing.assert_frame_equal(first, again)
    # ids are a function of the row content: mapping the file again gives the same ids
    t = read_table(paths[1])
    a = map_table(t, TableImportConfig(preset="manc"))
    b = map_table(t.sample(frac=1.0, random_state=0), TableImportConfig(preset="manc"))
    assert set(a["id"]) == set(b["id"]) and set(a["id"]) <= set(first["id"])
    row = t.iloc[0]
    rec = a.set_index("id").loc[a["id"].iloc[0]]
    assert rec["pre_x"] == 8.0 * row["x_pre"] and rec["post_z"] == 8.0 * row["z_post"]


def test_manc_signed_graph_fish_vs_predicted(tmp_path):
    from cleftwise.train.evaluate_tables import manc_report

    rep = manc_report(TABLES, export_dir=str(tmp_path / "export"))
    assert rep["records_after_first_import"] == rep["records_after_second_import"] == 3000
    assert rep["ids_identical_after_reimport"] and rep["pre_neurons"] == 60
    ag = rep["agreement"]
    # every imported edge starts at one of 60 FISH-typed neurons whose predicted sign matches
    assert ag["edges"]["argmax_class"]["signed_both"] == rep["edges"]
    assert ag["edges"]["argmax_class"]["fraction_same"] == 1.0
    assert ag["all_neurons"]["argmax_class"]["fraction_same"] > 0.999
    assert 0.98 < ag["all_neurons"]["sum_of_probabilities"]["fraction_same"] < \
        ag["all_neurons"]["argmax_class"]["fraction_same"]
    cm = np.array(rep["confusion_all"]["matrix"])
    assert cm.sum() == 11071 and np.trace(cm) / cm.sum() > 0.998
    assert cm[0].sum() == 5219 and cm[1].sum() == 4395 and cm[2].sum() == 1457
    # disagreements = sign flips only: ACh ↔ GABA/glutamate (GABA ↔ glutamate keeps the sign, an
    # 'unknown' argmax is unsigned and weak)
    flips = cm[0, 1] + cm[0, 2] + cm[1, 0] + cm[2, 0]
    assert rep["combined_fish_then_predicted"]["argmax_class"]["disagree"] == flips
    assert rep["synapse_label_matches_fish_of_pre"] == 1.0
    edges = pd.read_csv(tmp_path / "export" / "edges.csv")
    fish = pd.read_csv(os.path.join(MANC, "neurons_nt.csv")).set_index("bodyId")["nt_class"]
    expect = np.where(fish.reindex(edges["pre"]).to_numpy() == "acetylcholine", 1, -1)
    assert (np.sign(edges["signed_weight"].to_numpy()) == expect).all() and (edges["weight"] > 0).all()


def test_microns_classifier_beats_majority_baseline():
    from cleftwise.postprocess.neuron_classifier import NeuronClassifierConfig
    from cleftwise.train.evaluate_tables import microns_report

    rep = microns_report(TABLES, NeuronClassifierConfig(n_repeats=1), with_leak_check=False)
    assert (rep["typed"], rep["excitatory"], rep["inhibitory"], rep["excluded_unknown_type"]) == (85, 65, 20, 13)
    m, base = rep["main"]["metrics"], rep["baseline_majority"]
    assert base["accuracy"] == pytest.approx(65 / 85) and base["balanced_accuracy"] == 0.5
    # stated margins: ≥ 0.15 accuracy and ≥ 0.35 balanced accuracy above always-E
    assert m["accuracy"]["mean"] >= base["accuracy"] + 0.15
    assert m["balanced_accuracy"]["mean"] >= base["balanced_accuracy"] + 0.35
    assert m["roc_auc"]["mean"] >= 0.95
    assert "path_len" not in rep["main"]["features"] and "soma_qc" not in rep["main"]["features"]
    names = [r["name"] for r in rep["ablation"]]
    assert names == ["size", "density", "morphology", "all"]
    for r in rep["ablation"]:
        assert r["metrics"]["roc_auc"]["mean"] > 0.85  # every group carries sign information
    au = rep["audit"]
    assert au["path_len"]["e_at_10000"] == 65 and au["path_len"]["i_max"] < 10000
    assert au["soma_csv"]["i_listed"] == 0 and au["synapses_csv"]["i_present"] == 0
