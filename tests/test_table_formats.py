"""Synapse tables both ways: extra columns kept typed, CAVE / neuPrint (MANC) / cleftwise layouts
exported and imported back identically, 64-bit ids as strings in JSON (issue 23)."""

import json
import os
import shutil
import sqlite3
import subprocess

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from cleftwise.launch import import_synapses, query_synapses
from cleftwise.storage.db import open_store
from cleftwise.storage.db.table_layouts import sidecar_path
from cleftwise.storage.errors import StorageError
from cleftwise.storage.importers.tables import TableImportConfig, import_tables, map_table, read_table

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MANC = os.path.join(REPO, "..", "shared", "data", "tables", "manc-nt", "synapses_gaba.csv")
BIG_SV = 2 ** 64 - 12345          # supervoxel id above 2**63
BIG_ROOT = 2 ** 53 + 1            # not exact as a float64 / JavaScript number
HUGE_ROOT = 2 ** 63 + 7           # a uint64 neuron id


def _cave_table(n: int = 6) -> pd.DataFrame:
    """A CAVE synapse table as caveclient returns it (positions x, y, z voxels of 4, 4, 40 nm),
    with Buhmann-style scores and transmitter probabilities and a few odd columns."""
    rng = np.random.default_rng(5)
    pre = rng.integers([1000, 2000, 30], [9000, 9000, 90], size=(n, 3))
    post = pre + rng.integers(-6, 7, size=(n, 3))
    ctr = (pre + post) // 2
    nt = rng.dirichlet(np.ones(3), size=n)
    return pd.DataFrame({
        "id": np.arange(101, 101 + n, dtype=np.int64),
        "valid": np.array([True, False] + [True] * (n - 2)),
        "pre_pt_supervoxel_id": np.array([BIG_SV] + [90_000_000_000_000_000 + k for k in range(1, n)], np.uint64),
        "pre_pt_root_id": np.array([BIG_ROOT] + [864691135000000000 + k for k in range(1, n)], np.int64),
        "post_pt_supervoxel_id": np.array([2 ** 63 + k for k in range(n)], np.uint64),
        "post_pt_root_id": np.array([864691135999999999 - k for k in range(n)], np.int64),
        "size": rng.integers(20, 900, n).astype(np.int64),
        "pre_pt_position": list(pre), "post_pt_position": list(post), "ctr_pt_position": list(ctr),
        "cleft_score": rng.uniform(0, 300, n), "connection_score": rng.uniform(0, 1, n),
        "nt_gaba": nt[:, 0], "nt_acetylcholine": nt[:, 1], "nt_glutamate": nt[:, 2],
        "tag": pd.array(["a", None] + ["b"] * (n - 2), dtype="str"),
        "n_votes": pd.array([3, None] + [5] * (n - 2), dtype="Int64"),
    })


EXTRAS = {"valid": "boolean", "pre_pt_supervoxel_id": "UInt64", "post_pt_supervoxel_id": "UInt64",
          "cleft_score": "float64", "connection_score": "float64", "nt_gaba": "float64",
          "nt_acetylcholine": "float64", "nt_glutamate": "float64", "tag": "str", "n_votes": "Int64"}


