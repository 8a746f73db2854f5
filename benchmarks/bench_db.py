"""Benchmark: synapse database throughput (SQLite; mongomock for reference).

SQLite runs twice per size: ``sqlite`` is the default file layout 2 (numeric fields also in
one packed BLOB per record, decoded with numpy; see ``storage/db/sqlite.py``) and
``sqlite-layout1`` the peer in the same run, layout 1 (one SQL column per field, as before
layout 2 existed, and what ``open_store(url, layout=1)`` makes).

Synthetic records with every schema field, at 1 synapse per µm³ in a volume 10 µm deep
(z) and as wide in y and x as the record count needs (1e6 records: 10 x 100 x 100 µm). Ids are
consecutive per block of 4 x 20 x 20 µm in raster order, as the pipeline's blockwise
connected components assign them. Each case runs in a fresh subprocess:

- **insert (bulk)**: one ``upsert_many`` of the whole table into a new database. SQLite takes
  its bulk-load path (one transaction, secondary indexes built after the rows, R*Tree packed
  by ``cleftwise.storage.db.sqlite_rtree``); MongoDB writes batches of 10k.
- **insert (blocks)**: a second new database written block by block with
  ``upsert_many(block, block_id=b)`` (delete-by-block + insert, one transaction each), as
  pipeline workers do. Not run for the largest mongomock size.
- **rewrite block**: re-writing one block (idempotent replace), median ms.
- **ROI query**: ROIs of 1 % of the volume (each side scaled by 0.01^(1/3)) at random
  positions: ``query`` with all 33 columns and with 7 core columns, and ``count``; median and
  95th percentile ms over the repeats, rows returned. SQLite floors: the same R*Tree join
  run with a plain ``sqlite3`` connection and ``fetchall()`` (no DataFrame) of every SQL
  column of the file (``roi_fetch_floor``; layout 2: its 19 SQL columns and the BLOB), and
  SQLite's own one-by-one R*Tree insertion of the records'
  boxes (``rtree_insert_floor``, at most 100k boxes, the cost the ordinary write path pays).
- **neuron query**: ``query(pre=id)`` for random neurons (20000 neurons, ~50 synapses each).
- **update_fields**: E/I fields (``ei_prob``, ``ei_label``, ``classifier``) for 10 % of the
  records (SQLite only; mongomock applies each update by a scan of the collection).
- **export**: streamed Parquet export of the whole table (100k-row batches).

Throughput is reported as records per wall-clock second and per CPU second of the process
(wall includes waiting for a core on a shared machine; the load average is recorded).
Memory: the process RSS is sampled every 5 ms by a thread; each phase reports its peak
above the RSS at the start of that phase. Results: ``benchmarks/results/bench_db.{json,md}``.

Run: ``python benchmarks/bench_db.py [--sizes 100000 1000000] [--mongomock-sizes 100000]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pandas as pd

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DENSITY_PER_UM3 = 1.0
DEPTH_NM = 10_000.0
BLOCK_NM = np.array([4_000.0, 20_000.0, 20_000.0])
N_NEURONS = 20_000
ROI_FRACTION = 0.01
CORE_COLUMNS = ["z", "y", "x", "pre_neuron", "post_neuron", "score_union"]


# --------------------------------------------------------------------------- data
def volume_extent(n: int) -> np.ndarray:
    """(z, y, x) nm extent holding n records at DENSITY_PER_UM3, DEPTH_NM deep."""
    area_um2 = n / DENSITY_PER_UM3 / (DEPTH_NM / 1000.0)
    side = np.sqrt(area_um2) * 1000.0
    return np.array([DEPTH_NM, side, side])


def synthetic_blocks(n: int, seed: int = 0) -> list[tuple[int, pd.DataFrame]]:
    """Records in blocks (block id, DataFrame), ids consecutive per block, every field set."""
    rng = np.random.default_rng(seed)
    ext = volume_extent(n)
    c = rng.uniform(0, 1, (n, 3)) * ext
    grid = np.ceil(ext / BLOCK_NM).astype(int)
    cell = np.minimum((c // BLOCK_NM).astype(int), grid - 1)
    block = np.ravel_multi_index(tuple(cell.T), tuple(grid))
    order = np.argsort(block, kind="stable")
    c, block = c[order], block[order]
    df = pd.DataFrame({"id": np.arange(1, n + 1, dtype=np.int64)})
    for i, a in enumerate("zyx"):
        df[a] = c[:, i]
    half = rng.uniform(40, 300, (n, 3))
    for i, a in enumerate("zyx"):
        df[f"bbox_{a}0"] = c[:, i] - half[:, i]
    for i, a in enumerate("zyx"):
        df[f"bbox_{a}1"] = c[:, i] + half[:, i]
    df["size"] = rng.integers(20, 5000, n)
    for s in ("score_union", "score_pre", "score_post", "score_max"):
        df[s] = rng.random(n)
    for side in ("pre", "post"):
        for i, a in enumerate("zyx"):
            df[f"{side}_{a}"] = c[:, i] + rng.normal(0, 40, n)
        df[f"{side}_size"] = rng.integers(5, 2000, n)
    df["pre_neuron"] = rng.integers(1, N_NEURONS + 1, n)
    df["post_neuron"] = rng.integers(1, N_NEURONS + 1, n)
    df["pre_conf"] = rng.random(n)
    df["post_conf"] = rng.random(n)
    df["flags"] = np.where(df["pre_neuron"] == df["post_neuron"], "autapse", "")
    df["block_id"] = block.astype(np.int64)
    df["source"] = "bench"
    starts = np.r_[0, np.flatnonzero(np.diff(block)) + 1, n]
    return [(int(block[a]), df.iloc[a:b].reset_index(drop=True)) for a, b in zip(starts[:-1], starts[1:])]


# --------------------------------------------------------------------------- measuring
class PeakRSS:
    """Peak process RSS (MiB) above the RSS at entry, sampled every 5 ms by a thread."""

    def __init__(self):
        import psutil

        self._proc = psutil.Process()
        self.start = self.peak = 0.0

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(0.005)

    def __enter__(self):
        self.start = self._proc.memory_info().rss
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def delta_mib(self) -> float:
        return round((self.peak - self.start) / 2 ** 20, 1)


def timed(fn):
    """(result, wall s, cpu s)."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def latency(fn, args_list) -> dict:
    ts, rows = [], []
    for args in args_list:
        t = time.perf_counter()
        out = fn(*args)
        ts.append(time.perf_counter() - t)
        rows.append(out if isinstance(out, int) else len(out))
    ts = np.array(ts) * 1000
    return {"median_ms": round(float(np.median(ts)), 2), "p95_ms": round(float(np.percentile(ts, 95)), 2),
            "repeats": len(ts), "median_rows": int(np.median(rows))}


