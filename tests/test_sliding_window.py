"""Sliding-window maths: global grid, read regions, blending, blockwise == whole volume."""

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from cleftwise.blockwise.errors import BlockwiseError
from cleftwise.blockwise.sliding_window import (
    TorchPredictor,
    blend_window,
    grid_origins,
    patch_origins,
    predict_region,
    required_read_region,
    to_uint8,
)
from cleftwise.models.rsunet import RSUNetConfig, build_rsunet

VOL = (20, 90, 90)
PATCH = (8, 32, 32)
STRIDE = (4, 16, 16)


def _raw(seed=0, shape=VOL):
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def _position_model(batch):
    """Deterministic model_fn whose output depends on the position inside the patch, so the
    result depends on which patches are blended with which weights."""
    b = batch[:, 0].astype(np.float64)
    z, y, x = np.meshgrid(*(np.linspace(0, 1, n) for n in b.shape[1:]), indexing="ij")
    ramp = (0.5 * z + 0.3 * y + 0.2 * x)[None]
    out = np.stack([b, b * ramp, (1 - b) * (1 - ramp)], axis=1)
    return out.astype(np.float32)


def _tiles(block):
    """Write regions [begin, end) of a tiling of VOL by ``block`` (last tiles cropped)."""
    starts = [range(0, n, b) for n, b in zip(VOL, block)]
    for begin in itertools.product(*starts):
        end = tuple(min(b + s, n) for b, s, n in zip(begin, block, VOL))
        yield begin, end


def _predict_tiled(model_fn, raw, block, batch_size=4):
    out = np.full((3,) + VOL, np.nan, dtype=np.float32)
    window = blend_window(PATCH)
    for begin, end in _tiles(block):
        rb, re = required_read_region(begin, end, PATCH, STRIDE, VOL)
        sub = raw[tuple(slice(a, b) for a, b in zip(rb, re))]
        out[(slice(None),) + tuple(slice(a, b) for a, b in zip(begin, end))] = predict_region(
            model_fn, sub, rb, begin, end, PATCH, STRIDE, VOL, window, batch_size=batch_size)
    return out


def test_grid_is_regular_with_clamped_last_origin():
    oz, oy, ox = grid_origins(VOL, PATCH, STRIDE)
    assert oz.tolist() == [0, 4, 8, 12]
    assert oy.tolist() == ox.tolist() == [0, 16, 32, 48, 58]
    assert [o.tolist() for o in grid_origins((8, 64, 65), PATCH, (4, 16, 16))] == [
        [0], [0, 16, 32], [0, 16, 32, 33]]
    with pytest.raises(BlockwiseError, match=r"larger than the volume .* along y .*pad"):
        grid_origins((20, 30, 90), PATCH, STRIDE)
    with pytest.raises(BlockwiseError, match="stride .* exceeds patch .* along x"):
        grid_origins(VOL, PATCH, (4, 16, 33))


def test_required_read_region_borders():
    # interior: y write [40, 50) meets origins 16, 32, 48 → read [16, 80); z [0, 4) only origin 0
    assert required_read_region((0, 40, 40), (4, 50, 50), PATCH, STRIDE, VOL) == ((0, 16, 16), (8, 80, 80))
    assert required_read_region((1, 40, 40), (5, 50, 50), PATCH, STRIDE, VOL) == ((0, 16, 16), (12, 80, 80))
    # lower border
    assert required_read_region((0, 0, 0), (1, 10, 10), PATCH, STRIDE, VOL) == ((0, 0, 0), (8, 32, 32))
    # upper border: only the clamped patch at 58 reaches y >= 80; z 19 only the patch at 12
    assert required_read_region((19, 80, 85), (20, 90, 90), PATCH, STRIDE, VOL) == ((12, 58, 58), (20, 90, 90))
    # whole volume reads exactly the volume
    assert required_read_region((0, 0, 0), VOL, PATCH, STRIDE, VOL) == ((0, 0, 0), VOL)
    with pytest.raises(BlockwiseError, match="outside the volume"):
        required_read_region((0, 0, 0), (21, 10, 10), PATCH, STRIDE, VOL)
    with pytest.raises(BlockwiseError, match="empty"):
        required_read_region((5, 0, 0), (5, 10, 10), PATCH, STRIDE, VOL)


