"""RSUNet architecture and checkpoint save/load."""

import json
from dataclasses import asdict, dataclass

import pytest
import torch
from torch import nn

from cleftwise.models.checkpoint import (
    MODEL_REGISTRY,
    load_model,
    read_checkpoint_meta,
    register_model,
    save_checkpoint,
    weights_digest,
)
from cleftwise.models.errors import ModelError
from cleftwise.models.rsunet import RSUNetConfig, build_rsunet, check_patch_shape, input_divisibility

SMALL = dict(filters=(4, 8, 8, 12))


def _forward(model, shape):
    with torch.inference_mode():
        return model.eval()(torch.rand(shape))


def test_default_anisotropic_config_forward_3ch():
    torch.manual_seed(0)
    cfg = RSUNetConfig()  # filters (16, 32, 48, 64), 2 anisotropic levels
    assert cfg.level_kernel_sizes() == ((1, 3, 3), (1, 3, 3), (3, 3, 3), (3, 3, 3))
    assert cfg.level_down_factors() == ((1, 2, 2), (1, 2, 2), (2, 2, 2))
    assert cfg.input_kernel_size() == (1, 5, 5)
    model = build_rsunet(cfg)
    assert model.input_divisibility == (2, 8, 8)
    out = _forward(model, (1, 1, 18, 160, 160))
    assert out.shape == (1, 3, 18, 160, 160)
    assert torch.isfinite(out).all()
    assert out.std() > 0


@pytest.mark.parametrize("norm", ["group", "batch", "none"])
@pytest.mark.parametrize("upsample", ["trilinear", "transpose"])
def test_cleft_head_forward_small_patch(norm, upsample):
    torch.manual_seed(1)
    cfg = RSUNetConfig(out_channels=1, norm=norm, upsample=upsample, activation="relu", **SMALL)
    out = _forward(build_rsunet(cfg), (2, 1, 8, 64, 64))
    assert out.shape == (2, 1, 8, 64, 64)
    assert torch.isfinite(out).all()


def test_output_depends_on_input_and_batch_items_are_independent():
    torch.manual_seed(2)
    model = build_rsunet(RSUNetConfig(**SMALL)).eval()
    x = torch.rand(3, 1, 8, 32, 32)
    with torch.inference_mode():
        together = model(x)
        alone = model(x[1:2])
    assert torch.allclose(together[1:2], alone, atol=1e-5)
    assert not torch.allclose(together[0], together[2])


def test_isotropic_and_explicit_kernels():
    iso = RSUNetConfig(anisotropic_levels=0, filters=(4, 8, 12))
    assert iso.level_kernel_sizes() == ((3, 3, 3),) * 3
    assert iso.input_kernel_size() == (5, 5, 5)
    assert input_divisibility(iso) == (4, 4, 4)
    explicit = RSUNetConfig(filters=(4, 8, 12), kernel_sizes=((1, 3, 3), (3, 3, 3), (3, 3, 3)),
                            down_factors=((1, 2, 2), (1, 3, 3)))
    assert input_divisibility(explicit) == (1, 6, 6)
    out = _forward(build_rsunet(explicit), (1, 1, 5, 36, 36))
    assert out.shape == (1, 3, 5, 36, 36)


def test_divisibility_error_names_axis_and_factor():
    cfg = RSUNetConfig(**SMALL)
    check_patch_shape(cfg, (8, 64, 64))
    with pytest.raises(ModelError, match=r"\(9, 64, 64\).*\(2, 8, 8\) along z"):
        check_patch_shape(cfg, (9, 64, 64))
    with pytest.raises(ModelError, match="along y, x"):
        check_patch_shape(cfg, (8, 60, 68))
    model = build_rsunet(cfg).eval()
    with pytest.raises(ModelError, match="not divisible"):
        model(torch.rand(1, 1, 8, 64, 60))
    with pytest.raises(ModelError, match=r"expected input \(B, 1"):
        model(torch.rand(1, 2, 8, 64, 64))


def test_config_roundtrip_and_validation():
    cfg = RSUNetConfig(filters=(8, 16), anisotropic_levels=1, norm="group", upsample="trilinear",
                       down_factors=((1, 2, 2),))
    data = json.loads(json.dumps(cfg.to_dict()))
    assert RSUNetConfig.from_dict(data) == cfg
    with pytest.raises(ModelError, match="unknown keys.*'filterz'"):
        RSUNetConfig.from_dict({"filterz": [1, 2]})
    with pytest.raises(ModelError, match="norm"):
        RSUNetConfig(norm="layer")
    with pytest.raises(ModelError, match="anisotropic_levels"):
        RSUNetConfig(filters=(4, 8), anisotropic_levels=3)
    with pytest.raises(ModelError, match="down_factors"):
        RSUNetConfig(filters=(4, 8), down_factors=((1, 2, 2), (2, 2, 2)))
    with pytest.raises(ModelError, match="kernel_sizes"):
        RSUNetConfig(filters=(4, 8), kernel_sizes=((1, 2, 2), (3, 3, 3)))


