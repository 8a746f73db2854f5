"""Neuroglancer precomputed annotations: written, decoded back exactly."""

import json
import os

import numpy as np
import pandas as pd
import pytest

from cleftwise.storage.errors import StorageError
from cleftwise.storage.ng_annotations import read_annotation_chunk, write_synapse_annotations


def test_lines_round_trip(tmp_path):
    df = pd.DataFrame({"id": [5, 9], "pre_z": [100.0, 300.0], "pre_y": [40.0, 80.0], "pre_x": [8.0, 12.0],
                       "post_z": [140.0, 340.0], "post_y": [48.0, 88.0], "post_x": [8.0, 16.0],
                       "size": [120, 300], "score_union": [0.8, 0.6], "ei_prob": [0.9, np.nan],
                       "pre_neuron": [7, 2**40 + 3], "post_neuron": [9, 4]})
    path = write_synapse_annotations(df, str(tmp_path / "ann"))
    arr, ids, info = read_annotation_chunk(path)
    assert info["annotation_type"] == "LINE" and list(ids) == [5, 9]
    np.testing.assert_allclose(arr["g"][0], [100, 40, 8, 140, 48, 8])
    assert list(arr["size"]) == [120, 300] and arr["pre_neuron_lo"][1] == 3
    assert np.isnan(arr["ei_prob"][1])
    assert os.path.getsize(tmp_path / "ann/by_id/9") == arr.dtype.itemsize
    assert info["upper_bound"][0] == 341.0
    with pytest.raises(StorageError, match="lacks columns"):
        write_synapse_annotations(df.drop(columns=["post_x"]), str(tmp_path / "bad"))
