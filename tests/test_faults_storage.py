"""Trust issue, storage side: missing chunks, outputs that would overwrite inputs, atomic
exports, read-only queries, malformed DB URLs and SQLite URL paths."""

import errno
import io
import os
import stat

import numpy as np
import pandas as pd
import pytest
import torch
from funlib.geometry import Roi

from cleftwise.launch import export_graph as export_cli
from cleftwise.launch import query_synapses
from cleftwise.postprocess.export import export_graph
from cleftwise.storage.atomic import atomic_path, check_output_path
from cleftwise.storage.db import open_store
from cleftwise.storage.db.urls import sqlite_url
from cleftwise.storage.errors import StorageError
from cleftwise.storage.ng_annotations import write_synapse_annotations
from cleftwise.storage.volume import create_volume, open_volume

VS = (40, 4, 4)


def _synapses(n=6):
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"id": np.arange(1, n + 1), "z": rng.uniform(0, 400, n),
                       "y": rng.uniform(0, 400, n), "x": rng.uniform(0, 400, n),
                       "score_union": rng.random(n), "pre_neuron": [1, 1, 2, 2, 3, 3][:n],
                       "post_neuron": [2, 3, 1, 3, 1, 2][:n], "flags": "", "ei_prob": 0.9})
    for side in ("pre", "post"):
        for a in "zyx":
            df[f"{side}_{a}"] = df[a]
    return df


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "syn.db"
    with open_store(sqlite_url(path)) as s:
        s.upsert_many(_synapses(), block_id=0)
    return path


def _files(folder):
    return sorted(os.listdir(folder))


# -- 2. missing chunks ------------------------------------------------------------------------

def _raw(url, fmt=None):
    vol = create_volume(url, shape=(8, 16, 16), voxel_size=VS, dtype="uint8", chunk_shape=(4, 8, 8),
                        format=fmt)
    vol.write(vol.roi, np.full((8, 16, 16), 7, np.uint8))
    return vol


@pytest.mark.parametrize("fmt,chunk", [("zarr", "1.1.1"), ("zarr3", "c/1/1/1"), ("n5", "1/1/1")])
def test_missing_chunk_is_an_error_unless_opted_in(tmp_path, fmt, chunk):
    url = str(tmp_path / f"in.{'zarr' if fmt != 'n5' else 'n5'}" / "raw")
    _raw(url, fmt)
    os.remove(os.path.join(url, chunk))  # the chunk z 4..8, y 8..16, x 8..16 voxels
    vol = open_volume(url)
    with pytest.raises(StorageError, match="never written or was deleted") as e:
        vol.read()
    assert url in str(e.value) and "missing='zeros'" in str(e.value)
    with pytest.raises(StorageError, match="never written"):  # the asynchronous read too
        vol.read_async(vol.roi).result()
    ok = vol.read(Roi((0, 0, 0), (160, 64, 64)))  # chunks that exist still read
    assert (ok == 7).all()
    sparse = open_volume(url, missing="zeros").read()
    assert (sparse[4:, 8:, 8:] == 0).all() and sparse.sum() == 7 * (8 * 16 * 16 - 4 * 8 * 8)
    with pytest.raises(StorageError, match="missing must be 'error' or 'zeros'"):
        open_volume(url, missing="skip")


def test_written_zero_chunks_are_stored_and_writers_read_zeros(tmp_path):
    url = str(tmp_path / "out.zarr" / "labels")
    vol = create_volume(url, shape=(8, 16, 16), voxel_size=VS, dtype="uint64", chunk_shape=(4, 8, 8))
    half = Roi((0, 0, 0), (160, 64, 64))
    assert (vol.read(half) == 0).all()  # the creating handle reads unwritten blocks as zeros
    vol.write(half, np.zeros((4, 16, 16), np.uint64))  # all-zero blocks are written, not skipped
    assert (open_volume(url).read(half) == 0).all()
    assert (open_volume(url, mode="r+").read() == 0).all()  # a writer handle: zeros
    with pytest.raises(StorageError, match="never written"):  # the unwritten half, read-only
        open_volume(url).read()


