"""Dataset configs as a user writes them: every config takes dataset.cache=true and dataset.on_bad_image as
written, the data commands of docs/data.md and the README compose (the checker's run on a fixture),
and the class names and templates are the published ones."""

from __future__ import annotations

import json
import re
import shlex
from importlib.resources import files
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from autoft import UserError
from autoft.datacheck import main as datacheck
from autoft.datasets import open_data, templates
from autoft.finetune import CONF_DIR
from tests.test_datasets import SIZES, WRITERS, _cfg, _write

ROOT = Path(__file__).resolve().parents[1]
DATASETS = sorted(p.stem for p in (ROOT / "conf" / "dataset").glob("*.yaml"))


def _compose(config: str, overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config, overrides=overrides)


@pytest.mark.parametrize("dataset", DATASETS)
def test_every_dataset_config_takes_the_cache_and_bad_image_switches_as_written(dataset):
    d = _compose("finetune", [f"dataset={dataset}", "dataset.cache=true", "dataset.on_bad_image=skip"]).dataset
    assert d.cache is True and d.on_bad_image == "skip"
    default = _compose("finetune", [f"dataset={dataset}"]).dataset
    assert default.on_bad_image == "error" and default.cache is (dataset == "embedded")


def test_an_unknown_bad_image_policy_is_one_clear_error(tmp_path):
    _write(tmp_path, "sst2_fewshot")
    cfg = _cfg(tmp_path, "sst2_fewshot", "dataset.on_bad_image=ignore")
    with pytest.raises(UserError, match=r"dataset\.on_bad_image must be one of error, skip, got 'ignore'"):
        open_data(cfg.dataset, cfg.dataset.root)


# ----------------------------------------------------------------------------- the documented commands

def _commands() -> list[str]:
    """Every autoft command of docs/data.md's bash blocks, and the README's data commands (`autoft-data`)."""
    docs = (ROOT / "docs" / "data.md").read_text()
    readme = (ROOT / "README.md").read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", docs, flags=re.S):
        lines += block.replace("\\\n", " ").splitlines()
    for block in re.findall(r"```bash\n(.*?)```", readme, flags=re.S):
        lines += [line for line in block.splitlines() if "autoft-data" in line]
    lines += [c for c in re.findall(r"`(\.venv/bin/[^`]+)`", readme) if "autoft-data" in c]
    return [line.split("  #")[0].strip() for line in lines if "autoft" in line and not line.startswith("export")]


def test_the_documented_commands_are_there():
    commands = _commands()
    assert any("autoft-data check" in c for c in commands) and any("-m autoft.finetune" in c for c in commands)


@pytest.mark.parametrize("command", _commands())
def test_each_documented_data_command_composes_and_the_checks_run(tmp_path, command):
    words = shlex.split(command)
    overrides = [w for w in words if "=" in w and not w.startswith("-")]
    if "check" in words:  # the checker: run it on the dataset's fixture in its published layout
        dataset = next(o.split("=")[1] for o in overrides if o.startswith("dataset="))
        _write(tmp_path, dataset)
        flags = [w for w in words[words.index("check") + 1:] if w not in overrides]
        assert datacheck(["check", *overrides, *flags, f"dataset.root={tmp_path / 'data'}", *SIZES[dataset]]) == 0
    else:
        _compose("benchmark" if "autoft.methods" in command else "finetune", overrides)


def test_each_benchmark_of_the_layout_table_composes():
    docs = (ROOT / "docs" / "data.md").read_text()
    cells = re.findall(r"^\| [^|]+ \| `(dataset=[^`]+)`", docs, flags=re.M)
    named = {c.split()[0].split("=")[1] for c in cells}
    assert named == set(WRITERS) | {"imagenet_4shot"}  # every fixture layout, and the k-shot ImageNet row
    for cell in cells:
        assert _compose("finetune", cell.split()).dataset.name


# --------------------------------------------------------------------------- class names and templates

def test_fmow_has_the_reference_codes_16_templates_with_the_right_article():
    ts = templates(_compose("finetune", ["dataset=fmow"]).dataset.templates)
    assert len(ts) == 16
    filled = [t.format("airport") for t in ts] + [t.format("dam") for t in ts]
    assert {"satellite photo of an airport.", "aerial photo of an airport.", "satellite photo of a dam.",
            "aerial photo of a dam.", "satellite photo of a airport."} <= set(filled)  # the reference keeps "a" too


def test_caltech101_names_are_clips_for_all_101_folders():
    shipped = json.loads(files("autoft").joinpath("data_files/caltech101_classnames.json").read_text())
    assert "openai/CLIP" in shipped["source"] and "prompts.md" in shipped["source"]
    names = shipped["classes"]
    assert len(names) == 101 and "BACKGROUND_Google" not in names and list(names) == sorted(names)
    assert names["Faces"] == "off-center face" and names["car_side"] == "side of a car"
    assert names["yin_yang"] == "yin and yang symbol" and names["snoopy"] == "snoopy (cartoon beagle)"
