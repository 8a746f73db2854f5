"""Clusters started the way users start them, on one machine, driven by the real CLI.

Each backend's cluster is started with the user's own commands, every one in its own process
group (tests/cluster_procs.py), and ``cleftwise predict --config …`` runs every stage in a
subprocess on a small synthetic volume (6 predict blocks):

- **ray**: ``ray start --head`` plus a second node ``ray start --address 127.0.0.1:PORT`` (1 CPU
  each, own ``--temp-dir``, no dashboard, no usage stats), ``--backend ray --address … --workers 2``;
- **dask**: ``dask scheduler`` plus two ``dask worker`` processes (1 process, 1 thread each),
  ``--backend dask --address tcp://…``;
- **daisy**: 2 workers launched through ``backend.worker_command`` by a launcher script that
  stands in for ``srun``: it records each launch and its exit status.

Every cluster run gives byte-identical predictions, labels, synapse DB records and edges to a
local x1 run of the same config. Then a worker is SIGKILLed while it works on a predict block
(ray, dask: the worker process named ``host:pid`` by the first done marker; daisy: the first
launched worker gets ``CLEFTWISE_CRASH_AT=block_written/predict`` and kills itself after
writing a block, before marking it done), and the same command run again gives identical
outputs. No process of a run (driver, daisy workers, launchers) may be left after it ends, and
none of a cluster after its tests (every process group ended: SIGTERM, then SIGKILL).

The cluster processes use torch with ``torch_threads: 1`` in the config: a forward pass's
floats can depend on the thread count, and Ray and Dask set ``OMP_NUM_THREADS`` in their workers.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time

import numpy as np
import pytest
import yaml

from cluster_procs import ProcessGroups, done_records, free_port, kill_worker_mid_run, port_open, tool, wait_for

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS = os.path.join(REPO, "models", "weights")
SHAPE = (24, 288, 192)  # voxels (z, y, x) at 40 × 4 × 4 nm
BLOCK = [24, 96, 96]  # → 1 × 3 × 2 = 6 predict blocks of ~1 s each on one CPU thread
N_BLOCKS = 6
RUN_TIMEOUT = 300  # s, one pipeline run


def _env(**extra) -> dict:
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1", MPLBACKEND="Agg")
    for key in ("CLEFTWISE_CRASH_AT", "RAY_ADDRESS"):  # the test says which cluster, and where to crash
        env.pop(key, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


@pytest.fixture(scope="module")
def volume(tmp_path_factory) -> str:
    """A synthetic volume made with ``cleftwise make-synthetic``; returns the .zarr path."""
    path = str(tmp_path_factory.mktemp("cluster_vol") / "syn.zarr")
    r = subprocess.run([tool("cleftwise"), "make-synthetic", "--out", path, "--shape", *map(str, SHAPE),
                        "--seed", "3", "-q"], capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    return path


def write_config(path: str, volume: str, out_dir: str, backend: dict) -> str:
    """The pipeline YAML for ``volume``: every stage, one torch thread per worker."""
    conf = {
        "raw": f"{volume}/raw", "neurons": f"{volume}/neurons", "output_dir": out_dir,
        "backend": {"progress": False, **backend},
        "predict": {"checkpoint": os.path.join(WEIGHTS, "rsunet_polarity.pt"), "block_shape": BLOCK,
                    "patch_shape": [18, 96, 96], "stride": [14, 80, 80], "batch_size": 2,
                    "torch_threads": 1},
        "segment": {"block_shape": BLOCK, "threshold": 0.5, "min_size": 1000},
        "partners": {"partner_rule": "contrast"},
        "classify": {"checkpoint": os.path.join(WEIGHTS, "ei_vgg3d.pt"), "torch_threads": 1},
    }
    with open(path, "w") as f:
        yaml.safe_dump(conf, f, sort_keys=False)
    return path


def predict_cmd(config: str, *extra: str) -> list:
    return [tool("cleftwise"), "predict", "--config", config, "--no-progress", *extra]


def start_run(log_dir: str, name: str, cmd: list, env: dict, cwd: str) -> tuple:
    """Start a pipeline run in a process group of its own: ``(its ProcessGroups, its Popen)``."""
    group = ProcessGroups(log_dir)
    return group, group.start(name, cmd, env=env, cwd=cwd)


def finish_run(run: tuple, name: str) -> tuple:
    """Wait for a pipeline run: ``(exit code, its output)``. No process of it (driver, daisy
    workers, their launchers) may be left a few seconds after it exits."""
    group, proc = run
    deadline = time.monotonic() + RUN_TIMEOUT
    while proc.poll() is None:
        group.members()  # remember its descendants (daisy workers) while they have a parent
        if time.monotonic() > deadline:
            left = group.stop()
            raise AssertionError(f"{name} did not finish within {RUN_TIMEOUT} s (left: {left})\n"
                                 f"{group.log(name)[-3000:]}")
        time.sleep(0.5)
    try:
        wait_for(lambda: not group.alive(), 20, f"every process of {name} to end",
                 logs=lambda: str(group.alive()))
    finally:
        left = group.stop()
    assert left == [], f"{name}: processes left: {left}"
    return proc.returncode, group.log(name)


def run_to_end(log_dir: str, name: str, cmd: list, env: dict, cwd: str) -> str:
    code, out = finish_run(start_run(log_dir, name, cmd, env, cwd), name)
    assert code == 0, out[-4000:]
    return out


def array_hash(url: str) -> str:
    from cleftwise.storage.volume import open_volume

    v = open_volume(url)
    a = np.ascontiguousarray(v.read(v.roi))
    return hashlib.sha256(str(a.dtype).encode() + str(a.shape).encode() + a.tobytes()).hexdigest()


def outputs(out_dir: str) -> dict:
    """What a user keeps, hashed exactly: predictions, labels, every DB record, the edge list."""
    from cleftwise.storage.db import open_store

    with open_store("sqlite:///" + os.path.join(out_dir, "synapses.db")) as store:
        db = store.query()
    db = db.sort_values("id").reset_index(drop=True)
    with open(os.path.join(out_dir, "graph", "edges.csv"), "rb") as f:
        edges = hashlib.sha256(f.read()).hexdigest()
    return {"pred": array_hash(os.path.join(out_dir, "predictions.zarr", "pred")),
            "labels": array_hash(os.path.join(out_dir, "synapses.zarr", "labels")),
            "db": hashlib.sha256(db.to_csv(index=False, float_format="%.17g").encode()).hexdigest(),
            "n_db": len(db), "edges": edges}


@pytest.fixture(scope="module")
def reference(volume, tmp_path_factory) -> dict:
    """Outputs of the local x1 run."""
    d = tmp_path_factory.mktemp("cluster_ref")
    cfg = write_config(str(d / "local.yaml"), volume, str(d / "out"), {"backend": "local", "workers": 1})
    run_to_end(str(d / "logs"), "local", predict_cmd(cfg), _env(), str(d))
    got = outputs(str(d / "out"))
    assert got["n_db"] > 0, "the reference run found no synapse: the test volume is too small"
    return got


def _predict_done_dir(out_dir: str) -> str:
    return os.path.join(out_dir, "predict", "ledger", "predict", "done")


def _kill_and_resume(cluster: ProcessGroups, name, cmd, env, cwd, out_dir, reference) -> dict:
    """Run ``cmd``, SIGKILL the cluster worker busy with a predict block, run ``cmd`` again:
    outputs identical to the reference. Returns the kill record and the first run's exit code."""
    log_dir = cluster.log_dir
    run = start_run(log_dir, f"{name}-killed", cmd, env, cwd)
    try:
        killed = kill_worker_mid_run(run[1], _predict_done_dir(out_dir), cluster, N_BLOCKS)
    except AssertionError:
        run[0].stop()
        raise
    code1, out1 = finish_run(run, f"{name}-killed")
    assert killed["done_at_kill"] < N_BLOCKS, f"the worker was killed after predict ended: {killed}"
    # the backend either re-ran the lost block itself (exit 0) or stopped with one error line
    assert code1 == 0 or (code1 == 1 and "error:" in out1 and "Traceback" not in out1), out1[-4000:]
    run_to_end(log_dir, f"{name}-rerun", cmd, env, cwd)
    assert outputs(out_dir) == reference
    assert len(done_records(_predict_done_dir(out_dir))) == N_BLOCKS
    return {**killed, "first_exit": code1}


