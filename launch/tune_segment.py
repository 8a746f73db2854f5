#!/usr/bin/env python
"""Choose the segment step's threshold and minimum size on a *validation* volume.

``cleftwise tune-segment --checkpoint models/weights/rsunet_polarity.pt --volume val.zarr``
(or ``python launch/tune_segment.py …``). Thin CLI over :mod:`cleftwise.train.tune_segment`:
prints one row per (threshold, min_size, max_neuron_fraction), counts summed over the volumes,
and the best setting by F1; writes them as JSON with ``--out``. Use a validation volume, never
the test volume the report is made on.
"""

from __future__ import annotations

import json
import sys

import pandas as pd

from cleftwise.launch._common import new_parser
from cleftwise.train.tune_segment import aggregate, best_setting, sweep_volumes


def main(argv=None) -> int:
    p = new_parser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--volume", required=True, nargs="+",
                   help="validation zarr(s) with raw/neurons/synapses/polarity; counts are summed over them")
    p.add_argument("--work-dir", default="runs/tune_segment")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.4, 0.5, 0.6])
    p.add_argument("--min-sizes", type=int, nargs="+", default=[200, 1000, 2000, 4000])
    p.add_argument("--stride", type=int, nargs=3)
    p.add_argument("--partner-rule", default="contrast", choices=["majority", "contrast"])
    p.add_argument("--neuron-fractions", type=float, nargs="*", default=[],
                   help="max_neuron_fraction values to try besides no filter")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tta", action="store_true", help="predict with test-time augmentation (8 flips)")
    p.add_argument("--out", help="JSON file for the table")
    args = p.parse_args(argv)
    rows = sweep_volumes(args.checkpoint, args.volume, args.work_dir, args.thresholds, args.min_sizes, args.stride,
                         partner_rule=args.partner_rule, threads=args.threads,
                         neuron_fractions=args.neuron_fractions, tta=args.tta)
    df = aggregate(pd.DataFrame(rows))
    sys.stdout.write(df.round(3).to_string(index=False) + "\n")
    best = best_setting(df)
    sys.stdout.write(f"best on {', '.join(args.volume)}: threshold {best['threshold']}, min_size "
                     f"{best['min_size']}, max_neuron_fraction {best['max_neuron_fraction']} (F1 {best['f1']:.3f})\n")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"volumes": args.volume, "checkpoint": args.checkpoint, "rows": rows,
                       "summed": df.to_dict(orient="records"),
                       "best": {k: best[k] for k in ("threshold", "min_size", "max_neuron_fraction")}}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
