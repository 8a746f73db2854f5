"""Progress inside a block: steps report fractions, the driver's bar counts them."""

import json
import os
import time

from cleftwise.blockwise import progress


def test_report_outside_a_block_does_nothing():
    progress.report(1, 2)  # no sink: no error, no file


def test_report_goes_to_the_callback_in_the_driver():
    seen = []
    with progress.block_progress(7, callback=lambda b, f: seen.append((b, f))):
        progress.report(1, 4)
        progress.report(3, 4)
    progress.report(4, 4)  # after the block: ignored
    assert seen == [(7, 0.25), (7, 0.75)]


def test_report_goes_to_a_file_in_a_worker_and_is_removed_after_the_block(tmp_path):
    folder = str(tmp_path / "progress")
    with progress.block_progress(3, folder=folder, worker="host:123", interval=0.0):
        progress.report(2, 5)
        (path,) = [os.path.join(folder, f) for f in os.listdir(folder)]
        assert json.load(open(path)) == {"block": 3, "fraction": 0.4}
        assert os.path.basename(path) == "host_123.json"
    assert os.listdir(folder) == []


def test_bar_counts_running_blocks_fractions_from_worker_files(tmp_path):
    folder = str(tmp_path / "progress")
    bar = progress.ProgressBar(10, 2, "t", enabled=True, folder=folder, poll=0.05)
    try:
        with progress.block_progress(5, folder=folder, worker="w1", interval=0.0):
            progress.report(1, 2)
            deadline = time.time() + 5
            while abs(bar.bar.n - 2.5) > 1e-9 and time.time() < deadline:
                time.sleep(0.05)
            assert abs(bar.bar.n - 2.5) < 1e-9
        bar.set_done(3)
        deadline = time.time() + 5
        while abs(bar.bar.n - 3.0) > 1e-9 and time.time() < deadline:
            time.sleep(0.05)
        assert abs(bar.bar.n - 3.0) < 1e-9
    finally:
        bar.close()


def test_local_bar_partial_and_block_done():
    bar = progress.ProgressBar(4, 0, "t", enabled=True)
    try:
        bar.partial(0, 0.5)
        assert abs(bar.bar.n - 0.5) < 1e-9
        bar.block_done(0)
        bar.set_done(1)
        assert abs(bar.bar.n - 1.0) < 1e-9
    finally:
        bar.close()


# -- through the engine: a real blockwise filter whose blocks report halfway ----------------

import sys  # noqa: E402

import cloudpickle  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from cleftwise.blockwise.filter_step import FilterConfig, FilterStep  # noqa: E402
from cleftwise.blockwise.runner import BackendConfig, run_task  # noqa: E402
from cleftwise.storage.volume import create_volume  # noqa: E402

cloudpickle.register_pickle_by_value(sys.modules[__name__])


class _HalfwayStep(FilterStep):
    """The Gaussian filter step, reporting half of each block done, then pausing."""

    def process(self, block, resources):
        progress.report(1, 2)
        time.sleep(self.pause)
        return super().process(block, resources)


@pytest.mark.parametrize("backend", ["local", "ray"])
def test_bar_moves_inside_blocks(tmp_path, monkeypatch, backend, request):
    if backend == "ray":
        request.getfixturevalue("ray_cluster")
        import ray.cloudpickle  # Ray pickles with its own copy of cloudpickle

        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    url = f"{tmp_path}/in.zarr/raw"
    vol = create_volume(url, shape=(8, 40, 40), voxel_size=(40, 4, 4), dtype="uint8",
                        chunk_shape=(4, 20, 20), overwrite=True)
    vol.write(vol.roi, np.random.default_rng(0).integers(0, 255, (8, 40, 40), dtype=np.uint8))
    step = _HalfwayStep(FilterConfig(url, f"{tmp_path}/out.zarr/smooth", block_shape_nm=(160, 80, 80)))
    step.pause = 0.0 if backend == "local" else 2.5  # the driver polls workers' files every 1 s
    seen = []
    show = progress.ProgressBar._show

    def record(self):
        show(self)
        if self.bar is not None:
            seen.append(float(self.bar.n))

    monkeypatch.setattr(progress.ProgressBar, "_show", record)
    run_task(step, BackendConfig(backend, workers=1, progress=True))
    fractions = [n for n in seen if abs(n - round(n)) > 1e-6]
    assert fractions and all(abs(n % 1 - 0.5) < 1e-6 for n in fractions), seen
    assert seen[-1] == len(step.blocks())
    assert not os.listdir(progress.progress_dir(step.ledger_path())) if os.path.isdir(
        progress.progress_dir(step.ledger_path())) else True
