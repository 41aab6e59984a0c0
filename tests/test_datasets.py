"""Every benchmark of the paper, read by its real loader from a tiny fixture in its exact on-disk layout.

Each fixture is written here in the published format (WILDS CSVs and image folders, torchvision's
CIFAR pickles, PCAM h5 files and .mat annotations, the CIFAR-10.1/10.2/10-C numpy files, ImageNet's
wnid folders, ObjectNet's mapping files). A random tiny CLIP fine-tunes one step on it and is
evaluated; the metrics are recomputed here from the fixture's own images and labels.

Two test-only patches: torchvision verifies the md5 of CIFAR-10's and Flowers102's files, which a
fixture cannot match, so that check is reduced to the files' presence.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from PIL import Image
from sklearn.metrics import f1_score

from autoft import UserError
from autoft.datacheck import main as datacheck
from autoft.datasets import make_data
from autoft.final import final_train
from autoft.finetune import CONF_DIR, TEST_KEYS, VAL_KEYS, build, evaluate, finetune
from autoft.trial import run

WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361"]
NAMES = ["tench", "goldfish", "great white shark", "tiger shark"]
FMOW_REGIONS = {"USA": "Americas", "FRA": "Europe", "NGA": "Africa"}  # "XXX" is not mapped: region Other


@pytest.fixture(autouse=True)
def presence_instead_of_md5(monkeypatch):
    def present(path, md5=None):
        return os.path.isfile(path)

    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", present)
    monkeypatch.setattr("torchvision.datasets.flowers102.check_integrity", present)


def _pixels(rng: np.random.Generator, n: int, size: int = 12) -> np.ndarray:
    return rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def _save(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG")  # lossless, whatever the name says
    return path


# ------------------------------------------------------------------------------------------ writers

def write_iwildcam(root: Path, rng) -> dict:
    """WILDS iWildCam v2.0: metadata.csv, categories.csv, images under train/."""
    folder = root / "iwildcam_v2.0"
    rows = []
    for split, location in [("train", 0), ("id_val", 0), ("id_test", 1), ("val", 2), ("test", 3)]:
        for i in range(6):
            rows.append({"split": split, "filename": f"{split}_{i}.png", "y": i % 3, "location_remapped": location,
                         "sequence_remapped": len(rows), "datetime": f"2013-0{1 + i % 9}-01 10:00:00.000"})
    df = pd.DataFrame(rows)
    folder.mkdir(parents=True)
    df.to_csv(folder / "metadata.csv", index=False)
    pd.DataFrame({"y": [0, 1, 2], "name": ["fox", "deer", "heron"], "category_id": [3, 8, 11]}).to_csv(
        folder / "categories.csv", index=False)
    (folder / "RELEASE_v2.0.txt").write_text("v2.0")
    for f in df["filename"]:
        _save(folder / "train" / f, _pixels(rng, 1)[0])
    return {"df": df, "folder": folder}


def write_fmow(root: Path, rng) -> dict:
    """WILDS FMoW v1.1: rgb_metadata.csv (a seq row included), country_code_mapping.csv, images/rgb_img_<row>.png."""
    from wilds.datasets.fmow_dataset import categories

    folder = root / "fmow_v1.1"
    rows = []
    plan = [("train", "2002"), ("val", "2011"), ("test", "2012"), ("val", "2014"), ("test", "2016"), ("test", "2017")]
    for split, year in plan:
        for i in range(4):
            ms = ".643" if i == 1 else ""  # FMoW mixes second and millisecond precision
            rows.append({"split": split, "category": categories[i % 3], "country_code": list(FMOW_REGIONS)[i % 3]
                         if i < 3 else "XXX", "timestamp": f"{year}-03-0{i + 1}T10:00:00{ms}Z"})
        if split == "val" and year == "2011":
            rows.append({"split": "seq", "category": categories[0], "country_code": "USA",
                         "timestamp": "2011-05-01T10:00:00Z"})
    df = pd.DataFrame(rows)
    folder.mkdir(parents=True)
    df.to_csv(folder / "rgb_metadata.csv", index=False)
    pd.DataFrame({"alpha-3": list(FMOW_REGIONS), "region": list(FMOW_REGIONS.values())}).to_csv(
        folder / "country_code_mapping.csv", index=False)
    (folder / "RELEASE_v1.1.txt").write_text("v1.1")
    for i in range(len(df)):
        _save(folder / "images" / f"rgb_img_{i}.png", _pixels(rng, 1)[0])
    return {"df": df, "folder": folder}


def write_imagenet(root: Path, rng) -> dict:
    """ImageNet wnid folders with V2 (index folders), R/A (subsets), Sketch, ObjectNet (+ mappings), ImageNet-C."""
    truth: dict[str, list[tuple[Path, int]]] = {}

    def folder_set(name: str, path: Path, classes: dict[str, int], per_class: int) -> None:
        truth[name] = [(_save(path / c / f"{j}.JPEG", _pixels(rng, 1)[0]), y)
                       for c, y in classes.items() for j in range(per_class)]

    all_classes = {w: i for i, w in enumerate(WNIDS)}
    folder_set("train", root / "imagenet" / "train", all_classes, 3)
    folder_set("test_id", root / "imagenet" / "val", all_classes, 2)
    folder_set("test_imagenet_v2", root / "imagenetv2-matched-frequency-format-val", {str(i): i for i in range(4)}, 2)
    folder_set("test_imagenet_r", root / "imagenet-r", {WNIDS[1]: 0, WNIDS[3]: 1}, 2)   # labels in the subset
    folder_set("test_imagenet_a", root / "imagenet-a", {WNIDS[0]: 0, WNIDS[2]: 1}, 2)
    folder_set("test_imagenet_sketch", root / "sketch", all_classes, 2)
    for c in ("fog", "snow"):
        folder_set(f"c_{c}", root / "imagenet-c" / c / "5", all_classes, 1)
    # ObjectNet: "alarm_clock" pools ImageNet classes 0 and 1, "banana" is class 2, "chair" maps to nothing.
    on = root / "objectnet-1.0"
    folder_set("test_objectnet", on / "images", {"alarm_clock": 0, "banana": 1}, 2)
    _save(on / "images" / "chair" / "0.png", _pixels(rng, 1)[0])
    (on / "mappings").mkdir(parents=True)
    index_to_2012 = {0: 2, 1: 0, 2: 3, 3: 1}  # torchvision index -> ILSVRC-2012 id: not the identity
    name_of_2012 = {index_to_2012[i]: f"{NAMES[i]}, imagenet class {i}" for i in range(4)}
    (on / "mappings" / "pytorch_to_imagenet_2012_id.json").write_text(json.dumps({str(k): v for k, v in
                                                                                   index_to_2012.items()}))
    (on / "mappings" / "imagenet_to_label_2012_v2").write_text("\n".join(name_of_2012[i] for i in range(4)) + "\n")
    (on / "mappings" / "folder_to_objectnet_label.json").write_text(json.dumps(
        {"alarm_clock": "Alarm clock", "banana": "Banana", "chair": "Chair"}))
    (on / "mappings" / "objectnet_to_imagenet_1k.json").write_text(json.dumps(
        {"Alarm clock": f"{name_of_2012[2]}; {name_of_2012[0]}", "Banana": name_of_2012[3]}))
    return {"sets": truth, "objectnet_groups": [[0, 1], [2]], "subsets": {"test_imagenet_r": [1, 3],
                                                                          "test_imagenet_a": [0, 2]}}


def write_cifar10(root: Path, rng) -> dict:
    """torchvision's cifar-10-batches-py pickles, CIFAR-10.1 .npy, CIFAR-10.2 .npz, CIFAR-10-C (5 severities)."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

    def batch(name: str, n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.arange(n) % 10
        hwc = _pixels(rng, n, 32)
        with open(base / name, "wb") as f:  # rows of 3072 bytes, channel-major, as the release stores them
            pickle.dump({"data": hwc.transpose(0, 3, 1, 2).reshape(n, -1), "labels": labels.tolist(),
                         "batch_label": name}, f)
        return hwc, labels

    for i in range(1, 6):
        batch(f"data_batch_{i}", 10)
    test = batch("test_batch", 10)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names, "num_cases_per_batch": 10, "num_vis": 3072}, f)
    (root / "CIFAR-10.1").mkdir()
    c101 = (_pixels(rng, 10, 32), np.arange(10) % 10)
    np.save(root / "CIFAR-10.1" / "cifar10.1_v6_data.npy", c101[0])
    np.save(root / "CIFAR-10.1" / "cifar10.1_v6_labels.npy", c101[1])
    (root / "CIFAR-10.2").mkdir()
    c102 = (_pixels(rng, 10, 32), np.arange(10)[::-1] % 10)
    np.savez(root / "CIFAR-10.2" / "cifar102_test.npz", images=c102[0], labels=c102[1])
    (root / "CIFAR-10-C").mkdir()
    labels_c = np.tile(np.arange(10), 5)
    np.save(root / "CIFAR-10-C" / "labels.npy", labels_c)
    for c in ("fog", "snow"):
        np.save(root / "CIFAR-10-C" / f"{c}.npy", _pixels(rng, 50, 32))
    return {"names": names, "sets": {"test_id": test, "test_cifar10_1": c101, "test_cifar10_2": c102}}


