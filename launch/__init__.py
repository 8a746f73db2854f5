"""Command-line programs: thin scripts that parse arguments, build config dataclasses and call
the packages. Each is installed as a subcommand of ``cleftwise`` (see :mod:`cleftwise.launch.cli`)
and can also be run as ``python launch/<name>.py``. Nothing imports this package."""
