#!/usr/bin/env python
"""Train a synapse transmitter (E/I) classifier on synapse-centred cubes.

Thin CLI over :func:`cleftwise.train.train_classifier.train_classifier` (its module explains the
data, model, schedule, augmentation and resuming)::

    cleftwise train-classifier --config train/configs/ei_3d.yaml [--resume] [--threads 1]

Also ``python launch/train_classifier.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Optional

from cleftwise.launch._common import new_parser, setup_logging
from cleftwise.train.errors import TrainError
from cleftwise.train.train_classifier import load_classifier_config, train_classifier

log = logging.getLogger("cleftwise.train.train_classifier")


def _parser() -> argparse.ArgumentParser:
    p = new_parser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="training YAML (ClassifierTrainConfig)")
    p.add_argument("--run-dir", help="override run_dir")
    p.add_argument("--resume", action="store_true", help="continue from run_dir/checkpoints/last.pt")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--max-minutes", type=float, help="wall-time budget of this process")
    p.add_argument("--max-steps", type=int, help="override max_steps")
    return p


def main(argv: Optional[list] = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args)
    try:
        cfg = load_classifier_config(args.config)
        if args.run_dir:
            cfg.run_dir = args.run_dir
        if args.threads is not None:
            cfg.threads = args.threads
        if args.max_minutes is not None:
            cfg.max_minutes = args.max_minutes
        if args.max_steps is not None:
            cfg.max_steps = args.max_steps
        res = train_classifier(cfg, resume=args.resume)
    except TrainError as e:
        log.error("%s", e)
        return 2
    print(json.dumps({k: v for k, v in res.__dict__.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
