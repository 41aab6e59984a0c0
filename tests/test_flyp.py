"""FLYP as published: captions from every template, logit_scale trained, the recipe's weight decay."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from autoft import UserError
from autoft.finetune import CONF_DIR
from autoft.model import CLIPClassifier, load_clip
from autoft.objective import flyp_loss

NAMES = ["fox", "deer", "heron"]
TEMPLATES = ["a photo of a {}.", "a {} in the wild.", "a blurry photo of a {}."]


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return load_clip("autoft-tiny", None)


def _captions(model, tok, name: str) -> torch.Tensor:
    with torch.no_grad():
        return F.normalize(model.encode_text(tok([t.format(name) for t in TEMPLATES])), dim=-1)


@pytest.mark.parametrize("train_text", [False, True])
def test_each_image_gets_a_caption_from_a_template_drawn_uniformly(clip, train_text: bool) -> None:
    model, _, _, tok = clip
    clf = CLIPClassifier(model, tok, NAMES, TEMPLATES, captions="all", train_text=train_text)
    assert clf.caption_tokens.shape[0] == len(NAMES) * len(TEMPLATES)
    labels = torch.tensor([0, 1, 2, 2] * 300)  # more images than captions: each caption encoded once, gathered
    torch.manual_seed(1)
    with torch.no_grad():
        feats = clf.caption_features(labels)
    per_class = {k: _captions(model, tok, name) for k, name in enumerate(NAMES)}
    # each row is one of its class's template captions (to float tolerance), and every template is drawn
    picks = torch.stack([(per_class[int(k)] @ f).argmax() for k, f in zip(labels, feats, strict=True)])
    for k, f, t in zip(labels, feats, picks, strict=True):
        torch.testing.assert_close(f, per_class[int(k)][t], rtol=1e-4, atol=1e-5)
    counts = torch.bincount(picks, minlength=len(TEMPLATES)).float() / len(picks)
    assert torch.all((counts - 1 / len(TEMPLATES)).abs() < 0.05), counts  # 1200 draws: uniform to a few %
    torch.manual_seed(1)
    with torch.no_grad():
        few = clf.caption_features(labels[:2])  # fewer images than captions: encoded per image, same draws
    torch.testing.assert_close(few, torch.stack([per_class[0][picks[0]], per_class[1][picks[1]]]), rtol=1e-4,
                               atol=1e-5)


def test_first_template_by_default_and_unknown_handling_is_an_error(clip) -> None:
    model, _, _, tok = clip
    clf = CLIPClassifier(model, tok, NAMES, TEMPLATES)
    assert clf.caption_tokens.shape[0] == len(NAMES)
    with torch.no_grad():
        torch.testing.assert_close(clf.caption_features(torch.tensor([2])), _captions(model, tok, "heron")[:1],
                                   rtol=1e-4, atol=1e-5)
    with pytest.raises(UserError, match="unknown captions 'some'"):
        CLIPClassifier(model, tok, NAMES, TEMPLATES, captions="some")


def test_logit_scale_trains_when_asked_and_flyp_moves_it(clip) -> None:
    model, _, _, tok = clip
    frozen = CLIPClassifier(model, tok, NAMES, TEMPLATES, train_text=True)
    assert "clip.logit_scale" not in dict(frozen.trainable())
    clf = CLIPClassifier(model, tok, NAMES, TEMPLATES, train_text=True, train_logit_scale=True)
    assert "clip.logit_scale" in dict(clf.trainable())
    labels = torch.tensor([0, 1, 2])
    loss = flyp_loss(clf.image_features(torch.randn(3, 3, 32, 32)), clf.caption_features(labels), clf.logit_scale)
    loss.backward()
    assert model.logit_scale.grad is not None and model.logit_scale.grad.abs() > 0
    model.logit_scale.requires_grad_(False)  # leave the shared module as the other tests expect it
    model.logit_scale.grad = None


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("benchmark", overrides=list(overrides))


def test_flyp_method_follows_its_published_recipe() -> None:
    cfg = _compose("method=flyp")
    assert cfg.model.train_text and cfg.model.train_logit_scale and cfg.model.text_head
    assert cfg.model.captions == "all" and dict(cfg.objective.weights) == {"ce": 0.0, "flyp": 1.0}
    assert cfg.optim.weight_decay == 0.2  # FLYP's WILDS scripts: --wd=0.2 (the embedded world stands in for iWildCam)
    assert _compose("method=flyp", "dataset=fmow").optim.weight_decay == 0.2
    assert _compose("method=flyp", "dataset=imagenet").optim.weight_decay == 0.1
    assert _compose("method=flyp", "dataset=pcam_fewshot").optim.weight_decay == 0.0
    assert _compose("method=flyp", "dataset=cifar10").optim.weight_decay == 0.1  # no FLYP recipe: FT's
    assert _compose("method=l2sp").objective.norm_scale.l2init == 1.0  # alpha / 2, whatever the default scale
