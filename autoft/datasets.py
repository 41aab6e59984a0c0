"""The paper's non-WILDS benchmarks, read by torchvision's own dataset classes or in their published formats.

ImageNet (train/val class folders) with ImageNet-V2, -R, -A, -Sketch and ObjectNet for testing and
ImageNet-C for the search's OOD validation; CIFAR-10 (torchvision's python pickles) with CIFAR-10.1,
CIFAR-10.2 and CIFAR-10-C (numpy files); PatchCamelyon and rendered SST2 (few-shot); Caltech101,
StanfordCars and Flowers102 (transfer). Every dataset is a :class:`Benchmark`: class names plus one
builder per split (:class:`~autoft.classification.Split`), so the data module and the data checker
(``autoft-data check``) read the data the same way. :func:`open_data` reads and checks the dataset a
config names (by its ``kind``; WILDS too) before any model exists; its ``module`` is the data module.

Label spaces: a test set labelled in a subset or a grouping of the model's classes (ImageNet-R/-A:
200 ImageNet classes; ObjectNet: 113 classes, each one or more ImageNet classes) carries
``groups``, the model classes of each of its labels; the fine-tuner scores a label by the max of
its classes' logits (for one class: restricting the logits to the subset), as the WiSE-FT and
AutoFT evaluations do.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import cache
from importlib.resources import files
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset, Subset

from autoft import MissingData, UserError
from autoft.classification import ClassificationDataModule, Split
from autoft.data import WildsDataModule, WildsSource, open_wilds, stratified_split, subsample
from autoft.imagecheck import check_policy
from autoft.wildscheck import wilds_folder

PCAM_CLASSNAMES = ("lymph node", "lymph node containing metastatic tumor tissue")  # CLIP's, as AutoFT used


class ArrayImages(Dataset):
    """Images stored as one uint8 array [N, H, W, 3] (the CIFAR-10.1/10.2/10-C files)."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, i: int):
        return Image.fromarray(np.asarray(self.array[i])), None


@dataclass
class Benchmark:
    """A dataset on disk: its main folder, class names and one builder per split (train, val_id, val_ood,
    test_id, test_<shift>...)."""

    folder: Path
    class_names: Callable[[], list[str]]
    splits: dict[str, Callable[[], Split]]


# ---------------------------------------------------------------------------------------- helpers

def _folder(path: Path) -> Path:
    if not path.is_dir():
        raise MissingData(f"{path} not found")
    return path


def _file(path: Path) -> Path:
    if not path.is_file():
        raise MissingData(f"{path} not found")
    return path


def _image_folder(path: Path):
    from torchvision.datasets import ImageFolder

    try:
        return ImageFolder(str(_folder(path)))
    except FileNotFoundError as e:
        raise UserError(f"{path}: {e}") from None


def _check_files(files: Sequence[str | Path], what: str) -> None:
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise MissingData(f"{what}: image file missing: {missing[0]}{more}")


def _torchvision(make: Callable, what: Path):
    """A torchvision dataset with download=False; its 'not found / corrupted' RuntimeError as one line."""
    try:
        return make()
    except RuntimeError as e:
        raise MissingData(f"{what}: {e}".replace(" You can use download=True to download it", "")) from None
    except (KeyError, ValueError, TypeError, OSError) as e:
        raise UserError(f"{what}: malformed: {type(e).__name__}: {e}") from None


def _load_array(path: Path) -> np.ndarray:
    try:
        return np.load(_file(path), mmap_mode="r")
    except ValueError as e:
        raise UserError(f"{path}: not a numpy array file ({e})") from None


def _images_array(array: np.ndarray, path: Path) -> np.ndarray:
    if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise UserError(f"{path}: expected uint8 images [N, H, W, 3], found {array.dtype} {list(array.shape)}")
    return array


def _labels_for(labels: np.ndarray, n_images: int, path: Path) -> np.ndarray:
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != n_images:
        raise UserError(f"{path}: {len(labels)} labels for {n_images} images")
    return labels.astype(np.int64)


def halves(split: Split, seed: int) -> tuple[Split, Split]:
    """A validation split cut in two class-stratified halves: the search's and early stopping's (as AutoFT does)."""
    first, second = stratified_split(split.labels, (0.5, 0.5), seed)
    return split.take(first), split.take(second)


# ---------------------------------------------------------------------------------------- ImageNet