# ---------------------------------------------------------------- checkpoints


def _trained_like(cfg):
    """A model whose BatchNorm running statistics differ from their initial values."""
    torch.manual_seed(3)
    model = build_rsunet(cfg)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(2, 1, 8, 32, 32))
    return model.eval()


def test_checkpoint_roundtrip_identical_outputs(tmp_path):
    cfg = RSUNetConfig(**SMALL)
    model = _trained_like(cfg)
    meta = save_checkpoint(tmp_path / "ckpt" / "model.pt", model, cfg, voxel_size=(40, 4, 4),
                           extra={"run": "unit-test"})
    assert meta.weights_path.is_file() and meta.json_path.name == "model.json"
    doc = json.loads(meta.json_path.read_text())
    assert doc["model_type"] == "rsunet" and doc["voxel_size"] == [40, 4, 4]
    assert doc["config"]["filters"] == [4, 8, 8, 12]
    assert doc["weights_sha256"] == weights_digest(meta.weights_path) == meta.weights_sha256

    loaded, lmeta = load_model(tmp_path / "ckpt" / "model.json", device="cpu")
    assert not loaded.training
    assert lmeta.config == cfg and lmeta.voxel_size == (40, 4, 4) and lmeta.extra == {"run": "unit-test"}
    assert lmeta.out_channels == 3  # attribute reads fall through to the config
    assert lmeta.weights_sha256 == meta.weights_sha256
    x = torch.rand(2, 1, 8, 32, 32)
    with torch.inference_mode():
        assert torch.equal(model(x), loaded(x))


def test_checkpoint_architecture_mismatch_names_key(tmp_path):
    cfg = RSUNetConfig(**SMALL)
    meta = save_checkpoint(tmp_path / "m.pt", build_rsunet(cfg), cfg, voxel_size=(40, 4, 4))
    doc = json.loads(meta.json_path.read_text())
    doc["config"]["filters"] = [6, 8, 8, 12]
    meta.json_path.write_text(json.dumps(doc))
    with pytest.raises(ModelError, match=r"m\.pt.*shape mismatches.*conv_in\.0\.weight"):
        load_model(tmp_path / "m.pt", device="cpu")

    doc["config"]["filters"] = [4, 8, 8]  # one level fewer: the file has unexpected keys
    meta.json_path.write_text(json.dumps(doc))
    with pytest.raises(ModelError, match=r"unexpected keys.*encoder\.3\."):
        load_model(tmp_path / "m.pt", device="cpu")


def test_checkpoint_replaced_weights_and_missing_files(tmp_path):
    cfg = RSUNetConfig(**SMALL)
    save_checkpoint(tmp_path / "m.pt", build_rsunet(cfg), cfg, voxel_size=(40, 4, 4))
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    del state["conv_out.bias"]
    torch.save(state, tmp_path / "m.pt")
    with pytest.raises(ModelError, match="sha256"):
        load_model(tmp_path / "m.pt", device="cpu")
    with pytest.raises(ModelError, match=r"missing keys.*conv_out\.bias"):
        load_model(tmp_path / "m.pt", device="cpu", verify_digest=False)

    (tmp_path / "m.pt").unlink()
    with pytest.raises(ModelError, match=r"weights not found: .*m\.pt"):
        load_model(tmp_path / "m.json", device="cpu")
    with pytest.raises(ModelError, match=r"not found: .*absent\.json"):
        load_model(tmp_path / "absent.pt")
    with pytest.raises(ModelError, match=r"weights not found: .*absent\.pt"):
        weights_digest(tmp_path / "absent.pt")


@dataclass
class _TinyConfig:
    features: int = 5
    classes: int = 2

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        return cls(**d)


def test_registry_serves_other_model_families(tmp_path):
    register_model("tiny_test", _TinyConfig, lambda c: nn.Linear(c.features, c.classes))
    try:
        cfg = _TinyConfig(features=7, classes=3)
        torch.manual_seed(4)
        model = nn.Linear(7, 3)
        meta = save_checkpoint(tmp_path / "tiny", model, cfg, voxel_size=(8, 8, 8))
        assert meta.model_type == "tiny_test" and meta.weights_path.name == "tiny.pt"
        assert read_checkpoint_meta(tmp_path / "tiny").config == cfg
        loaded, _ = load_model(tmp_path / "tiny", device="cpu")
        x = torch.rand(4, 7)
        assert torch.equal(loaded(x), model(x))
        with pytest.raises(ModelError, match="already registered"):
            register_model("tiny_test", _TinyConfig, lambda c: nn.Linear(1, 1))
    finally:
        MODEL_REGISTRY.pop("tiny_test", None)
