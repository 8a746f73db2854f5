"""Losses for the synapse heads: weighted BCE-with-logits, weighted cross-entropy, soft Dice.

Tensors are (B, C, z, y, x) logits; targets (B, C, z, y, x) 0/1 floats for sigmoid heads or
(B, z, y, x) int64 classes for a softmax head. Class balancing is computed per batch: synapse
voxels are ~1–5 % of a patch, so unweighted losses favour an all-background answer early on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
import torch.nn.functional as F

from cleftwise.train.errors import TrainError

__all__ = ["LossConfig", "balanced_pos_weight", "balanced_class_weight", "soft_dice_loss",
           "weighted_bce_loss", "weighted_ce_loss", "side_loss", "compute_loss"]


@dataclass
class LossConfig:
    """How the training loss is built from the network's logits."""

    pos_weight: Union[str, list[float], None] = "balanced"
    """sigmoid heads: weight of positive voxels per channel — 'balanced' (#neg / #pos in the
    batch, clipped to [1, max_pos_weight]), a list with one number per channel, or null (1)"""
    class_weight: Union[str, list[float], None] = "balanced"
    """softmax head: per-class weights — 'balanced' (inverse frequency in the batch, background
    1, clipped to max_pos_weight), a list (background, pre, post), or null"""
    max_pos_weight: float = 10.0
    """upper clip of balanced weights (large weights inflate the predicted masks)"""
    dice_weight: float = 0.0
    """weight of an added soft Dice loss (0 = none)"""
    side_weight: float = 0.0
    """weight of an added side loss: on true voxels that are pre xor post, BCE of
    (pre logit − post logit) against "is pre" (0 = none); a direct signal for the polarity"""
    aux_weight: float = 0.5
    """weight of the unweighted BCE of the auxiliary mask channels (``data.aux``), if any"""

    def __post_init__(self) -> None:
        for name in ("pos_weight", "class_weight"):
            v = getattr(self, name)
            if isinstance(v, str) and v != "balanced":
                raise TrainError(f"loss.{name} must be 'balanced', a list of numbers or null, got {v!r}")
        if self.max_pos_weight < 1:
            raise TrainError(f"loss.max_pos_weight must be >= 1, got {self.max_pos_weight}")
        if self.dice_weight < 0 or self.side_weight < 0 or self.aux_weight < 0:
            raise TrainError(f"loss.dice_weight, loss.side_weight and loss.aux_weight must be >= 0, "
                             f"got {self.dice_weight}, {self.side_weight}, {self.aux_weight}")


def balanced_pos_weight(target: torch.Tensor, max_weight: float) -> torch.Tensor:
    """(C,) weights #negatives / #positives per channel of a (B, C, …) 0/1 target, in [1, max]."""
    dims = [d for d in range(target.dim()) if d != 1]
    pos = target.sum(dim=dims)
    neg = target[:, :1].numel() - pos
    w = torch.where(pos > 0, neg / pos.clamp(min=1), torch.ones_like(pos))
    return w.clamp(1.0, float(max_weight))


def balanced_class_weight(target: torch.Tensor, num_classes: int, max_weight: float) -> torch.Tensor:
    """(K,) weights for (B, …) int64 classes: count(background) / count(k), background 1, clipped."""
    counts = torch.bincount(target.reshape(-1), minlength=num_classes).to(torch.float32)
    w = torch.where(counts > 0, counts[0].clamp(min=1) / counts.clamp(min=1), torch.ones_like(counts))
    w[0] = 1.0
    return w.clamp(1.0, float(max_weight))


