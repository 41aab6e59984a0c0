"""The AutoFT inner objective: a weighted sum of nine loss terms, under one of two conventions.

``Loss = sum_i w_i * L_i`` over :data:`LOSS_TERMS`, with ``w_i >= 0`` proposed by the outer search
(Choi et al. 2024, section 2 of ``docs/autoft-method.md``). Three of the terms are defined differently
by the reference code (cchoi1/auto-ft, ``src/losses/learnedloss.py``) that learned the published
weights than by our own choices, so the objective has a ``convention`` (``docs/objective.md`` has the
table, and :mod:`autoft.conventions` converts weights between the two):

* ``ours`` (the default, for our searches): each norm term is the unnormalized sum over the trainable
  elements times a per-term constant ``norm_scale[t]`` (1.0 unless configured), so the per-element
  pull is ``w norm_scale[t] sign(p - p0)`` (L1) or ``2 w norm_scale[t] (p - p0)`` (L2) whatever the
  model's size (the L2-SP convention); ``dcm`` is KL(uniform || p) on misclassified examples, summed
  and divided by the batch size, so a positive weight pushes them toward uniform (the DCM paper's
  intent); it is 0 when everything is right and grows with the error rate.
* ``reference``: each norm term is that sum divided by ``param_count``, the number of elements of
  every parameter of the model the reference normalizes over: its ``ImageClassifier``, i.e. the whole
  open_clip CLIP (image tower, text tower, ``logit_scale``) plus the classification head (149,714,103
  for ViT-B/16 with iWildCam's 182-class head: ``benchmarks/results/2026-11-30-cpu/reference-pull.json``).
  The caller counts it from the model (:func:`autoft.conventions.parameter_count`), never a constant.
  ``dcm`` is the reference's ``mean_b [wrong_b H(p_b)]``: with a positive weight it makes misclassified examples *more*
  confident; the published dcm weights were learned with it. The reference trains every parameter
  (text tower and ``logit_scale`` included; :func:`autoft.conventions.objective_settings` insists on it)
  and clips gradients at norm 1.0 in its WILDS scripts (``trainer.gradient_clip_val``, set by the
  published objective configs; its ImageNet script does not clip).

The other terms are the same function under both conventions. What neither convention takes from the
reference code are its defects (``docs/autoft-method.md`` section 7):

* **theta0 is a real copy.** The reference builds theta0 with ``p.detach().cuda()``, which on a CUDA
  tensor aliases the parameter: in its search that is the untrained copy of the model (the terms act),
  in its final training the model being trained, so there its l1init/l2init are zero (defect 1). We store
  ``p.detach().clone()`` as non-persistent buffers: they follow ``.to(device)`` (Lightning moves them)
  but stay out of checkpoints, since they are the pretrained weights the caller already has. Under the
  ``reference`` convention l1init/l2init therefore act as the reference's formula says, not as its
  code ran.
* **Per-layer-group norm weights are computed as written**: the reference's ``--layerwise_loss``
  builds a weight matrix that its loss cannot multiply (and drops the last layer's weights); here a
  group's weight for a norm term multiplies that term over the group's parameters (``group_of``,
  ``group_weights``; groups from :mod:`autoft.layers`). A group without its own weight uses the global one.

Decisions common to both conventions:

* **The objective does not own the model's parameters.** It keeps a plain list of the trainable
  ones (``requires_grad=True``); registering them would make them appear twice in optimizers and
  state dicts. Frozen parameters are not regularized: they cannot move, so their terms are
  constants that only cost time (the reference sums over all parameters, all trainable there).
  Norm terms are computed with autocast off, in float32 (float64 parameters stay float64), because
  squared sums over ~1e8 elements overflow or lose all precision in half precision.
* **entropy** with a positive weight *minimizes* prediction entropy (the paper's sign).
* **hinge** is Weston-Watkins: ``mean_b sum_{j != y} relu(z_j - z_y + 1)``.
* **flyp** is FLYP's symmetric InfoNCE between normalized image features and normalized features
  of each image's class caption. ``logit_scale`` is the multiplier itself (CLIP's
  ``logit_scale.exp()``), not its log. As in FLYP, targets are ``arange(B)``: two images of the same
  class in a batch have identical captions, which then act as each other's negatives. Which template
  makes the caption, and whether the text tower and ``logit_scale`` train, is the model's business
  (:class:`autoft.model.CLIPClassifier`); the ``reference`` convention requires both to train.
* **Masks carry no gradient**: dcm's misclassified mask is computed under ``no_grad`` (argmax has none).
* **Closed-form norm gradients** (``closed_form_norms=True``, what training uses): the norm terms'
  gradients are added to ``p.grad`` in place after backward by :meth:`CompositeObjective.add_norm_grads`
  (:mod:`autoft.norm_grads`: fused foreach ops on a GPU, cache-sized blocks on CPU, or one compiled pass
  with ``compile_norm_grads``, ``model.compile_norm_grads``), instead of autograd building a graph over
  every parameter each step. ``forward`` then leaves them out of the returned loss and computes their
  values only when asked (``norm_values=True``, for logging every N steps). Same math, scale included.
* **Only active terms are computed.** Zero-weight terms are skipped (the norm terms alone touch
  every parameter); the returned log dict has one detached entry per active term, the term's value as
  the convention defines it (scale included) before its weight.
* **ce defaults to weight 1** when not given (it is the paper's anchor term); any other given
  weight, including 0, is respected. An objective whose weights are all zero is rejected: it would
  train nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from autoft.norm_grads import CpuBlocks, coefficients, compiled_norm_grads, foreach_norm_grads
from autoft.terms import CONVENTIONS, LOSS_TERMS, NORM_TERMS, validated_weight, validated_weights

_INIT_TERMS: tuple[str, ...] = ("l1init", "l2init")


def ce_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy: the anchor term."""
    return F.cross_entropy(logits, labels)


