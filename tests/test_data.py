"""Data module: splits, transforms, OOD validation and k-shot subsets, stratified splits, bad roots."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autoft import UserError
from autoft.data import WildsDataModule, k_shot, stratified_split, subsample


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
    with pytest.raises(UserError, match=r"categories\.csv not found"):
        WildsDataModule("iwildcam", tmp_path, _tf_train, _tf_eval)
    (folder / "categories.csv").write_text("y,name\n0,fox\n")
    (folder / "metadata.csv").write_text("split,filename\ntrain,a.png\n")
    with pytest.raises(UserError, match=r"metadata\.csv: missing column\(s\) \['y', 'location_remapped'"):
        WildsDataModule("iwildcam", tmp_path, _tf_train, _tf_eval)


def test_k_shot_takes_k_of_every_class_seeded():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 7)
    a = k_shot(labels, 4, seed=0)
    assert np.bincount(labels[a]).tolist() == [4, 3, 4]  # a class with fewer than k gives all it has
    assert np.array_equal(a, k_shot(labels, 4, seed=0)) and not np.array_equal(a, k_shot(labels, 4, seed=1))
    b = k_shot(labels, 3, seed=5)  # every class has 3: the same draw as a balanced subsample of 3 * K
    assert np.array_equal(b, subsample(labels, 9, True, seed=5))
    with pytest.raises(UserError, match="shots must be a positive"):
        k_shot(labels, 0, seed=0)


def test_stratified_split_cuts_each_class_the_same_way():
    labels = np.array([0] * 10 + [1] * 20)
    parts = stratified_split(labels, (0.5, 0.2, 0.3), seed=0)
    assert [np.bincount(labels[p]).tolist() for p in parts] == [[5, 10], [2, 4], [3, 6]]
    assert sorted(np.concatenate(parts).tolist()) == list(range(30))
    assert all(np.array_equal(p, q) for p, q in zip(parts, stratified_split(labels, (0.5, 0.2, 0.3), 0), strict=True))
    with pytest.raises(UserError, match="fractions"):
        stratified_split(labels, (0.5, 0.6), seed=0)


def test_group_average_without_torch_scatter_matches_its_definition():
    from autoft.data import _avg_over_groups

    v = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    g = torch.tensor([0, 0, 2, 2, 2])
    avg, counts = _avg_over_groups(v, g, 4)
    torch.testing.assert_close(avg, torch.tensor([0.5, 0.0, 2 / 3, 0.0]))  # empty groups: 0, as torch_scatter
    torch.testing.assert_close(counts, torch.tensor([2.0, 0.0, 3.0, 0.0]))
