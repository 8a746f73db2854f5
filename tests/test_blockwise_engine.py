"""Block grid, ledger, backends, retries, resume — on a real blockwise Gaussian filter."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import cloudpickle
import numpy as np
import pytest
from funlib.geometry import Coordinate, Roi
from scipy import ndimage

from cleftwise.blockwise.errors import BlockwiseError
from cleftwise.blockwise.filter_step import FilterConfig, FilterStep
from cleftwise.blockwise.grid import block_at, grid_shape, neighbours, plan_blocks
from cleftwise.blockwise.ledger import Ledger
from cleftwise.blockwise.runner import BackendConfig, run_task, task_status
from cleftwise.storage.volume import create_volume, open_volume

cloudpickle.register_pickle_by_value(sys.modules[__name__])
VS = (40, 4, 4)


def _input(tmp_path, shape=(12, 60, 70), seed=0):
    url = f"{tmp_path}/in.zarr/raw"
    vol = create_volume(url, shape=shape, voxel_size=VS, dtype="uint8", chunk_shape=(4, 20, 20),
                        overwrite=True)
    data = np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8)
    vol.write(vol.roi, data)
    return url, data


def _reference(data, cfg):
    sigma = tuple(s / v for s, v in zip(cfg.sigma_nm, VS))
    return ndimage.gaussian_filter(data.astype(np.float32), sigma, mode="constant", truncate=4.0)


# -- grid -----------------------------------------------------------------------------------

def test_grid_ids_shapes_and_alignment():
    total = Roi((0, 0, 0), (400, 100, 92))
    blocks = plan_blocks(total, (160, 40, 40), context=(40, 8, 8), chunk_shape=(80, 20, 20),
                         voxel_size=VS)
    assert grid_shape(total, (160, 40, 40)) == (3, 3, 3)
    assert [b.block_id for b in blocks] == list(range(27))
    # write ROIs tile the total ROI exactly, without overlap
    cover = np.zeros((10, 25, 23), int)
    for b in blocks:
        s = tuple(slice(x // v, (x + n) // v) for x, n, v in zip(b.write_roi.begin, b.write_roi.shape, VS))
        cover[s] += 1
    assert (cover == 1).all()
    last = blocks[-1]
    assert last.write_roi == Roi((320, 80, 80), (80, 20, 12))  # shrunk at the border
    assert last.read_roi == last.write_roi.grow((40, 8, 8), (40, 8, 8))
    assert block_at((1, 2, 0), total, (160, 40, 40)).block_id == 1 * 9 + 2 * 3
    assert len(list(neighbours((0, 0, 0), (3, 3, 3)))) == 7
    assert len(list(neighbours((1, 1, 1), (3, 3, 3), include_diagonal=False))) == 6
    clipped = plan_blocks(total, (160, 40, 40), (40, 8, 8), clip_read_to=total)
    assert all(total.contains(b.read_roi) for b in clipped)


def test_grid_errors():
    total = Roi((0, 0, 0), (400, 100, 100))
    with pytest.raises(BlockwiseError, match="not a multiple of the output chunk"):
        plan_blocks(total, (160, 40, 40), chunk_shape=(80, 30, 20))
    with pytest.raises(BlockwiseError, match="not a multiple of the voxel size"):
        plan_blocks(total, (100, 40, 40), voxel_size=VS)
    with pytest.raises(BlockwiseError, match="empty"):
        plan_blocks(Roi((0, 0, 0), (0, 10, 10)), (40, 4, 4))


# -- ledger ---------------------------------------------------------------------------------

def test_ledger_identity_refusal_and_overwrite(tmp_path):
    led = Ledger(tmp_path / "l")
    assert led.start({"a": 1, "b": 2}) is False
    led.mark_done(3, 0.5)
    assert led.start({"a": 1, "b": 2}) is True and led.done_ids() == {3}
    with pytest.raises(BlockwiseError, match="changed: b"):
        led.start({"a": 1, "b": 3})
    assert led.start({"a": 1, "b": 3}, overwrite=True) is False
    assert led.done_ids() == set()
    led.mark_failed(5, "boom", 3)
    assert led.status(10).failed == 1 and led.status(10).remaining == 10


# -- engine on the filter step --------------------------------------------------------------

@pytest.mark.parametrize("block_nm", [(160, 80, 80), (200, 120, 40), (480, 240, 280)])
def test_local_blockwise_equals_whole(tmp_path, block_nm):
    url, data = _input(tmp_path)
    cfg = FilterConfig(url, f"{tmp_path}/out.zarr/smooth", sigma_nm=(40, 8, 8),
                       block_shape_nm=block_nm)
    report = run_task(FilterStep(cfg), BackendConfig("local", progress=False))
    assert report.processed == report.total
    out = open_volume(cfg.output).read()
    np.testing.assert_allclose(out, _reference(data, cfg), atol=1e-4)


def _run_backend(tmp_path, name, backend):
    url, data = _input(tmp_path)
    cfg = FilterConfig(url, f"{tmp_path}/{name}.zarr/smooth", block_shape_nm=(160, 80, 80))
    run_task(FilterStep(cfg), backend)
    return open_volume(cfg.output).read(), _reference(data, cfg)


def test_daisy_backend_two_workers(tmp_path):
    out, ref = _run_backend(tmp_path, "daisy", BackendConfig("daisy", workers=2, progress=False))
    np.testing.assert_allclose(out, ref, atol=1e-4)
    local, _ = _run_backend(tmp_path, "local", BackendConfig("local", progress=False))
    np.testing.assert_array_equal(out, local)


def test_ray_backend_two_workers(tmp_path, ray_cluster):
    out, ref = _run_backend(tmp_path, "ray", BackendConfig("ray", workers=2, progress=False))
    np.testing.assert_allclose(out, ref, atol=1e-4)
    one, _ = _run_backend(tmp_path, "ray1", BackendConfig("ray", workers=1, progress=False))
    np.testing.assert_array_equal(out, one)


def test_dask_backend_two_workers(tmp_path, dask_address):
    out, ref = _run_backend(tmp_path, "dask", BackendConfig("dask", workers=2, address=dask_address,
                                                            progress=False))
    np.testing.assert_allclose(out, ref, atol=1e-4)


class FlakyFilter(FilterStep):
    """Raises on chosen blocks: ``flaky`` fail once (retried), ``broken`` always fail."""

    def __init__(self, cfg, flaky=(), broken=(), marker_dir=None):
        super().__init__(cfg)
        self.flaky, self.broken, self.marker_dir = set(flaky), set(broken), marker_dir

    def worker(self):
        import contextlib

        @contextlib.contextmanager
        def cm():
            with FilterStep.worker(self) as fn:
                def process(block):
                    if block.block_id in self.broken:
                        raise ValueError(f"synthetic failure in block {block.block_id}")
                    mark = os.path.join(self.marker_dir, f"tried{block.block_id}")
                    if block.block_id in self.flaky and not os.path.exists(mark):
                        open(mark, "w").close()
                        raise RuntimeError("transient failure")
                    fn(block)
                yield process
        return cm()


@pytest.mark.parametrize("backend", ["local", "daisy"])
def test_retry_and_failure_report(tmp_path, backend):
    url, data = _input(tmp_path)
    cfg = FilterConfig(url, f"{tmp_path}/out.zarr/smooth", block_shape_nm=(160, 80, 80))
    task = FlakyFilter(cfg, flaky={1, 2}, broken={4}, marker_dir=str(tmp_path))
    bcfg = BackendConfig(backend, workers=2 if backend != "local" else 1, max_retries=1, progress=False)
    with pytest.raises(BlockwiseError, match=r"1 of \d+ blocks failed \(block ids \[4\]\)") as exc:
        run_task(task, bcfg)
    assert "synthetic failure in block 4" in str(exc.value)
    st = task_status(task)
    assert st.failed == 1 and st.done == st.total - 1
    # the other blocks' output is intact (block 4 was never written: a strict read refuses it)
    with pytest.raises(Exception, match="never written"):
        open_volume(cfg.output).read()
    out = open_volume(cfg.output, missing="zeros").read()
    ref = _reference(data, cfg)
    b4 = task.blocks()[4].write_roi
    mask = np.ones(out.shape, bool)
    mask[tuple(slice(x // v, (x + n) // v) for x, n, v in zip(b4.begin, b4.shape, VS))] = False
    np.testing.assert_allclose(out[mask], ref[mask], atol=1e-4)
    # fixed: re-run only processes block 4
    report = run_task(FilterStep(cfg), BackendConfig("local", progress=False))
    assert report.processed == 1 and report.skipped == report.total - 1
    np.testing.assert_allclose(open_volume(cfg.output).read(), ref, atol=1e-4)


def test_changed_config_refuses_resume(tmp_path):
    url, _ = _input(tmp_path)
    cfg = FilterConfig(url, f"{tmp_path}/out.zarr/smooth", block_shape_nm=(160, 80, 80))
    run_task(FilterStep(cfg), BackendConfig(progress=False))
    cfg2 = FilterConfig(url, cfg.output, sigma_nm=(80, 8, 8), block_shape_nm=(160, 80, 80))
    with pytest.raises(BlockwiseError, match="changed: .*sigma_nm"):
        run_task(FilterStep(cfg2), BackendConfig(progress=False))
    rep = run_task(FilterStep(cfg2), BackendConfig(progress=False), overwrite=True)
    assert rep.processed == rep.total


def test_kill_9_and_resume_is_identical(tmp_path):
    url, data = _input(tmp_path, shape=(16, 80, 80))
    out_url = f"{tmp_path}/out.zarr/smooth"
    script = textwrap.dedent(f"""
        import time, sys
        from cleftwise.blockwise.filter_step import FilterConfig, FilterStep
        from cleftwise.blockwise.runner import BackendConfig, run_task
        import cleftwise.blockwise.filter_step as ft
        orig = ft.FilterStep.worker
        class Slow(ft.FilterStep):
            def worker(self):
                import contextlib
                @contextlib.contextmanager
                def cm():
                    with orig(self) as fn:
                        def p(b):
                            fn(b); time.sleep(0.15)
                        yield p
                return cm()
        cfg = FilterConfig({url!r}, {out_url!r}, block_shape_nm=(160, 80, 80))
        run_task(Slow(cfg), BackendConfig(sys.argv[1], workers=2, progress=False))
    """)
    path = tmp_path / "job.py"
    path.write_text(script)
    cfg = FilterConfig(url, out_url, block_shape_nm=(160, 80, 80))
    task = FilterStep(cfg)
    total = len(task.blocks())
    proc = subprocess.Popen([sys.executable, str(path), "local"], start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline and task_status(task).done < total // 3:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = task_status(task).done
    assert 0 < done_before < total
    marks_before = {r["block_id"]: r["time"] for r in Ledger(task.ledger_path()).records()}
    report = run_task(FilterStep(cfg), BackendConfig("daisy", workers=2, progress=False))
    assert report.skipped == done_before and report.processed == total - done_before
    marks_after = {r["block_id"]: r["time"] for r in Ledger(task.ledger_path()).records()}
    assert all(marks_after[b] == t for b, t in marks_before.items())  # not recomputed
    # byte-identical to an uninterrupted run
    ref_cfg = FilterConfig(url, f"{tmp_path}/ref.zarr/smooth", block_shape_nm=(160, 80, 80))
    run_task(FilterStep(ref_cfg), BackendConfig(progress=False))
    a, b = open_volume(out_url).read(), open_volume(ref_cfg.output).read()
    assert a.tobytes() == b.tobytes()


def test_daisy_workers_through_command_template(tmp_path):
    """Workers launched through a template (as `srun … {command}` would on SLURM)."""
    marker = tmp_path / "launched"
    template = f"touch {marker} && env CLEFTWISE_WORKER=1 {{command}}"
    out, ref = _run_backend(tmp_path, "tmpl", BackendConfig("daisy", workers=2, worker_command=template,
                                                            progress=False))
    assert marker.exists()
    np.testing.assert_allclose(out, ref, atol=1e-4)
    with pytest.raises(BlockwiseError, match="must contain"):
        BackendConfig("daisy", worker_command="srun -n1")


def test_an_array_the_job_did_not_make_is_never_replaced_silently(tmp_path):
    """Outputs carry the ledger that made them: a fresh job finding an array made elsewhere (a
    user's data, an older cleftwise's finished output) at its output URL refuses; --overwrite
    replaces it; the job's own output is recreated freely after its ledger was dropped."""
    url, data = _input(tmp_path)
    out = f"{tmp_path}/out.zarr/smooth"
    theirs = create_volume(out, shape=data.shape, voxel_size=VS, dtype="float32", chunk_shape=(4, 20, 20))
    theirs.write(theirs.roi, np.full(data.shape, 7, np.float32))
    cfg = FilterConfig(url, out, block_shape_nm=(160, 80, 80))
    with pytest.raises(BlockwiseError, match="already exists and was made by another program"):
        run_task(FilterStep(cfg), BackendConfig(progress=False))
    assert (open_volume(out).read() == 7).all()
    run_task(FilterStep(cfg), BackendConfig(progress=False), overwrite=True)
    ref = _reference(data, cfg)
    np.testing.assert_allclose(open_volume(out).read(), ref, atol=1e-4)
    Ledger(FilterStep(cfg).ledger_path()).clear()  # e.g. dropped because its inputs changed
    assert run_task(FilterStep(cfg), BackendConfig(progress=False)).processed > 0
