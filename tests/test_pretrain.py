"""Pretraining of the embedded tiny CLIP: cached by config hash, deterministic, done once."""

from __future__ import annotations

import open_clip
import torch
import torch.nn.functional as F

import autoft.pretrain as pretrain_mod
from autoft.model import load_clip
from autoft.pretrain import PretrainConfig, checkpoint_path, ensure_pretrained, pretrain
from autoft.world import WorldConfig, generate_web

TINY = PretrainConfig(n_web=128, steps=3, batch_size=32)


def _held_out_loss(state: dict[str, torch.Tensor], world: WorldConfig) -> float:
    """open_clip's contrastive loss on 256 web images of another seed than the training set's."""
    images, captions = generate_web(world, 256, 99)
    model, _, _, tokenizer = load_clip(TINY.model, None)
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        image = F.normalize(model.encode_image(pretrain_mod._to_tensor(images)), dim=-1)
        text = F.normalize(model.encode_text(tokenizer(captions)), dim=-1)
        return open_clip.ClipLoss()(image, text, model.logit_scale.exp()).item()


def test_pretraining_is_deterministic_and_learns(monkeypatch):
    world = WorldConfig(seed=1)
    initial = []

    def load_and_keep(*args):  # the model pretrain() starts from, as it starts
        loaded = load_clip(*args)
        initial.append({k: v.detach().clone() for k, v in loaded[0].state_dict().items()})
        return loaded

    monkeypatch.setattr(pretrain_mod, "load_clip", load_and_keep)
    a = pretrain(world, TINY)
    b = pretrain(world, TINY)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # learns: 3 steps (at 1/40 to 3/40 of the lr, in warmup) lower the held-out loss from 5.647 to 5.583
    trained, untrained = _held_out_loss(a, world), _held_out_loss(initial[0], world)
    print(f"held-out loss: untrained {untrained:.4f}, after {TINY.steps} steps {trained:.4f}")
    assert trained < untrained - 0.03
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
