"""External synapse tables → synapse records: presets, units, deterministic ids, errors, CLI."""

import logging
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from cleftwise.storage.errors import StorageError
from cleftwise.storage.db import open_store
from cleftwise.storage.importers.tables import (TableImportConfig, import_tables, map_table, parse_mapping, read_table,
                                  synapse_ids)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _manc_rows():
    """Three synapses in the MANC export layout (voxels of 8 nm, x/y/z columns)."""
    return pd.DataFrame({
        "neurotransmitter": ["gaba", "gaba", "acetylcholine"],
        "neuron_class": ["neuron1"] * 3,
        "bodyId_pre": [11, 11, 12], "bodyId_post": [21, 22, 11],
        "bbox_xmin": [90, 190, 290], "bbox_xmax": [110, 210, 310],
        "bbox_ymin": [40, 140, 240], "bbox_ymax": [60, 160, 260],
        "bbox_zmin": [10, 110, 210], "bbox_zmax": [30, 130, 230],
        "x_pre": [100, 200, 300], "y_pre": [50, 150, 250], "z_pre": [20, 120, 220],
        "x_post": [104, 204, 304], "y_post": [52, 152, 252], "z_post": [20, 120, 224],
        "any_out_of_range": [False, True, False],
    })


def _cave_rows(as_strings: bool):
    pre = [[1000, 2000, 30], [1100, 2100, 31]]
    post = [[1010, 2004, 30], [1104, 2110, 32]]
    fmt = (lambda v: f"[{v[0]} {v[1]}  {v[2]}]") if as_strings else (lambda v: v)
    return pd.DataFrame({"id": [7, 8], "pre_pt_root_id": [864691135000000001, 864691135000000002],
                         "post_pt_root_id": [864691135000000003, 864691135000000001],
                         "pre_pt_position": [fmt(v) for v in pre], "post_pt_position": [fmt(v) for v in post],
                         "size": [412, 95]})


def test_manc_preset_units_centroid_bbox_flags(tmp_path):
    path = tmp_path / "synapses_small.csv"
    _manc_rows().to_csv(path, index=False)
    rec = map_table(read_table(str(path)), TableImportConfig(preset="manc"), where=str(path), source="small")
    assert len(rec) == 3 and rec["id"].is_unique and (rec["id"] >= 0).all()
    r0 = rec.iloc[np.flatnonzero(rec["pre_neuron"].to_numpy() == 11)[0]]
    # voxels (x, y, z) → nm (z, y, x) with 8 nm voxels; centroid = midpoint of the sites
    assert (r0["pre_z"], r0["pre_y"], r0["pre_x"]) == (160.0, 400.0, 800.0)
    assert (r0["post_z"], r0["post_y"], r0["post_x"]) == (160.0, 416.0, 832.0)
    assert (r0["z"], r0["y"], r0["x"]) == (160.0, 408.0, 816.0)
    assert (r0["bbox_z0"], r0["bbox_x1"]) == (80.0, 880.0)
    assert r0["ei_label"] == "gaba" and r0["source"] == "small"
    flags = dict(zip(rec["post_neuron"], rec["flags"]))
    assert flags[22] == "out_of_range" and flags[21] == ""
    # same rows in nm give the same ids (ids hash nm positions, not the file's units)
    nm = _manc_rows()
    for c in ("x_pre", "y_pre", "z_pre", "x_post", "y_post", "z_post", "bbox_xmin", "bbox_xmax",
              "bbox_ymin", "bbox_ymax", "bbox_zmin", "bbox_zmax"):
        nm[c] = nm[c] * 8.0
    rec_nm = map_table(nm, TableImportConfig(preset="manc", units="nm"))
    assert sorted(rec_nm["id"]) == sorted(rec["id"])


@pytest.mark.parametrize("as_strings", [True, False])
def test_cave_preset_packed_positions(tmp_path, as_strings):
    df = _cave_rows(as_strings)
    if as_strings:
        path = tmp_path / "cave.csv"
        df.to_csv(path, index=False)
    else:
        path = tmp_path / "cave.parquet"
        df.to_parquet(path, index=False)
    rec = map_table(read_table(str(path)), TableImportConfig(preset="cave"))
    r = rec.set_index("size").loc[412]
    # CAVE positions are (x, y, z) voxels of (4, 4, 40) nm
    assert (r["pre_z"], r["pre_y"], r["pre_x"]) == (1200.0, 8000.0, 4000.0)
    assert (r["post_x"], r["x"]) == (4040.0, 4020.0)
    assert r["pre_neuron"] == 864691135000000001
    # default bbox spans both sites plus one voxel
    assert (r["bbox_x0"], r["bbox_x1"]) == (4000.0, 4044.0)
    # split columns (CAVEclient split_positions=True) are found for the same packed field
    split = df.drop(columns=["pre_pt_position", "post_pt_position"])
    for side, vals in (("pre", [[1000, 2000, 30], [1100, 2100, 31]]), ("post", [[1010, 2004, 30], [1104, 2110, 32]])):
        for k, a in enumerate("xyz"):
            split[f"{side}_pt_position_{a}"] = [v[k] for v in vals]
    rec2 = map_table(split, TableImportConfig(preset="cave"))
    assert sorted(rec2["id"]) == sorted(rec["id"])
    # mapping the table's own id column keeps those ids
    rec3 = map_table(df, TableImportConfig(preset="cave", columns={"id": "id"}))
    assert sorted(rec3["id"]) == [7, 8]


