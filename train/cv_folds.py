"""Out-of-fold models for choosing post-processing without touching the held-out region.

A model's own training band is a poor place to choose its segment settings (threshold,
min_size): the model is more confident there than on tissue it has not seen, so small
components survive that would be false detections elsewhere. ``cleftwise cv-folds`` retrains the same
recipe on two y-folds of the training band: fold ``a`` trains on y >= cut and never sees
y < cut, fold ``b`` the reverse. Each fold model then predicts the fold it did not see
(``cleftwise evaluate-real --choose-on``), and the settings are chosen on those out-of-fold
predictions. The held-out region outside the training band is used by neither fold.

The recipe may have several stages (e.g. ``vnc_cleft.yaml`` then the fine-tuning
``vnc_cleft_ft.yaml``): stage k > 1 starts from the fold's stage k - 1 weights (its
``init_weights`` is replaced). Per fold and stage: ``<run-root>/<fold>/stage<k>/`` (run) and
``<run-root>/<fold>/stage<k>.pt`` (exported best EMA weights). Each stage's first data.train
entry gives the volume and the band (its ``roi``); the fold's held-out part becomes data.val.

    cleftwise cv-folds --fold a --cut-y-nm 2120 --run-root runs/vnc_cv \\
        --stage train/configs/vnc_cleft.yaml --stage-steps 700 --schedule-steps 2000 \\
        --stage train/configs/vnc_cleft_ft.yaml

A later stage can be added to existing folds: ``--first-stage 3 --init runs/vnc_cv/a/stage2.pt
--stage train/configs/vnc_cleft_ft2.yaml`` trains only that stage, from the given weights.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import yaml

from cleftwise.train.errors import TrainError
from cleftwise.train.loop import export_weights, parse_train_config, train

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


@dataclass
class CVFoldsConfig:
    """One fold's run of a multi-stage recipe (see the module docstring)."""

    fold: str
    """``a`` (trains on y >= cut) or ``b`` (trains below)."""
    cut_y_nm: float
    """absolute y (nm) where the band is split."""
    run_root: str
    """outputs: ``<run_root>/<fold>/stage<k>/`` and ``<run_root>/<fold>/stage<k>.pt``."""
    stages: Sequence[str]
    """training YAMLs of the stages, in order."""
    stage_steps: Sequence[int] = ()
    """max_steps of the stages, in order (missing: each YAML's)."""
    schedule_steps: Sequence[int] = ()
    """lr schedule length of the stages, in order (missing: their max_steps)."""
    first_stage: int = 1
    """number k of the first stage (its outputs: stage<k>/, stage<k>.pt)."""
    init: Optional[str] = None
    """weights the first stage starts from (None: its YAML's init_weights)."""
    threads: int = 1
    """torch CPU threads."""


def train_folds(cfg: CVFoldsConfig) -> dict:
    """Train every stage of one fold in turn, each from the previous stage's exported weights;
    returns ``{"stage<k>": {weights, step, best_step, best_metric, elapsed_s}}``."""
    if cfg.first_stage < 1:
        raise TrainError("first_stage must be >= 1")
    init = cfg.init
    out = {}
    for i, path in enumerate(cfg.stages):
        k = cfg.first_stage + i
        with open(path) as f:
            stage = yaml.safe_load(f)
        run_dir = os.path.join(cfg.run_root, cfg.fold, f"stage{k}")
        fcfg = fold_config(stage, cfg.fold, cfg.cut_y_nm, run_dir, init)
        fcfg["threads"] = cfg.threads
        if len(cfg.stage_steps) > i:
            fcfg["max_steps"] = cfg.stage_steps[i]
        if len(cfg.schedule_steps) > i:
            fcfg.setdefault("optim", {})["schedule_steps"] = cfg.schedule_steps[i]
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "fold_config.yaml"), "w") as f:
            yaml.safe_dump(fcfg, f, sort_keys=False)
        summary = train(parse_train_config(fcfg, where=path), overwrite=True)
        init = export_weights(run_dir, os.path.join(cfg.run_root, cfg.fold, f"stage{k}.pt"))
        out[f"stage{k}"] = {"weights": init, "step": summary["step"], "best_step": summary["best_step"],
                            "best_metric": summary["best_metric"], "elapsed_s": round(summary["elapsed_s"], 1)}
    return out
