#!/usr/bin/env python
"""Import a folder of section images (or a multi-page TIFF) as a zarr volume.

Example (the real ssTEM stack beside the project):
    python launch/import_stack.py ../shared/data/vnc-sstem/raw data/vnc.zarr/raw --voxel-size 50 5 5
    python launch/import_stack.py ../shared/data/vnc-sstem/synapses data/vnc.zarr/synapses \
        --voxel-size 50 5 5 --kind instances
"""

from __future__ import annotations

import sys

from cleftwise.launch._common import new_parser
from cleftwise.storage.errors import StorageError
from cleftwise.storage.importers.stack import StackImportConfig, import_stack


def main(argv=None) -> int:
    p = new_parser(description=__doc__.splitlines()[0])
    p.add_argument("source", help="folder of TIFF/PNG sections (sorted by name) or a multi-page TIFF")
    p.add_argument("output", help="output volume, e.g. data.zarr/raw")
    p.add_argument("--voxel-size", type=int, nargs=3, default=(50, 4, 4), metavar=("Z", "Y", "X"),
                   help="nm per voxel (integers)")
    p.add_argument("--offset", type=int, nargs=3, default=(0, 0, 0), metavar=("Z", "Y", "X"), help="nm")
    p.add_argument("--kind", choices=["raw", "mask", "instances"], default="raw")
    p.add_argument("--connectivity", type=int, choices=[6, 18, 26], default=6)
    p.add_argument("--chunk", type=int, nargs=3, metavar=("Z", "Y", "X"), help="chunk shape, voxels")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    try:
        vol = import_stack(StackImportConfig(a.source, a.output, tuple(a.voxel_size), tuple(a.offset),
                                             a.kind, a.connectivity, tuple(a.chunk) if a.chunk else None,
                                             a.overwrite))
    except StorageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {vol.url}: shape {vol.shape} {vol.dtype}, voxel size {tuple(vol.voxel_size)} nm, "
          f"offset {tuple(vol.offset)} nm")
    return 0


if __name__ == "__main__":
    sys.exit(main())