def test_ids_deterministic_and_content_sensitive():
    pre, post = np.array([1, 1, 2]), np.array([2, 3, 1])
    a = np.array([[0.0, 0.0, 0.0], [8.0, 8.0, 8.0], [-0.0, 16.0, 8.0]])
    b = a + 4.0
    ids = synapse_ids(pre, post, a, b)
    assert np.array_equal(ids, synapse_ids(pre, post, a.copy(), b.copy()))
    assert ids.dtype == np.int64 and (ids >= 0).all() and len(set(ids.tolist())) == 3
    assert synapse_ids(pre, post, a, b + [0, 0, 1e-3])[0] != ids[0]  # any position change → new id
    assert synapse_ids(post, pre, a, b)[0] != ids[0]                  # direction matters
    assert synapse_ids(pre, post, b, a)[0] != ids[0]
    big = np.array([2 ** 64 - 1], dtype=np.uint64)                    # uint64 ids hash fine
    assert synapse_ids(big, big, a[:1], b[:1])[0] >= 0


def test_errors_name_the_fault(caplog):
    rows = _manc_rows()
    with pytest.raises(StorageError, match=r"missing columns 'bodyId_post' \(for post_neuron\)"):
        map_table(rows.drop(columns=["bodyId_post"]), TableImportConfig(preset="manc"), where="t.csv")
    bad = rows.astype({"x_pre": object})
    bad.loc[1, "x_pre"] = "12a"
    with pytest.raises(StorageError, match=r"column 'x_pre' must be numeric; row 1"):
        map_table(bad, TableImportConfig(preset="manc"))
    miss = rows.astype({"bodyId_pre": float})
    miss.loc[2, "bodyId_pre"] = np.nan
    with pytest.raises(StorageError, match=r"'bodyId_pre' \(pre neuron id\) is missing in row 2"):
        map_table(miss, TableImportConfig(preset="manc"))
    dup = pd.concat([rows, rows.iloc[[1]]], ignore_index=True)
    with pytest.raises(StorageError, match=r"1 duplicate row\(s\).*rows 1 and 3"):
        map_table(dup, TableImportConfig(preset="manc"), where="dup.csv")
    with caplog.at_level(logging.WARNING):
        kept = map_table(dup, TableImportConfig(preset="manc", on_duplicate="drop"), where="dup.csv")
    assert len(kept) == 3 and "dropped 1 duplicate" in caplog.text
    with pytest.raises(StorageError, match="unknown table preset 'neuprint'"):
        map_table(rows, TableImportConfig(preset="neuprint"))
    with pytest.raises(StorageError, match=r"unknown fields \['pre_id'\]"):
        map_table(rows, TableImportConfig(columns={"pre_id": "bodyId_pre"}))
    cave = _cave_rows(True)
    cave.loc[1, "post_pt_position"] = "[1 2]"
    with pytest.raises(StorageError, match=r"'post_pt_position' row 1: expected 3 numbers"):
        map_table(cave, TableImportConfig(preset="cave"))
    with pytest.raises(StorageError, match="no position"):
        map_table(pd.DataFrame({"a": [1], "b": [2]}),
                  TableImportConfig(columns={"pre_neuron": "a", "post_neuron": "b"}))
    with pytest.raises(StorageError, match="not field=column"):
        parse_mapping(["pre_neuron"])


def test_custom_mapping_centroid_only_nm():
    t = pd.DataFrame({"a": [5, 6], "b": [6, 5], "cz": [40.0, 80.0], "cy": [4.0, 8.0], "cx": [4.0, 8.0],
                      "p": [0.9, 0.2]})
    cfg = TableImportConfig(columns={"pre_neuron": "a", "post_neuron": "b", "z": "cz", "y": "cy", "x": "cx",
                                     "ei_prob": "p"}, units="nm", voxel_size=(40, 4, 4))
    rec = map_table(t, cfg)
    assert list(rec["z"]) == [40.0, 80.0] and list(rec["ei_prob"]) == [0.9, 0.2]
    assert rec["pre_z"].isna().all() and list(rec["bbox_z1"]) == [80.0, 120.0]