def crop_border(image: Image.Image) -> Image.Image:
    """ObjectNet's images carry a thin red border: cropped 2 px a side, as in the WiSE-FT evaluation."""
    w, h = image.size
    return image.crop((2, 2, w - 2, h - 2))


def imagenet(d: DictConfig, root: Path) -> Benchmark:
    """ImageNet train/val class folders (wnids) with its shifts; ID validation is a held-out part of train."""
    f = d.folders
    seed = d.subset_seed

    @cache
    def full_train() -> Split:
        path = root / f.imagenet / "train"
        folder = _image_folder(path)
        return Split(folder, np.array(folder.targets, dtype=np.int64), str(path), len(folder.classes))

    def wnid_index() -> dict[str, int]:
        return full_train().images.class_to_idx

    def by_wnid(path: Path, meta: int | None = None) -> Split:
        """A folder of wnid folders labelled in ImageNet's 1000-class space."""
        folder, index = _image_folder(path), wnid_index()
        unknown = [w for w in folder.classes if w not in index]
        if unknown:
            raise UserError(f"{path}: class folder '{unknown[0]}' is not an ImageNet class (no such folder in "
                            f"{root / f.imagenet / 'train'})")
        labels = np.array([index[folder.classes[t]] for t in folder.targets], dtype=np.int64)
        return Split(folder, labels, str(path), len(index),
                     meta=None if meta is None else np.full(len(labels), meta))

    @cache
    def holdout() -> np.ndarray:
        return subsample(full_train().labels, d.id_val_size, True, seed)

    def train() -> Split:
        return full_train().take(np.setdiff1d(np.arange(len(full_train().labels)), holdout()))

    def imagenet_c() -> Split:
        parts = [by_wnid(root / f.imagenet_c / c / str(d.severity), meta=i) for i, c in enumerate(d.corruptions)]
        return Split(ConcatDataset([p.images for p in parts]), np.concatenate([p.labels for p in parts]),
                     str(root / f.imagenet_c), len(wnid_index()), meta=np.concatenate([p.meta for p in parts]))

    def v2() -> Split:
        """ImageNet-V2: class folders named by ImageNet class index, 0..999."""
        path = root / f.imagenet_v2
        folder, n = _image_folder(path), len(wnid_index())
        bad = [c for c in folder.classes if not c.isdigit() or int(c) >= n]
        if bad:
            raise UserError(f"{path}: class folder '{bad[0]}': label out of range (expected 0..{n - 1})")
        labels = np.array([int(folder.classes[t]) for t in folder.targets], dtype=np.int64)
        return Split(folder, labels, str(path), n)

    def subset(folder_key: str) -> Callable[[], Split]:
        def build() -> Split:
            """ImageNet-R/-A: wnid folders of a subset of classes, labelled in that subset."""
            path = root / f[folder_key]
            folder, index = _image_folder(path), wnid_index()
            unknown = [w for w in folder.classes if w not in index]
            if unknown:
                raise UserError(f"{path}: class folder '{unknown[0]}' is not an ImageNet class")
            groups = torch.tensor([[index[w]] for w in folder.classes])
            return Split(folder, np.array(folder.targets, dtype=np.int64), str(path), len(groups), groups=groups)
        return build

    def objectnet() -> Split:
        return _objectnet(root / f.objectnet, len(wnid_index()))

    tests = {"imagenet_v2": v2, "imagenet_r": subset("imagenet_r"), "imagenet_sketch":
             lambda: by_wnid(root / f.imagenet_sketch), "objectnet": objectnet, "imagenet_a": subset("imagenet_a")}
    unknown = [t for t in d.test_sets if t not in tests]
    if unknown:
        raise UserError(f"imagenet: unknown test set(s) {unknown}; known: {', '.join(tests)}")

    def class_names() -> list[str]:
        n = len(wnid_index())
        if d.class_names in (None, "openai"):
            from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

            if n != len(IMAGENET_CLASSNAMES):
                raise UserError(f"{root / f.imagenet / 'train'}: {n} class folders; OpenAI's class names need "
                                f"all {len(IMAGENET_CLASSNAMES)} (or set dataset.class_names)")
            return list(IMAGENET_CLASSNAMES)
        return _given_names(d.class_names, n, "imagenet")

    splits = {"train": train, "val_id": lambda: full_train().take(holdout()), "val_ood": imagenet_c,
              "test_id": lambda: by_wnid(root / f.imagenet / "val")}
    return Benchmark(root / f.imagenet, class_names, splits | {f"test_{t}": tests[t] for t in d.test_sets})


