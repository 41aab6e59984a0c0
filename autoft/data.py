"""WILDS datasets as Lightning data modules, built on the datasets' own loaders; seeded subsets.

WILDS datasets go through ``wilds.get_dataset(..., download=False)``, its subsets, its
``get_train_loader``/``get_eval_loader`` and its ``dataset.eval`` metrics, so the numbers are
the benchmark's own. Training uses the model's augmenting transform; every evaluation split
uses the eval transform. With ``cache`` the images come from the preprocessing cache (see
"preprocessing cache" below) and the transforms' tensor part runs on the device. Before wilds
reads a folder, the metadata it relies on is checked, so a malformed dataset is one line naming
the file and field instead of an assertion deep in wilds.

Two known wilds 2.0.0 traps are fixed here, once, at import:
* ``avg_over_groups`` (FMoW's per-region and per-year accuracy) imports ``torch_scatter``, which
  wilds does not declare and which only builds from source; without it, a pure-torch equivalent
  (``index_add_`` over groups, same values: a group's mean, 0 for an empty group) is used.
* FMoW's timestamps mix second and millisecond precision; pandas >= 2 refuses to parse them with
  one inferred format (p-lambda/wilds#146). wilds' FMoW module gets a pandas whose
  ``to_datetime`` defaults to ISO 8601.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import math
import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from wilds.common.data_loaders import get_eval_loader, get_train_loader
from wilds.datasets.wilds_dataset import WILDSSubset

from autoft import UserError
from autoft.prefetch import PrefetchLoader

log = logging.getLogger(__name__)
# loader name -> WILDS split. "val_ood" is the (small) OOD validation set the search scores on.
EVAL_SPLITS = {"val_id": "id_val", "val_ood": "val", "test_id": "id_test", "test_ood": "test"}
WILDS_FOLDERS = {"iwildcam": "iwildcam_v2.0", "fmow": "fmow_v1.1"}
WILDS_SPLITS = ("train", "id_val", "id_test", "val", "test")


class MissingData(UserError):
    """A file or folder the dataset needs is not there (the data checker reports it as missing)."""


def _class_ranks(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each example's position in its class's random order, plus a jitter in [0, 0.5) that interleaves classes."""
    rank = np.empty(len(labels))
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    for members in by_class:
        rank[members] = np.arange(len(members)) + rng.random(len(members)) * 0.5
    return rank


def subsample(labels: np.ndarray, size: int | None, balanced: bool, seed: int) -> np.ndarray:
    """Positions of a seeded subset of ``size`` examples; class-balanced if asked.

    Balanced: classes take turns, each contributing its examples in random order, so every
    class gets ``size // K`` where it has that many and the rest spill to the larger classes.
    """
    n = len(labels)
    rng = np.random.default_rng(seed)
    if size is None or size >= n:
        return np.arange(n)
    if not balanced:
        return np.sort(rng.permutation(n)[:size])
    return np.sort(np.argsort(_class_ranks(labels, rng), kind="stable")[:size])


def k_shot(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Positions of a seeded k-shot set: ``k`` random examples of every class (all of a smaller class).

    The same draw as :func:`subsample` balanced to ``k * K`` examples when every class has ``k``:
    a class's first k in its random order.
    """
    if k < 1:
        raise UserError(f"shots must be a positive number of examples per class, got {k}")
    return np.flatnonzero(_class_ranks(labels, np.random.default_rng(seed)) < k)


def stratified_split(labels: np.ndarray, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Seeded class-stratified split into parts of the given fractions (each class cut the same way)."""
    if not np.isclose(sum(fractions), 1.0) or min(fractions) <= 0:
        raise UserError(f"split fractions must be positive and sum to 1, got {list(fractions)}")
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        cuts = np.round(np.cumsum(fractions)[:-1] * len(members)).astype(int)
        for part, chunk in zip(parts, np.split(members, cuts), strict=True):
            part.append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]


