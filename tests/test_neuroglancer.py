"""Neuroglancer: our precomputed annotations read back by the ``neuroglancer`` package's own
reader (by id, by related segment, by spatial query), and ``cleftwise view`` (state + server)."""

import json
import os
import re
import subprocess
import sys
import threading
import urllib.request

import numpy as np
import pandas as pd
import pytest

ng = pytest.importorskip("neuroglancer", reason="test dependency: pip install neuroglancer==2.41.2")
from neuroglancer.read_precomputed_annotations import AnnotationReader  # noqa: E402

from cleftwise.storage.ng_annotations import write_synapse_annotations  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIG = 2**40 + 7  # a neuron id above 2^32: must survive as uint64


def _synapses(n=240, seed=0) -> pd.DataFrame:
    """Synapse records over a 2000 × 4000 × 4000 nm box; a few autapses, low scores and a
    background partner among them."""
    rng = np.random.default_rng(seed)
    c = np.column_stack([rng.uniform(0, 2000, n), rng.uniform(0, 4000, n), rng.uniform(0, 4000, n)]).round(1)
    pre = rng.choice([BIG, 3, 2**33 + 1], n).astype(np.int64)
    post = rng.choice([5, 6, 2**35 + 9], n).astype(np.int64)
    post[:4] = pre[:4]  # autapses
    post[4] = 0  # background
    score = rng.uniform(0.2, 1.0, n)
    score[5:12] = 0.1  # below --min-score
    ei = rng.uniform(0, 1, n)
    ei[12:20] = np.nan
    return pd.DataFrame({
        "id": np.arange(1, n + 1, dtype=np.int64) * 1000003 + 2**34, "z": c[:, 0], "y": c[:, 1], "x": c[:, 2],
        "pre_z": c[:, 0] - 20, "pre_y": c[:, 1] + 8, "pre_x": c[:, 2], "post_z": c[:, 0] + 20,
        "post_y": c[:, 1] - 8, "post_x": c[:, 2] + 4, "size": rng.integers(50, 100000, n),
        "score_union": score, "pre_conf": rng.uniform(0.5, 1, n), "post_conf": rng.uniform(0.5, 1, n),
        "pre_neuron": pre, "post_neuron": post, "ei_prob": ei,
        "flags": np.where(np.arange(n) % 7 == 0, "pre_tie", "")})


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Synapses in a real SQLite DB, exported by the export command with --min-score."""
    from cleftwise.launch import export_graph as cli
    from cleftwise.storage.db import open_store

    tmp = tmp_path_factory.mktemp("ng")
    url = f"sqlite:///{tmp}/s.db"
    with open_store(url) as store:
        store.upsert_many(_synapses())
    assert cli.main(["--db", url, "--out", str(tmp / "g"), "--format", "neuroglancer,csv",
                     "--min-score", "0.3"]) == 0
    with open_store(url) as store:
        db = store.query()
    return tmp / "g" / "annotations", db


def test_annotations_by_id_match_the_db_and_filters(exported):
    path, db = exported
    r = AnnotationReader(f"file://{path}")
    assert r.annotation_type == "line"
    types = {p.id: p.type for p in r.properties}
    assert types == {"size": "uint32", "score_union": "float32", "pre_conf": "float32", "post_conf": "float32",
                     "ei_prob": "float32", "flag_bits": "uint16", "ei_sign": "int8"}
    assert not any("neuron" in p for p in types)  # ids are relationships, not properties
    assert list(r.relationships) == ["pre_neuron", "post_neuron"]
    keep = ((db["score_union"] >= 0.3) & (db["pre_neuron"] != db["post_neuron"]) &
            (db["pre_neuron"] != 0) & (db["post_neuron"] != 0))
    assert 0 < keep.sum() < len(db) - 10
    for rec in db[~keep].itertuples():
        assert int(rec.id) not in r.by_id, "filtered synapse exported"
    names = [p.id for p in r.properties]
    for rec in db[keep].itertuples():
        a = r.by_id[int(rec.id)]
        assert a.id == str(rec.id)
        np.testing.assert_array_equal(a.point_a, np.float32([rec.pre_z, rec.pre_y, rec.pre_x]))
        np.testing.assert_array_equal(a.point_b, np.float32([rec.post_z, rec.post_y, rec.post_x]))
        props = dict(zip(names, a.props))
        assert props["size"] == rec.size and props["score_union"] == np.float32(rec.score_union)
        if np.isnan(rec.ei_prob):
            assert np.isnan(props["ei_prob"]) and props["ei_sign"] == 0
        else:
            assert props["ei_sign"] == (1 if rec.ei_prob >= 0.5 else -1)
        assert props["flag_bits"] == (8 if rec.flags == "pre_tie" else 0)
        assert [list(map(int, s)) for s in a.segments] == [[rec.pre_neuron], [rec.post_neuron]]


def test_annotations_by_related_segment_above_2_32(exported):
    path, db = exported
    r = AnnotationReader(f"file://{path}")
    keep = db[(db["score_union"] >= 0.3) & (db["pre_neuron"] != db["post_neuron"]) & (db["post_neuron"] != 0)]
    for rel, col in (("pre_neuron", "pre_neuron"), ("post_neuron", "post_neuron")):
        for seg in (BIG, 2**33 + 1, 2**35 + 9, 5):
            want = set(keep.loc[keep[col] == seg, "id"].astype(int))
            if not want:
                assert seg not in r.relationships[rel]
                continue
            got = r.relationships[rel][seg]
            assert {int(a.id) for a in got} == want, (rel, seg)
    assert len(r.relationships["pre_neuron"][BIG]) > 10


def test_annotations_spatial_index_levels_and_query(tmp_path):
    syn = _synapses(n=600, seed=1)
    # points: the reader checks point bounds exactly, so a sub-box query is an exact test
    path = tmp_path / "pts"
    write_synapse_annotations(syn, str(path), kind="point", limit=40)
    r = AnnotationReader(f"file://{path}")
    assert len(r.metadata["spatial"]) >= 3, "600 annotations at limit 40 need several levels"
    for level in r.metadata["spatial"]:
        assert np.allclose(np.array(level["grid_shape"]) * level["chunk_size"],
                           np.subtract(r.upper_bound, r.lower_bound))
        for f in os.listdir(path / level["key"]):
            n = int(np.frombuffer(open(path / level["key"] / f, "rb").read(8), "<u8")[0])
            assert n <= level["limit"]
    everything = [a.id for a in r.get_within_spatial_bounds()]
    assert sorted(map(int, everything)) == sorted(syn["id"])  # each exactly once over the levels
    lo, hi = np.array([300.0, 1000.0, 500.0]), np.array([1500.0, 2600.0, 3100.0])
    got = {int(a.id) for a in r.get_within_spatial_bounds(lower_bound=lo, upper_bound=hi)}
    c = syn[list("zyx")].to_numpy(np.float32)
    assert got == set(syn.loc[((c >= lo) & (c <= hi)).all(axis=1), "id"])
    # lines: every annotation is in the cells its box crosses (the reader's own line bounds
    # check is inexact, so the whole-volume query is the test here)
    lines = AnnotationReader(f"file://{write_synapse_annotations(syn, str(tmp_path / 'lines'), limit=40)}")
    assert {int(a.id) for a in lines.get_within_spatial_bounds()} == set(syn["id"])


# -- cleftwise view ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run's output folder: raw and neurons outside it (as a config names them), predictions,
    labels and exported annotations inside, and the run summary naming the inputs."""
    from cleftwise.storage.volume import create_volume

    tmp = tmp_path_factory.mktemp("view")
    out = tmp / "out"
    raw = create_volume(str(tmp / "data.zarr" / "raw"), (8, 32, 32), (40, 8, 8), offset=(80, 16, 0))
    raw.write(raw.roi, np.arange(8 * 32 * 32, dtype=np.uint8).reshape(8, 32, 32))
    neurons = create_volume(str(tmp / "data.zarr" / "neurons"), (8, 32, 32), (40, 8, 8), offset=(80, 16, 0),
                            dtype="uint64")
    neurons.write(neurons.roi, np.full((8, 32, 32), BIG, np.uint64))
    pred = create_volume(str(out / "predictions.zarr" / "pred"), (8, 32, 32), (40, 8, 8), offset=(80, 16, 0),
                         num_channels=3)
    pred.write(pred.roi, np.zeros((3, 8, 32, 32), np.uint8))
    labels = create_volume(str(out / "synapses.zarr" / "labels"), (8, 32, 32), (40, 8, 8), offset=(80, 16, 0),
                           dtype="uint64")
    labels.write(labels.roi, np.zeros((8, 32, 32), np.uint64))
    write_synapse_annotations(_synapses(20), str(out / "graph" / "annotations"))
    with open(out / "run_summary.json", "w") as f:
        json.dump({"config": {"raw": str(tmp / "data.zarr" / "raw"), "neurons": str(tmp / "data.zarr" / "neurons"),
                              "output_dir": str(out)}}, f)
    return out


