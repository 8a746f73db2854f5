"""Shared by the launch scripts: the argument parser every command starts from.

:func:`new_parser` adds ``--version`` (``cleftwise <version>``) and, when the script runs as a
subcommand of ``cleftwise`` (:mod:`cleftwise.launch.cli`), names the program ``cleftwise <sub>``
in usage and error messages.
"""

from __future__ import annotations

import argparse
import contextlib
from typing import Iterator, Optional

import cleftwise

_prog: Optional[str] = None


def version_string() -> str:
    """``cleftwise <version>``, what ``--version`` prints."""
    return f"cleftwise {cleftwise.__version__}"


def add_version(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--version`` to ``p``; returns ``p``."""
    p.add_argument("--version", action="version", version=version_string(),
                   help="print the cleftwise version and exit")
    return p


def new_parser(**kwargs) -> argparse.ArgumentParser:
    """``argparse.ArgumentParser(**kwargs)`` with ``--version``; under ``cleftwise <sub>`` the
    program name is that (unless ``prog`` is given)."""
    if _prog is not None:
        kwargs.setdefault("prog", _prog)
    return add_version(argparse.ArgumentParser(**kwargs))


@contextlib.contextmanager
def command_prog(prog: str) -> Iterator[None]:
    """Within the block, :func:`new_parser` names the program ``prog`` (e.g. ``cleftwise predict``)."""
    global _prog
    old, _prog = _prog, prog
    try:
        yield
    finally:
        _prog = old