# -- ray ---------------------------------------------------------------------------------------

def _ray_start(groups: ProcessGroups, name: str, args, env: dict, temp_root: str, cwd: str) -> int:
    """``ray start <args(port)> --block`` with its own temp dir and agent port; returns the port.
    Ray gives a starting node a fixed 30 s to register with the GCS: on a loaded machine a start
    can time out, so a failed start is ended and tried once more (fresh port and temp dir)."""
    for attempt in (1, 2):
        port, label = free_port(), f"{name}-{attempt}"
        proc = groups.start(label, [tool("ray"), "start", *args(port),
                                    "--temp-dir", os.path.join(temp_root, label),
                                    "--dashboard-agent-listen-port", str(free_port())], env=env, cwd=cwd)
        try:
            wait_for(lambda: "Ray runtime started" in groups.log(label), 180, f"ray start ({label})",
                     logs=lambda: groups.log(label), proc=proc)
            return port
        except AssertionError:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def ray_cli_cluster(tmp_path_factory):
    """A head and a second node started with ``ray start`` (1 CPU each); yields
    ``(groups, address, env, workdir)`` and leaves no Ray process behind."""
    d = tmp_path_factory.mktemp("cluster_ray")
    short = tempfile.mkdtemp(prefix="cw-ray-")  # Ray's socket paths must stay short
    token = secrets.token_hex(32)
    # a head that finds ~/.ray/auth_token turns token auth on, and a joining `ray start` does not
    # read it unless told: give every process of this cluster its own token explicitly
    env = _env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    groups = ProcessGroups(str(d / "logs"))
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats", "--block"]
    try:
        port = _ray_start(groups, "ray-head", lambda port: [
            "--head", "--port", str(port), "--include-dashboard=false", *common], env, short, str(d))
        _ray_start(groups, "ray-node", lambda _: [
            "--address", f"127.0.0.1:{port}", *common], env, short, str(d))
        yield groups, f"127.0.0.1:{port}", env, d
    finally:
        left = groups.stop()
        shutil.rmtree(short, ignore_errors=True)
        assert left == [], f"Ray processes left after the test: {left}"


