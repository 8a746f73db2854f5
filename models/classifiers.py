"""Synapse classifiers: a cube of raw EM around a synapse → class logits (e.g. E/I transmitter).

Three families with one interface (``model(x) -> (N, num_classes)`` logits, ``model.input_shape``
the (z, y, x) voxels it expects, ``model.num_classes``), all written here (no torchvision):

- :class:`VGG3D` — the Synister classifier layout (Eckstein et al. 2024): levels of 3D
  convolutions each followed by max pooling, then fully connected layers on the flattened
  features (so the position of structures relative to the synapse centre is kept). The finest
  ``anisotropic_levels`` levels use in-plane (1, 3, 3) kernels, which suits 40 × 4 × 4 nm data
  and keeps CPU training cheap.
- :class:`ResNet3D` — residual stages of basic blocks (two convolutions and an identity or
  1×1×1 projection shortcut), strided downsampling, global average pooling, a linear head.
- :class:`ResNet2D` — ResNet-18/34 (basic blocks) or ResNet-50 (bottlenecks) on 2D images;
  given a 3D cube it uses its ``in_channels`` centre sections as channels (one section = the
  centre slice, three = 2.5D).

Every family has a config dataclass with ``to_dict``/``from_dict`` and is registered with
:func:`cleftwise.models.checkpoint.register_model` (``"vgg3d"``, ``"resnet3d"``, ``"resnet2d"``), so a
checkpoint loads by its ``model_type``. ``norm`` is "batch", "group" (GroupNorm, independent of
batch statistics) or "none".

Input: float32 (N, C, Z, Y, X) with raw intensities scaled to [0, 1] (see :func:`prepare_input`);
the models subtract 0.5 themselves, so the same input convention holds for all families.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cleftwise.models.checkpoint import register_model
from cleftwise.models.errors import ModelError

__all__ = [
    "VGG3DConfig", "ResNet3DConfig", "ResNet2DConfig", "VGG3D", "ResNet3D", "ResNet2D",
    "build_vgg3d", "build_resnet3d", "build_resnet2d", "build_classifier", "classifier_config",
    "CLASSIFIER_TYPES", "prepare_input", "check_input_shape", "use_fast_memory_format",
]

log = logging.getLogger(__name__)

Triple = Tuple[int, int, int]
_NORMS = ("batch", "group", "none")


def _triple(value: Any, where: str) -> Triple:
    """``value`` as three positive ints (z, y, x), or ModelError naming ``where``."""
    try:
        out = tuple(int(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"{where}: expected 3 integers (z, y, x), got {value!r}") from exc
    if len(out) != 3 or any(v < 1 for v in out):
        raise ModelError(f"{where}: expected 3 positive integers (z, y, x), got {value!r}")
    return out  # type: ignore[return-value]


def _ints(value: Any, where: str, n: Optional[int] = None) -> Tuple[int, ...]:
    try:
        out = tuple(int(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"{where}: expected a list of positive integers, got {value!r}") from exc
    if not out or any(v < 1 for v in out) or (n is not None and len(out) != n):
        need = f"{n} " if n is not None else ""
        raise ModelError(f"{where}: expected {need}positive integers, got {value!r}")
    return out


def _plain(v: Any) -> Any:
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    return v


class _ConfigIO:
    """``to_dict``/``from_dict`` shared by the config dataclasses (strict about keys)."""

    def to_dict(self) -> dict:
        """Plain JSON-ready dict (tuples become lists)."""
        return {k: _plain(v) for k, v in asdict(self).items()}  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        """Inverse of ``to_dict``; unknown keys raise ModelError naming them."""
        if not isinstance(data, Mapping):
            raise ModelError(f"{cls.__name__}: expected a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelError(f"{cls.__name__}: unknown keys {unknown}; known keys are {sorted(known)}")
        try:
            return cls(**dict(data))
        except TypeError as exc:
            raise ModelError(f"{cls.__name__}: {exc}") from exc


def _check_common(cfg: Any) -> None:
    name = type(cfg).__name__
    cfg.in_channels = int(cfg.in_channels)
    cfg.num_classes = int(cfg.num_classes)
    if cfg.in_channels < 1:
        raise ModelError(f"{name}.in_channels must be >= 1, got {cfg.in_channels}")
    if cfg.num_classes < 2:
        raise ModelError(f"{name}.num_classes must be >= 2, got {cfg.num_classes}")
    if cfg.norm not in _NORMS:
        raise ModelError(f"{name}.norm: expected one of {_NORMS}, got {cfg.norm!r}")
    cfg.group_norm_groups = int(cfg.group_norm_groups)
    if cfg.group_norm_groups < 1:
        raise ModelError(f"{name}.group_norm_groups must be >= 1, got {cfg.group_norm_groups}")
    cfg.dropout = float(cfg.dropout)
    if not 0.0 <= cfg.dropout < 1.0:
        raise ModelError(f"{name}.dropout must lie in [0, 1), got {cfg.dropout}")


def _norm(kind: str, channels: int, groups: int, dims: int) -> nn.Module:
    """BatchNorm{2,3}d, GroupNorm (groups reduced to a divisor of ``channels``) or Identity."""
    if kind == "batch":
        return nn.BatchNorm3d(channels) if dims == 3 else nn.BatchNorm2d(channels)
    if kind == "group":
        g = math.gcd(int(groups), int(channels))
        return nn.GroupNorm(g, channels)
    return nn.Identity()


def _same_pad(kernel: Sequence[int]) -> Tuple[int, ...]:
    return tuple(k // 2 for k in kernel)


def check_input_shape(x: torch.Tensor, in_channels: int, input_shape: Optional[Triple], what: str) -> None:
    """Raise ModelError unless ``x`` is (N, in_channels, *input_shape) (shape None = any z, y, x)."""
    if x.dim() != 5 or x.shape[1] != in_channels or (
            input_shape is not None and tuple(x.shape[2:]) != tuple(input_shape)):
        want = f"(N, {in_channels}, " + (", ".join(map(str, input_shape)) if input_shape else "Z, Y, X") + ")"
        raise ModelError(f"{what} expects input {want}, got {tuple(x.shape)}; the cube shape of the "
                         "data does not match the model config")


# ------------------------------------------------------------------------------------------
# VGG3D
# ------------------------------------------------------------------------------------------

@dataclass
class VGG3DConfig(_ConfigIO):
    """Synister-style VGG: conv levels with pooling, then fully connected layers."""

    in_channels: int = 1
    """Input channels (1 for grayscale EM)."""
    num_classes: int = 2
    """Output classes (logits)."""
    input_shape: Triple = (16, 96, 96)
    """Cube shape (z, y, x) voxels the network takes; fixed because the head is fully connected."""
    input_pool: Triple = (1, 1, 1)
    """Average-pool the input by this factor first, e.g. (1, 2, 2) treats 4 nm data at 8 nm (4× cheaper)."""
    fmaps: Tuple[int, ...] = (12, 24, 48, 96)
    """Feature maps per level (finest first); the depth is ``len(fmaps)``."""
    convs_per_level: int = 2
    """Convolutions per level."""
    anisotropic_levels: int = 2
    """The finest levels using (1, 3, 3) kernels; the others use (3, 3, 3)."""
    down_factors: Tuple[Triple, ...] = ((1, 2, 2), (1, 2, 2), (2, 2, 2), (2, 2, 2))
    """Max-pooling factor (z, y, x) after each level (one entry per level)."""
    fc: Tuple[int, ...] = (256, 128)
    """Hidden units of the fully connected layers before the output layer."""
    dropout: float = 0.5
    """Dropout before each fully connected layer."""
    norm: str = "batch"
    """Normalisation after each convolution: "batch", "group" or "none"."""
    group_norm_groups: int = 8
    """Groups of GroupNorm (reduced to a divisor of the channel count)."""

    def __post_init__(self) -> None:
        _check_common(self)
        self.input_shape = _triple(self.input_shape, "VGG3DConfig.input_shape")
        self.input_pool = _triple(self.input_pool, "VGG3DConfig.input_pool")
        self.fmaps = _ints(self.fmaps, "VGG3DConfig.fmaps")
        self.fc = tuple(int(v) for v in self.fc)
        if any(v < 1 for v in self.fc):
            raise ModelError(f"VGG3DConfig.fc: hidden sizes must be positive, got {self.fc}")
        self.convs_per_level = int(self.convs_per_level)
        if self.convs_per_level < 1:
            raise ModelError(f"VGG3DConfig.convs_per_level must be >= 1, got {self.convs_per_level}")
        self.anisotropic_levels = int(self.anisotropic_levels)
        if not 0 <= self.anisotropic_levels <= len(self.fmaps):
            raise ModelError(f"VGG3DConfig.anisotropic_levels must lie in [0, {len(self.fmaps)}], "
                             f"got {self.anisotropic_levels}")
        self.down_factors = tuple(_triple(d, "VGG3DConfig.down_factors") for d in self.down_factors)
        if len(self.down_factors) != len(self.fmaps):
            raise ModelError(f"VGG3DConfig.down_factors: need {len(self.fmaps)} entries (one per level), "
                             f"got {len(self.down_factors)}")
        shape = self.feature_shape()
        if any(s < 1 for s in shape):
            raise ModelError(f"VGG3DConfig: input_shape {self.input_shape} is too small for down_factors "
                             f"{self.down_factors} (features would be {shape})")
        div = tuple(int(np.prod([d[a] for d in (self.input_pool,) + self.down_factors])) for a in range(3))
        bad = [ax for ax, s, d in zip("zyx", self.input_shape, div) if s % d]
        if bad:
            raise ModelError(f"VGG3DConfig: input_shape {self.input_shape} is not divisible by the total "
                             f"pooling {div} along {', '.join(bad)}")

    def feature_shape(self) -> Triple:
        """(z, y, x) size of the last feature map."""
        out = list(self.input_shape)
        for d in (self.input_pool,) + self.down_factors:
            out = [s // f for s, f in zip(out, d)]
        return tuple(out)  # type: ignore[return-value]


class _Classifier(nn.Module):
    """Shared interface of the classifiers: ``cfg`` with ``input_shape`` and ``num_classes``."""

    cfg: Any

    @property
    def input_shape(self) -> Optional[Triple]:
        """Cube shape (z, y, x) voxels the model was built for (None: any)."""
        return self.cfg.input_shape

    @property
    def num_classes(self) -> int:
        return self.cfg.num_classes


class VGG3D(_Classifier):
    """(N, C, *input_shape) float in [0, 1] → (N, num_classes) logits."""

    #: preferred memory format (see :func:`use_fast_memory_format`)
    memory_format = torch.channels_last_3d

    def __init__(self, cfg: VGG3DConfig):
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = []
        if cfg.input_pool != (1, 1, 1):
            layers.append(nn.AvgPool3d(cfg.input_pool, cfg.input_pool))
        cin = cfg.in_channels
        for level, (fm, down) in enumerate(zip(cfg.fmaps, cfg.down_factors)):
            k = (1, 3, 3) if level < cfg.anisotropic_levels else (3, 3, 3)
            for _ in range(cfg.convs_per_level):
                layers += [nn.Conv3d(cin, fm, k, padding=_same_pad(k), bias=cfg.norm == "none"),
                           _norm(cfg.norm, fm, cfg.group_norm_groups, 3), nn.ReLU(inplace=True)]
                cin = fm
            layers.append(nn.MaxPool3d(down, down))
        self.features = nn.Sequential(*layers)
        head: list[nn.Module] = []
        width = cin * int(np.prod(cfg.feature_shape()))
        for hidden in cfg.fc:
            head += [nn.Dropout(cfg.dropout), nn.Linear(width, hidden), nn.ReLU(inplace=True)]
            width = hidden
        head += [nn.Dropout(cfg.dropout), nn.Linear(width, cfg.num_classes)]
        self.classifier = nn.Sequential(*head)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_shape(x, self.cfg.in_channels, self.cfg.input_shape, "VGG3D")
        f = self.features(x - 0.5)
        return self.classifier(torch.flatten(f, 1))


# ------------------------------------------------------------------------------------------
# ResNet3D
# ------------------------------------------------------------------------------------------

@dataclass
class ResNet3DConfig(_ConfigIO):
    """3D ResNet of basic blocks with anisotropic early stages and global average pooling."""

    in_channels: int = 1
    """Input channels."""
    num_classes: int = 2
    """Output classes (logits)."""
    input_shape: Optional[Triple] = (16, 96, 96)
    """Cube shape (z, y, x) the data provides (checked at run time); None accepts any shape."""
    stem_channels: int = 16
    """Channels of the stem convolution (kernel (1, 5, 5), stride (1, 2, 2))."""
    filters: Tuple[int, ...] = (16, 32, 64, 128)
    """Channels of each residual stage."""
    blocks: Tuple[int, ...] = (2, 2, 2, 2)
    """Basic blocks per stage."""
    strides: Tuple[Triple, ...] = ((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2))
    """Stride (z, y, x) of the first block of each stage."""
    anisotropic_stages: int = 2
    """The first stages use (1, 3, 3) kernels; later ones (3, 3, 3)."""
    dropout: float = 0.0
    """Dropout before the linear head."""
    norm: str = "batch"
    """Normalisation: "batch", "group" or "none"."""
    group_norm_groups: int = 8
    """Groups of GroupNorm."""

    def __post_init__(self) -> None:
        _check_common(self)
        if self.input_shape is not None:
            self.input_shape = _triple(self.input_shape, "ResNet3DConfig.input_shape")
        self.stem_channels = int(self.stem_channels)
        if self.stem_channels < 1:
            raise ModelError(f"ResNet3DConfig.stem_channels must be >= 1, got {self.stem_channels}")
        self.filters = _ints(self.filters, "ResNet3DConfig.filters")
        self.blocks = _ints(self.blocks, "ResNet3DConfig.blocks", len(self.filters))
        self.strides = tuple(_triple(s, "ResNet3DConfig.strides") for s in self.strides)
        if len(self.strides) != len(self.filters):
            raise ModelError(f"ResNet3DConfig.strides: need {len(self.filters)} entries, got {len(self.strides)}")
        self.anisotropic_stages = int(self.anisotropic_stages)
        if not 0 <= self.anisotropic_stages <= len(self.filters):
            raise ModelError(f"ResNet3DConfig.anisotropic_stages must lie in [0, {len(self.filters)}]")


class _Basic(nn.Module):
    """Two convolutions with an identity or projection shortcut (2D or 3D)."""

    expansion = 1

    def __init__(self, cin: int, cout: int, stride, kernel, norm: str, groups: int, dims: int):
        super().__init__()
        Conv = nn.Conv3d if dims == 3 else nn.Conv2d
        self.conv1 = Conv(cin, cout, kernel, stride=stride, padding=_same_pad(kernel), bias=False)
        self.n1 = _norm(norm, cout, groups, dims)
        self.conv2 = Conv(cout, cout, kernel, padding=_same_pad(kernel), bias=False)
        self.n2 = _norm(norm, cout, groups, dims)
        self.short: nn.Module = nn.Identity()
        if cin != cout or any(s != 1 for s in stride):
            self.short = nn.Sequential(Conv(cin, cout, 1, stride=stride, bias=False),
                                       _norm(norm, cout, groups, dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.n1(self.conv1(x)), inplace=True)
        y = self.n2(self.conv2(y))
        return F.relu(y + self.short(x), inplace=True)


class _Bottleneck(nn.Module):
    """1×1 reduce, 3×3 (strided), 1×1 expand ×4, with shortcut (2D)."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride, kernel, norm: str, groups: int, dims: int):
        super().__init__()
        Conv = nn.Conv3d if dims == 3 else nn.Conv2d
        cout = width * self.expansion
        self.conv1 = Conv(cin, width, 1, bias=False)
        self.n1 = _norm(norm, width, groups, dims)
        self.conv2 = Conv(width, width, kernel, stride=stride, padding=_same_pad(kernel), bias=False)
        self.n2 = _norm(norm, width, groups, dims)
        self.conv3 = Conv(width, cout, 1, bias=False)
        self.n3 = _norm(norm, cout, groups, dims)
        self.short: nn.Module = nn.Identity()
        if cin != cout or any(s != 1 for s in stride):
            self.short = nn.Sequential(Conv(cin, cout, 1, stride=stride, bias=False),
                                       _norm(norm, cout, groups, dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.n1(self.conv1(x)), inplace=True)
        y = F.relu(self.n2(self.conv2(y)), inplace=True)
        y = self.n3(self.conv3(y))
        return F.relu(y + self.short(x), inplace=True)


class ResNet3D(_Classifier):
    """(N, C, Z, Y, X) float in [0, 1] → (N, num_classes) logits."""

    memory_format = torch.channels_last_3d

    def __init__(self, cfg: ResNet3DConfig):
        super().__init__()
        self.cfg = cfg
        k = (1, 5, 5)
        self.stem = nn.Sequential(
            nn.Conv3d(cfg.in_channels, cfg.stem_channels, k, stride=(1, 2, 2), padding=_same_pad(k), bias=False),
            _norm(cfg.norm, cfg.stem_channels, cfg.group_norm_groups, 3), nn.ReLU(inplace=True))
        stages = []
        cin = cfg.stem_channels
        for i, (cout, n, stride) in enumerate(zip(cfg.filters, cfg.blocks, cfg.strides)):
            kern = (1, 3, 3) if i < cfg.anisotropic_stages else (3, 3, 3)
            blocks = []
            for b in range(n):
                blocks.append(_Basic(cin, cout, stride if b == 0 else (1, 1, 1), kern, cfg.norm,
                                     cfg.group_norm_groups, 3))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.drop = nn.Dropout(cfg.dropout)
        self.fc = nn.Linear(cin, cfg.num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_shape(x, self.cfg.in_channels, self.cfg.input_shape, "ResNet3D")
        f = self.stages(self.stem(x - 0.5))
        return self.fc(self.drop(torch.flatten(F.adaptive_avg_pool3d(f, 1), 1)))


# ------------------------------------------------------------------------------------------
# ResNet2D
# ------------------------------------------------------------------------------------------

_RESNET2D_LAYOUT = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
                    50: ("bottleneck", (3, 4, 6, 3))}


@dataclass
class ResNet2DConfig(_ConfigIO):
    """ResNet-18/34/50 on 2D sections; ``in_channels`` centre sections of a cube are the channels."""

    depth: int = 18
    """18, 34 (basic blocks) or 50 (bottlenecks)."""
    in_channels: int = 1
    """Sections used as channels: 1 = the centre slice, 3 = 2.5D (centre ± 1)."""
    num_classes: int = 2
    """Output classes (logits)."""
    input_shape: Optional[Triple] = (1, 96, 96)
    """Cube shape (z, y, x) the data provides; z >= in_channels (centre sections are used). None = any."""
    width: int = 64
    """Channels of the first stage (doubled per stage)."""
    stem: str = "imagenet"
    """"imagenet" (7×7 stride 2 + max pool) or "small" (3×3 stride 1, no pool) for small cubes."""
    dropout: float = 0.0
    """Dropout before the linear head."""
    norm: str = "batch"
    """Normalisation: "batch", "group" or "none"."""
    group_norm_groups: int = 32
    """Groups of GroupNorm."""

    def __post_init__(self) -> None:
        _check_common(self)
        self.depth = int(self.depth)
        if self.depth not in _RESNET2D_LAYOUT:
            raise ModelError(f"ResNet2DConfig.depth must be one of {sorted(_RESNET2D_LAYOUT)}, got {self.depth}")
        self.width = int(self.width)
        if self.width < 1:
            raise ModelError(f"ResNet2DConfig.width must be >= 1, got {self.width}")
        if self.stem not in ("imagenet", "small"):
            raise ModelError(f"ResNet2DConfig.stem must be 'imagenet' or 'small', got {self.stem!r}")
        if self.input_shape is not None:
            self.input_shape = _triple(self.input_shape, "ResNet2DConfig.input_shape")
            if self.input_shape[0] < self.in_channels:
                raise ModelError(f"ResNet2DConfig: input_shape z ({self.input_shape[0]}) must be >= "
                                 f"in_channels ({self.in_channels}) sections")


class ResNet2D(_Classifier):
    """(N, C, Y, X) or a cube (N, 1, Z, Y, X) (centre ``in_channels`` sections) → (N, num_classes)."""

    def __init__(self, cfg: ResNet2DConfig):
        super().__init__()
        self.cfg = cfg
        kind, layout = _RESNET2D_LAYOUT[cfg.depth]
        Block = _Basic if kind == "basic" else _Bottleneck
        g = cfg.group_norm_groups
        if cfg.stem == "imagenet":
            self.stem = nn.Sequential(
                nn.Conv2d(cfg.in_channels, cfg.width, 7, stride=2, padding=3, bias=False),
                _norm(cfg.norm, cfg.width, g, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(cfg.in_channels, cfg.width, 3, padding=1, bias=False),
                _norm(cfg.norm, cfg.width, g, 2), nn.ReLU(inplace=True))
        stages = []
        cin = cfg.width
        for i, n in enumerate(layout):
            width = cfg.width * 2 ** i
            blocks = []
            for b in range(n):
                stride = (2, 2) if (b == 0 and i > 0) else (1, 1)
                blk = Block(cin, width, stride, (3, 3), cfg.norm, g, 2)
                blocks.append(blk)
                cin = width * Block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.drop = nn.Dropout(cfg.dropout)
        self.fc = nn.Linear(cin, cfg.num_classes)
        _init_weights(self)

    def sections(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, Z, Y, X) → (N, in_channels, Y, X): the centre sections; 4D input passes through."""
        c = self.cfg.in_channels
        if x.dim() == 5:
            check_input_shape(x, 1, self.cfg.input_shape, "ResNet2D")
            z = x.shape[2]
            if z < c:
                raise ModelError(f"ResNet2D needs >= {c} sections, the cube has {z}")
            start = (z - c) // 2
            return x[:, 0, start:start + c]
        if x.dim() != 4 or x.shape[1] != c:
            raise ModelError(f"ResNet2D expects (N, {c}, Y, X) or (N, 1, Z, Y, X), got {tuple(x.shape)}")
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.stages(self.stem(self.sections(x) - 0.5))
        return self.fc(self.drop(torch.flatten(F.adaptive_avg_pool2d(f, 1), 1)))


# ------------------------------------------------------------------------------------------
# shared
# ------------------------------------------------------------------------------------------

def _init_weights(model: nn.Module) -> None:
    """Kaiming-normal convolutions/linears, unit norms, zero biases."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.Linear):
            nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        if isinstance(m, (nn.Conv2d, nn.Conv3d)) and m.bias is not None:
            nn.init.zeros_(m.bias)


def use_fast_memory_format(model: nn.Module, x: Optional[torch.Tensor] = None):
    """Put a 3D classifier (and optionally its input ``x``) in channels-last-3d memory layout.

    oneDNN convolutions and pooling run about 1.7× faster so on CPU; results equal the default
    layout up to float rounding. 2D models are left as they are. Returns ``x`` (converted) or
    the model when ``x`` is None.
    """
    fmt = getattr(model, "memory_format", None)
    if fmt is None:
        return model if x is None else x
    model.to(memory_format=fmt)
    if x is None:
        return model
    return x.contiguous(memory_format=fmt) if x.dim() == 5 else x


def build_vgg3d(cfg: VGG3DConfig) -> VGG3D:
    return VGG3D(cfg)


def build_resnet3d(cfg: ResNet3DConfig) -> ResNet3D:
    return ResNet3D(cfg)


def build_resnet2d(cfg: ResNet2DConfig) -> ResNet2D:
    return ResNet2D(cfg)


CLASSIFIER_TYPES = {
    "vgg3d": (VGG3DConfig, build_vgg3d),
    "resnet3d": (ResNet3DConfig, build_resnet3d),
    "resnet2d": (ResNet2DConfig, build_resnet2d),
}

ClassifierConfig = Union[VGG3DConfig, ResNet3DConfig, ResNet2DConfig]

for _name, (_cls, _builder) in CLASSIFIER_TYPES.items():
    register_model(_name, _cls, _builder)


def classifier_config(model_type: str, data: Mapping[str, Any]) -> ClassifierConfig:
    """The config of classifier family ``model_type`` from a dict (strict keys)."""
    if model_type not in CLASSIFIER_TYPES:
        raise ModelError(f"unknown classifier model_type {model_type!r}; choose one of {sorted(CLASSIFIER_TYPES)}")
    return CLASSIFIER_TYPES[model_type][0].from_dict(data)


def build_classifier(model_type: str, cfg: Union[ClassifierConfig, Mapping[str, Any]]) -> nn.Module:
    """A freshly initialised classifier of family ``model_type`` from its config (or dict)."""
    if not isinstance(cfg, (VGG3DConfig, ResNet3DConfig, ResNet2DConfig)):
        cfg = classifier_config(model_type, cfg)
    if model_type not in CLASSIFIER_TYPES or not isinstance(cfg, CLASSIFIER_TYPES[model_type][0]):
        raise ModelError(f"config {type(cfg).__name__} does not belong to classifier {model_type!r}")
    return CLASSIFIER_TYPES[model_type][1](cfg)


def prepare_input(cubes: np.ndarray, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """Cubes (N, Z, Y, X) → float32 tensor (N, 1, Z, Y, X) in [0, 1] on ``device``.

    uint8 is divided by 255, uint16 by 65535; float input is taken as already in [0, 1].
    """
    a = np.asarray(cubes)
    if a.ndim != 4:
        raise ModelError(f"prepare_input: expected cubes (N, Z, Y, X), got shape {a.shape}")
    t = torch.from_numpy(np.ascontiguousarray(a))
    if a.dtype == np.uint8:
        t = t.to(device=device, dtype=torch.float32).div_(255.0)
    elif a.dtype == np.uint16:
        t = torch.from_numpy(a.astype(np.float32) / 65535.0).to(device)
    elif np.issubdtype(a.dtype, np.floating):
        t = t.to(device=device, dtype=torch.float32)
    else:
        raise ModelError(f"prepare_input: unsupported cube dtype {a.dtype} (uint8, uint16 or float)")
    return t.unsqueeze(1)
