"""One worker pool per run: on daisy, ray and dask, every pass of every stage runs on the same
worker processes (counted from the worker host:pid the ledgers record), outputs equal local
x1 byte for byte, a worker killed inside a block still ends in a complete identical output,
and no worker process outlives the run."""

import os
import sys
import time
from dataclasses import dataclass, field

import cloudpickle
import numpy as np
import psutil
import pytest

from cleftwise.blockwise import crashpoints
from cleftwise.blockwise.errors import BlockwiseError
from cleftwise.blockwise.filter_step import FilterConfig, FilterStep
from cleftwise.blockwise.ledger import Ledger
from cleftwise.blockwise.pool import worker_pool
from cleftwise.blockwise.runner import BackendConfig
from cleftwise.blockwise.stages import Registry, Stage, run_stages
from cleftwise.storage.volume import create_volume, open_volume

cloudpickle.register_pickle_by_value(sys.modules[__name__])
VS = (40, 4, 4)


@dataclass
class SmoothConfig:
    sigma_nm: tuple = (40.0, 8.0, 8.0)
    """Gaussian sigma (z, y, x), nm"""


@dataclass
class Run:
    raw: str
    out: str
    kill_block: int = -1
    """a block of the second pass whose worker is SIGKILLed (once) after writing it"""
    first: SmoothConfig = field(default_factory=SmoothConfig)
    second: SmoothConfig = field(default_factory=SmoothConfig)

    def stage_dir(self, name):
        return os.path.join(self.out, name)


class KillOnceFilter(FilterStep):
    """A filter pass whose worker dies (crash point ``block_written``: SIGKILL) after writing
    block ``kill_block``, the first time only (a marker file remembers)."""

    def __init__(self, cfg, kill_block, marker):
        super().__init__(cfg)
        self.kill_block, self.marker = kill_block, marker

    def process(self, block, volumes):
        super().process(block, volumes)
        if block.block_id == self.kill_block and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os.environ[crashpoints.ENV] = f"block_written/{self.name}"  # the engine's next hit


def _filter(src, dst, cfg, work, run=None):
    fcfg = FilterConfig(src, dst, sigma_nm=cfg.sigma_nm, block_shape_nm=(160, 80, 80))
    step = (KillOnceFilter(fcfg, run.kill_block, os.path.join(run.out, "killed"))
            if run is not None and run.kill_block >= 0 else FilterStep(fcfg))
    step.work_dir = work
    return step


def _first_passes(r, c):
    """Two passes: raw → a, then a → b (built lazily: b's input exists only after pass 1)."""
    yield _filter(r.raw, f"{r.out}/a.zarr/s", c, os.path.join(r.stage_dir("first"), "p1"))
    yield _filter(f"{r.out}/a.zarr/s", f"{r.out}/b.zarr/s", c, os.path.join(r.stage_dir("first"), "p2"), r)


REGISTRY = Registry(
    Stage("first", SmoothConfig, work_dir=lambda r, c: r.stage_dir("first"), steps=_first_passes),
    Stage("second", SmoothConfig, work_dir=lambda r, c: r.stage_dir("second"), after=("first",),
          steps=lambda r, c: [_filter(f"{r.out}/b.zarr/s", f"{r.out}/c.zarr/s", c,
                                      os.path.join(r.stage_dir("second"), "p1"))]))
OUTPUTS = ("a", "b", "c")


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    d = tmp_path_factory.mktemp("pool_in")
    vol = create_volume(f"{d}/in.zarr/raw", shape=(8, 40, 40), voxel_size=VS, dtype="uint8",
                        chunk_shape=(4, 20, 20))
    vol.write(vol.roi, np.random.default_rng(0).integers(0, 255, (8, 40, 40), dtype=np.uint8))
    return vol.url if hasattr(vol, "url") else f"{d}/in.zarr/raw"


@pytest.fixture(scope="module")
def reference(raw, tmp_path_factory):
    """The outputs of local x1, as bytes."""
    out = str(tmp_path_factory.mktemp("pool_ref"))
    run_stages(REGISTRY, Run(raw, out), REGISTRY.names, BackendConfig(progress=False))
    return {n: open_volume(f"{out}/{n}.zarr/s").read().tobytes() for n in OUTPUTS}


def _ledger_workers(out) -> set:
    """Distinct worker names (host:pid) in the done records of every pass's ledger."""
    names = set()
    for stage, passes in (("first", ("p1", "p2")), ("second", ("p1",))):
        for p in passes:
            recs = Ledger(os.path.join(out, stage, p, "ledger", "filter")).records()
            assert len(recs) == 8  # every block of the pass is done
            names |= {r["worker"] for r in recs}
    return names


def _gone(pids, timeout=15.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return True
        time.sleep(0.1)
    return False


def _check_run(out, stats: list, reference) -> set:
    """Outputs equal local x1; only the pools' workers ran blocks; their pids."""
    assert {n: open_volume(f"{out}/{n}.zarr/s").read().tobytes() for n in OUTPUTS} == reference
    started = {}
    for st in stats:
        started.update(st["worker_startup_s"])
    workers = _ledger_workers(out)
    assert workers <= set(started), (workers, started)
    assert f":{os.getpid()}" not in "".join(workers)  # none in the driver
    assert all(s is not None and 0 < s < 120 for s in started.values()), started
    return {int(w.rsplit(":", 1)[1]) for w in started}


def _assert_no_dashboard(scheduler):
    """The scheduler's HTTP server (if any) is local, not on 8787, and serves no dashboard."""
    import urllib.error
    import urllib.request

    port = scheduler.services.get("dashboard").port if "dashboard" in scheduler.services else None
    if port is None:
        return
    assert port != 8787
    with pytest.raises(urllib.error.HTTPError, match="404"):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=10)


@pytest.mark.parametrize("backend", ["daisy", "ray", "dask"])
def test_one_pool_per_run_and_a_killed_worker(backend, raw, reference, tmp_path, request):
    if backend == "ray":
        request.getfixturevalue("ray_cluster")
        import ray.cloudpickle

        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # KillOnceFilter
    cfg = BackendConfig(backend, workers=2, progress=False)

    # a three-pass, two-stage run starts the pool's two workers once
    out = str(tmp_path / "run")
    with worker_pool(cfg) as pool:
        summary = run_stages(REGISTRY, Run(raw, out), REGISTRY.names, cfg, pool=pool)
        if backend == "dask":  # one cluster for the run, without a dashboard
            assert pool.cluster is not None
            _assert_no_dashboard(pool.cluster.scheduler)
    assert summary["workers"]["workers_started"] == 2, summary["workers"]
    pids = _check_run(out, [summary["workers"]], reference)
    assert len(pids) == 2
    assert _gone(pids), f"{backend}: pool workers {pids} still running after the run"

    # a worker SIGKILLed after writing a block of the second pass: the block is re-run by
    # another or a replacement worker (a re-run completes whatever the backend left failed)
    out = str(tmp_path / "killed")
    run, stats = Run(raw, out, kill_block=3), []
    for attempt in range(2):
        try:
            stats.append(run_stages(REGISTRY, run, REGISTRY.names, cfg)["workers"])
            break
        except BlockwiseError:
            assert attempt == 0
    assert os.path.exists(os.path.join(out, "killed"))  # the kill happened
    assert _gone(_check_run(out, stats, reference))