def test_ray_cluster_matches_local(ray_cli_cluster, volume, reference):
    groups, address, env, d = ray_cli_cluster
    out = str(d / "out_clean")
    cfg = write_config(str(d / "ray.yaml"), volume, out, {"backend": "local", "workers": 1})
    run_to_end(groups.log_dir, "ray-clean",
               predict_cmd(cfg, "--backend", "ray", "--address", address, "--workers", "2"), env, str(d))
    assert outputs(out) == reference
    workers = {r["worker"] for r in done_records(_predict_done_dir(out))}
    assert len(workers) == 2, f"predict ran on {workers}, not on two Ray workers"


def test_ray_cluster_resumes_after_a_worker_is_killed(ray_cli_cluster, volume, reference):
    groups, address, env, d = ray_cli_cluster
    out = str(d / "out_killed")
    cfg = write_config(str(d / "ray_killed.yaml"), volume, out, {"backend": "local", "workers": 1})
    cmd = predict_cmd(cfg, "--backend", "ray", "--address", address, "--workers", "2")
    _kill_and_resume(groups, "ray", cmd, env, str(d), out, reference)


# -- dask --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dask_cli_cluster(tmp_path_factory):
    """``dask scheduler`` and two ``dask worker`` processes (1 process, 1 thread each, under a
    nanny); yields ``(groups, address, env, workdir)`` and leaves no dask process behind."""
    d = tmp_path_factory.mktemp("cluster_dask")
    env = _env()
    groups = ProcessGroups(str(d / "logs"))
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    try:
        sched = groups.start("dask-scheduler", [tool("dask"), "scheduler", "--host", "127.0.0.1",
                                                "--port", str(port), "--no-dashboard", "--idle-timeout", "900"],
                             env=env, cwd=str(d))
        wait_for(lambda: port_open(port), 60, "the dask scheduler", logs=lambda: groups.log("dask-scheduler"),
                 proc=sched)
        workers = [groups.start(f"dask-worker-{i}", [
            tool("dask"), "worker", address, "--nworkers", "1", "--nthreads", "1", "--no-dashboard",
            "--host", "127.0.0.1", "--name", f"w{i}", "--local-directory", str(d / f"w{i}"),
            "--death-timeout", "60"], env=env, cwd=str(d)) for i in (1, 2)]
        for i, w in zip((1, 2), workers):
            wait_for(lambda: "Registered to:" in groups.log(f"dask-worker-{i}"), 60, f"dask worker {i}",
                     logs=lambda: groups.log(f"dask-worker-{i}"), proc=w)
        yield groups, address, env, d
    finally:
        left = groups.stop()
        assert left == [], f"dask processes left after the test: {left}"


