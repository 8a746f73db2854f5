"""The RSUNet training loop: config, optimisation, EMA, validation, checkpoints that resume exactly.

One :class:`TrainConfig` (YAML through :func:`load_train_config`) describes a run; :func:`train`
runs it in ``run_dir``:

- AdamW with linear warm-up then cosine decay to ``min_lr_ratio · lr``; gradient clipping;
- an exponential moving average (EMA) of the weights, used for validation and export;
- bf16 autocast and ``torch.compile`` only when the device is CUDA (ignored on CPU);
- validation every ``val_every`` steps on fixed, un-augmented patches of the held-out volumes:
  loss, voxel precision/recall/F1 of the union (or cleft) mask at 0.5, and the pre/post side
  accuracy on true synapse voxels;
- ``log.csv`` (one row per logged step) and ``curves.png``;
- checkpoints ``checkpoints/step_NNNNNNN.pt`` holding model, optimiser, scheduler, EMA, step,
  RNG states, best metric and config; ``best.pt`` holds the weights of the best validation.

Resuming (``resume=True``) loads the newest checkpoint and continues on exactly the batches
the uninterrupted run would have seen (samples are pure functions of their index, see
:mod:`cleftwise.train.data`), so on a deterministic device the weights equal those of an uninterrupted
run. :func:`export_weights` writes a run's best (EMA) weights as a cleftwise checkpoint
(``cleftwise.models.checkpoint``) with ``patch_shape`` in ``extra``.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import logging
import math
import os
import random
import re
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from cleftwise.models.checkpoint import load_model, resolve_device, save_checkpoint
from cleftwise.models.errors import ModelError
from cleftwise.models.rsunet import RSUNetConfig, build_rsunet, check_patch_shape
from cleftwise.storage.config_io import from_dict, load_config, to_dict

from cleftwise.train.data import (TARGET_CHANNEL_NAMES, DataConfig, PatchDataset, make_loader, open_sources,
                   target_channels)
from cleftwise.train.errors import TrainError
from cleftwise.train.losses import LossConfig, compute_loss
from cleftwise.train.schedule import EMA, lr_factor, unwrap as _unwrap

__all__ = ["OptimConfig", "TrainConfig", "load_train_config", "parse_train_config", "EMA",
           "lr_factor", "train", "validate", "export_weights", "plot_curves", "latest_checkpoint",
           "CSV_COLUMNS"]

log = logging.getLogger(__name__)

CSV_COLUMNS = ("step", "lr", "loss", "loss_main", "loss_dice", "loss_side", "grad_norm", "samples_per_s",
               "elapsed_s", "val_loss", "val_precision", "val_recall", "val_f1", "val_side_acc",
               "val_score")


@dataclass
class OptimConfig:
    """AdamW with warm-up and cosine decay."""

    lr: float = 1e-3
    """peak learning rate"""
    weight_decay: float = 1e-4
    """AdamW decoupled weight decay"""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas"""
    warmup_steps: int = 100
    """linear warm-up from 0 to lr over this many steps"""
    min_lr_ratio: float = 0.05
    """the cosine decays to lr · min_lr_ratio at the last step"""
    schedule_steps: Optional[int] = None
    """length of the cosine schedule; default max_steps"""
    grad_clip: float = 1.0
    """clip the global gradient norm to this (0 = no clipping)"""


