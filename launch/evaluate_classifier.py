#!/usr/bin/env python
"""Evaluate a synapse transmitter classifier on neuron-held-out data: per synapse and per neuron.

Thin CLI over :func:`cleftwise.train.evaluate_classifier.evaluate_checkpoint` (its module
explains the metrics, the threshold τ and the per-neuron vote)::

    cleftwise evaluate-classifier --config train/configs/ei_3d.yaml \\
        --checkpoint runs/ei/best.pt --out docs/reports --prefix ei [--tta] [--export models/weights/ei_vgg3d.pt]

Also ``python launch/evaluate_classifier.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Optional

from cleftwise.launch._common import new_parser, setup_logging
from cleftwise.train.errors import TrainError
from cleftwise.train.evaluate_classifier import ClassifierEvalConfig, evaluate_checkpoint

log = logging.getLogger("cleftwise.train.evaluate_classifier")


def _parser() -> argparse.ArgumentParser:
    p = new_parser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="the training YAML (its data section and split)")
    p.add_argument("--checkpoint", required=True, help="classifier checkpoint (.pt/.json)")
    p.add_argument("--out", required=True, help="folder for the JSON, Markdown and PNGs")
    p.add_argument("--prefix", default="ei", help="file name prefix (default ei)")
    p.add_argument("--tta", action="store_true", help="8-flip test-time augmentation")
    p.add_argument("--threshold", type=float, help="use this τ instead of choosing it on validation")
    p.add_argument("--min-synapses", type=int, default=5, help="neurons counted in the neuron accuracy")
    p.add_argument("--export", help="write the checkpoint with τ and metrics here (e.g. models/weights/x.pt)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--title", default="E/I synapse classifier evaluation")
    p.add_argument("--note", action="append", default=[], help="a paragraph appended to the Markdown")
    return p


def main(argv: Optional[list] = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = ClassifierEvalConfig(config=args.config, checkpoint=args.checkpoint, out=args.out, prefix=args.prefix,
                               tta=args.tta, threshold=args.threshold, min_synapses=args.min_synapses,
                               export=args.export, device=args.device, title=args.title, notes=tuple(args.note))
    try:
        report, paths = evaluate_checkpoint(cfg)
    except TrainError as e:
        log.error("%s", e)
        return 2
    print(json.dumps({"test": {k: report["test"][k] for k in ("accuracy", "balanced_accuracy", "roc_auc")},
                      "test_neurons": report["test_neurons"], "threshold": report["threshold"],
                      "files": paths}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
