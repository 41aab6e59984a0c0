"""Learning regression check: fine-tuning learns, on a world small enough for a test (about a minute).

The run is benchmarks/learning_regression.py's, on its seed 0: a small embedded world, its tiny CLIP pretrained
briefly, zero-shot, FT with conf/method/ft's recipe, WiSE-FT at alpha 0.5. The tolerance comes from that script's
3-seed measurement, benchmarks/results/2026-11-30-cpu/learning_regression.json.

Of the three effects the project's results rely on, only "FT above zero-shot on ID" holds on this world as a claim
about learning. A CLIP pretrained for seconds is no foundation model: its zero-shot macro-F1 is near 0 (it predicts
one class), and FT's OOD gain is nearly nil because 40 steps learn little that transfers, not because of the camera
shortcut; WiSE-FT's midpoint then differs from FT on OOD by noise (see the JSON's ``effects``). Those two effects
need the full pretraining (minutes: benchmarks/world_calibration.py measures them) and are not asserted here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import learning_regression as lr

REFERENCE = Path(__file__).resolve().parents[1] / "benchmarks/results/2026-11-30-cpu/learning_regression.json"


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(REFERENCE.read_text())


@pytest.fixture(scope="module")
def seed0(tmp_path_factory) -> dict:
    return lr.measure(0, tmp_path_factory.mktemp("learning"))


def test_the_reference_was_measured_on_this_configuration(reference):
    assert reference["world"] == lr.WORLD and reference["pretrain"] == lr.PRETRAIN
    assert reference["overrides"] == lr.OVERRIDES and [r["seed"] for r in reference["per_seed"]] == [0, 1, 2]


@pytest.mark.long(22)
def test_fine_tuning_beats_zero_shot_on_id(seed0, reference):
    gain = lr.effects(seed0)["ft_minus_zs_id"]
    # Seeds 0-2 measured FT - zero-shot on ID test (macro-F1) of +0.0837..+0.0844 (the JSON's effects.ft_minus_zs_id,
    # std 0.0004); half the smallest is the bound, 100x the seed spread below it. Fine-tuning that does not learn
    # fails (lr 0: gain 0.0); a weaker lr need not (lr x 0.3 passed): the check is "learns", not "learns as much".
    bound = reference["effects"]["ft_minus_zs_id"]["min"] / 2
    assert bound > 0.02  # the premise: the measured effect is well above nothing
    assert gain > bound, (gain, seed0)
