"""Train a synapse transmitter (E/I) classifier on synapse-centred cubes.

One :class:`ClassifierTrainConfig` (YAML through :func:`load_classifier_config`) describes a run;
:func:`train_classifier` runs it in ``run_dir``:

- data: :mod:`cleftwise.train.cubes` (neuron-held-out split saved as JSON, cubes read blockwise-locally);
- model: any family of :mod:`cleftwise.models.classifiers` (``model_type`` + its config dict;
  ``input_shape`` and ``num_classes`` default to the data's cube shape and class count);
- AdamW, linear warm-up then cosine decay; loss: cross-entropy or focal (γ = 2), optionally
  class-balanced (weights ``n / (C · n_c)`` from the training counts);
- augmentation: random shift within ``data.margin``, flips along z, y, x, in-plane rot90,
  contrast/brightness/gamma/noise, optional MixUp;
- an EMA of the weights used for validation and the exported checkpoint;
- bf16 autocast on CUDA only;
- validation every ``val_every`` steps: balanced accuracy (argmax), accuracy, loss; the best
  balanced accuracy is saved as ``best.pt``/``best.json`` (a cleftwise checkpoint); training
  stops early after ``patience`` validations without improvement.

Determinism: the samples, augmentation and dropout of step ``s`` are pure functions of
``(seed, s)``, so a run resumed from ``checkpoints/last.pt`` (model, optimiser, EMA, step,
early-stopping state) continues exactly as the uninterrupted run would (on CPU: bit-identical).

CLI::

    cleftwise train-classifier --config train/configs/ei_3d.yaml [--resume] [--threads 1]
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cleftwise.models.checkpoint import resolve_device, save_checkpoint
from cleftwise.models.classifiers import CLASSIFIER_TYPES, build_classifier, classifier_config, use_fast_memory_format
from cleftwise.models.errors import ModelError
from cleftwise.postprocess.classify import predict_probs
from cleftwise.storage.config_io import from_dict, load_config, to_dict

from cleftwise.train.cubes import CubeDataConfig, CubeSet, build_cube_sets, crop_cubes, split_summary
from cleftwise.train.augment import CubeAugmentConfig
from cleftwise.train.errors import TrainError
from cleftwise.train.schedule import EMA, lr_factor

__all__ = ["LossConfig", "CubeAugmentConfig", "ClassifierTrainConfig", "load_classifier_config",
           "parse_classifier_config", "model_config_for", "batch_indices", "augment_batch",
           "classification_loss", "balanced_accuracy", "train_classifier", "TrainResult"]

log = logging.getLogger(__name__)


@dataclass
class LossConfig:
    """Classification loss."""

    kind: str = "ce"
    """ce (cross-entropy) or focal"""
    gamma: float = 2.0
    """focal loss focusing parameter γ"""
    class_balanced: bool = True
    """weight classes by n / (C · n_c) from the training counts"""
    label_smoothing: float = 0.0
    """cross-entropy label smoothing (0 = none)"""

    def __post_init__(self) -> None:
        if self.kind not in ("ce", "focal"):
            raise TrainError(f"loss.kind must be 'ce' or 'focal', got {self.kind!r}")
        if self.gamma < 0 or not 0 <= self.label_smoothing < 1:
            raise TrainError(f"loss: gamma must be >= 0 and label_smoothing in [0, 1), got {self.gamma}, "
                             f"{self.label_smoothing}")


@dataclass
class ClassifierTrainConfig:
    """One classifier training run (see module docstring)."""

    run_dir: str = "runs/ei_classifier"
    """folder for checkpoints, log.csv, best.pt/json, split and resolved config"""
    seed: int = 0
    """seed of the initialisation, sample order, augmentation and dropout"""
    data: CubeDataConfig = field(default_factory=CubeDataConfig)
    """sources, cube shape, classes and signs, split"""
    model_type: str = "vgg3d"
    """vgg3d, resnet3d or resnet2d"""
    model: dict = field(default_factory=dict)
    """the family's config (models.classifiers); input_shape / num_classes default from data"""
    loss: LossConfig = field(default_factory=LossConfig)
    """loss kind and class balancing"""
    augment: CubeAugmentConfig = field(default_factory=CubeAugmentConfig)
    """augmentation"""
    batch_size: int = 32
    """cubes per step"""
    max_steps: int = 2000
    """optimisation steps (the cosine schedule spans them)"""
    max_minutes: Optional[float] = None
    """stop (with a checkpoint) after this much wall time in this process; resume continues"""
    lr: float = 1e-3
    """peak learning rate"""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay"""
    warmup_steps: int = 50
    """linear warm-up steps"""
    min_lr_ratio: float = 0.02
    """the cosine decays to lr · min_lr_ratio"""
    grad_clip: float = 1.0
    """clip the gradient norm (0 = off)"""
    ema_decay: float = 0.99
    """EMA decay of the weights (0 = off)"""
    device: str = "auto"
    """auto (CUDA when present), cpu or cuda"""
    amp: bool = True
    """bf16 autocast on CUDA (ignored on CPU)"""
    threads: int = 0
    """torch CPU threads (0 = torch default)"""
    val_every: int = 100
    """validate every this many steps (and at the end)"""
    checkpoint_every: int = 100
    """write checkpoints/last.pt every this many steps (and at the end)"""
    patience: int = 10
    """stop after this many validations without a better balanced accuracy (0 = never)"""
    min_delta: float = 0.0
    """improvement of balanced accuracy that counts"""
    log_every: int = 10
    """training rows in log.csv every this many steps"""
    eval_batch_size: int = 64
    """cubes per forward pass in validation"""

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_steps", "val_every", "checkpoint_every", "log_every",
                     "eval_batch_size"):
            if int(getattr(self, name)) < 1:
                raise TrainError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise TrainError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        if self.patience < 0:
            raise TrainError(f"patience must be >= 0, got {self.patience}")
        if self.model_type not in CLASSIFIER_TYPES:
            raise TrainError(f"model_type must be one of {sorted(CLASSIFIER_TYPES)}, got {self.model_type!r}")
        model_config_for(self)  # validates the model section against the data


def model_config_for(cfg: ClassifierTrainConfig):
    """The model config of a run: ``cfg.model`` with input_shape/num_classes from the data.

    A model section that names a different input shape or class count than the data raises
    TrainError (model/config mismatch).
    """
    d = dict(cfg.model)
    want_shape = list(cfg.data.cube_shape)
    if cfg.model_type == "resnet2d":
        z = want_shape[0]
        if "input_shape" in d and d["input_shape"] is not None and list(d["input_shape"]) != want_shape:
            raise TrainError(f"model.input_shape {list(d['input_shape'])} differs from data.cube_shape {want_shape}")
        d["input_shape"] = want_shape
        if int(d.get("in_channels", 1)) > z:
            raise TrainError(f"model.in_channels {d.get('in_channels')} > cube depth {z}")
    else:
        if "input_shape" in d and d["input_shape"] is not None and list(d["input_shape"]) != want_shape:
            raise TrainError(f"model.input_shape {list(d['input_shape'])} differs from data.cube_shape {want_shape}")
        d["input_shape"] = want_shape
    n = len(cfg.data.classes)
    if "num_classes" in d and int(d["num_classes"]) != n:
        raise TrainError(f"model.num_classes {d['num_classes']} differs from the {n} data.classes "
                         f"{list(cfg.data.classes)}")
    d["num_classes"] = n
    try:
        return classifier_config(cfg.model_type, d)
    except ModelError as e:
        raise TrainError(f"model: {e}") from e


def parse_classifier_config(data: dict, where: str = "classifier config") -> ClassifierTrainConfig:
    """A :class:`ClassifierTrainConfig` from a dict; every error becomes a TrainError."""
    return from_dict(ClassifierTrainConfig, data, where, error=TrainError)


def load_classifier_config(path: str) -> ClassifierTrainConfig:
    """Read a classifier training YAML (unknown keys and bad values raise TrainError)."""
    return load_config(ClassifierTrainConfig, path, error=TrainError)


# ------------------------------------------------------------------------------------------
# pure pieces
# ------------------------------------------------------------------------------------------

def batch_indices(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Sample indices of ``step``: consecutive slices of per-epoch permutations (pure in seed, step)."""
    if n < 1:
        raise TrainError("the training split is empty")
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        perm = np.random.default_rng([seed, epoch, 7]).permutation(n)
        out.extend(perm[offset:offset + batch_size - len(out)].tolist())
    return np.asarray(out, dtype=np.int64)


