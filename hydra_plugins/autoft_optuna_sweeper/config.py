"""The sweeper's config: the released hydra-optuna-sweeper's schema, plus our keys, and the sampler and pruner groups.

The released keys keep their released defaults, so a config written for ``hydra/sweeper=optuna`` means the same
here; every key we add defaults to what the released plugin does (see docs/sweeper.md for the few deliberate
differences). Samplers are ``_target_`` configs in ``hydra/sweeper/sampler`` (chosen with
``override hydra/sweeper/sampler: tpe``), pruners likewise in ``hydra/sweeper/pruner``. Each node lists every
constructor argument of its Optuna class, read from the class's signature, so any of them can be set without ``+``;
a ``null`` argument is not passed, so Optuna's own default applies. An argument without a default is ``???``.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
from dataclasses import dataclass, field
from typing import Any

import optuna
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from hydra.utils import get_class, instantiate
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import MissingMandatoryValue

# hydra/sweeper/sampler options: every sampler of Optuna >= 4 (PartialFixedSampler, a wrapper, is left out).
SAMPLERS = {
    "tpe": "optuna.samplers.TPESampler",
    "random": "optuna.samplers.RandomSampler",
    "cmaes": "optuna.samplers.CmaEsSampler",
    "nsgaii": "optuna.samplers.NSGAIISampler",
    "nsgaiii": "optuna.samplers.NSGAIIISampler",
    "qmc": "optuna.samplers.QMCSampler",
    "gp": "optuna.samplers.GPSampler",
    "grid": "optuna.samplers.GridSampler",
    "bruteforce": "optuna.samplers.BruteForceSampler",
    # motpe: Optuna 4 removed MOTPESampler; TPESampler runs multi-objective studies itself (its multi-objective
    # mode), so the released name selects TPESampler here instead of failing as the released plugin now does.
    "motpe": "optuna.samplers.TPESampler",
}
# hydra/sweeper/pruner options (PatientPruner, a wrapper, is left out); jobs prune through trial.should_prune().
PRUNERS = {
    "nop": "optuna.pruners.NopPruner",
    "median": "optuna.pruners.MedianPruner",
    "percentile": "optuna.pruners.PercentilePruner",
    "successive_halving": "optuna.pruners.SuccessiveHalvingPruner",
    "hyperband": "optuna.pruners.HyperbandPruner",
    "threshold": "optuna.pruners.ThresholdPruner",
    "wilcoxon": "optuna.pruners.WilcoxonPruner",
}
# Packages a sampler imports only when it first samples (after trial 0): checked before the first trial instead.
NEEDS: dict[type, tuple[str, ...]] = {
    optuna.samplers.CmaEsSampler: ("cmaes",),
    optuna.samplers.GPSampler: ("torch", "scipy"),
    optuna.samplers.QMCSampler: ("scipy",),
}


def target_node(target: str, filled: tuple[str, ...] = ()) -> dict[str, Any]:
    """A ``_target_`` config with one key per constructor argument (but ``filled``, which the sweeper passes)."""
    node: dict[str, Any] = {"_target_": target}
    for name, param in inspect.signature(get_class(target)).parameters.items():
        if name not in filled and param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
            node[name] = MISSING if param.default is param.empty else None
    return node


@dataclass
class WarmStartConf:
    """Another study whose best top_k trials become this study's first trials (off while storage is None)."""

    storage: str | None = None
    study_name: str | None = None
    top_k: int = 5


@dataclass
class AutoftOptunaSweeperConf:
    """Config of ``hydra/sweeper=autoft_optuna``: the released keys (same defaults) first, then ours."""

    _target_: str = "hydra_plugins.autoft_optuna_sweeper.optuna_sweeper.AutoftOptunaSweeper"
    # Hydra must hand the sampler and pruner configs over as configs: the sweeper builds them itself (reseeded on
    # a resumed study, the grid filled with the search space).
    _recursive_: bool = False
    defaults: list[Any] = field(default_factory=lambda: [{"sampler": "tpe"}, {"pruner": "nop"}])
    sampler: Any = MISSING
    # "minimize", "maximize", or a list of them for a multi-objective study.
    direction: Any = "minimize"
    # Any SQLAlchemy URL; None means sqlite:///<hydra.sweep.dir>/optuna.db (released: in memory).
    storage: Any = None
    # The study a re-run resumes; None: Optuna names a new study each run (released default).
    study_name: str | None = "autoft"
    # Trials the study holds at the end, counted across restarts (released: trials run by this command).
    n_trials: int = 20
    # Trials asked and launched together per batch.
    n_jobs: int = 2
    # End the search once more than this fraction of a batch's trials failed (0.0: at the first failing batch) ...
    max_failure_rate: float = 0.0
    # Search space in hydra-optuna-sweeper syntax; sweep overrides on the command line add to it.
    params: dict[str, Any] | None = None
    # Dotted path to fn(cfg, trial) that suggests more params after those of ``params``.
    custom_search_space: str | None = None

    # ... or, when this is set, over all of this run's trials once this many ran.
    failure_rate_min_trials: int | None = None
    pruner: Any = MISSING
    # Give each job ++optuna_trial.{storage,study_name,trial_id} so it can report and prune (trial_from_config).
    pass_trial: bool = False
    # Params of trials to run first (each dict a subset of the search space).
    enqueue: list[dict[str, Any]] = field(default_factory=list)
    warm_start: WarmStartConf = field(default_factory=WarmStartConf)
    heartbeat_interval: int = 60
    # Seconds without heartbeat before a RUNNING trial is failed as stale; None means 2 * heartbeat_interval.
    grace_period: int | None = None


def build(node: Any, where: str, *args: Any) -> Any:
    """Instantiate a sampler or pruner config, its null arguments left to Optuna's defaults (a ``_partial_`` one,
    the grid sampler, then gets ``args``); a bad config, or a sampler whose packages are missing, is a one-line
    ValueError naming ``where`` (e.g. hydra.sweeper.sampler)."""
    try:
        data = OmegaConf.to_container(node, resolve=True, throw_on_missing=True) if OmegaConf.is_config(node) else node
        made = instantiate({k: v for k, v in data.items() if v is not None})
        if isinstance(made, functools.partial):
            made = made(*args)
    except MissingMandatoryValue as e:
        raise ValueError(f"{where}.{e.full_key.rsplit('.', 1)[-1]} must be set") from None
    except (HydraException, TypeError, ValueError) as e:
        cause = e.__cause__ or e
        raise ValueError(f"{where}: {type(cause).__name__}: {str(cause).strip().splitlines()[0]}") from None
    needed = [m for kind, modules in NEEDS.items() if isinstance(made, kind) for m in modules]
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"{where}: {type(made).__name__} needs {', '.join(missing)}: pip install {' '.join(missing)}")
    return made


def spec(node: Any) -> dict[str, Any]:
    """A sampler or pruner config as plain data, nulls dropped: what a job needs to rebuild it (see ``build``)."""
    return {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if v is not None}


store = ConfigStore.instance()
store.store(group="hydra/sweeper", name="autoft_optuna", node=AutoftOptunaSweeperConf, provider="autoft_optuna")
for _name, _target in SAMPLERS.items():
    _grid = _target.endswith("GridSampler")  # the sweeper passes the grid, built from the search space
    _node = target_node(_target, filled=("search_space",)) | ({"_partial_": True} if _grid else {})
    store.store(group="hydra/sweeper/sampler", name=_name, node=_node, provider="autoft_optuna")
for _name, _target in PRUNERS.items():
    store.store(group="hydra/sweeper/pruner", name=_name, node=target_node(_target), provider="autoft_optuna")
