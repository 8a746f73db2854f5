#!/usr/bin/env python
"""Out-of-fold models for choosing post-processing without touching the held-out region.

A model's own training band is a poor place to choose its segment settings (threshold,
min_size): the model is more confident there than on tissue it has not seen, so small
components survive that would be false detections elsewhere. This script retrains the same
recipe on two y-folds of the training band: fold ``a`` trains on y >= cut and never sees
y < cut, fold ``b`` the reverse. Each fold model then predicts the fold it did not see
(``train/evaluate_real.py --choose-on``), and the settings are chosen on those out-of-fold
predictions. The held-out region outside the training band is used by neither fold.

The recipe may have several stages (e.g. ``vnc_cleft.yaml`` then the fine-tuning
``vnc_cleft_ft.yaml``): stage k > 1 starts from the fold's stage k - 1 weights (its
``init_weights`` is replaced). Per fold and stage: ``<run-root>/<fold>/stage<k>/`` (run) and
``<run-root>/<fold>/stage<k>.pt`` (exported best EMA weights). Each stage's first data.train
entry gives the volume and the band (its ``roi``); the fold's held-out part becomes data.val.

    python train/cv_folds.py --fold a --cut-y-nm 2120 --run-root runs/vnc_cv \\
        --stage train/configs/vnc_cleft.yaml --stage-steps 700 --schedule-steps 2000 \\
        --stage train/configs/vnc_cleft_ft.yaml

A later stage can be added to existing folds: ``--first-stage 3 --init runs/vnc_cv/a/stage2.pt
--stage train/configs/vnc_cleft_ft2.yaml`` trains only that stage, from the given weights.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0]) == _HERE:  # run as a script: import from the repo root
    sys.path[0] = os.path.dirname(_HERE)

import yaml  # noqa: E402

from cleftwise.train.errors import TrainError  # noqa: E402
from cleftwise.train.loop import export_weights, parse_train_config, train  # noqa: E402

log = logging.getLogger("cv_folds")


def fold_regions(band: list, cut_y_nm: float, fold: str) -> tuple[list, list]:
    """(train roi, unseen roi), each ``[[z, y, x] begin nm, [z, y, x] shape nm]``, of one fold
    of ``band`` split at the absolute y ``cut_y_nm``: fold ``a`` trains on y >= cut, ``b`` below."""
    (z0, y0, x0), (dz, dy, dx) = band
    if not y0 < cut_y_nm < y0 + dy:
        raise TrainError(f"cut y = {cut_y_nm} nm is not inside the band y [{y0}, {y0 + dy}) nm")
    low = [[z0, y0, x0], [dz, cut_y_nm - y0, dx]]
    high = [[z0, cut_y_nm, x0], [dz, y0 + dy - cut_y_nm, dx]]
    if fold == "a":
        return high, low
    if fold == "b":
        return low, high
    raise TrainError(f"fold must be 'a' or 'b', got {fold!r}")


def fold_config(stage: dict, fold: str, cut_y_nm: float, run_dir: str, init: str | None) -> dict:
    """The stage's config dict rewritten for one fold (train/val regions, run_dir, init)."""
    cfg = copy.deepcopy(stage)
    train_specs = cfg["data"]["train"]
    if len(train_specs) != 1 or not train_specs[0].get("roi"):
        raise TrainError("cv_folds: a stage needs exactly one data.train volume with a roi (the band)")
    tr, unseen = fold_regions(train_specs[0]["roi"], cut_y_nm, fold)
    spec = dict(train_specs[0])
    cfg["data"]["train"] = [dict(spec, roi=tr)]
    cfg["data"]["val"] = [dict(spec, roi=unseen)]
    cfg["run_dir"] = run_dir
    cfg.pop("max_minutes", None)
    if init is not None:
        cfg["init_weights"] = init
    return cfg


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.first_stage < 1:
        p.error("--first-stage must be >= 1")
    if args.init is not None and not os.path.isfile(args.init):
        p.error(f"--init {args.init}: no such file")
    init = args.init
    out = {}
    try:
        for i, path in enumerate(args.stage):
            k = args.first_stage + i
            with open(path) as f:
                stage = yaml.safe_load(f)
            run_dir = os.path.join(args.run_root, args.fold, f"stage{k}")
            cfg = fold_config(stage, args.fold, args.cut_y_nm, run_dir, init)
            cfg["threads"] = args.threads
            if len(args.stage_steps) > i:
                cfg["max_steps"] = args.stage_steps[i]
            if len(args.schedule_steps) > i:
                cfg.setdefault("optim", {})["schedule_steps"] = args.schedule_steps[i]
            os.makedirs(run_dir, exist_ok=True)
            with open(os.path.join(run_dir, "fold_config.yaml"), "w") as f:
                yaml.safe_dump(cfg, f, sort_keys=False)
            summary = train(parse_train_config(cfg, where=path), overwrite=True)
            init = export_weights(run_dir, os.path.join(args.run_root, args.fold, f"stage{k}.pt"))
            out[f"stage{k}"] = {"weights": init, "step": summary["step"], "best_step": summary["best_step"],
                                "best_metric": summary["best_metric"], "elapsed_s": round(summary["elapsed_s"], 1)}
    except TrainError as e:
        log.error("%s", e)
        return 2
    sys.stdout.write(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