def test_predict_step_names_the_missing_raw_chunk(tmp_path):
    from cleftwise.blockwise.runner import BackendConfig, run_task
    from cleftwise.models.checkpoint import save_checkpoint
    from cleftwise.models.rsunet import RSUNetConfig, build_rsunet
    from cleftwise.postprocess.pipeline import parse_config
    from cleftwise.postprocess.stages import REGISTRY

    torch.manual_seed(0)
    cfg = RSUNetConfig(out_channels=3, filters=(4, 8, 12), anisotropic_levels=2, norm="group")
    ckpt = str(tmp_path / "model.pt")
    save_checkpoint(ckpt, build_rsunet(cfg), cfg, voxel_size=VS, extra={"patch_shape": [8, 16, 16]})
    raw = str(tmp_path / "in.zarr" / "raw")
    _raw(raw)
    os.remove(os.path.join(raw, "0.1.0"))

    def run(out, **run_opts):
        conf = {"raw": raw, "output_dir": str(tmp_path / out), **run_opts,
                "backend": {"backend": "local", "progress": False, "max_retries": 0},
                "predict": {"checkpoint": ckpt, "block_shape": [8, 16, 16], "batch_size": 4}}
        run_cfg = parse_config(conf)
        step = next(iter(REGISTRY["predict"].steps(run_cfg, run_cfg.predict)))
        assert step.cfg.missing_chunks == run_cfg.missing_chunks
        run_task(step, BackendConfig(progress=False, max_retries=0))
        return open_volume(run_cfg.predictions_url)

    with pytest.raises(Exception, match="never written") as e:
        run("job")
    assert raw in str(e.value)
    assert run("sparse", missing_chunks="zeros").read().shape == (3, 8, 16, 16)


# -- 8. outputs that are inputs ---------------------------------------------------------------

def test_query_refuses_out_equal_to_the_db(db, capsys):
    before = db.read_bytes()
    assert query_synapses.main(["--db", sqlite_url(db), "--format", "csv", "--out", str(db)]) == 1
    assert "would overwrite the input" in capsys.readouterr().err
    assert db.read_bytes() == before
    with open_store(sqlite_url(db), readonly=True) as s:
        assert s.count() == 6


def test_outputs_inside_a_volume_container_are_refused(db, tmp_path, capsys):
    create_volume(str(tmp_path / "v.zarr" / "raw"), shape=(4, 8, 8), voxel_size=VS)
    out = tmp_path / "v.zarr" / "raw" / "q.csv"
    assert query_synapses.main(["--db", sqlite_url(db), "--out", str(out)]) == 1
    assert "inside the volume container" in capsys.readouterr().err and not out.exists()
    assert export_cli.main(["--db", sqlite_url(db), "--out", str(db), "--format", "csv"]) == 1
    assert "would overwrite the input" in capsys.readouterr().err and db.is_file()
    assert export_cli.main(["--db", sqlite_url(db), "--out", str(tmp_path / "g.n5"), "--format", "csv"]) == 1
    assert "inside the volume container" in capsys.readouterr().err
    with pytest.raises(StorageError, match="would overwrite the input"):  # a folder output holding it
        check_output_path(str(tmp_path), [str(db)])
    check_output_path(str(tmp_path / "fine.csv"), [str(db)])


# -- 9. atomic exports ------------------------------------------------------------------------

def _full_disk(*args, **kwargs):
    path = next(a for a in list(args) + list(kwargs.values()) if isinstance(a, (str, os.PathLike)))
    with io.open(path, "wb") as f:  # io.open: tests patch builtins.open
        f.write(b"half a file")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("fmt,target,patch", [
    ("csv", "edges.csv", "pandas.DataFrame.to_csv"),
    ("parquet", "edges.parquet", "pandas.DataFrame.to_parquet"),
    ("graphml", "graph.graphml", "networkx.write_graphml"),
    ("npz", "adjacency.npz", "scipy.sparse.save_npz"),
])
def test_export_full_disk_leaves_no_file(tmp_path, monkeypatch, fmt, target, patch):
    import importlib

    mod, name = patch.rsplit(".", 1)
    try:
        owner = importlib.import_module(mod)
    except ImportError:
        mod, cls = mod.rsplit(".", 1)
        owner = getattr(importlib.import_module(mod), cls)
    monkeypatch.setattr(owner, name, _full_disk)
    out = tmp_path / "g"
    with pytest.raises(StorageError) as e:
        export_graph(_synapses(), str(out), [fmt])
    assert str(e.value) == f"cannot write export {out / target}: No space left on device"
    assert _files(out) == []


def test_annotations_full_disk_keeps_the_old_folder(tmp_path, monkeypatch):
    path = tmp_path / "ann"
    write_synapse_annotations(_synapses(), str(path))
    before = _files(path / "by_id")
    real_open = open

    def failing_open(p, mode="r", *a, **k):
        if "by_id" in str(p) and "w" in mode:
            _full_disk(p)
        return real_open(p, mode, *a, **k)

    monkeypatch.setattr("builtins.open", failing_open)
    with pytest.raises(StorageError, match=f"cannot write neuroglancer annotations {path}: No space"):
        write_synapse_annotations(_synapses(3), str(path))
    monkeypatch.undo()
    assert _files(tmp_path) == ["ann"] and _files(path / "by_id") == before