def test_patch_origins_order_and_overlap():
    origins = patch_origins((4, 40, 0), (9, 50, 5), PATCH, STRIDE, VOL)
    assert origins.tolist() == sorted(origins.tolist())
    assert {tuple(o) for o in origins} == set(itertools.product([0, 4, 8], [16, 32, 48], [0]))


@pytest.mark.parametrize("mode", ["bump", "gaussian"])
def test_blend_window_positive_symmetric(mode):
    w = blend_window((8, 33, 32), mode=mode)
    assert w.dtype == np.float32 and w.shape == (8, 33, 32)
    assert (w > 0).all() and w.min() >= 1e-9 * (1 - 1e-6)  # per-axis floor 1e-3 → product >= 1e-9
    assert np.array_equal(w, w[::-1]) and np.array_equal(w, w[:, ::-1]) and np.array_equal(w, w[:, :, ::-1])
    assert w.max() == pytest.approx(1.0, abs=0.02)
    assert w[4, 16, 16] > w[0, 16, 16] and w[4, 16, 16] > w[4, 0, 16]
    with pytest.raises(BlockwiseError, match="mode"):
        blend_window((8, 8, 8), mode="cosine")
    with pytest.raises(BlockwiseError, match="floor"):
        blend_window((8, 8, 8), floor="min")


def test_blend_window_floors_each_axis_and_old_product_floor_still_reachable():
    new = blend_window((18, 160, 160))
    old = blend_window((18, 160, 160), floor="product")
    assert old.min() == pytest.approx(1e-3) and new.min() == pytest.approx(1e-9, rel=1e-5)
    # separable: every 1-D profile is floored, so the window is an outer product
    pz, py, px = new[:, 80, 80] / new[9, 80, 80], new[9, :, 80] / new[9, 80, 80], new[9, 80, :] / new[9, 80, 80]
    np.testing.assert_allclose(new, pz[:, None, None] * py[None, :, None] * px[None, None, :], rtol=1e-5)
    # on the face plane z = 0 the in-plane shape is kept (old: flat at the floor)
    np.testing.assert_allclose(new[0] / new[0].max(), new[9] / new[9].max(), rtol=1e-5)
    assert old[0].max() == old[0].min()


def test_blend_keeps_its_shape_at_volume_faces():
    """At the volume face z = 0 (covered only by the z-origin-0 patches) the blend weights the
    patches overlapping in y/x as in the interior: the z profile cancels. With the product floor
    every covering patch had the floor weight there and the blend was a plain average."""
    raw = _raw(9)
    w_new, w_old = blend_window(PATCH), blend_window(PATCH, floor="product")
    new = predict_region(_position_model, raw, (0, 0, 0), (0, 0, 0), VOL, PATCH, STRIDE, VOL, w_new)
    old = predict_region(_position_model, raw, (0, 0, 0), (0, 0, 0), VOL, PATCH, STRIDE, VOL, w_old)
    # explicit blend at z = 0 with the in-plane (y, x) window only
    plane = w_new[4] / w_new[4].max()
    num = np.zeros((3,) + VOL[1:])
    den = np.zeros(VOL[1:])
    avg_num, avg_den = np.zeros_like(num), np.zeros_like(den)
    for oy, ox in itertools.product(*[list(range(0, n - p, s)) + [n - p] for n, p, s in
                                      zip(VOL[1:], PATCH[1:], STRIDE[1:])]):
        sl = (slice(0, PATCH[0]), slice(oy, oy + PATCH[1]), slice(ox, ox + PATCH[2]))
        pred = _position_model((raw[sl] / 255.0)[None, None].astype(np.float32))[0][:, 0]
        num[:, sl[1], sl[2]] += plane * pred
        den[sl[1], sl[2]] += plane
        avg_num[:, sl[1], sl[2]] += pred
        avg_den[sl[1], sl[2]] += 1
    np.testing.assert_allclose(new[:, 0], num / den, atol=1e-5)
    # the old window averaged where patch corners met the face (all weights at the floor)
    core = (slice(None), slice(0, 1), slice(8, 82), slice(8, 82))
    assert np.abs(old[core][:, 0] - (avg_num / avg_den)[:, 8:82, 8:82]).max() < np.abs(
        new[core][:, 0] - (avg_num / avg_den)[:, 8:82, 8:82]).max()


