"""Test-only: Hydra composes faster, and nothing it composes changes.

A profile of `make test` (py-spy over every process, 2026-12-01) found Hydra's composition the largest single cost,
about a fifth of the suite's CPU time: each command's config, each ``compose()`` in a test, each methods job. Two
parts of it are work done again and again for the same result:

- every composition re-parses every config file it reads (YAML is slow in Python): here each file's text is parsed
  once per process and the parsed value reused. The key is the whole text, so an edited file is parsed again and
  no file can be read stale; the config built from it is new each time, as OmegaConf.load builds it.
- every composition deep-copies its config repository, and with it the whole ConfigStore (every structured config
  of Hydra and its plugins), only to read from it; ConfigStore.load already hands out a deep copy of what it
  returns. Here the copied structured source shares the one store.

Installed by tests/conftest.py in each pytest worker, and by the fork server before it forks (tests/forkserver.py),
so its jobs inherit it. tests/test_hydra_cache.py checks that configs composed with it equal Hydra's own.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

import yaml
from hydra._internal.sources_registry import SourcesRegistry
from hydra.core.plugins import Plugins
from hydra.plugins.config_source import ConfigSource
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf._utils import get_yaml_loader

_PARSED: dict[str, Any] = {}


class _ParseOnce(OmegaConf):
    """OmegaConf with a ``load`` that parses each distinct text once (for Hydra's two file-reading config sources)."""

    @staticmethod
    def load(file_: IO[Any]) -> DictConfig | ListConfig:  # type: ignore[override]
        text = file_.read()
        if isinstance(text, bytes):  # a config inside a zip file
            text = text.decode("utf-8")
        try:
            if text not in _PARSED:
                _PARSED[text] = yaml.load(text, Loader=get_yaml_loader())
            obj = _PARSED[text]
        except yaml.YAMLError:
            obj = text  # bad YAML: OmegaConf's own error below, naming the file
        if obj is not None and not isinstance(obj, (list, dict)):  # bad YAML, or a bare string or number:
            file_.seek(0)
            return OmegaConf.load(file_)  # OmegaConf's own answer
        return OmegaConf.create() if obj is None else OmegaConf.create(copy.deepcopy(obj))


def _share_store(self: ConfigSource, memo: dict[int, Any]) -> ConfigSource:
    clone = copy.copy(self)
    memo[id(self)] = clone
    return clone


def _sources() -> tuple[type[ConfigSource], type[ConfigSource], type[ConfigSource]]:
    """The config source classes Hydra uses: those its plugin scan registered, which loads their modules afresh
    (module objects of their own, not the ones ``import`` gives)."""
    Plugins.instance()
    registry = SourcesRegistry.instance()
    return registry.resolve("file"), registry.resolve("pkg"), registry.resolve("structured")


def install() -> None:
    files, package, structured = _sources()
    files.load_config.__globals__["OmegaConf"] = _ParseOnce
    package._read_config.__globals__["OmegaConf"] = _ParseOnce
    structured.__deepcopy__ = _share_store


@contextmanager
def uninstalled() -> Iterator[None]:
    """Hydra as it ships, for the comparison in tests/test_hydra_cache.py."""
    files, package, structured = _sources()
    files.load_config.__globals__["OmegaConf"] = package._read_config.__globals__["OmegaConf"] = OmegaConf
    del structured.__deepcopy__
    try:
        yield
    finally:
        install()
