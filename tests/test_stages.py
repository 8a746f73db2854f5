"""The engine's stage registry on a generic two-stage pipeline (two Gaussian filters):
registration rules, resume, a changed setting re-runs that stage and those after it only,
a stage that refuses to re-run on change, skip and preflight hooks."""

import os
from dataclasses import dataclass, field

import numpy as np
import pytest

from cleftwise.blockwise.errors import BlockwiseError
from cleftwise.blockwise.filter_step import FilterConfig, FilterStep
from cleftwise.blockwise.runner import BackendConfig
from cleftwise.blockwise.stages import Registry, Stage, preflight_stages, run_stages, stages_status
from cleftwise.storage.volume import create_volume, open_volume

VS = (40, 4, 4)


@dataclass
class SmoothConfig:
    sigma_nm: tuple = (40.0, 8.0, 8.0)
    """Gaussian sigma (z, y, x), nm"""


@dataclass
class Run:
    """A run config: shared fields plus one section per stage."""

    raw: str
    out: str
    first: SmoothConfig = field(default_factory=SmoothConfig)
    second: SmoothConfig = field(default_factory=SmoothConfig)
    report: SmoothConfig = field(default_factory=SmoothConfig)
    note: dict = field(default_factory=dict)

    def stage_dir(self, name):
        return os.path.join(self.out, name)


def _filter(src, dst, cfg, work):
    step = FilterStep(FilterConfig(src, dst, sigma_nm=cfg.sigma_nm, block_shape_nm=(160, 80, 80)))
    step.work_dir = work
    return [step]


def _registry(refuse_first=False):
    first = Stage("first", SmoothConfig, work_dir=lambda r, c: r.stage_dir("first"),
                  steps=lambda r, c: _filter(r.raw, f"{r.out}/a.zarr/s", c, r.stage_dir("first")),
                  rerun_on_change=not refuse_first)
    second = Stage("second", SmoothConfig, work_dir=lambda r, c: r.stage_dir("second"), after=("first",),
                   steps=lambda r, c: _filter(f"{r.out}/a.zarr/s", f"{r.out}/b.zarr/s", c, r.stage_dir("second")))
    report = Stage("report", SmoothConfig, work_dir=lambda r, c: r.stage_dir("report"), after=("second",),
                   run=lambda r, c: {"sum": float(open_volume(f"{r.out}/b.zarr/s").read().sum())},
                   skip=lambda r, c: r.note.get("skip"))
    return Registry(first, second, report)


@pytest.fixture
def run(tmp_path):
    vol = create_volume(f"{tmp_path}/in.zarr/raw", shape=(8, 40, 40), voxel_size=VS, dtype="uint8",
                        chunk_shape=(4, 20, 20))
    vol.write(vol.roi, np.random.default_rng(0).integers(0, 255, (8, 40, 40), dtype=np.uint8))
    return Run(vol.url, str(tmp_path / "out"))


def test_registry_rules():
    cfg = SmoothConfig
    with pytest.raises(BlockwiseError, match="not registered before it"):
        Registry(Stage("b", cfg, work_dir=lambda r, c: "", after=("a",), run=lambda r, c: {}))
    with pytest.raises(BlockwiseError, match="registered twice"):
        Registry(Stage("a", cfg, work_dir=lambda r, c: "", run=lambda r, c: {}), Stage("a", cfg, work_dir=lambda r, c: "", run=lambda r, c: {}))
    with pytest.raises(BlockwiseError, match="exactly one of steps or run"):
        Stage("a", cfg, work_dir=lambda r, c: "")
    reg = _registry()
    assert reg.names == ("first", "second", "report")
    assert reg.downstream("first") == ["second", "report"] and reg.downstream("report") == []
    assert reg.check(["report", "first"]) == ("first", "report")
    with pytest.raises(BlockwiseError, match="unknown stage"):
        reg.check(["thrid"])