@pytest.fixture(params=["sqlite", "mongomock"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/a.db"
    return f"mongomock://fmt_{os.path.basename(tmp_path)}"


def _frames_equal(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert list(a.columns) == list(b.columns)
    pd.testing.assert_frame_equal(a, b, check_exact=True)


def test_import_keeps_unmapped_columns_typed(tmp_path, url):
    src = _cave_table()
    path = tmp_path / "cave_synapses.parquet"
    src.to_parquet(path, index=False)
    assert import_tables([str(path)], url, TableImportConfig(preset="cave")) == {str(path): len(src)}
    with open_store(url, readonly=True) as db:
        got = db.query()
        assert [n for n, _ in db.extra_fields()] == list(EXTRAS)
    assert got["id"].tolist() == src["id"].tolist()  # CAVE's row ids are the synapse ids
    for col, dtype in EXTRAS.items():
        assert str(got[col].dtype) == dtype, col
    assert got["pre_pt_supervoxel_id"].tolist() == [int(v) for v in src["pre_pt_supervoxel_id"]]
    assert int(got["pre_pt_supervoxel_id"].iloc[0]) == BIG_SV
    assert got["post_pt_supervoxel_id"].tolist() == [int(v) for v in src["post_pt_supervoxel_id"]]
    assert got["valid"].tolist() == src["valid"].tolist()
    assert got["nt_gaba"].tolist() == src["nt_gaba"].tolist()  # floats exact
    assert got["tag"].isna().tolist() == src["tag"].isna().tolist() and got["tag"].iloc[0] == "a"
    assert got["n_votes"].isna().iloc[1] and int(got["n_votes"].iloc[0]) == 3
    assert got["pre_neuron"].tolist() == src["pre_pt_root_id"].tolist()
    # a column subset names extra fields like schema columns; a record rewritten without them
    # loses them (a rewrite replaces the record)
    with open_store(url) as db:
        few = db.query(columns=["valid", "z"])
        assert list(few.columns) == ["id", "valid", "z"] and few["valid"].dtype == "boolean"
        db.upsert_many(got.iloc[:1][[c for c in got.columns if c not in EXTRAS]])
        again = db.get([int(src["id"].iloc[0])])
        assert again["valid"].isna().all() and again["pre_pt_supervoxel_id"].isna().all()
        with pytest.raises(StorageError, match="unknown columns"):
            db.upsert_many(got.iloc[:1])  # extra fields are kept on request only


def test_cave_layout_round_trip(tmp_path):
    src = _cave_table()
    path = tmp_path / "cave_synapses.parquet"
    src.to_parquet(path, index=False)
    one, two = f"sqlite:///{tmp_path}/one.db", f"sqlite:///{tmp_path}/two.db"
    import_tables([str(path)], one, TableImportConfig(preset="cave"))
    for fmt in ("parquet", "csv"):
        e1, e2 = tmp_path / f"e1.{fmt}", tmp_path / f"e2.{fmt}"
        assert query_synapses.main(["--db", one, "--layout", "cave", "--out", str(e1)]) == 0
        assert import_synapses.main(["--db", two, "--table", str(e1), "--source", "cave_synapses"]) == 0
        assert query_synapses.main(["--db", two, "--layout", "cave", "--out", str(e2)]) == 0
        if fmt == "parquet":
            a, b = pd.read_parquet(e1), pd.read_parquet(e2)
            meta = json.loads(pq.read_schema(e1).metadata[b"cleftwise"])
            assert meta["layout"] == "cave" and meta["resolution_xyz_nm"] == [4.0, 4.0, 40.0]
            assert a.attrs["dataframe_resolution"] == [4.0, 4.0, 40.0]  # as caveclient states it
            assert [list(v) for v in a["pre_pt_position"]] == [list(map(float, v)) for v in src["pre_pt_position"]]
        else:
            a, b = (pd.read_csv(p, dtype=json.load(open(sidecar_path(str(p))))["dtypes"]) for p in (e1, e2))
            assert open(e1).read() == open(e2).read()
            assert a["pre_pt_position_x"].tolist() == [float(v[0]) for v in src["pre_pt_position"]]
        _frames_equal(a, b)
        assert a.columns[:7].tolist() == ["id", "valid", "pre_pt_supervoxel_id", "pre_pt_root_id",
                                         "post_pt_supervoxel_id", "post_pt_root_id", "size"]
        assert a["pre_pt_supervoxel_id"].tolist() == [int(v) for v in src["pre_pt_supervoxel_id"]]
        assert a["valid"].tolist() == src["valid"].tolist() and a["id"].tolist() == src["id"].tolist()
        assert {"cleft_score", "nt_gaba", "tag", "n_votes", "score_union", "ei_prob", "sign"} <= set(a.columns)
        # no E/I probability: the sign is missing, not 0 (which would read as a sign)
        assert (a["sign"].isna() == a["ei_prob"].isna()).all() and not (a["sign"] == 0).any()
    # another voxel size is stated in the file and used by the re-import
    e3 = tmp_path / "e3.parquet"
    assert query_synapses.main(["--db", one, "--layout", "cave", "--voxel-size", "40", "8", "8",
                                "--out", str(e3)]) == 0
    assert pd.read_parquet(e3).attrs["dataframe_resolution"] == [8.0, 8.0, 40.0]
    rec = map_table(read_table(str(e3)), TableImportConfig())  # layout and voxel size from the file
    with open_store(one, readonly=True) as db, open_store(two, readonly=True) as db2:
        want = db.query()
        np.testing.assert_array_equal(rec["pre_x"], want["pre_x"])
        np.testing.assert_array_equal(rec["z"], want["z"])
        assert db2.extra_fields() == db.extra_fields()  # 'sign' is derived, not kept


def test_cleftwise_layout_round_trip_without_map(tmp_path, url):
    src = _cave_table()
    path = tmp_path / "cave_synapses.parquet"
    src.to_parquet(path, index=False)
    import_tables([str(path)], url, TableImportConfig(preset="cave"))
    with open_store(url) as db:  # records of the pipeline (no extra fields) in the same store
        db.upsert_many(pd.DataFrame({"id": [7, 8], "z": [40.0, 80.0], "y": [4.0, 8.0], "x": [4.0, 8.0],
                                     "pre_neuron": np.array([HUGE_ROOT, 3], np.uint64),
                                     "post_neuron": [2, 3], "score_union": [0.5, 0.9], "block_id": [4, 4],
                                     "flags": ["autapse", ""], "source": "cleftwise"}), )
    for fmt in ("parquet", "csv"):
        e1, e2 = tmp_path / f"c1.{fmt}", tmp_path / f"c2.{fmt}"
        other = f"sqlite:///{tmp_path}/copy_{fmt}.db"
        assert query_synapses.main(["--db", url, "--out", str(e1)]) == 0
        assert import_synapses.main(["--db", other, "--table", str(e1)]) == 0  # no --map, no --preset
        assert query_synapses.main(["--db", other, "--out", str(e2)]) == 0
        if fmt == "parquet":
            a, b = pd.read_parquet(e1), pd.read_parquet(e2)
            assert json.loads(pq.read_schema(e1).metadata[b"cleftwise"])["layout"] == "cleftwise"
        else:
            assert open(e1).read() == open(e2).read()
            dt = json.load(open(sidecar_path(str(e1))))["dtypes"]
            a, b = pd.read_csv(e1, dtype=dt), pd.read_csv(e2, dtype=dt)
        _frames_equal(a, b)
        assert list(a.columns[-len(EXTRAS):]) == list(EXTRAS)
        with open_store(other, readonly=True) as db:
            got = db.query()
            assert got["block_id"].tolist()[:2] == [4, 4] and got["flags"].iloc[0] == "autapse"
            assert int(got["pre_neuron"].to_numpy().view(np.uint64)[0]) == HUGE_ROOT
            assert int(got["pre_pt_supervoxel_id"].dropna().iloc[0]) == BIG_SV
    # the query parquet of today's cleftwise, without metadata, is detected by its columns
    plain = tmp_path / "plain.csv"
    pd.read_csv(tmp_path / "c1.csv").to_csv(plain, index=False)
    rec = map_table(pd.read_csv(plain), TableImportConfig())
    assert len(rec) == len(src) + 2 and "nt_gaba" in rec.columns


@pytest.mark.skipif(not os.path.exists(MANC), reason="needs ../shared/data/tables/manc-nt")
def test_manc_layout_round_trip_real_rows(tmp_path):
    real = pd.read_csv(MANC).iloc[:200].copy()
    real.loc[[3, 50], "any_out_of_range"] = True  # the real rows have none
    path = tmp_path / "synapses_gaba.csv"
    real.to_csv(path, index=False)
    one = f"sqlite:///{tmp_path}/one.db"
    import_tables([str(path)], one, TableImportConfig(preset="manc", on_duplicate="drop"))
    with open_store(one, readonly=True) as db:
        assert db.extra_fields() == [["neuron_class", "str"]]  # MANC's unmapped column, kept
    for fmt in ("parquet", "csv"):
        e1, e2 = tmp_path / f"m1.{fmt}", tmp_path / f"m2.{fmt}"
        two = f"sqlite:///{tmp_path}/two_{fmt}.db"
        assert query_synapses.main(["--db", one, "--layout", "manc", "--out", str(e1)]) == 0
        assert import_synapses.main(["--db", two, "--table", str(e1), "--source", "synapses_gaba"]) == 0
        assert query_synapses.main(["--db", two, "--layout", "manc", "--out", str(e2)]) == 0
        if fmt == "parquet":
            a, b = pd.read_parquet(e1), pd.read_parquet(e2)
        else:
            assert open(e1).read() == open(e2).read()
            dt = json.load(open(sidecar_path(str(e1))))["dtypes"]
            a, b = pd.read_csv(e1, dtype=dt), pd.read_csv(e2, dtype=dt)
        _frames_equal(a, b)
        assert len(a) == len(real.drop_duplicates(["bodyId_pre", "bodyId_post", "x_pre", "y_pre", "z_pre",
                                                   "x_post", "y_post", "z_post"]))
        key = ["bodyId_pre", "bodyId_post", "x_pre", "y_pre", "z_pre", "x_post", "y_post", "z_post"]
        m = a.merge(real.drop_duplicates(key), on=key, suffixes=("", "_src"))
        assert len(m) == len(a)
        assert (m["neurotransmitter"] == m["neurotransmitter_src"]).all()
        assert (m["any_out_of_range"].astype(bool) == m["any_out_of_range_src"]).all()
        assert int(a["any_out_of_range"].sum()) == 2
        assert (m["bbox_xmax"] == m["bbox_xmax_src"]).all()
        assert (m["neuron_class"] == m["neuron_class_src"]).all()
        with open_store(two, readonly=True) as db:
            assert db.count() == len(a)


def test_json_ids_are_strings(tmp_path, capsys):
    src = _cave_table()
    path = tmp_path / "cave_synapses.parquet"
    src.to_parquet(path, index=False)
    url = f"sqlite:///{tmp_path}/j.db"
    import_tables([str(path)], url, TableImportConfig(preset="cave"))
    with open_store(url) as db:
        db.upsert_many(pd.DataFrame({"id": [2 ** 62 + 1], "z": [0.0], "y": [0.0], "x": [0.0],
                                     "pre_neuron": np.array([HUGE_ROOT], np.uint64), "post_neuron": [BIG_ROOT]}))
    out = tmp_path / "q.json"
    assert query_synapses.main(["--db", url, "--format", "json", "--out", str(out)]) == 0
    recs = {r["id"]: r for r in json.load(open(out))}
    big = recs[str(2 ** 62 + 1)]
    assert big["pre_neuron"] == str(HUGE_ROOT) and big["post_neuron"] == str(BIG_ROOT)
    first = recs["101"]
    assert first["pre_pt_supervoxel_id"] == str(BIG_SV) and first["pre_neuron"] == str(BIG_ROOT)
    assert isinstance(first["size"], int) and first["valid"] is True and first["nt_gaba"] == src["nt_gaba"].iloc[0]
    assert query_synapses.main(["--db", url, "--format", "json", "--layout", "cave", "--pre", str(BIG_ROOT)]) == 0
    cave = json.loads(capsys.readouterr().out)
    assert cave[0]["pre_pt_root_id"] == str(BIG_ROOT) and cave[0]["pre_pt_supervoxel_id"] == str(BIG_SV)
    assert cave[0]["pre_pt_position"] == [float(v) for v in src["pre_pt_position"].iloc[0]]
    if shutil.which("jq"):
        r = subprocess.run(["jq", "-r", ".[] | .pre_pt_supervoxel_id, .pre_neuron", str(out)],
                           capture_output=True, text=True, check=True)
        assert str(BIG_SV) in r.stdout.split() and str(HUGE_ROOT) in r.stdout.split()


def test_sqlite_layouts_and_conflicts(tmp_path):
    src = _cave_table(3)
    old2, old1 = tmp_path / "l2.db", tmp_path / "l1.db"
    for path, layout in ((old2, 2), (old1, 1)):
        with open_store(str(path), layout=layout) as db:
            db.upsert_many(pd.DataFrame({"id": [1], "z": [0.0], "y": [0.0], "x": [0.0]}))
    with open_store(str(old2), readonly=True) as db:  # layout-2 files read as before
        assert db.extra_fields() == [] and db.count() == 1
    rec = map_table(src, TableImportConfig(preset="cave"))
    with open_store(str(old2)) as db:  # upgraded in place the first time extra fields come
        db.upsert_many(rec, extra="keep")
        assert db.query()["valid"].tolist()[1:] == src["valid"].tolist()
    layout = sqlite3.connect(old2).execute("SELECT value FROM cleftwise_meta WHERE key='sqlite_layout'").fetchone()
    assert layout == ("3",)
    with open_store(str(old1)) as db, pytest.raises(StorageError, match="layout 1 holds no extra fields"):
        db.upsert_many(rec, extra="keep")
    with open_store(str(old2)) as db:  # a column whose type contradicts the registry
        bad = rec.assign(valid=["yes", "no", "no"])
        with pytest.raises(StorageError, match="extra column 'valid' holds str values but the database stores it as bool"):
            db.upsert_many(bad, extra="keep")
    # a column named like a record field the mapping fills from another column
    with pytest.raises(StorageError, match="column 'x' has the name of the record field 'x', which is filled "
                                           "from column 'ctr_pt_position'"):
        map_table(src.assign(x=1.0), TableImportConfig(preset="cave"))
    # ids taken from another table of the same numbering are refused
    url = f"sqlite:///{tmp_path}/ids.db"
    a, b = tmp_path / "table_a.parquet", tmp_path / "table_b.parquet"
    src.to_parquet(a, index=False)
    src.assign(size=1).to_parquet(b, index=False)
    import_tables([str(a)], url, TableImportConfig(preset="cave"))
    import_tables([str(a)], url, TableImportConfig(preset="cave"))  # re-import: same records
    with pytest.raises(StorageError, match="already belong to records of another source"):
        import_tables([str(b)], url, TableImportConfig(preset="cave"))
    assert map_table(src, TableImportConfig(preset="cave", keep_extra=False)).columns[-1] == "source"
