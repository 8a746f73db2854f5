"""Helpers shared by the evaluation reports of train/: JSON-safe conversion of results."""

from __future__ import annotations

import numpy as np

__all__ = ["jsonable"]


def jsonable(o):
    """``o`` with numpy scalars/arrays turned into Python values (keys named ``_arrays`` dropped)."""
    if isinstance(o, dict):
        return {str(k): jsonable(v) for k, v in o.items() if k != "_arrays"}
    if isinstance(o, (list, tuple)):
        return [jsonable(v) for v in o]
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return o
