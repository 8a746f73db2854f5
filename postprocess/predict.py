"""The ``predict`` step: blockwise sliding-window inference of a 3D CNN over a volume.

Each worker loads the model once. A block reads the union of the *global* patches that cover
its write ROI (:func:`cleftwise.blockwise.sliding_window.required_read_region`), predicts them in
batches, blends them with the window and writes Σw·p / Σw over its write ROI. Because the
patch grid is global (origins at the input volume's origin + k·stride), a voxel gets the same
value whatever the block shape, backend, worker count or number of resumes.

Output: a (c, z, y, x) volume of probabilities, uint8 0–255 (default) or float16, with the
input's voxel size and the ROI's offset.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
from funlib.geometry import Coordinate, Roi

from cleftwise.models.checkpoint import load_model, read_checkpoint_meta, weights_digest
from cleftwise.models.errors import ModelError
from cleftwise.models.rsunet import check_patch_shape
from cleftwise.storage.volume import create_volume, open_volume
from cleftwise.storage.errors import StorageError

from cleftwise.blockwise.errors import BlockwiseError
from cleftwise.blockwise.grid import Block, plan_blocks
from cleftwise.blockwise.sliding_window import (TorchPredictor, blend_window, predict_region, required_read_region,
                             to_uint8)
from cleftwise.blockwise.task import BlockTask

__all__ = ["PredictConfig", "PredictTask"]

log = logging.getLogger(__name__)


@dataclass
class PredictConfig:
    """Settings of the predict step. Shapes are voxels (z, y, x); ROI in nm."""

    input: str = ""
    """raw EM volume URL (uint8 or float32, z y x), e.g. data.zarr/raw (the pipeline fills it)"""
    output: str = ""
    """output volume URL for the (c, z, y, x) probabilities (the pipeline fills it)"""
    checkpoint: str = ""
    """model state_dict (.pt) with its architecture JSON beside it"""
    roi: Optional[tuple] = None
    """[[z, y, x] begin nm, [z, y, x] shape nm] to predict; default the whole input"""
    block_shape: tuple = (32, 256, 256)
    """write block shape, voxels"""
    chunk_shape: Optional[tuple] = None
    """output chunk shape, voxels (must divide block_shape); default block_shape"""
    patch_shape: Optional[tuple] = None
    """model input patch, voxels; default the checkpoint's training patch or (18, 160, 160)"""
    stride: Optional[tuple] = None
    """patch stride, voxels; default patch_shape // 2"""
    blend: str = "bump"
    """blending window: bump or gaussian"""
    batch_size: int = 4
    """patches per forward pass"""
    output_dtype: str = "uint8"
    """uint8 (probability × 255) or float16"""
    device: str = "auto"
    """auto (CUDA when present), cpu or cuda"""
    amp: bool = True
    """bf16 autocast on CUDA (ignored on CPU)"""
    tta: bool = False
    """test-time augmentation by flips (slower, averaged)"""
    torch_threads: int = 0
    """torch CPU threads per worker (0 = torch default)"""


