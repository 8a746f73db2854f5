"""Bulk loading of an SQLite R*Tree: a packed tree built in numpy, written to its shadow tables.

SQLite's R*Tree module only inserts one entry at a time (about 8 µs each, whatever the
order), which dominates bulk writes of synapse records. For a bulk load the tree is instead
packed bottom-up by sort-tile-recursive (STR) tiling and its nodes written straight into the
three shadow tables, in the file format SQLite documents in ``ext/rtree/rtree.c`` (stable, as
every SQLite file format):

- ``<name>_node(nodeno INTEGER PRIMARY KEY, data)``: one blob per node, all of the root's size;
  bytes 0-1 the tree depth (root only), 2-3 the cell count, then cells of a big-endian int64
  (record id in leaves, child node number above) and ``2 * dims`` big-endian float32
  coordinates ``(min, max)`` per axis. The root is node 1.
- ``<name>_rowid(rowid INTEGER PRIMARY KEY, nodeno)``: leaf node of each record.
- ``<name>_parent(nodeno INTEGER PRIMARY KEY, parentnode)``: parent of each non-root node.

Coordinates are rounded outwards to float32 like SQLite's own inserts, so each stored box
contains the exact one. ``SELECT rtreecheck('<name>')`` verifies a written tree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["PackedRTree", "round_outwards_f32", "str_groups", "pack_rtree", "write_packed",
           "clear_rtree", "read_entries", "node_size"]

_HEADER = 4  # bytes: depth (u16, root only) + cell count (u16)


def round_outwards_f32(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 bounds as float32 with ``lo32 <= lo`` and ``hi32 >= hi`` (NaN stays NaN)."""
    lo32 = np.asarray(lo, np.float64).astype(np.float32)
    hi32 = np.asarray(hi, np.float64).astype(np.float32)
    up = lo32 > lo
    lo32[up] = np.nextafter(lo32[up], np.float32(-np.inf))
    down = hi32 < hi
    hi32[down] = np.nextafter(hi32[down], np.float32(np.inf))
    return lo32, hi32


