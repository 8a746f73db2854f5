"""The configuration reference in docs/ is the one the dataclasses generate (no stale docs)."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_configuration_reference_is_current():
    out = subprocess.run([sys.executable, os.path.join(REPO, "launch", "config_reference.py")],
                         capture_output=True, text=True, check=True, cwd=REPO).stdout
    with open(os.path.join(REPO, "docs", "configuration.md")) as f:
        assert f.read() == out, "docs/configuration.md is stale: python launch/config_reference.py > docs/configuration.md"
    for key in ("`classify.checkpoint`", "`predict.block_shape`", "`segment.threshold`", "`backend.workers`"):
        assert key in out


def test_readme_config_example_parses():
    """The job.yaml shown in the README is a valid pipeline config."""
    import yaml

    from cleftwise.postprocess.pipeline import parse_config

    text = open(os.path.join(REPO, "README.md")).read()
    block = text.split("`job.yaml`", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    cfg = parse_config(yaml.safe_load(block), where="README job.yaml")
    assert cfg.classify.checkpoint.endswith("ei_vgg3d.pt") and cfg.backend.backend == "daisy"
