"""The apps' first look at data and weights (autoft/preflight.py): the run's own checks, in the run's order,
before torch, Lightning, open_clip or wilds' dataset modules are imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from autoft.preflight import preflight
from autoft.weights import hub_reachable, open_clip_registry, shipped_registry
from autoft.wildscheck import fmow_categories
from tests.test_datasets import write_iwildcam

HEAVY = ("torch", "pytorch_lightning", "open_clip", "wilds.datasets.fmow_dataset", "autoft.finetune")


@pytest.fixture
def offline_env(tmp_path) -> dict[str, str]:
    """No HF_HUB_OFFLINE (a user's machine), an empty Hugging Face cache, and no network."""
    if hub_reachable():
        pytest.skip("the Hugging Face hub answers from here: these tests need a machine without network")
    return {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"} | {"HF_HOME": str(tmp_path / "hf")}


@pytest.fixture
def data(tmp_path) -> Path:
    root = tmp_path / "data"
    write_iwildcam(root, np.random.default_rng(0))
    return root


def _errors(proc: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def test_the_check_imports_none_of_the_training_stack(offline_env, data):
    """What makes it fast: run in a fresh interpreter up to its error, the preflight leaves torch and the rest
    unimported (breaking it by importing autoft.finetune in the preflight turns this red)."""
    code = (f"import sys\nfrom autoft.preflight import preflight\ntry:\n"
            f"    preflight('finetune', ['dataset=iwildcam', 'dataset.root={data}', 'model=vit_b16'])\n"
            f"except SystemExit as e:\n    print(e.code, sorted(m for m in {HEAVY!r} if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=offline_env, timeout=120)
    assert proc.stdout.split() == ["2", "[]"], proc.stdout + proc.stderr[-2000:]
    assert _errors(proc)[0].startswith("error: 'openai' weights for ViT-B-16 are not in the Hugging Face cache")


REFERENCE_MODEL = ["model.train_text=true", "model.train_logit_scale=true", "model.captions=all"]


@pytest.mark.parametrize(("argv", "error"), [
    (["+objective.weights.foo=1"], "error: objective: unknown loss term 'foo'; valid terms: ce, hinge, entropy, dcm, "
                                   "flyp, l1init, l2init, l1zero, l2zero"),
    (["objective.convention=reference", "model.captions=all"],
     "error: objective.convention=reference trains every parameter with captions from all templates, as the "
     "reference code does: set model.train_text=true model.train_logit_scale=true (or use convention ours)")])
def test_the_objective_is_told_before_the_training_stack(argv, error):
    """The run's own line (autoft.finetune.finetune checks the objective once its model is built), with torch and
    the rest unimported; a reference-convention model that trains what the reference trains leaves its weights to
    the run (it counts the parameters first), so no verdict there."""
    code = (f"import sys\nfrom autoft.preflight import preflight\n"
            f"preflight('finetune', ['objective.convention=reference', *{REFERENCE_MODEL!r}, "
            f"'+objective.weights.foo=1'], objective=True)\n"
            f"try:\n    preflight('finetune', {argv!r}, objective=True)\n"
            f"except SystemExit as e:\n    print(e.code, sorted(m for m in {HEAVY!r} if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["2", "[]"], proc.stdout + proc.stderr[-2000:]
    assert _errors(proc) == [error]


@pytest.mark.parametrize("argv", [["dataset=nosuch"], ["-m", "search=embedded", "objective=nope"]])
def test_a_command_hydra_rejects_is_answered_before_the_training_stack(argv, tmp_path):
    """Hydra's own message and exit status 1, from the entry point's preflight, with torch and the rest unimported
    and nothing written (a single run and a multirun)."""
    code = (f"import sys\nsys.argv = ['finetune.py', *{argv!r}]\nfrom autoft.preflight import preflight\ntry:\n"
            f"    preflight('finetune', app='autoft.finetune')\n"
            f"except SystemExit as e:\n    print(e.code, sorted(m for m in {HEAVY!r} if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.stdout.split() == ["1", "[]"], proc.stdout + proc.stderr[-2000:]
    assert proc.stderr.startswith("In 'finetune': Could not find"), proc.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("app", [["autoft.finetune"], ["autoft.methods", "method=ft"]])
def test_a_missing_column_is_told_before_unavailable_weights(offline_env, data, tmp_path, app):
    meta = data / "iwildcam_v2.0" / "metadata.csv"
    pd.read_csv(meta).drop(columns=["location_remapped"]).to_csv(meta, index=False)
    proc = subprocess.run([sys.executable, "-m", *app, "dataset=iwildcam", f"dataset.root={data}", "model=vit_b16",
                           f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, env=offline_env,
                          timeout=300)
    errors = _errors(proc)
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert "metadata.csv: missing column(s) ['location_remapped']" in errors[0]
    assert not (tmp_path / "run").exists()


def test_final_reads_its_best_params_first(offline_env, data, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "autoft.final", f"best={tmp_path / 'no.yaml'}", "dataset=iwildcam",
                           f"dataset.root={data}", "model=vit_b16", f"output_dir={tmp_path / 'out'}"],
                          capture_output=True, text=True, env=offline_env, timeout=300)
    assert proc.returncode == 2 and _errors(proc) == [f"error: best-params file not found: {tmp_path / 'no.yaml'}"]


@pytest.mark.parametrize("argv", [["dataset=nosuch"], ["-m", "dataset=iwildcam"], ["--cfg", "job"],
                                  ["dataset=cifar10", "model=vit_b16"], []])
def test_what_it_cannot_check_is_left_to_the_run(argv, monkeypatch):
    """A command Hydra rejects, Hydra's flags, a dataset kind whose readers need torch (its weights then wait
    for its data), the embedded world with a tiny CLIP of its own: no verdict here."""
    monkeypatch.delenv("AUTOFT_DATA", raising=False)
    preflight("finetune", argv)  # returns: no SystemExit


def test_the_shipped_registry_is_the_installed_open_clips():
    """Refresh with ``python -m autoft.weights --write-registry`` when open_clip is upgraded."""
    assert shipped_registry() == json.loads(json.dumps(open_clip_registry()))


def test_fmow_categories_read_from_source_are_wilds_own():
    from wilds.datasets.fmow_dataset import categories

    assert fmow_categories() == categories and len(categories) == 62
