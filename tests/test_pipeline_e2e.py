"""The whole pipeline (predict → segment → partners → classify → connectome) with the shipped
weights on a small synthetic volume: a second run does no work and leaves the DB and exports
byte-identical; kill -9 during segment and during classify, then resume, gives identical
outputs; the ray and daisy backends give the same signed graph; bad configs fail before work."""

import filecmp
import json
import os
import shutil
import subprocess
import sys
import textwrap

import networkx as nx
import numpy as np
import pandas as pd
import pytest
import yaml

from cleftwise.postprocess.demo import DEMO_STRIDE, DEMO_THRESHOLD
from cleftwise.postprocess.pipeline import STAGES, parse_config, pipeline_status, run_pipeline
from cleftwise.postprocess.errors import PostprocessError
from cleftwise.storage.db import open_store
from cleftwise.storage.synthetic import SyntheticConfig, generate_volume

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS = os.path.join(REPO, "models", "weights")
BLOCK = [8, 64, 64]


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    d = tmp_path_factory.mktemp("e2e")
    cfg = SyntheticConfig(shape=(24, 256, 256), seed=11, chunk_shape=(8, 64, 64))
    return generate_volume(cfg, str(d / "syn.zarr"))


def _conf(volume, out, backend="local", workers=1, predictions=None) -> dict:
    conf = {"raw": volume.datasets["raw"], "neurons": volume.datasets["neurons"], "output_dir": str(out),
            "backend": {"backend": backend, "workers": workers, "progress": False},
            "predict": {"checkpoint": os.path.join(WEIGHTS, "rsunet_polarity.pt"), "block_shape": [24, 256, 256],
                        "batch_size": 2, "stride": list(DEMO_STRIDE)},
            "segment": {"block_shape": BLOCK, "min_size": 300, "threshold": DEMO_THRESHOLD},
            "partners": {"partner_rule": "contrast"},
            "classify": {"checkpoint": os.path.join(WEIGHTS, "ei_vgg3d.pt"), "block_shape": BLOCK}}
    if predictions:
        conf["segment"]["predictions"] = predictions
    return conf


def _outputs(out) -> dict:
    """Everything a user keeps: DB records and the exported graph files."""
    cfg_db = f"sqlite:///{os.path.join(str(out), 'synapses.db')}"
    with open_store(cfg_db) as store:
        db = store.query()
    return {"db": db, "graph": sorted(os.listdir(os.path.join(str(out), "graph")))}


def _same_outputs(a, b) -> None:
    x, y = _outputs(a), _outputs(b)
    pd.testing.assert_frame_equal(x["db"], y["db"])
    assert x["graph"] == y["graph"]
    for name in ("edges.csv", "nodes.csv", "edges.parquet", "nodes.parquet", "graph.graphml", "adjacency.npz"):
        if name in x["graph"]:
            assert filecmp.cmp(os.path.join(str(a), "graph", name), os.path.join(str(b), "graph", name),
                               shallow=False), name


