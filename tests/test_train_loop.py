"""The training loop: learning, exact resume, bad configs, export and the CLI (CPU, tiny volumes)."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from cleftwise.postprocess.predict import PredictConfig, PredictStep
from cleftwise.blockwise.runner import BackendConfig, run_task
from cleftwise.models.checkpoint import load_model, read_checkpoint_meta
from cleftwise.models.rsunet import build_rsunet
from cleftwise.storage.volume import create_volume, open_volume
from cleftwise.train.data import PatchDataset, make_loader, open_sources
from cleftwise.train.errors import TrainError
from cleftwise.train.loop import export_weights, latest_checkpoint, parse_train_config, train, validate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (16, 96, 96)
PATCH = [8, 48, 48]


def _boxes(seed: int):
    """Raw with dark (pre) / bright (post) box pairs on noise, and their polarity channels."""
    rng = np.random.default_rng(seed)
    raw = rng.normal(128, 20, SHAPE).clip(0, 255).astype(np.uint8)
    pol = np.zeros((3,) + SHAPE, np.uint8)
    for _ in range(8):
        z, y, x = rng.integers(0, 12), rng.integers(0, 80), rng.integers(0, 80)
        pol[0, z:z + 4, y:y + 12, x:x + 6] = 1
        pol[1, z:z + 4, y:y + 12, x + 6:x + 12] = 1
        raw[z:z + 4, y:y + 12, x:x + 6] = 40
        raw[z:z + 4, y:y + 12, x + 6:x + 12] = 215
    pol[2] = pol[0] | pol[1]
    return raw, pol


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    d = tmp_path_factory.mktemp("trainvols")
    out = {}
    for name, seed in (("train", 1), ("val", 2)):
        raw, pol = _boxes(seed)
        r = create_volume(str(d / f"{name}.zarr/raw"), shape=SHAPE, voxel_size=(40, 4, 4), dtype="uint8")
        r.write(r.roi, raw)
        p = create_volume(str(d / f"{name}.zarr/polarity"), shape=SHAPE, voxel_size=(40, 4, 4),
                          dtype="uint8", num_channels=3)
        p.write(p.roi, pol)
        out[name] = {"raw": r.url, "labels": p.url}
    out["dir"] = d
    return out


def _cfg(volumes, run_dir, **over):
    data = dict(train=[volumes["train"]], val=[volumes["val"]], patch_shape=PATCH, batch_size=2,
                reject=dict(min_foreground=200), val_patches=4)
    data.update(over.pop("data", {}))
    cfg = dict(run_dir=str(run_dir), max_steps=6, seed=4,
               model=dict(filters=[4, 8], anisotropic_levels=1, norm="group"),
               data=data, optim=dict(lr=3e-3, warmup_steps=2), log_every=1, val_every=3,
               checkpoint_every=100, threads=2)
    cfg.update(over)
    return cfg


def test_training_reduces_the_loss(volumes, tmp_path):
    cfg = parse_train_config(_cfg(volumes, tmp_path / "run", max_steps=30, ema_decay=0.0,
                                  optim=dict(lr=5e-3, warmup_steps=3), val_every=30))
    torch.manual_seed(cfg.seed)
    val_ds = PatchDataset(open_sources(cfg.data.val, cfg.data, "val"), cfg.data, seed=0, augment=False)
    batches = [{"raw": b["raw"], "target": b["target"]}
               for b in make_loader(val_ds, batch_size=2, count=4)]
    before = validate(build_rsunet(cfg.model), batches, cfg, torch.device("cpu"))
    result = train(cfg)
    after = validate(result["model"], batches, cfg, torch.device("cpu"))
    assert after["val_loss"] < 0.8 * before["val_loss"], (before, after)
    assert after["val_f1"] > before["val_f1"]
    with open(tmp_path / "run" / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, 31))
    assert np.mean([float(r["loss"]) for r in rows[-5:]]) < np.mean([float(r["loss"]) for r in rows[:5]])
    assert os.path.getsize(tmp_path / "run" / "curves.png") > 1000
    assert os.path.exists(tmp_path / "run" / "best.pt")


def test_resume_equals_uninterrupted_training(volumes, tmp_path):
    full = train(parse_train_config(_cfg(volumes, tmp_path / "full")))
    first = train(parse_train_config(_cfg(volumes, tmp_path / "split")), stop_at=3)
    assert first["step"] == 3 and first["stopped"] == "stop_at"
    assert latest_checkpoint(str(tmp_path / "split")).endswith("step_0000003.pt")
    # the resumed half loads its batches in a worker process: same items, same order
    resumed = train(parse_train_config(_cfg(volumes, tmp_path / "split", data=dict(num_workers=1))),
                    resume=True)
    assert resumed["step"] == 6
    for name in ("model", "ema_model"):
        a, b = full[name].state_dict(), resumed[name].state_dict()
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}.{k} differs after resume"
    assert full["last_val"] == resumed["last_val"]

    def losses(run):
        with open(tmp_path / run / "log.csv") as f:
            return [(r["step"], r["loss"], r["val_loss"]) for r in csv.DictReader(f)]

    assert losses("full") == losses("split")
    with pytest.raises(TrainError, match="already holds checkpoints"):
        train(parse_train_config(_cfg(volumes, tmp_path / "split")))


def test_bad_configs_raise_train_error(volumes, tmp_path):
    with pytest.raises(TrainError, match=r"patch \(32, 48, 48\).*larger than"):
        train(parse_train_config(_cfg(volumes, tmp_path / "a", data=dict(patch_shape=[32, 48, 48]))))
    bad_vs = create_volume(str(tmp_path / "x.zarr/polarity"), shape=SHAPE, voxel_size=(40, 8, 8),
                           dtype="uint8", num_channels=3)
    spec = dict(raw=volumes["train"]["raw"], labels=bad_vs.url)
    with pytest.raises(TrainError, match=r"voxel size mismatch.*raw .*\(40, 4, 4\).*\(40, 8, 8\)"):
        train(parse_train_config(_cfg(volumes, tmp_path / "b", data=dict(train=[spec]))))
    spec = dict(raw=volumes["train"]["raw"], labels=str(tmp_path / "x.zarr/nothing_here"))
    with pytest.raises(TrainError, match=r"cannot open labels dataset .*nothing_here"):
        train(parse_train_config(_cfg(volumes, tmp_path / "c", data=dict(train=[spec]))))
    with pytest.raises(TrainError, match="out_channels is 1 but target 'polarity' needs 3"):
        parse_train_config(_cfg(volumes, tmp_path / "d", model=dict(filters=[4, 8], out_channels=1)))
    with pytest.raises(TrainError, match="not divisible"):
        parse_train_config(_cfg(volumes, tmp_path / "e", data=dict(patch_shape=[8, 49, 48])))
    with pytest.raises(TrainError, match="unknown key.*learning_rate"):
        parse_train_config(_cfg(volumes, tmp_path / "f", optim=dict(learning_rate=1.0)))


def test_export_then_predict_and_cli(volumes, tmp_path):
    cfg = _cfg(volumes, tmp_path / "run")
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "weights" / "model.pt"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "launch", "train_rsunet.py"), "--config",
                           str(path), "--max-steps", "3", "--device", "cpu", "--export", str(out)],
                          capture_output=True, text=True, cwd=str(tmp_path), timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["step"] == 3 and summary["exported"] == str(out)
    meta = read_checkpoint_meta(out)
    assert meta.extra["patch_shape"] == PATCH and meta.extra["channels"] == ["pre", "post", "union"]
    assert list(meta.voxel_size) == [40, 4, 4]
    model, _ = load_model(out, device="cpu")
    state = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    for k, v in model.state_dict().items():   # the exported weights are the best EMA weights
        assert torch.equal(v, state["ema"][k])
    pred_url = str(tmp_path / "pred.zarr" / "pred")
    task = PredictStep(PredictConfig(input=volumes["val"]["raw"], output=pred_url, checkpoint=str(out),
                                     block_shape=SHAPE, device="cpu"))
    assert task.patch == tuple(PATCH)
    run_task(task, BackendConfig(progress=False))
    assert open_volume(pred_url).shape == (3,) + SHAPE
    # a bad config through the CLI: exit code 2 and the reason on stderr
    bad = dict(cfg, data=dict(cfg["data"], patch_shape=[32, 48, 48]))
    path.write_text(yaml.safe_dump(bad))
    proc = subprocess.run([sys.executable, os.path.join(REPO, "launch", "train_rsunet.py"), "--config",
                           str(path), "--overwrite"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "larger than" in proc.stderr
    with pytest.raises(TrainError, match="no best checkpoint"):
        export_weights(str(tmp_path / "empty"), str(tmp_path / "x.pt"))


def test_loss_balancing_and_side_term():
    from cleftwise.train.losses import LossConfig, balanced_pos_weight, compute_loss, side_loss

    target = torch.zeros(1, 3, 1, 2, 5)
    target[0, 0, 0, 0, :2] = 1          # 2 pre voxels
    target[0, 1, 0, 0, 2:4] = 1         # 2 post voxels
    target[0, 2] = target[0, 0] + target[0, 1]
    torch.testing.assert_close(balanced_pos_weight(target, 10.0), torch.tensor([4.0, 4.0, 1.5]))
    torch.testing.assert_close(balanced_pos_weight(target, 3.0), torch.tensor([3.0, 3.0, 1.5]))
    logits = torch.zeros(1, 3, 1, 2, 5)
    logits[0, 0, 0, 0, :4] = torch.tensor([2.0, 0.0, 0.0, 1.0])   # pre − post = 2, 0, 0, 1
    d = torch.tensor([2.0, 0.0, 0.0, 1.0])
    y = torch.tensor([1.0, 1.0, 0.0, 0.0])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(d, y)
    torch.testing.assert_close(side_loss(logits, target, exclusive=False), expected)
    # exclusive form: classes 1 pre / 2 post, logits (background, pre, post)
    classes = torch.zeros(1, 1, 2, 5, dtype=torch.int64)
    classes[0, 0, 0, :2], classes[0, 0, 0, 2:4] = 1, 2
    ex = torch.zeros(1, 3, 1, 2, 5)
    ex[0, 1, 0, 0, :4] = d
    torch.testing.assert_close(side_loss(ex, classes, exclusive=True), expected)
    total, parts = compute_loss(logits, target, LossConfig(pos_weight=None, side_weight=2.0), exclusive=False)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    torch.testing.assert_close(total, bce + 2.0 * expected)
    assert np.isnan(parts["dice"]) and parts["side"] == pytest.approx(float(expected))


def test_init_weights_starts_from_an_exported_model(volumes, tmp_path):
    first = train(parse_train_config(_cfg(volumes, tmp_path / "a", max_steps=3)))
    out = str(tmp_path / "w" / "m.pt")
    export_weights(str(tmp_path / "a"), out)
    src, _ = load_model(out, device="cpu")
    # lr ~ 0: the fine-tuning run keeps the weights it started from, not a fresh initialisation
    cfg = _cfg(volumes, tmp_path / "b", max_steps=1, init_weights=out, ema_decay=0.0,
               optim=dict(lr=1e-12, warmup_steps=0, weight_decay=0.0))
    tuned = train(parse_train_config(cfg))["model"]
    for k, v in src.state_dict().items():
        torch.testing.assert_close(tuned.state_dict()[k], v, rtol=0, atol=1e-6)
    fresh = build_rsunet(parse_train_config(cfg).model)
    assert any(not torch.allclose(fresh.state_dict()[k], v) for k, v in src.state_dict().items()
               if v.is_floating_point())
    assert first["step"] == 3
    other = dict(cfg, run_dir=str(tmp_path / "c"), model=dict(filters=[4, 8, 8], anisotropic_levels=1, norm="group"))
    with pytest.raises(TrainError, match="init_weights .*architecture"):
        train(parse_train_config(other))
    with pytest.raises(TrainError, match="init_weights"):
        train(parse_train_config(dict(cfg, run_dir=str(tmp_path / "d"), init_weights=str(tmp_path / "none.pt"))))


def test_auxiliary_mask_channels(volumes, tmp_path):
    """data.aux adds one 0/1 target channel per mask after the target's; the loss adds their BCE;
    validation scores the target's channels only; init_weights may grow the output layer."""
    from cleftwise.train.losses import LossConfig, compute_loss

    d = volumes["dir"]
    raw = open_volume(volumes["train"]["raw"])
    dark = raw.read(raw.roi) < 60
    masks = {}
    for name, m in (("dark", dark), ("left", np.zeros(SHAPE, bool))):
        if name == "left":
            m[:, :, :40] = True
        v = create_volume(str(d / f"aux_{name}.zarr/m"), shape=SHAPE, voxel_size=(40, 4, 4), dtype="uint8",
                          overwrite=True)
        v.write(v.roi, m.astype(np.uint8) * 255)
        masks[name] = (v.url, m)
    aux = {name: url for name, (url, _) in masks.items()}
    vols = {"train": dict(volumes["train"], aux=aux), "val": dict(volumes["val"], aux=aux)}
    model = dict(filters=[4, 8], anisotropic_levels=1, norm="group", out_channels=3)
    cfg = parse_train_config(_cfg(vols, tmp_path / "aux", model=model,
                                  data=dict(train=[vols["train"]], val=[vols["train"]], target="cleft",
                                            aux=["dark", "left"])))
    ds = PatchDataset(open_sources(cfg.data.val, cfg.data, "val"), cfg.data, seed=0, augment=False)
    for i in range(3):
        item = ds.sample(i)
        assert item["target"].shape == (3, *PATCH)
        z, y, x = (int(v) for v in item["begin"])
        for c, name in ((1, "dark"), (2, "left")):
            want = masks[name][1][z:z + PATCH[0], y:y + PATCH[1], x:x + PATCH[2]]
            np.testing.assert_array_equal(item["target"][c], want.astype(np.float32))

    # the loss: the target's terms on channel 0 plus aux_weight x BCE of the mask channels
    logits = torch.randn(2, 3, 4, 6, 6)
    target = (torch.rand(2, 3, 4, 6, 6) > 0.7).float()
    lc = LossConfig(dice_weight=0.5, aux_weight=0.25)
    total, parts = compute_loss(logits, target, lc, False, n_aux=2)
    main, _ = compute_loss(logits[:, :1], target[:, :1], lc, False)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 1:], target[:, 1:])
    torch.testing.assert_close(total, main + 0.25 * bce)
    assert parts["aux"] == pytest.approx(float(bce))

    # fine-tuning a 1-channel cleft model into a 3-channel one keeps its cleft head row
    one = _cfg(volumes, tmp_path / "one", max_steps=2,
               model=dict(filters=[4, 8], anisotropic_levels=1, norm="group", out_channels=1),
               data=dict(train=[vols["train"]], val=[vols["val"]], target="cleft"))
    train(parse_train_config(one))
    out = str(tmp_path / "w1" / "m.pt")
    export_weights(str(tmp_path / "one"), out)
    src, _ = load_model(out, device="cpu")
    three = _cfg(vols, tmp_path / "three", max_steps=1, init_weights=out, ema_decay=0.0, model=model,
                 optim=dict(lr=1e-12, warmup_steps=0, weight_decay=0.0),
                 data=dict(train=[vols["train"]], val=[vols["val"]], target="cleft", aux=["dark", "left"]))
    result = train(parse_train_config(three))
    tuned = result["model"].state_dict()
    for k, v in src.state_dict().items():
        got = tuned[k][:1] if k.startswith("conv_out") else tuned[k]  # the source has one row
        torch.testing.assert_close(got, v, rtol=0, atol=1e-6)
    val = validate(result["model"], [{"raw": b["raw"], "target": b["target"]}
                                     for b in make_loader(ds, batch_size=2, count=2)],
                   parse_train_config(three), torch.device("cpu"))
    assert np.isfinite(val["val_loss"]) and 0 <= val["val_f1"] <= 1
    # ... but a model cannot lose output channels
    back = dict(one, run_dir=str(tmp_path / "back"))
    three_out = str(tmp_path / "w3" / "m.pt")
    export_weights(str(tmp_path / "three"), three_out, keep_aux=True)
    assert read_checkpoint_meta(three_out).extra["channels"] == ["cleft", "dark", "left"]
    # by default the auxiliary channels are cut: the cleft channel computes exactly what it did
    cut = str(tmp_path / "w3" / "cut.pt")
    export_weights(str(tmp_path / "three"), cut)
    cut_meta = read_checkpoint_meta(cut)
    assert cut_meta.config.out_channels == 1 and cut_meta.extra["channels"] == ["cleft"]
    assert cut_meta.extra["aux_channels_trained"] == ["dark", "left"]
    full_model, _ = load_model(three_out, device="cpu")
    cut_model, _ = load_model(cut, device="cpu")
    x = torch.rand(1, 1, *PATCH)
    with torch.no_grad():
        torch.testing.assert_close(cut_model(x), full_model(x)[:, :1])
    with pytest.raises(TrainError, match="only more output channels"):
        train(parse_train_config(dict(back, init_weights=three_out)))

    # bad configs: a volume without a named mask; aux with the softmax target; channel count
    with pytest.raises(TrainError, match=r"data.aux names \['left'\]"):
        parse_train_config(_cfg(volumes, tmp_path / "x", model=model, data=dict(
            train=[dict(volumes["train"], aux={"dark": aux["dark"]})], target="cleft", aux=["dark", "left"])))
    with pytest.raises(TrainError, match="exclusive"):
        parse_train_config(_cfg(vols, tmp_path / "x", data=dict(target="exclusive", aux=["dark"])))
    with pytest.raises(TrainError, match=r"out_channels is 3 but target 'cleft' with aux channels \['dark'\] needs 2"):
        parse_train_config(_cfg(vols, tmp_path / "x", data=dict(target="cleft", aux=["dark"])))