def test_predict_region_matches_direct_weighted_average():
    """Whole-volume predict_region equals an explicit Σ w·p / Σ w over all grid patches."""
    raw = _raw(1)
    w = blend_window(PATCH, mode="gaussian").astype(np.float64)
    num = np.zeros((3,) + VOL)
    den = np.zeros(VOL)
    starts = [list(range(0, n - p, s)) + [n - p] for n, p, s in zip(VOL, PATCH, STRIDE)]
    for o in itertools.product(*starts):
        sl = tuple(slice(a, a + p) for a, p in zip(o, PATCH))
        pred = _position_model((raw[sl] / 255.0)[None, None].astype(np.float32))[0]
        num[(slice(None),) + sl] += w * pred
        den[sl] += w
    expected = num / den
    got = predict_region(_position_model, raw, (0, 0, 0), (0, 0, 0), VOL, PATCH, STRIDE, VOL,
                         blend_window(PATCH, mode="gaussian"), batch_size=7)
    assert got.dtype == np.float32 and got.shape == (3,) + VOL
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_position_independent_model_returns_its_input():
    raw = _raw(2)
    identity = lambda b: np.repeat(b, 3, axis=1)  # noqa: E731
    got = predict_region(identity, raw, (0, 0, 0), (0, 0, 0), VOL, PATCH, STRIDE, VOL, None)
    np.testing.assert_allclose(got, np.broadcast_to(raw / 255.0, (3,) + VOL), atol=1e-6)


@pytest.mark.parametrize("block", [(10, 45, 45), (7, 33, 40), (20, 17, 90), (3, 90, 29)])
def test_blockwise_equals_whole_deterministic(block):
    raw = _raw(3)
    whole = predict_region(_position_model, raw, (0, 0, 0), (0, 0, 0), VOL, PATCH, STRIDE, VOL,
                           blend_window(PATCH))
    tiled = _predict_tiled(_position_model, raw, block, batch_size=3)
    assert not np.isnan(tiled).any()
    np.testing.assert_allclose(tiled, whole, atol=1e-6, rtol=0)


def test_blockwise_equals_whole_rsunet():
    torch.manual_seed(0)
    model = build_rsunet(RSUNetConfig(filters=(4, 8, 8, 12), norm="group"))
    predictor = TorchPredictor(model, device="cpu")
    raw = _raw(4)
    whole = predict_region(predictor, raw, (0, 0, 0), (0, 0, 0), VOL, PATCH, STRIDE, VOL,
                           blend_window(PATCH), batch_size=8)
    assert whole.min() >= 0 and whole.max() <= 1 and whole.std() > 1e-3
    for block, batch_size in [((7, 33, 40), 3), ((20, 45, 30), 1)]:
        tiled = _predict_tiled(predictor, raw, block, batch_size=batch_size)
        # batches are never padded: a patch run alone may differ by ~1e-5 (TorchPredictor)
        np.testing.assert_allclose(tiled, whole, atol=1e-5, rtol=0)


def test_torch_predictor_result_independent_of_batch_grouping():
    torch.manual_seed(1)
    predictor = TorchPredictor(build_rsunet(RSUNetConfig(filters=(4, 8, 8, 12))), device="cpu")
    batch = np.random.default_rng(8).random((3, 1, 8, 32, 32), dtype=np.float32)
    together = predictor(batch)
    singles = np.concatenate([predictor(batch[i:i + 1]) for i in range(3)])
    assert singles.shape == together.shape == (3, 3, 8, 32, 32)
    # singles run at batch 1 (never padded): another CPU code path, equal to ~1e-5
    assert predictor.patches_evaluated == 6 and predictor.forward_calls == 4
    np.testing.assert_allclose(singles, together, atol=1e-5, rtol=0)