def test_import_idempotent_and_atomic(tmp_path):
    good = tmp_path / "a.csv"
    _manc_rows().to_csv(good, index=False)
    url = f"sqlite:///{tmp_path}/s.db"
    cfg = TableImportConfig(preset="manc")
    assert import_tables([str(good)], url, cfg) == {str(good): 3}
    with open_store(url) as db:
        first = db.query()
    import_tables([str(good)], url, cfg)
    with open_store(url) as db:
        again = db.query()
        assert db.count() == 3 and db.count(pre=11) == 2
    pd.testing.assert_frame_equal(first, again)
    bad = tmp_path / "b.csv"
    _manc_rows().drop(columns=["x_post"]).to_csv(bad, index=False)
    other = tmp_path / "c.csv"
    r = _manc_rows()
    r["bodyId_pre"] += 100
    r.to_csv(other, index=False)
    with pytest.raises(StorageError, match="b.csv: missing columns 'x_post'"):
        import_tables([str(other), str(bad)], url, cfg)
    with open_store(url) as db:
        assert db.count() == 3  # nothing of c.csv was written


def test_cli_import_then_export_signed(tmp_path):
    tab = tmp_path / "syn.csv"
    _manc_rows().to_csv(tab, index=False)
    mine = tmp_path / "mine.csv"
    pd.DataFrame({"pre": [11, 30], "post": [40, 11], "pz": [0.0, 40.0], "py": [0.0, 4.0], "px": [0, 4],
                  "qz": [0.0, 40.0], "qy": [8.0, 8.0], "qx": [8, 8]}).to_csv(mine, index=False)
    url = f"sqlite:///{tmp_path}/cli.db"
    script = os.path.join(REPO, "launch", "import_synapses.py")
    r = subprocess.run([sys.executable, script, "--preset", "manc", "--table", str(tab), "--db", url],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert '"records"' in r.stdout and ": 3" in r.stdout
    maps = [f"--map={f}={c}" for f, c in (("pre_neuron", "pre"), ("post_neuron", "post"), ("pre_z", "pz"),
                                           ("pre_y", "py"), ("pre_x", "px"), ("post_z", "qz"), ("post_y", "qy"),
                                           ("post_x", "qx"))]
    r = subprocess.run([sys.executable, script, "--table", str(mine), "--units", "nm", "--db", url, *maps],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    bad = subprocess.run([sys.executable, script, "--table", str(mine), "--db", url, "--map", "pre_neuron=nope",
                          "--map", "post_neuron=post"], capture_output=True, text=True)
    assert bad.returncode == 1 and "missing columns 'nope'" in bad.stderr
    with open_store(url) as db:
        assert db.count() == 5
    cave = tmp_path / "cave.parquet"
    _cave_rows(False).to_parquet(cave, index=False)
    r = subprocess.run([sys.executable, script, "--preset", "cave", "--voxel-size", "40", "4", "4", "--table",
                        str(cave), "--db", f"sqlite:///{tmp_path}/cave.db"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with open_store(f"sqlite:///{tmp_path}/cave.db") as db:
        assert db.count() == 2 and db.count(pre=864691135000000002) == 1
    signs = tmp_path / "types.csv"
    pd.DataFrame({"bodyId": [11, 12, 30], "nt": ["GABA", "acetylcholine", "serotonin"]}).to_csv(signs, index=False)
    exp = subprocess.run([sys.executable, os.path.join(REPO, "launch", "export_graph.py"), "--db", url,
                          "--out", str(tmp_path / "g"), "--format", "csv", "--sign-table", str(signs),
                          "--sign-neuron-col", "bodyId", "--sign-class-col", "nt", "--sign-map", "fly"],
                         capture_output=True, text=True)
    assert exp.returncode == 0, exp.stderr
    edges = pd.read_csv(tmp_path / "g" / "edges.csv").set_index(["pre", "post"])
    assert edges.loc[(11, 21), "signed_weight"] == -1 and edges.loc[(12, 11), "signed_weight"] == 1
    # serotonin: modulatory, unsigned: a positive weight, no sign (not 0)
    assert edges.loc[(30, 11), "weight"] == 1 and pd.isna(edges.loc[(30, 11), "sign"])
    nodes = pd.read_csv(tmp_path / "g" / "nodes.csv").set_index("neuron")
    assert nodes.loc[11, "class"] == "GABA" and nodes.loc[11, "source"] == "types.csv"
