#!/usr/bin/env python
"""Export the signed connectome of a synapse DB: ``--db URL --out DIR --format csv,graphml``.

Formats: csv, parquet (edge list + node table), graphml (networkx), npz (scipy sparse signed
adjacency + neurons.npy index), neuroglancer (precomputed LINE annotations pre → post).
"""

from __future__ import annotations

import argparse
import json
import sys

from postprocess.connectome import SignConfig
from postprocess.errors import PostprocessError
from postprocess.export import FORMATS, export_graph
from storage.errors import StorageError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--db", required=True, help="sqlite:///path.db or mongodb://host:port/db")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--format", default="csv", help=f"comma-separated subset of {','.join(FORMATS)}")
    p.add_argument("--min-score", type=float, default=0.0, help="drop synapses below this union score")
    p.add_argument("--min-partner-conf", type=float, default=0.0)
    p.add_argument("--keep-autapses", action="store_true")
    p.add_argument("--keep-background", action="store_true")
    p.add_argument("--drop-weak-neurons", action="store_true", help="weak/mixed neurons get sign 0")
    a = p.parse_args(argv)
    formats = [f.strip() for f in a.format.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        p.error(f"unknown format(s) {bad}; choose from {', '.join(FORMATS)}")
    cfg = SignConfig(min_synapse_score=a.min_score, min_partner_conf=a.min_partner_conf,
                     drop_autapses=not a.keep_autapses, drop_background=not a.keep_background,
                     drop_weak_neurons=a.drop_weak_neurons)
    try:
        from storage.synapse_db import open_store

        with open_store(a.db) as store:
            syn = store.query()
        written = export_graph(syn, a.out, formats, cfg=cfg)
    except (StorageError, PostprocessError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(written, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