@dataclass
class TrainConfig:
    """One training run (see module docstring)."""

    run_dir: str = "runs/rsunet"
    """folder for checkpoints, log.csv, curves.png and the resolved config"""
    seed: int = 0
    """seed of the weight initialisation and of the sample stream"""
    max_steps: int = 10000
    """optimisation steps of the run"""
    max_minutes: Optional[float] = None
    """stop (with a checkpoint) once this much wall time has passed in this process"""
    model: RSUNetConfig = field(default_factory=lambda: RSUNetConfig(norm="group"))
    """network architecture (models.rsunet.RSUNetConfig)"""
    init_weights: Optional[str] = None
    """fine-tuning: a cleftwise checkpoint (.pt with its .json, e.g. shipped weights) whose
    weights start the run instead of a random initialisation; its architecture and voxel size
    must equal ``model`` and the training volumes'. Optimiser, schedule and EMA start fresh."""
    data: DataConfig = field(default_factory=DataConfig)
    """volumes, patch shape, target, sampling, augmentation, loader"""
    loss: LossConfig = field(default_factory=LossConfig)
    """loss terms and class balancing"""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """optimiser and learning-rate schedule"""
    ema_decay: float = 0.999
    """decay of the weight EMA (0 = no EMA; validation and export then use the raw weights)"""
    device: str = "auto"
    """auto (CUDA when present), cpu or cuda"""
    amp: bool = True
    """bf16 autocast on CUDA (ignored on CPU)"""
    compile: bool = False
    """torch.compile the model on CUDA (ignored on CPU)"""
    threads: int = 0
    """torch CPU threads (0 = torch default)"""
    log_every: int = 10
    """write a training row to log.csv every this many steps"""
    val_every: int = 200
    """validate every this many steps (and at the end)"""
    checkpoint_every: int = 200
    """write a resumable checkpoint every this many steps (and at the end)"""
    keep_checkpoints: int = 3
    """resumable checkpoints kept (older ones are deleted)"""
    best_metric: str = "val_score"
    """what picks best.pt: val_score (mean of val_f1 and val_side_acc), val_f1 (higher is
    better) or val_loss (lower is better)"""

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise TrainError(f"max_steps must be >= 1, got {self.max_steps}")
        for name in ("log_every", "val_every", "checkpoint_every", "keep_checkpoints"):
            if int(getattr(self, name)) < 1:
                raise TrainError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise TrainError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        if self.best_metric not in ("val_score", "val_f1", "val_loss"):
            raise TrainError(f"best_metric must be val_score, val_f1 or val_loss, got {self.best_metric!r}")
        need = target_channels(self.data.target, len(self.data.aux))
        if self.model.out_channels != need:
            extra = f" with aux channels {self.data.aux}" if self.data.aux else ""
            raise TrainError(f"model.out_channels is {self.model.out_channels} but target "
                             f"{self.data.target!r}{extra} needs {need}")
        want_act = "softmax" if self.data.target == "exclusive" else "sigmoid"
        if self.model.output_activation != want_act:
            raise TrainError(f"model.output_activation is {self.model.output_activation!r} but target "
                             f"{self.data.target!r} is trained for {want_act!r}")
        try:
            check_patch_shape(self.model, self.data.patch_shape)
        except ModelError as e:
            raise TrainError(f"data.patch_shape: {e}") from e


def _init_from(model: nn.Module, cfg: TrainConfig, voxel_size: tuple) -> None:
    """Copy the weights of ``cfg.init_weights`` into ``model`` (same architecture and voxel size).

    The number of output channels may grow (e.g. auxiliary channels added to a shipped model):
    the output layer's first rows are copied, the new rows keep their fresh initialisation.
    """
    try:
        src, meta = load_model(cfg.init_weights, device="cpu")
    except ModelError as e:
        raise TrainError(f"init_weights: {e}") from e
    mine, theirs = to_dict(cfg.model), to_dict(meta.config)
    n_old, n_new = int(theirs.pop("out_channels")), int(mine.pop("out_channels"))
    if theirs != mine or n_new < n_old:
        raise TrainError(f"init_weights {cfg.init_weights}: its architecture {to_dict(meta.config)} differs "
                         f"from the config's model {to_dict(cfg.model)} (only more output channels are "
                         f"allowed)")
    if tuple(int(v) for v in meta.voxel_size) != tuple(voxel_size):
        raise TrainError(f"init_weights {cfg.init_weights}: trained at voxel size {tuple(meta.voxel_size)} nm "
                         f"but the training volumes are {tuple(voxel_size)} nm")
    state = model.state_dict()
    for key, value in src.state_dict().items():
        if state[key].shape == value.shape:
            state[key] = value
        else:  # the output layer: (channels, ...) weights and bias
            state[key][:n_old] = value
    model.load_state_dict(state)
    log.info("initialised from %s (sha256 %s)%s", cfg.init_weights, meta.weights_sha256[:12],
             f"; output channels {n_old} -> {n_new}, new ones freshly initialised" if n_new > n_old else "")


def parse_train_config(data: dict, where: str = "train config") -> TrainConfig:
    """A :class:`TrainConfig` from a plain dict; every error becomes a TrainError."""
    return from_dict(TrainConfig, data, where, error=TrainError)


