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


class DefaultsOnceHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``ArgumentDefaultsHelpFormatter`` that adds ``(default: X)`` only where the help text does
    not already speak of its default, and not for a default of None (nothing to show)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default is None:
            return text
        return super()._get_help_string(action)


def new_parser(**kwargs) -> argparse.ArgumentParser:
    """``argparse.ArgumentParser(**kwargs)`` with ``--version``; under ``cleftwise <sub>`` the
    program name is that (unless ``prog`` is given). ``formatter_class=ArgumentDefaultsHelpFormatter``
    becomes :class:`DefaultsOnceHelpFormatter` (each help says its default once)."""
    if _prog is not None:
        kwargs.setdefault("prog", _prog)
    if kwargs.get("formatter_class") is argparse.ArgumentDefaultsHelpFormatter:
        kwargs["formatter_class"] = DefaultsOnceHelpFormatter
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