def _local_file(url: str, mounts: dict) -> str:
    """The local path a state URL names on the server (prefix stripped, mount resolved)."""
    path = re.sub(r"^[a-z0-9]+://http://127\.0\.0\.1:\d+/", "", url)
    for prefix in sorted(mounts, key=len, reverse=True):
        if prefix and (path == prefix or path.startswith(prefix + "/")):
            return os.path.join(mounts[prefix], path[len(prefix):].lstrip("/"))
    return os.path.join(mounts[""], path)


def test_view_state_is_valid_and_names_existing_sources(run_dir, capsys):
    from cleftwise.launch import view

    assert view.main([str(run_dir), "--port", "9123"]) == 0
    printed = json.loads(capsys.readouterr().out)
    state = json.load(open(run_dir / view.STATE_FILE))
    assert printed == state
    parsed = ng.viewer_state.ViewerState(state)
    assert [layer.name for layer in parsed.layers] == ["raw", "predictions", "labels", "neurons", "synapses"]
    layers = {layer["name"]: layer for layer in state["layers"]}
    assert layers["synapses"]["source"].startswith("precomputed://http://127.0.0.1:9123/")
    assert layers["synapses"]["linkedSegmentationLayer"] == {"pre_neuron": "neurons", "post_neuron": "neurons"}
    assert layers["raw"]["source"]["url"].startswith("zarr://http://127.0.0.1:9123/")  # zarr v2 volumes
    # raw voxel (0, 0, 0) lies at (80, 16, 0) nm: 2 z-voxels, 2 y-voxels from the origin
    assert layers["raw"]["source"]["transform"]["matrix"] == [[1, 0, 0, 2], [0, 1, 0, 2], [0, 0, 1, 0]]
    assert list(layers["predictions"]["source"]["transform"]["outputDimensions"]) == ["c^", "z", "y", "x"]
    assert state["dimensions"] == {"z": [40e-9, "m"], "y": [8e-9, "m"], "x": [8e-9, "m"]}
    _, mounts = view.build_state(str(run_dir), "http://127.0.0.1:9123/")
    for layer in state["layers"]:
        src = layer["source"]["url"] if isinstance(layer["source"], dict) else layer["source"]
        meta = "info" if layer["type"] == "annotation" else ".zarray"
        assert os.path.isfile(os.path.join(_local_file(src, mounts), meta)), src
    assert parsed.layers["synapses"].type == "annotation"


