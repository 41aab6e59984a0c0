"""The objective's conventions in practice: what a config asks of the objective, the parameter count the
reference convention divides by, and a converter of loss weights between the conventions.

``python -m autoft.conventions [--to ours|reference] [--classes K] [--best best_params.yaml] [overrides]``
prints, as YAML, the composed objective's weights (``objective=...``, or a search's best params) in the other
convention. The conventions are defined in :mod:`autoft.objective`; what converts and what does not:

* ``ce``, ``hinge``, ``entropy``: the same function under both conventions; the weight carries over.
* ``l1init``, ``l2init``, ``l1zero``, ``l2zero``: a linear rescale of the same sum, so the conversion is
  exact: ``w_ours * norm_scale[t] = w_reference / N`` (the same per-element pull), per layer group too.
  N is every parameter of the model (both towers, ``logit_scale``, the head of ``K`` classes), counted from
  the model config (:func:`model_parameter_count`).
* ``dcm``: not convertible. Ours is KL(uniform || p) on misclassified examples (pushes them toward
  uniform), the reference's is their entropy (a positive weight makes them more confident): different
  functions, no weight of one equals the other.
* ``flyp``: the same function, but of different parameters unless the model config trains the text tower
  and ``logit_scale`` with captions from all templates, as the reference does; with the text tower frozen
  (our default) it is not the same term, and it is reported as not convertible.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import yaml
from omegaconf import DictConfig, OmegaConf

from autoft import UserError
from autoft.terms import CONVENTIONS, NORM_TERMS

if TYPE_CHECKING:  # torch and open_clip are imported where a model is counted: the command line's errors come first
    import torch

SAME_TERMS = ("ce", "hinge", "entropy")
DCM_REASON = ("different functions: ours is KL(uniform || p) on misclassified examples (toward uniform), the "
              "reference's their entropy (a positive weight makes them more confident); no rescale maps one to "
              "the other")
FLYP_REASON = ("flyp is the same term only when the text tower and logit_scale train with captions from all "
               "templates, as in the reference (model.train_text=true model.train_logit_scale=true "
               "model.captions=all); this model config does not, so it is another function of the trained weights")
FLYP_NOTE = ("the same term only with model.train_text=true model.train_logit_scale=true model.captions=all "
             "model.text_head=false, as the reference trains it")
REFERENCE_MODEL = {"train_text": True, "train_logit_scale": True, "captions": "all", "text_head": False}


def parameter_count(model: torch.nn.Module) -> int:
    """Elements of every parameter of ``model``, trainable or not: the reference's norm denominator when
    ``model`` is the classifier (open_clip CLIP, both towers and ``logit_scale``, plus the head)."""
    return sum(p.numel() for p in model.parameters())


def model_parameter_count(model_cfg: DictConfig | Mapping[str, Any], n_classes: int) -> int:
    """:func:`parameter_count` of the classifier a model config builds with an ``n_classes`` head, counted from
    the open_clip architecture (created on the meta device: no weights, no download) plus the head."""
    import open_clip
    import torch

    import autoft.model  # noqa: F401  (registers the project's tiny architectures with open_clip)

    name = model_cfg["name"]
    if name not in open_clip.list_models():
        raise UserError(f"unknown model '{name}'; see open_clip.list_models()")
    with torch.device("meta"):
        clip = open_clip.create_model(name, pretrained=None, device="meta")
    dim = open_clip.get_model_config(name)["embed_dim"]
    return parameter_count(clip) + n_classes * dim + n_classes


def _missing(have: Mapping[str, Any]) -> list[str]:
    return [f"model.{k}={str(v).lower()}" for k, v in REFERENCE_MODEL.items() if have[k] != v]


def reference_requirements(model: torch.nn.Module) -> list[str]:
    """The model overrides still needed to train what the reference trains (every parameter, captions from
    every template), as ``key=value`` strings; empty when the model already does."""
    return _missing({"train_text": model.train_text, "train_logit_scale": model.clip.logit_scale.requires_grad,
                     "captions": model.captions, "text_head": model.text_head})


def configured_requirements(model_cfg: DictConfig) -> list[str]:
    """:func:`reference_requirements` of the model a config builds, read from the config as
    :func:`autoft.finetune.build` passes it to the model (the preflight's check, before torch is imported)."""
    return _missing({"train_text": model_cfg.train_text, "train_logit_scale": model_cfg.get("train_logit_scale", False),
                     "captions": model_cfg.get("captions", "first"), "text_head": model_cfg.get("text_head", False)})


def reference_error(missing: list[str]) -> UserError:
    return UserError("objective.convention=reference trains every parameter with captions from all templates, as "
                     f"the reference code does: set {' '.join(missing)} (or use convention ours)")


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def objective_settings(cfg: DictConfig, model: torch.nn.Module) -> dict[str, Any]:
    """The :class:`autoft.objective.CompositeObjective` keyword arguments ``cfg.objective`` asks for on
    ``model``: its convention (with ``norm_scale`` under ours, the model's parameter count under reference)
    and its per-layer-group norm weights (``objective.group_weights``, groups from ``model.layer_groups``)."""
    objective = cfg.objective
    convention = objective.get("convention", "ours")
    settings: dict[str, Any] = {"convention": convention}
    if convention == "reference":
        missing = reference_requirements(model)
        if missing:
            raise reference_error(missing)
        settings["param_count"] = parameter_count(model)
    else:
        settings["norm_scale"] = _plain(objective.get("norm_scale")) or None
    group_weights = _plain(objective.get("group_weights")) or {}
    if group_weights:
        from autoft import layers

        spec = cfg.model.get("layer_groups")
        layers.check_groups("objective.group_weights", group_weights, spec, NORM_TERMS)
        settings["group_of"] = layers.assign(model.named_parameters(), spec)
        settings["group_weights"] = group_weights
    return settings


@dataclass
class Conversion:
    """Weights in the target convention; ``not_converted`` maps each term left out to why, ``notes`` each kept
    term to the condition it holds under."""

    weights: dict[str, float]
    group_weights: dict[str, dict[str, float]] = field(default_factory=dict)
    not_converted: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)