def test_dask_cluster_matches_local(dask_cli_cluster, volume, reference):
    groups, address, env, d = dask_cli_cluster
    out = str(d / "out_clean")
    cfg = write_config(str(d / "dask.yaml"), volume, out, {"backend": "local", "workers": 1})
    run_to_end(groups.log_dir, "dask-clean", predict_cmd(cfg, "--backend", "dask", "--address", address),
               env, str(d))
    assert outputs(out) == reference
    workers = {r["worker"] for r in done_records(_predict_done_dir(out))}
    assert len(workers) == 2, f"predict ran on {workers}, not on both dask workers"


def test_dask_cluster_resumes_after_a_worker_is_killed(dask_cli_cluster, volume, reference):
    groups, address, env, d = dask_cli_cluster
    out = str(d / "out_killed")
    cfg = write_config(str(d / "dask_killed.yaml"), volume, out, {"backend": "local", "workers": 1})
    cmd = predict_cmd(cfg, "--backend", "dask", "--address", address)
    _kill_and_resume(groups, "dask", cmd, env, str(d), out, reference)


# -- daisy with a worker_command ----------------------------------------------------------------

LAUNCHER = """#!/bin/sh
# stands in for `srun -N1 -n1`: run the worker command, recording its pid and exit status
dir=$(dirname "$0")
if [ -n "$CLEFTWISE_TEST_CRASH_ONCE" ] && mkdir "$dir/crash_given" 2>/dev/null; then
    export CLEFTWISE_CRASH_AT="$CLEFTWISE_TEST_CRASH_ONCE"  # only the first worker launched
fi
"$@" &
child=$!
echo "start $child ${CLEFTWISE_CRASH_AT:-}" >> "$dir/launches.log"
wait $child
rc=$?
echo "exit $child $rc" >> "$dir/launches.log"
exit $rc
"""


def _launcher(d) -> str:
    path = str(d / "launch_worker.sh")
    with open(path, "w") as f:
        f.write(LAUNCHER)
    os.chmod(path, 0o755)
    return path


def _launches(d) -> list:
    try:
        with open(str(d / "launches.log")) as f:
            return [line.split() for line in f]
    except FileNotFoundError:
        return []


def _daisy_config(d, volume, out) -> str:
    backend = {"backend": "daisy", "workers": 2, "worker_command": f"{_launcher(d)} {{command}}"}
    return write_config(str(d / "daisy.yaml"), volume, out, backend)


def test_daisy_worker_command_matches_local(tmp_path, volume, reference):
    out = str(tmp_path / "out")
    run_to_end(str(tmp_path / "logs"), "daisy-clean", predict_cmd(_daisy_config(tmp_path, volume, out)), _env(),
               str(tmp_path))
    assert outputs(out) == reference
    launches = _launches(tmp_path)
    starts = [x for x in launches if x[0] == "start"]
    assert len(starts) >= 2 and all(x[2] == "0" for x in launches if x[0] == "exit"), launches
    # every block was done by a worker the launcher started (whether both got blocks of this
    # small volume depends on how fast each started)
    workers = {int(r["worker"].rsplit(":", 1)[1]) for r in done_records(_predict_done_dir(out))}
    assert workers <= {int(x[1]) for x in starts}, (workers, launches)


def test_daisy_worker_command_resumes_after_a_worker_is_killed(tmp_path, volume, reference):
    out = str(tmp_path / "out")
    cmd = predict_cmd(_daisy_config(tmp_path, volume, out))
    env = _env(CLEFTWISE_TEST_CRASH_ONCE="block_written/predict")
    code1, out1 = finish_run(start_run(str(tmp_path / "logs"), "daisy-killed", cmd, env, str(tmp_path)),
                             "daisy-killed")
    launches = _launches(tmp_path)
    crashed = [x for x in launches if x[0] == "exit" and x[2] == "137"]  # 128 + SIGKILL
    assert len(crashed) == 1, launches
    assert code1 == 0 or (code1 == 1 and "error:" in out1 and "Traceback" not in out1), out1[-4000:]
    run_to_end(str(tmp_path / "logs"), "daisy-rerun", cmd, env, str(tmp_path))
    assert outputs(out) == reference
    done = done_records(_predict_done_dir(out))
    assert len(done) == N_BLOCKS
    # the block the crashed worker had written but not marked was done again by another worker
    assert int(crashed[0][1]) not in {int(r["worker"].rsplit(":", 1)[1]) for r in done}