def write_pcam(root: Path, rng) -> dict:
    """torchvision's PCAM: pcam/camelyonpatch_level_2_split_<split>_{x,y}.h5 (y shaped [N, 1, 1, 1])."""
    import h5py

    (root / "pcam").mkdir(parents=True)
    sets = {}
    for split, n in (("train", 12), ("valid", 16), ("test", 10)):
        x, y = _pixels(rng, n, 8), np.arange(n) % 2
        with h5py.File(root / "pcam" / f"camelyonpatch_level_2_split_{split}_x.h5", "w") as h5:
            h5["x"] = x
        with h5py.File(root / "pcam" / f"camelyonpatch_level_2_split_{split}_y.h5", "w") as h5:
            h5["y"] = y.reshape(n, 1, 1, 1).astype(np.uint8)
        sets[split] = (x, y)
    return {"sets": {"test_id": sets["test"]}}


def write_sst2(root: Path, rng) -> dict:
    """torchvision's RenderedSST2: rendered-sst2/{train,valid,test}/{negative,positive}/*.png."""
    sets = {}
    for split, n in (("train", 6), ("valid", 8), ("test", 4)):
        sets[split] = [(_save(root / "rendered-sst2" / split / c / f"{i}.png", _pixels(rng, 1)[0]), y)
                       for y, c in enumerate(("negative", "positive")) for i in range(n)]
    return {"sets": {"test_id": sets["test"]}}