def augment_batch(cubes: np.ndarray, cube_shape: tuple, rng: np.random.Generator,
                  cfg: CubeAugmentConfig) -> np.ndarray:
    """Augmented float32 batch (n, *cube_shape) in [0, 1] from raw cubes (n, Z, Y, X) (uint8 or float).

    Random shift within the margin, flips, in-plane rot90 (square cubes), intensity changes.
    """
    n = len(cubes)
    extra = np.asarray(cubes.shape[1:]) - np.asarray(cube_shape)
    if cfg.enabled and cfg.shift and extra.any():
        offsets = np.stack([rng.integers(0, e + 1, n) for e in extra], axis=1)
        x = crop_cubes(cubes, cube_shape, offsets)
    else:
        x = crop_cubes(cubes, cube_shape)
    x = x.astype(np.float32) / (255.0 if cubes.dtype == np.uint8 else 1.0)
    if not cfg.enabled:
        return np.ascontiguousarray(x)
    out = np.empty((n,) + tuple(cube_shape), np.float32)
    square = cube_shape[1] == cube_shape[2]
    for i in range(n):
        c = x[i]
        axes = []
        if cfg.flip_z and rng.random() < 0.5:
            axes.append(0)
        if cfg.flip_yx:
            axes += [a for a in (1, 2) if rng.random() < 0.5]
        if axes:
            c = np.flip(c, axis=tuple(axes))
        if cfg.rot90:
            k = int(rng.integers(0, 4)) if square else 2 * int(rng.integers(0, 2))
            c = np.rot90(c, k, axes=(1, 2))
        if rng.random() < cfg.intensity_p:
            mean = float(c.mean())
            c = (c - mean) * rng.uniform(*cfg.contrast) + mean + rng.uniform(-cfg.brightness, cfg.brightness)
            c = np.clip(c, 0.0, 1.0) ** rng.uniform(*cfg.gamma)
        if cfg.noise_std > 0:
            c = c + rng.normal(0.0, rng.uniform(0, cfg.noise_std), c.shape).astype(np.float32)
        out[i] = np.clip(c, 0.0, 1.0)
    return out