def hinge_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Weston-Watkins multiclass hinge: ``mean_b sum_{j != y} relu(z_j - z_y + 1)``."""
    true = logits.gather(1, labels[:, None])
    margins = F.relu(logits - true + 1.0)
    # The j == y entry is relu(1) = 1, not part of the sum: mask it out.
    not_true = torch.ones_like(margins, dtype=torch.bool).scatter_(1, labels[:, None], False)
    return (margins * not_true).sum(dim=1).mean()


def _entropies(logits: Tensor) -> Tensor:
    """Per-example prediction entropy ``H(softmax(z))``."""
    log_p = F.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


def entropy_loss(logits: Tensor) -> Tensor:
    """Mean prediction entropy ``H(softmax(z))``; a positive weight minimizes it."""
    return _entropies(logits).mean()


def _misclassified(logits: Tensor, labels: Tensor) -> Tensor:
    with torch.no_grad():
        return logits.argmax(dim=1) != labels


def dcm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Ours: confidence minimization on misclassified examples, ``sum_wrong KL(uniform || p) / B``.

    Divided by the full batch size so it is 0 when all are correct and scales with the error rate.
    """
    wrong = _misclassified(logits, labels)
    log_p = F.log_softmax(logits, dim=1)
    kl_from_uniform = -log_p.mean(dim=1) - math.log(logits.shape[1])
    return (kl_from_uniform * wrong).sum() / logits.shape[0]


def dcm_reference_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """The reference code's dcm: ``mean_b [wrong_b H(p_b)]`` (a positive weight lowers the entropy of
    misclassified examples, i.e. makes them more confident)."""
    return (_entropies(logits) * _misclassified(logits, labels)).mean()


