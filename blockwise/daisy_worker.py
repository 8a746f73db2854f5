"""A long-lived daisy pool worker (see :mod:`cleftwise.blockwise.pool`).

``python -m cleftwise.blockwise.daisy_worker --pool HOST:PORT`` (the pool's authkey, hex, in
``CLEFTWISE_POOL_AUTHKEY``; the launch time, s since the epoch, in ``CLEFTWISE_POOL_T0``)
connects to the pool's broker in the driver, reports its start-up time (launch → ready, s),
then serves one daisy task after another for the whole run: ``load`` (a pass is starting:
unpickle its step, importing the step's modules, while daisy spawns its slots), then ``run``:
it receives the
``DAISY_CONTEXT`` of the process daisy spawned for a worker slot and the path of the pickled
step, opens the step's resources (model, DB connection, volume handles), pulls the task's
blocks from the daisy scheduler until none are left, closes the resources and answers.
It exits when the driver closes the connection (end of the run, or the driver is gone).

It imports only what every step needs (daisy's client, the ledger); the step's own modules
are imported when its pickle is loaded, once per process.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
import traceback

ENV_AUTHKEY = "CLEFTWISE_POOL_AUTHKEY"
ENV_T0 = "CLEFTWISE_POOL_T0"


_loaded: dict = {}  # payload path → (mtime ns, payload): the pass announced by "load"


def load_payload(payload_path: str) -> dict:
    """The pickled step of a pass (unpickling imports the step's modules: done ahead, on
    "load", while daisy starts the pass)."""
    import cloudpickle

    mtime = os.stat(payload_path).st_mtime_ns
    hit = _loaded.get(payload_path)
    if hit is not None and hit[0] == mtime:
        return hit[1]
    with open(payload_path, "rb") as f:
        payload = cloudpickle.load(f)
    _loaded.clear()
    _loaded[payload_path] = (mtime, payload)
    return payload


def run_daisy_task(context: str, payload_path: str) -> None:
    """Serve one daisy task: load the step, pull blocks with ``daisy.Client`` until none are left."""
    from cleftwise.blockwise.runner import daisy_worker_loop

    payload = load_payload(payload_path)
    os.environ["DAISY_CONTEXT"] = context  # daisy.Client() reads its scheduler from here
    log_dir = os.path.join(payload["ledger_path"], "daisy_logs")
    handler = None
    try:
        os.makedirs(log_dir, exist_ok=True)
        handler = logging.FileHandler(os.path.join(
            log_dir, f"pool_worker_{socket.gethostname()}_{os.getpid()}.log"))
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        logging.getLogger().addHandler(handler)
    except OSError:
        handler = None
    try:
        daisy_worker_loop(payload["task"], payload["ledger_path"], payload["max_retries"])
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()


def serve(address: tuple, authkey: bytes) -> None:
    """Connect to the pool broker at ``address`` and serve tasks until it hangs up."""
    # Ctrl-C in the terminal reaches the whole process group: the driver decides (it closes
    # the pool), a worker must not die half-way through a block on its own
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from multiprocessing.connection import Client

    import daisy  # noqa: F401 - what every task needs, imported before "ready"

    import cleftwise.blockwise.runner  # noqa: F401

    t0 = float(os.environ.get(ENV_T0, "0") or 0)
    startup = time.time() - t0 if t0 else None
    conn = Client(address, authkey=authkey)
    conn.send(("worker", f"{socket.gethostname()}:{os.getpid()}", startup))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg[0] == "stop":
            return
        if msg[0] == "load":
            try:
                load_payload(msg[1])
            except Exception:  # noqa: BLE001 - "run" loads it again and reports the error
                _loaded.clear()
            continue
        if msg[0] != "run":
            continue
        try:
            run_daisy_task(msg[1], msg[2])
            reply = ("done",)
        except Exception:  # noqa: BLE001 - reported to the driver, which tells daisy
            reply = ("error", traceback.format_exc(limit=8))
        _loaded.clear()  # the pass is over
        try:
            conn.send(reply)
        except (EOFError, OSError):
            return


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "--pool":
        host, _, port = argv[1].rpartition(":")
        key = os.environ.get(ENV_AUTHKEY)
        if not key or not port.isdigit():
            raise SystemExit(f"daisy pool worker: need HOST:PORT and ${ENV_AUTHKEY}")
        serve((host, int(port)), bytes.fromhex(key))
        return
    raise SystemExit("usage: python -m cleftwise.blockwise.daisy_worker --pool HOST:PORT")


if __name__ == "__main__":
    main()