def _objectnet(path: Path, n_classes: int) -> Split:
    """ObjectNet 1.0 images of its 113 classes that map to ImageNet, via the release's own mapping files."""
    mappings = path / "mappings"

    def read_json(name: str) -> dict:
        try:
            return json.loads(_file(mappings / name).read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{mappings / name}: not valid JSON ({e})") from None

    folder_to_label = read_json("folder_to_objectnet_label.json")
    objectnet_to_imagenet = read_json("objectnet_to_imagenet_1k.json")
    imagenet_id_of_index = read_json("pytorch_to_imagenet_2012_id.json")
    index_of_imagenet_id = {int(v): int(k) for k, v in imagenet_id_of_index.items()}
    names = _file(mappings / "imagenet_to_label_2012_v2").read_text().splitlines()
    index_of_name = {n.strip(): index_of_imagenet_id[i] for i, n in enumerate(names) if i in index_of_imagenet_id}
    label_to_folder = {v: k for k, v in folder_to_label.items()}
    classes: dict[str, list[int]] = {}
    for label, imagenet_names in objectnet_to_imagenet.items():
        if label not in label_to_folder:
            raise UserError(f"{mappings / 'objectnet_to_imagenet_1k.json'}: ObjectNet label '{label}' has no "
                            f"folder in folder_to_objectnet_label.json")
        unknown = [n for n in imagenet_names.split("; ") if n not in index_of_name]
        if unknown:
            raise UserError(f"{mappings / 'objectnet_to_imagenet_1k.json'}: ImageNet class '{unknown[0]}' is not "
                            f"in imagenet_to_label_2012_v2")
        classes[label_to_folder[label]] = [index_of_name[n] for n in imagenet_names.split("; ")]
    bad = [i for ids in classes.values() for i in ids if i >= n_classes]
    if bad:
        raise UserError(f"{mappings / 'pytorch_to_imagenet_2012_id.json'}: class index {bad[0]} out of range "
                        f"0..{n_classes - 1}")
    folders = sorted(classes)
    images = _image_folder(path / "images")
    missing = [c for c in folders if c not in images.class_to_idx]
    if missing:
        raise MissingData(f"{path / 'images' / missing[0]} not found (a class folder of the ObjectNet mapping)")
    label_of = {images.class_to_idx[c]: i for i, c in enumerate(folders)}
    keep = [i for i, t in enumerate(images.targets) if t in label_of]
    labels = np.array([label_of[images.targets[i]] for i in keep], dtype=np.int64)
    width = max(len(v) for v in classes.values())
    groups = torch.tensor([(classes[c] * width)[:width] for c in folders])  # pad a group by repeating its classes
    return Split(Subset(images, keep), labels, str(path / "images"), len(folders), groups=groups, prep=crop_border)


def _given_names(names, n: int, what: str) -> list[str]:
    if isinstance(names, str) or len(names) != n:
        raise UserError(f"{what}: dataset.class_names must list {n} names, one per class")
    return [str(c) for c in names]


# ---------------------------------------------------------------------------------------- CIFAR-10

def cifar10(d: DictConfig, root: Path) -> Benchmark:
    """CIFAR-10 (torchvision's ``cifar-10-batches-py``) with CIFAR-10.1, CIFAR-10.2 and CIFAR-10-C."""
    from torchvision.datasets import CIFAR10

    f = d.folders
    base = root / CIFAR10.base_folder

    @cache
    def cifar(train: bool):
        for name, _ in CIFAR10.train_list + CIFAR10.test_list + [(CIFAR10.meta["filename"], "")]:
            _file(base / name)  # torchvision checks all of them for either split
        return _torchvision(lambda: CIFAR10(str(root), train=train, download=False), base)

    def ten(train: bool) -> Split:
        ds = cifar(train)
        return Split(ds, np.array(ds.targets, dtype=np.int64), str(base), len(ds.classes))

    @cache
    def holdout():
        return subsample(np.array(cifar(True).targets), d.id_val_size, True, d.subset_seed)

    def train() -> Split:
        split = ten(True)
        return split.take(np.setdiff1d(np.arange(len(split.labels)), holdout()))

    def arrays(images_path: Path, images: np.ndarray, labels: np.ndarray, labels_path: Path) -> Split:
        images = _images_array(images, images_path)
        return Split(ArrayImages(images), _labels_for(labels, len(images), labels_path), str(labels_path), 10)

    def cifar10_1() -> Split:
        path = root / f.cifar10_1
        data, labels = (path / f"cifar10.1_{d.cifar10_1_version}_{k}.npy" for k in ("data", "labels"))
        return arrays(data, _load_array(data), _load_array(labels), labels)

    def cifar10_2() -> Split:
        path = root / f.cifar10_2 / "cifar102_test.npz"
        with np.load(_file(path)) as npz:
            if not {"images", "labels"} <= set(npz.files):
                raise UserError(f"{path}: expected arrays 'images' and 'labels', found {npz.files}")
            return arrays(path, npz["images"], npz["labels"], path)

    def cifar10_c() -> Split:
        """Severity ``d.severity`` of each corruption: rows (s-1)*n..s*n of the 5 stacked severities."""
        path = root / f.cifar10_c
        labels = _load_array(path / "labels.npy")
        if len(labels) % 5:
            raise UserError(f"{path / 'labels.npy'}: {len(labels)} labels do not split into 5 severities")
        n = len(labels) // 5
        rows = slice((d.severity - 1) * n, d.severity * n)
        parts = []
        for i, c in enumerate(d.corruptions):
            images = _images_array(_load_array(path / f"{c}.npy"), path / f"{c}.npy")
            if len(images) != len(labels):
                raise UserError(f"{path / f'{c}.npy'}: {len(images)} images for {len(labels)} labels")
            parts.append(replace(arrays(path / f"{c}.npy", images[rows], labels[rows], path / "labels.npy"),
                                 meta=np.full(n, i)))
        return Split(ConcatDataset([p.images for p in parts]), np.concatenate([p.labels for p in parts]),
                     str(path / "labels.npy"), 10, meta=np.concatenate([p.meta for p in parts]))

    tests = {"cifar10_1": cifar10_1, "cifar10_2": cifar10_2}
    unknown = [t for t in d.test_sets if t not in tests]
    if unknown:
        raise UserError(f"cifar10: unknown test set(s) {unknown}; known: {', '.join(tests)}")

    def class_names() -> list[str]:
        return _given_names(d.class_names, 10, "cifar10") if d.class_names else list(cifar(True).classes)

    splits = {"train": train, "val_id": lambda: ten(True).take(holdout()), "val_ood": cifar10_c,
              "test_id": lambda: ten(False)}
    return Benchmark(base, class_names, splits | {f"test_{t}": tests[t] for t in d.test_sets})


# ------------------------------------------------------------------------ few-shot and transfer sets

def _three_splits(d: DictConfig, folder: Path, build: Callable[[str], Split], names: Callable[[], list[str]]
                  ) -> Benchmark:
    """A dataset with train/val/test splits; val is halved into the search's (val_ood) and early stopping's (val_id)."""

    @cache
    def validation() -> tuple[Split, Split]:
        return halves(build("val"), d.subset_seed)

    def class_names() -> list[str]:
        default = names()
        return _given_names(d.class_names, len(default), d.name) if d.class_names else default

    return Benchmark(folder, class_names, {"train": lambda: build("train"), "val_id": lambda: validation()[1],
                                           "val_ood": lambda: validation()[0], "test_id": lambda: build("test")})


def pcam(d: DictConfig, root: Path) -> Benchmark:
    """PatchCamelyon in torchvision's layout: ``pcam/camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5``."""
    from torchvision.datasets import PCAM

    def build(split: str) -> Split:
        for name, _, _ in PCAM._FILES[split].values():
            _file(root / "pcam" / name)
        ds = _torchvision(lambda: PCAM(str(root), split=split, download=False), root / "pcam")
        targets = ds._base_folder / ds._FILES[split]["targets"][0]
        with ds.h5py.File(targets) as h5:
            if "y" not in h5:
                raise UserError(f"{targets}: expected dataset 'y', found {list(h5)}")
            labels = np.asarray(h5["y"]).reshape(-1).astype(np.int64)
        with ds.h5py.File(ds._base_folder / ds._FILES[split]["images"][0]) as h5:
            if "x" not in h5 or len(h5["x"]) != len(labels):
                raise UserError(f"{targets.with_name(ds._FILES[split]['images'][0])}: expected dataset 'x' with "
                                f"{len(labels)} images")
        return Split(ds, labels, str(targets), 2)

    return _three_splits(d, root / "pcam", build, lambda: list(PCAM_CLASSNAMES))


def sst2(d: DictConfig, root: Path) -> Benchmark:
    """Rendered SST2 in torchvision's layout: ``rendered-sst2/{train,valid,test}/{negative,positive}/*.png``."""
    from torchvision.datasets import RenderedSST2

    def build(split: str) -> Split:
        folder = root / "rendered-sst2" / {"train": "train", "val": "valid", "test": "test"}[split]
        for label in ("negative", "positive"):
            _folder(folder / label)
        ds = _torchvision(lambda: RenderedSST2(str(root), split=split, download=False), folder)
        if not ds._samples:
            raise MissingData(f"{folder}: no images")
        return Split(ds, np.array([y for _, y in ds._samples], dtype=np.int64), str(folder), 2)

    return _three_splits(d, root / "rendered-sst2", build, lambda: ["negative", "positive"])


def flowers102(d: DictConfig, root: Path) -> Benchmark:
    """Flowers102 in torchvision's layout: ``flowers-102/{jpg/, imagelabels.mat, setid.mat}`` (checksums verified)."""
    from torchvision.datasets import Flowers102

    def build(split: str) -> Split:
        base = root / "flowers-102"
        for name in ("imagelabels.mat", "setid.mat"):
            _file(base / name)
        ds = _torchvision(lambda: Flowers102(str(root), split=split, download=False), base)
        _check_files(ds._image_files, f"flowers102 split '{split}'")
        return Split(ds, np.array(ds._labels, dtype=np.int64), str(base / "imagelabels.mat"), len(Flowers102.classes))

    return _three_splits(d, root / "flowers-102", build, lambda: list(Flowers102.classes))


def stanford_cars(d: DictConfig, root: Path) -> Benchmark:
    """StanfordCars in torchvision's layout; validation is a class-stratified part of train (no official one)."""
    from torchvision.datasets import StanfordCars

    base = root / "stanford_cars"

    @cache
    def load(split: str):
        annos = base / ("devkit/cars_train_annos.mat" if split == "train" else "cars_test_annos_withlabels.mat")
        for path in (annos, base / "devkit" / "cars_meta.mat"):
            _file(path)
        ds = _torchvision(lambda: StanfordCars(str(root), split=split, download=False), annos)
        _check_files([p for p, _ in ds._samples], f"stanford_cars split '{split}'")
        return Split(ds, np.array([y for _, y in ds._samples], dtype=np.int64), str(annos), len(ds.classes))

    @cache
    def train_val() -> list[Split]:
        split = load("train")
        return [split.take(p) for p in stratified_split(split.labels, (1 - d.val_fraction, d.val_fraction),
                                                         d.subset_seed)]

    def build(split: str) -> Split:
        return {"train": lambda: train_val()[0], "val": lambda: train_val()[1], "test": lambda: load("test")}[split]()

    return _three_splits(d, base, build, lambda: [str(c) for c in load("train").images.classes])


def caltech101(d: DictConfig, root: Path) -> Benchmark:
    """Caltech101 in torchvision's layout, split per class into train/val/test by ``d.split_fractions``."""
    from torchvision.datasets import Caltech101

    base = root / "caltech101"

    @cache
    def load():
        _folder(base / "101_ObjectCategories")  # torchvision would create an empty caltech101/
        ds = _torchvision(lambda: Caltech101(str(root), download=False), base)
        _check_files([base / "101_ObjectCategories" / ds.categories[y] / f"image_{i:04d}.jpg"
                      for y, i in zip(ds.y, ds.index, strict=True)], "caltech101")
        return ds

    @cache
    def parts() -> list[Split]:
        ds = load()
        split = Split(ds, np.array(ds.y, dtype=np.int64), str(base / "101_ObjectCategories"), len(ds.categories))
        return [split.take(p) for p in stratified_split(split.labels, tuple(d.split_fractions), d.subset_seed)]

    def names() -> list[str]:
        """CLIP's curated name of each category folder (see autoft/data_files/caltech101_classnames.json)."""
        curated = json.loads(files("autoft").joinpath("data_files/caltech101_classnames.json").read_text())["classes"]
        unknown = [c for c in load().categories if c not in curated]
        if unknown:
            raise UserError(f"{base / '101_ObjectCategories' / unknown[0]}: not one of Caltech101's 101 categories, "
                            f"which CLIP's class names are for (or set dataset.class_names)")
        return [curated[c] for c in load().categories]

    return _three_splits(d, base, lambda s: parts()[("train", "val", "test").index(s)], names)


# ---------------------------------------------------------------------------------------- dispatch

BENCHMARKS: dict[str, Callable[[DictConfig, Path], Benchmark]] = {
    "imagenet": imagenet, "cifar10": cifar10, "pcam": pcam, "sst2": sst2, "caltech101": caltech101,
    "stanford_cars": stanford_cars, "flowers102": flowers102,
}


def kind_of(d: DictConfig) -> str:
    kind = d.get("kind") or "wilds"
    if kind != "wilds" and kind not in BENCHMARKS:
        raise UserError(f"unknown dataset kind '{kind}'; known: wilds, {', '.join(BENCHMARKS)}")
    return kind


def benchmark(d: DictConfig, root: str | Path) -> Benchmark:
    """The dataset a (non-WILDS) config names, read from ``root``; one clear error if the root is not there."""
    root = Path(root)
    if not root.is_dir():
        raise MissingData(f"data root {root} does not exist (set dataset.root=... or AUTOFT_DATA)")
    return BENCHMARKS[kind_of(d)](d, root)


class ArticleTemplate(str):
    """A prompt template with an ``{article}`` field: "a", or "an" before a class name that starts with a
    vowel letter, as the reference code's ``append_proper_article`` chooses (FMoW's "satellite photo of
    {article} {}."). ``format(name)`` works as on any template, so the model needs no other kind."""

    def format(self, *args, **kwargs) -> str:
        article = "an" if str(args[0])[:1].lower() in "aeiou" else "a"
        return str.format(self, *args, article=article, **kwargs)


def templates(spec: str | Sequence[str]) -> list[str]:
    """Prompt templates: a list of ``{}`` strings (with ``{article}`` where the article depends on the class
    name), or the name of OpenAI's ImageNet set shipped with open_clip."""
    if not isinstance(spec, str):
        return [ArticleTemplate(t) if "{article}" in str(t) else str(t) for t in spec]
    from open_clip import zero_shot_metadata as meta

    sets = {"openai_imagenet": meta.OPENAI_IMAGENET_TEMPLATES, "simple_imagenet": meta.SIMPLE_IMAGENET_TEMPLATES}
    if spec not in sets:
        raise UserError(f"unknown template set '{spec}'; give a list or one of {', '.join(sets)}")
    return [t("{}") for t in sets[spec]]


@dataclass
class DataSource:
    """A dataset read and checked before any model exists (its files, metadata, splits, labels and class
    names: a run fails on bad data before it loads weights); :meth:`module` adds the model's transforms."""

    config: DictConfig
    root: str
    class_names: list[str]
    wilds: WildsSource | None = None
    splits: dict[str, Split] | None = None

    def module(self, train_transform: Callable, eval_transform: Callable):
        """The data module: a :class:`WildsDataModule` or a :class:`ClassificationDataModule`."""
        d = self.config
        common = dict(batch_size=d.batch_size, eval_batch_size=d.eval_batch_size, num_workers=d.num_workers,
                      ood_val_size=d.ood_val_size, ood_val_balanced=d.ood_val_balanced, subset_seed=d.subset_seed,
                      shots=d.get("shots"), cache=bool(d.get("cache", False)),
                      on_bad_image=d.get("on_bad_image", "error"))
        if self.wilds is not None:
            return WildsDataModule(d.name, self.root, train_transform, eval_transform, source=self.wilds, **common)
        return ClassificationDataModule(self.splits, self.class_names, train_transform, eval_transform,
                                        ood_val_shots=d.get("ood_val_shots"), name=d.name, **common)


def open_data(d: DictConfig, root: str | Path) -> DataSource:
    """Read and check the dataset a config names (``kind``; none: a WILDS dataset) under ``root``."""
    check_policy(d.get("on_bad_image", "error"))
    if kind_of(d) == "wilds":
        source = open_wilds(d.name, root, d.get("class_names"))
        return DataSource(d, str(root), source.class_names, wilds=source)
    bench = benchmark(d, root)
    splits = {key: build() for key, build in bench.splits.items()}
    for key, split in splits.items():
        split.check(key)
    return DataSource(d, str(root), bench.class_names(), splits=splits)


def make_data(d: DictConfig, root: str | Path, train_transform: Callable, eval_transform: Callable):
    """The data module a dataset config names, with the model's transforms."""
    return open_data(d, root).module(train_transform, eval_transform)


def check_root(d: DictConfig, root: str | Path) -> None:
    """Fail fast when the dataset's folder is not under ``root``."""
    if kind_of(d) == "wilds":
        wilds_folder(d.name, root)
    else:
        _folder(benchmark(d, root).folder)
