"""YAML/dict → dataclass with strict checking (unknown keys, wrong types) and clear errors.

Every stage has one config dataclass; the CLIs and the tests both build it, from YAML through
:func:`load_config` or directly in Python. Nested dataclass fields are filled recursively.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from typing import Any, Optional, Type, TypeVar

import yaml

from cleftwise.errors import CleftwiseError
from cleftwise.storage.errors import StorageError

__all__ = ["ConfigError", "from_dict", "load_config", "read_yaml", "yaml_error_text", "to_dict", "field_docs"]

T = TypeVar("T")


class ConfigError(StorageError):
    """Deprecated, raised by nothing: config parsing raises the caller's ``error`` (StorageError
    by default). Kept only until the last importers are gone."""


def _check_type(value: Any, tp: Any, where: str, error: type) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(value, a, where, error)
            except error as e:
                errors.append(str(e))
        raise error(errors[0] if errors else f"{where}: invalid value {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise error(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        return from_dict(tp, value, where, error=error)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise error(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise error(f"{where}: expected {len(args)} values, got {len(value)}: {value!r}")
            return tuple(_check_type(v, a, f"{where}[{i}]", error) for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        out = [_check_type(v, inner, f"{where}[{i}]", error) for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise error(f"{where}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise error(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise error(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise error(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, (str, os.PathLike)):
            raise error(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: Type[T], data: Optional[dict], where: str = "config", *,
              error: type = StorageError) -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and bad types raise ``error``.

    ``error`` is the calling layer's exception type; a ValueError/TypeError, or another layer's
    error, from a dataclass's own validation is raised as ``error`` too (prefixed by ``where``).
    """
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise error(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys are "
                    f"{', '.join(sorted(fields))}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _check_type(data[name], hints[name], f"{where}.{name}", error)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise error(f"{where}: missing required key {name!r}")
    try:
        return cls(**kwargs)
    except error:
        raise
    except (ValueError, TypeError, CleftwiseError) as e:
        raise error(f"{where}: {e}") from e


def yaml_error_text(path: str, e: yaml.YAMLError) -> str:
    """``config file <path> is not valid YAML at line L, column C: <problem> (<context>)`` (lines
    and columns counted from 1)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None)
    if mark is None or not problem:
        return f"config file {path} is not valid YAML: {' '.join(str(e).split())}"
    text = f"config file {path} is not valid YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}"
    ctx, ctx_mark = getattr(e, "context", None), getattr(e, "context_mark", None)
    if ctx:
        text += f" ({ctx}" + (f" at line {ctx_mark.line + 1}, column {ctx_mark.column + 1}" if ctx_mark else "") + ")"
    return text


def read_yaml(path: str, *, error: type = StorageError) -> Any:
    """The data of YAML file ``path``; a missing or unreadable file or invalid YAML raises
    ``error`` naming the file (and, for invalid YAML, the line and column)."""
    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except FileNotFoundError as e:
        raise error(f"config file {path} not found") from e
    except OSError as e:
        raise error(f"config file {path} cannot be read: {e.strerror or e}") from e
    except yaml.YAMLError as e:
        raise error(yaml_error_text(path, e)) from e


def load_config(cls: Type[T], path: str, section: Optional[str] = None, *,
                error: type = StorageError) -> T:
    """Read YAML ``path`` (optionally one top-level ``section``) into dataclass ``cls``.

    A missing file, invalid YAML, unknown keys and bad values raise ``error`` naming the file.
    """
    data = read_yaml(path, error=error) or {}
    if not isinstance(data, dict):
        raise error(f"config file {path}: top level must be a mapping")
    if section is not None:
        data = data.get(section, {}) or {}
    return from_dict(cls, data, where=f"{path}" + (f":{section}" if section else ""), error=error)


def to_dict(obj: Any) -> dict:
    """Dataclass → plain dict (tuples become lists), for YAML/JSON."""
    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v
    return conv(obj)


def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings (string literal after each field) of a dataclass and its bases."""
    import ast
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        declared = klass.__dict__.get("__field_docs__")
        if declared is not None:  # a class built at run time (no source) declares its docs
            docs.update(declared)
            continue
        try:
            src = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        tree = ast.parse(src)
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for a, b in zip(body, body[1:]):
            if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and \
                    isinstance(b, ast.Expr) and isinstance(getattr(b, "value", None), ast.Constant) and \
                    isinstance(b.value.value, str):
                docs[a.target.id] = b.value.value.strip()
    return docs
