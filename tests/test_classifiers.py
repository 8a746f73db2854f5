"""Synapse classifiers: shapes, configs, checkpoint round trips, clear errors."""

import numpy as np
import pytest
import torch

from cleftwise.models.checkpoint import load_model, read_checkpoint_meta, save_checkpoint
from cleftwise.models.classifiers import (ResNet2D, ResNet2DConfig, ResNet3D, ResNet3DConfig, VGG3D, VGG3DConfig,
                                build_classifier, classifier_config, prepare_input)
from cleftwise.models.errors import ModelError

TINY = {
    "vgg3d": VGG3DConfig(input_shape=(4, 32, 32), fmaps=(4, 8), down_factors=((1, 2, 2), (2, 2, 2)),
                         anisotropic_levels=1, fc=(16,), num_classes=3),
    "resnet3d": ResNet3DConfig(input_shape=(4, 32, 32), stem_channels=4, filters=(4, 8), blocks=(1, 1),
                               strides=((1, 1, 1), (2, 2, 2)), anisotropic_stages=1, num_classes=3),
    "resnet2d": ResNet2DConfig(depth=18, width=4, input_shape=(4, 32, 32), in_channels=3, num_classes=3,
                               stem="small"),
}


@pytest.mark.parametrize("kind", sorted(TINY))
@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_forward_shape_and_backward(kind, norm):
    torch.manual_seed(0)
    cfg = type(TINY[kind]).from_dict({**TINY[kind].to_dict(), "norm": norm, "group_norm_groups": 2})
    model = build_classifier(kind, cfg)
    x = torch.rand(5, 1, 4, 32, 32)
    out = model(x)
    assert out.shape == (5, 3)
    out.sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    if norm == "group":
        assert any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())
        assert not any(isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)) for m in model.modules())


@pytest.mark.parametrize("kind", sorted(TINY))
def test_config_round_trip_and_unknown_key(kind):
    cfg = TINY[kind]
    again = type(cfg).from_dict(cfg.to_dict())
    assert again == cfg
    with pytest.raises(ModelError, match="unknown keys.*'widht'"):
        type(cfg).from_dict({**cfg.to_dict(), "widht": 3})
    with pytest.raises(ModelError, match="unknown classifier"):
        classifier_config("vgg9d", {})


def test_input_shape_mismatch_is_a_clear_error():
    model = build_classifier("vgg3d", TINY["vgg3d"])
    with pytest.raises(ModelError, match=r"expects input \(N, 1, 4, 32, 32\).*\(2, 1, 8, 32, 32\)"):
        model(torch.rand(2, 1, 8, 32, 32))
    r3 = build_classifier("resnet3d", TINY["resnet3d"])
    with pytest.raises(ModelError, match="ResNet3D expects"):
        r3(torch.rand(2, 1, 4, 16, 32))


def test_invalid_configs_raise():
    with pytest.raises(ModelError, match="not divisible"):
        VGG3DConfig(input_shape=(5, 32, 32), fmaps=(4, 8), down_factors=((1, 2, 2), (2, 2, 2)))
    with pytest.raises(ModelError, match="num_classes"):
        VGG3DConfig(num_classes=1)
    with pytest.raises(ModelError, match="norm"):
        ResNet3DConfig(norm="layer")
    with pytest.raises(ModelError, match="depth"):
        ResNet2DConfig(depth=20)
    with pytest.raises(ModelError, match="in_channels"):
        ResNet2DConfig(in_channels=3, input_shape=(1, 32, 32))


def test_resnet2d_uses_the_centre_sections():
    torch.manual_seed(1)
    model = ResNet2D(TINY["resnet2d"]).eval()
    cube = torch.rand(3, 1, 4, 32, 32)
    sections = cube[:, 0, 0:3]  # (4 - 3) // 2 = 0 → sections 0, 1, 2
    with torch.no_grad():
        assert torch.equal(model(cube), model(sections))
    single = ResNet2D(ResNet2DConfig(depth=18, width=4, input_shape=(5, 16, 16), stem="small")).eval()
    cube = torch.rand(2, 1, 5, 16, 16)
    with torch.no_grad():
        assert torch.equal(single(cube), single(cube[:, :, 2]))


def test_resnet2d_50_and_imagenet_stem():
    cfg = ResNet2DConfig(depth=50, width=4, input_shape=(1, 64, 64), norm="group", group_norm_groups=4)
    model = ResNet2D(cfg)
    assert model(torch.rand(2, 1, 1, 64, 64)).shape == (2, 2)
    assert model.fc.in_features == 4 * 8 * 4  # width · 2^3 · bottleneck expansion


@pytest.mark.parametrize("kind", sorted(TINY))
def test_checkpoint_round_trip_by_model_type(tmp_path, kind):
    torch.manual_seed(2)
    model = build_classifier(kind, TINY[kind]).eval()
    x = torch.rand(3, 1, 4, 32, 32)
    save_checkpoint(tmp_path / "clf", model, TINY[kind], (40, 4, 4), extra={"classes": ["A", "B", "C"]})
    meta = read_checkpoint_meta(tmp_path / "clf.json")
    assert meta.model_type == kind and meta.extra["classes"] == ["A", "B", "C"]
    loaded, meta = load_model(tmp_path / "clf.pt", device="cpu")
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_checkpoint_architecture_mismatch_is_named(tmp_path):
    model = build_classifier("vgg3d", TINY["vgg3d"])
    save_checkpoint(tmp_path / "clf", model, TINY["vgg3d"], (40, 4, 4))
    # a JSON that says another architecture than the weights hold
    import json

    js = json.loads((tmp_path / "clf.json").read_text())
    js["config"]["fmaps"] = [4, 16]
    (tmp_path / "clf.json").write_text(json.dumps(js))
    with pytest.raises(ModelError, match="does not match its JSON architecture"):
        load_model(tmp_path / "clf.pt")


def test_vgg_input_pool_reduces_features():
    cfg = VGG3DConfig(input_shape=(4, 32, 32), input_pool=(1, 2, 2), fmaps=(4, 8),
                      down_factors=((1, 2, 2), (2, 2, 2)), fc=())
    assert cfg.feature_shape() == (2, 4, 4)
    assert VGG3D(cfg)(torch.rand(1, 1, 4, 32, 32)).shape == (1, 2)


def test_prepare_input_scaling():
    u8 = np.array([[[[0, 255]]]], dtype=np.uint8)
    t = prepare_input(u8)
    assert t.shape == (1, 1, 1, 1, 2) and t.dtype == torch.float32
    assert t.flatten().tolist() == [0.0, 1.0]
    u16 = np.full((1, 1, 1, 1), 65535, np.uint16)
    assert prepare_input(u16).item() == 1.0
    with pytest.raises(ModelError, match="cubes"):
        prepare_input(np.zeros((2, 3)))
    with pytest.raises(ModelError, match="dtype"):
        prepare_input(np.zeros((1, 1, 1, 1), np.int32))
