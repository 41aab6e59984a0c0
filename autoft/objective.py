"""The AutoFT inner objective: a weighted sum of nine loss terms.

``Loss = sum_i w_i * L_i`` over :data:`LOSS_TERMS`, with ``w_i >= 0`` proposed by the outer search
(Choi et al. 2024, section 2 of ``docs/autoft-method.md``). The decisions below are the ones the
paper or its reference code leaves open or gets wrong.

* **theta0 is a real copy.** The reference code builds theta0 with ``p.detach().cuda()``, which on a
  CUDA tensor aliases the live parameter, so l1init/l2init are identically zero (defect 1). We store
  ``p.detach().clone()`` as non-persistent buffers: they follow ``.to(device)`` (Lightning moves
  them) but stay out of checkpoints, since they are the pretrained weights the caller already has.
* **The objective does not own the model's parameters.** It keeps a plain list of the trainable
  ones (``requires_grad=True``); registering them would make them appear twice in optimizers and
  state dicts. Frozen parameters are not regularized: they cannot move, so their terms are
  constants that only cost time.
* **Norm terms are unnormalized sums** over all trainable elements. The per-element gradient
  (``w * sign(p - p0)``, ``2 w (p - p0)``) then does not depend on the parameter count, so one weight
  means the same pull per element on any model (the L2-SP convention). A per-count mean would scale
  the effect by 1/N (about 1e-8 for ViT-B/16) and make the search range [1e-4, 10] meaningless.
  They are computed in float32 with autocast off, because squared sums over ~1e8 elements overflow
  or lose all precision in half precision.
* **dcm** (Data-driven Confidence Minimization) on misclassified examples (argmax z != y) is
  ``KL(uniform || p) = -(1/K) sum_j log p_j - log K``, which is >= 0 and 0 iff p is uniform, so a
  positive weight pushes p toward uniform. Per-example values are summed over the misclassified
  examples and divided by the full batch size B: the term is 0 when everything is correct, grows
  with the error rate, and is not a noisy mean over a handful of examples. The mask carries no
  gradient (argmax has none; computing it under ``no_grad`` makes that explicit).
* **entropy** with a positive weight *minimizes* prediction entropy (the paper's sign).
* **hinge** is Weston-Watkins: ``mean_b sum_{j != y} relu(z_j - z_y + 1)``.
* **flyp** is FLYP's symmetric InfoNCE between normalized image features and normalized features
  of each image's class caption. ``logit_scale`` is the multiplier itself (CLIP's
  ``logit_scale.exp()``), not its log. As in FLYP, targets are ``arange(B)``: two images of the same
  class in a batch have identical captions, which then act as each other's negatives.
* **Closed-form norm gradients** (``closed_form_norms=True``, what training uses): the four norm
  terms' gradients are known (``w sign(p - p0)``, ``2 w (p - p0)``, ``w sign(p)``, ``2 w p``), so
  :meth:`CompositeObjective.add_norm_grads` adds them to ``p.grad`` in place after backward (fused
  foreach ops on a GPU; on CPU, where foreach ops stream a temporary per op through memory, each
  cache-sized block goes through all four terms), instead of autograd building a graph over every
  parameter each step. With ``compile_norm_grads`` (``model.compile_norm_grads``, by default on when
  the model is compiled) one compiled function reads each parameter, theta0 and gradient once and
  writes the gradient once, where the eager foreach ops make about five passes (on ViT-B/16 the eager
  passes cost 1.4 ms of a 104 ms step, and a compiled step is 70 ms). ``forward`` then leaves them out
  of the returned loss and computes their values only when asked (``norm_values=True``, for logging
  every N steps). Same math: sign(0) = 0 as in autograd.
* **Only active terms are computed.** Zero-weight terms are skipped (the norm terms alone touch
  every parameter); the returned log dict has one detached entry per active term.
* **ce defaults to weight 1** when not given (it is the paper's anchor term); any other given
  weight, including 0, is respected. An objective whose weights are all zero is rejected: it would
  train nothing.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

LOSS_TERMS: tuple[str, ...] = (
    "ce", "hinge", "entropy", "dcm", "flyp", "l1init", "l2init", "l1zero", "l2zero"
)
NORM_TERMS: tuple[str, ...] = ("l1init", "l2init", "l1zero", "l2zero")
_INIT_TERMS: tuple[str, ...] = ("l1init", "l2init")
_CPU_BLOCK = 1 << 18  # elements per block of the CPU norm-gradient pass: 1 MiB of float32 per operand, cache-sized


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


def entropy_loss(logits: Tensor) -> Tensor:
    """Mean prediction entropy ``H(softmax(z))``; a positive weight minimizes it."""
    log_p = F.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).sum(dim=1).mean()


def dcm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Confidence minimization on misclassified examples: ``sum_wrong KL(uniform || p) / B``.

    Divided by the full batch size so it is 0 when all are correct and scales with the error rate.
    """
    with torch.no_grad():
        wrong = logits.argmax(dim=1) != labels
    log_p = F.log_softmax(logits, dim=1)
    kl_from_uniform = -log_p.mean(dim=1) - math.log(logits.shape[1])
    return (kl_from_uniform * wrong).sum() / logits.shape[0]


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

    Sums over all elements (see the module docstring for why), computed in float32 with autocast off.
    """
    terms = tuple(terms)
    unknown = [t for t in terms if t not in NORM_TERMS]
    if unknown:
        raise ValueError(f"unknown norm term(s) {unknown}; valid: {', '.join(NORM_TERMS)}")
    if not params or not terms:
        return {t: torch.zeros(()) for t in terms}
    device_type = params[0].device.type
    with torch.autocast(device_type=device_type, enabled=False):
        current = [p.float() for p in params]
        bases: dict[str, list[Tensor]] = {}
        if any(t in _INIT_TERMS for t in terms):
            if theta0 is None or len(theta0) != len(params):
                raise ValueError("l1init/l2init need theta0 with one tensor per parameter")
            bases["init"] = torch._foreach_sub(current, [t.float() for t in theta0])
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


class CompositeObjective(torch.nn.Module):
    """Loss = sum_i w_i * L_i over LOSS_TERMS."""

    def __init__(
        self,
        weights: Mapping[str, float],
        named_params: Iterable[tuple[str, torch.nn.Parameter]],
        closed_form_norms: bool = False,
        compile_norm_grads: bool = False,
    ) -> None:
        """Validate ``weights`` (missing terms weigh 0, ce defaults to 1) and snapshot theta0 if needed.

        ``named_params`` is typically ``model.named_parameters()``; only trainable ones are kept.
        ``closed_form_norms``: the norm terms' gradients come from :meth:`add_norm_grads`, called
        between backward and the optimizer step, not from the loss ``forward`` returns.
        ``compile_norm_grads``: those gradients come from one torch.compile'd pass (compiled once per
        process and shape set, then reused by every objective: the weights are a tensor input).
        """
        super().__init__()
        self.weights: dict[str, float] = _validated_weights(weights)
        self.closed_form_norms = closed_form_norms
        self.compile_norm_grads = compile_norm_grads
        self._coefs: Tensor | None = None  # (a, b, c, d) of add_norm_grads on the parameters' device
        # A plain list, not registered: the model owns its parameters, the objective only reads them.
        self.params: list[torch.nn.Parameter] = [p for _, p in named_params if p.requires_grad]
        self._num_theta0 = 0
        self._scratch_by_dtype: dict[torch.dtype, Tensor] = {}
        if any(self.weights[t] > 0 for t in _INIT_TERMS):
            for i, p in enumerate(self.params):
                self.register_buffer(f"theta0_{i}", p.detach().clone(), persistent=False)
            self._num_theta0 = len(self.params)

    @property
    def theta0(self) -> list[Tensor] | None:
        """Frozen copies of the trainable parameters at construction (or last reset), if l*init is active."""
        if not any(self.weights[t] > 0 for t in _INIT_TERMS):
            return None
        return [getattr(self, f"theta0_{i}") for i in range(self._num_theta0)]

    @property
    def active_terms(self) -> tuple[str, ...]:
        """Terms with a positive weight, in LOSS_TERMS order."""
        return tuple(t for t in LOSS_TERMS if self.weights[t] > 0)

    @property
    def needs_text(self) -> bool:
        """Whether the caller must pass caption features (flyp is active)."""
        return self.weights["flyp"] > 0

    def forward(
        self,
        logits: Tensor,
        labels: Tensor,
        image_features: Tensor | None = None,
        text_features: Tensor | None = None,
        logit_scale: Tensor | float | None = None,
        norm_values: bool = True,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Return ``(total, values)``: the weighted loss and each active term's detached raw value.

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
            values["dcm"] = dcm_loss(logits, labels)
        if "flyp" in active:
            if image_features is None or text_features is None or logit_scale is None:
                raise ValueError(
                    "flyp weight > 0 needs image_features, text_features (the features of each image's "
                    "class caption) and logit_scale; got None for at least one"
                )
            values["flyp"] = flyp_loss(image_features, text_features, logit_scale)
        active_norms = [t for t in NORM_TERMS if t in active]
        if active_norms and not self.closed_form_norms:
            values.update(norm_terms(self.params, self.theta0, active_norms))
        total: Tensor = sum(self.weights[t] * v for t, v in values.items())  # type: ignore[assignment]
        if not values:  # only norm terms, all in closed form: nothing for autograd to do
            total = logits.sum() * 0.0
        values = {t: v.detach() for t, v in values.items()}
        if active_norms and self.closed_form_norms and norm_values:
            with torch.no_grad():
                values.update(norm_terms(self.params, self.theta0, active_norms))
        return total, values

    @torch.no_grad()
    def add_norm_grads(self) -> None:
        """Add the active norm terms' gradients to ``p.grad`` in place, in closed form: fused foreach ops
        on a GPU, cache-sized blocks on CPU.

        Call after backward and before the optimizer step (after AMP unscaling), once per step.
        """
        w = self.weights
        if not self.closed_form_norms or not any(w[t] > 0 for t in NORM_TERMS) or not self.params:
            return
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        # g += a p + b theta0 + c sign(p - theta0) + d sign(p): the two L2 pulls merged into two passes
        a, b = 2 * (w["l2init"] + w["l2zero"]), -2 * w["l2init"]
        c, d = w["l1init"], w["l1zero"]
        params, grads, theta0 = self.params, [p.grad for p in self.params], self.theta0
        if self.compile_norm_grads:
            if self._coefs is None or self._coefs.device != params[0].device:
                self._coefs = torch.tensor([a, b, c, d], dtype=torch.float32, device=params[0].device)
            _compiled_norm_grads()(grads, params, theta0 if theta0 is not None else params, self._coefs)
            return
        if params[0].device.type != "cpu":
            _foreach_norm_grads(grads, params, theta0, a, b, c, d)
            return
        # CPU foreach ops loop over tensors and allocate every temporary; instead, each block of
        # _CPU_BLOCK elements of each tensor goes through all the terms while it sits in cache, with
        # one reused scratch buffer: about 10 ms against 50 over the tiny CLIP's 5.8M weights (1 thread)
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            for pb, gb, qb, scratch in self._cpu_blocks(p.detach(), g, theta0[i] if theta0 is not None else None):
                if a:
                    gb.add_(pb, alpha=a)
                if b:
                    gb.add_(qb, alpha=b)
                if c:
                    gb.add_(torch.sub(pb, qb, out=scratch).sign_(), alpha=c)
                if d:
                    gb.add_(torch.sign(pb, out=scratch), alpha=d)

    def _cpu_blocks(self, p: Tensor, g: Tensor, q: Tensor | None):
        """(param, grad, theta0, scratch) blocks of _CPU_BLOCK elements, the scratch buffer reused (one per
        dtype); a tensor not contiguous in the default order (channels_last conv weights, small) is one block."""
        if not (p.is_contiguous() and g.is_contiguous() and (q is None or q.is_contiguous())):
            yield p, g, q, torch.empty_like(p)
            return
        if p.dtype not in self._scratch_by_dtype:
            self._scratch_by_dtype[p.dtype] = torch.empty(_CPU_BLOCK, dtype=p.dtype)
        buffer = self._scratch_by_dtype[p.dtype]
        p, g, q = p.view(-1), g.view(-1), q.view(-1) if q is not None else None
        for start in range(0, p.numel(), _CPU_BLOCK):
            block = slice(start, start + _CPU_BLOCK)
            pb = p[block]
            yield pb, g[block], q[block] if q is not None else None, buffer[: pb.numel()]

    @torch.no_grad()
    def reset_theta0(self) -> None:
        """Re-copy the current parameters into theta0 in place, so one objective serves many trials."""
        theta0 = self.theta0
        if theta0 is None:
            return
        for base, p in zip(theta0, self.params, strict=True):
            base.copy_(p)


def _foreach_norm_grads(grads: list[Tensor], params: Sequence[Tensor], theta0: Sequence[Tensor] | None,
                        a: float, b: float, c: float, d: float) -> None:
    """``g += a p + b theta0 + c sign(p - theta0) + d sign(p)`` with fused multi-tensor ops (GPU path)."""
    if a:
        torch._foreach_add_(grads, params, alpha=a)
    if b:
        torch._foreach_add_(grads, theta0, alpha=b)
    if c:
        diffs = torch._foreach_sub(params, theta0)
        torch._foreach_sign_(diffs)
        torch._foreach_add_(grads, diffs, alpha=c)
    if d:
        torch._foreach_add_(grads, torch._foreach_sign(params), alpha=d)


def _fused_norm_grads(grads: list[Tensor], params: Sequence[Tensor], theta0: Sequence[Tensor],
                      coefs: Tensor) -> None:
    """``g += a p + b theta0 + c sign(p - theta0) + d sign(p)``, written for torch.compile to fuse into one
    pass per tensor group. Every term is computed (a zero coefficient adds zero) and the coefficients are
    a tensor, so neither their values nor which of them are zero trigger a recompilation."""
    a, b, c, d = coefs.unbind()
    torch._foreach_add_(grads, [a * p + b * q + c * torch.sign(p - q) + d * torch.sign(p)
                                for p, q in zip(params, theta0, strict=True)])


@functools.cache
def _compiled_norm_grads():
    # static shapes: a second parameter list in one process (another model, a multirun's next job) gets
    # its own graph. By default it would get one with dynamic shapes, whose many-kernel wrapper was the
    # likely cause of a compiled ViT-B/16 trained-text step measured at 0.80x instead of 0.86x.
    return torch.compile(_fused_norm_grads, dynamic=False)


def _validated_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """All nine weights as floats; unknown names, negative or non-finite values raise ValueError."""
    out = dict.fromkeys(LOSS_TERMS, 0.0)
    out["ce"] = 1.0
    for name, value in weights.items():
        if name not in out:
            raise ValueError(f"unknown loss term {name!r}; valid terms: {', '.join(LOSS_TERMS)}")
        value = float(value)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"weight of loss term {name!r} must be finite and >= 0, got {value}")
        out[name] = value
    if not any(v > 0 for v in out.values()):
        raise ValueError("all loss weights are zero: the objective would train nothing")
    return out