def flyp_loss(image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float) -> Tensor:
    """FLYP / CLIP symmetric InfoNCE between images [B, D] and their class captions' features [B, D].

    Both sides are L2-normalized here (idempotent for already normalized inputs); ``logit_scale`` is
    the multiplier (``model.logit_scale.exp()``), not its log.
    """
    img = F.normalize(image_features, dim=-1)
    txt = F.normalize(text_features, dim=-1)
    logits = logit_scale * img @ txt.T
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def norm_terms(
    params: Sequence[Tensor], theta0: Sequence[Tensor] | None, terms: Iterable[str]
) -> dict[str, Tensor]:
    """Unnormalized L1/L2 distances of ``params`` to ``theta0`` (``*init``) and to zero (``*zero``).

    Sums over all elements, with autocast off, in float32 at least (float64 stays float64); the
    convention's scale is applied by the caller.
    """
    terms = tuple(terms)
    unknown = [t for t in terms if t not in NORM_TERMS]
    if unknown:
        raise ValueError(f"unknown norm term(s) {unknown}; valid: {', '.join(NORM_TERMS)}")
    if not params or not terms:
        return {t: torch.zeros(()) for t in terms}
    device_type = params[0].device.type
    with torch.autocast(device_type=device_type, enabled=False):
        current = [_at_least_float32(p) for p in params]
        bases: dict[str, list[Tensor]] = {}
        if any(t in _INIT_TERMS for t in terms):
            if theta0 is None or len(theta0) != len(params):
                raise ValueError("l1init/l2init need theta0 with one tensor per parameter")
            bases["init"] = torch._foreach_sub(current, [_at_least_float32(t) for t in theta0])
        if any(t not in _INIT_TERMS for t in terms):
            bases["zero"] = current
        out: dict[str, Tensor] = {}
        for term in terms:
            diffs = bases["init" if term in _INIT_TERMS else "zero"]
            if term.startswith("l1"):
                out[term] = torch.stack(torch._foreach_norm(diffs, 1)).sum()
            else:
                # ||d||_2^2 summed over tensors; the norm's backward is 0 (not NaN) at d == 0.
                out[term] = torch.stack(torch._foreach_norm(diffs, 2)).square().sum()
    return out


def _at_least_float32(t: Tensor) -> Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


@dataclass
class _NormGroup:
    """Trainable parameters (indices into ``CompositeObjective.params``) sharing one per-element pull per
    norm term: the term's weight (the group's own, else the global one) times the convention's scale."""

    name: str
    indices: list[int]
    pull: dict[str, float]


