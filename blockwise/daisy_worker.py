"""Entry point of a daisy worker launched through a command template (e.g. ``srun``).

``python -m cleftwise.blockwise.daisy_worker PAYLOAD.pkl`` loads the pickled task, connects to the daisy
scheduler named by the inherited ``DAISY_CONTEXT`` environment variable and processes blocks
until none are left.
"""

import sys

import cloudpickle

from cleftwise.blockwise.runner import daisy_worker_loop


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m cleftwise.blockwise.daisy_worker PAYLOAD.pkl")
    with open(argv[0], "rb") as f:
        payload = cloudpickle.load(f)
    daisy_worker_loop(payload["task"], payload["ledger_path"], payload["max_retries"])


if __name__ == "__main__":
    main()