def test_predict_region_from_offset_raw_and_errors():
    raw = _raw(5)
    wb, we = (4, 30, 60), (12, 61, 90)
    rb, re = required_read_region(wb, we, PATCH, STRIDE, VOL)
    sub = raw[tuple(slice(a, b) for a, b in zip(rb, re))]
    whole = predict_region(_position_model, raw, (0, 0, 0), (0, 0, 0), VOL, PATCH, STRIDE, VOL, None)
    got = predict_region(_position_model, sub, rb, wb, we, PATCH, STRIDE, VOL, None)
    np.testing.assert_allclose(got, whole[:, 4:12, 30:61, 60:90], atol=1e-6, rtol=0)

    with pytest.raises(BlockwiseError, match="raw covers"):
        predict_region(_position_model, sub[:, 1:], rb, wb, we, PATCH, STRIDE, VOL, None)
    with pytest.raises(BlockwiseError, match="model_fn returned shape"):
        predict_region(lambda b: b, sub, rb, wb, we, PATCH, STRIDE, VOL, None)
    with pytest.raises(BlockwiseError, match="window must be positive"):
        predict_region(_position_model, sub, rb, wb, we, PATCH, STRIDE, VOL, np.zeros(PATCH, np.float32))


def test_to_uint8():
    prob = np.array([0.0, 0.5, 1.0, 1.2, -0.1, 0.998, 0.002, 0.25], dtype=np.float32)
    out = to_uint8(prob)
    assert out.dtype == np.uint8
    assert out.tolist() == [0, 128, 255, 255, 0, 254, 1, 64]
    assert to_uint8(np.ones((2, 3, 4))).shape == (2, 3, 4)
    with pytest.raises(BlockwiseError, match="NaN"):
        to_uint8(np.array([0.1, np.nan]))


class _Pointwise(nn.Module):
    """A 1x1x1 convolution: flip-equivariant, so test-time flips must not change its output."""

    def __init__(self, out_channels):
        super().__init__()
        self.conv = nn.Conv3d(1, out_channels, 1)

    def forward(self, x):
        return self.conv(x) * 4


def test_torch_predictor_activations_and_tta():
    torch.manual_seed(5)
    model = _Pointwise(3)
    batch = np.random.default_rng(6).random((2, 1, 4, 8, 8), dtype=np.float32)
    with torch.no_grad():
        logits = model(torch.from_numpy(batch))
    sig = TorchPredictor(model, device="cpu")(batch)
    assert sig.dtype == np.float32 and sig.shape == (2, 3, 4, 8, 8)
    np.testing.assert_allclose(sig, torch.sigmoid(logits).numpy(), atol=1e-6)
    soft = TorchPredictor(model, device="cpu", activation="softmax")(batch)
    np.testing.assert_allclose(soft.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(soft, torch.softmax(logits, 1).numpy(), atol=1e-6)
    tta = TorchPredictor(model, device="cpu", tta=True)(batch)
    np.testing.assert_allclose(tta, sig, atol=1e-6)
    # a model that is not flip-equivariant gives a different (averaged) result under TTA
    rsunet = build_rsunet(RSUNetConfig(filters=(4, 8), anisotropic_levels=1))
    b2 = np.random.default_rng(7).random((1, 1, 4, 16, 16), dtype=np.float32)
    plain = TorchPredictor(rsunet, device="cpu")(b2)
    flipped = TorchPredictor(rsunet, device="cpu", tta=True)(b2)
    assert not np.allclose(plain, flipped, atol=1e-4)
    with pytest.raises(BlockwiseError, match="activation"):
        TorchPredictor(model, device="cpu", activation="relu")