def load_train_config(path: str) -> TrainConfig:
    """Read a training YAML into a :class:`TrainConfig` (unknown keys and bad values raise)."""
    return load_config(TrainConfig, path, error=TrainError)


# -- pieces ---------------------------------------------------------------------------------

def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                      "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
            "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["gauss"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def latest_checkpoint(run_dir: str) -> Optional[str]:
    """Path of the newest resumable checkpoint of ``run_dir`` (None if there is none)."""
    files = glob.glob(os.path.join(_checkpoint_dir(run_dir), "step_*.pt"))
    if not files:
        return None
    return max(files, key=lambda f: int(re.findall(r"step_(\d+)\.pt$", f)[0]))


def _atomic_save(obj: Any, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _load(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt/foreign files
        raise TrainError(f"checkpoint {path} is unreadable: {e}") from e


def _side_logits(logits: torch.Tensor, exclusive: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(foreground score > 0 ⇔ p > 0.5, pre-minus-post score) for the quick metrics."""
    if exclusive:
        fg = torch.logsumexp(logits[:, 1:], dim=1) - logits[:, 0]
        return fg, logits[:, 1] - logits[:, 2]
    if logits.shape[1] == 1:
        return logits[:, 0], torch.zeros_like(logits[:, 0])
    return logits[:, 2], logits[:, 0] - logits[:, 1]


@torch.no_grad()
def validate(model: nn.Module, batches: list[dict], cfg: TrainConfig, device: torch.device) -> dict:
    """Loss and quick voxel metrics of ``model`` on fixed validation ``batches``.

    Returns ``val_loss``, ``val_precision``/``val_recall``/``val_f1`` of the foreground mask
    (union channel, softmax foreground or cleft) at p > 0.5, and ``val_side_acc``: on true
    voxels that are pre xor post, the fraction whose larger predicted side is the true one
    (NaN for a cleft target); ``val_score`` the mean of the F1 and the side accuracy (the F1
    alone for a cleft target).
    """
    exclusive = cfg.data.target == "exclusive"
    n_aux = len(cfg.data.aux)
    model.eval()
    tp = fp = fn = 0
    side_ok = side_n = 0
    losses = []
    for b in batches:
        raw, target = b["raw"].to(device), b["target"].to(device)
        with _autocast(device, cfg.amp):
            logits = model(raw)
        loss, _ = compute_loss(logits, target, cfg.loss, exclusive, n_aux)
        losses.append(float(loss))
        if n_aux:  # the metrics are the target's; auxiliary channels only train
            logits, target = logits[:, :-n_aux], target[:, :-n_aux]
        fg_score, side_score = _side_logits(logits.float(), exclusive)
        pred = fg_score > 0
        if exclusive:
            true, pre, post = target > 0, target == 1, target == 2
        elif target.shape[1] == 1:
            true, pre, post = target[:, 0] > 0, None, None
        else:
            true, pre, post = target[:, 2] > 0, target[:, 0] > 0, target[:, 1] > 0
        tp += int((pred & true).sum())
        fp += int((pred & ~true).sum())
        fn += int((~pred & true).sum())
        if pre is not None:
            sel = pre ^ post
            side_n += int(sel.sum())
            side_ok += int(((side_score > 0) == pre)[sel].sum())
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
    side_acc = side_ok / side_n if side_n else float("nan")
    score = f1 if math.isnan(side_acc) else (f1 + side_acc) / 2
    return {"val_loss": float(np.mean(losses)) if losses else float("nan"),
            "val_precision": precision, "val_recall": recall, "val_f1": f1,
            "val_side_acc": side_acc, "val_score": score}


def _autocast(device: torch.device, amp: bool):
    if device.type == "cuda" and amp:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


class _CsvLog:
    """log.csv with :data:`CSV_COLUMNS`; on resume rows after the resumed step are dropped."""

    def __init__(self, path: str, resume_step: Optional[int]):
        self.path = path
        rows = []
        if resume_step is not None and os.path.exists(path):
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            w.writeheader()
            w.writerows(rows)

    def write(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_COLUMNS})


def plot_curves(csv_path: str, png_path: str, title: str = "RSUNet training") -> None:
    """PNG of training/validation loss and validation F1 / side accuracy from ``log.csv``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    df = pd.read_csv(csv_path)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    tr = df[df["loss"].notna()]
    if len(tr):
        a1.plot(tr["step"], tr["loss"], color="0.75", lw=0.8, label="train (per log row)")
        a1.plot(tr["step"], tr["loss"].rolling(10, min_periods=1).mean(), color="C0", label="train (smoothed)")
    va = df[df["val_loss"].notna()]
    if len(va):
        a1.plot(va["step"], va["val_loss"], "o-", color="C3", ms=3, label="validation")
        a2.plot(va["step"], va["val_f1"], "o-", ms=3, label="val voxel F1 (foreground)")
        a2.plot(va["step"], va["val_side_acc"], "s-", ms=3, label="val pre/post side accuracy")
    a1.set_xlabel("step")
    a1.set_ylabel("loss")
    a1.set_yscale("log")
    a1.legend()
    a1.set_title(title)
    a2.set_xlabel("step")
    a2.set_ylim(0, 1.02)
    a2.grid(alpha=0.3)
    a2.legend(loc="lower right")
    a2.set_title("validation metrics (EMA weights)")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def _better(metric: str, value: float, best: Optional[float]) -> bool:
    if value is None or math.isnan(value):
        return False
    if best is None:
        return True
    return value < best if metric == "val_loss" else value > best


# -- the loop --------------------------------------------------------------------------------

def train(cfg: TrainConfig, resume: bool = False, stop_at: Optional[int] = None,
          overwrite: bool = False) -> dict:
    """Run (or resume) the training run described by ``cfg``; returns a summary dict.

    Args:
        cfg: the run.
        resume: continue from the newest checkpoint in ``cfg.run_dir`` (fresh start if none).
        stop_at: stop after this step (with a checkpoint) even if ``max_steps`` is larger; the
            schedule still spans ``max_steps`` (used to interrupt a run, e.g. in tests).
        overwrite: start fresh even if ``run_dir`` holds checkpoints (they are deleted).

    Returns:
        ``{"step", "best_metric", "best_step", "elapsed_s", "stopped", "last_val", "run_dir",
        "model", "ema_model"}`` (the last two: the trained modules, EMA None without EMA).
    """
    t_start = time.perf_counter()
    run_dir = cfg.run_dir
    os.makedirs(_checkpoint_dir(run_dir), exist_ok=True)
    existing = latest_checkpoint(run_dir)
    if existing and not resume:
        if not overwrite:
            raise TrainError(f"{run_dir} already holds checkpoints (e.g. {existing}); pass "
                             "resume=True (--resume) to continue or overwrite=True to start fresh")
        for f in glob.glob(os.path.join(_checkpoint_dir(run_dir), "*.pt")) + \
                [os.path.join(run_dir, "best.pt")]:
            if os.path.exists(f):
                os.remove(f)
        existing = None
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % (2 ** 32))
    random.seed(cfg.seed)

    data = cfg.data
    margin = data.augment.margin_px if data.augment.enabled else 0
    train_sources = open_sources(data.train, data, "train", margin)
    val_sources = open_sources(data.val, data, "val") if data.val else []
    voxel_size = tuple(int(v) for v in train_sources[0].voxel_size)
    exclusive = data.target == "exclusive"

    model = build_rsunet(cfg.model).to(device)
    if cfg.init_weights and not (resume and existing):
        _init_from(model, cfg, voxel_size)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                            weight_decay=cfg.optim.weight_decay)
    total = int(cfg.optim.schedule_steps or cfg.max_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, cfg.optim.warmup_steps, total, cfg.optim.min_lr_ratio))
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    step, best, best_step, elapsed_before = 0, None, None, 0.0
    if resume and existing:
        state = _load(existing)
        saved_cfg = state.get("config", {})
        if saved_cfg.get("model") != to_dict(cfg.model):
            raise TrainError(f"cannot resume {existing}: model architecture in the checkpoint "
                             f"differs from the config ({saved_cfg.get('model')} vs {to_dict(cfg.model)})")
        changed = sorted(k for k in ("data", "loss", "optim", "seed") if saved_cfg.get(k) != to_dict(getattr(cfg, k)))
        if changed:
            log.warning("resuming %s with changed config sections %s: the run will not equal an "
                        "uninterrupted one", existing, changed)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        step = int(state["step"])
        best, best_step = state.get("best"), state.get("best_step")
        elapsed_before = float(state.get("elapsed_s", 0.0))
        _set_rng_state(state["rng"])
        log.info("resumed %s at step %d", existing, step)
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        import yaml

        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)

    net = model
    if device.type == "cuda" and cfg.compile:
        net = torch.compile(model)
    csv_log = _CsvLog(os.path.join(run_dir, "log.csv"), step if (resume and existing) else None)

    val_batches: list[dict] = []
    if val_sources and data.val_patches:
        val_ds = PatchDataset(val_sources, data, seed=cfg.seed + 1_000_003, augment=False)
        for item in make_loader(val_ds, batch_size=data.batch_size, num_workers=0, count=data.val_patches):
            val_batches.append({"raw": item["raw"], "target": item["target"]})
    train_ds = PatchDataset(train_sources, data, seed=cfg.seed, augment=True)
    loader = make_loader(train_ds, data.batch_size, data.num_workers, start_index=step * data.batch_size,
                         pin_memory=device.type == "cuda")
    end = cfg.max_steps if stop_at is None else min(cfg.max_steps, int(stop_at))
    log.info("training %s: steps %d → %d on %s, %d params, patch %s, %d train / %d val volumes",
             run_dir, step, end, device, sum(p.numel() for p in model.parameters()),
             data.patch_shape, len(train_sources), len(val_sources))

    def save(final: bool = False) -> str:
        path = os.path.join(_checkpoint_dir(run_dir), f"step_{step:07d}.pt")
        _atomic_save({
            "model": _unwrap(model).state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "ema": ema.state_dict() if ema is not None else None,
            "step": step, "rng": _rng_state(), "config": to_dict(cfg), "best": best,
            "best_step": best_step, "voxel_size": list(voxel_size),
            "elapsed_s": elapsed_before + time.perf_counter() - t_start,
        }, path)
        files = sorted(glob.glob(os.path.join(_checkpoint_dir(run_dir), "step_*.pt")))
        for old in files[:-cfg.keep_checkpoints]:
            os.remove(old)
        return path

    last_val: dict = {}
    stopped = "max_steps"
    window: list[dict] = []
    t_window = time.perf_counter()
    it = iter(loader)
    while step < end:
        batch = next(it)
        raw = batch["raw"].to(device, non_blocking=True)
        target = batch["target"].to(device, non_blocking=True)
        net.train()
        with _autocast(device, cfg.amp):
            logits = net(raw)
        loss, parts = compute_loss(logits, target, cfg.loss, exclusive, len(data.aux))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip > 0:
            gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip))
        else:
            gnorm = float(torch.sqrt(sum((p.grad.detach() ** 2).sum() for p in model.parameters()
                                        if p.grad is not None)))
        if not math.isfinite(float(loss.detach())):
            raise TrainError(f"{run_dir}: loss became {float(loss.detach())} at step {step + 1}; lower optim.lr")
        opt.step()
        lr = opt.param_groups[0]["lr"]
        sched.step()
        if ema is not None:
            ema.update(model)
        step += 1
        window.append({"loss": float(loss.detach()), **parts, "grad_norm": gnorm})
        row = None
        if step % cfg.log_every == 0 or step == end:
            dt = time.perf_counter() - t_window
            row = {"step": step, "lr": lr,
                   **{k: float(np.nanmean([w[k] for w in window])) if not all(
                       math.isnan(w[k]) for w in window) else None
                      for k in ("loss", "main", "dice", "side", "grad_norm")},
                   "samples_per_s": len(window) * data.batch_size / max(dt, 1e-9),
                   "elapsed_s": elapsed_before + time.perf_counter() - t_start}
            row["loss_main"], row["loss_dice"], row["loss_side"] = row.pop("main"), row.pop("dice"), row.pop("side")
            window, t_window = [], time.perf_counter()
        minutes = (time.perf_counter() - t_start) / 60.0
        timed_out = cfg.max_minutes is not None and minutes >= cfg.max_minutes and step < end
        if val_batches and (step % cfg.val_every == 0 or step == end or timed_out):
            last_val = validate(ema.model if ema is not None else net, val_batches, cfg, device)
            row = row or {"step": step, "lr": lr, "elapsed_s": elapsed_before + time.perf_counter() - t_start}
            row.update(last_val)
            if _better(cfg.best_metric, last_val[cfg.best_metric], best):
                best, best_step = last_val[cfg.best_metric], step
                _atomic_save({"model": _unwrap(model).state_dict(),
                              "ema": ema.model.state_dict() if ema is not None else None,
                              "step": step, "metrics": last_val, "config": to_dict(cfg),
                              "voxel_size": list(voxel_size)}, os.path.join(run_dir, "best.pt"))
            log.info("step %d: %s (best %s %.4f at step %s)", step,
                     " ".join(f"{k}={v:.4f}" for k, v in last_val.items()), cfg.best_metric,
                     best if best is not None else float("nan"), best_step)
        if row is not None:
            csv_log.write(row)
            if "loss" in row and row.get("loss") is not None and not val_batches:
                log.info("step %d: loss %.4f lr %.2e", step, row["loss"], lr)
        if step % cfg.checkpoint_every == 0 or step == end or timed_out:
            save()
        if timed_out:
            stopped = "max_minutes"
            log.info("stopping at step %d after %.1f min (max_minutes)", step, minutes)
            break
    if step == end and end < cfg.max_steps:
        stopped = "stop_at"
    del it
    try:
        plot_curves(os.path.join(run_dir, "log.csv"), os.path.join(run_dir, "curves.png"))
    except Exception as e:  # noqa: BLE001 - a plotting failure must not lose a finished run
        log.warning("could not plot training curves: %s", e)
    return {"step": step, "best_metric": best, "best_step": best_step, "stopped": stopped,
            "elapsed_s": elapsed_before + time.perf_counter() - t_start, "last_val": last_val,
            "run_dir": run_dir, "model": _unwrap(model), "ema_model": ema.model if ema else None}