def write_caltech101(root: Path, rng) -> dict:
    """torchvision's Caltech101: caltech101/101_ObjectCategories/<category>/image_0001.jpg ..."""
    base = root / "caltech101" / "101_ObjectCategories"
    for c in ("BACKGROUND_Google", "Faces_easy", "airplanes", "yin_yang"):
        for i in range(1, 11):
            _save(base / c / f"image_{i:04d}.jpg", _pixels(rng, 1)[0])
    return {"names": ["centered face", "airplane", "yin and yang symbol"]}  # CLIP's names for these folders


def write_stanford_cars(root: Path, rng) -> dict:
    """torchvision's StanfordCars: devkit .mat files (1-based classes), cars_train/, cars_test/."""
    from scipy.io import savemat

    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    names = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012"]
    savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.array([names], dtype=object)})
    sets = {}
    for split, annos, n in (("train", base / "devkit" / "cars_train_annos.mat", 30),
                            ("test", base / "cars_test_annos_withlabels.mat", 6)):  # val: 20% of train
        records = np.zeros((1, n), dtype=[(k, "O") for k in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2",
                                                             "class", "fname")])
        sets[split] = []
        for i in range(n):
            fname = f"{i + 1:05d}.jpg"
            records[0, i] = (1, 1, 10, 10, i % 3 + 1, fname)
            sets[split].append((_save(base / f"cars_{split}" / fname, _pixels(rng, 1)[0]), i % 3))
        savemat(annos, {"annotations": records})
    return {"names": names, "sets": {"test_id": sets["test"]}}


def write_flowers102(root: Path, rng) -> dict:
    """torchvision's Flowers102: flowers-102/{jpg/image_<id>.jpg, imagelabels.mat, setid.mat} (1-based)."""
    from scipy.io import savemat

    base = root / "flowers-102"
    n = 24
    labels = np.arange(n) % 3 + 1
    for i in range(1, n + 1):
        _save(base / "jpg" / f"image_{i:05d}.jpg", _pixels(rng, 1)[0])
    savemat(base / "imagelabels.mat", {"labels": labels[None]})
    ids = np.arange(1, n + 1)
    savemat(base / "setid.mat", {"trnid": ids[:6][None], "valid": ids[6:18][None], "tstid": ids[18:][None]})
    return {"sets": {"test_id": [(base / "jpg" / f"image_{i:05d}.jpg", labels[i - 1] - 1) for i in ids[18:]]}}


WRITERS = {"iwildcam": write_iwildcam, "fmow": write_fmow, "imagenet": write_imagenet, "cifar10": write_cifar10,
           "pcam_fewshot": write_pcam, "sst2_fewshot": write_sst2, "caltech101": write_caltech101,
           "stanford_cars": write_stanford_cars, "flowers102": write_flowers102}
# Per dataset: overrides sizing the config to its fixture.
SIZES = {
    "iwildcam": ["dataset.ood_val_size=4"],
    "fmow": ["dataset.ood_val_size=4"],
    "imagenet": [f"dataset.class_names=[{','.join(repr(n) for n in NAMES)}]", "dataset.id_val_size=4",
                 "dataset.ood_val_size=6", "dataset.corruptions=[fog,snow]"],
    "cifar10": ["dataset.id_val_size=10", "dataset.ood_val_size=12", "dataset.corruptions=[fog,snow]"],
    "pcam_fewshot": [],
    "sst2_fewshot": [],
    "caltech101": ["dataset.ood_val_size=3"],
    "stanford_cars": ["dataset.ood_val_size=3"],
    "flowers102": ["dataset.ood_val_size=3"],
}


def _cfg(tmp_path: Path, dataset: str, *extra: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("finetune", overrides=[
            f"dataset={dataset}", f"dataset.root={tmp_path / 'data'}", "model=tiny_clip", "model.pretrained=null",
            "trainer.max_steps=1", "trainer.log_every_n_steps=1", "dataset.batch_size=8", "dataset.eval_batch_size=8",
            "dataset.num_workers=0", "logger=csv", "~model.pretrain", *SIZES[dataset], *extra])
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path / "out")
        cfg.logger.save_dir = str(tmp_path / "out")
    return cfg


def _write(tmp_path: Path, dataset: str) -> dict:
    return WRITERS[dataset](tmp_path / "data", np.random.default_rng(0))


