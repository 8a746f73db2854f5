#!/usr/bin/env python
"""Evaluate shipped RSUNet weights through the real blockwise pipeline on a labelled volume.

``cleftwise evaluate --checkpoint models/weights/rsunet_polarity.pt --volume eval.zarr``
(or ``python launch/evaluate.py …``). Thin CLI over :func:`cleftwise.train.evaluate.evaluate`,
which explains the pipeline and the metrics; the report is ``<out>.json``, ``<out>.md``,
``<out>.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Optional

from cleftwise.launch._common import new_parser, setup_logging
from cleftwise.train.errors import TrainError
from cleftwise.train.evaluate import EvalConfig, evaluate

log = logging.getLogger("cleftwise.train.evaluate")


def _parser() -> argparse.ArgumentParser:
    p = new_parser(description=__doc__.splitlines()[0],
                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = EvalConfig()
    p.add_argument("--checkpoint", default=d.checkpoint)
    p.add_argument("--volume", required=True, help="zarr container with raw/neurons/synapses/polarity/cleft")
    p.add_argument("--work-dir", default=d.work_dir)
    p.add_argument("--out", default=d.out, help="report prefix (.json/.md/.png)")
    p.add_argument("--stride", type=int, nargs=3, metavar=("Z", "Y", "X"), help="patch stride (voxels)")
    p.add_argument("--block-shape", type=int, nargs=3, metavar=("Z", "Y", "X"), default=d.block_shape)
    p.add_argument("--threshold", type=float, default=d.threshold)
    p.add_argument("--min-size", type=int, default=d.min_size)
    p.add_argument("--partner-rule", choices=["majority", "contrast"], default=d.partner_rule)
    p.add_argument("--max-neuron-fraction", type=float, default=d.max_neuron_fraction,
                   help="drop detections lying for more than this share in one neuron")
    p.add_argument("--device", default=d.device)
    p.add_argument("--threads", type=int, default=d.torch_threads)
    p.add_argument("--tta", action="store_true", help="test-time augmentation: mean over the 8 flips")
    p.add_argument("--training-info", help="JSON file whose content is added to the report as 'training'")
    return p


def main(argv: Optional[list] = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args)
    cfg = EvalConfig(checkpoint=args.checkpoint, volume=args.volume, work_dir=args.work_dir, out=args.out,
                     threshold=args.threshold, min_size=args.min_size, device=args.device,
                     torch_threads=args.threads, partner_rule=args.partner_rule, block_shape=tuple(args.block_shape),
                     max_neuron_fraction=args.max_neuron_fraction, tta=args.tta,
                     stride=None if args.stride is None else tuple(args.stride))
    training = None
    if args.training_info:
        with open(args.training_info) as f:
            training = json.load(f)
    try:
        report = evaluate(cfg, training)
    except TrainError as e:
        log.error("%s", e)
        return 2
    sys.stdout.write(json.dumps({k: report[k] for k in ("instance", "assignment", "cremi_union")},
                                indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