class CompositeObjective(torch.nn.Module):
    """Loss = sum_i w_i * L_i over LOSS_TERMS, under ``convention`` (see the module docstring)."""

    def __init__(
        self,
        weights: Mapping[str, float],
        named_params: Iterable[tuple[str, torch.nn.Parameter]],
        closed_form_norms: bool = False,
        compile_norm_grads: bool = False,
        *,
        convention: str = "ours",
        norm_scale: Mapping[str, float] | None = None,
        param_count: int | None = None,
        group_of: Mapping[str, str] | None = None,
        group_weights: Mapping[str, Mapping[str, float]] | None = None,
    ) -> None:
        """Validate the weights (missing terms weigh 0, ce defaults to 1) and snapshot theta0 if needed.

        ``named_params`` is typically ``model.named_parameters()``; only trainable ones are kept.
        ``closed_form_norms``: the norm terms' gradients come from :meth:`add_norm_grads`, called
        between backward and the optimizer step, not from the loss ``forward`` returns.
        ``compile_norm_grads``: those gradients come from one torch.compile'd pass (compiled once per
        process and parameter list, then reused by every objective: the coefficients are a tensor input).
        ``convention``: ``ours`` scales norm term t by ``norm_scale[t]`` (default 1.0 each);
        ``reference`` divides the norm terms by ``param_count`` (required) and uses the reference's dcm.
        ``group_of`` maps each trainable parameter's name to its layer group, and ``group_weights`` gives
        a group its own norm-term weights (the global weight otherwise).
        """
        super().__init__()
        self.weights: dict[str, float] = validated_weights(weights)
        self.convention = convention
        self.scale: dict[str, float] = _norm_scales(convention, norm_scale, param_count)
        self.param_count = param_count
        self.closed_form_norms = closed_form_norms
        self.compile_norm_grads = compile_norm_grads
        self._coefs: Tensor | None = None  # [P, 4] (a, b, c, d) per parameter, on the parameters' device
        self._cpu = CpuBlocks()
        named = [(n, p) for n, p in named_params if p.requires_grad]
        # A plain list, not registered: the model owns its parameters, the objective only reads them.
        self.names: list[str] = [n for n, _ in named]
        self.params: list[torch.nn.Parameter] = [p for _, p in named]
        self.group_weights = _validated_group_weights(group_weights or {})
        self.groups: list[_NormGroup] = self._norm_groups(group_of)
        if not any(v > 0 for v in self.weights.values()) and not any(
                w > 0 for g in self.group_weights.values() for w in g.values()):
            raise ValueError("all loss weights are zero: the objective would train nothing")
        self._num_theta0 = 0
        if any(t in self.active_terms for t in _INIT_TERMS):
            for i, p in enumerate(self.params):
                self.register_buffer(f"theta0_{i}", p.detach().clone(), persistent=False)
            self._num_theta0 = len(self.params)

    def _norm_groups(self, group_of: Mapping[str, str] | None) -> list[_NormGroup]:
        """The parameters split by layer group (one group of all without ``group_of``), each with its pulls."""
        if group_of is None:
            if self.group_weights:
                raise ValueError("group_weights need group_of (each trainable parameter's layer group)")
            order = {"all": list(range(len(self.params)))}
        else:
            order = {}
            for i, name in enumerate(self.names):
                if name not in group_of:
                    raise ValueError(f"trainable parameter {name!r} belongs to no layer group")
                order.setdefault(group_of[name], []).append(i)
        return [_NormGroup(g, idx, {t: self.group_weights.get(g, {}).get(t, self.weights[t]) * self.scale[t]
                                    for t in NORM_TERMS}) for g, idx in order.items()]

    @property
    def theta0(self) -> list[Tensor] | None:
        """Frozen copies of the trainable parameters at construction (or last reset), if l*init is active."""
        if not self._num_theta0:
            return None
        return [getattr(self, f"theta0_{i}") for i in range(self._num_theta0)]

    @property
    def active_terms(self) -> tuple[str, ...]:
        """Terms with a positive weight (a norm term: globally or in some layer group), in LOSS_TERMS order."""
        group_norms = {t for g in self.group_weights.values() for t, w in g.items() if w > 0}
        return tuple(t for t in LOSS_TERMS if self.weights[t] > 0 or t in group_norms)

    @property
    def needs_text(self) -> bool:
        """Whether the caller must pass caption features (flyp is active)."""
        return self.weights["flyp"] > 0

    @property
    def pulls(self) -> dict[str, dict[str, float]]:
        """Per trainable parameter name, each norm term's per-element pull: its weight times its scale
        (the L1 gradient's magnitude, half the L2 gradient's factor on ``p - p0`` or ``p``)."""
        return {self.names[i]: dict(g.pull) for g in self.groups for i in g.indices}

    def forward(
        self,
        logits: Tensor,
        labels: Tensor,
        image_features: Tensor | None = None,
        text_features: Tensor | None = None,
        logit_scale: Tensor | float | None = None,
        norm_values: bool = True,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Return ``(total, values)``: the weighted loss and each active term's detached value.

        With ``closed_form_norms`` the total leaves the norm terms out (their gradients come from
        :meth:`add_norm_grads`) and their values are computed, without a graph, only if ``norm_values``.
        """
        active = self.active_terms
        values: dict[str, Tensor] = {}
        if "ce" in active:
            values["ce"] = ce_loss(logits, labels)
        if "hinge" in active:
            values["hinge"] = hinge_loss(logits, labels)
        if "entropy" in active:
            values["entropy"] = entropy_loss(logits)
        if "dcm" in active:
            values["dcm"] = (dcm_reference_loss if self.convention == "reference" else dcm_loss)(logits, labels)
        if "flyp" in active:
            if image_features is None or text_features is None or logit_scale is None:
                raise ValueError(
                    "flyp weight > 0 needs image_features, text_features (the features of each image's "
                    "class caption) and logit_scale; got None for at least one"
                )
            values["flyp"] = flyp_loss(image_features, text_features, logit_scale)
        terms = [self.weights[t] * v for t, v in values.items()]
        active_norms = [t for t in NORM_TERMS if t in active]
        if active_norms and not self.closed_form_norms:
            norms, weighted = self._norms(active_norms)
            values.update(norms)
            terms.append(weighted)
        total: Tensor = sum(terms[1:], terms[0]) if terms else logits.sum() * 0.0  # only closed-form norms: 0
        values = {t: v.detach() for t, v in values.items()}
        if active_norms and self.closed_form_norms and norm_values:
            with torch.no_grad():
                values.update(self._norms(active_norms)[0])
        return total, values

    def _norms(self, terms: list[str]) -> tuple[dict[str, Tensor], Tensor]:
        """Each norm term's value (scale included, over all trainable parameters) and their weighted sum,
        each layer group with its own weights (one :func:`norm_terms` call per group)."""
        theta0 = self.theta0
        values: dict[str, Tensor] = {}
        weighted: list[Tensor] = []
        for group in self.groups or [_NormGroup("all", [], {t: 0.0 for t in NORM_TERMS})]:
            raw = norm_terms([self.params[i] for i in group.indices],
                             [theta0[i] for i in group.indices] if theta0 is not None else None, terms)
            for t, v in raw.items():
                values[t] = values[t] + self.scale[t] * v if t in values else self.scale[t] * v
                weighted.append(group.pull[t] * v)
        return values, sum(weighted[1:], weighted[0])

    @torch.no_grad()
    def add_norm_grads(self) -> None:
        """Add the active norm terms' gradients to ``p.grad`` in place, in closed form
        (:mod:`autoft.norm_grads`: fused foreach ops on a GPU, cache-sized blocks on CPU, or compiled).

        Call after backward and before the optimizer step (after AMP unscaling), once per step.
        """
        if not self.closed_form_norms or not any(t in self.active_terms for t in NORM_TERMS) or not self.params:
            return
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        params, grads, theta0 = self.params, [p.grad for p in self.params], self.theta0
        if self.compile_norm_grads:
            if self._coefs is None or self._coefs.device != params[0].device:
                rows = [None] * len(params)
                for group in self.groups:
                    for i in group.indices:
                        rows[i] = coefficients(group.pull)
                dtype = torch.promote_types(params[0].dtype, torch.float32)  # 1/N is below bf16's precision
                self._coefs = torch.tensor(rows, dtype=dtype, device=params[0].device)
            compiled_norm_grads()(grads, params, theta0 if theta0 is not None else params, self._coefs)
            return
        on_cpu = params[0].device.type == "cpu"
        for group in self.groups:
            a, b, c, d = coefficients(group.pull)
            if on_cpu:
                for i in group.indices:
                    self._cpu.add(grads[i], params[i].detach(), theta0[i] if theta0 is not None else None, a, b, c, d)
            else:
                foreach_norm_grads([grads[i] for i in group.indices], [params[i] for i in group.indices],
                                   [theta0[i] for i in group.indices] if theta0 is not None else None, a, b, c, d)

    @torch.no_grad()
    def reset_theta0(self) -> None:
        """Re-copy the current parameters into theta0 in place, so one objective serves many trials."""
        theta0 = self.theta0
        if theta0 is None:
            return
        for base, p in zip(theta0, self.params, strict=True):
            base.copy_(p)


def _validated_group_weights(group_weights: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Per layer group, its own norm-term weights; other terms have no per-group weight."""
    out: dict[str, dict[str, float]] = {}
    for group, weights in group_weights.items():
        unknown = [t for t in weights if t not in NORM_TERMS]
        if unknown:
            raise ValueError(f"layer group {group!r}: only the norm terms ({', '.join(NORM_TERMS)}) have "
                             f"per-group weights, not {', '.join(map(repr, unknown))}")
        out[group] = {t: validated_weight(f"{t}' of layer group '{group}", w) for t, w in weights.items()}
    return out


def _norm_scales(convention: str, norm_scale: Mapping[str, float] | None, param_count: int | None
                 ) -> dict[str, float]:
    """Each norm term's scale: ``norm_scale[t]`` (default 1.0) under ours, ``1 / param_count`` under reference."""
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown convention {convention!r}; valid: {', '.join(CONVENTIONS)}")
    if convention == "reference":
        if norm_scale is not None:
            raise ValueError("norm_scale belongs to the ours convention; the reference convention divides the "
                             "norm terms by param_count")
        if param_count is None or int(param_count) <= 0:
            raise ValueError("the reference convention needs param_count, the model's total parameter count")
        return dict.fromkeys(NORM_TERMS, 1.0 / int(param_count))
    scales = dict.fromkeys(NORM_TERMS, 1.0)
    for term, value in (norm_scale or {}).items():
        if term not in NORM_TERMS:
            raise ValueError(f"norm_scale: unknown norm term {term!r}; valid: {', '.join(NORM_TERMS)}")
        value = float(value)
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"norm_scale of {term!r} must be finite and > 0, got {value}")
        scales[term] = value
    return scales