def _identity(image):
    return image


def _data(tmp_path: Path, dataset: str, *extra: str):
    cfg = _cfg(tmp_path, dataset, *extra)
    return make_data(cfg.dataset, cfg.dataset.root, _identity, _identity)


@torch.no_grad()
def _logits(model, transform, images) -> torch.Tensor:
    """The model's logits on PIL images, computed here, outside the data modules and the fine-tuner."""
    model.eval()
    return model(torch.stack([transform(im.convert("RGB")) for im in images])).float()


def _accuracy(logits: torch.Tensor, labels) -> float:
    return float((logits.argmax(-1).numpy() == np.asarray(labels)).mean())


def _images(entries) -> tuple[list[Image.Image], list[int]]:
    """(path, label) pairs or (pixels, labels) arrays -> PIL images and labels."""
    if isinstance(entries, tuple):
        return [Image.fromarray(p) for p in entries[0]], list(entries[1])
    return [Image.open(p) for p, _ in entries], [y for _, y in entries]


def _finetuned(tmp_path: Path, dataset: str, *extra: str):
    cfg = _cfg(tmp_path, dataset, *extra)
    model, data = build(cfg)
    module = finetune(cfg, model, data)
    assert module.trainer.global_step == 1
    return cfg, model, data, module.results


# ------------------------------------------------------------------------------ load, train, evaluate

def _predicting(model, transform, images, classes) -> None:
    """Make ``model`` predict ``classes[i]`` for ``images[i]``: the test chooses the predictions (a random model
    predicts one class for every image, so its metrics are 0 or trivially the same), the data module and the
    fine-tuner still read, batch and score them. An input is matched to its image by the nearest eval transform."""
    keys = torch.stack([transform(im.convert("RGB")) for im in images]).flatten(1)
    classes, n = torch.as_tensor(classes), model.head.out_features

    def forward(x: torch.Tensor) -> torch.Tensor:
        dist, idx = torch.cdist(x.flatten(1).float(), keys).min(1)
        assert (dist < 1e-3 * keys[idx].norm(dim=1)).all(), "an input that is none of the images"
        return 10.0 * F.one_hot(classes[idx], n).float()

    model.forward = forward


def test_iwildcam_macro_f1_matches_an_independent_count(tmp_path):
    truth = _write(tmp_path, "iwildcam")
    cfg, model, data, _ = _finetuned(tmp_path, "iwildcam")
    assert data.class_names == ["fox", "deer", "heron"]
    df = truth["df"]
    # chosen predictions: per split some right, some wrong, classes mixed (macro F1 is neither 0, 1 nor accuracy)
    pred = (df["y"] + (np.arange(len(df)) % 5 == 1) + (np.arange(len(df)) % 3 == 0)).to_numpy() % 3
    _predicting(model, data.eval_transform, [Image.open(truth["folder"] / "train" / f) for f in df["filename"]], pred)
    results = evaluate(cfg, model, data, VAL_KEYS) | evaluate(cfg, model, data, TEST_KEYS)
    for key, split in (("test_id", "id_test"), ("test_ood", "test"), ("val_id", "id_val")):
        rows = df["split"] == split
        want = f1_score(df["y"][rows], pred[rows], average="macro", labels=np.unique(df["y"][rows]))
        assert 0.0 < want < 1.0 and want != pytest.approx((df["y"][rows] == pred[rows]).mean()), key  # the premise
        assert results[f"{key}/F1-macro_all"] == pytest.approx(want), key
    assert len(data.subsets["val_ood"]) == 4


def test_fmow_worst_region_accuracy_matches_an_independent_count(tmp_path):
    truth = _write(tmp_path, "fmow")
    cfg, model, data, _ = _finetuned(tmp_path, "fmow")
    assert data.class_names[:2] == ["airport", "airport hangar"] and len(data.class_names) == 62
    df = truth["df"]
    from wilds.datasets.fmow_dataset import categories

    # chosen predictions: right but in region Other (not a region of the worst-region metric) and for Europe's
    # 2016 image; in the OOD test (2016-2017): Americas 2/2, Europe 1/2, Africa 2/2, Other 0/2
    region = df["country_code"].map(FMOW_REGIONS).fillna("Other")
    right = (region != "Other") & ~((region == "Europe") & df["timestamp"].str.startswith("2016"))
    label = df["category"].map(categories.index).to_numpy()
    _predicting(model, data.eval_transform, [Image.open(truth["folder"] / "images" / f"rgb_img_{i}.png")
                                             for i in df.index], np.where(right, label, (label + 1) % 62))
    results = evaluate(cfg, model, data, TEST_KEYS)
    test = (df["split"] == "test") & (df["timestamp"] >= "2016")
    want = min(right[test & (region == r)].mean() for r in set(region[test]) - {"Other"})
    assert want == 0.5  # the premise: not Other's 0, not the mean over regions
    assert results["test_ood/acc_worst_region"] == pytest.approx(want)
    assert results["test_ood/acc_avg"] == pytest.approx(right[test].mean())
    assert len(data.subsets["train"]) == 4 and len(data.subsets["val_ood"]) == 4


