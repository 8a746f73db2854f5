"""launch/query_synapses.py: formats, filters and usage errors (SQLite database)."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from cleftwise.storage.db import open_store

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "launch", "query_synapses.py")

from cleftwise.launch import query_synapses  # noqa: E402


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "syn.db"
    rng = np.random.default_rng(0)
    n = 300
    df = pd.DataFrame({"id": np.arange(1, n + 1), "z": rng.uniform(0, 800, n),
                       "y": rng.uniform(0, 4000, n), "x": rng.uniform(0, 4000, n),
                       "score_union": rng.random(n), "pre_neuron": rng.integers(1, 6, n),
                       "post_neuron": rng.integers(1, 6, n), "flags": "", "ei_label": None})
    with open_store(f"sqlite:///{path}") as s:
        s.upsert_many(df, block_id=0)
    return f"sqlite:///{path}", df


def _expected(df, roi=None, pre=None, min_score=None):
    m = np.ones(len(df), bool)
    if roi:
        for a, (b, e) in zip("zyx", roi):
            m &= (df[a] >= b) & (df[a] < e)
    if pre is not None:
        m &= df.pre_neuron == pre
    if min_score is not None:
        m &= df.score_union >= min_score
    return df[m].sort_values("id")


def test_csv_json_parquet_outputs(db, tmp_path, capsys):
    url, df = db
    exp = _expected(df, roi=[(0, 400), (0, 2000), (1000, 4000)], min_score=0.3)
    args = ["--db", url, "--roi", "0:400,0:2000,1000:4000", "--min-score", "0.3"]
    assert query_synapses.main(args + ["--format", "csv"]) == 0
    out = pd.read_csv(pd.io.common.StringIO(capsys.readouterr().out))
    assert out["id"].tolist() == exp["id"].tolist()
    np.testing.assert_allclose(out["z"], exp["z"])

    assert query_synapses.main(args + ["--format", "json", "--columns", "z,pre_neuron"]) == 0
    recs = json.loads(capsys.readouterr().out)
    assert [int(r["id"]) for r in recs] == exp["id"].tolist() and set(recs[0]) == {"id", "z", "pre_neuron"}
    assert isinstance(recs[0]["id"], str) and isinstance(recs[0]["pre_neuron"], str)  # 64-bit ids as strings

    pq = tmp_path / "sel.parquet"
    assert query_synapses.main(args + ["--out", str(pq)]) == 0  # format from the suffix
    back = pd.read_parquet(pq)
    assert back["id"].tolist() == exp["id"].tolist() and back["score_union"].min() >= 0.3

    csv = tmp_path / "pre.csv"
    assert query_synapses.main(["--db", url, "--pre", "3", "--limit", "5", "--out", str(csv)]) == 0
    assert pd.read_csv(csv)["id"].tolist() == _expected(df, pre=3)["id"].tolist()[:5]

    assert query_synapses.main(["--db", url, "--count", "--pre", "2"]) == 0
    assert int(capsys.readouterr().out) == int((df.pre_neuron == 2).sum())
    assert query_synapses.main(["--db", url, "--roi", ":,:,:", "--limit", "3"]) == 0
    table = capsys.readouterr().out
    assert "score_union" in table and len(table.strip().splitlines()) == 4


@pytest.mark.parametrize("roi", ["0:10,0:10", "a:b,0:1,0:1", "0-10,0:1,0:1", "5:1,0:1,0:1"])
def test_bad_roi_is_a_usage_error(db, roi, capsys):
    url, _ = db
    with pytest.raises(SystemExit) as e:
        query_synapses.main(["--db", url, "--roi", roi])
    assert e.value.code == 2
    assert "--roi" in capsys.readouterr().err


def test_runs_as_a_script_from_the_repo_root(db):
    url, df = db
    ok = subprocess.run([sys.executable, "launch/query_synapses.py", "--db", url, "--format", "csv",
                         "--neuron", "4"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    ids = pd.read_csv(pd.io.common.StringIO(ok.stdout))["id"].tolist()
    assert ids == df[(df.pre_neuron == 4) | (df.post_neuron == 4)]["id"].tolist()
    bad = subprocess.run([sys.executable, SCRIPT, "--db", url, "--roi", "1:2,3"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "usage:" in bad.stderr and "3 ranges" in bad.stderr


def test_missing_database_and_parquet_to_stdout(tmp_path, capsys):
    absent = tmp_path / "absent.db"
    assert query_synapses.main(["--db", f"sqlite:///{absent}"]) == 1
    assert "no synapse database" in capsys.readouterr().err and not absent.exists()
    with pytest.raises(SystemExit) as e:
        query_synapses.main(["--db", f"sqlite:///{absent}", "--format", "parquet"])
    assert e.value.code == 2