class PredictTask(BlockTask):
    """Blockwise sliding-window prediction (see module docstring)."""

    name = "predict"

    def __init__(self, cfg: PredictConfig):
        self.cfg = cfg
        for key in ("input", "output", "checkpoint"):
            if not getattr(cfg, key):
                raise BlockwiseError(f"predict: '{key}' is not set")
        src = open_volume(cfg.input)
        if src.num_channels is not None or len(src.shape) != 3:
            raise BlockwiseError(
                f"{cfg.input}: predict expects a 3D (z, y, x) raw volume, got shape {src.shape}")
        if src.dtype not in (np.uint8, np.float32):
            raise BlockwiseError(
                f"{cfg.input}: raw must be uint8 (0–255) or float32 (0–1), got {src.dtype}")
        meta = read_checkpoint_meta(cfg.checkpoint)
        self.meta = meta
        mv = tuple(int(round(v)) for v in meta.voxel_size)
        if Coordinate(mv) != src.voxel_size:
            raise BlockwiseError(
                f"voxel size mismatch: {cfg.input} has {tuple(src.voxel_size)} nm but the model "
                f"{cfg.checkpoint} was trained at {mv} nm; resample the input or use a matching model")
        self.voxel_size = src.voxel_size
        self.volume_roi = src.roi
        self.volume_shape = tuple(src.spatial_shape)
        self.roi = Roi(*cfg.roi) if cfg.roi is not None else src.roi
        if not src.roi.contains(self.roi):
            raise BlockwiseError(f"ROI {self.roi} is not inside the input volume {src.roi} ({cfg.input})")
        patch = cfg.patch_shape or meta.extra.get("patch_shape") or (18, 160, 160)
        self.patch = tuple(int(p) for p in patch)
        if meta.model_type == "rsunet":
            try:
                check_patch_shape(meta.config, self.patch)
            except ModelError as e:
                raise BlockwiseError(f"patch {self.patch} does not suit {cfg.checkpoint}: {e}") from e
        self.stride = tuple(int(s) for s in (cfg.stride or tuple(max(1, p // 2) for p in self.patch)))
        if any(s <= 0 or s > p for s, p in zip(self.stride, self.patch)):
            raise BlockwiseError(f"stride {self.stride} must be in 1..patch {self.patch} per axis")
        if any(p > v for p, v in zip(self.patch, self.volume_shape)):
            raise BlockwiseError(
                f"patch {self.patch} voxels is larger than the input volume {self.volume_shape} "
                f"({cfg.input}); use a smaller patch or pad the volume")
        block = Coordinate(int(b) for b in cfg.block_shape)
        if any(b < p for b, p in zip(block, self.patch)):
            raise BlockwiseError(
                f"block shape {tuple(block)} voxels is smaller than the patch {self.patch}: every "
                "block would re-predict most of its neighbours' patches; use blocks of at least "
                "one patch")
        self.block = block
        self.chunk = Coordinate(int(c) for c in (cfg.chunk_shape or cfg.block_shape))
        if cfg.output_dtype not in ("uint8", "float16"):
            raise BlockwiseError(f"output_dtype must be uint8 or float16, got {cfg.output_dtype!r}")
        if cfg.blend not in ("bump", "gaussian"):
            raise BlockwiseError(f"blend must be bump or gaussian, got {cfg.blend!r}")
        self.out_channels = int(meta.config.out_channels)
        self._blocks = plan_blocks(self.roi, block * self.voxel_size, (0, 0, 0),
                                   self.chunk * self.voxel_size, self.voxel_size)
        self._digest = weights_digest(cfg.checkpoint)

    # -- BlockTask interface --------------------------------------------------------------
    def blocks(self) -> list[Block]:
        return self._blocks

    def settings(self) -> dict:
        c = self.cfg
        return {"step": self.name, "input": os.path.abspath(c.input) if "://" not in c.input else c.input,
                "output": c.output, "roi": [list(self.roi.begin), list(self.roi.shape)],
                "weights_sha256": self._digest, "patch": list(self.patch), "stride": list(self.stride),
                "blend": c.blend, "output_dtype": c.output_dtype, "tta": c.tta, "amp": c.amp,
                "block_shape": list(self.block), "chunk_shape": list(self.chunk)}

    def ledger_path(self) -> str:
        return os.path.join(self.cfg.output.rstrip("/") + ".ledger", self.name)

    def _channel_names(self) -> list:
        """The checkpoint's channel names (training writes them), else pre/post/union or cleft."""
        names = list((self.meta.extra or {}).get("channels") or [])
        if len(names) == self.out_channels:
            return names
        return ["pre", "post", "union"] if self.out_channels == 3 else ["cleft"]

    def prepare(self, fresh: bool) -> None:
        if fresh:
            create_volume(self.cfg.output, shape=self.roi.shape / self.voxel_size,
                          voxel_size=self.voxel_size, offset=self.roi.begin,
                          dtype=self.cfg.output_dtype, chunk_shape=self.chunk,
                          num_channels=self.out_channels, overwrite=True,
                          attrs={"cleftwise_step": "predict", "weights_sha256": self._digest,
                                 "channels": self._channel_names()})
        else:
            try:
                out = open_volume(self.cfg.output)
            except StorageError as e:
                raise BlockwiseError(
                    f"resuming predict but its output is missing ({e}); re-run with --overwrite") from e
            if out.roi != self.roi or out.num_channels != self.out_channels:
                raise BlockwiseError(f"{self.cfg.output}: existing output does not match this job")

    def read_roi(self, block: Block) -> tuple[Roi, tuple, tuple]:
        """Read ROI (nm) and write begin/end (voxels, global grid) of ``block``."""
        w0 = tuple(int(x) for x in (block.write_roi.begin - self.volume_roi.begin) / self.voxel_size)
        w1 = tuple(a + int(s) for a, s in zip(w0, block.write_roi.shape / self.voxel_size))
        r0, r1 = required_read_region(w0, w1, self.patch, self.stride, self.volume_shape)
        roi = Roi(self.volume_roi.begin + Coordinate(r0) * self.voxel_size,
                  Coordinate(b - a for a, b in zip(r0, r1)) * self.voxel_size)
        return roi, w0, w1, r0

    @contextlib.contextmanager
    def worker(self):
        import torch

        if self.cfg.torch_threads:
            torch.set_num_threads(int(self.cfg.torch_threads))
        model, _ = load_model(self.cfg.checkpoint, device=self.cfg.device)
        predictor = TorchPredictor(model, device=self.cfg.device, tta=self.cfg.tta,
                                   amp_dtype="bf16" if self.cfg.amp else None)
        window = blend_window(self.patch, mode=self.cfg.blend)
        src = open_volume(self.cfg.input)
        dst = open_volume(self.cfg.output, mode="r+")

        pending: dict = {}

        def prefetch(block: Block) -> None:
            """Start an asynchronous TensorStore read of ``block``'s input."""
            roi = self.read_roi(block)[0]
            pending.clear()
            pending[block.block_id] = src.read_async(roi)

        def process(block: Block) -> None:
            roi, w0, w1, r0 = self.read_roi(block)
            fut = pending.pop(block.block_id, None)
            raw = fut.result() if fut is not None else src.read(roi)  # uint8 scaled by predict_region
            probs = predict_region(predictor, raw, r0, w0, w1, self.patch, self.stride,
                                   self.volume_shape, window, batch_size=self.cfg.batch_size,
                                   out_channels=self.out_channels)
            if self.cfg.output_dtype == "uint8":
                out = to_uint8(probs)
            else:
                out = probs.astype(np.float16)
            dst.write(block.write_roi, out)

        process.prefetch = prefetch
        yield process
