"""Closed-form gradients of the four norm terms, added to ``p.grad`` in place after backward.

Each norm term's per-element gradient is known, so :class:`autoft.objective.CompositeObjective` adds it
instead of autograd building a graph over every parameter each step. With per-element pulls ``e_t`` (a
term's weight times its scale, see the objective's docstring) the four terms together add

    g += A (p - theta0) + B sign(p - theta0) + C p + D sign(p),
    A = 2 e_l2init,  B = e_l1init,  C = 2 e_l2zero,  D = e_l1zero.

``p - theta0`` is formed first (exact for nearby floats) and then scaled: the algebraically equal
``A p - A theta0`` loses the difference in rounding when ``|p| >> |p - theta0|``, which is fine-tuning's
regime (benchmarks/reference_pull.py caught it on ViT-B/16; tests/test_objective.py holds it to 1e-6).
sign(0) = 0, as in autograd. Three ways to run it, same math:

* **GPU**: fused multi-tensor (foreach) ops, one call per set of parameters sharing coefficients.
* **CPU**: foreach ops stream a temporary per op through memory; instead each cache-sized block of a tensor
  goes through all the terms while it sits in cache, with one reused scratch buffer (about 10 ms against
  50 over the tiny CLIP's 5.8M weights, 1 thread).
* **Compiled** (``compile_norm_grads``): one torch.compile'd function reads each parameter, theta0 and
  gradient once and writes the gradient once, where the eager foreach ops make about five passes (on
  ViT-B/16 the eager passes cost 1.4 ms of a 104 ms step, and a compiled step is 70 ms). The coefficients
  are a [P, 4] tensor input (one row per parameter), so neither their values nor which of them are zero
  trigger a recompilation: it is compiled once per process and parameter list, then reused by every
  objective.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor

CPU_BLOCK = 1 << 18  # elements per block of the CPU pass: 1 MiB of float32 per operand, cache-sized


def coefficients(pull: Mapping[str, float]) -> tuple[float, float, float, float]:
    """``(A, B, C, D)`` of the update above from the per-element pulls of l1init, l2init, l1zero, l2zero."""
    return 2 * pull["l2init"], pull["l1init"], 2 * pull["l2zero"], pull["l1zero"]


def foreach_norm_grads(grads: list[Tensor], params: Sequence[Tensor], theta0: Sequence[Tensor] | None,
                       a: float, b: float, c: float, d: float) -> None:
    """``g += a (p - theta0) + b sign(p - theta0) + c p + d sign(p)`` with fused multi-tensor ops (GPU path)."""
    if a or b:
        diffs = torch._foreach_sub(params, theta0)
        if a:
            torch._foreach_add_(grads, diffs, alpha=a)
        if b:
            torch._foreach_sign_(diffs)
            torch._foreach_add_(grads, diffs, alpha=b)
    if c:
        torch._foreach_add_(grads, params, alpha=c)
    if d:
        torch._foreach_add_(grads, torch._foreach_sign(params), alpha=d)


def fused_norm_grads(grads: list[Tensor], params: Sequence[Tensor], theta0: Sequence[Tensor],
                     coefs: Tensor) -> None:
    """The same update with row ``i`` of ``coefs`` [P, 4] as parameter i's ``(A, B, C, D)``, written for
    torch.compile to fuse into one pass per tensor group. Every term is computed (a zero coefficient adds
    zero), so the coefficients' values never change the graph."""
    updates = []
    for i, (p, q) in enumerate(zip(params, theta0, strict=True)):
        a, b, c, d = coefs[i].unbind()
        diff = p - q
        updates.append(a * diff + b * torch.sign(diff) + c * p + d * torch.sign(p))
    torch._foreach_add_(grads, updates)


@functools.cache
def compiled_norm_grads():
    # static shapes: a second parameter list in one process (another model, a multirun's next job) gets
    # its own graph. By default it would get one with dynamic shapes, whose many-kernel wrapper was the
    # likely cause of a compiled ViT-B/16 trained-text step measured at 0.80x instead of 0.86x.
    return torch.compile(fused_norm_grads, dynamic=False)


class CpuBlocks:
    """The CPU pass: cache-sized blocks, one scratch buffer per dtype reused across steps."""

    def __init__(self) -> None:
        self._scratch: dict[torch.dtype, Tensor] = {}

    def add(self, g: Tensor, p: Tensor, q: Tensor | None, a: float, b: float, c: float, d: float) -> None:
        """``g += a (p - q) + b sign(p - q) + c p + d sign(p)`` block by block (``q`` is theta0, None if a = b = 0)."""
        for pb, gb, qb, scratch in self._blocks(p, g, q):
            if a or b:
                torch.sub(pb, qb, out=scratch)
                if a:
                    gb.add_(scratch, alpha=a)
                if b:
                    gb.add_(scratch.sign_(), alpha=b)
            if c:
                gb.add_(pb, alpha=c)
            if d:
                gb.add_(torch.sign(pb, out=scratch), alpha=d)

    def _blocks(self, p: Tensor, g: Tensor, q: Tensor | None) -> Iterator[tuple[Tensor, Tensor, Tensor | None, Tensor]]:
        """(param, grad, theta0, scratch) blocks of CPU_BLOCK elements; a tensor not contiguous in the default
        order (channels_last conv weights, small) is one block."""
        if not (p.is_contiguous() and g.is_contiguous() and (q is None or q.is_contiguous())):
            yield p, g, q, torch.empty_like(p)
            return
        if p.dtype not in self._scratch:
            self._scratch[p.dtype] = torch.empty(CPU_BLOCK, dtype=p.dtype)
        buffer = self._scratch[p.dtype]
        p, g, q = p.view(-1), g.view(-1), q.view(-1) if q is not None else None
        for start in range(0, p.numel(), CPU_BLOCK):
            block = slice(start, start + CPU_BLOCK)
            pb = p[block]
            yield pb, g[block], q[block] if q is not None else None, buffer[: pb.numel()]
