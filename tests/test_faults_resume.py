"""Resume from every moment: the pipeline command killed with SIGKILL at each ledger and stage
boundary (deterministic crash points, :mod:`cleftwise.blockwise.crashpoints`), at a random
moment, or stopped with Ctrl-C, then run again, gives outputs byte-identical to an
uninterrupted run. Also: one run per output folder (lock), one-line errors, daisy's logs
under the job's ledger.

The command runs in processes forked from one server that has imported cleftwise once (a
fresh interpreter costs seconds of imports per run): each child is its own process, runs
``launch/predict_volume.py``'s ``main`` with the given arguments and dies by SIGKILL at its
crash point. The Ctrl-C test runs the real script in a fresh interpreter.
"""

import json
import os
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pandas as pd
import pytest
import yaml

from cleftwise.blockwise.crashpoints import ENV
from cleftwise.blockwise.filter_step import FilterConfig, FilterStep
from cleftwise.blockwise.runner import BackendConfig, run_task
from cleftwise.blockwise.stages import run_stages
from cleftwise.postprocess.demo import DEMO_STRIDE, DEMO_THRESHOLD
from cleftwise.postprocess.errors import PostprocessError
from cleftwise.postprocess.pipeline import parse_config, pipeline_status, run_pipeline
from cleftwise.postprocess.run_lock import LOCK_NAME, output_lock
from cleftwise.storage.db import open_store
from cleftwise.storage.synthetic import SyntheticConfig, generate_volume
from cleftwise.storage.volume import create_volume, open_volume
from test_stages import Run, _registry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS = os.path.join(REPO, "models", "weights")
SCRIPT = os.path.join(REPO, "launch", "predict_volume.py")
KILLED = -signal.SIGKILL

# One server process: imports the command once, then forks one child per request.
_SERVER = textwrap.dedent("""
    import json, os, signal, sys, time, traceback
    from cleftwise.launch.predict_volume import main

    for line in sys.stdin:
        job = json.loads(line)
        t0 = time.time()
        pid = os.fork()
        if pid == 0:
            code = 99
            try:
                os.environ.pop("CLEFTWISE_CRASH_AT", None)
                os.environ.update(job["env"])
                fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1), os.dup2(fd, 2)
                code = main(job["argv"])
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush(), sys.stderr.flush()
                os._exit(code or 0)
        status = None
        while status is None:
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                status = st
            elif job.get("kill_after") is not None and time.time() - t0 > job["kill_after"]:
                os.kill(pid, signal.SIGKILL)
                job["kill_after"] = None
            else:
                time.sleep(0.02)
        rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(json.dumps({"rc": rc, "seconds": time.time() - t0}), flush=True)
""")


class Cli:
    """``cleftwise predict ARGS`` in a forked child of the server; returns (rc, log text)."""

    def __init__(self, cwd):
        self.cwd = str(cwd)
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=self.cwd)
        self.n = 0

    def __call__(self, argv, crash=None, kill_after=None, timeout=300):
        self.n += 1
        log = os.path.join(self.cwd, f"run{self.n}.log")
        job = {"argv": [str(a) for a in argv], "env": {ENV: crash} if crash else {}, "log": log,
               "kill_after": kill_after}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"run {argv} (crash {crash}) did not end in {timeout} s"
        res = json.loads(self.proc.stdout.readline())
        with open(log) as f:
            return res["rc"], f.read(), res["seconds"]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    c = Cli(tmp_path_factory.mktemp("cli"))
    yield c
    c.close()


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    d = tmp_path_factory.mktemp("vol")
    return generate_volume(SyntheticConfig(shape=(18, 160, 160), seed=3, chunk_shape=(9, 80, 80)),
                           str(d / "syn.zarr"))