def test_imagenet_and_its_shifts_each_scored_in_their_own_label_space(tmp_path):
    truth = _write(tmp_path, "imagenet")
    cfg, model, data, results = _finetuned(tmp_path, "imagenet")
    assert data.test_keys == ("test_id", "test_imagenet_v2", "test_imagenet_r", "test_imagenet_sketch",
                              "test_objectnet", "test_imagenet_a")
    assert len(data.splits["train"].labels) == 8 and len(data.splits["val_id"].labels) == 4
    assert len(data.splits["val_ood"].labels) == 6 and set(data.splits["val_ood"].meta) == {0, 1}
    want = {}
    for key in data.test_keys:
        images, labels = _images(truth["sets"][key])
        if key == "test_objectnet":
            images = [im.crop((2, 2, im.width - 2, im.height - 2)) for im in images]
        logits = _logits(model, data.eval_transform, images)
        if key in truth["subsets"]:
            logits = logits[:, truth["subsets"][key]]
        if key == "test_objectnet":
            logits = torch.stack([logits[:, g].amax(-1) for g in truth["objectnet_groups"]], dim=1)
        want[key] = _accuracy(logits, labels)
        assert results[f"{key}/acc"] == pytest.approx(want[key]), key
        assert results[f"{key}/neg_ce"] == pytest.approx(-F.cross_entropy(logits, torch.tensor(labels)).item(),
                                                          rel=1e-4), key
    shifts = [want[k] for k in data.test_keys[1:]]
    assert results["test_ood/acc"] == pytest.approx(sum(shifts) / len(shifts))


def test_imagenet_k_shot_trains_on_k_per_class_and_returns_negative_ce(tmp_path):
    _write(tmp_path, "imagenet")
    cfg = _cfg(tmp_path, "imagenet", "dataset=imagenet_4shot", "dataset.shots=2", "test=false")
    value = run(cfg)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert value == results["val_ood/neg_ce"] < 0
    model, data = build(cfg)
    assert np.bincount(data.splits["train"].labels).tolist() == [2, 2, 2, 2]


def test_cifar10_and_its_shifts_in_their_published_files(tmp_path):
    truth = _write(tmp_path, "cifar10")
    cfg, model, data, results = _finetuned(tmp_path, "cifar10")
    assert data.class_names == truth["names"]
    assert data.test_keys == ("test_id", "test_cifar10_1", "test_cifar10_2")
    assert len(data.splits["val_ood"].labels) == 12 and set(data.splits["val_ood"].meta) == {0, 1}
    want = {k: _accuracy(_logits(model, data.eval_transform, _images(v)[0]), v[1]) for k, v in truth["sets"].items()}
    for key, value in want.items():
        assert results[f"{key}/acc"] == pytest.approx(value), key
    assert results["test_ood/acc"] == pytest.approx((want["test_cifar10_1"] + want["test_cifar10_2"]) / 2)


def test_cifar10_c_reads_severity_5_of_the_stacked_file(tmp_path):
    _write(tmp_path, "cifar10")
    fog = np.load(tmp_path / "data" / "CIFAR-10-C" / "fog.npy")
    data = _data(tmp_path, "cifar10", "dataset.ood_val_size=null", "dataset.corruptions=[fog]")
    val = data.splits["val_ood"]
    assert len(val.labels) == 10 and val.labels.tolist() == list(range(10))
    assert np.array_equal(np.asarray(val.images[3][0]), fog[43])


@pytest.mark.parametrize("dataset", ["pcam_fewshot", "sst2_fewshot"])
def test_few_shot_sets_train_on_k_shots_and_search_on_negative_ce(tmp_path, dataset):
    truth = _write(tmp_path, dataset)
    cfg = _cfg(tmp_path, dataset, "dataset.shots=2")
    value = run(cfg)
    assert value == json.loads((tmp_path / "out" / "results.json").read_text())["val_ood/neg_ce"]
    cfg, model, data, results = _finetuned(tmp_path, dataset, "dataset.shots=2")
    assert np.bincount(data.splits["train"].labels).tolist() == [2, 2]
    assert np.bincount(data.splits["val_ood"].labels).tolist() == [2, 2]
    images, labels = _images(truth["sets"]["test_id"])
    assert results["test_id/acc"] == pytest.approx(_accuracy(_logits(model, data.eval_transform, images), labels))
    val = data.splits["val_ood"]
    logits = _logits(model, data.eval_transform, [val.images[i][0] for i in range(len(val.labels))])
    assert results["val_ood/neg_ce"] == pytest.approx(-F.cross_entropy(logits, torch.tensor(val.labels)).item(),
                                                      rel=1e-4)


