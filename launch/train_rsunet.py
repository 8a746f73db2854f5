#!/usr/bin/env python
"""Train an RSUNet synapse model: ``cleftwise train-rsunet --config train.yaml``.

Thin CLI over :func:`cleftwise.train.loop.train`: parse → :class:`~cleftwise.train.loop.TrainConfig`
→ train → optionally export the best (EMA) weights as a cleftwise checkpoint for the predict step.
Also ``python launch/train_rsunet.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from cleftwise.launch._common import new_parser, setup_logging
from cleftwise.train.errors import TrainError
from cleftwise.train.loop import export_weights, load_train_config, train


def _parser() -> argparse.ArgumentParser:
    p = new_parser(description=__doc__.splitlines()[0],
                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", required=True, help="training YAML (see train/configs/)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of run_dir")
    g.add_argument("--overwrite", action="store_true", help="delete run_dir's checkpoints and start fresh")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override the config's device")
    p.add_argument("--max-steps", type=int, help="override max_steps (also the length of the lr schedule "
                   "unless optim.schedule_steps is set)")
    p.add_argument("--max-minutes", type=float, help="override max_minutes (stop with a checkpoint)")
    p.add_argument("--run-dir", help="override run_dir")
    p.add_argument("--threads", type=int, help="override threads (torch CPU threads)")
    p.add_argument("--export", metavar="PATH", help="after training, write the best EMA weights to "
                   "PATH (.pt + .json), e.g. models/weights/rsunet_polarity.pt")
    p.add_argument("--export-aux", action="store_true",
                   help="keep the auxiliary output channels (data.aux) in the exported model")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args)
    try:
        cfg = load_train_config(args.config)
        if args.device:
            cfg.device = args.device
        if args.max_steps is not None:
            if args.max_steps < 1:
                raise TrainError(f"--max-steps must be >= 1, got {args.max_steps}")
            cfg.max_steps = args.max_steps
        if args.max_minutes is not None:
            cfg.max_minutes = args.max_minutes
        if args.run_dir:
            cfg.run_dir = args.run_dir
        if args.threads is not None:
            cfg.threads = args.threads
        summary = train(cfg, resume=args.resume, overwrite=args.overwrite)
        summary = {k: v for k, v in summary.items() if k not in ("model", "ema_model")}
        if args.export:
            summary["exported"] = export_weights(cfg.run_dir, args.export, keep_aux=args.export_aux)
    except TrainError as e:
        logging.getLogger("cleftwise.launch.train_rsunet").error("%s", e)
        return 2
    sys.stdout.write(json.dumps(summary, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
