"""Checkpoint I/O: a plain ``state_dict`` file plus a small JSON describing the architecture.

A checkpoint ``model.pt`` has a sibling ``model.json``::

    {"format": "cleftwise-checkpoint", "format_version": 1,
     "model_type": "rsunet",                 # key of MODEL_REGISTRY
     "config": {...},                        # the model config's to_dict()
     "voxel_size": [40, 4, 4],               # nm (z, y, x) the model was trained at
     "weights_file": "model.pt",
     "weights_sha256": "…",                  # sha256 of the .pt file
     "extra": {...}}                         # free-form (training run, metrics, …)

Any model family can use this: register a config class (with ``to_dict``/``from_dict``) and a
builder under a ``model_type`` name with ``register_model``; RSUNet is registered as "rsunet".
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from cleftwise.models.errors import ModelError
from cleftwise.models.rsunet import RSUNetConfig, build_rsunet

__all__ = [
    "ModelSpec",
    "MODEL_REGISTRY",
    "register_model",
    "CheckpointMeta",
    "checkpoint_paths",
    "save_checkpoint",
    "weights_digest",
    "read_checkpoint_meta",
    "load_model",
    "resolve_device",
]

log = logging.getLogger(__name__)

FORMAT = "cleftwise-checkpoint"
FORMAT_VERSION = 1
PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class ModelSpec:
    """How to rebuild one model family: its config class and a builder ``config -> nn.Module``."""

    config_cls: type
    builder: Callable[[Any], nn.Module]


MODEL_REGISTRY: Dict[str, ModelSpec] = {"rsunet": ModelSpec(RSUNetConfig, build_rsunet)}


def register_model(model_type: str, config_cls: type, builder: Callable[[Any], nn.Module],
                   overwrite: bool = False) -> None:
    """Register a model family under ``model_type`` for ``save_checkpoint``/``load_model``.

    ``config_cls`` needs ``to_dict()`` and a ``from_dict(dict)`` classmethod; ``builder(config)``
    returns a freshly initialised ``nn.Module``. Re-registering the same name raises ModelError
    unless ``overwrite`` (or the spec is identical).
    """
    if not hasattr(config_cls, "from_dict") or not hasattr(config_cls, "to_dict"):
        raise ModelError(f"register_model({model_type!r}): {config_cls.__name__} lacks to_dict/from_dict")
    spec = ModelSpec(config_cls, builder)
    if model_type in MODEL_REGISTRY and MODEL_REGISTRY[model_type] != spec and not overwrite:
        raise ModelError(f"register_model: model_type {model_type!r} is already registered")
    MODEL_REGISTRY[model_type] = spec


@dataclass
class CheckpointMeta:
    """What a checkpoint's JSON says, plus where its files are.

    Attribute reads that are not fields fall through to ``config`` (so ``meta.out_channels``
    works like ``meta.config.out_channels``).
    """

    model_type: str
    config: Any
    voxel_size: Tuple[float, ...]
    """nm (z, y, x) the model expects."""
    weights_path: Path
    json_path: Path
    weights_sha256: str
    extra: Dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "config":
            raise AttributeError(name)
        try:
            return getattr(self.__dict__["config"], name)
        except (KeyError, AttributeError):
            raise AttributeError(f"CheckpointMeta has no attribute {name!r} (nor has its config)") from None


def checkpoint_paths(path: PathLike) -> Tuple[Path, Path]:
    """(weights ``.pt`` path, JSON path) of a checkpoint named by either file (or a stem)."""
    p = Path(path)
    if p.suffix == ".json":
        return p.with_suffix(".pt"), p
    if p.suffix == ".pt":
        return p, p.with_suffix(".json")
    return p.with_name(p.name + ".pt"), p.with_name(p.name + ".json")


def weights_digest(path: PathLike) -> str:
    """sha256 hex digest of a checkpoint's state-dict file (``path``: the .pt, .json or stem)."""
    pt, _ = checkpoint_paths(path)
    if not pt.is_file():
        raise ModelError(f"checkpoint weights not found: {pt}")
    h = hashlib.sha256()
    with open(pt, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _unwrap(model: nn.Module) -> nn.Module:
    """The bare module under torch.compile / DataParallel wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model


def _voxel_size(voxel_size: Sequence[float]) -> Tuple[float, ...]:
    try:
        vs = tuple(int(v) if float(v).is_integer() else float(v) for v in voxel_size)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"checkpoint voxel_size must be 3 numbers (z, y, x) nm, got {voxel_size!r}") from exc
    if len(vs) != 3 or any(v <= 0 for v in vs):
        raise ModelError(f"checkpoint voxel_size must be 3 positive numbers (z, y, x) nm, got {voxel_size!r}")
    return vs


def _model_type_of(config: Any) -> str:
    for name, spec in MODEL_REGISTRY.items():
        if type(config) is spec.config_cls:
            return name
    raise ModelError(f"no registered model_type has config class {type(config).__name__}; call register_model")


def save_checkpoint(path: PathLike, model: nn.Module, config: Any, voxel_size: Sequence[float],
                    model_type: Optional[str] = None, extra: Optional[Mapping[str, Any]] = None) -> CheckpointMeta:
    """Write ``model``'s state dict to ``<path>.pt`` and its architecture to ``<path>.json``.

    ``config`` is the config the model was built from; ``voxel_size`` (z, y, x) nm is the
    resolution the model expects; ``model_type`` defaults to the registered name of
    ``type(config)``; ``extra`` is any JSON-serialisable dict. Both files are written atomically.
    """
    model_type = _model_type_of(config) if model_type is None else model_type
    if model_type not in MODEL_REGISTRY:
        raise ModelError(f"unknown model_type {model_type!r}; registered: {sorted(MODEL_REGISTRY)}")
    if not isinstance(config, MODEL_REGISTRY[model_type].config_cls):
        raise ModelError(
            f"config for model_type {model_type!r} must be {MODEL_REGISTRY[model_type].config_cls.__name__}, "
            f"got {type(config).__name__}"
        )
    vs = _voxel_size(voxel_size)
    pt, js = checkpoint_paths(path)
    pt.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in _unwrap(model).state_dict().items()}
    _atomic_write(pt, lambda tmp: torch.save(state, tmp))
    digest = weights_digest(pt)
    extra = dict(extra or {})
    doc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_type": model_type,
        "config": config.to_dict(),
        "voxel_size": list(vs),
        "weights_file": pt.name,
        "weights_sha256": digest,
        "extra": extra,
    }
    try:
        text = json.dumps(doc, indent=2, sort_keys=True)
    except TypeError as exc:
        raise ModelError(f"checkpoint {js}: extra/config is not JSON-serialisable: {exc}") from exc

    def write_json(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text + "\n")

    _atomic_write(js, write_json)
    log.info("saved %s checkpoint %s (sha256 %s)", model_type, pt, digest[:12])
    return CheckpointMeta(model_type, config, vs, pt, js, digest, extra)


def read_checkpoint_meta(path: PathLike) -> CheckpointMeta:
    """Parse a checkpoint's JSON (``path``: the .pt, .json or stem) without loading weights."""
    pt, js = checkpoint_paths(path)
    if not js.is_file():
        if Path(path).suffix != ".json" and not pt.is_file():
            raise ModelError(f"checkpoint not found: {pt} (no such file, nor its architecture JSON {js.name})")
        raise ModelError(f"checkpoint architecture JSON not found: {js} (save_checkpoint writes it beside "
                         f"the weights {pt.name})")
    try:
        doc = json.loads(js.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"checkpoint JSON {js} is unreadable: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ModelError(f"checkpoint JSON {js}: not a {FORMAT} file")
    if doc.get("format_version") != FORMAT_VERSION:
        raise ModelError(f"checkpoint JSON {js}: format_version {doc.get('format_version')!r} unsupported")
    for key in ("model_type", "config", "voxel_size"):
        if key not in doc:
            raise ModelError(f"checkpoint JSON {js}: missing key {key!r}")
    model_type = doc["model_type"]
    if model_type not in MODEL_REGISTRY:
        raise ModelError(f"checkpoint JSON {js}: unknown model_type {model_type!r}; registered: {sorted(MODEL_REGISTRY)}")
    try:
        config = MODEL_REGISTRY[model_type].config_cls.from_dict(doc["config"])
    except ModelError as exc:
        raise ModelError(f"checkpoint JSON {js}: {exc}") from exc
    if doc.get("weights_file"):
        pt = js.parent / doc["weights_file"]
    return CheckpointMeta(
        model_type=model_type,
        config=config,
        voxel_size=_voxel_size(doc["voxel_size"]),
        weights_path=pt,
        json_path=js,
        weights_sha256=str(doc.get("weights_sha256", "")),
        extra=dict(doc.get("extra") or {}),
    )


def resolve_device(device: Union[str, torch.device, None] = "auto") -> torch.device:
    """``"auto"``/None → cuda if available else cpu; anything else → ``torch.device(device)``."""
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ModelError(f"invalid torch device {device!r}: {exc}") from exc


def _compare_state(expected: Mapping[str, torch.Tensor], got: Mapping[str, Any], where: Path,
                   limit: int = 5) -> None:
    """Raise ModelError naming the first missing/unexpected keys and shape mismatches."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [
        f"{k}: file {tuple(got[k].shape)} vs architecture {tuple(v.shape)}"
        for k, v in expected.items()
        if k in got and tuple(getattr(got[k], "shape", ())) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (first: {missing[:limit]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (first: {unexpected[:limit]})")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches (first: {shapes[:limit]})")
    if problems:
        raise ModelError(f"checkpoint {where} does not match its JSON architecture: " + "; ".join(problems))


def load_model(path: PathLike, device: Union[str, torch.device, None] = "auto",
               verify_digest: bool = True) -> Tuple[nn.Module, CheckpointMeta]:
    """Rebuild a checkpoint's model, load its weights and put it in eval mode on ``device``.

    Returns ``(model, meta)``; ``meta.config`` is the architecture config (its attributes are
    also readable on ``meta`` directly), ``meta.voxel_size`` the expected (z, y, x) nm and
    ``meta.weights_sha256`` the digest of the weights actually loaded. Raises ModelError for a
    missing file, a digest that differs from the JSON's (when ``verify_digest``), or a state dict
    whose keys/shapes differ from the architecture (naming the first offending keys).
    """
    meta = read_checkpoint_meta(path)
    pt = meta.weights_path
    if not pt.is_file():
        raise ModelError(f"checkpoint weights not found: {pt}")
    digest = weights_digest(pt)
    if verify_digest and meta.weights_sha256 and digest != meta.weights_sha256:
        raise ModelError(
            f"checkpoint {pt}: sha256 {digest[:12]}… differs from {meta.weights_sha256[:12]}… recorded in "
            f"{meta.json_path}; the weights were replaced without save_checkpoint"
        )
    meta.weights_sha256 = digest
    try:
        state = torch.load(pt, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt files
        raise ModelError(f"checkpoint weights {pt} are unreadable: {exc}") from exc
    if not isinstance(state, Mapping):
        raise ModelError(f"checkpoint weights {pt}: expected a state dict, got {type(state).__name__}")
    model = MODEL_REGISTRY[meta.model_type].builder(meta.config)
    _compare_state(model.state_dict(), state, pt)
    model.load_state_dict(state, strict=True)
    model.to(resolve_device(device)).eval()
    log.info("loaded %s checkpoint %s (sha256 %s)", meta.model_type, pt, digest[:12])
    return model, meta