def _avg_over_groups(v: torch.Tensor, g: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """wilds' ``avg_over_groups`` without torch_scatter: per-group mean of ``v`` (0 where a group is empty)."""
    from wilds.common.utils import get_counts

    counts = get_counts(g, n_groups)
    sums = torch.zeros(n_groups, dtype=v.dtype, device=v.device).index_add_(0, g, v)
    return sums / counts.clamp(min=1).to(v.dtype), counts


class _ISO8601Pandas:
    """pandas as wilds' FMoW module sees it: ``to_datetime`` parses ISO 8601 of mixed precision."""

    def __getattr__(self, name: str):
        return getattr(pd, name)

    @staticmethod
    def to_datetime(arg, **kwargs):
        return pd.to_datetime(arg, **({"format": "ISO8601"} | kwargs))


def _patch_wilds() -> None:
    import wilds.common.metrics.metric as metric
    import wilds.datasets.fmow_dataset as fmow

    try:
        import torch_scatter  # noqa: F401
    except ImportError:
        metric.avg_over_groups = _avg_over_groups
    fmow.pd = _ISO8601Pandas()


_patch_wilds()


def class_names_from(folder: Path) -> list[str]:
    """Class names from the dataset's ``categories.csv`` (columns ``y`` and ``name``)."""
    path = folder / "categories.csv"
    if not path.is_file():
        raise MissingData(f"{path} not found: class names are needed for the zero-shot head "
                          f"(or set dataset.class_names)")
    df = pd.read_csv(path)
    if not {"y", "name"} <= set(df.columns):
        raise UserError(f"{path}: expected columns 'y' and 'name', found {list(df.columns)}")
    return [str(n) for n in df.sort_values("y")["name"]]


def fmow_class_names() -> list[str]:
    """FMoW's 62 categories, in wilds' label order, as words ("airport_hangar" -> "airport hangar")."""
    from wilds.datasets.fmow_dataset import categories

    return [c.replace("_", " ") for c in categories]


def wilds_folder(name: str, root: str | Path) -> Path:
    """The dataset's folder under ``root``, or one clear error if it is not there."""
    if name not in WILDS_FOLDERS:
        raise UserError(f"unknown WILDS dataset '{name}'; known: {', '.join(WILDS_FOLDERS)}")
    folder = Path(root) / WILDS_FOLDERS[name]
    if not folder.is_dir():
        raise MissingData(f"{name}: data folder {folder} does not exist (set dataset.root "
                          f"to the folder that holds {WILDS_FOLDERS[name]}/)")
    return folder


def _read_csv(path: Path, columns: Sequence[str]) -> pd.DataFrame:
    if not path.is_file():
        raise MissingData(f"{path} not found")
    df = pd.read_csv(path)
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {missing}; expected {list(columns)}, found {list(df.columns)}")
    return df


def _integers(df: pd.DataFrame, column: str, path: Path, contiguous: bool) -> np.ndarray:
    """A column of non-negative integers; ``contiguous``: every value 0..max is used (wilds asserts it)."""
    values = pd.to_numeric(df[column], errors="coerce")
    if values.isna().any() or (values % 1 != 0).any() or (values < 0).any():
        bad = df[column][values.isna() | (values % 1 != 0) | (values < 0)].iloc[0]
        raise UserError(f"{path}: column '{column}' must hold non-negative integers, found {bad!r}")
    values = values.to_numpy(dtype=np.int64)
    if contiguous and len(values) and len(np.unique(values)) != values.max() + 1:
        gaps = sorted(set(range(values.max() + 1)) - set(values.tolist()))[:5]
        raise UserError(f"{path}: column '{column}' must use every value 0..{values.max()} (wilds requires it); "
                        f"missing {gaps}")
    return values


def _first_missing_image(paths: Sequence[Path], what: str) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise MissingData(f"{what}: image file missing: {missing[0]}{more}")


def _split_rows(name: str, splits: dict[str, np.ndarray], path: Path, images: Callable[[np.ndarray], list[Path]],
                split: str) -> str:
    rows = splits[split]
    if not len(rows):
        raise MissingData(f"{path}: split '{split}' has no rows")
    _first_missing_image(images(rows), f"{name} split '{split}'")
    return f"{len(rows)} examples"


def iwildcam_checks(folder: Path, class_names: Sequence[str] | None) -> dict[str, Callable[[], str]]:
    """What wilds' iWildCam v2.0 reader relies on, each a check that returns a summary or raises one clear line."""
    path = folder / "metadata.csv"
    cache: dict[str, Any] = {}  # what metadata() read, for the split checks
    names = list(class_names or [])

    def categories() -> str:
        names.extend(class_names_from(folder))
        return f"{len(names)} class names"

    def metadata() -> str:
        df = _read_csv(path, ["split", "filename", "y", "location_remapped", "sequence_remapped", "datetime"])
        bad = sorted(set(df["split"].astype(str)) - set(WILDS_SPLITS))
        if bad:
            raise UserError(f"{path}: column 'split' has unknown value(s) {bad}; expected {list(WILDS_SPLITS)}")
        y = _integers(df, "y", path, contiguous=False)
        if names and len(y) and y.max() >= len(names):
            raise UserError(f"{path}: column 'y' has label {y.max()} out of range 0..{len(names) - 1} "
                            f"({len(names)} class names)")
        _integers(df, "y", path, contiguous=True)
        for column in ("location_remapped", "sequence_remapped"):
            _integers(df, column, path, contiguous=True)
        try:
            df["datetime"].astype(str).map(lambda t: datetime.datetime.strptime(t, "%Y-%m-%d %H:%M:%S.%f"))
        except ValueError as e:
            raise UserError(f"{path}: column 'datetime' must read as YYYY-MM-DD hh:mm:ss.ffffff: {e}") from None
        cache["files"] = df["filename"].astype(str).to_numpy()
        cache["splits"] = {s: np.flatnonzero(df["split"].to_numpy() == s) for s in WILDS_SPLITS}
        return f"{len(df)} rows, {y.max() + 1 if len(y) else 0} classes"

    def images(rows: np.ndarray) -> list[Path]:
        return [folder / "train" / f for f in cache["files"][rows]]

    checks: dict[str, Callable[[], str]] = {"RELEASE_v2.0.txt": lambda: present(folder / "RELEASE_v2.0.txt")}
    if not class_names:
        checks["categories.csv"] = categories
    checks["metadata.csv"] = metadata
    for split in WILDS_SPLITS:
        checks[f"split {split}"] = lambda s=split: _split_rows("iwildcam", cache["splits"], path, images, s)
    return checks


def fmow_checks(folder: Path) -> dict[str, Callable[[], str]]:
    """What wilds' FMoW v1.1 reader relies on (default split scheme: OOD years from 2013, test from 2016)."""
    from wilds.datasets.fmow_dataset import categories

    path = folder / "rgb_metadata.csv"
    cache: dict[str, Any] = {}  # what metadata() read, for the split checks

    def metadata() -> str:
        df = _read_csv(path, ["split", "category", "country_code", "timestamp"])
        bad = sorted(set(df["split"].astype(str)) - {"train", "val", "test", "seq"})
        if bad:
            raise UserError(f"{path}: column 'split' has unknown value(s) {bad}; expected train, val, test, seq")
        unknown = sorted(set(df["category"].astype(str)) - set(categories))
        if unknown:
            raise UserError(f"{path}: column 'category' has label(s) {unknown[:3]} outside FMoW's 62 categories")
        try:
            ts = pd.to_datetime(df["timestamp"], format="ISO8601")
        except (ValueError, TypeError) as e:
            raise UserError(f"{path}: column 'timestamp' must be ISO 8601 with a timezone: {e}") from None
        if not isinstance(ts.dtype, pd.DatetimeTZDtype):
            raise UserError(f"{path}: column 'timestamp' needs a timezone (e.g. 2016-03-01T10:00:00Z), "
                            f"found {df['timestamp'].iloc[0]!r}")
        year = ts.dt.tz_convert("UTC").dt.year.to_numpy()  # wilds compares with UTC years
        if len(year) and (year.min() < 2002 or year.max() > 2017):
            raise UserError(f"{path}: column 'timestamp' has years outside 2002..2017, which wilds cannot group")
        split = df["split"].to_numpy()
        ood_val, ood_test = (year >= 2013) & (year < 2016), year >= 2016
        cache["splits"] = {
            "train": np.flatnonzero((split == "train") & (year < 2013)),
            "id_val": np.flatnonzero((split == "val") & (year < 2013)),
            "id_test": np.flatnonzero((split == "test") & (year < 2013)),
            "val": np.flatnonzero((split == "val") & ood_val),
            "test": np.flatnonzero((split == "test") & ood_test),
        }
        return f"{len(df)} rows"

    def regions() -> str:
        df = _read_csv(folder / "country_code_mapping.csv", ["alpha-3", "region"])
        return f"{df['region'].nunique()} regions"

    def images(rows: np.ndarray) -> list[Path]:
        return [folder / "images" / f"rgb_img_{i}.png" for i in rows]

    checks: dict[str, Callable[[], str]] = {
        "RELEASE_v1.1.txt": lambda: present(folder / "RELEASE_v1.1.txt"),
        "rgb_metadata.csv": metadata,
        "country_code_mapping.csv": regions,
    }
    for split in WILDS_SPLITS:
        checks[f"split {split}"] = lambda s=split: _split_rows("fmow", cache["splits"], path, images, s)
    return checks


def present(path: Path) -> str:
    """"present" if ``path`` exists, else :class:`MissingData` naming it."""
    if not path.exists():
        raise MissingData(f"{path} not found")
    return "present"


def wilds_checks(name: str, root: str | Path, class_names: Sequence[str] | None = None) -> dict[str, Callable[[], str]]:
    """Every check of one WILDS dataset folder, in order (later checks use what earlier ones read)."""
    folder = wilds_folder(name, root)
    return fmow_checks(folder) if name == "fmow" else iwildcam_checks(folder, class_names)


# ------------------------------------------------------------------------------ preprocessing cache
#
# Decoding and resizing an image is the slow part of a data path (a 1920x1080 JPEG: about 24 images/s
# per CPU core), and a search reads the same images in every trial. The cache runs the deterministic
# part of the model's eval transform (decode, resize, center crop) once per image and keeps the result
# as uint8 [N, H, W, 3] in a memory-mapped .npy under $AUTOFT_CACHE/images/, keyed by the dataset's
# identity (folder, split, rows, metadata file size and mtime) and by that transform part. Loaders
# then read whole batches with one fancy index, and the rest of the transform runs on the batch on
# the training device (:func:`model_input`): to float, normalise, and for training the same kind of
# augmentation as the model's train transform (random resized crop, flip).


_DETERMINISTIC_OPS = {"Resize", "CenterCrop", "MaybeConvertMode", "ResizeKeepRatio", "CenterCropOrPad",
                      "_convert_to_rgb", "ResizeMaxSize"}
_TO_TENSOR_OPS = {"ToTensor", "MaybeToTensor"}
_CONVERT_OPS = {"MaybeConvertMode", "_convert_to_rgb"}


def _op_name(op) -> str:
    return getattr(op, "__name__", type(op).__name__)


@dataclass(frozen=True)
class TensorPrep:
    """A torchvision ``Compose`` split in two: ``pil`` (deterministic: decode, resize, crop; cached once)
    and what runs per batch on uint8 tensors: an optional random resized crop and flip, then normalise."""

    pil: Callable
    key: str                                  # repr of the cached part: part of the cache key
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop: tuple | None = None                 # RandomResizedCrop: (size, scale, ratio, grid_sample mode)
    flip: float = 0.0                         # RandomHorizontalFlip's probability


def _normalize_of(ops: Sequence) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """mean, std of the ops after ToTensor, which must be nothing or one Normalize."""
    if not ops:
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if len(ops) != 1 or _op_name(ops[0]) != "Normalize":
        return None
    mean, std = ops[0].mean, ops[0].std
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def eval_prep(transform: Callable) -> TensorPrep | None:
    """The cacheable form of an eval transform (deterministic PIL ops, ToTensor, Normalize), else None."""
    from torchvision import transforms as T

    ops = list(getattr(transform, "transforms", []))
    names = [_op_name(o) for o in ops]
    cut = next((i for i, n in enumerate(names) if n in _TO_TENSOR_OPS), None)
    if cut is None or not set(names[:cut]) <= _DETERMINISTIC_OPS:
        return None
    norm = _normalize_of(ops[cut + 1:])
    if norm is None:
        return None
    return TensorPrep(T.Compose(ops[:cut]), repr(T.Compose(ops[:cut])), *norm)


def train_prep(transform: Callable, cached: TensorPrep, size: tuple[int, int]) -> TensorPrep | None:
    """The train transform as tensor ops on the cached images of ``size`` (H, W), else None.

    Supported: the eval transform's own PIL part (no augmentation), or RandomResizedCrop to the cached
    size and/or RandomHorizontalFlip, with colour conversion, ToTensor and Normalize.
    """
    ops = list(getattr(transform, "transforms", []))
    names = [_op_name(o) for o in ops]
    cut = next((i for i, n in enumerate(names) if n in _TO_TENSOR_OPS), None)
    if cut is None:
        return None
    norm = _normalize_of(ops[cut + 1:])
    if norm is None:
        return None
    from torchvision import transforms as T

    if repr(T.Compose(ops[:cut])) == cached.key:  # trains on the eval transform: no augmentation
        return replace(cached, mean=norm[0], std=norm[1])
    crop, flip = None, 0.0
    for op, name in zip(ops[:cut], names[:cut], strict=True):
        if name == "RandomResizedCrop" and crop is None:
            if tuple(op.size) != tuple(size):
                return None
            mode = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest"}.get(op.interpolation.value)
            if mode is None:
                return None
            crop = (tuple(op.size), tuple(op.scale), tuple(op.ratio), mode)
        elif name == "RandomHorizontalFlip":
            flip = float(op.p)
        elif name not in _CONVERT_OPS:
            return None
    return replace(cached, mean=norm[0], std=norm[1], crop=crop, flip=flip)


def random_resized_crop(x: torch.Tensor, size: tuple[int, int], scale: tuple[float, float],
                        ratio: tuple[float, float], mode: str = "bilinear", flip: float = 0.0,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """torchvision's RandomResizedCrop (and horizontal flip) for a float batch [B, C, H, W], one crop per
    image, in one ``grid_sample`` on the batch's device with ``generator`` or the global RNG (seeded by the
    trial's seed).

    The same distribution of crop boxes (area in ``scale``, log-uniform aspect ratio in ``ratio``, 10
    tries, then the whole image), but boxes are not rounded to whole pixels and the crop is read from
    the cached (resized, center-cropped) image rather than the original file, by ``grid_sample``
    instead of PIL's resampling: the same kind of augmentation, not bit-identical to PIL's.
    """
    b, _, h, w = x.shape
    dev = x.device
    area = torch.empty(b, 10, device=dev).uniform_(*scale, generator=generator) * (h * w)
    aspect = torch.exp(torch.empty(b, 10, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1]),
                                                               generator=generator))
    cw, ch = torch.sqrt(area * aspect), torch.sqrt(area / aspect)
    ok = (cw <= w) & (ch <= h)
    first = ok.int().argmax(dim=1, keepdim=True)
    found = ok.any(dim=1)
    fw, fh = (float(w), float(h))
    if w / h < min(ratio):  # torchvision's fallback: the whole image, clipped to the ratio range
        fh = w / min(ratio)
    elif w / h > max(ratio):
        fw = h * max(ratio)
    cw = torch.where(found, cw.gather(1, first).squeeze(1), fw)
    ch = torch.where(found, ch.gather(1, first).squeeze(1), fh)
    pos = torch.rand(b, 2, device=dev, generator=generator)
    top = torch.where(found, pos[:, 0] * (h - ch), (h - ch) / 2)
    left = torch.where(found, pos[:, 1] * (w - cw), (w - cw) / 2)
    sx, sy = cw / w, ch / h
    if flip > 0:
        sx = torch.where(torch.rand(b, device=dev, generator=generator) < flip, -sx, sx)
    theta = torch.zeros(b, 2, 3, device=dev, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 1, 1] = sx, sy
    theta[:, 0, 2], theta[:, 1, 2] = (2 * left + cw) / w - 1, (2 * top + ch) / h - 1
    grid = F.affine_grid(theta, [b, x.shape[1], *size], align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=False)


