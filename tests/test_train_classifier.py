"""Classifier training and evaluation: learns on held-out neurons, resumes exactly, clear errors."""

import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from cleftwise.models.checkpoint import load_model, read_checkpoint_meta
from cleftwise.storage.volume import create_volume
from cleftwise.train.cubes import CubeDataConfig, SourceSpec, build_cube_sets
from cleftwise.train.errors import TrainError
from cleftwise.train.evaluate_classifier import (accuracy_vs_synapses, choose_threshold, evaluate_sets,
                                       export_classifier, neuron_table, synapse_metrics, write_report)
from cleftwise.train.augment import CubeAugmentConfig
from cleftwise.train.loop import load_train_config
from cleftwise.train.train_classifier import (ClassifierTrainConfig, LossConfig, augment_batch, batch_indices,
                                              classification_loss, load_classifier_config,
                                              parse_classifier_config, train_classifier)
from cleftwise.storage.config_io import to_dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUBE = (4, 16, 16)


def _toy_volume(tmp_path, seed=0, n_neurons=48):
    """Noisy volume with planted synapses: a dark band through the centre, 3 px thick for E and
    1 px for I (like a thick vs thin postsynaptic density), horizontal or vertical at random.
    Each neuron has one class (Dale) and 2–8 synapses on a grid."""
    rng = np.random.default_rng(seed)
    shape = (24, 176, 176)
    raw = rng.normal(140, 22, shape).clip(0, 255)
    grid = [(z, y, x) for z in range(3, 24, 6) for y in range(10, 176, 20) for x in range(10, 176, 20)]
    order = rng.permutation(len(grid))
    rows, k = [], 0
    for nid in range(1, n_neurons + 1):
        label = "E" if rng.random() < 0.6 else "I"
        for _ in range(int(rng.integers(2, 9))):
            if k >= len(order):
                break
            z, y, x = grid[order[k]]
            k += 1
            half = 1 if label == "E" else 0
            length = int(rng.integers(5, 8))
            zs = slice(max(z - 1, 0), z + 2)
            if rng.random() < 0.5:
                raw[zs, y - half:y + half + 1, x - length:x + length] = rng.normal(45, 10)
            else:
                raw[zs, y - length:y + length, x - half:x + half + 1] = rng.normal(45, 10)
            rows.append((len(rows) + 1, z, y, x, nid, label))
    vol = create_volume(str(tmp_path / "toy.zarr" / "raw"), shape=shape, voxel_size=(40, 4, 4),
                        dtype="uint8", chunk_shape=(8, 64, 64))
    vol.write(vol.roi, raw.astype(np.uint8))
    df = pd.DataFrame(rows, columns=["id", "vz", "vy", "vx", "pre_neuron", "ei_label"])
    for ax, v in zip("zyx", (40, 4, 4)):
        df[ax] = (df[f"v{ax}"] + 0.5) * v
    df.to_csv(tmp_path / "toy.csv", index=False)
    return vol.url, str(tmp_path / "toy.csv"), df


def _config(tmp_path, raw, table, **over):
    d = {"run_dir": str(tmp_path / "run"), "seed": 3,
         "data": {"sources": [{"raw": raw, "synapses": table, "name": "toy"}], "cube_shape": list(CUBE),
                  "margin": [0, 2, 2], "split_fractions": [0.5, 0.25, 0.25], "split_seed": 1},
         "model_type": "vgg3d",
         "model": {"fmaps": [4, 8], "down_factors": [[1, 2, 2], [2, 2, 2]], "anisotropic_levels": 1,
                   "fc": [16], "dropout": 0.1},
         "batch_size": 16, "max_steps": 120, "lr": 3e-3, "warmup_steps": 10, "val_every": 20,
         "checkpoint_every": 20, "patience": 0, "ema_decay": 0.9, "threads": 1, "log_every": 10}
    for k, v in over.items():
        d[k] = v
    return parse_classifier_config(d)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("toy")
    return tmp, *_toy_volume(tmp)


