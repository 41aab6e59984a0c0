"""A search's job configs: composed by Hydra once, then derived from that one for trials that differ only in values.

Hydra composes every job of a multirun from scratch (``ConfigLoaderImpl.load_sweep_config``): the defaults list, every
config file read and parsed again, merged, the overrides applied. That is 0.2-0.5 s a job on 2 CPU cores, paid by
every trial of a search, where a short trial's own set-up is about 0.1 s. Yet a search's jobs differ only in the
values of its params (and the trial number and id the sweeper adds), never in which config files make them up.

So the launcher gets a config loader that keeps the first job it composes (a pristine copy) and answers a later job
whose overrides differ from that one's only in the values of plain ``key=value`` or ``++key=value`` overrides of
config keys (no config group, no ``+``, no ``~``, no package, a scalar on both sides, no later override on the
same node, as Hydra applies them in order) with a copy of the kept config: those overrides applied by Hydra's own
code (``ConfigLoaderImpl._apply_overrides_to_config``), and the fields Hydra derives from the overrides set as it
sets them (``hydra.overrides``, ``hydra.job.override_dirname``, and ``env_set``/``runtime.cwd``, read again). Any
other job is composed by Hydra as before, and becomes the kept one.

Where we differ from Hydra: the mechanism only. A scalar set on a config key gives the same node whatever scalar was
there before, and a value override cannot change the defaults list (Hydra interpolates only group choices there), so
the derived config equals the one Hydra composes; tests/test_sweeper_compose.py checks that, field by field, on the
apps' own searches and on the cases that must fall back.
"""

from __future__ import annotations

import copy
import os
from typing import Any

from hydra._internal.config_loader_impl import ConfigLoaderImpl, get_overrides_dirname
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from omegaconf import DictConfig, OmegaConf, open_dict

SCALARS = (str, int, float, bool, type(None))


def _lines(parsed: list[Override], hydra: bool) -> list[str]:
    return [o.input_line for o in parsed if o.is_hydra_override() == hydra]


def _overlap(a: str, b: str) -> bool:
    """Whether two override keys touch the same node (one is the other or inside it)."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


class DerivedSweepConfigs:
    """A config loader (wrapping Hydra's) whose ``load_sweep_config`` derives a job's config from the last composed
    one where only override values differ; the rest of the loader's interface is Hydra's."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader
        self._kept: tuple[DictConfig, list[Override], DictConfig] | None = None  # (master, job's overrides, config)
        self._parser = OverridesParser.create()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_loader", "_kept", "_parser"):  # unpickling in a launcher's worker
            raise AttributeError(name)
        return getattr(self._loader, name)

    def __getstate__(self) -> dict[str, Any]:  # a launcher's workers get the loader, not the kept config
        return {"_loader": self._loader}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._loader, self._kept, self._parser = state["_loader"], None, OverridesParser.create()

    def load_sweep_config(self, master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        overrides = [*OmegaConf.to_container(master_config.hydra.overrides.hydra), *sweep_overrides]
        parsed = self._parser.parse_overrides(overrides=overrides)
        derived = self._derive(master_config, parsed)
        if derived is not None:
            return derived
        config = self._loader.load_sweep_config(master_config, sweep_overrides)
        self._keep(master_config, parsed, config)
        return config

    def _keep(self, master_config: DictConfig, parsed: list[Override], config: DictConfig) -> None:
        """Keep a copy of a config Hydra composed, if its override lists are as Hydra builds them from ``parsed``."""
        lists = OmegaConf.to_container(config.hydra.overrides, resolve=False)  # "k=${x}" is an interpolation there
        ours = lists["task"] == _lines(parsed, False) and lists["hydra"] == _lines(parsed, True)
        self._kept = (master_config, parsed, copy.deepcopy(config)) if ours else None

    def _derive(self, master_config: DictConfig, parsed: list[Override]) -> DictConfig | None:
        """The kept config with ``parsed``'s differing values applied, or None where Hydra must compose."""
        if self._kept is None or self._kept[0] is not master_config or len(self._kept[1]) != len(parsed):
            return None
        _, kept_parsed, kept = self._kept
        choices = kept.hydra.runtime.choices
        changed = []
        for i, (old, new) in enumerate(zip(kept_parsed, parsed, strict=True)):
            if old.input_line == new.input_line:
                continue
            # Hydra applies the overrides in order: a later one on the same node would win over this one
            if any(_overlap(new.key_or_group, later.key_or_group) for later in parsed[i + 1:]):
                return None
            if not (old.key_or_group == new.key_or_group and old.type == new.type
                    and new.type in (OverrideType.CHANGE, OverrideType.FORCE_ADD)
                    and old.package is None and new.package is None
                    and not old.is_sweep_override() and not new.is_sweep_override()
                    and new.key_or_group not in choices
                    and isinstance(old.value(), SCALARS) and isinstance(new.value(), SCALARS)):
                return None
            changed.append(new)
        config = copy.deepcopy(kept)
        ConfigLoaderImpl._apply_overrides_to_config(changed, config)
        hydra = config.hydra
        hydra.overrides.task = _lines(parsed, False)
        hydra.overrides.hydra = _lines(parsed, True)
        dirname = hydra.job.config.override_dirname
        hydra.job.override_dirname = get_overrides_dirname(
            overrides=[o for o in parsed if not o.is_hydra_override()], kv_sep=dirname.kv_sep,
            item_sep=dirname.item_sep, exclude_keys=dirname.exclude_keys)
        with open_dict(hydra):
            for key in hydra.job.env_copy:
                hydra.job.env_set[key] = os.environ[key]
        hydra.runtime.cwd = os.getcwd()
        OmegaConf.copy_cache(from_config=master_config, to_config=config)
        return config