_NORM_CONSTANTS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def model_input(images: torch.Tensor, prep: TensorPrep, train: bool = False,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Cached uint8 images [B, H, W, 3] (on any device) -> the model's float input [B, 3, H', W'] in
    channels_last memory: the same values as ToTensor + Normalize of the PIL path, plus the train
    transform's random crop and flip when ``train``."""
    x = images.permute(0, 3, 1, 2).float()  # NCHW view of NHWC memory: channels_last
    if train and (prep.crop is not None or prep.flip > 0):
        size, scale, ratio, mode = prep.crop or (tuple(x.shape[2:]), (1.0, 1.0), (1.0, 1.0), "nearest")
        x = random_resized_crop(x, size, scale, ratio, mode, prep.flip, generator).clamp_(0, 255)
        x = x.contiguous(memory_format=torch.channels_last)
    key = (prep.mean, prep.std, x.device)
    if key not in _NORM_CONSTANTS:
        _NORM_CONSTANTS[key] = (torch.tensor(prep.mean, device=x.device).view(1, -1, 1, 1),
                                torch.tensor(prep.std, device=x.device).view(1, -1, 1, 1))
    mean, std = _NORM_CONSTANTS[key]
    return x.div_(255).sub_(mean).div_(std)  # ToTensor's /255, then Normalize's (x - mean) / std


class _Prepped(Dataset):
    """``prep(load(i))`` as uint8 [H, W, 3]: what the cache stores (built in DataLoader workers)."""

    def __init__(self, images: Dataset, pil: Callable):
        self.images, self.pil = images, pil

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> np.ndarray:
        return np.asarray(self.pil(self.images[i]).convert("RGB"), dtype=np.uint8)


def _stack(items: list[np.ndarray]) -> list[np.ndarray]:
    return items


def image_cache_path(name: str, signature: dict[str, Any], prep: TensorPrep) -> Path:
    from autoft.world import cache_dir, config_hash

    return cache_dir() / "images" / f"{name}-{config_hash({'images': signature, 'prep': prep.key})}.npy"


@dataclass(eq=False)
class CacheFile:
    """A cache file not necessarily written yet: :func:`image_cache`'s arguments, run on first use, so a
    run caches only the splits it reads (a search never reads the test splits)."""

    name: str
    signature: dict[str, Any]
    images: Dataset
    prep: TensorPrep
    num_workers: int = 0

    @property
    def path(self) -> Path:
        return image_cache_path(self.name, self.signature, self.prep)

    def write(self) -> Path:
        return image_cache(self.name, self.signature, self.images, self.prep, self.num_workers)

    def image_size(self) -> tuple[int, int]:
        """(H, W) of the cached images, without writing the file."""
        if self.path.is_file():
            return tuple(np.load(self.path, mmap_mode="r").shape[1:3])
        return tuple(np.asarray(self.prep.pil(self.images[0])).shape[:2])


def image_cache(name: str, signature: dict[str, Any], images: Dataset, prep: TensorPrep,
                num_workers: int = 0) -> Path:
    """The cache file of ``images`` (PIL images) after ``prep.pil``, written once (atomically) and reused.

    ``signature`` identifies the images (dataset folder, split, rows, metadata stat); the file name is
    ``<name>-<hash of signature and prep>.npy``, a uint8 array [N, H, W, 3].
    """
    path = image_cache_path(name, signature, prep)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    source = _Prepped(images, prep.pil)
    first = source[0]
    log.info("caching %d %s images as uint8 %s into %s", len(source), name, list(first.shape), path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(source), *first.shape))
        # its own generator: written inside a trial, the cache must not draw from the trial's seeded RNG
        loader = DataLoader(source, batch_size=64, num_workers=num_workers, collate_fn=_stack,
                            generator=torch.Generator())
        start = 0
        for batch in loader:
            for offset, image in enumerate(batch):
                if image.shape != first.shape:
                    raise UserError(f"{name}: image {start + offset} is {list(image.shape)} after "
                                    f"{prep.key}, not {list(first.shape)}: images of one size are needed to "
                                    f"cache them (set dataset.cache=false)")
                out[start + offset] = image
            start += len(batch)
        out.flush()
        del out
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def file_stat(path: Path) -> list[int]:
    """Size and mtime of a file, for cache keys (0, 0 when missing)."""
    try:
        st = path.stat()
    except OSError:
        return [0, 0]
    return [st.st_size, st.st_mtime_ns]


