"""Shared fixtures: one Ray and one Dask cluster per test session, small volumes."""

import logging
import os
import tempfile

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MPLBACKEND", "Agg")
# predict's batch_size "auto" caches its calibration: never in the user's ~/.cache from tests
os.environ.setdefault("CLEFTWISE_CACHE_DIR", tempfile.mkdtemp(prefix="cleftwise-test-cache-"))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray (2 CPUs, no dashboard) shared by every test of the session."""
    from cleftwise.blockwise.runner import ensure_ray

    ray = ensure_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def dask_address():
    """A dask LocalCluster of 2 single-threaded worker processes, shared by the session."""
    from distributed import LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                           dashboard_address=None, silence_logs=logging.ERROR)
    yield cluster.scheduler_address
    cluster.close()
