"""The objective's loss terms and conventions by name, and the check of its weights: no torch here.

:mod:`autoft.objective` defines the terms (see its docstring). Their names and the weights' check live apart
so that the entry points' preflight (:mod:`autoft.preflight`) and the converter's command line
(:mod:`autoft.conventions`) can check a config's objective before importing the training stack (about 12 s).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

LOSS_TERMS: tuple[str, ...] = (
    "ce", "hinge", "entropy", "dcm", "flyp", "l1init", "l2init", "l1zero", "l2zero"
)
NORM_TERMS: tuple[str, ...] = ("l1init", "l2init", "l1zero", "l2zero")
CONVENTIONS: tuple[str, ...] = ("ours", "reference")


def validated_weight(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"weight of loss term {name!r} must be finite and >= 0, got {value}")
    return value


def validated_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """All nine weights as floats; unknown names, negative or non-finite values raise ValueError."""
    out = dict.fromkeys(LOSS_TERMS, 0.0)
    out["ce"] = 1.0
    for name, value in weights.items():
        if name not in out:
            raise ValueError(f"unknown loss term {name!r}; valid terms: {', '.join(LOSS_TERMS)}")
        out[name] = validated_weight(name, value)
    return out