def test_final_training_on_a_set_without_ood_test(tmp_path):
    """Few-shot sets have no OOD test split: final training still tests ID and WiSE-FT reports no OOD."""
    _write(tmp_path, "pcam_fewshot")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("final", overrides=[
            "dataset=pcam_fewshot", f"dataset.root={tmp_path / 'data'}", "dataset.shots=2", "model=tiny_clip",
            "model.pretrained=null", "~model.pretrain", "trainer.max_epochs=1", "dataset.batch_size=8",
            "dataset.eval_batch_size=8", "dataset.num_workers=0", "logger=csv", f"output_dir={tmp_path / 'out'}",
            "wise_alphas=[0.0,1.0]"])
    summary = final_train(cfg, {"optim.lr": 1e-4}, tmp_path / "final")
    assert [w["ood"] for w in summary["wise"]] == [None, None]
    assert summary["wise"][1]["id"] == pytest.approx(summary["results"]["test_id/acc"])
    assert (tmp_path / "final" / "final.json").is_file()


@pytest.mark.parametrize("dataset", ["caltech101", "stanford_cars", "flowers102"])
def test_transfer_sets_load_train_and_evaluate(tmp_path, dataset):
    truth = _write(tmp_path, dataset)
    cfg, model, data, results = _finetuned(tmp_path, dataset)
    if "names" in truth:
        assert data.class_names == truth["names"]
    sizes = {k: len(s.labels) for k, s in data.splits.items()}
    assert sizes["val_ood"] == 3 and data.test_keys == ("test_id",)
    if dataset == "caltech101":  # 10 images a class, split 50/20/30 per class
        assert sizes == {"train": 15, "val_id": 3, "val_ood": 3, "test_id": 9}
    else:
        images, labels = _images(truth["sets"]["test_id"])
        assert results["test_id/acc"] == pytest.approx(_accuracy(_logits(model, data.eval_transform, images),
                                                                 labels))


def test_caltech101_test_accuracy_matches_an_independent_count(tmp_path):
    _write(tmp_path, "caltech101")
    cfg, model, data, results = _finetuned(tmp_path, "caltech101")
    test = data.splits["test_id"]
    images = [test.images[i][0] for i in range(len(test.labels))]
    assert results["test_id/acc"] == pytest.approx(_accuracy(_logits(model, data.eval_transform, images), test.labels))


# ------------------------------------------------------------------------------------ malformed data

def _csv(path: Path, change) -> None:
    df = pd.read_csv(path)
    change(df)
    df.to_csv(path, index=False)


def _rename_column(old: str, new: str):
    return lambda df: df.rename(columns={old: new}, inplace=True)


def _set(mask, column: str, value):
    def change(df):
        df[column] = df[column].astype(object)
        df.loc[mask(df), column] = value
    return change


def _mat(path: Path, **fields) -> None:
    from scipy.io import savemat

    savemat(path, fields)


def _h5(path: Path, **datasets) -> None:
    import h5py

    with h5py.File(path, "w") as h5:
        for k, v in datasets.items():
            h5[k] = v


