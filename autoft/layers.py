"""Layer groups: named sets of a model's parameters, for per-group learning rate, weight decay and norm weights.

The paper's layerwise variant (the reference code's ``--layerwise_opt`` and ``--layerwise_loss``) gives each
layer its own learning rate, weight decay and norm-term weights. The model config names the groups
(``model.layer_groups``): ``{group: [prefix, ...]}`` where a prefix is a dotted module path of
:class:`autoft.model.CLIPClassifier` (a parameter belongs to it when its name is the prefix or starts with
``prefix.``), and a last component ``i:j`` stands for the children ``i`` to ``j - 1`` (blocks
``clip.visual.transformer.resblocks.0:4``). Every model config defines the same group names (the image
tower's embeddings, three block ranges, its final norm and projection, the head, the text tower), so one
search space (``search=autoft_layerwise``) serves the tiny CLIP and ViT-B/16 alike.

Where we differ from the reference: its groups are conv1, ln_pre, each block and the head, and only they go
to the optimizer, so the class and positional embeddings, ln_post, the projection and the text tower never
train with ``--layerwise_opt``. Here every trainable parameter must belong to exactly one group (one
``error:`` line otherwise), and a group given no setting of its own uses the global one (``optim.lr``,
``optim.weight_decay``, ``objective.weights``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from autoft import UserError

OPTIM_KEYS = ("lr", "weight_decay")


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def prefixes(spec: Mapping[str, Sequence[str]] | DictConfig | None) -> dict[str, list[str]]:
    """Each group's prefixes, ranges (``a.b.0:4``) expanded; a malformed spec is a :class:`UserError`."""
    spec = _plain(spec)
    if not spec:
        raise UserError("model.layer_groups is not set for this model: per-group settings (optim.groups, "
                        "objective.group_weights) need it")
    out: dict[str, list[str]] = {}
    for group, entries in spec.items():
        if isinstance(entries, str) or not isinstance(entries, Sequence) or not entries:
            raise UserError(f"model.layer_groups.{group}: give a list of parameter-name prefixes")
        out[group] = []
        for entry in entries:
            head, _, last = str(entry).rpartition(".")
            if ":" not in last:
                out[group].append(str(entry))
                continue
            start, _, stop = last.partition(":")
            if not (start.isdigit() and stop.isdigit() and int(start) < int(stop)):
                raise UserError(f"model.layer_groups.{group}: bad range '{last}' in '{entry}' (use i:j with i < j)")
            out[group] += [f"{head}.{i}" for i in range(int(start), int(stop))]
    return out


def assign(named_params: Iterable[tuple[str, torch.nn.Parameter]], spec) -> dict[str, str]:
    """Each trainable parameter's group; one that belongs to no group, or to two, is a :class:`UserError`."""
    groups = prefixes(spec)
    out: dict[str, str] = {}
    for name, p in named_params:
        if not p.requires_grad:
            continue
        found = [g for g, pre in groups.items() if any(name == x or name.startswith(x + ".") for x in pre)]
        if not found:
            raise UserError(f"model.layer_groups: trainable parameter '{name}' belongs to no layer group "
                            f"(groups: {', '.join(groups)})")
        if len(found) > 1:
            raise UserError(f"model.layer_groups: parameter '{name}' belongs to several layer groups: "
                            f"{', '.join(found)}")
        out[name] = found[0]
    return out


def check_groups(what: str, settings: Mapping[str, Any], spec, allowed: Sequence[str]) -> None:
    """Settings name only groups of ``model.layer_groups`` and only ``allowed`` keys in each."""
    groups = prefixes(spec)
    for group, values in settings.items():
        if group not in groups:
            raise UserError(f"{what}: unknown layer group '{group}'; model.layer_groups has {', '.join(groups)}")
        unknown = [k for k in (values or {}) if k not in allowed]
        if unknown:
            raise UserError(f"{what}.{group}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(allowed)}")


def optimizer_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]], spec, settings,
                     lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups, one per layer group with trainable parameters (in ``model.layer_groups``
    order), each with its own ``lr`` and ``weight_decay`` from ``settings`` (``optim.groups``) or the global
    ones; each group dict also carries its ``name``."""
    settings = _plain(settings) or {}
    check_groups("optim.groups", settings, spec, OPTIM_KEYS)
    named = [(n, p) for n, p in named_params if p.requires_grad]
    group_of = assign(named, spec)
    out = []
    for group in prefixes(spec):
        params = [p for n, p in named if group_of[n] == group]
        if params:
            own = settings.get(group) or {}
            out.append({"name": group, "params": params, "lr": float(own.get("lr", lr)),
                        "weight_decay": float(own.get("weight_decay", weight_decay))})
    return out
