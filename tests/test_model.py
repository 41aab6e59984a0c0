"""The open_clip wrapper: zero-shot head, loading, freezing, WiSE-FT interpolation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from autoft import UserError
from autoft.model import CLIPClassifier, interpolate, load_clip

NAMES = ["fox", "deer", "heron"]
TEMPLATES = ["a photo of a {}.", "a {} in the wild."]


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return load_clip("autoft-tiny", None)


def test_zero_shot_head_is_the_normalised_template_average(clip):
    model, _, _, tok = clip
    clf = CLIPClassifier(model, tok, NAMES, TEMPLATES)
    with torch.no_grad():
        for k, name in enumerate(NAMES):
            emb = F.normalize(model.encode_text(tok([t.format(name) for t in TEMPLATES])), dim=-1)
            want = F.normalize(emb.mean(0), dim=-1) * model.logit_scale.exp()
            torch.testing.assert_close(clf.head.weight[k], want)
    assert torch.all(clf.head.bias == 0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = F.normalize(model.encode_image(x), dim=-1)
        torch.testing.assert_close(clf(x), feats @ clf.head.weight.T)


def test_text_tower_frozen_unless_asked(clip):
    model, _, _, tok = clip
    clf = CLIPClassifier(model, tok, NAMES, TEMPLATES)
    names = {n for n, _ in clf.trainable()}
    assert any(n.startswith("clip.visual.") for n in names) and "head.weight" in names
    assert not any(n.startswith("clip.transformer.") or n == "clip.logit_scale" for n in names)
    y = torch.tensor([0, 2, 2])
    feats = clf.caption_features(y)
    assert not feats.requires_grad and torch.equal(feats[1], feats[2])
    trained = CLIPClassifier(model, tok, NAMES, TEMPLATES, train_text=True)
    assert any(n.startswith("clip.transformer.") for n, _ in trained.trainable())
    assert "clip.logit_scale" not in {n for n, _ in trained.trainable()}
    torch.testing.assert_close(trained.caption_features(y), feats)
    assert trained.caption_features(y).requires_grad


def test_local_checkpoint_path_loads_the_weights(clip, tmp_path):
    model, _, _, _ = clip
    path = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), path)
    again, _, eval_tf, _ = load_clip("autoft-tiny", str(path))
    for (k, v), (_, w) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(v, w), k
    assert eval_tf is not None


@pytest.mark.parametrize("name,pretrained,match", [
    ("no-such-model", None, "unknown model 'no-such-model'"),
    ("autoft-tiny", "/no/such/file.pt", "checkpoint file not found: /no/such/file.pt"),
    ("autoft-tiny", "openai", "unknown pretrained tag 'openai' for autoft-tiny"),
])
def test_bad_model_input_is_one_clear_error(name, pretrained, match):
    with pytest.raises(UserError, match=match):
        load_clip(name, pretrained)


def test_wise_ft_interpolates_float_weights():
    a = {"w": torch.zeros(3), "n": torch.tensor(1)}
    b = {"w": torch.ones(3) * 4, "n": torch.tensor(7)}
    torch.testing.assert_close(interpolate(a, b, 0.0)["w"], a["w"])
    torch.testing.assert_close(interpolate(a, b, 1.0)["w"], b["w"])
    torch.testing.assert_close(interpolate(a, b, 0.25)["w"], torch.ones(3))
    assert interpolate(a, b, 0.5)["n"] == 7
    with pytest.raises(ValueError):
        interpolate(a, {"w": b["w"]}, 0.5)
