#!/usr/bin/env python
"""Import external synapse tables (CSV/Parquet) into a cleftwise synapse database.

Ids are hashed from (pre id, post id, pre site, post site) unless the table has an ``id``
column (CAVE, cleftwise exports), so re-importing a table replaces its records instead of
duplicating them. Columns not mapped to a record field are kept as typed extra fields (queries
and exports return them by name; --drop-extra drops them). Without --preset and --map the
layout is detected (cleftwise's own exports, CAVE, neuPrint/MANC). Examples:
    python launch/import_synapses.py --preset manc --db sqlite:////abs/manc.db \
        --table ../shared/data/tables/manc-nt/synapses_gaba.csv \
        --table ../shared/data/tables/manc-nt/synapses_glutamate.csv
    python launch/import_synapses.py --preset cave --voxel-size 40 4 4 --db sqlite:////abs/cave.db \
        --table synapses.parquet
    python launch/import_synapses.py --db sqlite:////abs/copy.db --table exported.parquet
    python launch/import_synapses.py --db sqlite:////abs/s.db --table mine.csv --units nm \
        --map pre_neuron=pre --map post_neuron=post --map pre_z=pz --map pre_y=py --map pre_x=px \
        --map post_z=qz --map post_y=qy --map post_x=qx
Fields for --map: pre_neuron, post_neuron, pre_z/pre_y/pre_x, post_z/…, or packed pre_position,
post_position, position; z/y/x (centroid), bbox_z0 … bbox_x1, size, score_union, ei_prob,
ei_label, id, … (see storage/importers/tables.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from cleftwise.launch._common import new_parser, setup_logging
from cleftwise.storage.db.urls import redact
from cleftwise.storage.errors import StorageError
from cleftwise.storage.importers.tables import PRESETS, TableImportConfig, import_tables, parse_mapping


def build_parser() -> argparse.ArgumentParser:
    p = new_parser(description=__doc__.splitlines()[0],
                   formatter_class=argparse.RawDescriptionHelpFormatter,
                   epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--table", action="append", required=True,
                   help="CSV/TSV/Parquet synapse table (repeat for several)")
    p.add_argument("--db", required=True, help="sqlite:////abs/path.db or mongodb://host:port/db")
    p.add_argument("--preset", choices=sorted(PRESETS), help="known column layout")
    p.add_argument("--map", action="append", default=[], metavar="FIELD=COLUMN",
                   help="table column for a record field (overrides the preset)")
    p.add_argument("--units", choices=["voxel", "nm"], help="units of positions/boxes (default: preset, else voxel)")
    p.add_argument("--voxel-size", type=float, nargs=3, metavar=("Z", "Y", "X"),
                   help="nm per voxel (default: preset, else 1 1 1)")
    p.add_argument("--packed-order", help="axis order inside packed position columns (default xyz)")
    p.add_argument("--source", help="value of the records' source field (default: file name)")
    p.add_argument("--on-duplicate", choices=["error", "drop"], default="error")
    p.add_argument("--drop-extra", action="store_true",
                   help="drop the columns not mapped to a record field (default: keep them as extra fields)")
    return p


def main(argv=None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    setup_logging(a, default=logging.WARNING)
    try:
        columns = parse_mapping(a.map)
        missing = [f for f in ("pre_neuron", "post_neuron") if f not in columns]
        if a.preset is None and missing and columns:
            p.error(f"without --preset, --map must name the table column of {' and '.join(missing)} "
                    f"(e.g. --map pre_neuron=COLUMN) and of the positions; or give --preset, one of: "
                    f"{', '.join(sorted(PRESETS))} (or neither, to detect the layout)")
        cfg = TableImportConfig(preset=a.preset, columns=columns, units=a.units,
                                voxel_size=tuple(a.voxel_size) if a.voxel_size else None,
                                packed_order=a.packed_order, source=a.source,
                                on_duplicate=a.on_duplicate, keep_extra=not a.drop_extra)
        counts = import_tables(a.table, a.db, cfg)
    except StorageError as e:
        print(f"error: {redact(str(e))}", file=sys.stderr)
        return 1
    print(json.dumps({"db": redact(a.db), "records": counts}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
