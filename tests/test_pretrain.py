"""Pretraining of the embedded tiny CLIP: cached by config hash, deterministic, done once."""

from __future__ import annotations

import torch

import autoft.pretrain as pretrain_mod
from autoft.pretrain import PretrainConfig, checkpoint_path, ensure_pretrained, pretrain
from autoft.world import WorldConfig

TINY = PretrainConfig(n_web=128, steps=3, batch_size=32)


def test_pretraining_is_deterministic_and_learns():
    a = pretrain(WorldConfig(seed=1), TINY)
    b = pretrain(WorldConfig(seed=1), TINY)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    c = pretrain(WorldConfig(seed=2), TINY)
    assert not torch.equal(a["visual.conv1.weight"], c["visual.conv1.weight"])


def test_checkpoint_is_cached_under_a_config_hash(monkeypatch):
    world = WorldConfig(seed=5)
    path = ensure_pretrained(world, TINY)
    assert path.is_file() and path == checkpoint_path(world, TINY)
    assert checkpoint_path(world, PretrainConfig(n_web=128, steps=4, batch_size=32)) != path
    assert checkpoint_path(WorldConfig(seed=6), TINY) != path
    monkeypatch.setattr(pretrain_mod, "pretrain", lambda *a: (_ for _ in ()).throw(AssertionError("retrained")))
    assert ensure_pretrained(world, TINY) == path  # second call: from the cache
    state = torch.load(path, weights_only=True)
    assert "visual.conv1.weight" in state and "logit_scale" in state
    assert not list(path.parent.glob("*.tmp*"))