def rows_hash(rows: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(rows, dtype=np.int64).tobytes()).hexdigest()[:16]


class CachedImages(Dataset):
    """One split from the cache: ``(uint8 [H, W, 3], label, metadata)``; a batch of indices is read with
    one fancy index (``__getitems__``). ``file``: a written cache file, or a :class:`CacheFile` written
    on first use. The array is opened lazily, once per process (workers too)."""

    def __init__(self, file: Path | CacheFile, rows: np.ndarray, y: torch.Tensor, metadata: torch.Tensor):
        self.file = file
        self.path = file.path if isinstance(file, CacheFile) else Path(file)
        self.rows, self.y, self.metadata = np.asarray(rows, dtype=np.int64), y, metadata
        self._array: np.ndarray | None = None

    def __getstate__(self):  # workers open the written file themselves, never receive its bytes
        return self.__dict__ | {"_array": None, "file": self.path}

    def ensure(self) -> CachedImages:
        """Write the cache file if it is not there yet."""
        if isinstance(self.file, CacheFile) and not self.path.is_file():
            self.file.write()
        return self

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self.ensure().path, mmap_mode="r")
        return self._array

    @property
    def image_size(self) -> tuple[int, int]:
        if self._array is None and isinstance(self.file, CacheFile):
            return self.file.image_size()
        return tuple(self.array.shape[1:3])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        return torch.from_numpy(np.array(self.array[self.rows[i]])), self.y[i], self.metadata[i]

    def __getitems__(self, indices: list[int]):
        idx = np.asarray(indices, dtype=np.int64)
        return torch.from_numpy(self.array[self.rows[idx]]), self.y[idx], self.metadata[idx]