@pytest.fixture(scope="module")
def full_run(volume, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "out"
    cfg = parse_config(_conf(volume, out))
    summary = run_pipeline(cfg)
    return cfg, summary


def test_every_stage_then_second_run_does_no_work(full_run):
    cfg, summary = full_run
    assert list(summary["stages"]) == list(STAGES)
    n = summary["stages"]["partners"]["synapses_in_db"]
    assert n >= 2, "the shipped weights find synapses in the synthetic volume"
    db = _outputs(cfg.output_dir)["db"]
    assert db["ei_prob"].notna().all() and set(db["ei_label"]) <= {"E", "I"}
    assert (db["classifier"].str.startswith("vgg3d:")).all()
    nodes = pd.read_parquet(os.path.join(cfg.output_dir, "graph", "nodes.parquet"))
    assert (nodes["sign"] != 0).any(), "classified synapses give signed presynaptic neurons"
    conn = summary["stages"]["connectome"]
    assert conn["signed_neurons"] == int((nodes["sign"] != 0).sum()) <= conn["signed_presynaptic"]

    before = {f: open(os.path.join(cfg.output_dir, "graph", f), "rb").read()
              for f in os.listdir(os.path.join(cfg.output_dir, "graph")) if os.path.isfile(
                  os.path.join(cfg.output_dir, "graph", f))}
    db_before = db
    again = run_pipeline(cfg)
    for stage in ("partners", "classify"):
        assert again["stages"][stage]["processed"] == 0, stage
    for stage in ("predict", "segment"):  # multi-pass stages: one report per pass
        assert all(r["processed"] == 0 for r in again["stages"][stage]), stage
    pd.testing.assert_frame_equal(db_before, _outputs(cfg.output_dir)["db"])
    for f, data in before.items():
        assert open(os.path.join(cfg.output_dir, "graph", f), "rb").read() == data, f
    status = pipeline_status(cfg)
    assert status["classify"]["remaining"] == 0 and status["synapse_db"]["classified"] == len(db)


def test_exports_round_trip(full_run):
    cfg, _ = full_run
    g = os.path.join(cfg.output_dir, "graph")
    edges = pd.read_parquet(os.path.join(g, "edges.parquet"))
    graph = nx.read_graphml(os.path.join(g, "graph.graphml"))
    assert graph.number_of_edges() == len(edges)
    from scipy import sparse

    adj = sparse.load_npz(os.path.join(g, "adjacency.npz"))
    assert adj.nnz == len(edges)
    assert np.isclose(abs(adj).sum(), edges["weight"].abs().sum())


_KILL = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    import cleftwise.blockwise.runner as runner

    real = runner.process_block_with_ledger
    seen = [0]

    def killing(fn, block, ledger, max_retries, **kw):
        if {task!r} in str(ledger.path):
            fn(block)                      # the block's output is written ...
            seen[0] += 1
            if seen[0] == {after}:         # ... but the ledger never hears of it
                os.kill(os.getpid(), signal.SIGKILL)
        return real(fn, block, ledger, max_retries, **kw)

    runner.process_block_with_ledger = killing
    sys.argv = ["predict_volume.py", "--config", sys.argv[1], "--stages", sys.argv[2], "--no-progress"]
    from cleftwise.launch.predict_volume import main
    sys.exit(main())
""")


@pytest.mark.parametrize("task,after", [("segment_label", 7), ("classify", 3)])
def test_kill9_then_resume_gives_identical_outputs(full_run, volume, tmp_path, task, after):
    cfg, _ = full_run
    out = tmp_path / "out"
    conf = _conf(volume, out, predictions=cfg.predictions_url)  # predictions of the full run
    conf_path = tmp_path / "pipeline.yaml"
    conf_path.write_text(yaml.safe_dump(conf))
    script = tmp_path / "killed.py"
    script.write_text(_KILL.format(repo=REPO, task=task, after=after))
    stages = "segment,partners,classify,connectome"
    proc = subprocess.run([sys.executable, str(script), str(conf_path), stages], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == -9, proc.stderr[-3000:]
    resumed = subprocess.run([sys.executable, os.path.join(REPO, "launch", "predict_volume.py"), "--config",
                              str(conf_path), "--stages", stages, "--no-progress"],
                             capture_output=True, text=True, timeout=300, cwd=REPO)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads(open(out / "run_summary.json").read())
    first = summary["stages"]["segment"][0] if task == "segment_label" else summary["stages"]["classify"]
    assert first["resumed"] and first["skipped"] >= after - 1
    _same_outputs(cfg.output_dir, out)


def test_ray_and_daisy_give_the_same_signed_graph(full_run, volume, tmp_path, ray_cluster):
    cfg, _ = full_run
    for backend in ("ray", "daisy"):
        out = tmp_path / backend
        c = parse_config(_conf(volume, out, backend=backend, workers=2, predictions=cfg.predictions_url))
        run_pipeline(c, stages=("segment", "partners", "classify", "connectome"))
        _same_outputs(cfg.output_dir, out)


def test_bad_configs_fail_before_any_work(volume, tmp_path):
    out = tmp_path / "bad"
    with pytest.raises(PostprocessError, match="unknown"):
        parse_config({**_conf(volume, out), "segmnt": {}})
    conf = _conf(volume, out)
    conf["classify"]["checkpoint"] = str(tmp_path / "missing.pt")
    with pytest.raises(Exception, match="missing.pt"):
        run_pipeline(parse_config(conf), stages=("classify",))
    # a neuron segmentation on another voxel grid is refused by name
    from cleftwise.storage.volume import create_volume

    seg = create_volume(str(tmp_path / "seg.zarr" / "neurons"), shape=(24, 128, 128), voxel_size=(40, 8, 8),
                        dtype="uint64", chunk_shape=(8, 32, 32))
    conf = _conf(volume, out)
    conf["neurons"] = seg.url
    with pytest.raises(Exception, match="voxel size"):
        run_pipeline(parse_config(conf), stages=("segment", "partners"))
    assert not os.path.exists(out / "synapses.db")


def test_figures_of_a_run(full_run, tmp_path):
    import imageio.v3 as iio

    from cleftwise.postprocess.figures import run_figures

    cfg, _ = full_run
    written = run_figures(cfg.output_dir, cfg.raw, cfg.db_url, str(tmp_path))
    assert set(written) == {"montage", "adjacency"}
    for path in written.values():
        img = iio.imread(path)
        assert img.ndim == 3 and img.shape[0] > 200 and img.std() > 10  # a drawn picture, not blank


def test_demo_command(tmp_path):
    """`predict_volume.py --demo` (small volume): every stage, scored summary, figures; a re-run
    resumes and reports the same scores."""
    cmd = [sys.executable, os.path.join(REPO, "launch", "predict_volume.py"), "--demo", "--demo-dir",
           str(tmp_path / "demo"), "--demo-shape", "24", "256", "256", "--demo-seed", "3", "--no-progress"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert first.returncode == 0, first.stderr[-3000:]
    assert "synapses:" in first.stdout and "E/I: accuracy" in first.stdout
    summary = json.loads((tmp_path / "demo" / "demo_summary.json").read_text())
    assert summary["synapses_true"] >= 1 and summary["synapses_found"] >= 1
    assert 0.0 <= summary["precision"] <= 1.0 and summary["tp"] + summary["fn"] == summary["synapses_true"]
    assert set(summary["figures"]) == {"montage", "adjacency"}
    parse_config(yaml.safe_load((tmp_path / "demo" / "pipeline.yaml").read_text()))  # a real, valid config
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert again.returncode == 0, again.stderr[-3000:]
    redo = json.loads((tmp_path / "demo" / "demo_summary.json").read_text())
    assert (redo["f1"], redo["synapses_found"]) == (summary["f1"], summary["synapses_found"])
    assert redo["seconds"]["stages"]["predict"] < summary["seconds"]["stages"]["predict"]


def test_changing_only_the_partner_rule_reruns_partners_and_later_stages(full_run, volume):
    """Each stage owns its config: a new partner rule re-runs partners, classify and connectome
    from scratch, never predict or segment; going back gives the first run's DB again.
    (Last test of the module: it changes the shared run's outputs.)"""
    cfg, _ = full_run
    out = cfg.output_dir
    db_first = _outputs(out)["db"]
    seg_job = os.path.join(out, "segment", "ledger", "segment_relabel", "job.json")
    seg_stamp = os.stat(seg_job).st_mtime_ns
    conf = _conf(volume, out)
    conf["partners"]["partner_rule"] = "majority"
    summary = run_pipeline(parse_config(conf))
    st = summary["stages"]
    assert all(r["processed"] == 0 for r in st["predict"])  # pass 1 and the blend pass
    assert all(r["processed"] == 0 for r in st["segment"])
    assert st["partners"]["processed"] == st["partners"]["total"]
    assert os.stat(seg_job).st_mtime_ns == seg_stamp, "the segmentation was not touched"
    with open(os.path.join(out, "partners", "ledger", "partners", "job.json")) as f:
        assert json.load(f)["settings"]["partner_rule"] == "majority"
    db_majority = _outputs(out)["db"]
    # the DB is rewritten iff the two rules give other partners on these votes, and classify
    # runs again iff the records were rewritten
    import glob

    from cleftwise.postprocess.partners import merge_partner_votes

    votes = [pd.read_parquet(f) for f in sorted(glob.glob(os.path.join(out, "partners", "votes", "*.parquet")))]
    cols = ["id", "pre_neuron", "post_neuron", "pre_confidence", "post_confidence"]
    differ = not merge_partner_votes(votes, rule="majority")[cols].equals(
        merge_partner_votes(votes, rule="contrast")[cols])
    assert st["partners"]["rewrote"] == differ
    assert st["classify"]["processed"] == (st["classify"]["total"] if differ else 0)
    assert len(db_majority) == len(db_first) and db_majority["ei_prob"].notna().all()
    # back to the first rule: the first run's records, E/I calls included
    run_pipeline(parse_config(_conf(volume, out)))
    pd.testing.assert_frame_equal(_outputs(out)["db"], db_first)
