#!/usr/bin/env python
"""Export the signed connectome of a synapse DB: ``--db URL --out DIR --format csv,graphml``.

Formats: csv, parquet (edge list + node table), graphml (networkx), npz (scipy sparse signed
adjacency, positive weights + neurons.npy index), neuroglancer (precomputed annotations, LINE
pre → post site or POINT, with pre/post neuron relationships). The filters (--min-score,
--min-partner-conf, autapses, background) apply to every format, annotations included.

Edges: ``weight`` ≥ 0 (synapse count, or summed score with --weight score), ``sign`` +1/−1
(missing when unknown, never 0) and ``signed_weight`` (docs/networkx.md).

Signs: from per-synapse E/I probabilities (``ei_prob``) by default; ``--sign-table`` adds a
per-neuron table (cell types or transmitters, ``--sign-class-col`` + ``--sign-map``, or
per-class probabilities ``--sign-prob-cols``) that takes priority; neurons where the sources
disagree are flagged in the node table. Example (MANC imported with launch/import_synapses.py):
    python launch/export_graph.py --db sqlite:////abs/manc.db --out graph --format csv,graphml \
        --sign-table ../shared/data/tables/manc-nt/neurons_nt.csv --sign-neuron-col bodyId \
        --sign-class-col nt_class --sign-map fly
"""

from __future__ import annotations

import argparse
import logging
import json
import sys

from cleftwise.launch._common import new_parser, setup_logging
from cleftwise.postprocess.connectome import EDGE_WEIGHTS, SignConfig
from cleftwise.postprocess.errors import PostprocessError
from cleftwise.postprocess.export import (FORMATS, SignTableConfig, export_graph, export_paths, signs_for,
                                          table_signs)
from cleftwise.storage.atomic import check_output_path
from cleftwise.storage.db.urls import db_files
from cleftwise.storage.errors import StorageError


def main(argv=None) -> int:
    p = new_parser(description=__doc__.splitlines()[0],
                   formatter_class=argparse.RawDescriptionHelpFormatter,
                   epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--db", required=True,
                   help="sqlite:///rel/path.db, sqlite:////abs/path.db or mongodb://host:port/db "
                        "(opened read-only)")
    p.add_argument("--out", required=True, help="output folder (files are replaced atomically)")
    p.add_argument("--format", default="csv", help=f"comma-separated subset of {','.join(FORMATS)}")
    p.add_argument("--min-score", type=float, default=0.0, help="drop synapses below this union score")
    p.add_argument("--min-partner-conf", type=float, default=0.0)
    p.add_argument("--keep-autapses", action="store_true")
    p.add_argument("--keep-background", action="store_true")
    p.add_argument("--drop-weak-neurons", action="store_true", help="weak/mixed neurons get no sign")
    p.add_argument("--weight", choices=list(EDGE_WEIGHTS), default="count",
                   help="edge weight: count (synapses, default) or score (summed union score)")
    p.add_argument("--annotation-kind", choices=["line", "point"], default="line",
                   help="neuroglancer annotations: line pre site → post site (default) or point at the cleft")
    p.add_argument("--sign-table", help="per-neuron table (CSV/Parquet) used as the first sign source")
    p.add_argument("--sign-neuron-col", default="neuron", help="neuron id column of --sign-table")
    p.add_argument("--sign-class-col", help="class column (cell type / transmitter) of --sign-table")
    p.add_argument("--sign-map", default="fly",
                   help="class → sign: fly, microns, a JSON file or 'cls=1,cls=-1' (default fly)")
    p.add_argument("--sign-confidence-col", help="column with the probability of the class call")
    p.add_argument("--sign-prob-cols", help="probability columns instead of a class column: 'col=class,...'")
    p.add_argument("--sign-prob-rule", choices=["argmax", "sum"], default="argmax",
                   help="with --sign-prob-cols: sign of the argmax class (default) or of the summed +/- mass")
    p.add_argument("--sign-unmapped", choices=["error", "unknown"], default="error",
                   help="classes missing from the map: error (default) or sign 0")
    p.add_argument("--no-synapse-signs", action="store_true",
                   help="ignore per-synapse ei_prob (signs from --sign-table only)")
    a = p.parse_args(argv)
    setup_logging(a, default=logging.WARNING)
    if a.sign_table and not (a.sign_class_col or a.sign_prob_cols):
        p.error("--sign-table needs --sign-class-col or --sign-prob-cols")
    formats = [f.strip() for f in a.format.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        p.error(f"unknown format(s) {bad}; choose from {', '.join(FORMATS)}")
    cfg = SignConfig(min_synapse_score=a.min_score, min_partner_conf=a.min_partner_conf,
                     drop_autapses=not a.keep_autapses, drop_background=not a.keep_background,
                     drop_weak_neurons=a.drop_weak_neurons, edge_weight=a.weight)
    try:
        from cleftwise.storage.db import open_store

        for path in export_paths(a.out, formats):
            check_output_path(path, db_files(a.db) + ([a.sign_table] if a.sign_table else []), "--out")
        sources = []
        if a.sign_table:
            probs = {}
            for item in (a.sign_prob_cols or "").split(","):
                if item.strip():
                    col, sep, cls = item.partition("=")
                    if not sep:
                        p.error(f"--sign-prob-cols: {item!r} is not column=class")
                    probs[col.strip()] = cls.strip()
            sources.append(table_signs(SignTableConfig(
                path=a.sign_table, neuron_col=a.sign_neuron_col, class_col=a.sign_class_col,
                sign_map=a.sign_map, confidence_col=a.sign_confidence_col, prob_cols=probs,
                prob_rule=a.sign_prob_rule, unmapped=a.sign_unmapped)))
        with open_store(a.db, create=False, readonly=True) as store:
            syn = store.query()
        signs = signs_for(syn, cfg, sources, use_synapses=not a.no_synapse_signs)
        written = export_graph(syn, a.out, formats, signs=signs, cfg=cfg, annotation_kind=a.annotation_kind)
    except (StorageError, PostprocessError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(written, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
