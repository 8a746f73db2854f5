"""RSUNet: a residual symmetric 3D U-Net for anisotropic EM volumes.

The design follows the residual symmetric U-Net used for synapse detection in connectomics
(Lee et al. 2017; PyTorch Connectomics' ``UNet3D``), written from scratch here:

- an input convolution (default kernel (1, 5, 5) when the first levels are anisotropic);
- ``len(filters)`` resolution levels; each level is one convolution (changing the channel count)
  followed by a residual block of two convolutions;
- the first ``anisotropic_levels`` levels use in-plane kernels (1, 3, 3) and are left by an
  in-plane max pooling (1, 2, 2); deeper levels use (3, 3, 3) kernels and (2, 2, 2) pooling
  (both lists can also be given explicitly);
- a symmetric decoder: upsampling (transposed convolution or trilinear interpolation plus a
  1x1x1 convolution) whose result is *added* to the encoder feature map of the same level
  (additive skip), then the level's convolution and residual block;
- a 1x1x1 output convolution giving logits; ``cfg.output_activation`` says what turns them into
  probabilities at inference (sigmoid for the (pre, post, union) or cleft heads).

Arrays are (batch, channel, z, y, x). Every spatial input size must be divisible by the product of
the pooling factors along that axis (``RSUNet.input_divisibility``); other sizes raise ModelError.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from cleftwise.models.errors import ModelError

__all__ = ["RSUNetConfig", "RSUNet", "build_rsunet", "input_divisibility", "check_patch_shape"]

log = logging.getLogger(__name__)

Triple = Tuple[int, int, int]

_NORMS = ("batch", "group", "none")
_ACTIVATIONS = ("elu", "relu")
_UPSAMPLE = ("transpose", "trilinear")
_PADDING = ("zeros", "replicate")
_OUTPUT_ACTIVATIONS = ("sigmoid", "softmax", "none")


def _triple(value: Any, name: str) -> Triple:
    """``value`` as a tuple of three positive ints, or ModelError naming ``name``."""
    try:
        out = tuple(int(v) for v in value)
    except TypeError as exc:
        raise ModelError(f"RSUNetConfig.{name}: expected 3 integers (z, y, x), got {value!r}") from exc
    if len(out) != 3 or any(v < 1 for v in out):
        raise ModelError(f"RSUNetConfig.{name}: expected 3 positive integers (z, y, x), got {value!r}")
    return out  # type: ignore[return-value]


@dataclass
class RSUNetConfig:
    """Every hyper-parameter of an RSUNet; JSON-serialisable through ``to_dict``/``from_dict``."""

    in_channels: int = 1
    """Input channels (1 for grayscale EM)."""
    out_channels: int = 3
    """Output channels: 3 for (pre, post, union), 1 for cleft."""
    filters: Tuple[int, ...] = (16, 32, 48, 64)
    """Feature channels per resolution level, finest first; the depth is ``len(filters)``."""
    anisotropic_levels: int = 2
    """How many of the finest levels use (1, 3, 3) kernels and are left by (1, 2, 2) pooling."""
    kernel_sizes: Optional[Tuple[Triple, ...]] = None
    """Explicit (z, y, x) kernel per level (overrides ``anisotropic_levels``); None = derived."""
    down_factors: Optional[Tuple[Triple, ...]] = None
    """Explicit (z, y, x) pooling from level i to i+1 (``depth - 1`` entries); None = derived."""
    input_kernel: Optional[Triple] = None
    """Kernel of the input convolution; None = (1, 5, 5) if level 0 is anisotropic else (5, 5, 5)."""
    norm: str = "batch"
    """Normalisation: "batch", "group" or "none"."""
    group_norm_groups: int = 8
    """Groups for GroupNorm (reduced to the largest divisor of the channel count)."""
    activation: str = "elu"
    """Non-linearity: "elu" or "relu"."""
    upsample: str = "transpose"
    """Decoder upsampling: "transpose" (learned) or "trilinear" (+ 1x1x1 convolution)."""
    padding_mode: str = "zeros"
    """Convolution padding: "zeros" or "replicate"."""
    output_activation: str = "sigmoid"
    """What turns logits into probabilities at inference: "sigmoid", "softmax" or "none"."""

    def __post_init__(self) -> None:
        self.in_channels = int(self.in_channels)
        self.out_channels = int(self.out_channels)
        self.filters = tuple(int(f) for f in self.filters)
        self.anisotropic_levels = int(self.anisotropic_levels)
        if self.in_channels < 1 or self.out_channels < 1:
            raise ModelError(
                f"RSUNetConfig: in_channels ({self.in_channels}) and out_channels "
                f"({self.out_channels}) must be >= 1"
            )
        if len(self.filters) < 1 or any(f < 1 for f in self.filters):
            raise ModelError(f"RSUNetConfig.filters: need >= 1 positive entries, got {self.filters}")
        if not 0 <= self.anisotropic_levels <= self.depth:
            raise ModelError(
                f"RSUNetConfig.anisotropic_levels: must lie in [0, {self.depth}], "
                f"got {self.anisotropic_levels}"
            )
        if self.kernel_sizes is not None:
            self.kernel_sizes = tuple(_triple(k, "kernel_sizes") for k in self.kernel_sizes)
            if len(self.kernel_sizes) != self.depth:
                raise ModelError(
                    f"RSUNetConfig.kernel_sizes: need {self.depth} entries (one per level), "
                    f"got {len(self.kernel_sizes)}"
                )
            if any(k % 2 == 0 for ks in self.kernel_sizes for k in ks):
                raise ModelError(f"RSUNetConfig.kernel_sizes: kernels must be odd, got {self.kernel_sizes}")
        if self.down_factors is not None:
            self.down_factors = tuple(_triple(d, "down_factors") for d in self.down_factors)
            if len(self.down_factors) != self.depth - 1:
                raise ModelError(
                    f"RSUNetConfig.down_factors: need {self.depth - 1} entries (depth - 1), "
                    f"got {len(self.down_factors)}"
                )
        if self.input_kernel is not None:
            self.input_kernel = _triple(self.input_kernel, "input_kernel")
            if any(k % 2 == 0 for k in self.input_kernel):
                raise ModelError(f"RSUNetConfig.input_kernel: kernel must be odd, got {self.input_kernel}")
        for name, allowed in (
            ("norm", _NORMS),
            ("activation", _ACTIVATIONS),
            ("upsample", _UPSAMPLE),
            ("padding_mode", _PADDING),
            ("output_activation", _OUTPUT_ACTIVATIONS),
        ):
            if getattr(self, name) not in allowed:
                raise ModelError(f"RSUNetConfig.{name}: expected one of {allowed}, got {getattr(self, name)!r}")
        if int(self.group_norm_groups) < 1:
            raise ModelError(f"RSUNetConfig.group_norm_groups: must be >= 1, got {self.group_norm_groups}")
        self.group_norm_groups = int(self.group_norm_groups)

    @property
    def depth(self) -> int:
        """Number of resolution levels."""
        return len(self.filters)

    def level_kernel_sizes(self) -> Tuple[Triple, ...]:
        """(z, y, x) convolution kernel of each level, finest first."""
        if self.kernel_sizes is not None:
            return self.kernel_sizes
        return tuple((1, 3, 3) if i < self.anisotropic_levels else (3, 3, 3) for i in range(self.depth))

    def level_down_factors(self) -> Tuple[Triple, ...]:
        """(z, y, x) pooling factor from level i to level i + 1, ``depth - 1`` entries."""
        if self.down_factors is not None:
            return self.down_factors
        return tuple((1, 2, 2) if i < self.anisotropic_levels else (2, 2, 2) for i in range(self.depth - 1))

    def input_kernel_size(self) -> Triple:
        """(z, y, x) kernel of the input convolution."""
        if self.input_kernel is not None:
            return self.input_kernel
        return (1, 5, 5) if self.level_kernel_sizes()[0][0] == 1 else (5, 5, 5)

    def to_dict(self) -> dict:
        """Plain JSON-ready dict (tuples become lists)."""
        def plain(v: Any) -> Any:
            if isinstance(v, (tuple, list)):
                return [plain(x) for x in v]
            return v

        return {k: plain(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RSUNetConfig":
        """Inverse of ``to_dict``; unknown keys raise ModelError naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelError(f"RSUNetConfig: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**dict(data))


def input_divisibility(cfg: RSUNetConfig) -> Triple:
    """(z, y, x) factor every input size must be a multiple of: product of the poolings."""
    out = [1, 1, 1]
    for factor in cfg.level_down_factors():
        out = [a * b for a, b in zip(out, factor)]
    return tuple(out)  # type: ignore[return-value]


def check_patch_shape(cfg: RSUNetConfig, patch_shape: Sequence[int]) -> None:
    """Raise ModelError unless ``patch_shape`` (z, y, x voxels) suits the network."""
    shape = tuple(int(s) for s in patch_shape)
    div = input_divisibility(cfg)
    if len(shape) != 3 or any(s < 1 for s in shape):
        raise ModelError(f"RSUNet: patch shape must be 3 positive sizes (z, y, x), got {tuple(patch_shape)}")
    bad = [ax for ax, s, d in zip("zyx", shape, div) if s % d]
    if bad:
        suggestion = tuple(max(d, int(round(s / d)) * d) for s, d in zip(shape, div))
        raise ModelError(
            f"RSUNet: patch shape {shape} (z, y, x) is not divisible by {div} along {', '.join(bad)} "
            f"(the product of the pooling factors {cfg.level_down_factors()}); e.g. use {suggestion}"
        )


def _padding(kernel: Triple) -> Triple:
    return tuple(k // 2 for k in kernel)  # type: ignore[return-value]


def _norm(cfg: RSUNetConfig, channels: int) -> nn.Module:
    if cfg.norm == "batch":
        return nn.BatchNorm3d(channels)
    if cfg.norm == "group":
        groups = math.gcd(channels, cfg.group_norm_groups)
        return nn.GroupNorm(groups, channels)
    return nn.Identity()


def _act(cfg: RSUNetConfig) -> nn.Module:
    return nn.ELU(inplace=True) if cfg.activation == "elu" else nn.ReLU(inplace=True)


def _conv(cfg: RSUNetConfig, cin: int, cout: int, kernel: Triple) -> nn.Conv3d:
    return nn.Conv3d(
        cin, cout, kernel, padding=_padding(kernel), padding_mode=cfg.padding_mode, bias=cfg.norm == "none"
    )


class _ConvNormAct(nn.Sequential):
    def __init__(self, cfg: RSUNetConfig, cin: int, cout: int, kernel: Triple):
        super().__init__(_conv(cfg, cin, cout, kernel), _norm(cfg, cout), _act(cfg))


class _ResidualBlock(nn.Module):
    """x -> act(x + norm(conv(act(norm(conv(x)))))); channels and size unchanged."""

    def __init__(self, cfg: RSUNetConfig, channels: int, kernel: Triple):
        super().__init__()
        self.conv1 = _ConvNormAct(cfg, channels, channels, kernel)
        self.conv2 = _conv(cfg, channels, channels, kernel)
        self.norm2 = _norm(cfg, channels)
        self.act = _act(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.norm2(self.conv2(self.conv1(x))))


class _Level(nn.Sequential):
    """One resolution level: a convolution to ``cout`` channels, then a residual block."""

    def __init__(self, cfg: RSUNetConfig, cin: int, cout: int, kernel: Triple):
        super().__init__(_ConvNormAct(cfg, cin, cout, kernel), _ResidualBlock(cfg, cout, kernel))


class _Upsample(nn.Module):
    """From level i + 1 (``cin`` channels) to the size and channels of level i."""

    def __init__(self, cfg: RSUNetConfig, cin: int, cout: int, factor: Triple):
        super().__init__()
        self.factor = factor
        self.mode = cfg.upsample
        if self.mode == "transpose":
            self.conv = nn.ConvTranspose3d(cin, cout, factor, stride=factor, bias=cfg.norm == "none")
        else:
            self.conv = nn.Conv3d(cin, cout, 1, bias=cfg.norm == "none")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "transpose":
            return self.conv(x)
        # Reduce channels at the coarse resolution (cheaper), then interpolate.
        return F.interpolate(self.conv(x), scale_factor=self.factor, mode="trilinear", align_corners=False)


class RSUNet(nn.Module):
    """Residual symmetric U-Net; ``forward`` maps (B, in, z, y, x) to logits (B, out, z, y, x)."""

    def __init__(self, cfg: RSUNetConfig):
        super().__init__()
        self.cfg = cfg
        kernels = cfg.level_kernel_sizes()
        factors = cfg.level_down_factors()
        f = cfg.filters
        self.input_divisibility: Triple = input_divisibility(cfg)
        self.output_activation: str = cfg.output_activation

        self.conv_in = _ConvNormAct(cfg, cfg.in_channels, f[0], cfg.input_kernel_size())
        self.encoder = nn.ModuleList(
            [_Level(cfg, f[max(i - 1, 0)], f[i], kernels[i]) for i in range(cfg.depth)]
        )
        self.pools = nn.ModuleList([nn.MaxPool3d(d, stride=d) for d in factors])
        self.upsamples = nn.ModuleList(
            [_Upsample(cfg, f[i + 1], f[i], factors[i]) for i in range(cfg.depth - 1)]
        )
        self.decoder = nn.ModuleList([_Level(cfg, f[i], f[i], kernels[i]) for i in range(cfg.depth - 1)])
        self.conv_out = nn.Conv3d(f[0], cfg.out_channels, 1, bias=True)
        self._init_weights()

    def _init_weights(self) -> None:
        nonlinearity = "relu"  # Kaiming gain for ReLU is also a good fit for ELU.
        for m in self.modules():
            if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
                nn.init.kaiming_normal_(m.weight, nonlinearity=nonlinearity)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # Start every residual branch near zero so each block is close to identity.
        for m in self.modules():
            if isinstance(m, _ResidualBlock) and isinstance(m.norm2, (nn.BatchNorm3d, nn.GroupNorm)):
                nn.init.zeros_(m.norm2.weight)

    def check_patch_shape(self, patch_shape: Sequence[int]) -> None:
        """Raise ModelError unless ``patch_shape`` (z, y, x voxels) is divisible by the pooling."""
        check_patch_shape(self.cfg, patch_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or x.shape[1] != self.cfg.in_channels:
            raise ModelError(
                f"RSUNet: expected input (B, {self.cfg.in_channels}, z, y, x), got {tuple(x.shape)}"
            )
        check_patch_shape(self.cfg, x.shape[2:])
        x = self.conv_in(x)
        skips = []
        for i, level in enumerate(self.encoder):
            if i > 0:
                x = self.pools[i - 1](x)
            x = level(x)
            skips.append(x)
        for i in range(self.cfg.depth - 2, -1, -1):
            x = self.upsamples[i](x) + skips[i]
            x = self.decoder[i](x)
        return self.conv_out(x)


def build_rsunet(cfg: Optional[RSUNetConfig] = None) -> RSUNet:
    """A freshly initialised RSUNet for ``cfg`` (defaults: ``RSUNetConfig()``)."""
    cfg = RSUNetConfig() if cfg is None else cfg
    if not isinstance(cfg, RSUNetConfig):
        raise ModelError(f"build_rsunet: expected an RSUNetConfig, got {type(cfg).__name__}")
    model = RSUNet(cfg)
    log.debug(
        "built RSUNet filters=%s kernels=%s pools=%s params=%d",
        cfg.filters, cfg.level_kernel_sizes(), cfg.level_down_factors(),
        sum(p.numel() for p in model.parameters()),
    )
    return model
