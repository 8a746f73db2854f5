#!/usr/bin/env python
"""Evaluate a cleft model on a held-out band of a real EM stack through the blockwise pipeline.

``cleftwise evaluate-real`` (or ``python launch/evaluate_real.py``; defaults: the VNC ssTEM
stack imported into ``runs/vnc/vnc.zarr``, weights ``models/weights/vnc_cleft.pt``, report
``docs/reports/real_data.*``). Thin CLI over :mod:`cleftwise.train.evaluate_real`, which explains the
steps and the metrics.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Optional

from cleftwise.launch._common import new_parser, setup_logging
from cleftwise.train.errors import TrainError
from cleftwise.train.evaluate_real import RealEvalConfig, evaluate_with_comparisons, training_info

log = logging.getLogger("cleftwise.train.evaluate_real")


def _parser() -> argparse.ArgumentParser:
    d = RealEvalConfig()
    p = new_parser(description=__doc__.splitlines()[0],
                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default=d.checkpoint)
    p.add_argument("--volume", default=d.volume, help="zarr with raw, synapse_mask, synapses")
    p.add_argument("--raw", default=d.raw, help="raw dataset name inside --volume")
    p.add_argument("--heldout", type=int, nargs=6, metavar="N", help="z y x begin, z y x shape (voxels)")
    p.add_argument("--train-region", type=int, nargs=6, metavar="N", help="z y x begin, z y x shape (voxels)")
    p.add_argument("--choose-on", nargs=7, action="append", metavar=("CHECKPOINT", "Z", "Y", "X", "DZ", "DY", "DX"),
                   help="out-of-fold choice of threshold/min_size: a checkpoint trained without this region "
                        "(voxels: begin, shape) predicts it; repeatable (see cleftwise cv-folds)")
    p.add_argument("--threshold", type=float, help="fixed threshold (default: chosen on the training band)")
    p.add_argument("--min-size", type=int, help="fixed min_size (default: chosen on the training band)")
    p.add_argument("--work-dir", default=d.work_dir)
    p.add_argument("--out", default=d.out, help="report prefix (.json, .md, _montage.png)")
    p.add_argument("--run-dir", default="runs/vnc_cleft", help="training run whose log.csv gives steps/time")
    p.add_argument("--hardware", default=None, help="training hardware, for the report")
    p.add_argument("--compare", nargs=3, action="append", metavar=("CHECKPOINT", "RAW", "TITLE"),
                   help="also evaluate another model on the same band (e.g. the synthetic-trained "
                        "polarity model on a raw copy declared at its voxel size); repeatable")
    p.add_argument("--threads", type=int, default=d.torch_threads)
    p.add_argument("--device", default=d.device)
    p.add_argument("--note-file", help="Markdown file whose text is appended to the report (e.g. how the "
                   "shipped model was chosen)")
    p.add_argument("--tta", action="store_true", help="test-time augmentation: mean over the 8 flips")
    return p


def main(argv: Optional[list] = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args)
    d = RealEvalConfig()
    heldout = (tuple(args.heldout[:3]), tuple(args.heldout[3:])) if args.heldout else d.heldout
    train_region = (tuple(args.train_region[:3]), tuple(args.train_region[3:])) if args.train_region else d.train_region
    training = training_info(args.run_dir)
    if args.hardware:
        training["hardware"] = args.hardware
    choose_on = tuple((c[0], (tuple(int(v) for v in c[1:4]), tuple(int(v) for v in c[4:7])))
                      for c in args.choose_on or [])
    try:
        cfg = RealEvalConfig(checkpoint=args.checkpoint, raw=args.raw, threshold=args.threshold,
                             min_size=args.min_size, work_dir=args.work_dir, out=None, choose_on=choose_on,
                             title="real-data cleft model (vnc_cleft)", training=training, volume=args.volume,
                             heldout=heldout, train_region=train_region, torch_threads=args.threads,
                             device=args.device, tta=args.tta)
        note = ""
        if args.out and args.note_file:
            with open(args.note_file) as f:
                note = f.read().strip()
        reports = evaluate_with_comparisons(cfg, [tuple(c) for c in args.compare or []], out=args.out, note=note)
    except TrainError as e:
        log.error("%s", e)
        return 2
    summary = {x["title"]: {"f1_iou": x["instance_iou_headline"]["f1"], "f1_iou_strict": x["instance_iou_strict"]["f1"],
                            "f1_centroid": x["instance_centroid"]["f1"], "cremi_f1": x["cremi"]["f1"],
                            "cremi_score_nm": x["cremi"]["cremi_score"]} for x in reports}
    sys.stdout.write(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
