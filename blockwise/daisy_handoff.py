"""The function daisy spawns for a pooled run: it hands its ``DAISY_CONTEXT`` to a pool worker.

daisy 2 starts a fresh ``python -m daisy._subprocess_worker`` for every worker slot of every
task. With a :mod:`cleftwise.blockwise.pool` daisy pool, that process only forwards its
context (scheduler address, task id, worker id) to the pool's broker in the driver, which
hands it to an idle long-lived pool worker; the pool worker pulls the task's blocks with
``daisy.Client`` while this process waits for its answer, and exits 0 (done) or 1 (the pool
worker failed or died: a dirty exit, so daisy re-runs the slot and its block).

This module is pickled *by value* (the driver registers it with cloudpickle), so the spawned
process imports nothing of cleftwise: only the standard library.
"""

import os
import sys


class DaisyHandoff:
    """0-argument daisy worker function: forward the context to the pool and wait."""

    def __init__(self, address: tuple, authkey: bytes, payload_path: str):
        self.address = tuple(address)
        self.authkey = authkey
        self.payload_path = payload_path

    def __call__(self):
        from multiprocessing.connection import Client

        context = os.environ.get("DAISY_CONTEXT", "")
        try:
            conn = Client(self.address, authkey=self.authkey)
            conn.send(("run", context, self.payload_path))
            reply = conn.recv()
            conn.close()
        except (OSError, EOFError) as e:
            print(f"cleftwise: lost the worker pool at {self.address[0]}:{self.address[1]}: {e}",
                  file=sys.stderr, flush=True)
            raise SystemExit(1)
        if reply[0] != "done":
            print(f"cleftwise: pool worker {reply[0]}: {reply[1] if len(reply) > 1 else ''}",
                  file=sys.stderr, flush=True)
            raise SystemExit(1)