def test_training_beats_chance_on_held_out_neurons(toy):
    tmp, raw, table, df = toy
    torch.set_num_threads(1)
    cfg = _config(tmp, raw, table)
    res = train_classifier(cfg)
    assert res.stopped == "finished" and res.step == 120
    sets = build_cube_sets(cfg.data, splits=("val", "test"))
    train_neurons = set(json.load(open(cfg.data.split_file))["splits"]["train"])
    assert not train_neurons & set(sets["test"].neurons.tolist())
    model, meta = load_model(res.best_path, device="cpu")
    assert meta.extra["classes"] == ["E", "I"] and meta.extra["cube_shape"] == list(CUBE)
    report = evaluate_sets(model, sets["val"], sets["test"], ("E", "I"), CUBE, batch_size=32, tta=True)
    # chance is 0.5; a tiny model after 120 steps must clear it by a wide margin
    assert report["test"]["balanced_accuracy"] >= 0.80, report["test"]
    assert report["test"]["roc_auc"] >= 0.85
    files = write_report(report, str(tmp / "report"), prefix="toy")
    for f in [files["json"], files["markdown"], *files["figures"]]:
        assert os.path.getsize(f) > 0
    assert len(files["figures"]) == 4
    saved = json.load(open(files["json"]))
    assert saved["test"]["n"] == len(sets["test"]) and "threshold" in saved
    out = export_classifier(res.best_path, str(tmp / "export" / "clf.pt"), report["threshold"],
                            {"test_balanced_accuracy": report["test"]["balanced_accuracy"]})
    assert read_checkpoint_meta(out).extra["threshold"] == report["threshold"]


def test_resume_equals_uninterrupted(toy):
    tmp, raw, table, _ = toy
    torch.set_num_threads(1)
    over = dict(max_steps=12, val_every=4, checkpoint_every=5, batch_size=8,
                augment={"mixup_alpha": 0.4, "mixup_p": 0.5})
    a = _config(tmp / "a", raw, table, **over)
    train_classifier(a)
    b = _config(tmp / "b", raw, table, **over)
    first = train_classifier(b, stop_at=7)
    assert first.stopped == "stop_at" and first.step == 7
    second = train_classifier(_config(tmp / "b", raw, table, **over), resume=True)
    assert second.step == 12
    sa = torch.load(os.path.join(a.run_dir, "checkpoints", "last.pt"), weights_only=True)
    sb = torch.load(os.path.join(b.run_dir, "checkpoints", "last.pt"), weights_only=True)
    for key in ("model", "ema"):
        for name, t in sa[key].items():
            assert torch.equal(t, sb[key][name]), (key, name)
    assert (sa["best"], sa["best_step"]) == (sb["best"], sb["best_step"])
    la = pd.read_csv(os.path.join(a.run_dir, "log.csv"))
    lb = pd.read_csv(os.path.join(b.run_dir, "log.csv"))
    pd.testing.assert_frame_equal(la.drop(columns="elapsed_s"), lb.drop(columns="elapsed_s"))


def test_model_config_mismatch_and_bad_keys(tmp_path):
    with pytest.raises(TrainError, match=r"model.input_shape \[4, 32, 32\] differs from data.cube_shape"):
        _config(tmp_path, "r", "t.csv", model={"input_shape": [4, 32, 32], "fmaps": [4],
                                               "down_factors": [[1, 2, 2]]})
    with pytest.raises(TrainError, match="num_classes 3 differs from the 2 data.classes"):
        _config(tmp_path, "r", "t.csv", model={"num_classes": 3})
    with pytest.raises(TrainError, match=r"unknown keys \['depth'\]"):
        _config(tmp_path, "r", "t.csv", model={"depth": 18})
    with pytest.raises(TrainError, match="unknown key"):
        _config(tmp_path, "r", "t.csv", learning_rate=0.1)
    with pytest.raises(TrainError, match="model_type"):
        _config(tmp_path, "r", "t.csv", model_type="vgg16")
    with pytest.raises(TrainError, match="loss.kind"):
        LossConfig(kind="hinge")


def test_unknown_class_in_the_table_is_named(tmp_path, toy):
    _, raw, _, df = toy
    bad = df.copy()
    bad.loc[5, "ei_label"] = "GABA"
    bad.to_csv(tmp_path / "bad.csv", index=False)
    cfg = _config(tmp_path, raw, str(tmp_path / "bad.csv"))
    with pytest.raises(TrainError, match=r"unknown class name\(s\) \['GABA'\].*synapse id\(s\) 6"):
        train_classifier(cfg)


def test_shipped_config_parses():
    cfg = load_classifier_config(os.path.join(REPO, "train", "configs", "ei_3d.yaml"))
    assert cfg.model_type == "vgg3d" and cfg.data.classes == ("E", "I")
    assert len(cfg.data.sources) >= 3 and {s.split for s in cfg.data.sources} == {"train", "val", "test"}


# the augment sections' keys and defaults before the two AugmentConfigs shared a base
_CUBE_AUGMENT = {"enabled": True, "shift": True, "flip_z": True, "flip_yx": True, "rot90": True,
                 "intensity_p": 0.8, "contrast": [0.75, 1.25], "brightness": 0.08, "gamma": [0.8, 1.25],
                 "noise_std": 0.03, "mixup_alpha": 0.0, "mixup_p": 0.5}
