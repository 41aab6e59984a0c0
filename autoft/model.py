"""CLIP as a classifier: a thin wrapper over open_clip.

The classifier is CLIP's image tower followed by a linear head initialised as the zero-shot
classifier (per class: encode every prompt template, normalise, average, renormalise, scale by
``logit_scale``). The text tower stays attached, because the ``flyp`` loss term contrasts image
features with the features of each image's class caption.

Class captions are short and CLIP's text transformer is causal: a token attends only to earlier
positions, and the pooled feature is read at the end-of-text token, so the padding after it cannot
change the feature. The caption tokens are therefore stored cut to the longest caption's length
(a fixed shape, found once), and the text tower runs on those few positions instead of 77
(:func:`encode_text_prefix`; same features to float tolerance, tested). When a batch holds more
images than there are classes, the trainable text tower encodes each class's caption once and
gathers per image (same values and gradients, fewer tokens), else it encodes per image.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from autoft import UserError
from autoft.weights import hub_offline, is_path, resolve

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)  # registers the tiny architectures (autoft-tiny)


def load_clip(name: str, pretrained: str | None = None):
    """Create an open_clip model; return (model, train_transform, eval_transform, tokenizer).

    ``pretrained`` is an open_clip tag (e.g. ``openai``), a local checkpoint path, or None for
    random weights. Where the weights come from is settled first (:func:`autoft.weights.resolve`):
    weights that are neither local nor downloadable are one clear :class:`UserError` within seconds.
    """
    if name not in open_clip.list_models():
        raise UserError(f"unknown model '{name}'; see open_clip.list_models() (tiny: autoft-tiny)")
    weights = resolve(name, pretrained)
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))  # open_clip logs each creation step at INFO on the root logger
    try:
        with hub_offline(weights.offline):
            model, train_tf, eval_tf = open_clip.create_model_and_transforms(
                name, pretrained=weights.pretrained, force_quick_gelu=weights.quick_gelu)
        tokenizer = _tokenizer(name)
    except RuntimeError as e:  # the hub answered the reachability check, then the download failed
        if weights.pretrained is None or is_path(weights.pretrained) or "download" not in str(e).lower():
            raise
        raise UserError(f"cannot load '{pretrained}' weights for {name}: {str(e).splitlines()[0]}; fetch them on a "
                        f"connected machine into the Hugging Face cache, or set model.pretrained=/path/to/"
                        f"checkpoint.pt") from None
    finally:
        root.setLevel(level)
    return model, train_tf, eval_tf, tokenizer


@functools.cache
def _tokenizer(name: str):
    """open_clip's tokenizer for ``name``, made once per process: it reads and indexes its 49k-word BPE vocabulary
    each time (about 0.15 s on 2 cores, paid by every model built: each search trial, each methods job). It keeps
    no per-model state, only a memo of words already split."""
    return open_clip.get_tokenizer(name)


def _prefix_encodable(clip: nn.Module) -> bool:
    """Whether ``clip`` is open_clip's CLIP with a causal text mask and token-position pooling, so that a
    token sequence cut after its end-of-text token encodes to the same features (see the module docstring)."""
    if not isinstance(clip, open_clip.CLIP) or getattr(clip, "text_pool_type", None) not in ("argmax", "eos"):
        return False
    mask = getattr(clip, "attn_mask", None)
    if mask is None or mask.ndim != 2:
        return False
    causal = torch.full_like(mask, float("-inf")).triu(1)
    return bool(torch.equal(mask, causal))


def pooled_positions(clip: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The position whose feature open_clip pools for each token row (its end-of-text token)."""
    if clip.text_pool_type == "argmax":
        return tokens.argmax(dim=-1)
    return (tokens == clip.text_eos_id).int().argmax(dim=-1)