def test_view_server_answers_with_cors(run_dir):
    from cleftwise.launch import view

    server = view.make_server({"": str(run_dir)}, 0)
    port = server.server_address[1]
    state, mounts = view.build_state(str(run_dir), f"http://127.0.0.1:{port}/")
    server.RequestHandlerClass.mounts = mounts
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        src = next(la["source"] for la in state["layers"] if la["name"] == "synapses")
        url = src[len("precomputed://"):] + "/info"
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert resp.status == 200 and resp.headers["Access-Control-Allow-Origin"] == "*"
            assert json.load(resp)["@type"] == "neuroglancer_annotations_v1"
        raw = next(la["source"]["url"] for la in state["layers"] if la["name"] == "raw")
        with urllib.request.urlopen(raw[len("zarr://"):] + "/.zarray", timeout=10) as resp:
            assert json.load(resp)["shape"] == [8, 32, 32]
        for bad in ("/../run_summary.json/x", "/graph/", "/nothing"):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(f"http://127.0.0.1:{port}{bad}", timeout=10)
            assert e.value.code == 404
        req = urllib.request.Request(url, method="OPTIONS")
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.headers["Access-Control-Allow-Origin"] == "*"
    finally:
        server.shutdown()
        server.server_close()


def test_view_serve_command(run_dir):
    p = subprocess.Popen([sys.executable, os.path.join(REPO, "launch", "view.py"), str(run_dir), "--serve", "0"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        port = None
        for line in p.stderr:
            m = re.search(r"serving .* on http://127\.0\.0\.1:(\d+)/", line)
            if m:
                port = int(m.group(1))
                break
        assert port, "no serving line"
        link = next(p.stderr).strip()
        assert link == f"open https://neuroglancer-demo.appspot.com/#!http://127.0.0.1:{port}/neuroglancer_state.json"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/neuroglancer_state.json", timeout=10) as resp:
            assert resp.headers["Access-Control-Allow-Origin"] == "*"
            state = json.load(resp)
        assert f"127.0.0.1:{port}/" in json.dumps(state)
    finally:
        p.terminate()
        p.wait(timeout=10)


def test_view_errors(tmp_path, capsys):
    from cleftwise.launch import view

    assert view.main([str(tmp_path / "missing")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert view.main([str(tmp_path)]) == 1
    assert "give --raw" in capsys.readouterr().err
