"""Data module: splits, transforms, OOD validation subsets, bad roots."""

from __future__ import annotations

import numpy as np
import pytest

from autoft import UserError
from autoft.data import WildsDataModule, subsample


def test_subsample_sizes_seeds_and_balance():
    labels = np.array([0] * 80 + [1] * 15 + [2] * 5)
    a = subsample(labels, 30, False, seed=0)
    assert len(a) == 30 and len(set(a)) == 30
    assert np.array_equal(a, subsample(labels, 30, False, seed=0))
    assert not np.array_equal(a, subsample(labels, 30, False, seed=1))
    b = np.bincount(labels[subsample(labels, 30, True, seed=0)], minlength=3)
    # 10 each asked; class 2 has only 5, so its share spills over to the two larger classes
    assert b[2] == 5 and sorted(b[:2].tolist()) == [12, 13]
    assert len(subsample(labels, None, True, 0)) == 100 and len(subsample(labels, 500, False, 0)) == 100


def _tf_train(img):
    return ("train", img)


def _tf_eval(img):
    return ("eval", img)


def test_eval_splits_use_the_eval_transform(tiny_world):
    _, root = tiny_world
    dm = WildsDataModule("iwildcam", root, _tf_train, _tf_eval, ood_val_size=40, ood_val_balanced=True)
    assert dm.subsets["train"][0][0][0] == "train"
    for key in ("val_id", "val_ood", "test_id", "test_ood"):
        assert dm.subsets[key][0][0][0] == "eval", key
    assert len(dm.subsets["val_ood"]) == 40
    assert dm.class_names[:2] == ["fox", "deer"]


def test_missing_root_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="iwildcam_v2.0 does not exist"):
        WildsDataModule("iwildcam", tmp_path / "nope", _tf_train, _tf_eval)
    with pytest.raises(UserError, match="unknown WILDS dataset 'camelyon'"):
        WildsDataModule("camelyon", tmp_path, _tf_train, _tf_eval)


def test_malformed_metadata_is_one_clear_error(tmp_path):
    folder = tmp_path / "iwildcam_v2.0"
    folder.mkdir()
    (folder / "RELEASE_v2.0.txt").write_text("x")
    (folder / "metadata.csv").write_text("split,filename\ntrain,a.png\n")
    with pytest.raises(UserError, match="cannot read"):
        WildsDataModule("iwildcam", tmp_path, _tf_train, _tf_eval)