def _batch(batch):
    return batch  # CachedImages.__getitems__ already returns a batch


class CachedLoaders:
    """Loaders over :class:`CachedImages` splits for a Lightning data module (mixed in).

    ``self.cached`` maps loader names to cached splits; a name not in it uses the module's own loader.
    Loaders are built once and reused by every trial of a search (persistent workers when
    ``num_workers > 0``: they only read the memory map, all randomness (order, crops) is drawn in the
    main process and on the device from the trial's seed). ``on_after_batch_transfer`` turns uint8
    batches into the model's input on the device.
    """

    cached: dict[str, CachedImages]
    val_keys: tuple[str, ...] = ("val_id", "val_ood")  # what val_dataloader returns (a search trial: val_ood)
    prep: TensorPrep | None = None
    train_prep: TensorPrep | None = None

    def _setup_cache(self, cached: dict[str, CachedImages], train_transform: Callable) -> None:
        self.cached, self._loaders = cached, {}
        if "train" in cached:
            self.train_prep = train_prep(train_transform, self.prep, cached["train"].image_size)
            if self.train_prep is None:  # an augmentation the tensor path does not have: train from files
                log.info("dataset.cache: train transform %s has no tensor form; training reads image files",
                         train_transform)
                del self.cached["train"]

    def _cached_loader(self, key: str) -> DataLoader:
        if key not in self._loaders:
            data, train = self.cached[key].ensure(), key == "train"
            bs = self.batch_size if train else self.eval_batch_size
            self._loaders[key] = PrefetchLoader(
                data, batch_size=bs, shuffle=train, drop_last=train and len(data) > bs, collate_fn=_batch,
                num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                pin_memory=torch.cuda.is_available(), prepare=self._train_input if train and self._on_cpu() else None)
        return self._loaders[key]

    def _on_cpu(self) -> bool:
        """Training on the CPU: the train loader then makes the model's input itself (see autoft.prefetch)."""
        trainer = getattr(self, "trainer", None)
        return trainer is not None and trainer.strategy.root_device.type == "cpu"

    def _train_input(self, batch, generator: torch.Generator):
        x, y, meta = batch
        return model_input(x, self.train_prep, train=True, generator=generator), y, meta

    def _eval_dataset(self, key: str) -> Dataset:
        """Split ``key`` read from its files through the eval transform (the train split too)."""
        raise NotImplementedError

    def plain_batches(self, key: str, device: torch.device | str = "cpu"):
        """``(x, y, metadata)`` batches of any split, the train split included, un-augmented and in
        order, as model inputs on ``device``: what a linear probe's frozen features are computed from.
        Works outside a trainer (the cached path applies the eval preprocessing here)."""
        if key in self.cached:
            loader = DataLoader(self.cached[key].ensure(), batch_size=self.eval_batch_size, collate_fn=_batch,
                                num_workers=self.num_workers)
        else:
            loader = DataLoader(self._eval_dataset(key), batch_size=self.eval_batch_size, num_workers=self.num_workers)
        for x, y, meta in loader:
            x = x.to(device)
            if x.dtype == torch.uint8 and self.prep is not None:
                x = model_input(x, self.prep)
            yield x, y, meta

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        x, y, meta = batch
        if x.dtype != torch.uint8 or self.prep is None:
            return batch
        training = self.trainer is not None and self.trainer.training
        return model_input(x, self.train_prep if training else self.prep, train=training), y, meta


