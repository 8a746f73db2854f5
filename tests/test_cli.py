"""The ``cleftwise`` command and the launch scripts: subcommands, --help, --version, errors."""

import json
import os
import shutil
import subprocess
import sys

import pytest

import cleftwise
from cleftwise.launch import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VERSION = f"cleftwise {cleftwise.__version__}"
SUBCOMMANDS = ["predict", "query", "export", "import-stack", "import-synapses", "make-synthetic",
               "config-reference", "train-rsunet", "train-classifier", "evaluate", "evaluate-classifier",
               "evaluate-real", "evaluate-tables", "tune-segment", "cv-folds", "view"]
# the folders installed as cleftwise.<layer> and the benchmarks: no sys.path edits anywhere
CODE_DIRS = ["blockwise", "models", "postprocess", "storage", "train", "launch", "benchmarks"]


def _cleftwise() -> list:
    """The installed console script beside this interpreter (else on PATH), or ``python -m``."""
    here = os.path.join(os.path.dirname(sys.executable), "cleftwise")
    script = here if os.access(here, os.X_OK) else shutil.which("cleftwise")
    return [script] if script else [sys.executable, "-m", "cleftwise.launch.cli"]


def _run(args, timeout=120):
    return subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=timeout)


_HELPS = """
import contextlib, io, json, sys
from cleftwise.launch import cli
out = {}
for sub in sys.argv[1:]:
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            code = cli.main([sub, "--help"])
    except SystemExit as e:
        code = e.code
    out[sub] = [code, buf.getvalue()]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def helps():
    """``cleftwise <sub> --help`` for every subcommand, in one fresh interpreter: {sub: (exit code, stdout)}."""
    r = _run([sys.executable, "-c", _HELPS] + SUBCOMMANDS, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_subcommands_cover_every_launch_script():
    assert list(cli.COMMANDS) == SUBCOMMANDS
    scripts = {f[:-3] for f in os.listdir(os.path.join(REPO, "launch"))
               if f.endswith(".py") and not f.startswith("_") and f != "cli.py"}
    assert {module for module, _ in cli.COMMANDS.values()} == scripts


def test_version():
    r = _run(_cleftwise() + ["--version"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == VERSION


def test_help_lists_commands_without_importing_them():
    r = _run([sys.executable, "-c", "import sys\nfrom cleftwise.launch import cli\ntry:\n    cli.main(['--help'])\n"
              "except SystemExit as e:\n    assert e.code == 0, e.code\n"
              "print(sorted(m for m in sys.modules if m.startswith('cleftwise.') and m not in "
              "('cleftwise.launch', 'cleftwise.launch.cli', 'cleftwise.launch._common')))"])
    assert r.returncode == 0, r.stderr
    for sub in SUBCOMMANDS:
        assert f"\n  {sub} " in r.stdout
    assert r.stdout.strip().endswith("[]"), "cleftwise --help imported a command module"


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_subcommand_help(helps, sub):
    code, out = helps[sub]
    assert code == 0
    assert out.startswith(f"usage: cleftwise {sub} ")
    assert "--version" in out


def test_predict_help_and_subcommand_version():
    r = _run(_cleftwise() + ["predict", "--help"])
    assert r.returncode == 0, r.stderr
    assert "--config" in r.stdout and "--demo" in r.stdout
    r = _run(_cleftwise() + ["query", "--version"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == VERSION


def test_scripts_run_as_files_and_as_modules():
    r = _run([sys.executable, os.path.join("launch", "predict_volume.py"), "--version"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == VERSION
    r = _run([sys.executable, os.path.join("launch", "predict_volume.py"), "--help"])
    assert r.returncode == 0 and "usage: predict_volume.py" in r.stdout, r.stderr
    r = _run([sys.executable, "-m", "cleftwise.launch.query_synapses", "--help"])
    assert r.returncode == 0, r.stderr
    assert "--db" in r.stdout


def test_unknown_subcommand_and_no_subcommand():
    r = _run(_cleftwise() + ["frobnicate", "--x"])
    assert r.returncode == 2
    assert "unknown command 'frobnicate'" in r.stderr and "predict" in r.stderr
    assert "Traceback" not in r.stderr
    r = _run(_cleftwise() + ["--frobnicate"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    r = _run(_cleftwise())
    assert r.returncode == 2 and "<command>" in r.stderr


def test_in_process_dispatch_passes_the_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["cv-folds", "--fold", "a", "--cut-y-nm", "1", "--run-root", "r", "--stage", "x.yaml",
                  "--first-stage", "0"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: cleftwise cv-folds ") and "--first-stage must be >= 1" in err


def test_no_sys_path_edits():
    offenders = []
    for d in CODE_DIRS:
        for root, dirs, files in os.walk(os.path.join(REPO, d)):
            dirs[:] = [x for x in dirs if not x.startswith((".", "__pycache__")) and x != "scratch"]  # scratch: git-ignored benchmark venvs
            for f in files:
                if f.endswith(".py"):
                    with open(os.path.join(root, f), encoding="utf-8") as fh:
                        if "sys.path" in fh.read():
                            offenders.append(os.path.relpath(os.path.join(root, f), REPO))
    with open(os.path.join(REPO, "__init__.py"), encoding="utf-8") as fh:
        if "sys.path" in fh.read():
            offenders.append("__init__.py")
    assert offenders == []


def _levels(argv):
    """cleftwise's and pymongo's effective log levels after a command parsed ``argv``."""
    import logging

    from cleftwise.launch._common import new_parser, setup_logging, show_progress

    args = new_parser().parse_args(argv)
    setup_logging(args)
    return (logging.getLogger("cleftwise.postprocess.predict").getEffectiveLevel(),
            logging.getLogger("pymongo.command").getEffectiveLevel(),
            logging.getLogger("distributed.worker").getEffectiveLevel(), show_progress(args))


def test_quiet_and_verbose_levels():
    """-v shows cleftwise's debug lines, not every dependency's (pymongo, distributed); -vv shows
    theirs too; -q keeps warnings only and turns progress bars off."""
    import logging

    try:
        assert _levels([]) == (logging.INFO, logging.WARNING, logging.WARNING, True)
        assert _levels(["-v"]) == (logging.DEBUG, logging.WARNING, logging.WARNING, True)
        assert _levels(["-vv"]) == (logging.DEBUG, logging.DEBUG, logging.DEBUG, True)
        assert _levels(["-q"]) == (logging.WARNING, logging.WARNING, logging.WARNING, False)
    finally:
        logging.getLogger("cleftwise").setLevel(logging.NOTSET)
        logging.basicConfig(level=logging.WARNING, force=True)


def test_every_command_takes_quiet_and_verbose(helps):
    for sub, (_, text) in helps.items():
        assert "-q, --quiet" in text and "-v, --verbose" in text, sub


def test_quiet_command_prints_no_info_lines(tmp_path):
    """A real command run with -q writes no INFO lines to stderr; with -v its debug lines are
    cleftwise's only."""
    out = tmp_path / "syn.zarr"
    cmd = [sys.executable, "-m", "cleftwise.launch.make_synthetic", "--out", str(out),
           "--shape", "8", "64", "64", "--seed", "1"]
    q = subprocess.run(cmd + ["-q"], capture_output=True, text=True, timeout=120)
    assert q.returncode == 0, q.stderr
    assert "INFO" not in q.stderr and "DEBUG" not in q.stderr
    v = subprocess.run(cmd + ["-v", "--overwrite"], capture_output=True, text=True, timeout=120)
    assert v.returncode == 0, v.stderr
    assert " INFO cleftwise." in v.stderr  # make-synthetic is terse by default; -v shows its lines
    for line in v.stderr.splitlines():
        if " DEBUG " in line or " INFO " in line:
            assert " cleftwise." in line, line