def soft_dice_loss(probs: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 − mean over channels of the soft Dice of (B, C, …) probabilities and 0/1 targets."""
    dims = [d for d in range(probs.dim()) if d != 1]
    inter = (probs * target).sum(dim=dims)
    denom = probs.sum(dim=dims) + target.sum(dim=dims)
    return 1.0 - ((2.0 * inter + eps) / (denom + eps)).mean()


def weighted_bce_loss(logits: torch.Tensor, target: torch.Tensor,
                      pos_weight: Union[str, list, None], max_weight: float) -> torch.Tensor:
    """Mean BCE-with-logits over (B, C, …) with per-channel positive weights."""
    if pos_weight is None:
        pw = None
    elif isinstance(pos_weight, str):
        pw = balanced_pos_weight(target, max_weight)
    else:
        pw = torch.as_tensor(pos_weight, dtype=logits.dtype, device=logits.device)
        if pw.numel() != logits.shape[1]:
            raise TrainError(f"loss.pos_weight has {pw.numel()} values for {logits.shape[1]} channels")
    if pw is not None:
        pw = pw.to(logits.device, logits.dtype).view(1, -1, *([1] * (logits.dim() - 2)))
    return F.binary_cross_entropy_with_logits(logits, target, pos_weight=pw)


def weighted_ce_loss(logits: torch.Tensor, target: torch.Tensor,
                     class_weight: Union[str, list, None], max_weight: float) -> torch.Tensor:
    """Weighted cross-entropy of (B, K, …) logits against (B, …) int64 classes (mean over voxels)."""
    k = logits.shape[1]
    if class_weight is None:
        w = None
    elif isinstance(class_weight, str):
        w = balanced_class_weight(target, k, max_weight)
    else:
        w = torch.as_tensor(class_weight, dtype=torch.float32)
        if w.numel() != k:
            raise TrainError(f"loss.class_weight has {w.numel()} values for {k} classes")
    if w is not None:
        w = w.to(logits.device, logits.dtype)
    return F.cross_entropy(logits, target, weight=w)


def side_loss(logits: torch.Tensor, target: torch.Tensor, exclusive: bool) -> torch.Tensor:
    """Mean BCE of (pre − post) logits vs "is pre" over true voxels on exactly one side.

    Non-exclusive: logits/target (B, 3, …) with channels (pre, post, union); exclusive: logits
    (B, 3, …) (background, pre, post) and target (B, …) classes. Zero when no voxel qualifies.
    """
    if exclusive:
        pre, post = target == 1, target == 2
        diff = logits[:, 1] - logits[:, 2]
    else:
        pre, post = target[:, 0] > 0, target[:, 1] > 0
        diff = logits[:, 0] - logits[:, 1]
    sel = pre ^ post
    if not bool(sel.any()):
        return diff.sum() * 0.0
    return F.binary_cross_entropy_with_logits(diff[sel], pre[sel].to(diff.dtype))


def compute_loss(logits: torch.Tensor, target: torch.Tensor, cfg: LossConfig,
                 exclusive: bool, n_aux: int = 0) -> tuple[torch.Tensor, dict]:
    """Total loss and its parts ``{"main": …, "dice": …, "side": …, "aux": …}`` (floats) for one
    batch. The last ``n_aux`` channels of logits and target are auxiliary masks: plain BCE,
    weighted by ``cfg.aux_weight``; every other term sees the target's own channels only."""
    logits = logits.float()
    aux = None
    if n_aux:
        main_c = logits.shape[1] - int(n_aux)
        aux_logits, aux_target = logits[:, main_c:], target[:, main_c:]
        logits, target = logits[:, :main_c], target[:, :main_c]
        aux = F.binary_cross_entropy_with_logits(aux_logits, aux_target.to(aux_logits.dtype))
    if exclusive:
        main = weighted_ce_loss(logits, target, cfg.class_weight, cfg.max_pos_weight)
    else:
        main = weighted_bce_loss(logits, target, cfg.pos_weight, cfg.max_pos_weight)
    total = main
    parts = {"main": float(main.detach())}
    if cfg.dice_weight > 0:
        if exclusive:
            probs = torch.softmax(logits, dim=1)[:, 1:]
            onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1)[:, 1:].to(probs.dtype)
            dice = soft_dice_loss(probs, onehot)
        else:
            dice = soft_dice_loss(torch.sigmoid(logits), target)
        total = total + cfg.dice_weight * dice
        parts["dice"] = float(dice.detach())
    else:
        parts["dice"] = float("nan")
    if cfg.side_weight > 0 and logits.shape[1] == 3:
        side = side_loss(logits, target, exclusive)
        total = total + cfg.side_weight * side
        parts["side"] = float(side.detach())
    else:
        parts["side"] = float("nan")
    if aux is not None:
        total = total + cfg.aux_weight * aux
        parts["aux"] = float(aux.detach())
    return total, parts

