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
