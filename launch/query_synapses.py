#!/usr/bin/env python
"""Query a cleftwise synapse database and print or save the matching records.

Examples (ROI in nm, z0:z1,y0:y1,x0:x1, half-open, matched on the synapse centroid; an empty
bound is open, e.g. ``:,0:4000,:``):
    python launch/query_synapses.py --db sqlite:////data/synapses.db --roi 0:400,0:4000,0:4000
    python launch/query_synapses.py --db sqlite:///out/synapses.db --pre 17 --min-score 0.5 \
        --format csv --out pre17.csv
    python launch/query_synapses.py --db mongodb://localhost:27017/fly --count --neuron 17
    python launch/query_synapses.py --db sqlite:////data/synapses.db --layout cave \
        --voxel-size 40 4 4 --out cave_synapses.parquet

Layouts: cleftwise (the records, extra fields of imported tables included), cave (CAVE's
synapse-table columns, positions in x, y, z voxels of --voxel-size) and manc (neuPrint/MANC
export columns); each imports back with import_synapses.py without --map. JSON writes every
64-bit id (id, pre_neuron, post_neuron, *_root_id, *_supervoxel_id, ...) as a decimal string.

The database is opened read-only (a read-only file or folder is fine; nothing is created);
--out is written atomically and may not be the database itself or lie in a volume container.
"""

from __future__ import annotations

import argparse
import logging
import sys

from cleftwise.launch._common import new_parser, setup_logging
from cleftwise.storage.atomic import atomic_path, check_output_path
from cleftwise.storage.errors import StorageError
from cleftwise.storage.db import open_store
from cleftwise.storage.db.table_layouts import DEFAULT_VOXEL_SIZE, LAYOUTS, check_layout, json_text, to_layout
from cleftwise.storage.db.urls import db_files

_FORMATS = ("table", "csv", "parquet", "json")


def parse_roi_arg(text: str):
    """``z0:z1,y0:y1,x0:x1`` (nm) → ``((z0, y0, x0), (z1, y1, x1))``; empty bounds are None."""
    parts = text.split(",")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"ROI {text!r} needs 3 ranges z0:z1,y0:y1,x0:x1 (nm)")
    begin, end = [], []
    for axis, part in zip("zyx", parts):
        bounds = part.split(":")
        if len(bounds) != 2:
            raise argparse.ArgumentTypeError(f"ROI {text!r}: {axis} range {part!r} is not begin:end")
        try:
            lo, hi = (float(b) if b.strip() else None for b in bounds)
        except ValueError:
            raise argparse.ArgumentTypeError(f"ROI {text!r}: {axis} range {part!r} is not numeric") from None
        if lo is not None and hi is not None and hi < lo:
            raise argparse.ArgumentTypeError(f"ROI {text!r}: {axis} end {hi:g} precedes begin {lo:g}")
        begin.append(lo)
        end.append(hi)
    return tuple(begin), tuple(end)


def _neuron_id(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"neuron id {text!r} is not an integer") from None
    if not 0 <= value < 2 ** 64:
        raise argparse.ArgumentTypeError(f"neuron id {text} is outside uint64")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = new_parser(description=__doc__.splitlines()[0],
                   formatter_class=argparse.RawDescriptionHelpFormatter,
                   epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--db", required=True,
                   help="sqlite:///rel/path.db, sqlite:////abs/path.db or mongodb://host:port/db")
    p.add_argument("--roi", type=parse_roi_arg, help="z0:z1,y0:y1,x0:x1 in nm (half-open)")
    p.add_argument("--roi-match", choices=["centroid", "bbox"], default="centroid",
                   help="match the centroid (default) or any bounding-box overlap")
    p.add_argument("--pre", type=_neuron_id, help="presynaptic neuron id")
    p.add_argument("--post", type=_neuron_id, help="postsynaptic neuron id")
    p.add_argument("--neuron", type=_neuron_id, help="neuron id on either side")
    p.add_argument("--min-score", type=float, help="minimum score_union")
    p.add_argument("--block", type=int, help="only records written by this block id")
    p.add_argument("--limit", type=int, help="at most N records (lowest ids)")
    p.add_argument("--columns", help="comma-separated columns (id is always included)")
    p.add_argument("--format", choices=_FORMATS,
                   help="output format (default: from --out suffix, else table)")
    p.add_argument("--out", help="output file (default: stdout; required for parquet)")
    p.add_argument("--layout", choices=LAYOUTS, default="cleftwise",
                   help="column layout: cleftwise (default), cave or manc (neuPrint)")
    p.add_argument("--voxel-size", type=float, nargs=3, metavar=("Z", "Y", "X"),
                   help="nm per voxel of the cave/manc positions (default: cave "
                        f"{' '.join(f'{v:g}' for v in DEFAULT_VOXEL_SIZE['cave'])}, manc "
                        f"{' '.join(f'{v:g}' for v in DEFAULT_VOXEL_SIZE['manc'])}); stated in the file")
    p.add_argument("--count", action="store_true", help="print the number of matches only")
    return p


def main(argv=None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    fmt = a.format
    if fmt is None:
        suffix = (a.out or "").lower().rsplit(".", 1)[-1]
        fmt = {"csv": "csv", "parquet": "parquet", "pq": "parquet", "json": "json"}.get(suffix, "table")
    if fmt == "parquet" and not a.out:
        p.error("--format parquet needs --out PATH")
    if a.limit is not None and a.limit < 0:
        p.error("--limit must be >= 0")
    setup_logging(a, default=logging.WARNING)
    filters = dict(roi=a.roi, roi_match=a.roi_match, pre=a.pre, post=a.post, neuron=a.neuron,
                   min_score=a.min_score, block_id=a.block)
    columns = [c.strip() for c in a.columns.split(",") if c.strip()] if a.columns else None
    if a.layout == "cleftwise" and a.voxel_size is not None:
        p.error("--voxel-size applies to --layout cave and manc (the cleftwise layout is in nm)")
    if a.layout != "cleftwise" and columns is not None:
        p.error(f"--columns selects from the cleftwise layout; the {a.layout} layout has fixed columns")
    try:
        vs = check_layout(a.layout, a.voxel_size)
        if a.out:
            check_output_path(a.out, db_files(a.db), "--out")
        with open_store(a.db, create=False, readonly=True) as db:
            if a.count:
                print(db.count(**filters))
                return 0
            if a.out and fmt in ("csv", "parquet"):
                n = db.export(a.out, format=fmt, columns=columns, limit=a.limit, layout=a.layout,
                              voxel_size=vs, **filters)
                print(f"wrote {n} synapses to {a.out}", file=sys.stderr)
                return 0
            df = db.query(limit=a.limit, columns=columns, **filters)
            df = to_layout(df, a.layout, vs, dict((n, t) for n, t in db.extra_fields()), fmt)
        if fmt == "csv":
            text = df.to_csv(index=False)
        elif fmt == "json":
            text = json_text(df)
        else:
            text = df.to_string(index=False) + "\n" if len(df) else "(no synapses)\n"
        if not a.out:
            sys.stdout.write(text)
            return 0
        with atomic_path(a.out, "query output") as tmp, open(tmp, "w") as f:
            f.write(text)
    except StorageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {len(df)} synapses to {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
