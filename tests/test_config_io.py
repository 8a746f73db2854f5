"""Strict YAML → dataclass loading."""

from dataclasses import dataclass, field
from typing import Optional

import pytest

from cleftwise.errors import CleftwiseError
from cleftwise.models.errors import ModelError
from cleftwise.storage.config_io import field_docs, from_dict, load_config, to_dict
from cleftwise.storage.errors import StorageError
from cleftwise.train.errors import TrainError


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


@dataclass
class Checked(Inner):
    level: int = 0
    """a level the model layer checks"""

    def __post_init__(self):
        if self.level < 0:
            raise ModelError(f"level must be >= 0, got {self.level}")
        if self.level > 9:
            raise ValueError(f"level must be <= 9, got {self.level}")


@dataclass
class Holder:
    checked: Checked = field(default_factory=Checked)


def test_from_dict_nested_and_defaults():
    cfg = from_dict(Outer, {"input": "a.zarr/raw", "scale": 2, "inner": {"workers": 3}})
    assert cfg.scale == 2.0 and cfg.inner.workers == 3 and cfg.patch == (18, 160, 160)
    assert to_dict(cfg)["inner"] == {"workers": 3, "address": None}
    assert field_docs(Inner)["workers"] == "number of workers"


def test_errors_name_the_key(tmp_path):
    with pytest.raises(StorageError, match=r"unknown key\(s\) bogus"):
        from_dict(Outer, {"input": "x", "bogus": 1})
    with pytest.raises(StorageError, match=r"config.inner.workers: expected an integer"):
        from_dict(Outer, {"input": "x", "inner": {"workers": "two"}})
    with pytest.raises(StorageError, match="missing required key 'input'"):
        from_dict(Outer, {})
    p = tmp_path / "c.yaml"
    p.write_text("input: [unclosed\n")
    with pytest.raises(StorageError, match="not valid YAML"):
        load_config(Outer, str(p))
    with pytest.raises(StorageError, match="not found"):
        load_config(Outer, str(tmp_path / "missing.yaml"))
    p.write_text("predict:\n  input: a\n  inner: {workers: 2}\n")
    assert load_config(Outer, str(p), section="predict").inner.workers == 2


def test_errors_are_the_callers_type(tmp_path):
    """``error=`` picks the exception type; other layers' errors from validation become it too."""
    with pytest.raises(TrainError, match=r"unknown key\(s\) bogus") as e:
        from_dict(Outer, {"input": "x", "bogus": 1}, error=TrainError)
    assert not isinstance(e.value, StorageError)
    with pytest.raises(TrainError, match=r"config.inner.workers: expected an integer"):
        from_dict(Outer, {"input": "x", "inner": {"workers": "two"}}, error=TrainError)
    with pytest.raises(TrainError, match=r"config.checked: level must be >= 0, got -1"):
        from_dict(Holder, {"checked": {"level": -1}}, error=TrainError)
    with pytest.raises(TrainError, match=r"config.checked: level must be <= 9"):
        from_dict(Holder, {"checked": {"level": 10}}, error=TrainError)
    with pytest.raises(StorageError, match=r"config.checked: level must be >= 0"):
        from_dict(Holder, {"checked": {"level": -1}})
    with pytest.raises(TrainError, match="not found"):
        load_config(Outer, str(tmp_path / "missing.yaml"), error=TrainError)
    for layer_error in (StorageError, ModelError, TrainError):
        assert issubclass(layer_error, CleftwiseError)


def test_field_docs_include_the_bases():
    assert field_docs(Checked) == {"workers": "number of workers", "level": "a level the model layer checks"}