def test_resume_rerun_on_change_and_downstream_only(run):
    reg, backend = _registry(), BackendConfig(progress=False)
    s1 = run_stages(reg, run, reg.names, backend)
    assert s1["stages"]["first"]["processed"] == s1["stages"]["first"]["total"] > 1
    b1 = open_volume(f"{run.out}/b.zarr/s").read()
    again = run_stages(reg, run, reg.names, backend)
    assert again["stages"]["first"]["processed"] == again["stages"]["second"]["processed"] == 0
    assert again["stages"]["report"] == s1["stages"]["report"]
    # a new setting of the second stage re-runs it, not the first
    first_job = os.path.join(run.out, "first", "ledger", "filter", "job.json")
    stamp = os.stat(first_job).st_mtime_ns
    run.second = SmoothConfig(sigma_nm=(80.0, 8.0, 8.0))
    s2 = run_stages(reg, run, reg.names, backend)
    assert s2["stages"]["first"]["processed"] == 0
    assert s2["stages"]["second"]["processed"] == s2["stages"]["second"]["total"]
    assert os.stat(first_job).st_mtime_ns == stamp
    assert not np.array_equal(open_volume(f"{run.out}/b.zarr/s").read(), b1)
    # a new setting of the first stage re-runs both (the second's ledger is dropped)
    run.first = SmoothConfig(sigma_nm=(40.0, 12.0, 12.0))
    s3 = run_stages(reg, run, reg.names, backend)
    assert s3["stages"]["first"]["processed"] == s3["stages"]["first"]["total"]
    assert s3["stages"]["second"]["processed"] == s3["stages"]["second"]["total"]
    status = stages_status(reg, run)
    assert status["filter"]["remaining"] == 0


def test_refusing_stage_skip_and_preflight(run):
    reg, backend = _registry(refuse_first=True), BackendConfig(progress=False)
    run_stages(reg, run, ("first",), backend)
    run.first = SmoothConfig(sigma_nm=(80.0, 8.0, 8.0))
    with pytest.raises(BlockwiseError, match="refusing to resume"):
        run_stages(reg, run, ("first",), backend)
    assert run_stages(reg, run, ("first",), backend, overwrite=True)["stages"]["first"]["processed"] > 0
    run.note["skip"] = "nothing to report"
    assert run_stages(reg, run, reg.names, backend)["stages"]["report"] == {"skipped": "nothing to report"}
    checked = []
    pre = Registry(Stage("only", SmoothConfig, work_dir=lambda r, c: "", run=lambda r, c: {},
                         preflight=lambda r, c: checked.append(c.sigma_nm)))
    run.only = SmoothConfig()
    preflight_stages(pre, run, ("only",))
    assert checked == [(40.0, 8.0, 8.0)]


def test_a_pass_run_afresh_reruns_the_later_passes_of_its_stage(run, tmp_path):
    """Two passes of one stage (a → mid → out): change the settings, fail half-way through the
    first pass, change them back: the second pass must not resume its old (complete) ledger
    over an input the first pass has rewritten."""
    from cleftwise.blockwise.errors import BlockwiseError as Err

    fail = {"on": False}

    class MaybeFailing(FilterStep):
        def process(self, block, volumes):
            if fail["on"] and block.block_id >= 2:
                raise RuntimeError("interrupted")
            super().process(block, volumes)

    def steps(r, c):
        a = MaybeFailing(FilterConfig(r.raw, f"{r.out}/mid.zarr/s", sigma_nm=c.sigma_nm, block_shape_nm=(160, 80, 80)))
        a.work_dir = r.stage_dir("two")
        yield a  # built lazily: the second pass opens what the first one wrote
        b = FilterStep(FilterConfig(f"{r.out}/mid.zarr/s", f"{r.out}/out.zarr/s", sigma_nm=(40.0, 8.0, 8.0),
                                    block_shape_nm=(160, 80, 80)))
        b.name, b.work_dir = "filter_b", r.stage_dir("two")
        yield b

    reg = Registry(Stage("two", SmoothConfig, work_dir=lambda r, c: r.stage_dir("two"), steps=steps))
    run.two = SmoothConfig()
    backend = BackendConfig(progress=False, max_retries=0)
    run_stages(reg, run, ("two",), backend)
    reference = open_volume(f"{run.out}/out.zarr/s").read()
    run.two = SmoothConfig(sigma_nm=(80.0, 16.0, 16.0))
    fail["on"] = True
    with pytest.raises(Err, match="blocks failed"):
        run_stages(reg, run, ("two",), backend)
    fail["on"] = False
    run.two = SmoothConfig()
    report = run_stages(reg, run, ("two",), backend)["stages"]["two"]
    assert report[1]["processed"] == report[1]["total"], "the second pass ran again"
    np.testing.assert_array_equal(open_volume(f"{run.out}/out.zarr/s").read(), reference)