def _job(volume, folder, backend="local") -> str:
    """A job config writing into ``folder``/out; returns the YAML's path."""
    os.makedirs(folder, exist_ok=True)
    conf = {"raw": volume.datasets["raw"], "neurons": volume.datasets["neurons"],
            "output_dir": os.path.join(str(folder), "out"),
            "backend": {"backend": backend, "workers": 1, "progress": False},
            "predict": {"checkpoint": os.path.join(WEIGHTS, "rsunet_polarity.pt"),
                        "block_shape": [18, 160, 160], "batch_size": 2, "stride": list(DEMO_STRIDE)},
            "segment": {"block_shape": [9, 80, 80], "min_size": 100, "threshold": DEMO_THRESHOLD},
            "partners": {"partner_rule": "contrast"},
            "classify": {"checkpoint": os.path.join(WEIGHTS, "ei_vgg3d.pt"), "block_shape": [9, 80, 80]}}
    path = os.path.join(str(folder), "job.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(conf, f)
    return path


def _args(job):
    return ["--config", job, "--no-progress"]


@pytest.fixture(scope="module")
def reference(cli, volume, tmp_path_factory):
    """One uninterrupted run (the output folder every interrupted run must equal)."""
    job = _job(volume, tmp_path_factory.mktemp("reference"))
    rc, log, seconds = cli(_args(job))
    assert rc == 0, log[-3000:]
    out = os.path.join(os.path.dirname(job), "out")
    with open_store(f"sqlite:///{out}/synapses.db") as store:
        assert store.count() >= 2, "the shipped weights find synapses in this volume"
    return out, seconds


def _outputs(out) -> dict:
    """What a user keeps: prediction and label bytes, DB records, every file under graph/."""
    res = {name: open_volume(os.path.join(out, path)).read().tobytes()
           for name, path in (("pred", "predictions.zarr/pred"), ("labels", "synapses.zarr/labels"))}
    with open_store(f"sqlite:///{out}/synapses.db") as store:
        res["db"] = store.query().sort_values("id").reset_index(drop=True)
    graph = os.path.join(out, "graph")
    for root, _, files in os.walk(graph):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                res[os.path.relpath(os.path.join(root, name), graph)] = f.read()
    return res


def _same_outputs(ref, out, what="") -> None:
    a, b = _outputs(ref), _outputs(out)
    pd.testing.assert_frame_equal(a.pop("db"), b.pop("db"), obj=f"DB records {what}")
    assert sorted(a) == sorted(b), what
    for key in a:
        assert a[key] == b[key], f"{key} differs {what}"
    with open(os.path.join(out, "run_summary.json")) as f:
        assert set(json.load(f)["stages"]) == {"predict", "segment", "partners", "classify", "connectome"}
    assert not os.path.exists(os.path.join(out, LOCK_NAME)), "the lock is released"


def _half_created_labels(out):
    """What create_volume killed half-way leaves: a dataset folder with torn metadata."""
    d = os.path.join(out, "synapses.zarr", "labels")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, ".zarray"), "w") as f:
        f.write('{"chunks": [9, 80')


#: (crash point, damage done to the output folder after the kill), in pipeline order
POINTS = [
    ("job_written/predict", None),                 # ledger identity written, no output yet
    ("output_created/predict", None),              # output array created, no block done
    ("block_written/predict", None),               # block written, its marker not yet
    ("marker_written/predict", None),              # marker written, pass not finished
    ("block_written/segment_label:3", None),
    ("pass_finished/segment_stitch", None),        # union-find resolved, relabel not started
    ("job_written/segment_relabel", None),
    ("job_written/segment_relabel", _half_created_labels),  # + create_volume torn half-way
    ("output_created/segment_relabel", None),
    ("marker_written/segment_relabel:4", None),
    ("prepared/partners", None),
    ("db_block_written/partners:3", None),         # DB half written, no DB marker
    ("db_marker_written/partners", None),          # DB marker written, pass not finished
    ("pass_finished/partners", None),              # stage done, downstream not yet dropped
    ("prepared/classify", None),                   # E/I index built, no block done
    ("db_updated/classify:1", None),               # E/I written for a block, no marker
    ("marker_written/classify:2", None),
    ("export_written/connectome", None),
    ("export_written/run_summary", None),          # summary written, lock not yet released
]


