#!/usr/bin/env python
"""Evaluate neuron signs on real tables: MICrONS pinky100 (neuron-level classifier) and MANC.

Thin CLI over :mod:`cleftwise.train.evaluate_tables` (which explains both evaluations); writes
``real_tables.json``, ``real_tables.md``, ``real_tables.png``::

    cleftwise evaluate-tables --data ../shared/data/tables --out docs/reports [--repeats 10]

Also ``python launch/evaluate_tables.py``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Optional

from cleftwise.launch._common import new_parser, setup_logging
from cleftwise.postprocess.errors import PostprocessError
from cleftwise.storage.errors import StorageError
from cleftwise.train.errors import TrainError
from cleftwise.train.evaluate_tables import build_report, write_report


def main(argv: Optional[list] = None) -> int:
    p = new_parser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.path.join("..", "shared", "data", "tables"),
                   help="folder with microns-pinky100/ and manc-nt/")
    p.add_argument("--out", default="docs/reports", help="output folder for real_tables.{md,json,png}")
    p.add_argument("--repeats", type=int, default=10, help="CV repeats (5 folds each)")
    p.add_argument("--db", help="synapse DB URL for the MANC import (default: a temporary SQLite file)")
    a = p.parse_args(argv)
    setup_logging(a)
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        report = build_report(a.data, a.repeats, a.db)
    except (TrainError, PostprocessError, StorageError) as e:
        print(f"error: {e}")
        return 1
    files = write_report(report, a.out)
    m = report["microns"]["main"]["metrics"]
    ag = report["manc"]["agreement"]
    print(json.dumps({"microns": {k: round(m[k]["mean"], 4) for k in ("accuracy", "balanced_accuracy", "roc_auc")},
                      "manc_edges_same_sign": {k: v["fraction_same"] for k, v in ag["edges"].items()},
                      "manc_neurons_same_sign": {k: v["fraction_same"] for k, v in ag["all_neurons"].items()},
                      "files": files}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
