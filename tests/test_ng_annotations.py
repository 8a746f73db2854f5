"""Neuroglancer precomputed annotations: written, decoded back exactly (our own decoder; the
neuroglancer package reads them in tests/test_neuroglancer.py)."""

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
                       "pre_neuron": [7, 2**40 + 3], "post_neuron": [9, 4], "flags": ["", "autapse,pre_tie"]})
    path = write_synapse_annotations(df, str(tmp_path / "ann"))
    arr, ids, info = read_annotation_chunk(path)
    assert info["annotation_type"] == "LINE" and sorted(ids) == [5, 9]
    arr = arr[np.argsort(ids)]
    np.testing.assert_allclose(arr["geometry"][0], [100, 40, 8, 140, 48, 8])
    assert list(arr["size"]) == [120, 300] and arr["size"].dtype == np.dtype("<u4")
    assert np.isnan(arr["ei_prob"][1]) and list(arr["ei_sign"]) == [1, 0] and arr["ei_sign"].dtype == np.int8
    assert list(arr["flag_bits"]) == [0, 1 | 8] and arr["flag_bits"].dtype == np.dtype("<u2")
    assert "pre_neuron_lo" not in arr.dtype.names
    # properties listed as encoded: 4-byte, then 2-byte, then 1-byte types; 4-byte record stride
    types = [p["type"] for p in info["properties"]]
    assert types.index("uint16") > types.index("float32") and types.index("int8") > types.index("uint16")
    assert arr.dtype.itemsize % 4 == 0
    assert [r["id"] for r in info["relationships"]] == ["pre_neuron", "post_neuron"]
    # by id: the record, then per relationship a uint32 count and the uint64 segment ids
    blob = open(tmp_path / "ann/by_id/9", "rb").read()
    n = arr.dtype.itemsize
    assert blob[:n] == arr[1].tobytes()
    assert np.frombuffer(blob[n:n + 4], "<u4")[0] == 1 and np.frombuffer(blob[n + 4:n + 12], "<u8")[0] == 2**40 + 3
    rel, rel_ids, _ = read_annotation_chunk(path, f"rel_pre_neuron/{2**40 + 3}")
    assert list(rel_ids) == [9]
    assert info["upper_bound"][0] == 341.0 and json.load(open(tmp_path / "ann/info")) == info
    # a side without a site falls back to the centroid; rows without any geometry are skipped
    df2 = df.assign(z=[1.0, 2.0], y=[3.0, 4.0], x=[5.0, 6.0])
    df2.loc[0, "pre_z"] = np.nan
    arr2, ids2, _ = read_annotation_chunk(write_synapse_annotations(df2, str(tmp_path / "fill")))
    np.testing.assert_allclose(arr2["geometry"][list(ids2).index(5)][:3], [1, 3, 5])
    with pytest.raises(StorageError, match="lacks columns"):
        write_synapse_annotations(df.drop(columns=["post_x"]), str(tmp_path / "bad"))
    with pytest.raises(StorageError, match="type 'float64'"):
        write_synapse_annotations(df, str(tmp_path / "bad"), properties=[("size", "float64")])
    with pytest.raises(StorageError, match="not unique"):
        write_synapse_annotations(df.assign(id=[5, 5]), str(tmp_path / "bad"))
    assert not os.path.exists(tmp_path / "bad")
    empty = write_synapse_annotations(df2.iloc[:0], str(tmp_path / "empty"), kind="point")
    assert json.load(open(os.path.join(empty, "info")))["annotation_type"] == "POINT"
    assert os.listdir(tmp_path / "empty/spatial0") == [] and os.listdir(tmp_path / "empty/by_id") == []