def test_store_export_and_query_output_full_disk(db, tmp_path, monkeypatch, capsys):
    import pyarrow.parquet as pq

    class FullWriter:
        def __init__(self, path, schema):
            _full_disk(path)

    monkeypatch.setattr(pq, "ParquetWriter", FullWriter)
    target = tmp_path / "out.parquet"
    with open_store(sqlite_url(db), readonly=True) as s, pytest.raises(StorageError) as e:
        s.export(str(target))
    assert str(e.value) == f"cannot write export {target}: No space left on device"
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, mode="r", *a, **k:
                        _full_disk(p) if ".tmp-" in str(p) else real_open(p, mode, *a, **k))
    assert query_synapses.main(["--db", sqlite_url(db), "--format", "json", "--out",
                                str(tmp_path / "q.json")]) == 1
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert f"error: cannot write query output {tmp_path / 'q.json'}: No space left on device" in err
    assert [f for f in _files(tmp_path) if not f.startswith("syn.db")] == []  # -wal/-shm of readers


def test_atomic_path_replaces_only_when_complete(tmp_path):
    target = tmp_path / "t.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(str(target)) as tmp:
            open(tmp, "w").write("new, half")
            raise RuntimeError("writer bug")
    assert target.read_text() == "old" and _files(tmp_path) == ["t.txt"]
    with atomic_path(str(target)) as tmp:
        open(tmp, "w").write("new")
    assert target.read_text() == "new" and _files(tmp_path) == ["t.txt"]


# -- 10. read-only queries --------------------------------------------------------------------

def test_query_of_a_missing_db_creates_nothing(tmp_path, capsys):
    absent = tmp_path / "sub" / "absent.db"
    assert query_synapses.main(["--db", sqlite_url(absent)]) == 1
    assert f"error: no synapse database at {absent}" in capsys.readouterr().err
    assert _files(tmp_path) == []
    empty = tmp_path / "empty.db"
    empty.touch()
    assert query_synapses.main(["--db", sqlite_url(empty), "--count"]) == 1
    assert "no synapse database" in capsys.readouterr().err and empty.stat().st_size == 0
    assert export_cli.main(["--db", sqlite_url(absent), "--out", str(tmp_path / "g")]) == 1
    assert not absent.exists()


def test_query_in_a_read_only_folder(db, monkeypatch, capsys):
    """A WAL database in a folder nobody may write to is opened immutable (mode=ro alone would
    need a -shm file beside it). Root ignores permissions, so the folder's state is simulated."""
    import sqlite3

    folder = str(db.parent)
    real_access, real_connect, uris = os.access, sqlite3.connect, []
    monkeypatch.setattr(os, "access", lambda p, m, **k: False if (p == folder and m == os.W_OK)
                        else real_access(p, m, **k))
    monkeypatch.setattr(sqlite3, "connect", lambda u, *a, **k: uris.append(u) or real_connect(u, *a, **k))
    before = _files(folder)
    assert query_synapses.main(["--db", sqlite_url(db), "--count"]) == 0
    assert capsys.readouterr().out.strip() == "6"
    assert uris[-1].endswith("?immutable=1") and _files(folder) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_query_of_a_read_only_file_and_folder(db, capsys):
    folder = db.parent
    os.chmod(db, stat.S_IRUSR | stat.S_IRGRP)
    os.chmod(folder, stat.S_IRUSR | stat.S_IXUSR)
    try:
        assert query_synapses.main(["--db", sqlite_url(db), "--count"]) == 0
        assert capsys.readouterr().out.strip() == "6"
    finally:
        os.chmod(folder, stat.S_IRWXU)
        os.chmod(db, stat.S_IRUSR | stat.S_IWUSR)


# -- 11, 12. DB URLs --------------------------------------------------------------------------

@pytest.mark.parametrize("url,shown", [
    ("mongodb://::1:27017/db", "mongodb://::1:27017/db"),
    ("mongodb://user:s3cret@::1:27017/db", "mongodb://user:***@::1:27017/db"),
    ("mongodb://user:s3cret@[::1:27017/db", "mongodb://user:***@[::1:27017/db"),
    ("mongodb://user:s3cret@host:port/db", "mongodb://user:***@host:port/db"),
])
def test_malformed_mongodb_url_is_a_storage_error(url, shown):
    pytest.importorskip("pymongo")
    with pytest.raises(StorageError, match="bad MongoDB URL") as e:
        open_store(url, timeout_s=0.1)
    assert shown in str(e.value) and "s3cret" not in str(e.value)


def test_sqlite_urls_relative_and_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open_store("sqlite:///rel.db") as s:
        assert s.path == str(tmp_path / "rel.db")
        assert s.url == f"sqlite:///{tmp_path}/rel.db"  # four slashes: absolute
    with open_store(f"sqlite:///{tmp_path}/rel.db", readonly=True) as s:
        assert s.count() == 0
    assert sqlite_url("x.db") == f"sqlite:///{tmp_path}/x.db"
    with pytest.raises(StorageError, match="bad SQLite URL 'sqlite://x.db'"):
        open_store("sqlite://x.db")