def encode_text_prefix(clip: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``clip.encode_text`` for tokens cut to their first L <= context_length positions.

    open_clip's ``encode_text`` adds all ``context_length`` positional embeddings and uses the full
    causal mask, so it only takes full-length rows; this is the same computation on the first L
    positions (positional embeddings and mask sliced to L). Only valid where :func:`_prefix_encodable`.
    """
    length = tokens.shape[1]
    cast_dtype = clip.transformer.get_cast_dtype()
    x = clip.token_embedding(tokens).to(cast_dtype)
    x = x + clip.positional_embedding[:length].to(cast_dtype)
    x = clip.transformer(x, attn_mask=clip.attn_mask[:length, :length])
    x = clip.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), pooled_positions(clip, tokens)]
    if clip.text_projection is not None:
        x = clip.text_projection(x) if isinstance(clip.text_projection, nn.Linear) else x @ clip.text_projection
    return x


@torch.no_grad()
def zeroshot_weights(clip: nn.Module, tokenizer, class_names: Sequence[str],
                     templates: Sequence[str]) -> torch.Tensor:
    """[K, D] unit-norm class embeddings, each the renormalised mean over templates."""
    device = next(clip.parameters()).device
    rows = []
    for name in class_names:
        tokens = tokenizer([t.format(name) for t in templates]).to(device)
        emb = F.normalize(clip.encode_text(tokens).float(), dim=-1).mean(0)
        rows.append(F.normalize(emb, dim=-1))
    return torch.stack(rows)


class CLIPClassifier(nn.Module):
    """Image tower + zero-shot-initialised linear head; text tower kept for the flyp term.

    ``logit_scale`` is frozen (it is folded into the head) unless ``train_logit_scale`` (FLYP and the
    reference convention train it: it then scales the flyp term only). The text tower is frozen unless
    ``train_text``; when frozen, the class-caption features are computed once and reused (and
    recomputed after :meth:`restore`). ``channels_last``: images enter the tower in that memory format.
    ``text_head`` (FLYP): the head is not a trained layer but the zero-shot classifier of the current
    text tower, rebuilt whenever the model enters eval mode.

    ``captions`` chooses each image's caption for flyp: ``first``, the first template (or
    ``caption_template``) filled with its class; ``all``, FLYP's handling: its training CSV holds one row
    per (image, template), each template filled with the image's class, and batches are drawn from those
    rows, so an image is contrasted with a caption of a uniformly chosen template. Here each image of a
    training batch gets a template drawn uniformly at every step (the same distribution per image; FLYP
    draws rows without replacement within an epoch of its CSV).
    """

    def __init__(self, clip: nn.Module, tokenizer, class_names: Sequence[str], templates: Sequence[str],
                 caption_template: str | None = None, train_text: bool = False, text_head: bool = False,
                 train_logit_scale: bool = False, captions: str = "first"):
        super().__init__()
        if captions not in ("first", "all"):
            raise UserError(f"unknown captions '{captions}'; use first or all")
        self.clip = clip
        self.train_text, self.text_head, self.captions = train_text, text_head, captions
        scale = clip.logit_scale.exp().item()
        weights = zeroshot_weights(clip, tokenizer, class_names, templates)
        self.head = nn.Linear(weights.shape[1], weights.shape[0])
        with torch.no_grad():
            self.head.weight.copy_(weights * scale)
            self.head.bias.zero_()
        caption_templates = templates if captions == "all" else [caption_template or templates[0]]
        self.templates_per_class = len(caption_templates)  # caption_tokens row of (class k, template t): k * T + t
        self.prefix_text = _prefix_encodable(clip)
        self.register_buffer("caption_tokens", self._tokens(
            tokenizer, [t.format(c) for c in class_names for t in caption_templates]), persistent=False)
        if text_head:  # every (class, template) prompt, to rebuild the zero-shot head from the text tower
            prompts = self._tokens(tokenizer, [t.format(c) for c in class_names for t in templates])
            self.register_buffer("prompt_tokens", prompts.view(len(class_names), len(templates), -1), persistent=False)
            self.head.requires_grad_(False)  # the head is the text tower's: rebuilt, never trained
        self._frozen_captions: torch.Tensor | None = None
        self.channels_last = False
        for name, p in clip.named_parameters():
            if not name.startswith("visual."):
                p.requires_grad_(train_logit_scale if name == "logit_scale" else train_text)

    def _tokens(self, tokenizer, texts: Sequence[str]) -> torch.Tensor:
        """Token rows of ``texts``, cut after the longest one's end-of-text token where that is exact
        (a fixed, short shape)."""
        tokens = tokenizer(texts)
        if self.prefix_text:
            tokens = tokens[:, : int(pooled_positions(self.clip, tokens).max()) + 1].contiguous()
        return tokens

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp()

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last and images.ndim == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return F.normalize(self.clip.encode_image(images), dim=-1)

    def use_channels_last(self) -> CLIPClassifier:
        """Conv weights (the ViT patch embedding) and input images in channels_last memory format."""
        self.channels_last = True
        self.clip.visual.to(memory_format=torch.channels_last)
        return self

    def encode_captions(self, tokens: torch.Tensor) -> torch.Tensor:
        """Text features of caption tokens as stored (cut after end-of-text where that is exact)."""
        return encode_text_prefix(self.clip, tokens) if self.prefix_text else self.clip.encode_text(tokens)

    @torch.no_grad()
    def restore(self, state: dict[str, torch.Tensor]) -> None:
        """Copy ``state`` (a full state dict, e.g. the pretrained one) into the model in place, and drop
        the cached caption features: one model serves many trials without a reload."""
        self.load_state_dict(state)
        self._frozen_captions = None
        for p in self.parameters():
            p.grad = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.image_features(images))

    @torch.no_grad()
    def refresh_head(self) -> None:
        """The zero-shot head rebuilt from the current text tower (FLYP classifies this way)."""
        k, t, length = self.prompt_tokens.shape
        feats = torch.cat([self.encode_captions(chunk) for chunk in self.prompt_tokens.view(k * t, length).split(1024)])
        emb = F.normalize(F.normalize(feats.float(), dim=-1).view(k, t, -1).mean(1), dim=-1)
        self.head.weight.copy_(emb * self.logit_scale)
        self.head.bias.zero_()

    def train(self, mode: bool = True) -> CLIPClassifier:
        """With ``text_head``, entering eval mode (every validation, test, WiSE-FT evaluation)
        rebuilds the head, so it always matches the text tower being fine-tuned."""
        super().train(mode)
        if not mode and self.text_head:
            self.refresh_head()
        return self

    def caption_features(self, labels: torch.Tensor) -> torch.Tensor:
        """Normalised text features of each label's class caption (for the flyp term); with ``captions=all``
        each image's template is drawn uniformly (the global RNG, seeded by the run)."""
        rows = labels
        if self.templates_per_class > 1:
            picks = torch.randint(self.templates_per_class, labels.shape, device=labels.device)
            rows = labels * self.templates_per_class + picks
        if self.train_text:
            if len(self.caption_tokens) <= len(rows):  # fewer captions than images: each caption once, gathered
                return F.normalize(self.encode_captions(self.caption_tokens), dim=-1)[rows]
            return F.normalize(self.encode_captions(self.caption_tokens[rows]), dim=-1)
        if self._frozen_captions is None or self._frozen_captions.device != labels.device:
            with torch.no_grad():
                self._frozen_captions = F.normalize(self.encode_captions(self.caption_tokens), dim=-1)
        return self._frozen_captions[rows]

    def trainable(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad)


def interpolate(zeroshot: dict[str, torch.Tensor], finetuned: dict[str, torch.Tensor],
                alpha: float) -> dict[str, torch.Tensor]:
    """WiSE-FT: (1 - alpha) * theta_zeroshot + alpha * theta_finetuned, float tensors only."""
    if zeroshot.keys() != finetuned.keys():
        raise ValueError("WiSE-FT needs two state dicts of the same architecture")
    return {k: torch.lerp(v.float(), finetuned[k].float(), alpha).to(v.dtype) if v.is_floating_point()
            else finetuned[k] for k, v in zeroshot.items()}