def export_weights(run_dir: str, out_path: str, which: str = "best", use_ema: bool = True,
                   extra: Optional[dict] = None, keep_aux: bool = False) -> str:
    """Write a run's weights as a cleftwise checkpoint (``.pt`` + ``.json``) at ``out_path``.

    ``which`` is ``best`` (``best.pt``) or ``latest`` (newest resumable checkpoint);
    ``use_ema`` picks the EMA weights when the run kept them. Auxiliary output channels
    (``data.aux``) only help training: they are cut from the exported model (its output layer
    keeps the target's rows, which compute exactly what they computed before) unless
    ``keep_aux``. ``extra`` is merged into the checkpoint JSON's ``extra`` (which always holds
    ``patch_shape``, ``target``, ``channels``, ``step``, the auxiliary channels trained and the
    validation metrics when known). Returns the ``.pt`` path.
    """
    if which == "best":
        path = os.path.join(run_dir, "best.pt")
    elif which == "latest":
        path = latest_checkpoint(run_dir) or ""
    else:
        raise TrainError(f"export_weights: which must be best or latest, got {which!r}")
    if not path or not os.path.exists(path):
        raise TrainError(f"export_weights: no {which} checkpoint in {run_dir}")
    state = _load(path)
    cfg = parse_train_config(state["config"], where=f"{path}:config")
    weights = state["ema"] if use_ema and state.get("ema") is not None else state["model"]
    if isinstance(weights, dict) and "model" in weights and "updates" in weights:
        weights = weights["model"]
    channels = list(TARGET_CHANNEL_NAMES[cfg.data.target])
    model_cfg = cfg.model
    if cfg.data.aux and keep_aux:
        channels = channels + list(cfg.data.aux)
    elif cfg.data.aux:
        model_cfg = dataclasses.replace(cfg.model, out_channels=len(channels))
        weights = {k: (v[:len(channels)] if k.startswith("conv_out.") else v) for k, v in weights.items()}
    model = build_rsunet(model_cfg)
    model.load_state_dict(weights)
    info = {"patch_shape": list(cfg.data.patch_shape), "target": cfg.data.target, "channels": channels,
            "step": int(state["step"]), "ema": bool(use_ema and state.get("ema") is not None),
            "validation": state.get("metrics")}
    if cfg.data.aux:
        info["aux_channels_trained"] = list(cfg.data.aux)
    info.update(extra or {})
    meta = save_checkpoint(out_path, model, model_cfg, state["voxel_size"], extra=info)
    return str(meta.weights_path)
