"""tests/hydra_cache.py, which every test composes through: configs as Hydra composes them, edits read, none shared."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from autoft.finetune import CONF_DIR
from tests import hydra_cache
from tests.conftest import overrides

# Each kind of source (the project's files, Hydra's package configs, the ConfigStore's structured configs: the
# sweeper's), a multirun, config groups chosen by overrides, Hydra's own node returned too.
CASES = [
    ("finetune", overrides()),
    ("finetune", ["-m", "search=autoft", "objective=autoft_iwildcam"]),
    ("benchmark", ["study=x", "method=flyp", "dataset=fmow", "model=vit_b16"]),
    ("final", ["dataset=imagenet_4shot", "objective=robust", "logger=csv"]),
]


def _compose_all() -> list[str]:
    out = []
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for name, extra in CASES:
            sweep = extra[:1] == ["-m"]
            cfg = compose(name, overrides=extra[sweep:], return_hydra_config=True)
            out.append(OmegaConf.to_yaml(cfg, resolve=False) + f"\n# hydra sweep: {sweep}")
    return out


def test_configs_composed_through_the_cache_equal_hydras_own():
    cached, again = _compose_all(), _compose_all()  # the second time from parsed files
    with hydra_cache.uninstalled():
        own = _compose_all()
    assert cached == own and again == own


def _app(path: Path, value: int) -> None:
    (path / "group").mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(f"defaults:\n  - group: a\n  - _self_\nx: {value}\nvals: [1, 2]\n")
    (path / "group" / "a.yaml").write_text(f"y: {value}\n")


def test_an_edited_config_file_is_read_again_and_no_composed_config_is_shared(tmp_path):
    _app(tmp_path, 1)
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        first = compose("config")
        first.vals.append(3)  # a composed config is the caller's own: changing it changes no later one
        assert compose("config").vals == [1, 2]
        _app(tmp_path, 2)
        assert (compose("config").x, compose("config").group.y) == (2, 2)


def _outcome(conf: Path) -> str:
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        try:
            return repr(compose("config"))
        except Exception as e:  # noqa: BLE001 - the outcome compared may be any error
            return f"{type(e).__name__}: {e}"


@pytest.mark.parametrize("text", ["", "just a string\n", "- 1\n- 2\n", "x: [unclosed\n"])
def test_odd_files_compose_or_fail_as_with_hydras_own_loading(tmp_path, text):
    (tmp_path / "config.yaml").write_text(text)
    cached = _outcome(tmp_path)
    with hydra_cache.uninstalled():
        own = _outcome(tmp_path)
    assert cached == own
