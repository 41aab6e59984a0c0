"""The embedded world: exact WILDS iWildCam layout, the shortcut, the nuisances, determinism."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import f1_score

from autoft.world import WorldConfig, _locations, ensure_world, generate_web, web_captions, web_scenes


def _meta(root) -> pd.DataFrame:
    return pd.read_csv(root / "iwildcam_v2.0" / "metadata.csv")


def test_layout_is_read_by_the_real_wilds_loader(tiny_world):
    import wilds

    cfg, root = tiny_world
    folder = root / "iwildcam_v2.0"
    assert (folder / "RELEASE_v2.0.txt").is_file()
    ds = wilds.get_dataset("iwildcam", root_dir=str(root), download=False)
    assert ds.n_classes == len(cfg.species)
    sizes = {s: len(ds.get_subset(s)) for s in ("train", "id_val", "id_test", "val", "test")}
    assert sizes == {"train": cfg.n_train, "id_val": cfg.n_id_val, "id_test": cfg.n_id_test,
                     "val": cfg.n_ood_val, "test": cfg.n_ood_test}
    x, y, meta = ds.get_subset("val")[0]
    assert x.size == (32, 32) and x.mode == "RGB" and 0 <= int(y) < ds.n_classes
    assert meta.shape == (len(ds.metadata_fields),) and ds.metadata_fields[0] == "location"


def test_dataset_eval_macro_f1_matches_sklearn(tiny_world):
    import wilds

    _, root = tiny_world
    ds = wilds.get_dataset("iwildcam", root_dir=str(root), download=False)
    sub = ds.get_subset("test")
    y = sub.y_array
    pred = torch.tensor(np.random.default_rng(0).integers(0, ds.n_classes, len(y)))
    results, _ = ds.eval(pred, y, sub.metadata_array)
    want = f1_score(y.numpy(), pred.numpy(), average="macro", labels=np.unique(y.numpy()))
    assert abs(results["F1-macro_all"] - want) < 1e-6  # wilds computes in float32


def test_ood_locations_are_disjoint_and_unshortcut(tiny_world):
    cfg, root = tiny_world
    df = _meta(root)
    loc = {s: set(df[df.split == s].location_remapped) for s in ("train", "id_test", "val", "test")}
    assert loc["id_test"] <= loc["train"]
    assert not loc["train"] & loc["val"] and not loc["train"] & loc["test"] and not loc["val"] & loc["test"]
    # shortcut: in a training camera two species take most images; OOD cameras host any species (too few images
    # per OOD camera in the tiny world for a per-camera share: the pooled species shares are near uniform)
    def top2_share(frame):
        return frame.groupby("location_remapped").y.apply(lambda s: s.value_counts().iloc[:2].sum() / len(s))
    train, ood = df[df.split == "train"], df[df.split.isin(["val", "test"])]
    assert top2_share(train).min() > 0.75
    assert ood.y.value_counts(normalize=True).max() < 0.25


def test_class_frequencies_are_long_tailed(tiny_world):
    _, root = tiny_world
    counts = _meta(root).query("split == 'train'").y.value_counts()
    assert counts.max() > 4 * counts.min()


def test_nuisances_are_rare_on_the_web_and_common_in_traps(tiny_world):
    cfg, root = tiny_world
    df = _meta(root)
    sc = web_scenes(cfg, 4000, np.random.default_rng(0))
    for kind in ("night", "small", "blur"):
        web, trap = getattr(sc, kind).mean(), df[kind].mean()
        assert abs(web - getattr(cfg.web, kind)) < 0.015 and abs(trap - getattr(cfg.trap, kind)) < 0.07, kind
        assert trap > 5 * web, kind


def test_night_images_are_grayscale(tiny_world):
    from PIL import Image

    _, root = tiny_world
    df = _meta(root)
    night = np.asarray(Image.open(root / "iwildcam_v2.0" / "train" / df[df.night].filename.iloc[0])).astype(int)
    day = np.asarray(Image.open(root / "iwildcam_v2.0" / "train" / df[~df.night].filename.iloc[0])).astype(int)
    assert np.abs(night[..., 0] - night[..., 1]).max() <= 1
    assert np.abs(day[..., 0] - day[..., 1]).max() > 10


def test_generation_is_deterministic_and_seeded(tmp_path):
    small = {"n_train": 60, "n_id_val": 20, "n_id_test": 20, "n_ood_val": 20, "n_ood_test": 40}
    a = ensure_world(WorldConfig(seed=3, **small), tmp_path / "a") / "iwildcam_v2.0"
    b = ensure_world(WorldConfig(seed=3, **small), tmp_path / "b") / "iwildcam_v2.0"
    c = ensure_world(WorldConfig(seed=4, **small), tmp_path / "c") / "iwildcam_v2.0"
    assert (a / "metadata.csv").read_bytes() == (b / "metadata.csv").read_bytes()
    name = "train_00007.png"
    assert (a / "train" / name).read_bytes() == (b / "train" / name).read_bytes()
    assert (a / "train" / name).read_bytes() != (c / "train" / name).read_bytes()
    img1, cap1 = generate_web(WorldConfig(seed=3), 50, 0)
    img2, cap2 = generate_web(WorldConfig(seed=3), 50, 0)
    assert np.array_equal(img1, img2) and cap1 == cap2


def test_cache_key_separates_web_from_trap_settings():
    base = WorldConfig()
    assert WorldConfig(leak=0.3).key() != base.key()
    assert WorldConfig(leak=0.3).web_key() == base.web_key()  # same pretrained model
    assert WorldConfig(seed=1).web_key() != base.web_key()


def test_existing_world_is_reused_not_rewritten(tiny_world):
    cfg, root = tiny_world
    meta = root / "iwildcam_v2.0" / "metadata.csv"
    before = meta.stat().st_mtime_ns
    assert ensure_world(cfg) == root
    assert meta.stat().st_mtime_ns == before


@pytest.mark.parametrize("share", [0.0, 0.25, 0.5, 1.0])
def test_each_ood_split_has_exactly_its_share_of_lookalike_cameras(share):
    cfg = WorldConfig(seed=5, ood_lookalike=share)
    locs = _locations(cfg, np.random.default_rng([cfg.seed, 2]))
    n_id, n_val = cfg.n_train_locations, cfg.n_ood_val_locations
    habitats = {(l_.texture, l_.ground) for l_ in locs[:n_id]}
    for split in (locs[n_id:n_id + n_val], locs[n_id + n_val:]):
        assert sum((l_.texture, l_.ground) in habitats for l_ in split) == round(share * len(split))
    assert len(habitats) == n_id  # training cameras never share a habitat


def test_web_captions_name_the_ground_only_when_asked():
    def grounds(cfg: WorldConfig) -> int:
        sc = web_scenes(cfg, 400, np.random.default_rng(0))
        return sum(" ground" in c for c in web_captions(cfg, sc, np.random.default_rng(1)))

    assert grounds(WorldConfig()) == 0
    assert 100 < grounds(WorldConfig(web_ground_captions=1.0)) < 300  # about half of the day captions
    assert WorldConfig(web_ground_captions=1.0).web_key() != WorldConfig().web_key()  # another pretrained model
