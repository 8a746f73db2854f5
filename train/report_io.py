"""Helpers shared by the evaluation reports of train/: JSON-safe conversion of results."""

from __future__ import annotations

import json

import numpy as np

__all__ = ["jsonable", "write_json_and_markdown"]


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


def write_json_and_markdown(report: dict, json_path: str, md_path: str, markdown: str) -> None:
    """Write ``report`` (made JSON-safe) to ``json_path`` and ``markdown`` to ``md_path``."""
    with open(json_path, "w") as f:
        json.dump(jsonable(report), f, indent=1)
    with open(md_path, "w") as f:
        f.write(markdown)
