"""The model's image transform split in two: a deterministic PIL part, cached once, and tensor ops per batch.

Decoding and resizing an image is the slow part of a data path (a 1920x1080 JPEG: about 24 images/s
per CPU core), and a search reads the same images in every trial. :func:`eval_prep` cuts an open_clip
eval transform after its deterministic PIL part (decode, resize, center crop), which the
preprocessing cache (:mod:`autoft.imagecache`) runs once per image; the rest runs on a uint8 batch on
the training device (:func:`model_input`): to float, normalise, and for training the same kind of
augmentation as the model's train transform (random resized crop, flip; :func:`train_prep`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

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