def convert(weights: Mapping[str, float], source: str, target: str, param_count: int,
            norm_scale: Mapping[str, float] | None = None, flyp_same: bool = False,
            group_weights: Mapping[str, Mapping[str, float]] | None = None) -> Conversion:
    """``weights`` (and per-group norm weights) from ``source`` to ``target`` convention, for a model of
    ``param_count`` parameters and the ours side's ``norm_scale`` (1.0 where not given). ``flyp_same``: the
    ours side trains the text tower and ``logit_scale`` with captions from all templates."""
    for name in (source, target):
        if name not in CONVENTIONS:
            raise UserError(f"unknown convention '{name}'; valid: {', '.join(CONVENTIONS)}")
    if param_count <= 0:
        raise UserError(f"param_count must be positive, got {param_count}")
    scale = {t: float((norm_scale or {}).get(t, 1.0)) for t in NORM_TERMS}
    # per-element pull: ours w * scale[t], reference w / N; the factor takes a source weight to a target one
    to_pull = {"ours": lambda t: scale[t], "reference": lambda t: 1.0 / param_count}
    factor = {t: to_pull[source](t) / to_pull[target](t) for t in NORM_TERMS}
    groups = {g: {t: float(w) * factor[t] for t, w in ws.items()} for g, ws in (group_weights or {}).items()}
    out = Conversion({}, groups)
    for term, weight in weights.items():
        weight = float(weight)
        if term in NORM_TERMS:
            out.weights[term] = weight * factor[term]
        elif term in SAME_TERMS or source == target or (term == "flyp" and flyp_same):
            out.weights[term] = weight
            if term == "flyp" and weight and source != target:
                out.notes[term] = FLYP_NOTE
        elif weight == 0:
            out.weights[term] = 0.0  # an absent term is absent in both
        else:
            out.not_converted[term] = DCM_REASON if term == "dcm" else FLYP_REASON
    return out


def class_count(cfg: DictConfig, given: int | None) -> int:
    """The head's class count: given, or the dataset config's class list (ImageNet's OpenAI names: 1000)."""
    if given is not None:
        if given <= 0:
            raise UserError(f"--classes must be positive, got {given}")
        return given
    names = cfg.dataset.get("class_names")
    if OmegaConf.is_list(names) or isinstance(names, list):
        return len(names)
    if names == "openai":
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        return len(IMAGENET_CLASSNAMES)
    raise UserError(f"dataset '{cfg.dataset.name}' reads its class names from the data: give --classes K "
                    "(iWildCam 182, FMoW 62)")


def _best_params(path: str) -> dict[str, Any]:
    from autoft.best_params import load_best_params

    return load_best_params(best=path)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, as every autoft command
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(prog="python -m autoft.conventions", description=__doc__.split("\n\n")[0])
    parser.add_argument("--to", choices=CONVENTIONS, help="target convention (default: the other one)")
    parser.add_argument("--classes", type=int, help="the head's class count (default: from the dataset config)")
    parser.add_argument("--best", help="a best_params.yaml whose objective weights to convert")
    parser.add_argument("overrides", nargs="*",
                        help="Hydra overrides of conf/finetune.yaml, e.g. objective=autoft_iwildcam model=vit_b16")
    args = parser.parse_args(argv)
    try:
        from hydra import compose, initialize_config_dir

        from autoft.preflight import CONF_DIR

        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("finetune", overrides=list(args.overrides))
        if args.best:
            from autoft.final import apply_params  # with the training stack's imports (Lightning: seconds)

            cfg = apply_params(cfg, _best_params(args.best))
        source = cfg.objective.get("convention", "ours")
        target = args.to or next(c for c in CONVENTIONS if c != source)
        n = model_parameter_count(cfg.model, class_count(cfg, args.classes))
        flyp_same = all(cfg.model.get(k, False) == v for k, v in REFERENCE_MODEL.items())
        result = convert(_plain(cfg.objective.weights), source, target, n, _plain(cfg.objective.get("norm_scale")),
                         flyp_same, _plain(cfg.objective.get("group_weights")))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # Hydra's composition errors (unknown config names) and malformed files
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    objective: dict[str, Any] = {"convention": target, "weights": result.weights}
    if result.group_weights:
        objective["group_weights"] = result.group_weights
    report = {"from": source, "to": target, "param_count": n, "objective": objective,
              "not_converted": {t: {"weight": float(cfg.objective.weights[t]), "why": why}
                                for t, why in result.not_converted.items()}, "notes": result.notes}
    print(yaml.safe_dump(report, sort_keys=False, width=120), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
