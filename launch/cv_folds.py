#!/usr/bin/env python
"""Out-of-fold models for choosing post-processing without touching the held-out region.

Thin CLI over :func:`cleftwise.train.cv_folds.train_folds` (the module docstring explains the
folds and stages)::

    cleftwise cv-folds --fold a --cut-y-nm 2120 --run-root runs/vnc_cv \\
        --stage train/configs/vnc_cleft.yaml --stage-steps 700 --schedule-steps 2000 \\
        --stage train/configs/vnc_cleft_ft.yaml

Also ``python launch/cv_folds.py``.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from cleftwise.launch._common import new_parser, setup_logging
from cleftwise.train.cv_folds import CVFoldsConfig, train_folds
from cleftwise.train.errors import TrainError

log = logging.getLogger("cleftwise.launch.cv_folds")


def main(argv=None) -> int:
    p = new_parser(description=__doc__.splitlines()[0])
    p.add_argument("--fold", required=True, choices=["a", "b"])
    p.add_argument("--cut-y-nm", type=float, required=True, help="absolute y (nm) where the band is split")
    p.add_argument("--run-root", required=True)
    p.add_argument("--stage", action="append", required=True, help="training YAML of a stage, in order")
    p.add_argument("--stage-steps", type=int, action="append", default=[],
                   help="max_steps of the stages, in order (default: each YAML's)")
    p.add_argument("--schedule-steps", type=int, action="append", default=[],
                   help="lr schedule length of the stages, in order (default: their max_steps)")
    p.add_argument("--first-stage", type=int, default=1,
                   help="number of the first --stage (its outputs: stage<K>/, stage<K>.pt)")
    p.add_argument("--init", help="weights the first --stage starts from (default: its YAML's "
                                  "init_weights); e.g. the fold's stage<K-1>.pt")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    setup_logging(args)
    if args.first_stage < 1:
        p.error("--first-stage must be >= 1")
    if args.init is not None and not os.path.isfile(args.init):
        p.error(f"--init {args.init}: no such file")
    cfg = CVFoldsConfig(fold=args.fold, cut_y_nm=args.cut_y_nm, run_root=args.run_root, stages=tuple(args.stage),
                        stage_steps=tuple(args.stage_steps), schedule_steps=tuple(args.schedule_steps),
                        first_stage=args.first_stage, init=args.init, threads=args.threads)
    try:
        out = train_folds(cfg)
    except TrainError as e:
        log.error("%s", e)
        return 2
    sys.stdout.write(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
