#!/usr/bin/env python
"""The ``cleftwise`` command: one subcommand per launch script.

``cleftwise <command> [options]`` runs ``launch/<script>.py [options]``; ``cleftwise <command>
--help`` lists its options. Only the chosen command's module is imported.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from cleftwise.launch._common import add_version, command_prog

# command → (module in cleftwise.launch, one-line summary); the summaries live here so that
# ``cleftwise --help`` needs no command module
COMMANDS: dict[str, tuple[str, str]] = {
    "predict": ("predict_volume", "run the pipeline on a volume (--config C.yaml) or the --demo"),
    "query": ("query_synapses", "query a synapse database, print or save the records"),
    "export": ("export_graph", "export the signed connectome of a synapse database"),
    "import-stack": ("import_stack", "import a folder of section images (or a TIFF) as a zarr volume"),
    "import-synapses": ("import_synapses", "import external synapse tables (CSV/Parquet) into a database"),
    "make-synthetic": ("make_synthetic", "generate a synthetic EM volume with full ground truth"),
    "config-reference": ("config_reference", "print the pipeline configuration reference (Markdown)"),
    "train-rsunet": ("train_rsunet", "train an RSUNet synapse model"),
    "train-classifier": ("train_classifier", "train a synapse transmitter (E/I) classifier"),
    "evaluate": ("evaluate", "evaluate RSUNet weights through the pipeline on a labelled volume"),
    "evaluate-classifier": ("evaluate_classifier", "evaluate a transmitter classifier per synapse and neuron"),
    "evaluate-real": ("evaluate_real", "evaluate a cleft model on a held-out band of a real EM stack"),
    "evaluate-tables": ("evaluate_tables", "evaluate neuron signs on real tables (MICrONS, MANC)"),
    "tune-segment": ("tune_segment", "choose the segment threshold and min_size on a validation volume"),
    "cv-folds": ("cv_folds", "train out-of-fold models for choosing post-processing"),
    "view": ("view", "open a run's outputs in neuroglancer (state JSON, --serve over HTTP)"),
}


def _parser() -> argparse.ArgumentParser:
    width = max(len(c) for c in COMMANDS)
    commands = "\n".join(f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items())
    p = argparse.ArgumentParser(
        prog="cleftwise", description="cleftwise: from raw EM to a signed connectome; one command per task.",
        usage="cleftwise [-h] [--version] <command> [options]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"commands:\n{commands}\n\n'cleftwise <command> --help' shows a command's options.")
    add_version(p)
    p.add_argument("command", metavar="<command>", nargs="?", help="one of the commands below")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = _parser()
    if not argv:
        p.print_help(sys.stderr)
        return 2
    if argv[0].startswith("-"):
        p.parse_args(argv)  # --help / --version exit here, unknown options are usage errors
        p.error("no command given")
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        p.error(f"unknown command {name!r}; choose from: {', '.join(COMMANDS)}")
    module = importlib.import_module(f"cleftwise.launch.{COMMANDS[name][0]}")
    with command_prog(f"cleftwise {name}"):
        return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
