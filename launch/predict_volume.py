#!/usr/bin/env python
"""Run the cleftwise pipeline on a volume: ``python launch/predict_volume.py --config C.yaml``.

``python launch/predict_volume.py --demo`` instead generates a synthetic volume and runs every
stage with the shipped weights (:mod:`cleftwise.postprocess.demo`). Thin CLI: parse → build the config
dataclasses → call :mod:`cleftwise.postprocess.pipeline`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

import yaml

from cleftwise.errors import CleftwiseError
from cleftwise.launch._common import new_parser, setup_logging, show_progress
from cleftwise.postprocess.pipeline import STAGES, parse_config, pipeline_status, run_pipeline
from cleftwise.storage.config_io import yaml_error_text
from cleftwise.storage.errors import StorageError


def _parser() -> argparse.ArgumentParser:
    p = new_parser(description=__doc__.splitlines()[0],
                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", help="pipeline YAML (see README: Configuration)")
    p.add_argument("--demo", action="store_true",
                   help="synthetic volume + shipped weights, every stage, scored against ground truth")
    p.add_argument("--demo-dir", default="cleftwise_demo", help="--demo: output folder")
    p.add_argument("--demo-shape", type=int, nargs=3, metavar=("Z", "Y", "X"), default=(48, 512, 512),
                   help="--demo: synthetic volume shape, voxels at 40x4x4 nm")
    p.add_argument("--demo-seed", type=int, default=7, help="--demo: seed of the synthetic volume")
    p.add_argument("--stages", default=",".join(STAGES),
                   help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--backend", choices=["local", "daisy", "ray", "dask"], help="override backend")
    p.add_argument("--workers", type=int, help="override number of workers")
    p.add_argument("--address", help="ray/dask cluster address (ray: auto or ray://host:port)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", default=True,
                   help="skip blocks already done (default)")
    g.add_argument("--overwrite", action="store_true", help="discard earlier results and start fresh")
    p.add_argument("--status", action="store_true", help="print blocks done/remaining/failed per stage")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv=None) -> int:
    """Run the command; every error is one ``error: …`` line (exit 1; 2 for a file that cannot be
    read or written, e.g. the config), Ctrl-C one line saying what was interrupted and how to
    resume (exit 130)."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        return _main(args_list)
    except KeyboardInterrupt as e:
        where = getattr(e, "cleftwise_where", None)
        print(f"interrupted{' in ' + where if where else ''}; finished work is kept. To resume, run the "
              f"same command: "
              f"cleftwise predict {shlex.join(args_list)}", file=sys.stderr)
        return 130
    except (OSError, yaml.YAMLError) as e:  # the config file itself: missing, unreadable, bad YAML
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except CleftwiseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _main(argv: list) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args)
    if args.demo:
        if args.config:
            _parser().error("--demo runs on its own synthetic volume: give --demo or --config, not both")
        return _demo(args)
    if not args.config:
        _parser().error("--config (or --demo) is required")
    try:
        with open(args.config) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:  # one line naming the file, line and column (exit 2, below)
        raise yaml.YAMLError(yaml_error_text(args.config, e)) from e
    if not isinstance(data, dict):
        raise StorageError(f"{args.config}: top level must be a mapping")
    backend = dict(data.get("backend") or {})
    for key in ("backend", "workers", "address"):
        if getattr(args, key) is not None:
            backend[key] = getattr(args, key)
    if not show_progress(args):
        backend["progress"] = False
    data["backend"] = backend
    cfg = parse_config(data, where=args.config)
    if args.status:
        print(json.dumps(pipeline_status(cfg), indent=1))
        return 0
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    summary = run_pipeline(cfg, stages, overwrite=args.overwrite)
    print(json.dumps(summary["stages"], indent=1))
    return 0


def _demo(args) -> int:
    from cleftwise.postprocess.demo import DemoConfig, format_summary, run_demo

    cfg = DemoConfig(out_dir=args.demo_dir, shape=tuple(args.demo_shape), seed=args.demo_seed,
                     backend=args.backend or "local", workers=args.workers or 1,
                     progress=show_progress(args), overwrite=args.overwrite)
    summary = run_demo(cfg)
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
