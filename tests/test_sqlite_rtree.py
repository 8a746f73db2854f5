"""Packed R*Tree bulk loading (storage.sqlite_rtree) against SQLite's own R*Tree module."""

import sqlite3

import numpy as np
import pytest

from cleftwise.storage.db import sqlite_rtree as R


def _tree(con, name="t"):
    con.execute(f"CREATE VIRTUAL TABLE {name} USING rtree(id, z0, z1, y0, y1, x0, x1)")
    return R.node_size(con, name)


def _boxes(rng, n, ext=(10_000.0, 100_000.0, 100_000.0)):
    c = rng.uniform(0, 1, (n, 3)) * ext
    half = rng.uniform(40, 300, (n, 3))
    lo, hi = R.round_outwards_f32(c - half, c + half)
    b = np.empty((n, 6), np.float32)
    b[:, 0::2], b[:, 1::2] = lo, hi
    return b


def _search(con, q0, q1, name="t"):
    sql = f"SELECT id FROM {name} WHERE z1 >= ? AND z0 <= ? AND y1 >= ? AND y0 <= ? AND x1 >= ? AND x0 <= ?"
    return {r[0] for r in con.execute(sql, [float(v) for pair in zip(q0, q1) for v in pair])}


def test_round_outwards_contains_and_is_tight():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1e6, 5000), [0.1, -0.1, 1e-40, 3.0, -2.5, 1 / 3]])
    lo, hi = R.round_outwards_f32(x, x)
    assert lo.dtype == hi.dtype == np.float32
    assert np.all(lo.astype(np.float64) <= x) and np.all(hi.astype(np.float64) >= x)
    # one float32 step further would no longer contain x
    assert np.all(np.nextafter(lo, np.float32(np.inf)).astype(np.float64) > x)
    assert np.all(np.nextafter(hi, np.float32(-np.inf)).astype(np.float64) < x)
    exact = np.array([3.0, -2.5, 0.0])
    assert np.array_equal(R.round_outwards_f32(exact, exact)[0], exact.astype(np.float32))


@pytest.mark.parametrize("fill", [2, 7, 45])
def test_str_groups_partition_into_bounded_nodes(fill):
    rng = np.random.default_rng(1)
    b = _boxes(rng, 1000)
    order, starts = R.str_groups(b, fill)
    assert sorted(order.tolist()) == list(range(1000))
    sizes = np.diff(starts)
    assert sizes.min() >= 1 and sizes.max() <= fill
    assert len(sizes) <= 1.5 * np.ceil(1000 / fill) + 10  # few partial nodes
    # tiles are compact: mean node extent far below the volume's
    ext = [np.ptp(b[order[s:e], 2]) for s, e in zip(starts[:-1], starts[1:])]
    assert np.mean(ext) < 0.25 * np.ptp(b[:, 2])


@pytest.mark.parametrize("n", [0, 1, 51, 52, 700, 6000])
def test_packed_tree_is_valid_and_answers_like_brute_force(n):
    rng = np.random.default_rng(n)
    con = sqlite3.connect(":memory:", isolation_level=None)
    node_bytes = _tree(con)
    b = _boxes(rng, n)
    ids = rng.permutation(10 * n + 10)[:n].astype(np.int64) + 2 ** 40  # large, unordered ids
    con.execute("BEGIN")
    R.clear_rtree(con, "t", node_bytes)
    tree = R.pack_rtree(ids, b, node_bytes)
    R.write_packed(con, "t", tree)
    con.execute("COMMIT")
    assert con.execute("SELECT rtreecheck('t')").fetchone()[0] == "ok"
    assert tree.depth == (0 if n <= 51 else 1 if n <= 51 * 45 else 2)
    got_ids, got_b = R.read_entries(con, "t", 6)
    o, g = np.argsort(ids), np.argsort(got_ids)
    assert np.array_equal(ids[o], got_ids[g]) and np.array_equal(b[o], got_b[g])
    for k in range(10):
        q0 = rng.uniform(0, 1, 3) * [8000, 80_000, 80_000]
        q1 = q0 + rng.uniform(0.05, 0.5, 3) * [10_000, 100_000, 100_000]
        hit = np.all((b[:, 1::2] >= q0) & (b[:, 0::2] <= q1), axis=1)
        assert _search(con, q0, q1) == set(ids[hit].tolist())
    # SQLite keeps maintaining the packed tree: inserts, replacements, deletes
    extra = _boxes(rng, 300)
    con.execute("BEGIN")
    con.executemany("INSERT OR REPLACE INTO t VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(i, *map(float, r)) for i, r in zip(range(1, 301), extra)])
    con.executemany("DELETE FROM t WHERE id = ?", [(int(i),) for i in ids[: n // 2]])
    con.execute("COMMIT")
    assert con.execute("SELECT rtreecheck('t')").fetchone()[0] == "ok"
    assert con.execute("SELECT COUNT(*) FROM t").fetchone()[0] == n - n // 2 + 300


def test_packing_degenerate_boxes_and_points():
    con = sqlite3.connect(":memory:", isolation_level=None)
    node_bytes = _tree(con)
    pts = np.zeros((500, 6), np.float32)  # every box the same point
    pts[250:, 4:] = 7.0                   # half of them elsewhere along x only
    ids = np.arange(500, dtype=np.int64)
    R.write_packed(con, "t", R.pack_rtree(ids, pts, node_bytes))
    assert con.execute("SELECT rtreecheck('t')").fetchone()[0] == "ok"
    assert _search(con, (0, 0, 0), (0, 0, 0)) == set(range(250))
    assert _search(con, (-1, -1, 6), (1, 1, 8)) == set(range(250, 500))


def test_query_frames_without_the_private_pandas_helper(tmp_path, monkeypatch):
    """Reads build the same DataFrame when pandas' private row helper is unavailable."""
    import pandas as pd

    import cleftwise.storage.db.sqlite as sq
    from cleftwise.storage.db import open_store
    from tests.test_synapse_db import make_records

    with open_store(f"sqlite:///{tmp_path}/s.db") as store:
        store.upsert_many(make_records(200, seed=3))
        fast = store.query()
        monkeypatch.setattr(sq, "_to_object_array_tuples", None)
        slow = store.query()
    pd.testing.assert_frame_equal(fast, slow)
