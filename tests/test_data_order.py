"""Data before model: a run reads and checks its dataset (root, files, metadata, class names) before it
loads any weights, so bad data is reported first, not after minutes of loading (or a missing-weights
message that hid it)."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from autoft import UserError
from autoft.finetune import CONF_DIR, build
from tests.test_datasets import (
    IW,
    SIZES,
    _cfg,
    _csv,
    _rename_column,
    _rm,
    _write,
    presence_instead_of_md5,  # noqa: F401  (autouse: fixtures have no real md5)
)


@pytest.fixture
def weight_loads(monkeypatch):
    """Every call of the weights loader a run makes, which then fails as unavailable weights would."""
    calls = []

    def load_clip(*args, **kwargs):
        calls.append(args)
        raise UserError("weights unavailable (stand-in)")

    monkeypatch.setattr("autoft.finetune.load_clip", load_clip)
    return calls


@pytest.mark.parametrize("dataset,break_it,pattern", [
    ("iwildcam", lambda r: _csv(r / IW / "metadata.csv", _rename_column("location_remapped", "loc")),
     r"metadata\.csv: missing column\(s\) \['location_remapped'\]"),
    ("iwildcam", lambda r: _rm(r / IW / "categories.csv"), r"categories\.csv not found"),
    ("flowers102", lambda r: _rm(r / "flowers-102" / "setid.mat"), r"setid\.mat not found"),
    ("caltech101", lambda r: (r / "caltech101/101_ObjectCategories/airplanes").rename(
        r / "caltech101/101_ObjectCategories/planes"), r"planes: not one of Caltech101's 101 categories"),
])
def test_bad_data_is_reported_before_any_weights_load(tmp_path, weight_loads, dataset, break_it, pattern):
    _write(tmp_path, dataset)
    with pytest.raises(UserError, match="weights unavailable"):  # good data: the loader is reached
        build(_cfg(tmp_path, dataset))
    assert len(weight_loads) == 1
    break_it(tmp_path / "data")
    with pytest.raises(UserError, match=pattern):
        build(_cfg(tmp_path, dataset))
    assert len(weight_loads) == 1  # not called again


def test_methods_check_the_data_before_the_search_starts(tmp_path, monkeypatch):
    from autoft.methods import run

    _write(tmp_path, "iwildcam")
    _csv(tmp_path / "data" / IW / "metadata.csv", _rename_column("y", "label"))
    monkeypatch.setattr("autoft.methods.launch_search", lambda *a: pytest.fail("search launched on bad data"))
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("benchmark", overrides=["method=autoft", "dataset=iwildcam", f"dataset.root={tmp_path / 'data'}",
                                              "model=vit_b16", "study=test", *SIZES["iwildcam"]])
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path / "out")
    with pytest.raises(UserError, match=r"metadata\.csv: missing column\(s\) \['y'\]"):
        run(cfg, [])
    assert not (tmp_path / "out" / "method.json").exists()
