"""train/tune_segment.py: validation counts are summed over volumes before F1 is computed."""

import pandas as pd
import pytest

from cleftwise.train.tune_segment import aggregate, best_setting


def test_aggregate_sums_counts_over_volumes_per_setting():
    rows = pd.DataFrame([
        {"threshold": 0.4, "min_size": 1000, "max_neuron_fraction": None, "n_pred": 10, "tp": 8, "fp": 2, "fn": 1,
         "prepost_accuracy": 1.0},
        {"threshold": 0.4, "min_size": 1000, "max_neuron_fraction": None, "n_pred": 5, "tp": 4, "fp": 1, "fn": 3,
         "prepost_accuracy": 0.5},
        {"threshold": 0.4, "min_size": 1000, "max_neuron_fraction": 0.9, "n_pred": 4, "tp": 4, "fp": 0, "fn": 3,
         "prepost_accuracy": 0.5},
    ])
    out = aggregate(rows)
    assert len(out) == 2
    none = out[out["max_neuron_fraction"].isna()].iloc[0]
    assert (none["tp"], none["fp"], none["fn"], none["n_pred"]) == (12, 3, 4, 15)
    assert none["f1"] == pytest.approx(24 / 31)
    assert none["prepost_accuracy"] == pytest.approx(10 / 12)
    filt = out[out["max_neuron_fraction"] == 0.9].iloc[0]
    assert filt["precision"] == 1.0 and filt["recall"] == pytest.approx(4 / 7)
    best = best_setting(out)
    assert best == {"threshold": 0.4, "min_size": 1000, "max_neuron_fraction": None, "f1": pytest.approx(24 / 31)}
