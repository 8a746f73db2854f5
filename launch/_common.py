"""Shared by the launch scripts: the argument parser every command starts from.

:func:`new_parser` adds ``--version`` (``cleftwise <version>``) and, when the script runs as a
subcommand of ``cleftwise`` (:mod:`cleftwise.launch.cli`), names the program ``cleftwise <sub>``
in usage and error messages. :func:`add_verbosity` / :func:`setup_logging` give every command
the same ``-q`` / ``-v`` / ``-vv``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
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
    """``argparse.ArgumentParser(**kwargs)`` with ``--version``, ``-q`` and ``-v``; under ``cleftwise <sub>`` the
    program name is that (unless ``prog`` is given). ``formatter_class=ArgumentDefaultsHelpFormatter``
    becomes :class:`DefaultsOnceHelpFormatter` (each help says its default once)."""
    if _prog is not None:
        kwargs.setdefault("prog", _prog)
    if kwargs.get("formatter_class") is argparse.ArgumentDefaultsHelpFormatter:
        kwargs["formatter_class"] = DefaultsOnceHelpFormatter
    return add_verbosity(add_version(argparse.ArgumentParser(**kwargs)))


@contextlib.contextmanager
def command_prog(prog: str) -> Iterator[None]:
    """Within the block, :func:`new_parser` names the program ``prog`` (e.g. ``cleftwise predict``)."""
    global _prog
    old, _prog = _prog, prog
    try:
        yield
    finally:
        _prog = old


#: log line format of every command
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def add_verbosity(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``-q/--quiet`` and ``-v/--verbose`` (repeatable) to ``p``; returns ``p``."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("-v", "--verbose", action="count", default=0,
                   help="more detail: -v shows cleftwise's debug lines, -vv every library's too")
    g.add_argument("-q", "--quiet", action="store_true",
                   help="only warnings and errors; no progress bars")
    return p


def setup_logging(args: argparse.Namespace, default: int = logging.INFO) -> int:
    """Configure logging for ``-q`` / ``-v`` (see :func:`add_verbosity`); returns cleftwise's level.

    cleftwise's own loggers log at ``default`` (INFO unless the command is terse by default),
    DEBUG with ``-v``, WARNING with ``-q``. Other libraries (pymongo, ray, distributed, urllib3,
    …) stay at WARNING unless ``-vv``, so ``-v`` shows cleftwise's debug lines and not theirs.
    """
    verbose = int(getattr(args, "verbose", 0) or 0)
    quiet = bool(getattr(args, "quiet", False))
    level = logging.WARNING if quiet else logging.DEBUG if verbose else default
    logging.basicConfig(level=logging.DEBUG if verbose >= 2 else logging.WARNING, format=LOG_FORMAT,
                        force=True)
    if verbose >= 2:  # libraries that set their own level (distributed, ray) follow the root too
        for logger in list(logging.root.manager.loggerDict.values()):
            if isinstance(logger, logging.Logger):
                logger.setLevel(logging.NOTSET)
    logging.getLogger("cleftwise").setLevel(level)
    return level


def show_progress(args: argparse.Namespace) -> bool:
    """False when the command was asked to be quiet (``-q``) or ``--no-progress``."""
    return not (getattr(args, "quiet", False) or getattr(args, "no_progress", False))
