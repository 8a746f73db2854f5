"""train/cv_folds.py and launch/cv_folds.py: the two y-folds of a training band, the per-fold configs, the CLI."""

import pytest

from cleftwise.train.cv_folds import fold_config, fold_regions
from cleftwise.train.errors import TrainError
from cleftwise.train.loop import parse_train_config

BAND = [[0, 0, 0], [1000, 4000, 2560]]


def test_folds_split_the_band_at_the_cut_and_swap_roles():
    tr_a, unseen_a = fold_regions(BAND, 2120, "a")
    tr_b, unseen_b = fold_regions(BAND, 2120, "b")
    assert unseen_a == tr_b == [[0, 0, 0], [1000, 2120, 2560]]
    assert unseen_b == tr_a == [[0, 2120, 0], [1000, 1880, 2560]]
    with pytest.raises(TrainError, match="not inside the band"):
        fold_regions(BAND, 4000, "a")
    with pytest.raises(TrainError, match="fold must be"):
        fold_regions(BAND, 2000, "c")


def test_fold_config_replaces_train_val_run_dir_and_init():
    spec = {"raw": "v.zarr/raw", "labels": "v.zarr/mask", "label_format": "instances", "roi": BAND}
    stage = {"run_dir": "runs/x", "max_minutes": 30, "init_weights": "old.pt",
             "model": {"filters": [4, 8], "anisotropic_levels": 1, "out_channels": 1},
             "data": {"train": [spec], "val": [dict(spec, roi=[[0, 4000, 0], [1000, 1120, 2560]])],
                      "patch_shape": [8, 48, 48], "target": "cleft"}}
    cfg = fold_config(stage, "b", 2120, "runs/cv/b/stage2", "runs/cv/b/stage1.pt")
    assert cfg["data"]["train"][0]["roi"] == [[0, 0, 0], [1000, 2120, 2560]]
    assert cfg["data"]["val"] == [dict(spec, roi=[[0, 2120, 0], [1000, 1880, 2560]])]
    assert cfg["run_dir"] == "runs/cv/b/stage2" and cfg["init_weights"] == "runs/cv/b/stage1.pt"
    assert "max_minutes" not in cfg and stage["run_dir"] == "runs/x"   # the stage itself is untouched
    assert parse_train_config(cfg).data.val[0].roi is not None
    with pytest.raises(TrainError, match="exactly one data.train"):
        fold_config(dict(stage, data=dict(stage["data"], train=[spec, spec])), "a", 2120, "r", None)


def test_cli_refuses_a_missing_init_and_a_bad_first_stage(tmp_path, capsys):
    from cleftwise.launch.cv_folds import main
    base = ["--fold", "a", "--cut-y-nm", "2120", "--run-root", str(tmp_path), "--stage", "x.yaml"]
    with pytest.raises(SystemExit):
        main(base + ["--first-stage", "3", "--init", str(tmp_path / "missing.pt")])
    assert "missing.pt: no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(base + ["--first-stage", "0"])
    assert "--first-stage must be >= 1" in capsys.readouterr().err