class _WildsInputs(Dataset):
    """The PIL images of some rows of a WILDS dataset (what the cache decodes)."""

    def __init__(self, dataset, indices: np.ndarray):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        row = int(self.indices[i])
        try:
            return self.dataset.get_input(row)
        except OSError as e:  # PIL's "cannot identify image file '<path>'" and unreadable files
            raise UserError(f"unreadable image (row {row} of {self.dataset.dataset_name}): {e}") from None


class WildsDataModule(CachedLoaders, pl.LightningDataModule):
    """Train / ID-val / OOD-val / ID-test / OOD-test loaders for one WILDS dataset.

    ``shots``: train on a seeded k-shot subset (k examples per class) instead of the whole train split.
    ``cache``: read images from the preprocessing cache (whole WILDS splits, so any subset reuses
    them), labels and metadata from the wilds subsets as before; ``dataset.eval`` is unchanged.
    """

    def __init__(self, name: str, root: str | Path, train_transform: Callable, eval_transform: Callable,
                 batch_size: int = 128, eval_batch_size: int = 512, num_workers: int = 0,
                 ood_val_size: int | None = None, ood_val_balanced: bool = False, subset_seed: int = 0,
                 class_names: Sequence[str] | None = None, shots: int | None = None, cache: bool = False):
        super().__init__()
        self.folder = wilds_folder(name, root)
        for check in wilds_checks(name, root, class_names).values():
            check()
        import wilds

        try:
            self.dataset = wilds.get_dataset(name, root_dir=str(root), download=False)
        except (FileNotFoundError, KeyError, ValueError, TypeError, AssertionError) as e:
            raise UserError(f"{name}: cannot read {self.folder}: {type(e).__name__}: {e}") from None
        if class_names:
            self.class_names = list(class_names)
        else:
            self.class_names = fmow_class_names() if name == "fmow" else class_names_from(self.folder)
        if len(self.class_names) < self.dataset.n_classes:
            raise UserError(f"{name}: {len(self.class_names)} class names for {self.dataset.n_classes} classes")
        self.train_transform, self.eval_transform = train_transform, eval_transform
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        train = self.dataset.get_subset("train", transform=train_transform)
        if shots:
            train = WILDSSubset(self.dataset, train.indices[k_shot(train.y_array.numpy(), shots, subset_seed)],
                                train_transform)
        self.subsets = {"train": train}
        for key, split in EVAL_SPLITS.items():
            subset = self.dataset.get_subset(split, transform=eval_transform)
            if key == "val_ood":
                keep = subsample(subset.y_array.numpy(), ood_val_size, ood_val_balanced, subset_seed)
                subset = WILDSSubset(self.dataset, subset.indices[keep], eval_transform)
            self.subsets[key] = subset
        self.prep = eval_prep(eval_transform) if cache else None
        if cache and self.prep is None:
            log.warning("dataset.cache: eval transform %s has no cacheable form; reading image files", eval_transform)
        self._setup_cache(self._cache_splits(name) if self.prep is not None else {}, train_transform)

    def _cache_splits(self, name: str) -> dict[str, CachedImages]:
        """Each loader's rows in the cache of its whole WILDS split (written when first read)."""
        stats = {p.name: file_stat(p) for p in sorted(self.folder.glob("*.csv"))}
        out = {}
        for key, subset in self.subsets.items():
            split = "train" if key == "train" else EVAL_SPLITS[key]
            full = np.flatnonzero(self.dataset.split_array == self.dataset.split_dict[split])
            signature = {"dataset": name, "folder": str(self.folder.resolve()), "split": split,
                         "rows": rows_hash(full), "metadata": stats}
            file = CacheFile(f"{name}-{split}", signature, _WildsInputs(self.dataset, full), self.prep,
                             self.num_workers)
            rows = np.searchsorted(full, np.asarray(subset.indices))
            out[key] = CachedImages(file, rows, subset.y_array, subset.metadata_array)
        return out

    def _eval_dataset(self, key: str) -> Dataset:
        return WILDSSubset(self.dataset, self.subsets[key].indices, self.eval_transform)

    def evaluate(self, y_pred: torch.Tensor, y_true: torch.Tensor,
                 metadata: torch.Tensor) -> dict[str, float]:
        """The dataset's own metrics (``dataset.eval``) on one split."""
        results, _ = self.dataset.eval(y_pred, y_true, metadata)
        return {k: float(v) for k, v in results.items()}

    def train_dataloader(self):
        if "train" in self.cached:
            return self._cached_loader("train")
        train = self.subsets["train"]  # a k-shot set can be smaller than one batch: keep it
        return get_train_loader("standard", train, batch_size=self.batch_size, num_workers=self.num_workers,
                                drop_last=len(train) > self.batch_size, persistent_workers=self.num_workers > 0)

    def _eval(self, keys: Sequence[str]):
        return [self._cached_loader(k) if k in self.cached else
                get_eval_loader("standard", self.subsets[k], batch_size=self.eval_batch_size,
                                num_workers=self.num_workers) for k in keys]

    def val_dataloader(self):
        return self._eval(self.val_keys)

    def test_dataloader(self):
        return self._eval(("test_id", "test_ood"))
