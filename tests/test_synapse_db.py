"""Synapse database: one suite for SQLite, mongomock and (when configured) a real MongoDB.

A real server is used when ``CLEFTWISE_TEST_MONGODB_URI`` is set (e.g.
``mongodb://localhost:27017/cleftwise_test``); each test gets its own collection.
"""

import logging
import multiprocessing as mp
import os
import sqlite3
import threading
import time
import uuid

import numpy as np
import pandas as pd
import pytest
from funlib.geometry import Roi

from cleftwise.storage.errors import StorageError
from cleftwise.storage.db import SynapseStore, open_store
from cleftwise.storage.db.schema import COLUMNS, COLUMN_NAMES, SCHEMA_VERSION

MONGO_URI = os.environ.get("CLEFTWISE_TEST_MONGODB_URI")
BIG_ID = 2 ** 63 + 12345  # a uint64 neuron id beyond int64


# --------------------------------------------------------------------------- helpers
def make_records(n, seed=0, id_start=1, grid=True, block=None):
    """Random records with every schema field; a few values missing in each nullable column.

    With ``grid``, coordinates lie on a (40, 4, 4) nm lattice so ROI bounds hit them exactly.
    """
    rng = np.random.default_rng(seed)
    ext = np.array([2000.0, 4000.0, 4000.0])
    if grid:
        step = np.array([40.0, 4.0, 4.0])
        c = rng.integers(0, (ext / step).astype(int), size=(n, 3)) * step
    else:
        c = rng.uniform(0, 1, (n, 3)) * ext
    df = pd.DataFrame({"id": np.arange(id_start, id_start + n, dtype=np.int64)})
    for i, a in enumerate("zyx"):
        df[a] = c[:, i]
    half = rng.uniform(10, 200, (n, 3))
    for i, a in enumerate("zyx"):
        df[f"bbox_{a}0"] = c[:, i] - half[:, i]
    for i, a in enumerate("zyx"):
        df[f"bbox_{a}1"] = c[:, i] + half[:, i]
    df["size"] = pd.array(rng.integers(1, 5000, n), dtype="Int64")
    for s in ("score_union", "score_pre", "score_post", "score_max", "pre_conf", "post_conf", "ei_prob"):
        df[s] = rng.random(n)
    for side in ("pre", "post"):
        for i, a in enumerate("zyx"):
            df[f"{side}_{a}"] = c[:, i] + rng.normal(0, 30, n)
        df[f"{side}_size"] = pd.array(rng.integers(1, 900, n), dtype="Int64")
        df[f"{side}_neuron"] = rng.integers(0, 12, n).astype(np.uint64)
    df.loc[df.index[: max(1, n // 50)], "pre_neuron"] = np.uint64(BIG_ID)
    df["flags"] = rng.choice(["", "autapse", "pre_background,post_tie"], n)
    df["block_id"] = pd.array([block] * n, dtype="Int64")
    df["ei_label"] = rng.choice(["E", "I"], n)
    df["classifier"] = "resnet-v1"
    df["source"] = "cleftwise"
    # missing values: every nullable column gets some
    miss = rng.random((n, len(COLUMNS))) < 0.1
    for j, col in enumerate(COLUMNS):
        if col.kind in ("float", "count", "text") and col.name not in ("z", "y", "x", "block_id"):
            rows = np.flatnonzero(miss[:, j])
            if col.name.startswith("bbox_"):
                rows = np.flatnonzero(miss[:, 0])  # whole bbox missing together
            if col.kind == "float":
                df.loc[rows, col.name] = np.nan
            else:
                df.loc[rows, col.name] = None
    return df


def assert_same_records(got: pd.DataFrame, expected: pd.DataFrame):
    """Every schema column of ``got`` equals ``expected`` (rows matched by id)."""
    expected = expected.sort_values("id").reset_index(drop=True)
    got = got.sort_values("id").reset_index(drop=True)
    assert list(got["id"]) == list(expected["id"])
    for col in COLUMNS:
        name = col.name
        g, e = got[name], expected[name]
        if col.kind in ("key", "neuron"):
            assert g.dtype == np.int64, name
            assert np.array_equal(g.to_numpy().view(np.uint64),
                                  np.asarray(e.to_numpy(), dtype=np.uint64)), name
        elif col.kind == "float":
            assert g.dtype == np.float64, name
            np.testing.assert_array_equal(g.to_numpy(), e.to_numpy(dtype=np.float64), err_msg=name)
        elif col.kind == "count":
            assert str(g.dtype) == "Int64", name
            assert g.isna().tolist() == e.isna().tolist(), name
            assert g.dropna().astype(np.int64).tolist() == e.dropna().astype(np.int64).tolist(), name
        else:
            gl = [None if pd.isna(v) else v for v in g]
            el = [None if pd.isna(v) else v for v in e]
            assert gl == el, name


def brute_centroid(df, begin, end):
    m = np.ones(len(df), bool)
    for a, b, e in zip("zyx", begin, end):
        m &= (df[a].to_numpy() >= b) & (df[a].to_numpy() < e)
    return set(df["id"][m])


def brute_bbox(df, begin, end):
    has = df["bbox_z0"].notna().to_numpy()
    over = np.ones(len(df), bool)
    for a, b, e in zip("zyx", begin, end):
        over &= (df[f"bbox_{a}0"].to_numpy() < e) & (df[f"bbox_{a}1"].to_numpy() > b)
    ids = set(df["id"][has & over])
    return ids | (brute_centroid(df[~has], begin, end))


# --------------------------------------------------------------------------- backends
class Backend:
    """Opens stores on one database, and tampers with it the way a foreign tool would."""

    def __init__(self, kind, tmp_path):
        self.kind = kind
        self.name = f"t{uuid.uuid4().hex[:10]}"
        self.opts = {"layout": 1} if kind == "sqlite-layout1" else {}
        if kind.startswith("sqlite"):
            self.kind = "sqlite"
            self.path = str(tmp_path / "syn.db")
            self.url = f"sqlite:///{self.path}"
        elif kind == "mongomock":
            import mongomock

            self.client = mongomock.MongoClient()
            self.url = "mongomock://testdb"
        else:
            import pymongo

            self.client = pymongo.MongoClient(MONGO_URI, serverSelectionTimeoutMS=3000)
            self.url = MONGO_URI

    def open(self, **opts) -> SynapseStore:
        if self.kind == "sqlite":
            return open_store(self.url, **self.opts, **opts)
        return open_store(self.url, client=self.client, collection=self.name, **opts)

    def set_version(self, version):
        if self.kind == "sqlite":
            con = sqlite3.connect(self.path)
            con.execute("UPDATE cleftwise_meta SET value = ? WHERE key = 'schema_version'", (str(version),))
            con.commit()
            con.close()
        else:
            db = self.client.get_default_database() if self.kind == "mongodb" else self.client["testdb"]
            db[f"{self.name}_meta"].update_one({"_id": "schema"}, {"$set": {"version": version}})

    def cleanup(self):
        if self.kind == "mongodb":
            db = self.client.get_default_database()
            db.drop_collection(self.name)
            db.drop_collection(f"{self.name}_meta")
            self.client.close()


@pytest.fixture(params=["sqlite", "sqlite-layout1", "mongomock", "mongodb"])
def backend(request, tmp_path):
    if request.param == "mongodb" and not MONGO_URI:
        pytest.skip("set CLEFTWISE_TEST_MONGODB_URI to test a real MongoDB server")
    b = Backend(request.param, tmp_path)
    yield b
    b.cleanup()


@pytest.fixture
def store(backend):
    s = backend.open()
    yield s
    s.close()


# --------------------------------------------------------------------------- shared suite
def test_round_trip_every_field(store):
    df = make_records(300, seed=1, block=None)
    assert store.upsert_many(df) == 300
    got = store.get(df["id"])
    assert list(got.columns) == list(COLUMN_NAMES)
    assert_same_records(got, df)
    # the uint64 id beyond int64 comes back with the same bits and can be queried
    big = store.query(pre=BIG_ID)
    assert len(big) == (df["pre_neuron"] == np.uint64(BIG_ID)).sum() > 0
    assert set(big["pre_neuron"].to_numpy().view(np.uint64)) == {np.uint64(BIG_ID)}
    # list-of-dicts input is the same as a DataFrame
    recs = make_records(20, seed=2, id_start=10_000)
    store.upsert_many(recs.astype(object).where(recs.notna(), None).to_dict("records"))
    assert_same_records(store.get(recs["id"]), recs)
    assert store.count() == 320


def test_roi_queries_match_brute_force(store):
    df = make_records(800, seed=3)
    store.upsert_many(df)
    rng = np.random.default_rng(4)
    step = np.array([40.0, 4.0, 4.0])
    for k in range(20):
        begin = rng.integers(0, [40, 800, 800]) * step
        end = begin + rng.integers(1, [25, 500, 500]) * step
        roi = (tuple(begin), tuple(end))
        got = store.query(roi=roi)
        assert set(got["id"]) == brute_centroid(df, begin, end), roi
        assert list(got["id"]) == sorted(got["id"])
        assert store.count(roi=roi) == len(got)
        assert set(store.query(roi=roi, roi_match="bbox", columns=["z"])["id"]) == brute_bbox(df, begin, end)
        s = float(rng.random())
        hi = store.query(roi=roi, min_score=s)
        assert set(hi["id"]) == brute_centroid(df[df.score_union >= s], begin, end)
        lim = store.query(roi=roi, limit=3)
        assert list(lim["id"]) == sorted(brute_centroid(df, begin, end))[:3]
    # half-open: a centroid on the end bound is outside, on the begin bound inside
    z0, y0, x0 = df.loc[0, ["z", "y", "x"]]
    assert 1 in set(store.query(roi=((z0, y0, x0), (z0 + 40, y0 + 4, x0 + 4)))["id"])
    assert 1 not in set(store.query(roi=((z0 - 40, y0, x0), (z0, y0 + 4, x0 + 4)))["id"])
    # funlib Roi (offset, shape) and an unbounded Roi
    roi = Roi((400, 800, 0), (800, 1600, 4000))
    assert set(store.query(roi=roi)["id"]) == brute_centroid(df, roi.begin, roi.end)
    assert store.count(roi=Roi((None, None, None), (None, None, None))) == len(df)
    assert store.query(roi=((0, 0, 0), (0, 0, 0))).empty


def test_neuron_queries_neurons_and_degrees(store):
    df = make_records(500, seed=5)
    store.upsert_many(df)
    pre = df["pre_neuron"].to_numpy().view(np.int64)
    post = df["post_neuron"].to_numpy().view(np.int64)
    assert set(store.query(pre=3)["id"]) == set(df.id[pre == 3])
    assert set(store.query(post=[1, 2, 7])["id"]) == set(df.id[np.isin(post, [1, 2, 7])])
    assert set(store.query(neuron=4)["id"]) == set(df.id[(pre == 4) | (post == 4)])
    assert set(store.query(pre=5, post=[6, 8])["id"]) == set(df.id[(pre == 5) & np.isin(post, [6, 8])])
    assert store.count(neuron=[4, 5], min_score=0.5) == int(
        (((np.isin(pre, [4, 5])) | np.isin(post, [4, 5])) & (df.score_union >= 0.5)).sum())
    assert store.query(pre=999_999).empty
    expected = np.union1d(pre[pre != 0], post[post != 0])
    assert np.array_equal(store.neurons(), expected)
    deg = store.degrees().set_index("neuron")
    assert np.array_equal(deg.index.to_numpy(), expected)
    for n in expected[:6]:
        assert deg.loc[n, "out_synapses"] == (pre == n).sum()
        assert deg.loc[n, "in_synapses"] == (post == n).sum()
        assert deg.loc[n, "out_degree"] == len(set(post[(pre == n) & (post != 0)]))
        assert deg.loc[n, "in_degree"] == len(set(pre[(post == n) & (pre != 0)]))


def test_block_rewrite_is_idempotent(store):
    blocks = {b: make_records(50, seed=10 + b, id_start=1000 * b) for b in range(4)}
    for b, recs in blocks.items():
        store.upsert_many(recs, block_id=b)
    assert store.count() == 200
    assert store.block_ids() == [0, 1, 2, 3]
    store.upsert_many(blocks[2], block_id=2)  # same block again: nothing changes
    assert store.count() == 200
    assert_same_records(store.query(block_id=2), blocks[2].assign(block_id=pd.array([2] * 50, dtype="Int64")))
    # a rewrite with fewer, changed records replaces the block
    new = blocks[2].iloc[:30].copy()
    new["score_union"] = 0.25
    store.replace_block(2, new)
    assert store.count() == 180
    got = store.query(block_id=2)
    assert list(got["id"]) == list(new["id"]) and (got["score_union"] == 0.25).all()
    assert store.get(blocks[2]["id"].iloc[30:]).empty
    # the spatial index follows: stale records are not found by ROI either
    everything = ((-1e9, -1e9, -1e9), (1e9, 1e9, 1e9))
    assert store.count(roi=everything) == 180
    assert store.delete_block(1) == 50
    assert store.count() == 130 and store.block_ids() == [0, 2, 3]
    assert store.count(roi=everything) == 130
    if hasattr(store, "_conn"):  # SQLite: the R*Tree holds exactly the live records
        assert store._conn.execute("SELECT COUNT(*) FROM synapses_rtree").fetchone()[0] == 130
    # plain upserts (no block) replace records by id
    again = blocks[0].copy()
    again["ei_label"] = "I"
    store.upsert_many(again)
    assert store.count() == 130 and (store.query(block_id=0)["ei_label"] == "I").all()
    with pytest.raises(StorageError, match="block"):
        store.upsert_many(blocks[3].assign(block_id=3), block_id=9)  # records say block 3


def test_update_fields_for_ei_stage(store):
    df = make_records(200, seed=6)
    store.upsert_many(df)
    upd = pd.DataFrame({"id": df["id"].iloc[::2], "ei_prob": np.linspace(0, 1, 100),
                        "ei_label": ["E"] * 99 + [None], "classifier": "rf-2"})
    upd = pd.concat([upd, pd.DataFrame({"id": [10 ** 9], "ei_prob": [0.5], "ei_label": ["E"],
                                        "classifier": ["rf-2"]})])
    assert store.update_fields(upd, fields=["ei_prob", "ei_label", "classifier"]) == 100
    got = store.get(df["id"]).set_index("id")
    exp = df.set_index("id")
    u = upd.iloc[:100].set_index("id")
    np.testing.assert_array_equal(got.loc[u.index, "ei_prob"], u["ei_prob"])
    assert got.loc[u.index[-1], "ei_label"] is None or pd.isna(got.loc[u.index[-1], "ei_label"])
    assert (got.loc[u.index, "classifier"] == "rf-2").all()
    untouched = exp.index.difference(u.index)
    np.testing.assert_array_equal(got.loc[untouched, "ei_prob"], exp.loc[untouched, "ei_prob"])
    assert_same_records(got.loc[untouched].reset_index().drop(columns=[]),
                        exp.loc[untouched].reset_index())
    # NaN clears; only the named fields change
    store.update_fields(pd.DataFrame({"id": [int(df.id[0])], "ei_prob": [np.nan], "size": [7]}),
                        fields=["ei_prob"])
    one = store.get([df.id[0]])
    assert np.isnan(one["ei_prob"][0])
    assert one["size"].isna()[0] == pd.isna(df["size"][0])
    if not pd.isna(df["size"][0]):
        assert one["size"][0] == df["size"][0]  # not in fields: unchanged
    with pytest.raises(StorageError, match="cannot be updated"):
        store.update_fields(pd.DataFrame({"id": [1], "z": [0.0]}))
    with pytest.raises(StorageError, match="unknown"):
        store.update_fields(pd.DataFrame({"id": [1], "colour": ["red"]}))


def test_iter_query_and_export(store, tmp_path):
    df = make_records(230, seed=7)
    store.upsert_many(df)
    full = store.query(min_score=0.2)
    batches = list(store.iter_query(min_score=0.2, batch_size=40))
    assert all(len(b) <= 40 for b in batches) and len(batches) == -(-len(full) // 40)
    pd.testing.assert_frame_equal(pd.concat(batches, ignore_index=True), full)
    assert sum(len(b) for b in store.iter_query(batch_size=7, limit=50)) == 50
    n = store.export(tmp_path / "out.parquet", batch_size=64, min_score=0.2)
    assert n == len(full)
    back = pd.read_parquet(tmp_path / "out.parquet")
    assert_same_records(back, full)
    n = store.export(str(tmp_path / "out.csv"), batch_size=50, columns=["z", "pre_neuron", "flags"])
    csv = pd.read_csv(tmp_path / "out.csv")
    assert n == len(df) and list(csv.columns) == ["id", "z", "pre_neuron", "flags"]
    np.testing.assert_array_equal(csv["z"], store.query()["z"])
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    assert store.query(columns=["score_union"]).columns.tolist() == ["id", "score_union"]


def test_invalid_records_and_queries(store):
    good = make_records(5, seed=8)
    with pytest.raises(StorageError, match="'id'"):
        store.upsert_many(good.drop(columns=["id"]))
    with pytest.raises(StorageError, match="duplicate"):
        store.upsert_many(pd.concat([good, good.iloc[:1]]))
    bad = good.copy()
    bad.loc[2, "y"] = np.nan
    with pytest.raises(StorageError, match="centroid"):
        store.upsert_many(bad)
    with pytest.raises(StorageError, match="unknown columns"):
        store.upsert_many(good.assign(colour="red"))
    assert store.upsert_many(good.assign(colour="red"), extra="ignore") == 5
    with pytest.raises(StorageError, match="roi"):
        store.query(roi=((10, 0, 0), (0, 5, 5)))
    with pytest.raises(StorageError, match="columns"):
        store.query(columns=["nope"])
    assert store.count() == 5


def test_schema_version_mismatch(backend):
    with backend.open() as s:
        s.upsert_many(make_records(3))
    backend.set_version(SCHEMA_VERSION + 1)
    with pytest.raises(StorageError, match="schema version"):
        backend.open()
    backend.set_version(SCHEMA_VERSION)
    with backend.open(create=False) as s:
        assert s.count() == 3


# --------------------------------------------------------------------------- SQLite specifics
def test_sqlite_foreign_corrupt_and_missing_files(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(StorageError, match="junk.db"):
        open_store(f"sqlite:///{junk}")
    foreign = tmp_path / "foreign.db"
    con = sqlite3.connect(foreign)
    con.execute("CREATE TABLE people (name TEXT)")
    con.commit()
    con.close()
    with pytest.raises(StorageError, match="not a cleftwise synapse database"):
        open_store(f"sqlite:///{foreign}")
    # a real SQLite header over garbage pages
    broken = tmp_path / "broken.db"
    with open_store(f"sqlite:///{broken}") as s:
        s.upsert_many(make_records(50))
    data = bytearray(broken.read_bytes())
    data[100:] = os.urandom(len(data) - 100)
    broken.write_bytes(bytes(data))
    for suffix in ("-wal", "-shm"):
        if os.path.exists(f"{broken}{suffix}"):
            os.remove(f"{broken}{suffix}")
    with pytest.raises(StorageError, match="broken.db"):
        open_store(str(broken))
    with pytest.raises(StorageError, match="no synapse database"):
        open_store(f"sqlite:///{tmp_path / 'absent.db'}", create=False)
    assert not (tmp_path / "absent.db").exists()
    with pytest.raises(StorageError, match="unknown synapse database URL"):
        open_store("ftp://somewhere/x")


def test_sqlite_readonly_and_wal(tmp_path):
    path = tmp_path / "ro.db"
    with open_store(f"sqlite:///{path}") as s:
        s.upsert_many(make_records(10))
        assert s._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with open_store(str(path), readonly=True) as r:
        assert r.count() == 10
        with pytest.raises(StorageError, match="write failed"):
            r.upsert_many(make_records(2, id_start=100))


def test_sqlite_packed_copy_follows_writes_and_updates(tmp_path):
    """Layout 2: the packed BLOB (all numeric fields) equals the records after inserts, block
    rewrites and update_fields of SQL and packed-only fields; hand-made UPDATEs that would
    leave it stale are refused, other hand edits pass."""
    from cleftwise.storage.db.record_pack import PACKED_COLUMNS, unpack_records
    from cleftwise.storage.db.sqlite import PACKED_ONLY

    def packed_frame(s):
        rows = s._conn.execute("SELECT packed FROM synapses ORDER BY id").fetchall()
        return pd.DataFrame(unpack_records([r[0] for r in rows], PACKED_COLUMNS))

    df = make_records(300, seed=31, block=4)
    with open_store(str(tmp_path / "p.db")) as s:
        s.upsert_many(df, block_id=4)
        sql_cols = {r[1] for r in s._conn.execute("PRAGMA table_info(synapses)")}
        assert not sql_cols & set(PACKED_ONLY) and "packed" in sql_cols and "ei_prob" in sql_cols
        assert_same_records(s.query(), df)
        for col in PACKED_COLUMNS:  # the BLOB itself
            assert packed_frame(s)[col].equals(s.query()[col].reset_index(drop=True)), col
        # few SQL columns (SQL path) and a packed-only one (BLOB path)
        few = s.query(columns=["z", "pre_neuron"])
        assert list(few.columns) == ["id", "z", "pre_neuron"] and few["pre_neuron"].dtype == np.int64
        assert np.array_equal(few["z"], df.sort_values("id")["z"])
        assert np.array_equal(few["pre_neuron"].to_numpy().view(np.uint64),
                              df.sort_values("id")["pre_neuron"].to_numpy(np.uint64))
        one = s.query(columns=["pre_size"])
        assert list(one.columns) == ["id", "pre_size"]
        assert one["pre_size"].equals(df.sort_values("id")["pre_size"].reset_index(drop=True))
        # update SQL, packed-only and text fields (some set missing)
        upd = df[["id"]].iloc[::3].copy()
        upd["pre_neuron"] = np.uint64(77)
        upd["size"] = pd.array([None, 5] * (len(upd) // 2) + [7] * (len(upd) % 2), dtype="Int64")
        upd["ei_prob"] = np.linspace(0, 1, len(upd))
        upd["ei_label"] = "I"
        assert s.update_fields(upd) == len(upd)
        assert s.update_fields(upd[["id"]].assign(post_conf=0.25)) == len(upd)
        want = df.set_index("id")
        for col in ("pre_neuron", "size", "ei_prob", "ei_label"):
            want.loc[upd["id"], col] = upd[col].to_numpy() if col != "size" else upd[col].array
        want.loc[upd["id"], "post_conf"] = 0.25
        want = want.reset_index()
        assert_same_records(s.query(), want)
        assert_same_records(s.query(min_score=0.0, roi=((0, 0, 0), (2000, 4000, 4000))),
                            want[want.score_union >= 0])
        got = s._conn.execute("SELECT pre_neuron, ei_prob FROM synapses WHERE id = ?",
                              (int(upd["id"].iloc[1]),)).fetchone()
        assert got == (77, upd["ei_prob"].iloc[1])
        # hand-made UPDATEs: numeric SQL column refused, text and same-value accepted
        with pytest.raises(sqlite3.IntegrityError, match="update_fields"):
            s._conn.execute("UPDATE synapses SET pre_neuron = 5 WHERE id = 3")
        s._conn.execute("UPDATE synapses SET flags = 'x', pre_neuron = pre_neuron WHERE id = 6")
        with pytest.raises(sqlite3.IntegrityError):  # a row without its BLOB
            s._conn.execute("INSERT INTO synapses (id, z, y, x) VALUES (99999, 1, 1, 1)")
        assert s.query().set_index("id").loc[6, "flags"] == "x"
        # a block rewrite replaces everything
        s.upsert_many(df, block_id=4)
        assert_same_records(s.query(), df)


def test_sqlite_layout1_file_is_read_and_written(tmp_path):
    """A file of layout 1 (every field an SQL column, no packed column: the files made before
    layout 2, or asked for) works as layout 1 for every operation."""
    path = tmp_path / "old.db"
    with open_store(str(path), layout=1) as s:
        s.upsert_many(make_records(3, seed=1, id_start=6000))
    con = sqlite3.connect(path)  # files made before layout 2 have no layout key
    con.execute("DELETE FROM cleftwise_meta WHERE key = 'sqlite_layout'")
    con.commit()
    con.close()
    df = make_records(1500, seed=32, block=2)
    with open_store(str(path), layout=2) as s:
        assert not s._packed
        assert "size" in {r[1] for r in s._conn.execute("PRAGMA table_info(synapses)")}
        s.upsert_many(df, block_id=2)  # bulk path
        s.upsert_many(make_records(3, seed=1, id_start=5000))
        upd = df[["id"]].iloc[:10].assign(size=pd.array([3] * 10, dtype="Int64"), ei_prob=0.5)
        assert s.update_fields(upd) == 10
        want = df.set_index("id")
        want.loc[upd["id"], "size"] = 3
        want.loc[upd["id"], "ei_prob"] = 0.5
        assert_same_records(s.query(block_id=2), want.reset_index())
        _sqlite_consistent(s)
    with open_store(str(path), readonly=True) as r:
        assert r.count() == 1506
        assert_same_records(r.query(block_id=2), want.reset_index())
    con = sqlite3.connect(path)
    con.execute("INSERT INTO cleftwise_meta VALUES ('sqlite_layout', '9')")
    con.commit()
    con.close()
    with pytest.raises(StorageError, match="layout 9"):
        open_store(str(path))


def test_unknown_open_options_are_named(tmp_path):
    with pytest.raises(StorageError, match=r"unknown option\(s\) \['layout'\] for the MongoDB"):
        open_store("mongomock://db", layout=2)
    with pytest.raises(StorageError, match=r"\['bogus'\] for the SQLite synapse database; it takes"):
        open_store(str(tmp_path / "x.db"), bogus=1)
    assert not (tmp_path / "x.db").exists()
    with pytest.raises(StorageError, match="layout must be 1, 2 or 3"):
        open_store(str(tmp_path / "x.db"), layout=4)


def test_sqlite_url_relative_and_absolute(tmp_path, monkeypatch):
    """SQLAlchemy's convention: ``sqlite:///rel.db`` is relative to the working directory,
    ``sqlite:////abs.db`` (three slashes + an absolute path) absolute; ``store.url`` round-trips."""
    path = tmp_path / "abs.db"
    with open_store(f"sqlite:///{path}") as s:  # path starts with '/': four slashes
        s.upsert_many(make_records(4))
        assert s.path == str(path)
        assert s.url == f"sqlite:///{path}"
    with open_store(s.url, readonly=True) as r:
        assert r.count() == 4
    monkeypatch.chdir(tmp_path)
    with open_store("sqlite:///sub/rel.db") as rel:
        assert rel.path == str(tmp_path / "sub" / "rel.db")
    assert (tmp_path / "sub" / "rel.db").exists()
    with open_store("sqlite:///abs.db", readonly=True) as r:  # the same file, named relatively
        assert r.count() == 4
    with pytest.raises(StorageError, match="bad SQLite URL"):
        open_store("sqlite://abs.db")


def _sqlite_consistent(store):
    """The R*Tree passes SQLite's own check and holds exactly the stored records."""
    con = store._conn
    assert con.execute("SELECT rtreecheck('synapses_rtree')").fetchone()[0] == "ok"
    ids = {r[0] for r in con.execute("SELECT id FROM synapses_rtree")}
    assert ids == {r[0] for r in con.execute("SELECT id FROM synapses")}
    indexes = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'index' "
                                         "AND tbl_name = 'synapses' AND sql IS NOT NULL")}
    assert indexes == {"synapses_pre_post", "synapses_post", "synapses_block"}


def _assert_roi_queries(store, df, seed):
    rng = np.random.default_rng(seed)
    step = np.array([40.0, 4.0, 4.0])
    for _ in range(8):
        begin = rng.integers(0, [40, 800, 800]) * step
        end = begin + rng.integers(1, [25, 500, 500]) * step
        got = store.query(roi=(tuple(begin), tuple(end)))
        assert set(got["id"]) == brute_centroid(df, begin, end)
        assert list(got["id"]) == sorted(got["id"])
        bbox = store.query(roi=(tuple(begin), tuple(end)), roi_match="bbox", columns=["z"])
        assert set(bbox["id"]) == brute_bbox(df, begin, end)


def test_sqlite_bulk_load_matches_the_row_by_row_path(tmp_path, caplog):
    df = make_records(1500, seed=21)
    with open_store(str(tmp_path / "rows.db"), bulk_min_rows=0) as rows, \
            open_store(str(tmp_path / "bulk.db"), bulk_min_rows=100) as bulk:
        rows.upsert_many(df)
        with caplog.at_level(logging.DEBUG, logger="cleftwise.storage.db.sqlite"):
            bulk.upsert_many(df)
        assert "R*Tree packed: True" in caplog.text
        pd.testing.assert_frame_equal(bulk.query(), rows.query())
        assert_same_records(bulk.query(), df)
        _sqlite_consistent(bulk)
        assert bulk._conn.execute("SELECT COUNT(*) FROM synapses_rtree_node").fetchone()[0] > 1
        _assert_roi_queries(bulk, df, seed=1)
        # missing values are stored as SQL NULL (bound as NaN), not as NaN or text
        for col in ("ei_prob", "score_union", "ei_label"):
            nulls = bulk._conn.execute(f"SELECT COUNT(*) FROM synapses WHERE typeof({col}) = 'null'").fetchone()[0]
            assert nulls == int(df[col].isna().sum()) > 0, col
        # a second load, as large as the table, replacing half of it: bulk again
        again = make_records(1500, seed=22, id_start=751)
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="cleftwise.storage.db.sqlite"):
            bulk.upsert_many(again)
        assert "R*Tree packed: True" in caplog.text
        expected = pd.concat([df[df.id < 751], again], ignore_index=True)
        assert_same_records(bulk.query(), expected)
        _sqlite_consistent(bulk)
        _assert_roi_queries(bulk, expected, seed=2)
        # a small write into the packed tree takes the ordinary path
        small = make_records(40, seed=23, id_start=100_000)
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="cleftwise.storage.db.sqlite"):
            bulk.upsert_many(small)
        assert "bulk load" not in caplog.text
        expected = pd.concat([expected, small], ignore_index=True)
        assert_same_records(bulk.query(), expected)
        _sqlite_consistent(bulk)
        _assert_roi_queries(bulk, expected, seed=3)


def test_sqlite_chunked_writes_without_bulk_path(tmp_path):
    df = make_records(230, seed=24)
    with open_store(str(tmp_path / "c.db"), batch_size=50, bulk_min_rows=0) as s:
        assert s.upsert_many(df) == 230  # five transactions of <= 50 rows
        s.upsert_many(df.iloc[100:].assign(score_union=0.5))
        expected = pd.concat([df.iloc[:100], df.iloc[100:].assign(score_union=0.5)], ignore_index=True)
        assert_same_records(s.query(), expected)
        _sqlite_consistent(s)
        _assert_roi_queries(s, expected, seed=6)


def test_sqlite_bulk_block_rewrite_is_idempotent(tmp_path, caplog):
    with open_store(str(tmp_path / "b.db"), bulk_min_rows=100) as s:
        s.upsert_many(make_records(60, seed=1, id_start=1), block_id=1)  # ordinary path
        big = make_records(400, seed=2, id_start=1000)
        with caplog.at_level(logging.DEBUG, logger="cleftwise.storage.db.sqlite"):
            s.upsert_many(big, block_id=2)                      # 400 >= 60 stored: bulk
            s.upsert_many(big, block_id=2)                      # same again (460 > 400: ordinary)
        assert caplog.text.count("R*Tree packed: True") == 1
        assert s.count() == 460 and s.block_ids() == [1, 2]
        _sqlite_consistent(s)
        # the block rewritten by a bulk load: 200 records gone, 300 new ones
        new = pd.concat([big.iloc[200:], make_records(300, seed=3, id_start=5000)], ignore_index=True)
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="cleftwise.storage.db.sqlite"):
            s.upsert_many(new, block_id=2)                      # 500 >= 460 stored: bulk
        assert "R*Tree packed: True" in caplog.text
        assert s.count() == 560 and s.get(big["id"].iloc[:200]).empty
        assert_same_records(s.query(block_id=2), new.assign(block_id=pd.array([2] * 500, dtype="Int64")))
        everything = ((-1e9, -1e9, -1e9), (1e9, 1e9, 1e9))
        assert s.count(roi=everything) == 560
        _sqlite_consistent(s)
        expected = pd.concat([make_records(60, seed=1, id_start=1), new], ignore_index=True)
        _assert_roi_queries(s, expected, seed=4)


def test_sqlite_bulk_load_while_a_query_is_open(tmp_path, caplog):
    with open_store(str(tmp_path / "o.db"), bulk_min_rows=100) as s:
        first = make_records(150, seed=5)
        s.upsert_many(first)
        batches = s.iter_query(roi=((0, 0, 0), (2000, 4000, 4000)), batch_size=20)
        got = [next(batches)]  # a paused R*Tree query holds nodes in SQLite's R*Tree cache
        more = make_records(300, seed=6, id_start=10_000)
        with caplog.at_level(logging.DEBUG, logger="cleftwise.storage.db.sqlite"):
            s.upsert_many(more)  # bulk, but indexes and R*Tree are written through SQL
        assert "R*Tree packed: False" in caplog.text
        got += list(batches)
        assert {i for b in got for i in b["id"]} >= set(first["id"])
        _sqlite_consistent(s)
        expected = pd.concat([first, more], ignore_index=True)
        assert_same_records(s.query(), expected)
        _assert_roi_queries(s, expected, seed=5)


@pytest.mark.skipif(not hasattr(sqlite3.Connection, "setconfig"), reason="needs Python >= 3.12 (setconfig)")
def test_sqlite_bulk_load_with_protected_shadow_tables(tmp_path, caplog):
    with open_store(str(tmp_path / "d.db"), bulk_min_rows=100) as s:
        s._conn.setconfig(sqlite3.SQLITE_DBCONFIG_DEFENSIVE, True)
        df = make_records(300, seed=7)
        with caplog.at_level(logging.DEBUG, logger="cleftwise.storage.db.sqlite"):
            s.upsert_many(df, block_id=3)
        assert "R*Tree packed: False" in caplog.text
        assert_same_records(s.query(), df.assign(block_id=pd.array([3] * 300, dtype="Int64")))
        _sqlite_consistent(s)


def test_sqlite_retries_when_locked(tmp_path):
    path = tmp_path / "busy.db"
    open_store(str(path)).close()
    locked, release = threading.Event(), threading.Event()

    def holder():
        con = sqlite3.connect(path, isolation_level=None)
        con.execute("BEGIN IMMEDIATE")
        locked.set()
        release.wait(5)
        con.execute("COMMIT")
        con.close()

    t = threading.Thread(target=holder)
    t.start()
    locked.wait(5)
    with open_store(str(path), timeout_s=0.02, retries=12) as s:
        threading.Timer(0.3, release.set).start()
        assert s.upsert_many(make_records(20)) == 20  # waits through SQLITE_BUSY retries
        assert s.count() == 20
    t.join()
    # a lock that outlives every retry is a StorageError, not a hang
    locked.clear(), release.clear()
    t = threading.Thread(target=holder)
    t.start()
    locked.wait(5)
    try:
        with open_store(str(path), timeout_s=0.02, retries=1) as s:
            with pytest.raises(StorageError, match="locked|busy"):
                s.upsert_many(make_records(5, id_start=500))
    finally:
        release.set()
        t.join()


def _writer(path, worker, n_workers, errors):
    try:
        with open_store(f"sqlite:///{path}", timeout_s=10) as db:
            for b in range(worker, 12, n_workers):      # own blocks, interleaved
                db.upsert_many(make_records(60, seed=b, id_start=b * 1000), block_id=b)
                # shared blocks 100 and 101, rewritten by every worker with the same content
                shared = 100 + b % 2
                db.upsert_many(make_records(40, seed=shared, id_start=shared * 1000), block_id=shared)
            db.upsert_many(make_records(30, seed=77, id_start=77_000))  # same ids from every worker
    except Exception as e:  # pragma: no cover - reported to the parent
        errors.put(f"worker {worker}: {e!r}")


def test_sqlite_concurrent_writers_from_four_processes(tmp_path):
    path = str(tmp_path / "conc.db")  # not created yet: the workers race to create it too
    ctx = mp.get_context("fork")
    errors = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(path, w, 4, errors)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    assert errors.empty(), errors.get()
    expected = pd.concat([make_records(60, seed=b, id_start=b * 1000).assign(block_id=b) for b in range(12)]
                         + [make_records(40, seed=s, id_start=s * 1000).assign(block_id=s) for s in (100, 101)]
                         + [make_records(30, seed=77, id_start=77_000)], ignore_index=True)
    expected["block_id"] = expected["block_id"].astype("Int64")
    with open_store(path) as db:
        got = db.query()
        assert len(got) == len(expected) == 12 * 60 + 80 + 30
        assert got["id"].is_unique
        assert_same_records(got, expected)
        assert db.block_ids() == list(range(12)) + [100, 101]
        rtree = db._conn.execute("SELECT COUNT(*) FROM synapses_rtree").fetchone()[0]
        assert rtree == len(expected)


# --------------------------------------------------------------------------- MongoDB specifics
def test_unreachable_mongodb_fails_fast():
    t = time.monotonic()
    with pytest.raises(StorageError, match=r"127\.0\.0\.1:1"):
        open_store("mongodb://127.0.0.1:1/db", timeout_s=1.0)
    assert time.monotonic() - t < 4.0


def test_mongodb_url_errors_and_foreign_collection():
    import mongomock

    with pytest.raises(StorageError, match="names no database"):
        open_store("mongodb://127.0.0.1:1", timeout_s=0.2, client=mongomock.MongoClient())
    client = mongomock.MongoClient()
    client["lab"]["synapses"].insert_one({"_id": 1, "note": "someone else's data"})
    with pytest.raises(StorageError, match="foreign"):
        open_store("mongomock://lab", client=client)
    with pytest.raises(StorageError, match="no synapse database"):
        open_store("mongomock://lab", client=client, collection="other", create=False)
    # a mongomock:// URL without a client shares one in-memory server per process
    name = f"shared{uuid.uuid4().hex[:8]}"
    with open_store(f"mongomock://{name}") as a:
        a.upsert_many(make_records(4))
    with open_store(f"mongomock://{name}", create=False) as b:
        assert b.count() == 4


def test_mongodb_password_is_redacted():
    from cleftwise.storage.db.urls import redact

    assert redact("mongodb://alice:s3cret@db.example:27017/x") == "mongodb://alice:***@db.example:27017/x"


def test_docs_list_every_schema_column():
    from cleftwise.storage.db.schema import FLAG_NAMES

    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "synapse_db.md")).read()
    table = {line.split("|")[1].strip().strip("`") for line in doc.splitlines()
             if line.startswith("| `")}
    assert set(COLUMN_NAMES) <= table
    assert f"Schema (version {SCHEMA_VERSION})" in doc
    assert all(f"`{f}`" in doc for f in FLAG_NAMES)


@pytest.mark.parametrize("wc", [0, "majority", {"w": 1, "j": True}])
def test_mongodb_write_concerns_still_upsert(wc):
    import mongomock

    with open_store("mongomock://wc", client=mongomock.MongoClient(), write_concern=wc) as s:
        recs = make_records(30, seed=9)
        s.upsert_many(recs)
        s.upsert_many(recs.assign(score_union=0.5))  # same ids again: replaced, not duplicated
        got = s.query()
        assert len(got) == 30 and (got["score_union"] == 0.5).all()
    with pytest.raises(StorageError, match="write_concern"):
        open_store("mongomock://wc", client=mongomock.MongoClient(), write_concern=1.5)
