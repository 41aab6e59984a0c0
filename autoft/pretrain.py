"""Pretrain the tiny CLIP "foundation model" of the embedded world, once, and cache it.

Real AutoFT starts from OpenAI CLIP; here no weights can be downloaded, so the project makes its
own foundation model: open_clip's ``autoft-tiny`` architecture trained with open_clip's
contrastive ``ClipLoss`` on the world's broad captioned "web" set (random backgrounds, few
camera-trap nuisances, no location shortcut). The checkpoint is cached under a path keyed by a
hash of the world and pretraining configs, so each configuration is trained exactly once.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch

from autoft import atomic_write
from autoft.model import load_clip
from autoft.world import WorldConfig, cache_dir, config_hash, generate_web

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainConfig:
    model: str = "autoft-tiny"
    n_web: int = 60000
    steps: int = 600
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 40
    seed: int = 0

    def key(self, world: WorldConfig) -> str:
        return config_hash({"pretrain": asdict(self), "web": world.web_key()})


def checkpoint_path(world: WorldConfig, cfg: PretrainConfig) -> Path:
    return cache_dir() / f"clip-{cfg.model}-{cfg.key(world)}.pt"


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> normalised float NCHW, the same normalisation as open_clip's eval transform."""
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)
    return (x - mean) / std


def pretrain(world: WorldConfig, cfg: PretrainConfig) -> dict[str, torch.Tensor]:
    """Contrastive pretraining on the web set; returns the model's state dict."""
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    images, captions = generate_web(world, cfg.n_web, cfg.seed)
    log.info("web set: %d images, %d distinct captions (%.0fs)", len(images), len(set(captions)), time.time() - t0)
    model, _, _, tokenizer = load_clip(cfg.model, None)
    unique = sorted(set(captions))
    index = {c: i for i, c in enumerate(unique)}
    tokens = tokenizer(unique)
    caption_ids = torch.tensor([index[c] for c in captions])
    loss_fn = open_clip.ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (
        1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)))
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(images), generator=gen)
    pos = 0
    model.train()
    for step in range(cfg.steps):
        if pos + cfg.batch_size > len(order):
            order, pos = torch.randperm(len(images), generator=gen), 0
        idx = order[pos : pos + cfg.batch_size]
        pos += cfg.batch_size
        img_f, txt_f, scale = model(_to_tensor(images[idx.numpy()]), tokens[caption_ids[idx]])
        loss = loss_fn(img_f, txt_f, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 100 == 0 or step == cfg.steps - 1:
            log.info("pretrain step %d/%d loss %.3f (%.0fs)", step + 1, cfg.steps, loss.item(), time.time() - t0)
    return model.state_dict()


def ensure_pretrained(world: WorldConfig, cfg: PretrainConfig) -> Path:
    """Path of the cached checkpoint, pretraining it first if it is not there yet."""
    path = checkpoint_path(world, cfg)
    if path.is_file():
        return path
    log.info("pretraining the tiny CLIP once (cached at %s); this takes a few minutes", path)
    state = pretrain(world, cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: torch.save(state, f))
    return path