def classification_loss(logits: torch.Tensor, target: torch.Tensor, cfg: LossConfig,
                        class_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Weighted mean CE or focal loss of logits (N, C) against soft targets (N, C) (rows sum to 1).

    Focal: ``-Σ_c t_c (1 - p_c)^γ log p_c``. Weights per sample are ``Σ_c t_c w_c`` and the
    loss is normalised by their sum, so class weights change the balance, not the scale.
    """
    logp = F.log_softmax(logits.float(), dim=1)
    t = target
    if cfg.label_smoothing > 0:
        t = t * (1 - cfg.label_smoothing) + cfg.label_smoothing / t.shape[1]
    per = -(t * logp)
    if cfg.kind == "focal":
        per = per * (1.0 - logp.exp()).clamp(min=0).pow(cfg.gamma)
    per = per.sum(dim=1)
    if class_weights is None:
        return per.mean()
    w = (target * class_weights.to(target.device)).sum(dim=1)
    return (per * w).sum() / w.sum().clamp(min=1e-12)


def balanced_accuracy(true: np.ndarray, pred: np.ndarray, num_classes: int) -> float:
    """Mean recall over the classes present in ``true``."""
    recalls = [float((pred[true == c] == c).mean()) for c in range(num_classes) if (true == c).any()]
    return float(np.mean(recalls)) if recalls else float("nan")


def _class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    w = np.where(counts > 0, counts.sum() / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32)


# ------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    """What a run ended with."""

    step: int
    best_step: int
    best_val_balanced_accuracy: float
    stopped: str
    """finished, early_stopping, time_limit or stop_at"""
    seconds: float
    best_path: str
    summary: dict


def _save_state(path: str, state: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


def _validate(model: nn.Module, val: CubeSet, cfg: ClassifierTrainConfig, device: torch.device,
              weights: Optional[torch.Tensor]) -> dict:
    cubes = crop_cubes(val.cubes, cfg.data.cube_shape)
    probs = predict_probs(model, cubes, cfg.eval_batch_size, device, tta=False, amp=cfg.amp)
    pred = probs.argmax(axis=1)
    nc = len(cfg.data.classes)
    onehot = torch.from_numpy(np.eye(nc, dtype=np.float32)[val.labels])
    logits = torch.from_numpy(np.log(np.clip(probs, 1e-12, 1.0))).float()
    loss = float(classification_loss(logits, onehot, cfg.loss, weights))
    return {"val_loss": loss, "val_accuracy": float((pred == val.labels).mean()),
            "val_balanced_accuracy": balanced_accuracy(val.labels, pred, nc)}


def _extra(cfg: ClassifierTrainConfig, sets_summary: dict, **more) -> dict:
    return {"classes": list(cfg.data.classes), "class_signs": {c: int(cfg.data.class_signs[c]) for c in cfg.data.classes},
            "cube_shape": list(cfg.data.cube_shape), "position_columns": list(cfg.data.position_columns),
            "input": "raw / 255 in [0, 1], (N, 1, z, y, x)", "threshold": None,
            "training": {"run_dir": os.path.abspath(cfg.run_dir), "seed": cfg.seed, "splits": sets_summary,
                         "sources": [s.key() for s in cfg.data.sources]}, **more}


def train_classifier(cfg: ClassifierTrainConfig, resume: bool = False, stop_at: Optional[int] = None,
                     sets: Optional[dict[str, CubeSet]] = None) -> TrainResult:
    """Run (or resume) the training described by ``cfg``; see the module docstring.

    ``stop_at``: stop after this step with a checkpoint (tests of resuming). ``sets``: cube
    sets (``train``, ``val``) already built by :func:`cleftwise.train.cubes.build_cube_sets` (else built here).
    """
    t_start = time.perf_counter()
    os.makedirs(cfg.run_dir, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    device = resolve_device(cfg.device)
    if cfg.data.split_file is None:
        cfg.data.split_file = os.path.join(cfg.run_dir, "split.json")
    with open(os.path.join(cfg.run_dir, "config.json"), "w") as f:
        json.dump(to_dict(cfg), f, indent=1)
    if sets is None:
        sets = build_cube_sets(cfg.data, splits=("train", "val"))
    train_set, val_set = sets["train"], sets["val"]
    nc = len(cfg.data.classes)
    if len(train_set) == 0 or len(val_set) == 0:
        raise TrainError(f"training needs synapses in train and val; got {len(train_set)} and {len(val_set)}")
    summary = split_summary({"train": train_set, "val": val_set}, cfg.data.classes)
    log.info("data: %s", summary)
    for name, s in (("train", train_set), ("val", val_set)):
        absent = [c for c, k in zip(cfg.data.classes, s.class_counts(nc)) if k == 0]
        if absent:
            raise TrainError(f"the {name} split has no synapses of class(es) {absent}")

    mcfg = model_config_for(cfg)
    torch.manual_seed(cfg.seed)
    model = use_fast_memory_format(build_classifier(cfg.model_type, mcfg).to(device))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    weights = _class_weights(train_set.labels, nc) if cfg.loss.class_balanced else None
    ckpt_dir = os.path.join(cfg.run_dir, "checkpoints")
    os.makedirs(ckpt_dir, exist_ok=True)
    last = os.path.join(ckpt_dir, "last.pt")
    best_stem = os.path.join(cfg.run_dir, "best")
    step, best, best_step, bad = 0, -1.0, -1, 0
    prior_stop = ""
    running: list[float] = []  # training losses since the last log row
    if resume and os.path.exists(last):
        try:
            st = torch.load(last, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for corrupt files
            raise TrainError(f"checkpoint {last} is unreadable: {e}") from e
        try:
            model.load_state_dict(st["model"])
        except RuntimeError as e:
            raise TrainError(f"checkpoint {last} does not fit the configured model: {e}") from e
        opt.load_state_dict(st["optim"])
        if ema is not None and st.get("ema") is not None:
            ema.model.load_state_dict(st["ema"])
            ema.updates = int(st["ema_updates"])
        step, best, best_step, bad = int(st["step"]), float(st["best"]), int(st["best_step"]), int(st["bad"])
        prior_stop = str(st.get("stopped", ""))
        running = [float(v) for v in st.get("running", torch.zeros(0)).tolist()]
        log.info("resumed from %s at step %d (best %.4f at %d)", last, step, best, best_step)
    elif resume:
        log.info("no checkpoint in %s; starting fresh", ckpt_dir)

    csv_path = os.path.join(cfg.run_dir, "log.csv")
    cols = ["step", "lr", "loss", "elapsed_s", "val_loss", "val_accuracy", "val_balanced_accuracy"]
    if not os.path.exists(csv_path) or step == 0:
        with open(csv_path, "w", newline="") as f:
            csv.writer(f).writerow(cols)

    def write_row(row: dict) -> None:
        with open(csv_path, "a", newline="") as f:
            csv.writer(f).writerow([row.get(c, "") for c in cols])

    def checkpoint() -> None:
        _save_state(last, {"step": step, "model": model.state_dict(), "optim": opt.state_dict(),
                           "ema": ema.model.state_dict() if ema is not None else None,
                           "ema_updates": ema.updates if ema is not None else 0,
                           "best": best, "best_step": best_step, "bad": bad, "stopped": stopped,
                           "running": torch.tensor(running, dtype=torch.float64)})

    stopped = "finished"
    if prior_stop == "early_stopping":  # the resumed run had already ended
        stopped = prior_stop
    autocast = device.type == "cuda" and cfg.amp
    eye = np.eye(nc, dtype=np.float32)
    while step < cfg.max_steps and stopped != "early_stopping":
        model.train()
        rng = np.random.default_rng([cfg.seed, step, 1])
        torch.manual_seed(cfg.seed * 1_000_003 + step)
        idx = batch_indices(len(train_set), cfg.batch_size, step, cfg.seed)
        x = torch.from_numpy(augment_batch(train_set.cubes[idx], cfg.data.cube_shape, rng, cfg.augment))
        x = use_fast_memory_format(model, x.unsqueeze(1).to(device))
        t = torch.from_numpy(eye[train_set.labels[idx]]).to(device)
        a = cfg.augment
        if a.enabled and a.mixup_alpha > 0 and rng.random() < a.mixup_p:
            lam = float(rng.beta(a.mixup_alpha, a.mixup_alpha))
            perm = torch.from_numpy(rng.permutation(len(idx))).to(device)
            x = lam * x + (1 - lam) * x[perm]
            t = lam * t + (1 - lam) * t[perm]
        for g in opt.param_groups:
            g["lr"] = cfg.lr * lr_factor(step, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            logits = model(x)
        loss = classification_loss(logits, t, cfg.loss, weights)
        if not torch.isfinite(loss):
            raise TrainError(f"loss became {float(loss)} at step {step}; lower lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if ema is not None:
            ema.update(model)
        step += 1
        running.append(float(loss.detach()))
        row: dict[str, Any] = {}
        if step % cfg.log_every == 0:
            row.update(step=step, lr=opt.param_groups[0]["lr"], loss=float(np.mean(running)),
                       elapsed_s=round(time.perf_counter() - t_start, 2))
            running = []
        if step % cfg.val_every == 0 or step == cfg.max_steps:
            eval_model = ema.model if ema is not None else model
            m = _validate(eval_model, val_set, cfg, device, weights)
            row.update(step=step, **m)
            log.info("step %d: val balanced accuracy %.4f, loss %.4f", step, m["val_balanced_accuracy"],
                     m["val_loss"])
            if m["val_balanced_accuracy"] > best + cfg.min_delta:
                best, best_step, bad = m["val_balanced_accuracy"], step, 0
                save_checkpoint(best_stem, eval_model, mcfg, _voxel_size(cfg), cfg.model_type,
                                extra=_extra(cfg, summary, step=step, val=m))
            else:
                bad += 1
        if row:
            write_row(row)
        done = step >= cfg.max_steps
        if cfg.patience and bad >= cfg.patience:
            stopped, done = "early_stopping", True
        elif cfg.max_minutes is not None and (time.perf_counter() - t_start) / 60.0 >= cfg.max_minutes:
            stopped, done = ("finished" if step >= cfg.max_steps else "time_limit"), True
        elif stop_at is not None and step >= stop_at:
            stopped, done = "stop_at", True
        if done or step % cfg.checkpoint_every == 0:
            checkpoint()
        if done:
            break
    if best_step < 0:  # no validation ran (stopped before the first): keep a best anyway
        eval_model = ema.model if ema is not None else model
        m = _validate(eval_model, val_set, cfg, device, weights)
        best, best_step = m["val_balanced_accuracy"], step
        save_checkpoint(best_stem, eval_model, mcfg, _voxel_size(cfg), cfg.model_type,
                        extra=_extra(cfg, summary, step=step, val=m))
    secs = time.perf_counter() - t_start
    res = TrainResult(step, best_step, best, stopped, secs, best_stem + ".pt", summary)
    with open(os.path.join(cfg.run_dir, "result.json"), "w") as f:
        json.dump({k: v for k, v in res.__dict__.items()}, f, indent=1)
    log.info("training %s at step %d after %.0f s; best val balanced accuracy %.4f at step %d",
             stopped, step, secs, best, best_step)
    return res


def _voxel_size(cfg: ClassifierTrainConfig) -> tuple:
    from cleftwise.storage.volume import open_volume

    sizes = {tuple(int(v) for v in open_volume(s.raw).voxel_size) for s in cfg.data.sources}
    if len(sizes) != 1:
        raise TrainError(f"data.sources have different voxel sizes {sorted(sizes)}; resample them to one")
    return sizes.pop()