ROI_SQL = ("SELECT s.* FROM synapses_rtree r CROSS JOIN synapses s ON s.id = r.id "
           "WHERE r.z1 >= ? AND r.z0 <= ? AND r.y1 >= ? AND r.y0 <= ? AND r.x1 >= ? AND r.x0 <= ? "
           "AND s.z >= ? AND s.z < ? AND s.y >= ? AND s.y < ? AND s.x >= ? AND s.x < ?")


def sqlite_floors(path: str, rois, table: pd.DataFrame, workdir: str) -> dict:
    """What SQLite + Python's sqlite3 cost without cleftwise: raw ROI fetch, R*Tree inserts."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    con.execute("PRAGMA cache_size=-65536")

    def fetch(roi):
        (z0, y0, x0), (z1, y1, x1) = roi
        return con.execute(ROI_SQL, (z0, z1, y0, y1, x0, x1, z0, z1, y0, y1, x0, x1)).fetchall()

    fetch(rois[0])
    out = {"roi_fetch_floor": latency(fetch, [(r,) for r in rois])}
    con.close()
    part = table.iloc[:100_000]
    boxes = [(int(i), min(a0, c), max(a1, c), min(b0, d), max(b1, d), min(e0, f), max(e1, f))
             for i, c, a0, a1, d, b0, b1, f, e0, e1 in zip(
                 part["id"], part["z"], part["bbox_z0"], part["bbox_z1"], part["y"], part["bbox_y0"],
                 part["bbox_y1"], part["x"], part["bbox_x0"], part["bbox_x1"])]
    con = sqlite3.connect(os.path.join(workdir, "rtree_floor.db"), isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=NORMAL")
    con.execute("CREATE VIRTUAL TABLE t USING rtree(id, z0, z1, y0, y1, x0, x1)")
    con.execute("BEGIN")
    _, wall, cpu = timed(lambda: con.executemany("INSERT INTO t VALUES (?, ?, ?, ?, ?, ?, ?)", boxes))
    con.execute("COMMIT")
    con.close()
    out["rtree_insert_floor"] = {"boxes": len(boxes), "per_s_wall": round(len(boxes) / wall),
                                 "per_s_cpu": round(len(boxes) / cpu)}
    return out


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise RuntimeError(what)


def run_case(backend: str, n: int, workdir: str, repeats: int) -> dict:
    from cleftwise.storage.db import open_store

    rng = np.random.default_rng(1)
    blocks = synthetic_blocks(n)
    table = pd.concat([b for _, b in blocks], ignore_index=True)
    ext = volume_extent(n)
    side = ext * ROI_FRACTION ** (1 / 3)
    rois = [(tuple(b), tuple(b + side)) for b in rng.uniform(0, 1, (repeats, 3)) * (ext - side)]
    res = {"backend": backend, "records": n, "blocks": len(blocks),
           "volume_nm": ext.round().tolist(), "roi_side_nm": side.round(1).tolist()}

    sqlite = backend.startswith("sqlite")
    opts = {"layout": 1 if backend == "sqlite-layout1" else 2} if sqlite else {}

    def url(name):
        if sqlite:
            return f"sqlite:///{os.path.join(workdir, name + '.db')}"
        return f"mongomock://bench_{name}_{os.getpid()}"

    # bulk insert
    db = open_store(url("bulk"), **opts)
    with PeakRSS() as mem:
        _, wall, cpu = timed(lambda: db.upsert_many(table))
    res["insert_bulk"] = {"per_s_wall": round(n / wall), "per_s_cpu": round(n / cpu),
                          "seconds": round(wall, 2), "peak_rss_delta_mib": mem.delta_mib}
    # block-wise insert (pipeline pattern)
    if sqlite or n <= 100_000:
        db2 = open_store(url("blocks"), **opts)
        with PeakRSS() as mem:
            _, wall, cpu = timed(lambda: [db2.upsert_many(b, block_id=k) for k, b in blocks])
        res["insert_blocks"] = {"per_s_wall": round(n / wall), "per_s_cpu": round(n / cpu),
                                "seconds": round(wall, 2), "peak_rss_delta_mib": mem.delta_mib}
        _check(db2.count() == n, "block-wise insert lost records")
        db2.close()
    _check(db.count() == n, "bulk insert lost records")
    picks = [blocks[i] for i in rng.choice(len(blocks), size=min(5, len(blocks)), replace=False)]
    res["rewrite_block"] = latency(lambda k, b: db.upsert_many(b, block_id=k), picks)
    q_repeats = rois if sqlite else rois[:5]
    db.query(roi=q_repeats[0])  # warm the page cache once
    res["roi_query_all_columns"] = latency(lambda r: db.query(roi=r), [(r,) for r in q_repeats])
    res["roi_query_core_columns"] = latency(lambda r: db.query(roi=r, columns=CORE_COLUMNS),
                                            [(r,) for r in q_repeats])
    res["roi_count"] = latency(lambda r: db.count(roi=r), [(r,) for r in q_repeats])
    if sqlite:
        res.update(sqlite_floors(db.path, q_repeats, table, workdir))
    neurons = rng.integers(1, N_NEURONS + 1, len(q_repeats))
    res["neuron_query"] = latency(lambda p: db.query(pre=int(p)), [(p,) for p in neurons])
    if sqlite:
        sel = table["id"].to_numpy()[:: 10]
        upd = pd.DataFrame({"id": sel, "ei_prob": rng.random(sel.size), "ei_label": "E",
                            "classifier": "bench"})
        with PeakRSS() as mem:
            matched, wall, cpu = timed(lambda: db.update_fields(upd, ["ei_prob", "ei_label", "classifier"]))
        _check(matched == sel.size, "update_fields missed records")
        res["update_fields"] = {"records": int(sel.size), "per_s_wall": round(sel.size / wall),
                                "per_s_cpu": round(sel.size / cpu), "peak_rss_delta_mib": mem.delta_mib}
    del blocks, table
    out = os.path.join(workdir, f"export_{backend}_{n}.parquet")
    with PeakRSS() as mem:
        rows, wall, cpu = timed(lambda: db.export(out, batch_size=100_000))
    res["export_parquet"] = {"rows": rows, "seconds": round(wall, 2), "per_s_wall": round(rows / wall),
                             "peak_rss_delta_mib": mem.delta_mib,
                             "file_mib": round(os.path.getsize(out) / 2 ** 20, 1)}
    if sqlite:
        res["db_file_mib"] = round(sum(os.path.getsize(p) for p in
                                       [db.path, db.path + "-wal"] if os.path.exists(p)) / 2 ** 20, 1)
    db.close()
    import resource

    res["process_max_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return res


# --------------------------------------------------------------------------- report
def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        "# Synapse database benchmark",
        "",
        f"`python benchmarks/bench_db.py` — {env['date']}, {env['cpus']} CPUs, Python {env['python']}, "
        f"SQLite {env['sqlite']}, pandas {env['pandas']}; load average {env['loadavg_start']} at start, "
        f"{env['loadavg_end']} at end (other jobs shared the cores: wall rates are lower than CPU rates).",
        "",
        "Synthetic records (all 33 fields), 1 synapse/µm³, ids consecutive per 4×20×20 µm block. "
        "ROI queries: 1 % of the volume, centroid match. Targets: ≥100k inserts/s (SQLite), "
        "1 % ROI query < 50 ms. `sqlite`: file layout 2 (the default); `sqlite-layout1`: layout 1, "
        "one SQL column per field (the peer, same run).",
        "",
        "| backend | records | insert bulk /s (wall / CPU) | insert by block /s (wall / CPU) | "
        "rewrite block ms | ROI query ms (all cols, median / p95) | rows | raw fetch floor ms (all SQL cols) | "
        "ROI query ms (7 cols) | ROI count ms | pre-neuron query ms | update_fields /s | "
        "export s (peak ΔRSS MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["cases"]:
        if "error" in r:
            lines.append(f"| {r['backend']} | {r['records']} | failed: {r['error']} |" + " |" * 10)
            continue
        blk = r.get("insert_blocks")
        blk_s = f"{blk['per_s_wall']:,} / {blk['per_s_cpu']:,}" if blk else "—"
        upd = r.get("update_fields")
        upd_s = f"{upd['per_s_wall']:,}" if upd else "—"
        floor = r.get("roi_fetch_floor")
        floor_s = f"{floor['median_ms']}" if floor else "—"
        lines.append(
            f"| {r['backend']} | {r['records']:,} | {r['insert_bulk']['per_s_wall']:,} / {r['insert_bulk']['per_s_cpu']:,} | "
            f"{blk_s} | "
            f"{r['rewrite_block']['median_ms']} | {r['roi_query_all_columns']['median_ms']} / "
            f"{r['roi_query_all_columns']['p95_ms']} | {r['roi_query_all_columns']['median_rows']:,} | "
            f"{floor_s} | {r['roi_query_core_columns']['median_ms']} | {r['roi_count']['median_ms']} | "
            f"{r['neuron_query']['median_ms']} | {upd_s} | "
            f"{r['export_parquet']['seconds']} ({r['export_parquet']['peak_rss_delta_mib']}) |")
    lines += ["", "Peak memory (RSS above the start of each phase, MiB) and sizes:", ""]
    for r in report["cases"]:
        if "error" in r:
            continue
        lines.append(
            f"- {r['backend']} {r['records']:,}: bulk insert +{r['insert_bulk']['peak_rss_delta_mib']}, "
            + (f"block insert +{r['insert_blocks']['peak_rss_delta_mib']}, " if r.get("insert_blocks") else "")
            + f"export +{r['export_parquet']['peak_rss_delta_mib']} (file {r['export_parquet']['file_mib']} MiB), "
            + (f"database file {r['db_file_mib']} MiB, " if "db_file_mib" in r else "")
            + f"process max RSS {r['process_max_rss_mib']} MiB"
            + (f"; SQLite's one-by-one R*Tree insertion of {r['rtree_insert_floor']['boxes']:,} boxes: "
               f"{r['rtree_insert_floor']['per_s_wall']:,}/s wall, {r['rtree_insert_floor']['per_s_cpu']:,}/s CPU"
               if "rtree_insert_floor" in r else ""))
    lines += ["", "mongomock is an in-process Python emulation (linear scans, no real indexes): its "
              "numbers test the MongoDB code path, not MongoDB's speed.", ""]
    if report.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    return "\n".join(lines)


def target_notes(cases: list) -> list[str]:
    """One line per SQLite case: each target met or not, with the floor that bounds it."""
    notes = []
    peers = {r["records"]: r for r in cases if r.get("backend") == "sqlite-layout1" and "error" not in r}
    for r in cases:
        if not r.get("backend", "").startswith("sqlite") or "error" in r:
            continue
        ins, roi, core = r["insert_bulk"], r["roi_query_all_columns"], r["roi_query_core_columns"]
        floor = r["roi_fetch_floor"]["median_ms"]
        verdict = lambda ok: "met" if ok else "not met"
        notes.append(
            f"{r['backend']}, {r['records']:,} records: bulk insert {ins['per_s_wall']:,}/s wall "
            f"({verdict(ins['per_s_wall'] >= 100_000)}; {ins['per_s_cpu']:,}/s CPU); 1 % ROI query "
            f"{roi['median_ms']} ms with all 33 columns ({verdict(roi['median_ms'] < 50)}; plain sqlite3 "
            f"`fetchall()` of the same rows alone takes {floor} ms), {core['median_ms']} ms with 7 columns "
            f"({verdict(core['median_ms'] < 50)}).")
        peer = peers.get(r["records"]) if r["backend"] == "sqlite" else None
        if peer:
            notes.append(
                f"layout 2 / layout 1 at {r['records']:,} records (same run): all-columns ROI query "
                f"{roi['median_ms'] / peer['roi_query_all_columns']['median_ms']:.2f}x the time, "
                f"bulk insert {ins['per_s_wall'] / peer['insert_bulk']['per_s_wall']:.2f}x the rate, "
                f"block insert {r['insert_blocks']['per_s_wall'] / peer['insert_blocks']['per_s_wall']:.2f}x, "
                f"update_fields {r['update_fields']['per_s_wall'] / peer['update_fields']['per_s_wall']:.2f}x, "
                f"export {r['export_parquet']['seconds'] / peer['export_parquet']['seconds']:.2f}x the time, "
                f"file {r['db_file_mib'] / peer['db_file_mib']:.2f}x the size.")
    if notes:
        notes.append("Layout 1's all-columns floor is Python's sqlite3 row fetch: one Python object per "
                     "value (~33 × rows), before any DataFrame is built; layout 2 fetches one BLOB and the 4 "
                     "text fields per record instead. SQLite's R*Tree search and join are `ROI count ms`.")
    return notes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000], help="SQLite record counts")
    p.add_argument("--layout1-sizes", type=int, nargs="*", default=None,
                   help="record counts of the SQLite layout-1 peer (default: --sizes)")
    p.add_argument("--mongomock-sizes", type=int, nargs="*", default=[100_000])
    p.add_argument("--repeats", type=int, default=30, help="ROI / neuron queries per case")
    p.add_argument("--out-dir", default=os.path.join(REPO, "benchmarks", "results"))
    p.add_argument("--name", default="bench_db")
    p.add_argument("--child", nargs=2, metavar=("BACKEND", "N"), help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        with tempfile.TemporaryDirectory(prefix="bench_db_") as work:
            res = run_case(a.child[0], int(a.child[1]), work, a.repeats)
        with open(a.child_out, "w") as f:
            json.dump(res, f)
        return 0

    peer_sizes = a.sizes if a.layout1_sizes is None else a.layout1_sizes
    cases = ([("sqlite", n) for n in a.sizes] + [("sqlite-layout1", n) for n in peer_sizes]
             + [("mongomock", n) for n in a.mongomock_sizes])
    report = {"environment": {
        "date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(), "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version, "pandas": pd.__version__,
        "loadavg_start": [round(x, 2) for x in os.getloadavg()]}, "cases": []}
    for backend, n in cases:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
            out = tmp.name
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", backend, str(n),
                               "--child-out", out, "--repeats", str(a.repeats)],
                              capture_output=True, text=True)
        if proc.returncode == 0:
            with open(out) as f:
                res = json.load(f)
        else:
            res = {"backend": backend, "records": n, "error": proc.stderr.strip().splitlines()[-1][:200]}
        os.remove(out)
        res["case_seconds"] = round(time.perf_counter() - t, 1)
        report["cases"].append(res)
        print(json.dumps(res), flush=True)
    report["environment"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    report["notes"] = target_notes(report["cases"])
    os.makedirs(a.out_dir, exist_ok=True)
    with open(os.path.join(a.out_dir, f"{a.name}.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(a.out_dir, f"{a.name}.md"), "w") as f:
        f.write(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
