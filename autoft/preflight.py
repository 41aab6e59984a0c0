"""An entry point's first look at its data and weights, before it imports the training stack.

Importing torch, Lightning, open_clip and wilds takes about 12 s here (``benchmarks/offline_weights.py``),
so a run that cannot find its data or cannot get its weights would say so only after that. The app
modules (``autoft.finetune``, ``autoft.methods``, ``autoft.final``) therefore call :func:`preflight`
under ``if __name__ == "__main__"`` above their imports: it composes the config Hydra will compose from
the same command line and runs the run's own checks that need no heavy import, in the run's order:

1. the data: a WILDS folder's files, metadata and class names (:mod:`autoft.wildscheck`), or the embedded
   world's settings;
2. the weights: :func:`autoft.weights.resolve` on the shipped snapshot of open_clip's registry;
3. for ``autoft.finetune``, which trains with the composed objective: the model settings the reference
   convention needs, or the loss weights (:mod:`autoft.terms`).

Failing, it prints the run's one ``error:`` line and exits 2, in a second or two. What it cannot check
cheaply it leaves to the run, which checks the same in the same order: other dataset kinds (their
readers import torch: then the weights wait for them too), a model name open_clip has no tags for, a
snapshot from another open_clip version. A multirun (``-m``) is only composed, each job checks its own
data; Hydra's other flags (``--cfg``, ...) skip it.

A command line Hydra rejects (an unknown config name, a key not in the config) is answered by Hydra's
own main at once, before the imports too: the same message and exit status 1 as after them, nothing
written. Its job would import the app and run it, should Hydra accept what the composition here did
not; an accepted command imports the app before Hydra starts, as it always did (Lightning sets up its
loggers at import, differently once Hydra has configured logging: see autoft.hydra_callbacks).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from omegaconf import DictConfig, OmegaConf

from autoft import UserError

# The repo's top-level conf/ (resolved through the editable install's symlinks).
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
MULTIRUN_FLAGS = frozenset({"-m", "--multirun"})


def configured_root(d: DictConfig) -> str:
    """A dataset's data root: ``dataset.root``, then ``AUTOFT_DATA``; one line when neither is set."""
    root = d.root or os.environ.get("AUTOFT_DATA")
    if not root:
        raise UserError(f"no data root for dataset '{d.name}': set dataset.root=... or AUTOFT_DATA")
    return root


def check(cfg: DictConfig, objective: bool = False) -> None:
    """The data, then the weights, then (``objective``) the objective, as far as they can be checked without torch
    (see the module docstring)."""
    from autoft.weights import is_path, resolve, shipped_registry
    from autoft.wildscheck import wilds_checks

    d, m = cfg.get("dataset"), cfg.get("model")
    if d is None or m is None:
        return
    if d.get("world") is None or d.root:  # real data must be there
        if (d.get("kind") or "wilds") != "wilds":
            return
        for run_check in wilds_checks(d.name, configured_root(d), d.get("class_names")).checks.values():
            run_check()
    else:  # the embedded world is generated from its settings
        from autoft.world import WorldConfig

        WorldConfig.from_dict(OmegaConf.to_container(d.world, resolve=True))
    pretrained = m.get("pretrained")
    if pretrained and pretrained != "embedded":  # else random init, or the project's own tiny CLIP
        registry = shipped_registry()
        if not (is_path(pretrained) or (registry is not None and m.name in registry["models"])):
            return  # weights the run must look up itself, before its objective
        resolve(m.name, pretrained, registry)
    if objective:
        check_objective(cfg)


def check_objective(cfg: DictConfig) -> None:
    """The objective as the run checks it once its model is built (:func:`autoft.finetune.finetune`), where the
    run can fail on nothing else first: under the reference convention, the model settings it needs (valid
    captions given); under ours without per-layer-group weights, the loss weights' names and values."""
    from autoft.conventions import configured_requirements, reference_error
    from autoft.terms import validated_weights

    o = cfg.get("objective")
    if o is None:
        return
    if o.get("convention", "ours") == "reference":
        if cfg.model.get("captions", "first") in ("first", "all"):  # else the model's own error comes first
            missing = configured_requirements(cfg.model)
            if missing:
                raise reference_error(missing)
        return
    if o.get("group_weights"):
        return
    try:
        validated_weights(OmegaConf.to_container(o.weights, resolve=True))
    except ValueError as e:
        raise UserError(f"objective: {e}") from None


def _compose(config_name: str, overrides: list[str], multirun: bool) -> DictConfig:
    """The config Hydra's main composes from these overrides; a multirun's before its sweep is expanded."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        if not multirun:
            return compose(config_name, overrides=overrides)
        # the compose API composes single runs only; this is the call Hydra's main makes for a multirun (hydra 1.3)
        return GlobalHydra.instance().hydra.compose_config(config_name, overrides, run_mode=RunMode.MULTIRUN,
                                                           from_shell=True)


def _hydra_answers(config_name: str, app: str) -> NoReturn:
    """Hydra's own main on the command line, to reject it as it would after the app's imports; its job imports
    ``app`` and runs that module's ``main`` (a ``hydra.main`` function takes a composed config too)."""
    import hydra

    def job(cfg: DictConfig) -> Any:
        return importlib.import_module(app).main(cfg)

    job.__module__ = app  # Hydra names the job (hydra.job.name, its log file) after the module of its task
    hydra.main(config_path=CONF_DIR, config_name=config_name, version_base="1.3")(job)()
    sys.exit(0)


def preflight(config_name: str, argv: list[str] | None = None,
              first: Callable[[DictConfig], object] | None = None, app: str | None = None,
              objective: bool = False) -> None:
    """Compose ``config_name`` with the command line's overrides, run ``first`` (what the app reads before its
    data: ``autoft.final``'s searched params) and :func:`check` it; exit 2 with one line on a
    :class:`UserError`. ``app``: the module whose ``main`` runs this command line (``sys.argv``), given by the
    entry points; a command Hydra rejects then exits here with Hydra's message. ``objective``: the run trains
    with the composed objective (not a search's), so it is checked too."""
    argv = sys.argv[1:] if argv is None else argv
    flags = {arg for arg in argv if arg.startswith("-")}
    multirun = bool(flags) and flags <= MULTIRUN_FLAGS
    if flags and not multirun:
        return
    try:
        cfg = _compose(config_name, [arg for arg in argv if arg not in MULTIRUN_FLAGS], multirun)
    except Exception:  # noqa: BLE001 - a command Hydra rejects: Hydra's own message follows
        if app is not None:
            _hydra_answers(config_name, app)
        return
    if multirun:
        return
    try:
        if first is not None:
            first(cfg)
        check(cfg, objective)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception:  # noqa: BLE001 - anything else (an interpolation that fails, say): the run reports it
        return