def _ceil_div(a, b):
    return -(-a // b)


def str_groups(boxes: np.ndarray, fill: int) -> tuple[np.ndarray, np.ndarray]:
    """Sort-tile-recursive grouping of boxes into nodes of at most ``fill`` entries.

    Args:
        boxes: (n, 2 * d) float array, ``(min, max)`` per axis (tiles use the box centres).
        fill: entries per node (>= 2).

    Returns:
        ``order`` (n,) indices of the boxes grouped node by node, and ``starts`` (m + 1,)
        offsets into ``order``: node k holds ``order[starts[k]:starts[k + 1]]``. Tiles are
        about cubic in the boxes' units (the number of slabs along an axis follows its
        extent); the axis with the fewest slabs is cut last, into runs of ``fill``.
    """
    n = len(boxes)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(1, np.int64)
    centre = (boxes[:, 0::2] + boxes[:, 1::2]) / 2  # float32 boxes: float32 centres (faster sorts)
    d = centre.shape[1]
    nodes = _ceil_div(n, fill)
    ext = np.ptp(centre, axis=0)
    if not np.any(ext > 0):
        slabs = np.ones(d)
    else:
        ext = np.where(ext > 0, ext, ext[ext > 0].min() * 1e-6)
        side = np.exp(np.log(ext).mean()) / nodes ** (1.0 / d)  # cube side giving `nodes` tiles
        slabs = np.maximum(1.0, np.round(ext / side))
    axes = np.argsort(-slabs, kind="stable")
    group = np.zeros(n, np.int64)  # tile of each box, refined axis by axis (dense ids)
    for i, ax in enumerate(axes):
        order = _sort_within(centre[:, ax], group)
        g = group[order]
        first = np.r_[0, np.flatnonzero(g[1:] != g[:-1]) + 1]
        sizes = np.diff(np.r_[first, n])
        pos = np.arange(n) - np.repeat(first, sizes)
        if i < d - 1:  # cut into slabs of whole nodes
            rows = _ceil_div(_ceil_div(sizes, fill), int(slabs[ax])) * fill
        else:          # last axis: runs of `fill`
            rows = np.full(len(sizes), fill)
        sub = pos // np.repeat(rows, sizes)
        change = np.ones(n, bool)  # (group, slab) is nondecreasing along `order`
        change[1:] = (g[1:] != g[:-1]) | (sub[1:] != sub[:-1])
        group[order] = np.cumsum(change) - 1
    starts = np.r_[np.flatnonzero(change), n]
    return order, starts.astype(np.int64)


def _sort_within(values: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Indices sorting by (group, values); group holds dense ids >= 0."""
    by_value = np.argsort(values)
    if not group.any():
        return by_value
    if group.max() < 65536:  # numpy's stable sort of 16-bit ints is a radix sort
        return by_value[np.argsort(group[by_value].astype(np.uint16), kind="stable")]
    return np.lexsort((values, group))


@dataclass
class PackedRTree:
    """A packed R*Tree ready for the shadow tables."""

    depth: int
    """tree depth written in the root (0: the root is the only, leaf, node)"""
    nodes: list
    """(nodeno, blob) per node, root (1) first"""
    rowid: np.ndarray
    """(n, 2) int64: record id, leaf node number"""
    parent: np.ndarray
    """(m, 2) int64: node number, parent node number (every node but the root)"""


def pack_rtree(ids: np.ndarray, boxes32: np.ndarray, node_bytes: int, fill: float = 0.9) -> PackedRTree:
    """Pack records into R*Tree nodes (STR tiling, bottom-up).

    Args:
        ids: (n,) int64 record ids (unique).
        boxes32: (n, 2 * d) float32, ``(min, max)`` per axis, already rounded outwards.
        node_bytes: node blob size of the target tree (``length(data)`` of its node 1).
        fill: fraction of a node's capacity used below the root (room for later inserts).
    """
    ids = np.asarray(ids, np.int64)
    boxes32 = np.ascontiguousarray(boxes32, np.float32)
    ncoord = boxes32.shape[1]
    cell = np.dtype([("k", ">i8"), ("c", ">f4", (ncoord,))])
    capacity = (node_bytes - _HEADER) // cell.itemsize
    per_node = max(2, min(capacity, int(capacity * fill)))
    # levels[0] groups the records into leaves, levels[k] the nodes of level k - 1
    levels: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (entry boxes, order, starts)
    boxes = boxes32
    while len(boxes) > capacity:
        order, starts = str_groups(boxes, per_node)
        levels.append((boxes, order, starts))
        ordered = boxes[order]
        up = np.empty((len(starts) - 1, ncoord), np.float32)
        up[:, 0::2] = np.minimum.reduceat(ordered[:, 0::2], starts[:-1], axis=0)
        up[:, 1::2] = np.maximum.reduceat(ordered[:, 1::2], starts[:-1], axis=0)
        boxes = up
    depth = len(levels)
    count = [len(lv[2]) - 1 for lv in levels]
    first = [0] * depth  # number of the first node of each level: root 1, then top-down
    nxt = 2
    for lvl in reversed(range(depth)):
        first[lvl], nxt = nxt, nxt + count[lvl]

    def entry_keys(lvl: int) -> np.ndarray:
        """Cell keys of the entries grouped at level lvl: record ids or node numbers."""
        return ids if lvl == 0 else first[lvl - 1] + np.arange(count[lvl - 1])

    def holder(lvl: int) -> np.ndarray:
        """For each entry grouped at level lvl, the index of the node holding it."""
        _, order, starts = levels[lvl]
        out = np.empty(len(order), np.int64)
        out[order] = np.repeat(np.arange(len(starts) - 1), np.diff(starts))
        return out

    nodes: list = []
    root_keys = entry_keys(depth)
    nodes += _encode(np.array([1]), root_keys, boxes, np.array([0, len(root_keys)]),
                     node_bytes, cell, depth)
    parents = []
    for lvl in reversed(range(depth)):
        entries, order, starts = levels[lvl]
        numbers = first[lvl] + np.arange(count[lvl])
        nodes += _encode(numbers, entry_keys(lvl)[order], entries[order], starts, node_bytes, cell)
        parent = np.ones(count[lvl], np.int64) if lvl == depth - 1 else first[lvl + 1] + holder(lvl + 1)
        parents.append(np.stack([numbers, parent], axis=1))
    leaf = np.ones(len(ids), np.int64) if depth == 0 else first[0] + holder(0)
    return PackedRTree(depth=depth, nodes=nodes, rowid=np.stack([ids, leaf], axis=1),
                       parent=np.concatenate(parents) if parents else np.zeros((0, 2), np.int64))


def _encode(numbers: np.ndarray, keys: np.ndarray, boxes: np.ndarray, starts: np.ndarray,
            node_bytes: int, cell: np.dtype, depth: int | None = None) -> list:
    """(node number, blob) for nodes holding cells ``starts[k]:starts[k + 1]`` of keys/boxes."""
    m = len(starts) - 1
    ncell = np.diff(starts)
    width = int(ncell.max()) if m else 0
    cells = np.zeros((m, width), cell)
    node_of = np.repeat(np.arange(m), ncell)
    slot = np.arange(len(keys)) - np.repeat(starts[:-1], ncell)
    cells["k"][node_of, slot] = keys
    cells["c"][node_of, slot] = boxes
    buf = np.zeros((m, node_bytes), np.uint8)
    if depth is not None:  # the root records the tree depth
        buf[0, 0:2] = np.array([depth], ">u2").view(np.uint8)
    buf[:, 2:4] = ncell.astype(">u2").view(np.uint8).reshape(m, 2)
    buf[:, _HEADER:_HEADER + width * cell.itemsize] = cells.view(np.uint8).reshape(m, -1)
    return list(zip(numbers.tolist(), [row.tobytes() for row in buf]))


def node_size(cur, name: str) -> int:
    """Node blob size of R*Tree ``name`` (the size of its root)."""
    return int(cur.execute(f'SELECT length(data) FROM "{name}_node" WHERE nodeno = 1').fetchone()[0])


def clear_rtree(cur, name: str, node_bytes: int) -> None:
    """Empty R*Tree ``name`` through its shadow tables (an empty leaf root remains)."""
    cur.execute(f'DELETE FROM "{name}_rowid"')
    cur.execute(f'DELETE FROM "{name}_parent"')
    cur.execute(f'DELETE FROM "{name}_node" WHERE nodeno != 1')
    cur.execute(f'UPDATE "{name}_node" SET data = ? WHERE nodeno = 1', (bytes(node_bytes),))


def _pairs(cur, sql_head: str, pairs: np.ndarray, per_stmt: int = 256) -> None:
    """INSERT ``pairs`` (k, 2) with multi-row VALUES statements (fewer steps than one per row)."""
    k = len(pairs)
    full = k - k % per_stmt
    if full:
        stmt = f"{sql_head} VALUES " + ", ".join(["(?, ?)"] * per_stmt)
        cur.executemany(stmt, map(np.ndarray.tolist, pairs[:full].reshape(-1, 2 * per_stmt)))
    if k > full:
        stmt = f"{sql_head} VALUES " + ", ".join(["(?, ?)"] * (k - full))
        cur.execute(stmt, pairs[full:].reshape(-1).tolist())


def write_packed(cur, name: str, packed: PackedRTree) -> None:
    """Write a packed tree into the (empty, see :func:`clear_rtree`) shadow tables of ``name``."""
    cur.executemany(f'INSERT OR REPLACE INTO "{name}_node"(nodeno, data) VALUES (?, ?)', packed.nodes)
    _pairs(cur, f'INSERT INTO "{name}_rowid"(rowid, nodeno)', packed.rowid)
    _pairs(cur, f'INSERT INTO "{name}_parent"(nodeno, parentnode)', packed.parent)


def read_entries(cur, name: str, ncoord: int) -> tuple[np.ndarray, np.ndarray]:
    """All (ids, float32 boxes) of R*Tree ``name`` (values are stored float32: exact)."""
    rows = cur.execute(f'SELECT * FROM "{name}"').fetchall()
    if not rows:
        return np.zeros(0, np.int64), np.zeros((0, ncoord), np.float32)
    arr = np.array(rows, dtype=np.float64)
    ids = np.array([r[0] for r in rows], dtype=np.int64)
    return ids, arr[:, 1:].astype(np.float32)
