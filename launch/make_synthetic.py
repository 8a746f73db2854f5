"""Generate a synthetic EM volume with full ground truth (thin CLI over storage.synthetic).

    python launch/make_synthetic.py --out /tmp/synth.zarr --shape 64 512 512 --seed 1 \
        [--voxel-size 40 4 4] [--block 32 256 256] [--montage docs/reports/synthetic_montage.png]
"""

from __future__ import annotations

import logging
import os
import sys

import numpy as np

from cleftwise.launch._common import new_parser, setup_logging
from cleftwise.storage.errors import StorageError
from cleftwise.storage.synthetic import SyntheticConfig, generate_volume
from cleftwise.storage.volume import open_volume

log = logging.getLogger("cleftwise.launch.make_synthetic")


def save_montage(container: str, path: str, table, n_slices: int = 3) -> str:
    """Save a figure: z slices of raw, raw with synapses overlaid (pre red, post blue, class
    label at each synapse), and the neuron segmentation. Picks the slices with most synapses."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    raw = open_volume(os.path.join(container, "raw")).read()
    syn = open_volume(os.path.join(container, "synapses")).read()
    pol = open_volume(os.path.join(container, "polarity")).read()
    seg = open_volume(os.path.join(container, "neurons")).read()
    vs = np.asarray(open_volume(os.path.join(container, "raw")).voxel_size, np.float64)
    off = np.asarray(open_volume(os.path.join(container, "raw")).offset, np.float64)
    per_z = np.array([len(np.unique(s)) - 1 for s in syn])
    zs = []
    for z in np.argsort(-per_z, kind="stable"):
        if all(abs(int(z) - q) >= 4 for q in zs):
            zs.append(int(z))
        if len(zs) == n_slices:
            break
    zs.sort()
    ei = {int(r.id): r.ei_label for r in table.itertuples()} if len(table) else {}
    rng = np.random.default_rng(0)
    fig, axes = plt.subplots(3, len(zs), figsize=(5.2 * len(zs), 15.6))
    axes = np.asarray(axes).reshape(3, len(zs))
    for j, z in enumerate(zs):
        img = raw[z]
        axes[0, j].imshow(img, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        axes[0, j].set_title(f"raw  z={z} ({z * vs[0] + off[0]:.0f} nm)")
        rgb = np.repeat(img[..., None], 3, -1).astype(np.float32) / 255
        for ch, colour in ((0, (1.0, 0.15, 0.1)), (1, (0.1, 0.35, 1.0))):
            m = pol[ch, z] > 0
            rgb[m] = 0.55 * rgb[m] + 0.45 * np.array(colour)
        axes[1, j].imshow(rgb, interpolation="nearest")
        for sid in np.unique(syn[z]):
            if sid == 0:
                continue
            yy, xx = np.nonzero(syn[z] == sid)
            label = ei.get(int(sid), "?")
            axes[1, j].text(xx.mean(), yy.mean(), label, color="yellow" if label == "E" else "lime",
                            fontsize=11, fontweight="bold", ha="center", va="center")
        axes[1, j].set_title("synapses: pre red, post blue, class E/I")
        ids, inv = np.unique(seg[z], return_inverse=True)
        colours = rng.uniform(0.15, 1.0, (len(ids), 3))
        lab = colours[inv.reshape(seg[z].shape)]
        edge = np.zeros(seg[z].shape, bool)
        edge[1:] |= seg[z][1:] != seg[z][:-1]
        edge[:, 1:] |= seg[z][:, 1:] != seg[z][:, :-1]
        lab[edge] = 0
        axes[2, j].imshow(lab, interpolation="nearest")
        axes[2, j].set_title("neuron segmentation")
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"cleftwise synthetic EM: {tuple(int(s) for s in raw.shape)} voxels, "
                 f"{tuple(int(v) for v in vs)} nm, "
                 f"{len(table)} synapses", fontsize=14)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = new_parser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output .zarr container")
    p.add_argument("--shape", type=int, nargs=3, default=[64, 512, 512], metavar=("Z", "Y", "X"))
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--voxel-size", type=int, nargs=3, default=[40, 4, 4], metavar=("Z", "Y", "X"))
    p.add_argument("--block", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"),
                   help="block shape in voxels (default: SyntheticConfig.block_shape)")
    p.add_argument("--chunk", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"))
    p.add_argument("--overwrite", action="store_true", help="replace existing datasets")
    p.add_argument("--montage", default=None, help="also save a PNG montage here")
    args = p.parse_args(argv)
    setup_logging(args, default=logging.WARNING)
    kw = dict(shape=tuple(args.shape), seed=args.seed, voxel_size=tuple(args.voxel_size))
    if args.block:
        kw["block_shape"] = tuple(args.block)
    if args.chunk:
        kw["chunk_shape"] = tuple(args.chunk)
    try:
        cfg = SyntheticConfig(**kw)
        res = generate_volume(cfg, args.out, overwrite=args.overwrite)
    except StorageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n_e = int((res.table.ei_label == "E").sum())
    print(f"wrote {res.path}  ({res.voxels / 1e6:.1f} M voxels in {res.seconds:.1f} s, "
          f"{res.voxels / res.seconds / 1e6:.2f} M voxels/s)")
    for name, path in res.datasets.items():
        print(f"  {name:9s} {path}")
    print(f"  table     {res.table_csv}\n            {res.table_parquet}\n  neurons   {res.neuron_csv}")
    print(f"  {len(res.table)} synapses ({n_e} E, {len(res.table) - n_e} I), "
          f"{res.table.pre_neuron.nunique()} presynaptic neurons")
    if args.montage:
        print(f"  montage   {save_montage(res.path, args.montage, res.table)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
