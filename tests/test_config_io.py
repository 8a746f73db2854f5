"""Strict YAML → dataclass loading."""

from dataclasses import dataclass, field
from typing import Optional

import pytest

from cleftwise.storage.config_io import ConfigError, field_docs, from_dict, load_config, to_dict


@dataclass
class Inner:
    workers: int = 1
    """number of workers"""
    address: Optional[str] = None


@dataclass
class Outer:
    input: str
    """input URL"""
    patch: tuple = (18, 160, 160)
    scale: float = 1.0
    inner: Inner = field(default_factory=Inner)


def test_from_dict_nested_and_defaults():
    cfg = from_dict(Outer, {"input": "a.zarr/raw", "scale": 2, "inner": {"workers": 3}})
    assert cfg.scale == 2.0 and cfg.inner.workers == 3 and cfg.patch == (18, 160, 160)
    assert to_dict(cfg)["inner"] == {"workers": 3, "address": None}
    assert field_docs(Inner)["workers"] == "number of workers"


def test_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key\(s\) bogus"):
        from_dict(Outer, {"input": "x", "bogus": 1})
    with pytest.raises(ConfigError, match=r"config.inner.workers: expected an integer"):
        from_dict(Outer, {"input": "x", "inner": {"workers": "two"}})
    with pytest.raises(ConfigError, match="missing required key 'input'"):
        from_dict(Outer, {})
    p = tmp_path / "c.yaml"
    p.write_text("input: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Outer, str(p))
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, str(tmp_path / "missing.yaml"))
    p.write_text("predict:\n  input: a\n  inner: {workers: 2}\n")
    assert load_config(Outer, str(p), section="predict").inner.workers == 2