_PATCH_AUGMENT = {"enabled": True, "flip_z": True, "flip_yx": True, "transpose": True, "rot90": True,
                  "intensity_p": 0.8, "contrast_range": [0.75, 1.25], "brightness_range": [-0.1, 0.1],
                  "gamma_range": [0.75, 1.35], "section_jitter": 0.03, "noise_std_max": 0.03,
                  "missing_section_p": 0.03, "missing_value": 0.0, "misalign_p": 0.2, "misalign_max_px": 8,
                  "misalign_slip_fraction": 0.5}


@pytest.mark.parametrize("name", sorted(n for n in os.listdir(os.path.join(REPO, "train", "configs"))
                                         if n.endswith(".yaml")))
def test_shipped_configs_keep_their_augment_values(name):
    """Every shipped training YAML loads, and its augment section means what it did."""
    path = os.path.join(REPO, "train", "configs", name)
    with open(path) as f:
        raw = yaml.safe_load(f)
    if "model_type" in raw:
        got, written, defaults = to_dict(load_classifier_config(path).augment), raw.get("augment"), _CUBE_AUGMENT
    else:
        got, written, defaults = (to_dict(load_train_config(path).data.augment),
                                  raw.get("data", {}).get("augment"), _PATCH_AUGMENT)
    assert got == {**defaults, **(written or {})}


def test_cube_augment_keys_are_unchanged():
    with pytest.raises(TrainError, match="unknown key"):
        parse_classifier_config({"augment": {"misalign_p": 0.1}})
    assert set(to_dict(CubeAugmentConfig())) == set(_CUBE_AUGMENT)


def test_batches_and_augmentation_are_pure_functions_of_seed_and_step():
    a = batch_indices(50, 16, 7, seed=1)
    assert a.tolist() == batch_indices(50, 16, 7, seed=1).tolist()
    epoch = np.concatenate([batch_indices(48, 16, s, seed=2) for s in range(3)])
    assert sorted(epoch.tolist()) == list(range(48))  # one epoch = a permutation
    cubes = np.random.default_rng(0).integers(0, 255, (6, 4, 20, 20), dtype=np.uint8)
    cfg = CubeAugmentConfig()
    x1 = augment_batch(cubes, (4, 16, 16), np.random.default_rng([1, 2]), cfg)
    x2 = augment_batch(cubes, (4, 16, 16), np.random.default_rng([1, 2]), cfg)
    assert x1.shape == (6, 4, 16, 16) and x1.dtype == np.float32 and np.array_equal(x1, x2)
    assert 0 <= x1.min() and x1.max() <= 1
    plain = augment_batch(cubes, (4, 16, 16), np.random.default_rng(0), CubeAugmentConfig(enabled=False))
    np.testing.assert_array_equal(plain, cubes[:, :, 2:18, 2:18] / np.float32(255))


def test_losses():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    ce = classification_loss(logits, t, LossConfig(kind="ce", class_balanced=False))
    assert torch.isclose(ce, torch.nn.functional.cross_entropy(logits, t.argmax(1)))
    focal = classification_loss(logits, t, LossConfig(kind="focal", gamma=2.0))
    assert focal < ce  # focal down-weights the easy examples
    w = torch.tensor([1.0, 3.0])
    wce = classification_loss(logits, t, LossConfig(kind="ce"), w)
    per = torch.nn.functional.cross_entropy(logits, t.argmax(1), reduction="none")
    assert torch.isclose(wce, (per * torch.tensor([1.0, 3.0, 1.0])).sum() / 5.0)


def test_threshold_and_neuron_aggregation():
    true = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    p0 = np.array([0.9, 0.4, 0.35, 0.3, 0.2, 0.1, 0.05, 0.32])
    tau = choose_threshold(true, p0)
    assert 0.32 < tau <= 0.35  # separates perfectly, so balanced accuracy is 1
    m = synapse_metrics(true, np.stack([p0, 1 - p0], 1), ("E", "I"), tau)
    assert m["balanced_accuracy"] == 1.0 and m["confusion"] == [[3, 0], [0, 5]]
    assert m["roc_auc"] == 1.0
    # mean log-odds: neuron a = logits of 0.9 and 0.2 → mean(2.197, -1.386) = 0.405 > 0 → E at τ 0.5
    keys = np.array(["a", "a", "b", "b", "b"])
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.45, 0.55], [0.3, 0.7]])
    tab = neuron_table(keys, np.array([0, 0, 1, 1, 1]), probs, 0.5).set_index("neuron")
    assert tab.loc["a", "pred"] == 0 and np.isclose(tab.loc["a", "p"], 0.6, atol=1e-6)
    assert tab.loc["b", "pred"] == 1 and tab.loc["b", "n_synapses"] == 3
    curve = accuracy_vs_synapses(keys, np.array([0, 0, 1, 1, 1]), probs, 0.5, max_k=5, repeats=20)
    assert curve["k"].tolist() == [1, 2, 3] and curve["neurons"].tolist() == [2, 2, 1]