def _rm(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()


IW, FM, V2 = Path("iwildcam_v2.0"), Path("fmow_v1.1"), Path("imagenetv2-matched-frequency-format-val")
ON, C10 = Path("objectnet-1.0/mappings"), Path("cifar-10-batches-py")
PCAM = Path("pcam/camelyonpatch_level_2_split")
MALFORMED = [  # dataset, what is broken, change(data root), the pattern of the one line
    ("iwildcam", "missing split",
     lambda r: _csv(r / IW / "metadata.csv", _set(lambda d: d.split == "id_val", "split", "train")),
     r"metadata\.csv: split 'id_val' has no rows"),
    ("iwildcam", "metadata columns",
     lambda r: _csv(r / IW / "metadata.csv", _rename_column("location_remapped", "loc")),
     r"metadata\.csv: missing column\(s\) \['location_remapped'\]"),
    ("iwildcam", "image missing", lambda r: _rm(r / IW / "train" / "test_2.png"),
     r"image file missing: .*train/test_2\.png"),
    ("iwildcam", "label out of range", lambda r: _csv(r / IW / "metadata.csv", _set(lambda d: d.index == 3, "y", 3)),
     r"metadata\.csv: column 'y' has label 3 out of range 0\.\.2"),
    ("iwildcam", "datetime format",
     lambda r: _csv(r / IW / "metadata.csv", _set(lambda d: d.index == 0, "datetime", "2013-01-01 10:00:00")),
     r"metadata\.csv: column 'datetime'"),
    ("fmow", "timestamp without timezone",
     lambda r: _csv(r / FM / "rgb_metadata.csv", lambda d: d.__setitem__("timestamp", d.timestamp.str.rstrip("Z"))),
     r"rgb_metadata\.csv: column 'timestamp' needs a timezone"),
    ("fmow", "unknown category",
     lambda r: _csv(r / FM / "rgb_metadata.csv", _set(lambda d: d.index == 0, "category", "volcano")),
     r"rgb_metadata\.csv: column 'category' has label\(s\) \['volcano'\]"),
    ("fmow", "metadata columns", lambda r: _csv(r / FM / "rgb_metadata.csv", _rename_column("country_code", "cc")),
     r"rgb_metadata\.csv: missing column\(s\) \['country_code'\]"),
    ("fmow", "missing region file", lambda r: _rm(r / FM / "country_code_mapping.csv"),
     r"country_code_mapping\.csv not found"),
    ("fmow", "missing split",
     lambda r: _csv(r / FM / "rgb_metadata.csv", _set(lambda d: d.timestamp >= "2016", "split", "seq")),
     r"rgb_metadata\.csv: split 'test' has no rows"),
    ("fmow", "image missing", lambda r: _rm(r / FM / "images" / "rgb_img_0.png"),
     r"image file missing: .*images/rgb_img_0\.png"),
    ("imagenet", "missing split", lambda r: _rm(r / "imagenet" / "val"), r"imagenet/val not found"),
    ("imagenet", "V2 label out of range", lambda r: (r / V2 / "3").rename(r / V2 / "7"),
     r"class folder '7': label out of range \(expected 0\.\.3\)"),
    ("imagenet", "unknown wnid", lambda r: _save(r / "imagenet-r" / "n99999999" / "0.jpg", np.zeros((8, 8, 3), "u1")),
     r"imagenet-r: class folder 'n99999999' is not an ImageNet class"),
    ("imagenet", "missing corruption", lambda r: _rm(r / "imagenet-c" / "snow"), r"imagenet-c/snow/5 not found"),
    ("imagenet", "missing ObjectNet mapping", lambda r: _rm(r / ON / "pytorch_to_imagenet_2012_id.json"),
     r"mappings/pytorch_to_imagenet_2012_id\.json not found"),
    ("cifar10", "missing split", lambda r: _rm(r / C10 / "test_batch"), r"cifar-10-batches-py/test_batch not found"),
    ("cifar10", "label out of range",
     lambda r: np.save(r / "CIFAR-10.1" / "cifar10.1_v6_labels.npy", np.arange(10) + 1),
     r"cifar10\.1_v6_labels\.npy: label 10 out of range 0\.\.9"),
    ("cifar10", "wrong arrays", lambda r: np.savez(r / "CIFAR-10.2" / "cifar102_test.npz", data=np.zeros(2)),
     r"cifar102_test\.npz: expected arrays 'images' and 'labels', found \['data'\]"),
    ("cifar10", "missing corruption", lambda r: _rm(r / "CIFAR-10-C" / "fog.npy"), r"CIFAR-10-C/fog\.npy not found"),
    ("cifar10", "severities", lambda r: np.save(r / "CIFAR-10-C" / "labels.npy", np.arange(49) % 10),
     r"labels\.npy: 49 labels do not split into 5 severities"),
    ("pcam_fewshot", "missing split", lambda r: _rm(r / f"{PCAM}_valid_x.h5"),
     r"camelyonpatch_level_2_split_valid_x\.h5 not found"),
    ("pcam_fewshot", "label out of range", lambda r: _h5(r / f"{PCAM}_test_y.h5", y=np.full((10, 1, 1, 1), 2, "u1")),
     r"camelyonpatch_level_2_split_test_y\.h5: label 2 out of range 0\.\.1"),
    ("pcam_fewshot", "wrong h5 dataset", lambda r: _h5(r / f"{PCAM}_test_y.h5", labels=np.zeros((10, 1, 1, 1), "u1")),
     r"camelyonpatch_level_2_split_test_y\.h5: expected dataset 'y', found \['labels'\]"),
    ("sst2_fewshot", "missing split", lambda r: _rm(r / "rendered-sst2" / "valid" / "positive"),
     r"rendered-sst2/valid/positive not found"),
    ("flowers102", "image missing", lambda r: _rm(r / "flowers-102" / "jpg" / "image_00003.jpg"),
     r"image file missing: .*flowers-102/jpg/image_00003\.jpg"),
    ("flowers102", "label out of range", lambda r: _mat(r / "flowers-102" / "imagelabels.mat",
                                                        labels=np.full((1, 24), 103)),
     r"imagelabels\.mat: label 102 out of range 0\.\.101"),
    ("flowers102", "missing split file", lambda r: _rm(r / "flowers-102" / "setid.mat"), r"setid\.mat not found"),
    ("stanford_cars", "annotation fields", lambda r: _mat(r / "stanford_cars" / "devkit" / "cars_train_annos.mat",
                                                          annotations=np.zeros((1, 2), dtype=[("fname", "O")])),
     r"cars_train_annos\.mat: malformed"),
    ("stanford_cars", "label out of range", lambda r: _mat(
        r / "stanford_cars" / "cars_test_annos_withlabels.mat",
        annotations=np.array([[(0, "00001.jpg"), (1, "00002.jpg")]], dtype=[("class", "O"), ("fname", "O")])),
     r"cars_test_annos_withlabels\.mat: label -1 out of range 0\.\.2"),
    ("stanford_cars", "image missing", lambda r: _rm(r / "stanford_cars" / "cars_test" / "00002.jpg"),
     r"image file missing: .*cars_test/00002\.jpg"),
    ("caltech101", "image missing",
     lambda r: _rm(r / "caltech101" / "101_ObjectCategories" / "airplanes" / "image_0005.jpg"),
     r"image file missing: .*airplanes/image_0005\.jpg"),
]


@pytest.mark.parametrize("dataset,broken,change,pattern", MALFORMED, ids=[f"{m[0]}-{m[1]}" for m in MALFORMED])
def test_malformed_data_is_one_line_naming_the_file_or_field(tmp_path, dataset, broken, change, pattern):
    _write(tmp_path, dataset)
    change(tmp_path / "data")
    with pytest.raises(UserError, match=pattern) as e:
        _data(tmp_path, dataset)
    assert "\n" not in str(e.value)


def test_missing_root_or_dataset_folder_is_one_clear_error(tmp_path, monkeypatch):
    from autoft.finetune import dataset_root

    for dataset, pattern in (("cifar10", r"data root .*/data does not exist"), ("iwildcam", r"iwildcam_v2\.0")):
        with pytest.raises(UserError, match=pattern):
            dataset_root(_cfg(tmp_path, dataset))
    (tmp_path / "data").mkdir()
    with pytest.raises(UserError, match=r"data/imagenet not found"):
        dataset_root(_cfg(tmp_path, "imagenet"))
    cfg = _cfg(tmp_path, "cifar10", "dataset.root=null")
    monkeypatch.delenv("AUTOFT_DATA", raising=False)
    with pytest.raises(UserError, match="set dataset.root=... or AUTOFT_DATA"):
        dataset_root(cfg)


def test_data_root_from_the_environment(tmp_path, monkeypatch):
    _write(tmp_path, "sst2_fewshot")
    monkeypatch.setenv("AUTOFT_DATA", str(tmp_path / "data"))
    cfg = _cfg(tmp_path, "sst2_fewshot", "dataset.root=null")
    from autoft.finetune import dataset_root

    assert dataset_root(cfg) == str(tmp_path / "data")


# ------------------------------------------------------------------------------------- data checker

def test_data_checker_lists_each_split_and_exits_by_what_it_found(tmp_path, capsys):
    _write(tmp_path, "cifar10")
    args = ["check", "dataset=cifar10", f"dataset.root={tmp_path / 'data'}", *SIZES["cifar10"]]
    assert datacheck(args) == 0
    out = capsys.readouterr().out
    for split in ("train", "val_id", "val_ood", "test_id", "test_cifar10_1", "test_cifar10_2"):
        assert f"split {split}" in out
    assert "all present" in out
    (tmp_path / "data" / "CIFAR-10-C" / "snow.npy").unlink()
    np.save(tmp_path / "data" / "CIFAR-10.1" / "cifar10.1_v6_labels.npy", np.arange(10) + 1)
    assert datacheck(args) == 1
    lines = capsys.readouterr().out.splitlines()
    assert any(line.split()[:3] == ["missing", "split", "val_ood"] and "snow.npy not found" in line for line in lines)
    assert any(line.split()[:3] == ["malformed", "split", "test_cifar10_1"] for line in lines)
    assert any(line.split()[:3] == ["present", "split", "test_cifar10_2"] for line in lines)


def test_data_checker_on_wilds_and_bad_input(tmp_path, capsys):
    _write(tmp_path, "iwildcam")
    _csv(tmp_path / "data" / IW / "metadata.csv", _rename_column("y", "label"))
    assert datacheck(["check", "dataset=iwildcam", f"dataset.root={tmp_path / 'data'}"]) == 1
    out = capsys.readouterr().out
    assert "malformed   metadata.csv" in out and "not checked" in out and "present     categories.csv" in out
    assert datacheck(["check", "dataset=no_such_set"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert datacheck([]) == 2


def test_data_checker_command_line_has_no_traceback(tmp_path):
    import sys

    from tests import forkserver

    proc = forkserver.run([sys.executable, "-m", "autoft.datacheck", "check", "dataset=fmow",
                           f"dataset.root={tmp_path}"], timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr + proc.stdout
    assert "missing" in proc.stdout and "fmow_v1.1 does not exist" in proc.stdout


# ----------------------------------------------------------------------------------------------- models

@pytest.mark.parametrize("config,name", [("vit_b16", "ViT-B-16"), ("vit_l14", "ViT-L-14"),
                                         ("vit_l14_336", "ViT-L-14-336")])
def test_openai_clip_configs_name_open_clip_models(config, name):
    import open_clip

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("finetune", overrides=[f"model={config}", "dataset=imagenet"])
    assert cfg.model.name == name and cfg.model.pretrained == "openai"
    assert "openai" in open_clip.list_pretrained_tags_by_model(name)


def test_local_checkpoint_file_through_the_model_config(tmp_path):
    from autoft.model import load_clip

    torch.manual_seed(0)
    clip = load_clip("autoft-tiny", None)[0]
    torch.save({"state_dict": clip.state_dict()}, tmp_path / "clip.pt")
    _write(tmp_path, "sst2_fewshot")
    model, _ = build(_cfg(tmp_path, "sst2_fewshot", f"model.pretrained={tmp_path / 'clip.pt'}"))
    assert torch.equal(model.clip.visual.conv1.weight, clip.visual.conv1.weight)