@pytest.fixture(scope="module")
def workspace(cli, volume, tmp_path_factory):
    """One job folder for the crash points (the ledgers hold absolute paths, so a run resumes
    only in place) and a copy of it once predict is done: the points after predict start from
    that copy rather than predicting again."""
    base = tmp_path_factory.mktemp("points")
    job = _job(volume, base)
    rc, log, _ = cli(_args(job) + ["--stages", "predict"])
    assert rc == 0, log[-3000:]
    shutil.copytree(base / "out", base / "predicted")
    return job, str(base / "out"), str(base / "predicted")


@pytest.mark.parametrize("point,damage", POINTS,
                         ids=[p + ("+torn" if d else "") for p, d in POINTS])
def test_sigkill_at_a_crash_point_then_rerun_is_identical(cli, workspace, reference, point, damage):
    job, out, predicted = workspace
    shutil.rmtree(out)
    if not point.endswith("/predict"):
        shutil.copytree(predicted, out)
    rc, log, _ = cli(_args(job), crash=point)
    assert rc == KILLED, f"crash point {point} was not reached (rc {rc}):\n{log[-3000:]}"
    if damage:
        damage(out)
    rc, log, _ = cli(_args(job))
    assert rc == 0, log[-3000:]
    _same_outputs(reference[0], out, f"after a kill at {point}")


def test_kill_at_a_random_moment_then_resume_is_identical(cli, volume, reference, tmp_path):
    seed = int(os.environ.get("CLEFTWISE_TEST_SEED", time.time_ns() % 10**6))
    delay = random.Random(seed).uniform(0.1, 0.9) * reference[1]
    job = _job(volume, tmp_path)
    rc, log, _ = cli(_args(job), kill_after=delay)
    assert rc in (KILLED, 0), log[-3000:]
    rc, log, _ = cli(_args(job))
    assert rc == 0, f"seed {seed} (kill after {delay:.2f} s):\n{log[-3000:]}"
    _same_outputs(reference[0], os.path.join(str(tmp_path), "out"), f"(seed {seed}, kill after {delay:.2f} s)")


def test_ctrl_c_prints_one_line_exits_130_and_resumes(cli, volume, reference, tmp_path):
    job = _job(volume, tmp_path)
    proc = subprocess.Popen([sys.executable, SCRIPT, *_args(job)], stderr=subprocess.PIPE, text=True,
                            stdout=subprocess.DEVNULL, cwd=str(tmp_path))
    seen = []
    for line in proc.stderr:  # Ctrl-C in the middle of the run (predict is its longest stage)
        seen.append(line)
        if "stage predict: start" in line:
            time.sleep(1.0)
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.stderr.read()
    proc.wait(timeout=120)
    assert proc.returncode == 130, "".join(seen) + rest
    assert "Traceback" not in rest
    last = rest.strip().splitlines()
    assert len([x for x in last if x.startswith("interrupted")]) == 1, rest
    assert last[-1].startswith("interrupted in stage "), last[-1]
    assert f"run the same command: cleftwise predict --config {job} --no-progress" in last[-1]
    rc, log, _ = cli(_args(job))
    assert rc == 0, log[-3000:]
    _same_outputs(reference[0], os.path.join(str(tmp_path), "out"), "after Ctrl-C")


_HOLDER = textwrap.dedent("""
    import json, os, socket, sys, time
    with open(sys.argv[1], "w") as f:
        json.dump({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}, f)
    print("locked", flush=True)
    time.sleep(120)
""")


def test_one_run_per_output_folder(cli, volume, reference, tmp_path, caplog):
    out = reference[0]
    lock = os.path.join(out, LOCK_NAME)
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, lock], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        cfg = parse_config(yaml.safe_load(open(os.path.join(os.path.dirname(out), "job.yaml"))))
        with pytest.raises(PostprocessError, match=rf"host {socket.gethostname()}, pid {holder.pid}\b"):
            run_pipeline(cfg)
        rc, log, _ = cli(_args(os.path.join(os.path.dirname(out), "job.yaml")))
        assert rc == 1 and log.strip().splitlines()[-1].startswith(
            f"error: another run (host {socket.gethostname()}, pid {holder.pid}, started "), log[-2000:]
        assert pipeline_status(cfg)["classify"]["remaining"] == 0  # --status needs no lock
        rc, log, _ = cli(_args(os.path.join(os.path.dirname(out), "job.yaml")) + ["--status"])
        assert rc == 0, log[-2000:]
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone (killed): its lock is stale and taken over, with a warning
    with caplog.at_level("WARNING"), output_lock(out):
        with open(lock) as f:
            assert json.load(f)["pid"] == os.getpid()
    assert f"pid {holder.pid} is not running" in caplog.text
    assert not os.path.exists(lock), "released at the end"
    with pytest.raises(RuntimeError), output_lock(out):
        raise RuntimeError("boom")
    assert not os.path.exists(lock), "released on error too"


def test_cli_errors_are_one_line(cli, tmp_path):
    rc, log, _ = cli(["--config", str(tmp_path / "missing.yaml")])
    assert rc == 2 and log.strip().splitlines() == [log.strip().splitlines()[-1]]
    assert log.startswith("error: ") and "missing.yaml" in log
    (tmp_path / "bad.yaml").write_text("raw: x\nsegmnt: {}\n")
    rc, log, _ = cli(["--config", str(tmp_path / "bad.yaml")])
    assert rc == 1 and log.strip().startswith("error: ") and "segmnt" in log and "Traceback" not in log
    (tmp_path / "torn.yaml").write_text("raw: [x\n")
    rc, log, _ = cli(["--config", str(tmp_path / "torn.yaml")])
    assert rc == 2 and len(log.strip().splitlines()) == 1 and log.startswith("error: ")


def _small_input(tmp_path):
    vol = create_volume(f"{tmp_path}/in.zarr/raw", shape=(8, 40, 40), voxel_size=(40, 4, 4), dtype="uint8",
                        chunk_shape=(4, 20, 20))
    vol.write(vol.roi, np.random.default_rng(0).integers(0, 255, (8, 40, 40), dtype=np.uint8))
    return vol.url


def test_a_stage_interrupted_after_its_work_still_reruns_the_stages_downstream(tmp_path):
    """Killed inside a stage after it changed its outputs but before it dropped the ledgers
    downstream: the next run drops them (``stage_running.json`` says the stage was interrupted)."""
    reg = _registry()  # the generic two-filter pipeline of test_stages
    run, backend = Run(_small_input(tmp_path), str(tmp_path / "out")), BackendConfig(progress=False)
    run_stages(reg, run, reg.names, backend)
    marker = os.path.join(run.out, "first", "ledger", "stage_running.json")
    assert not os.path.exists(marker)
    with open(marker, "w") as f:  # what a kill inside `first` leaves
        f.write("{}")
    again = run_stages(reg, run, reg.names, backend)
    assert again["stages"]["first"]["processed"] == 0
    assert again["stages"]["second"]["processed"] == again["stages"]["second"]["total"]
    assert not os.path.exists(marker)
    # a clear() killed half-way (markers left, job.json gone) starts that pass fresh
    ledger = os.path.join(run.out, "second", "ledger", "filter")
    os.remove(os.path.join(ledger, "job.json"))
    third = run_stages(reg, run, ["second"], backend)
    assert third["stages"]["second"]["processed"] == third["stages"]["second"]["total"]


def test_daisy_logs_go_under_the_ledger(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    url = _small_input(tmp_path)
    step = FilterStep(FilterConfig(url, f"{tmp_path}/d.zarr/s", block_shape_nm=(160, 80, 80)))
    run_task(step, BackendConfig("daisy", workers=1, progress=False))
    assert not os.path.exists(tmp_path / "daisy_logs")
    assert os.path.isdir(os.path.join(step.ledger_path(), "daisy_logs"))
